"""consume-grads: planned gradients are consumed in the backward graph, where they are made.

Before (an AOTAutograd backward graph; output i is the gradient of forward input i):

    mm_2 = aten.mm(permute_6, primals_3)
    permute_8 = aten.permute(mm_2, [1, 0])
    return (permute_8, view_1, None)

After `ConsumeGradients(slots=(GradSlot(0, "full"),))`:

    lowrank_fresh_0 = placeholder()               # 0-d bool: no gradient since zero_grad
    lowrank_grad_0 = placeholder()                # the backend's buffer for parameter 0
    mm_2 = aten.mm(permute_6, primals_3)
    permute_8 = aten.permute(mm_2, [1, 0])
    add = aten.add(lowrank_grad_0, permute_8)     # <- consume-grads
    where = aten.where(lowrank_fresh_0, permute_8, add)
    copy_ = aten.copy_(lowrank_grad_0, where)
    return (None, view_1, None)

Modes per slot (G is the gradient, m x n; every accumulator follows `where(fresh, new, old + new)`):
- "full": accumulate G itself (full-rank parameters; projected ones at svd/dct refresh steps).
- "project": accumulate R = P^T G (side "left") or G P ("right"), plus sum(G^2) and max|G|.
  Those two let clip_grad_norm_ use the exact norm of the full gradient. For dct, P is
  gathered in the graph from the shared basis and the layer's column indices; for the seeded
  projectors (sparse, gaussian) it is generated in the graph from a one-element key
  (the kind's `generate`, lowrank_compile/projectors), so it is never an input; a quantized one
  (`projector_bits` < 32) arrives as codes and group scales and is dequantized in the graph.
- "project" with `stats=False` (no sum(G^2), max|G| or clip sketch: nothing will clip) and
  `direct`: when G is one mm(A, B) (a linear layer's dY^T X) under transposes that nothing else
  reads and two thin GEMMs cost fewer flops, R = (P^T A) B or A (B P) (or their transposed
  forms) is made from the factors, and the mm that formed G is erased.
- "sketch": "project" plus the randomized refresh sketch Y += A Omega, with A = G (left) or
  G^T (right).
- with `clip_k > 0`, "project", "sketch" and "refresh" also accumulate a k-column sketch of the
  projection residual (see `consume_project`), for clip_grad_norm_ after accumulation.
- "refresh": svd/dct refresh steps without a full buffer. `lowrank::refresh_projector` (an
  opaque op, runtime/refresh_op.py) makes the new projector from G on the step's first backward
  call and passes it through on later ones; it is copied to the `refresh_dst` buffer, and R is
  accumulated with it as in "project".

The full gradient dies inside the graph, right after the node that made it. The output slot
becomes None, so autograd never sets `.grad` and torch.optim never allocates state for it.
New placeholders go after the existing ones. `gm.meta["lowrank_extra_inputs"]` lists them as
(output index, role), for the runtime to feed on each call. The `copy_` into an input is the
only kind of mutation Inductor allows in such a graph.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import cast

import torch
import torch.fx

from lowrank_compile import _compat
from lowrank_compile.passes.base import GraphPass

__all__ = [
    "EXTRA_INPUTS_KEY",
    "MODES",
    "ConsumeGradients",
    "GradSlot",
    "consume_full",
    "consume_project",
    "consume_stats",
]

EXTRA_INPUTS_KEY = "lowrank_extra_inputs"
ANCHORS_KEY = "lowrank_update_anchors"  # output index -> positions of the placeholders that are the parameter
MODES = ("full", "project", "sketch", "refresh")
aten = torch.ops.aten


@dataclass(frozen=True)
class GradSlot:
    """One planned gradient: the backward output at `output_index`, and how to consume it."""

    output_index: int
    mode: str = "full"
    side: str | None = None  # "left" | "right" for project/sketch
    # The projector kind (lowrank_compile/projectors); its `storage` says how P arrives: a matrix,
    # (basis, index) for "basis", or a key input it is generated from in the graph for "seeded".
    projector: str = "svd"
    rank: int = 0  # r, for the fake shapes of project/sketch inputs
    sketch_k: int = 0  # sketch width k (sketch mode)
    clip_k: int = 0  # width of the clip residual sketch (project/sketch/refresh modes; 0 = none)
    name: str = ""  # the parameter's name (refresh mode: names it in warnings)
    signs: str = "canonical"  # refresh mode: the SVD's sign convention (projectors/svd.py)
    pbits: int = 32  # < 32: P arrives as codes + group scales, dequantized in the graph
    pshapes: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())  # pbits < 32: codes', scales' shapes
    update: bool = False  # update_in_backward: hand the update op what it reads, accumulate nothing
    stats: bool = True  # project/sketch/refresh: accumulate sum(G^2) and max|G| (for clip_grad_norm_)
    direct: bool = False  # project, no stats: R from the factors of G = A B when that is fewer flops

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"GradSlot.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "full" and (self.side not in ("left", "right") or self.rank < 1):
            raise ValueError(f"GradSlot mode {self.mode!r} needs side and rank")
        if self.direct and (self.mode != "project" or self.clip_k or (self.stats and not self.update)):
            raise ValueError("GradSlot.direct needs mode 'project' without stats or clip sketch")
        _ = self.kind  # an unknown kind raises here, naming the known ones

    @property
    def kind(self) -> Any:
        """The projector kind (a `projectors.base.Projector`): its storage, orthonormality, generator."""
        from lowrank_compile import projectors

        return projectors.get(self.projector)

    def refresh_shapes(
        self, d: int, r: int, dt: torch.dtype
    ) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]:
        """Refresh mode: (shape, dtype) of the projector the refresh op passes through, and `basis`'s shape.

        A basis kind passes r column indices and its d x d basis; a matrix kind the d x r matrix.
        """
        if self.kind.storage == "basis":
            return (r,), torch.int64, (d, d)
        return (d, r), dt, (0,)


# The consumers, as ordinary eager torch code. The pass traces them with make_fx under the
# graph's fake mode and Inductor's decompositions, then inlines them after the gradient's producer.
def _accumulate(fresh: torch.Tensor, buf: torch.Tensor, new: torch.Tensor, combine: Any = torch.add) -> None:
    buf.copy_(torch.where(fresh, new, combine(buf, new)))


def consume_full(g: torch.Tensor, fresh: torch.Tensor, grad: torch.Tensor) -> None:
    """Full-size accumulation."""
    _accumulate(fresh, grad, g)


def consume_stats(g: torch.Tensor, fresh: torch.Tensor, sq: torch.Tensor, amax: torch.Tensor) -> None:
    """sum(G^2) and max|G|, in the accumulators' dtype (fp32, or the parameter's when wider)."""
    gw = g.to(sq.dtype)
    _accumulate(fresh, sq, (gw * gw).sum())
    _accumulate(fresh, amax, gw.abs().amax(), torch.maximum)


def consume_project(
    g: torch.Tensor,
    fresh: torch.Tensor,
    proj: torch.Tensor,
    rgrad: torch.Tensor,
    sq: torch.Tensor,
    amax: torch.Tensor,
    *extra: torch.Tensor,
    left: bool,
    sketch: bool = False,
    clip: bool = False,
    orthonormal: bool = True,
    stats: bool = True,
) -> None:
    """R += proj(G), sum(G^2) and max|G|; `sketch`: Y += A Omega; `clip`: the residual sketch.

    `extra` holds (omega, y) when `sketch`, then (c_omega, c_y, c_diag, sq_r) when `clip`:
    with A = G (left) or G^T (right), d x e, and E = A - P P^T A its projection residual,
    C_y += A c_omega, c_diag += column sums of (E c_omega)^2, sq_r += ||P^T A||^2. They let
    clip_grad_norm_ estimate the norm of a gradient summed over backward calls (runtime/clip.py).
    A P without orthonormal columns (the seeded projectors, `orthonormal=False`) splits nothing
    off: E = A and sq_r stays 0, so the sketch estimates every cross term.
    """
    r = _project(g, proj, left, rgrad.dtype)
    _accumulate(fresh, rgrad, r)
    if stats:
        consume_stats(g, fresh, sq, amax)
    a = g if left else g.t()
    rest = list(extra)
    if sketch:
        omega, y = rest[:2]
        rest = rest[2:]
        _accumulate(fresh, y, (a @ omega).to(y.dtype))
    if clip:
        c_omega, c_y, c_diag, sq_r = rest
        yi = (a @ c_omega).to(c_y.dtype)
        ei = yi
        if orthonormal:
            pc = proj.to(c_y.dtype)
            ei = yi - pc @ (pc.t() @ yi)
            rw = r.to(sq_r.dtype)
            _accumulate(fresh, sq_r, (rw * rw).sum())
        _accumulate(fresh, c_y, yi)
        _accumulate(fresh, c_diag, (ei * ei).sum(0).to(c_diag.dtype))


def _project(g: torch.Tensor, proj: torch.Tensor, left: bool, dtype: torch.dtype) -> torch.Tensor:
    """R = P^T G (left) or G P (right): the GEMM in the parameter's dtype, R in `dtype`."""
    return (proj.t() @ g if left else g @ proj).to(dtype)


