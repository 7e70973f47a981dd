"""Validated description of one attention call, shared by every backend.

Letters used throughout `qkv.attention`: b batch, h query head, i query row, j key position,
d head dim (q/k), e value dim. `g` is the GQA group size Hq // Hk.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Spec:
    """Everything a backend needs besides q, k, v. Built by `make_spec`, never by hand."""

    B: int
    Hq: int
    Hk: int
    Sq: int
    Sk: int
    D: int
    Dv: int
    scale: float
    left: int | None  # band: keep i+δ−left ≤ j ≤ i+δ+right (None = unbounded)
    right: int | None
    mask: Tensor | None  # bool keep (True = keep) or float additive bias, 4-D broadcastable
    mask_mod: MaskMod | None
    score_mod: ScoreMod | None
    softcap: float | None
    dropout_p: float
    generator: torch.Generator | None
    sinks: Tensor | None = None  # (Hq,) learned sink logits: an extra softmax term per head

    @property
    def G(self) -> int:  # query heads per kv head
        return self.Hq // self.Hk

    @property
    def delta(self) -> int:  # query row i sits at absolute position i + δ
        return self.Sk - self.Sq

    @property
    def banded(self) -> bool:
        return self.left is not None or self.right is not None

    @property
    def bias(self) -> Tensor | None:
        return self.mask if self.mask is not None and self.mask.dtype != torch.bool else None

    @property
    def keep(self) -> Tensor | None:
        return self.mask if self.mask is not None and self.mask.dtype == torch.bool else None

    @property
    def has_mods(self) -> bool:
        return self.softcap is not None or self.score_mod is not None

    @property
    def masked(self) -> bool:
        return self.banded or self.mask is not None or self.mask_mod is not None


def _shape(t: Tensor | tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in (t.shape if isinstance(t, Tensor) else t)) + ")"


def _four_dims_hint(name: str, t: Tensor) -> str:
    """How to make `t` 4-D: leading axes added, or its extra leading dims folded into B."""
    extra = t.dim() - 4
    if extra < 0:
        if extra == -1:
            return f"add the missing batch/head axis with {name}.unsqueeze(0)"
        return f"add the {-extra} missing leading axes with {name}[{', '.join(['None'] * -extra)}]"
    folded = (math.prod(t.shape[: extra + 1]), *t.shape[extra + 1 :])
    return (
        f"fold its {extra} extra leading dim{'s' * (extra > 1)} into the batch with "
        f"{name}.flatten(0, {extra}) (shape {_shape(folded)}), or reshape it to (B, H, S, D)"
    )


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise TypeError/ValueError naming expected vs actual for malformed q, k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (B, H, S, D) but has {t.dim()}: shape {_shape(t)}; "
                + _four_dims_hint(name, t)
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}"
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)} (dim 0 must match)"
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(
            f"k and v must have the same number of heads, got Hk={k.shape[1]} and Hv={v.shape[1]}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads must be a multiple of key/value heads (GQA), got Hq={q.shape[1]} and Hk={k.shape[1]}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"k and v must have the same length, got Sk={k.shape[2]} and Sv={v.shape[2]}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q and k must have the same head dim, got D={q.shape[3]} and Dk={k.shape[3]}"
        )


def _window(window: object) -> tuple[int | None, int | None]:
    if window is None:
        return None, None
    if isinstance(window, int) or not isinstance(window, tuple | list) or len(window) != 2:
        raise TypeError(
            f"window must be a (left, right) pair of ints or None, got {window!r}; e.g. (255, 0)"
        )
    out = []
    for side in window:
        if side is not None and (not isinstance(side, int) or isinstance(side, bool) or side < 0):
            raise ValueError(f"window sides must be ints ≥ 0 or None, got {window!r}")
        out.append(side)
    return out[0], out[1]


def _mask(mask: Tensor | None, q: Tensor, B: int, Hq: int, Sq: int, Sk: int) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool or float tensor, got {type(mask).__name__}")
    if mask.device != q.device:
        raise ValueError(
            f"mask is on {mask.device} but q is on {q.device}; move it with mask.to(q.device)"
        )
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"mask must be bool (True = keep) or a float additive bias, got {mask.dtype}"
        )
    if mask.dim() > 4:
        raise ValueError(f"mask must have at most 4 dims (B, Hq, Sq, Sk), got shape {_shape(mask)}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    target = (B, Hq, Sq, Sk)
    for have, want in zip(m.shape, target, strict=True):
        if have not in (1, want):
            raise ValueError(
                f"mask of shape {_shape(mask)} cannot broadcast to (B, Hq, Sq, Sk) = {target}"
            )
    return (
        m
        if m.dtype == torch.bool
        else m.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    )


def _sinks(sinks: Tensor | None, q: Tensor) -> Tensor | None:
    """Validate `sinks`: one logit per query head, (Hq,), floating, on q's device."""
    if sinks is None:
        return None
    Hq = q.shape[1]
    if not isinstance(sinks, Tensor):
        raise TypeError(
            f"sinks must be a float tensor of shape (Hq,) = ({Hq},), got {type(sinks).__name__}"
        )
    if not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating tensor, got {sinks.dtype}")
    if tuple(sinks.shape) != (Hq,):
        raise ValueError(
            f"sinks must have shape (Hq,) = ({Hq},), one logit per query head, got {_shape(sinks)}"
        )
    if sinks.device != q.device:
        raise ValueError(
            f"sinks is on {sinks.device} but q is on {q.device}; move it with sinks.to(q.device)"
        )
    return sinks


