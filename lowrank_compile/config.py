"""Backend options: the frozen `LowRankConfig` and the parser that validates `options={...}`.

`torch.compile(step, backend="lowrank", options={...})` hands the dict to the backend; it is
parsed here once. An unknown name or a bad value raises `LowRankOptionError`, whose message
names the option and the values it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

__all__ = ["LowRankConfig", "LowRankOptionError", "LowRankUsageError", "OPTION_DOCS", "parse_options"]


class LowRankUsageError(RuntimeError):
    """Training code does something the backend cannot follow; the message says what to do."""


class LowRankOptionError(ValueError):
    """A bad `options={...}` entry for the `lowrank` backend.

    Raised from inside `torch.compile`'s first call; the backend re-raises it so that Dynamo
    does not wrap it in `BackendCompilerFailed` (see `_compat.unwrapped_by_dynamo`).
    """


PROJ_TYPES = ("std", "reverse_std", "left", "right")
# One file each under lowrank_compile/projectors/ (the registry there must list the same names).
# Append only: a checkpoint stores a parameter's kind as its index here (runtime/checkpoint.py).
PROJECTORS = ("svd", "randomized", "dct", "sparse", "gaussian")
STATE_BITS = (32, 8)
PROJECTOR_BITS = (32, 16, 8, 4)  # runtime/projector_quant.py
GRAD_ACCUMULATION = ("projected", "full")
CLIP_STATS = ("auto", "always")  # backend.py: the "lean" backward variant
UPDATE_KERNELS = ("auto", "inductor")  # runtime/binding.py: `_kernel_update`
SVD_SIGNS = ("canonical", "lapack")  # projectors/svd.py: svd_projector's `signs`
# One file each under lowrank_compile/methods/ (the registry there must list the same names).
METHODS = ("galore", "fira", "frugal", "apollo", "apollo-mini", "gradnorm")
FRUGAL_FREE_RULES = ("signsgd", "sgd")
# Per method: the defaults of the options it reads differently from GaLore (None in a field = this).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "galore": {"rank": 0.25, "scale": 0.25, "projector": "svd"},
    "fira": {"rank": 0.25, "scale": 0.25, "projector": "svd", "norm_growth_limit": 1.01},
    "frugal": {
        "rank": 0.25,
        "scale": 1.0,
        "projector": "svd",
        "frugal_free_scale": 1.0,
        "frugal_free_rule": "signsgd",
    },
    "apollo": {"rank": 0.25, "scale": 1.0, "projector": "gaussian", "norm_growth_limit": 1.01},
    "apollo-mini": {"rank": 1, "scale": math.sqrt(128), "projector": "gaussian", "norm_growth_limit": 1.01},
    "gradnorm": {"rank": 0.25, "scale": 0.25, "projector": "svd"},
}
# Method hyper-parameters: the methods that read each (given with another method: an error).
METHOD_OPTIONS = {
    "norm_growth_limit": ("fira", "apollo", "apollo-mini"),
    "frugal_free_scale": ("frugal",),
    "frugal_free_rule": ("frugal",),
}

# One line per option: (accepted values, meaning). The README table and `lowrank-compile options`
# are generated from this, so the three never disagree.
OPTION_DOCS: dict[str, tuple[str, str]] = {
    "method": (
        " | ".join(METHODS),
        "what is done with the projected gradient (README: Methods): GaLore (Adam on R, update "
        "back-projected); Fira (plus the residual G - P R scaled per column by ||N||/||R||, norm-growth "
        "limited); FRUGAL (plus signSGD on the residual); APOLLO (Adam on a random projection only sets "
        "per-column scales of the raw G); APOLLO-Mini (one scale per matrix, rank 1); GradNormLoRP (per-row "
        "magnitudes with the full rule, the direction's gradient projected). Methods other than galore "
        "need Adam or AdamW",
    ),
    "rank": (
        "int >= 1, float in (0, 1], or None",
        "projection rank of GaLore matrices: absolute, or a fraction of the short side; "
        "None = no projection (every taken-over parameter keeps full-rank states); "
        "default 0.25, apollo-mini 1",
    ),
    "update_gap": ("int >= 1", "steps between projector refreshes (refresh at steps 0, T, 2T, ...)"),
    "scale": (
        "finite float > 0",
        "the method's alpha: GaLore's, Fira's and FRUGAL's back-projected update, APOLLO's scaled gradient "
        "are multiplied by it; default galore/fira 0.25, frugal/apollo 1, apollo-mini sqrt(128)",
    ),
    "norm_growth_limit": (
        "finite float >= 1 (fira, apollo, apollo-mini)",
        "Fira's and APOLLO's gamma: a full-size update whose norm grew by more than this factor since the "
        "previous step is scaled back to gamma times the previous norm; default 1.01",
    ),
    "frugal_free_scale": (
        "finite float >= 0 (frugal)",
        "FRUGAL's lambda_free: the state-free update of the residual G - P R is lr times this; default 1.0 "
        "(the paper's pre-training value; 0.1 for fine-tuning)",
    ),
    "frugal_free_rule": (
        " | ".join(FRUGAL_FREE_RULES) + " (frugal)",
        "FRUGAL's state-free optimizer on the residual: signSGD (sign of the residual) or SGD (the residual)",
    ),
    "proj_type": (" | ".join(PROJ_TYPES), "which side of the matrix is projected (std keeps the long side)"),
    "projector": (
        " | ".join(PROJECTORS),
        "default svd (apollo, apollo-mini: gaussian). How the projector is refreshed: exact SVD of the "
        "gradient; single-pass randomized SVD "
        "(no full gradient kept under accumulation); the best-aligned columns of a shared DCT basis; or a "
        "seeded random matrix that is regenerated wherever it is needed and never stored: sparse (entries "
        "+-sqrt(s/r) with probability 1/(2s) each, s = sqrt(short side)) or gaussian (approximately "
        "N(0, 1/r)); README: Projectors",
    ),
    "svd_signs": (
        " | ".join(SVD_SIGNS),
        "sign of each projector column from an SVD: canonical makes its largest entry positive, so the "
        "projector does not depend on rounding (thread counts, DDP's averaging; README: Numerics); lapack "
        "keeps torch.linalg.svd's signs, as GaLore does",
    ),
    "projector_bits": (
        " | ".join(map(str, PROJECTOR_BITS)),
        "storage of svd/randomized projectors: fp32, fp16, or Q-GaLore's group-wise (256) asymmetric 8- or "
        "4-bit codes (4-bit packed two per byte), dequantized inside the graphs that project",
    ),
    "adaptive_gap": ("bool", "Q-GaLore: a layer whose subspace stopped moving refreshes half as often"),
    "rotate_states": (
        "bool",
        "carry projected optimizer states over to the new basis at a refresh (GaLore does not)",
    ),
    "grad_accumulation": (
        " | ".join(GRAD_ACCUMULATION),
        "how projected gradients accumulate across backward calls; full keeps eager-size buffers, "
        "so clip_grad_norm_ under gradient accumulation is exact for every norm type, and takes svd/dct "
        "refreshes from the accumulated gradient instead of the first micro-batch's",
    ),
    "clip_sketch": (
        "int >= 0",
        "width of the random sketch of the projection residual that lets clip_grad_norm_ estimate the "
        "2-norm of a gradient accumulated over several backward calls (README: Clipping); 0 = no sketch, "
        "and clip_grad_norm_ after accumulation raises LowRankClipError",
    ),
    "clip_stats": (
        " | ".join(CLIP_STATS),
        "when the backward computes ||G||^2 and max|G| of projected gradients, which clip_grad_norm_ reads: "
        "auto = until the first opt.step() that no clipping preceded, then never (R is then made from the "
        "layer's input and output gradient without forming G: fewer flops; clipping after that raises "
        "LowRankClipError); always = every step",
    ),
    "check_ranks": (
        "bool",
        "debug switch for data-parallel runs: after every update, compare each taken-over parameter and its "
        "projector across ranks and raise LowRankDistributedError naming the first that differs",
    ),
    "state_bits": (
        "32 | 8",
        "storage of the optimizer states the backend owns: 8 = block-wise 8-bit (tensors of >= 4096 values)",
    ),
    "update_kernel": (
        " | ".join(UPDATE_KERNELS),
        "what runs the update of a full-rank AdamW parameter with 8-bit states: auto = the fused Triton "
        "kernel where it applies (CUDA tensors; amsgrad and maximize off, no stochastic rounding), the "
        "Inductor-compiled update elsewhere; inductor = the compiled update everywhere",
    ),
    "stochastic_rounding": (
        "bool",
        "bf16 parameters: round each updated weight to bf16 stochastically (unbiased: an update below half a "
        "bf16 step still moves the weight on average) instead of to nearest; other dtypes: warns, no effect",
    ),
    "update_in_backward": (
        "bool",
        "update each taken-over parameter inside the backward, right after its gradient is made (lr and "
        "hyper-parameters read from its param group then), so no gradient buffer outlives its layer; "
        "clip_grad_norm_/clip_grad_value_ or a GradScaler between backward and step, a second backward "
        "before opt.step(), and DDP raise LowRankOptionError",
    ),
    "min_dim": (
        "int >= 1",
        "parameters whose short side is below this stay with torch.optim (1-D ones always do)",
    ),
    "include": (
        "glob or list of globs",
        "only parameters whose name matches one of these are taken over",
    ),
    "exclude": ("glob or list of globs", "parameters whose name matches one of these stay with torch.optim"),
    "inductor": ("dict", "Inductor config patches applied to every graph the backend compiles"),
}


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
    """Options of the `lowrank` backend, validated and immutable (see README's options table)."""

    method: str = "galore"
    # "auto", None-valued method options: the method's default (METHOD_DEFAULTS), set on construction.
    rank: int | float | str | None = "auto"
    update_gap: int = 200
    scale: float = None  # type: ignore[assignment]
    norm_growth_limit: float | None = None
    frugal_free_scale: float | None = None
    frugal_free_rule: str | None = None
    proj_type: str = "std"
    projector: str = None  # type: ignore[assignment]
    svd_signs: str = "canonical"
    projector_bits: int = 32
    adaptive_gap: bool = False
    rotate_states: bool = False
    grad_accumulation: str = "projected"
    clip_sketch: int = 16
    clip_stats: str = "auto"
    check_ranks: bool = False
    state_bits: int = 8
    update_kernel: str = "auto"
    stochastic_rounding: bool = False
    update_in_backward: bool = False
    min_dim: int = 32
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    inductor: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise _fail("method", self.method)
        for name, methods in METHOD_OPTIONS.items():
            if getattr(self, name) is not None and self.method not in methods:
                raise LowRankOptionError(
                    f"lowrank option {name!r}: got {getattr(self, name)!r} with method={self.method!r}, "
                    "which "
                    f"does not read it; accepted with this method: leave it unset (it applies to method="
                    + " or ".join(repr(m) for m in methods)
                    + ")"
                )
        for name, value in METHOD_DEFAULTS[self.method].items():
            # rank=None means "no projection": only "auto" takes the method's rank.
            if (self.rank == "auto") if name == "rank" else getattr(self, name) is None:
                object.__setattr__(self, name, value)
        _validate(self)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> LowRankConfig:
        """Parse a `torch.compile(..., options=...)` dict; see `parse_options`."""
        return parse_options(options)

    def resolved_rank(self, shape: tuple[int, ...]) -> int | None:
        """The integer rank for a matrix of `shape` (None when projection is off)."""
        if self.rank is None:
            return None
        assert not isinstance(self.rank, str)
        short = min(shape[0], math.prod(shape[1:]))
        if isinstance(self.rank, float):
            return max(1, int(round(self.rank * short)))
        return int(self.rank)

    @property
    def reads_full_gradient(self) -> bool:
        """The method's update reads G besides R (Fira, FRUGAL, APOLLO): projected gradients stay full."""
        from lowrank_compile.methods import make

        return make(self).full_gradient

    @property
    def keeps_full_gradient(self) -> bool:
        """The backward accumulates projected parameters' full G (`grad_accumulation="full"`, the method)."""
        return self.grad_accumulation == "full" or self.reads_full_gradient

    def inductor_patches(self) -> dict[str, Any]:
        """The `inductor` option as a dict for `torch._inductor.config.patch`."""
        return dict(self.inductor)

    def as_dict(self) -> dict[str, Any]:
        """The options as a plain dict (what `parse_options` accepts back)."""
        out = dataclasses.asdict(self)
        out["include"] = list(self.include)
        out["exclude"] = list(self.exclude)
        out["inductor"] = dict(self.inductor)
        return out


def _fail(name: str, value: Any, accepted: str | None = None) -> LowRankOptionError:
    accepted = accepted or OPTION_DOCS[name][0]
    return LowRankOptionError(f"lowrank option {name!r}: got {value!r}; accepted values: {accepted}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(cfg: LowRankConfig) -> None:
    rank = cfg.rank
    if rank is not None:
        if isinstance(rank, int) and not isinstance(rank, bool):
            if rank < 1:
                raise _fail("rank", rank)
        elif isinstance(rank, float):
            if not (math.isfinite(rank) and 0.0 < rank <= 1.0):
                raise _fail("rank", rank)
        else:
            raise _fail("rank", rank)
    if not _is_int(cfg.update_gap) or cfg.update_gap < 1:
        raise _fail("update_gap", cfg.update_gap)
    for name, low in (("norm_growth_limit", 1.0), ("frugal_free_scale", 0.0)):
        v = getattr(cfg, name)
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low
        ):
            raise _fail(name, v)
    if cfg.frugal_free_rule is not None and cfg.frugal_free_rule not in FRUGAL_FREE_RULES:
        raise _fail("frugal_free_rule", cfg.frugal_free_rule)
    if (
        isinstance(cfg.scale, bool)
        or not isinstance(cfg.scale, (int, float))
        or not math.isfinite(cfg.scale)
        or cfg.scale <= 0
    ):
        raise _fail("scale", cfg.scale)
    if cfg.proj_type not in PROJ_TYPES:
        raise _fail("proj_type", cfg.proj_type)
    if cfg.projector not in PROJECTORS:
        raise _fail("projector", cfg.projector)
    from lowrank_compile import projectors  # torch: imported once an option is validated

    kind = projectors.get(cfg.projector)
    if cfg.adaptive_gap and kind.storage == "seeded":
        raise LowRankOptionError(
            f"lowrank option 'adaptive_gap': got True with projector={cfg.projector!r}; adaptive_gap follows "
            "how far the gradient's subspace moves, which a seeded random projector ignores; accepted "
            "values with this projector: False"
        )
    if not _is_int(cfg.projector_bits) or cfg.projector_bits not in PROJECTOR_BITS:
        raise _fail("projector_bits", cfg.projector_bits)
    if cfg.projector_bits != 32 and kind.storage != "matrix":
        raise LowRankOptionError(
            f"lowrank option 'projector_bits': got {cfg.projector_bits} with projector={cfg.projector!r}, "
            "which stores no matrix to quantize (dct keeps column indices; sparse and gaussian store "
            "nothing); accepted values with this projector: 32; projectors that store a matrix: "
            + ", ".join(n for n in PROJECTORS if projectors.get(n).storage == "matrix")
        )
    if cfg.svd_signs not in SVD_SIGNS:
        raise _fail("svd_signs", cfg.svd_signs)
    for name in ("adaptive_gap", "rotate_states", "check_ranks", "stochastic_rounding", "update_in_backward"):
        if not isinstance(getattr(cfg, name), bool):
            raise _fail(name, getattr(cfg, name))
    if cfg.grad_accumulation not in GRAD_ACCUMULATION:
        raise _fail("grad_accumulation", cfg.grad_accumulation)
    if not _is_int(cfg.clip_sketch) or cfg.clip_sketch < 0:
        raise _fail("clip_sketch", cfg.clip_sketch)
    if cfg.clip_stats not in CLIP_STATS:
        raise _fail("clip_stats", cfg.clip_stats)
    if cfg.state_bits not in STATE_BITS or not _is_int(cfg.state_bits):
        raise _fail("state_bits", cfg.state_bits)
    if cfg.update_kernel not in UPDATE_KERNELS:
        raise _fail("update_kernel", cfg.update_kernel)
    if not _is_int(cfg.min_dim) or cfg.min_dim < 1:
        raise _fail("min_dim", cfg.min_dim)
    for name in ("include", "exclude"):
        globs = getattr(cfg, name)
        if not isinstance(globs, tuple) or not all(isinstance(g, str) and g for g in globs):
            raise _fail(name, globs)


def _globs(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        items = tuple(value)
        if all(isinstance(g, str) and g for g in items):
            return items
    raise _fail(name, value)


def parse_options(options: Mapping[str, Any] | None) -> LowRankConfig:
    """Turn the `options` dict given to `torch.compile` into a `LowRankConfig`.

    Args:
        options: option name -> value; None or {} gives the defaults.

    Raises:
        LowRankOptionError: for an unknown name (with the accepted names and a close match) or
            a value outside the accepted set.
    """
    if options is None:
        return LowRankConfig()
    if isinstance(options, LowRankConfig):
        return options
    if not isinstance(options, Mapping):
        raise LowRankOptionError(f"lowrank options must be a dict, got {type(options).__name__}")
    fields = {f.name for f in dataclasses.fields(LowRankConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LowRankOptionError(
                f"unknown lowrank option {key!r}{hint}; accepted options: {', '.join(OPTION_DOCS)}"
            )
        if key in ("include", "exclude"):
            value = _globs(key, value)
        elif key == "inductor":
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise _fail("inductor", value)
            value = tuple(sorted(value.items()))
        kwargs[key] = value
    return LowRankConfig(**kwargs)