def _project_factors(
    a: torch.Tensor, b: torch.Tensor, proj: torch.Tensor, left: bool, transposed: bool, dtype: torch.dtype
) -> torch.Tensor:
    """`_project` of G = A B (`transposed`: G = (A B)^T) without forming G: two thin GEMMs."""
    if left:  # P^T G
        r = (b @ proj).t() @ a.t() if transposed else (proj.t() @ a) @ b
    else:  # G P
        r = b.t() @ (a.t() @ proj) if transposed else a @ (b @ proj)
    return r.to(dtype)


def consume_project_factors(
    a: torch.Tensor,
    b: torch.Tensor,
    fresh: torch.Tensor,
    proj: torch.Tensor,
    rgrad: torch.Tensor,
    *,
    left: bool,
    transposed: bool,
) -> None:
    """R += proj(G) for G = A B (or its transpose), G never formed; no statistics."""
    _accumulate(fresh, rgrad, _project_factors(a, b, proj, left, transposed, rgrad.dtype))


def _factors(grad: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, bool, list[torch.fx.Node]] | None:
    """(A, B, transposed, the nodes from `grad` down to the mm), or None.

    Found when `grad` is A @ B, or its transpose, through 2-D transposes that nothing else reads.
    """
    chain: list[torch.fx.Node] = []
    node, transposed = grad, False
    while True:
        if len(node.users) != 1:
            return None
        chain.append(node)
        if node.op != "call_function":
            return None
        target, args = node.target, node.args
        if target is aten.mm.default:
            a, b = args[0], args[1]
            if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
                return a, b, transposed, chain
            return None
        is_t = target is aten.t.default or (
            target is aten.permute.default and list(cast(Sequence[int], args[1])) == [1, 0]
        )
        if not is_t or not isinstance(args[0], torch.fx.Node):
            return None
        node, transposed = args[0], not transposed


