"""`lowrank::refresh_projector`: a gradient-refreshed projector (svd, dct) refreshed inside the backward.

consume-grads' "refresh" mode calls it right after a gradient is made, so a refresh step keeps
no full-size gradient: the new projector comes from the gradient of the first backward call
after zero_grad (the whole step's gradient when there is no accumulation), and this and every
later backward call of the step project with it. At `opt.step()`, `refresh.prepare` installs it
(rotating the states when asked) exactly as a refresh from a full buffer would.

The op is opaque to Inductor (an extern call): the SVD, its failure handling and DCT's column
choice stay plain eager code. `kind` names the projector (lowrank_compile/projectors; its
`refresh_from` is "gradient"). `code` (a 0-d int64 tensor) says what to do:

- 0: pass `src` through (the parameter is not due, or the step's projector is already chosen);
- 1: refresh from `g`; there is no previous projector, so a failed SVD falls back to a QR
  range finder;
- 2: refresh from `g`; a failed SVD keeps `src`, the previous projector.

Under DDP (runtime/dist.py) the code also names the data-parallel group, `with_group`: the
gradient is averaged over its ranks before the refresh, so every rank chooses the same projector.

A failure is recorded under (`name`, the address of `src`), for `prepare` to see (and warn
about): `src` is the parameter's own projector at a refresh, so two models with the same
parameter names never see each other's failures.
"""

from __future__ import annotations

import torch

from lowrank_compile.runtime import projector as pm

__all__ = [
    "PASS",
    "REFRESH",
    "REFRESH_FIRST",
    "failed",
    "refresh_projector",
    "refresh_projector_ref",
    "with_group",
]

PASS, REFRESH_FIRST, REFRESH = 0, 1, 2
_GROUP_STRIDE = 4  # code = base + _GROUP_STRIDE * (data-parallel group index + 1)


def with_group(code: int, gid: int) -> int:
    """`code`, also asking to average the gradient over data-parallel group `gid` first."""
    return code + _GROUP_STRIDE * (gid + 1)


_FAILED: dict[tuple[str, int], str] = {}


def failed(name: str, projector: torch.Tensor) -> str | None:
    """The failure of `name`'s last in-backward refresh, or None when it succeeded.

    `projector` is the parameter's current projector (or dct indices). A failure is forgotten
    once read.
    """
    return _FAILED.pop((name, projector.data_ptr()), None)


def _fallback(g: torch.Tensor, rank: int, left: bool) -> torch.Tensor:
    a = g if left else g.t()
    if torch.isfinite(a).all():
        gen = torch.Generator().manual_seed(17)
        omega = torch.randn(a.shape[1], rank, generator=gen, dtype=torch.float64)
        q, _ = torch.linalg.qr(a.double().cpu() @ omega)
        if torch.isfinite(q).all() and q.abs().sum() > 0:
            return q.float().to(g.device)
    from lowrank_compile.projectors.dct import dct_basis

    return dct_basis(a.shape[0], torch.float32, g.device)[:, :rank].clone()


def refresh_projector_ref(
    g: torch.Tensor,
    code: int,
    src: torch.Tensor,
    basis: torch.Tensor,
    rank: int,
    left: bool,
    name: str,
    signs: str = "canonical",
    kind: str = "svd",
) -> torch.Tensor:
    """The refresh in plain torch: the new projector (d x r, or a basis kind's r indices) or `src`.

    Always a new contiguous tensor (the fake kernel promises that layout).
    """
    return (
        _refresh(g, code, src, basis, rank, left, name, signs, kind)
        .to(src.dtype)
        .clone(memory_format=torch.contiguous_format)
    )


def _refresh(
    g: torch.Tensor,
    code: int,
    src: torch.Tensor,
    basis: torch.Tensor,
    rank: int,
    left: bool,
    name: str,
    signs: str,
    kind: str,
) -> torch.Tensor:
    from lowrank_compile import projectors

    code, gid = code % _GROUP_STRIDE, code // _GROUP_STRIDE - 1
    if code == PASS:
        return src
    if gid >= 0:
        from lowrank_compile.runtime import dist

        g = dist.average_(g, gid)
    side: pm.Side = "left" if left else "right"
    proj = projectors.get(kind)
    try:
        return proj.choose(g, rank, side, signs, basis if basis.numel() else None)
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        _FAILED[(name, src.data_ptr())] = str(err).splitlines()[0] if str(err) else type(err).__name__
        if code == REFRESH or proj.storage == "basis":  # a basis kind's columns are always usable
            return src
        return _fallback(g, rank, left)


@torch.library.custom_op("lowrank::refresh_projector", mutates_args=())
def refresh_projector(
    g: torch.Tensor,
    code: torch.Tensor,
    src: torch.Tensor,
    basis: torch.Tensor,
    rank: int,
    left: bool,
    name: str,
    signs: str,
    kind: str,
) -> torch.Tensor:
    """The op the backward graph calls; see the module docstring."""
    return refresh_projector_ref(g, int(code.item()), src, basis, rank, left, name, signs, kind)


@refresh_projector.register_fake
def _(g, code, src, basis, rank, left, name, signs, kind):  # noqa: ANN001, ANN202 (the op's signature)
    return src.new_empty(src.shape)