# how each mod is called: its arguments in order (scoring.py calls mask_mod(b, h, q_idx, kv_idx)
# and score_mod(score, b, h, q_idx, kv_idx), all positional)
MOD_ARGS = {
    "mask_mod": ("b", "h", "q_idx", "kv_idx"),
    "score_mod": ("score", "b", "h", "q_idx", "kv_idx"),
}
_OTHER = {"mask_mod": "score_mod", "score_mod": "mask_mod"}
# per mod kind, fn → why it cannot take those arguments ("" if it can)
_mod_misfit = {name: weakref.WeakKeyDictionary() for name in MOD_ARGS}


def _misfit(name: str, fn: Callable) -> str:
    """Why `fn` cannot take the positional arguments `name` is called with ("" if it can)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no inspectable signature (some builtins): let it through
        return ""
    try:
        sig.bind(*MOD_ARGS[name])
        return ""
    except TypeError:
        pass
    why = f"{getattr(fn, '__name__', type(fn).__name__)}{sig}"
    other = _OTHER[name]
    try:
        sig.bind(*MOD_ARGS[other])
    except TypeError:
        return why
    hint = {
        "score_mod": "a mod that says keep/drop is a mask_mod",
        "mask_mod": "a mod that rewrites the score is a score_mod",
    }[name]
    return f"{why}, which takes {other}'s arguments: {hint}"


def _mod_takes_args(name: str, fn: Callable) -> None:
    """Raise TypeError when `fn`'s signature cannot take the mod's positional arguments (Python's
    own "takes 2 positional arguments but 4 were given", raised inside the scoring, names
    neither the mod nor its contract). Cached per function: a model passes the same mod on
    every layer and step."""
    try:
        why = _mod_misfit[name][fn]
    except (KeyError, TypeError):  # not seen yet, or not weak-referenceable (then not cached)
        why = _misfit(name, fn)
        try:
            _mod_misfit[name][fn] = why
        except TypeError:
            pass
    if why:
        args = ", ".join(MOD_ARGS[name])
        raise TypeError(
            f"{name} must take ({args}), {len(MOD_ARGS[name])} positional arguments, "
            f"but it is {why}"
        )


def _mod_batch(name: str, fn: Callable, B: int) -> None:
    """Ready mods holding a per-batch tensor (`mods._qkv_batch`) against the call's B."""
    for mod, arg, n, broadcasts in getattr(fn, "_qkv_batch", ()):
        if n != B and not (broadcasts and n == 1):
            one = ", or 1 to share one row with every batch row" if broadcasts and B > 1 else ""
            raise ValueError(
                f"{name}={mod}({arg}) has {arg} for a batch of {n} but the call has B={B}; "
                f"its first dim must be {B}{one}"
            )


def make_spec(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    mask: Tensor | None = None,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
    sinks: Tensor | None = None,
) -> Spec:
    """Validate everything and fold `causal` into the (left, right) band."""
    check_qkv(q, k, v)
    B, Hq, Sq, D = q.shape
    Hk, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    left, right = _window(window)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if causal:
        right = 0 if right is None else min(right, 0)
    # a side that keeps every key is no constraint: drop it, so e.g. a causal decode step
    # (Sq = 1) is plain attention and takes the fused path without a mask
    if right is not None and right >= Sq - 1:
        right = None
    if left is not None and left >= Sk - 1:
        left = None
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    if isinstance(scale, bool):  # an int to Python, but never a scale anyone means
        raise TypeError(f"scale must be a finite Python float (or None for 1/√D), got {scale!r}")
    if not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(
            f"scale must be a finite Python float (or None for 1/√D), got {scale!r}"
            + (
                " (pass float(scale))"
                if isinstance(scale, Tensor) or hasattr(scale, "item")
                else ""
            )
        )
    if softcap is not None:
        # c·tanh(s/c) is inf·0 = NaN for every score once c overflows the compute dtype
        top = torch.finfo(torch.float64 if q.dtype == torch.float64 else torch.float32).max
        if not isinstance(softcap, int | float) or not 0 < softcap <= top:
            raise ValueError(
                f"softcap must be a finite number > 0 (at most {top:.3g} for {q.dtype}) or None "
                f"for no cap, got {softcap!r}"
            )
    if not isinstance(dropout_p, int | float) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    for name, fn in (("mask_mod", mask_mod), ("score_mod", score_mod)):
        if fn is None:
            continue
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if not torch.compiler.is_compiling():  # traced: the graph would break on inspect
            _mod_takes_args(name, fn)
        _mod_batch(name, fn, B)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return Spec(
        B=B,
        Hq=Hq,
        Hk=Hk,
        Sq=Sq,
        Sk=Sk,
        D=D,
        Dv=Dv,
        scale=float(scale),
        left=left,
        right=right,
        mask=_mask(mask, q, B, Hq, Sq, Sk),
        mask_mod=mask_mod,
        score_mod=score_mod,
        softcap=None if softcap is None else float(softcap),
        dropout_p=float(dropout_p),
        generator=generator,
        sinks=_sinks(sinks, q),
    )