def _direct_pays(a: torch.fx.Node, b: torch.fx.Node, rank: int) -> bool:
    """Fewer flops for the two thin GEMMs r T (m + n) than for forming G and projecting it."""
    (m, t), (_, n) = a.meta["val"].shape, b.meta["val"].shape
    if not all(isinstance(x, int) for x in (m, t, n)):
        return False  # symbolic sizes: keep the graph as it is
    return rank * t * (m + n) < m * n * (t + rank)


def _refreshed(
    g: torch.Tensor,
    code: torch.Tensor,
    src: torch.Tensor,
    basis: torch.Tensor,
    rank: int,
    left: bool,
    name: str,
    signs: str,
    kind: str,
    pbits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(what refresh_projector returns, the d x r matrix to project with) on a refresh step.

    `pbits` < 32: the matrix as it reads back once quantized (what later steps use).
    """
    from lowrank_compile.runtime.refresh_op import refresh_projector

    new = refresh_projector(g, code, src, basis, rank, left, name, signs, kind)
    proj = basis[:, new] if basis.numel() else new  # a basis kind returns column indices
    if pbits < 32:
        from lowrank_compile.runtime.projector_quant import roundtrip

        proj = roundtrip(proj, pbits)
    return new, proj


def consume_refresh(
    g: torch.Tensor,
    code: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    basis: torch.Tensor,
    fresh: torch.Tensor,
    rgrad: torch.Tensor,
    sq: torch.Tensor,
    amax: torch.Tensor,
    *clip_bufs: torch.Tensor,
    rank: int,
    left: bool,
    name: str,
    signs: str,
    kind: str = "svd",
    pbits: int = 32,
) -> None:
    """P = refresh_projector(G, ...) into `dst`; then R += proj(G) with that P, as consume_project.

    `pbits` < 32: R is accumulated with P as it reads back once quantized (what later steps use).
    """
    new, proj = _refreshed(g, code, src, basis, rank, left, name, signs, kind, pbits)
    dst.copy_(new)
    consume_project(g, fresh, proj, rgrad, sq, amax, *clip_bufs, left=left, clip=bool(clip_bufs))


def _is_view(node: torch.fx.Node) -> bool:
    """True when `node`'s value aliases its first input (a view op)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    # _unsafe_view shares its input's storage without saying so in its schema.
    return target.is_view or target.overloadpacket is aten._unsafe_view


def _gather_dct(g: torch.Tensor, basis: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return basis[:, index]


def _call_update(
    token: torch.Tensor, values: list[torch.Tensor], anchors: Sequence[torch.Tensor], mode: str
) -> None:
    from lowrank_compile.runtime.update_op import MODES
    from lowrank_compile.runtime.update_op import update_in_backward

    update_in_backward(token, values, list(anchors), MODES.index(mode))


def update_full(g: torch.Tensor, token: torch.Tensor, *anchors: torch.Tensor) -> None:
    """update_in_backward, full-size gradient: the update reads G itself."""
    _call_update(token, [g], anchors, "full")


def update_project(
    g: torch.Tensor,
    token: torch.Tensor,
    *rest: torch.Tensor,
    get_p: Any,
    n_p: int,
    left: bool,
    sketch: bool,
    acc_dtype: torch.dtype,
) -> None:
    """update_in_backward, projected: R = proj(G) (and the sketch Y = A Omega), then the update op.

    `rest`: the `n_p` projector inputs, then Omega when `sketch`, then the anchors.
    """
    proj = get_p(g, *rest[:n_p])
    values = [_project(g, proj, left, acc_dtype)]
    if sketch:
        omega = rest[n_p]
        values.append(((g if left else g.t()) @ omega).to(acc_dtype))
    _call_update(token, values, rest[n_p + int(sketch) :], "sketch" if sketch else "project")


def update_project_factors(
    a: torch.Tensor,
    b: torch.Tensor,
    token: torch.Tensor,
    *rest: torch.Tensor,
    get_p: Any,
    n_p: int,
    left: bool,
    transposed: bool,
    acc_dtype: torch.dtype,
) -> None:
    """update_project for G = A B (or its transpose), G never formed. `rest`: projector inputs, anchors."""
    proj = get_p(a, *rest[:n_p])
    _call_update(token, [_project_factors(a, b, proj, left, transposed, acc_dtype)], rest[n_p:], "project")


def update_refresh(
    g: torch.Tensor,
    token: torch.Tensor,
    code: torch.Tensor,
    src: torch.Tensor,
    basis: torch.Tensor,
    *anchors: torch.Tensor,
    rank: int,
    left: bool,
    name: str,
    signs: str,
    kind: str,
    pbits: int,
    acc_dtype: torch.dtype,
) -> None:
    """update_in_backward, svd/dct refresh step: P_new from G, R with it, then the update op."""
    new, proj = _refreshed(g, code, src, basis, rank, left, name, signs, kind, pbits)
    _call_update(token, [_project(g, proj, left, acc_dtype), new], anchors, "refresh")


def _reject_aten_mutation(traced: torch.fx.Graph, fn: Any) -> None:
    """Raise if a traced consumer kept an in-place aten op that Inductor has no lowering for.

    make_fx here does not functionalize, so in-place ops reach Inductor as written. Those it lowers
    (`copy_`/`add_` into a backend buffer) are fine; any other goes through a fallback Inductor builds
    on the fly, and with the environment variable CI set (as GitHub Actions and most CI systems do)
    that is an error for every op that has a decomposition (`aten.clamp_` was:
    torch/_inductor/lowering.py::make_fallback). Our own custom ops are not aten and are left alone.
    """
    for node in traced.nodes:
        target = node.target
        if (
            node.op == "call_function"
            and isinstance(target, torch._ops.OpOverload)
            and target.namespace == "aten"
            and target._schema.is_mutable
            and not _compat.inductor_lowers(target)
        ):
            raise RuntimeError(
                f"consume-grads: the consumer {getattr(fn, '__name__', fn)!r} traced to the in-place op "
                f"{target}; write it out of place (Inductor rejects the fallback when CI is set)"
            )


def _inline(
    graph: torch.fx.Graph, after: torch.fx.Node, fn: Any, args: Sequence[torch.fx.Node], fake_mode: Any
) -> torch.fx.Node:
    """Trace `fn` on the fake values of `args`, copy its nodes into `graph` after `after`; return the last."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    vals = [a.meta["val"] for a in args]
    with fake_mode:
        traced = make_fx(fn, decomposition_table=select_decomp_table())(*vals)
    _reject_aten_mutation(traced.graph, fn)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    inputs = iter(args)
    cursor = after
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(inputs)
        elif node.op == "output":
            continue
        else:
            with graph.inserting_after(cursor):
                new = graph.node_copy(node, lambda n: env[n])
            env[node] = new
            cursor = new
    return cursor


@dataclass(frozen=True)
class ConsumeGradients(GraphPass):
    """Replace the listed gradient outputs by accumulation into backend buffers; output None instead."""

    name = "consume-grads"
    slots: tuple[GradSlot, ...]

    def transform(self, gm: torch.fx.GraphModule) -> int:
        """Rewrite every slot whose output is a tensor; return how many were rewritten."""
        graph = gm.graph
        out_node = graph.output_node()
        outputs = list(cast(Sequence[Any], out_node.args[0]))
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        fake_mode = torch._guards.detect_fake_mode([n.meta.get("val") for n in placeholders])
        if fake_mode is None:
            raise RuntimeError("consume-grads needs a graph with fake-tensor metadata (meta['val'])")
        extra: list[tuple[int, str]] = list(gm.meta.get(EXTRA_INPUTS_KEY, []))
        last_placeholder = placeholders[-1]
        rewrites = 0

        def placeholder(slot: GradSlot, role: str, shape: Sequence[int], dtype: torch.dtype, device: Any):
            nonlocal last_placeholder
            with graph.inserting_after(last_placeholder):
                node = graph.placeholder(f"lowrank_{role}_{slot.output_index}")
            with fake_mode:
                node.meta["val"] = torch.empty(tuple(shape), dtype=dtype, device=device)
            last_placeholder = node
            extra.append((slot.output_index, role))
            return node

        def clip_inputs(slot: GradSlot, d: int, e: int, dt: Any, acc_dt: Any, stat_dt: Any, dev: Any):
            k = slot.clip_k
            if k == 0:
                return []
            return [
                placeholder(slot, "clip_omega", (e, k), dt, dev),
                placeholder(slot, "clip_y", (d, k), acc_dt, dev),
                placeholder(slot, "clip_diag", (k,), stat_dt, dev),
                placeholder(slot, "sq_r", (), stat_dt, dev),
            ]

        def projector_inputs(slot: GradSlot, d: int, r: int, short: int, dt: Any, dev: Any):
            """The placeholders the projector arrives in, and fn(g, *those) -> the d x r matrix."""
            storage = slot.kind.storage
            if storage == "basis":
                pins = [
                    placeholder(slot, "basis", (d, d), dt, dev),
                    placeholder(slot, "index", (r,), torch.int64, dev),
                ]
                return pins, _gather_dct
            if storage == "seeded":
                gen_p = functools.partial(slot.kind.generate, d=d, r=r, short=short)
                return [placeholder(slot, "pkey", (1,), torch.int64, dev)], lambda g, key: gen_p(
                    key, dtype=g.dtype
                )
            if slot.pbits < 32:
                from lowrank_compile.runtime.projector_quant import dequantize

                code_dt = torch.float16 if slot.pbits == 16 else torch.uint8
                pins = [
                    placeholder(slot, "pcodes", slot.pshapes[0], code_dt, dev),
                    placeholder(slot, "pqparams", slot.pshapes[1], torch.float32, dev),
                ]
                deq = functools.partial(dequantize, bits=slot.pbits, d=d, r=r)
                return pins, lambda g, codes, qparams: deq(codes, qparams, dtype=g.dtype)
            return [placeholder(slot, "proj", (d, r), dt, dev)], lambda g, p: p

        dead: list[torch.fx.Node] = []  # G and the transposes above it, when R is made from G's factors

        def direct(slot: GradSlot, grad: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, bool] | None:
            """(A, B, transposed) when the slot may skip forming G = A B and that pays; else None."""
            found = _factors(grad) if slot.direct and outputs.count(grad) == 1 else None
            if found is None or not _direct_pays(found[0], found[1], slot.rank):
                return None
            dead.extend(found[3])
            return found[0], found[1], found[2]

        by_name = {n.name: n for n in placeholders}
        anchors: dict[int, list[int]] = dict(gm.meta.get(ANCHORS_KEY, {}))

        def update_in_place(slot: GradSlot, grad: torch.fx.Node, val: Any) -> None:
            """update_in_backward: compute what the update reads and call the update op on it."""
            dev, dt = val.device, val.dtype
            m, n = val.shape if val.dim() == 2 else (0, 0)
            # The parameter itself, when the backward reads it (AOTAutograd names input i primals_{i+1}).
            anchor = by_name.get(f"primals_{slot.output_index + 1}")
            anc = [anchor] if anchor is not None else []
            anchors[slot.output_index] = [placeholders.index(a) for a in anc]
            token = placeholder(slot, "token", (), torch.int64, torch.device("cpu"))
            head = [grad]  # what the consumer reads of the gradient: G, or its factors A and B
            if slot.mode == "full":
                last = _inline(graph, grad, update_full, [grad, token, *anc], fake_mode)
            else:
                r, left = slot.rank, slot.side == "left"
                d, e = (m, n) if left else (n, m)
                acc_dt = torch.float32 if dt in (torch.bfloat16, torch.float16) else dt
                ins: list[torch.fx.Node] = []
                if slot.mode == "refresh":
                    p_shape, p_dt, basis_shape = slot.refresh_shapes(d, r, dt)
                    ins = [
                        placeholder(slot, "refresh_code", (), torch.int64, dev),
                        placeholder(slot, "refresh_src", p_shape, p_dt, dev),
                        placeholder(slot, "basis", basis_shape, dt, dev),
                    ]
                    fn: Any = functools.partial(
                        update_refresh,
                        rank=r,
                        left=left,
                        name=slot.name,
                        signs=slot.signs,
                        kind=slot.projector,
                        pbits=slot.pbits,
                        acc_dtype=acc_dt,
                    )
                else:
                    pins, get_p = projector_inputs(slot, d, r, min(m, n), dt, dev)
                    ins = list(pins)
                    if slot.mode == "sketch":
                        ins.append(placeholder(slot, "omega", (e, slot.sketch_k), dt, dev))
                    factors = direct(slot, grad)
                    if factors is None:
                        fn = functools.partial(
                            update_project,
                            get_p=get_p,
                            n_p=len(pins),
                            left=left,
                            sketch=slot.mode == "sketch",
                            acc_dtype=acc_dt,
                        )
                    else:
                        a, b, transposed = factors
                        head = [a, b]
                        fn = functools.partial(
                            update_project_factors,
                            get_p=get_p,
                            n_p=len(pins),
                            left=left,
                            transposed=transposed,
                            acc_dtype=acc_dt,
                        )
                last = _inline(graph, grad, fn, [*head, token, *ins, *anc], fake_mode)
            # After the last node that reads the parameter, directly or through views of it: its
            # update must not change what they read.
            aliases, todo = set(anc), list(anc)
            while todo:
                for u in todo.pop().users:
                    if u not in aliases and _is_view(u):
                        aliases.add(u)
                        todo.append(u)
            readers = {u for a in aliases for u in a.users} - {last}
            later, seen = None, False
            for node in graph.nodes:
                if node is last:
                    seen = True
                elif seen and node in readers:
                    later = node
            if later is not None:
                later.append(last)

        for slot in self.slots:
            grad = outputs[slot.output_index]
            if not isinstance(grad, torch.fx.Node):
                continue  # this graph makes no gradient for the parameter
            val = grad.meta["val"]
            dev, dt = val.device, val.dtype
            m, n = val.shape if val.dim() == 2 else (0, 0)
            if slot.update:
                update_in_place(slot, grad, val)
                outputs[slot.output_index] = None
                rewrites += 1
                continue
            fresh = placeholder(slot, "fresh", (), torch.bool, dev)
            if slot.mode == "full":
                buf = placeholder(slot, "grad", val.shape, dt, dev)
                _inline(graph, grad, consume_full, [grad, fresh, buf], fake_mode)
            elif slot.mode == "refresh":
                r, left = slot.rank, slot.side == "left"
                d, e = (m, n) if left else (n, m)
                acc_dt = torch.float32 if dt in (torch.bfloat16, torch.float16) else dt
                stat_dt = torch.float64 if dt == torch.float64 else torch.float32
                p_shape, p_dt, basis_shape = slot.refresh_shapes(d, r, dt)
                args = [
                    grad,
                    placeholder(slot, "refresh_code", (), torch.int64, dev),
                    placeholder(slot, "refresh_src", p_shape, p_dt, dev),
                    placeholder(slot, "refresh_dst", p_shape, p_dt, dev),
                    placeholder(slot, "basis", basis_shape, dt, dev),
                    fresh,
                    placeholder(slot, "rgrad", (r, n) if left else (m, r), acc_dt, dev),
                    placeholder(slot, "sq", (), stat_dt, dev),
                    placeholder(slot, "amax", (), stat_dt, dev),
                    *clip_inputs(slot, d, e, dt, acc_dt, stat_dt, dev),
                ]
                refresh = functools.partial(
                    consume_refresh,
                    rank=r,
                    left=left,
                    name=slot.name,
                    signs=slot.signs,
                    kind=slot.projector,
                    pbits=slot.pbits,
                )
                _inline(graph, grad, refresh, args, fake_mode)
            else:
                r, left = slot.rank, slot.side == "left"
                d, e = (m, n) if left else (n, m)
                pins, get_p = projector_inputs(slot, d, r, min(m, n), dt, dev)
                acc_dt = torch.float32 if dt in (torch.bfloat16, torch.float16) else dt
                rbuf = placeholder(slot, "rgrad", (r, n) if left else (m, r), acc_dt, dev)
                stat_dt = torch.float64 if dt == torch.float64 else torch.float32
                sq = placeholder(slot, "sq", (), stat_dt, dev)
                amax = placeholder(slot, "amax", (), stat_dt, dev)
                extra_args: list[torch.fx.Node] = []
                if slot.mode == "sketch":
                    k = slot.sketch_k
                    extra_args = [
                        placeholder(slot, "omega", (e, k), dt, dev),
                        placeholder(slot, "sketch_y", (d, k), acc_dt, dev),
                    ]
                extra_args += clip_inputs(slot, d, e, dt, acc_dt, stat_dt, dev)
                consume = functools.partial(
                    consume_project,
                    left=left,
                    sketch=slot.mode == "sketch",
                    clip=slot.clip_k > 0,
                    orthonormal=slot.kind.orthonormal,
                    stats=slot.stats,
                )

                npins = len(pins)
                factors = direct(slot, grad)
                if factors is not None:
                    a, b, transposed = factors
                    consume_ab = functools.partial(consume_project_factors, left=left, transposed=transposed)

                    def fn_ab(a, b, fresh, *rest, consume=consume_ab, get_p=get_p, n=npins):
                        consume(a, b, fresh, get_p(a, *rest[:n]), *rest[n:])

                    _inline(graph, grad, fn_ab, [a, b, fresh, *pins, rbuf], fake_mode)
                else:

                    def fn(g, fresh, *rest, consume=consume, get_p=get_p, n=npins):
                        consume(g, fresh, get_p(g, *rest[:n]), *rest[n:])

                    _inline(graph, grad, fn, [grad, fresh, *pins, rbuf, sq, amax, *extra_args], fake_mode)
            outputs[slot.output_index] = None
            rewrites += 1
        out_node.args = (tuple(outputs),)
        for node in dead:  # from the output's producer down to the mm: each has no reader left
            graph.erase_node(node)
        # compile_fx_backward listed the visible outputs before this pass ran; refresh the list.
        if "user_visible_output_idxs" in out_node.meta:
            out_node.meta["user_visible_output_idxs"] = [
                i for i, o in enumerate(outputs) if isinstance(o, torch.fx.Node)
            ]
        gm.meta[EXTRA_INPUTS_KEY] = extra
        if anchors:
            gm.meta[ANCHORS_KEY] = anchors
        return rewrites
