"""Ready-made `mask_mod`s and `score_mod`s, and ways to combine them.

A mask_mod is `fn(b, h, q_idx, kv_idx) -> bool tensor` (True = keep); a score_mod is
`fn(score, b, h, q_idx, kv_idx) -> score`. Arguments are integer tensors broadcastable to
(b h i j); `q_idx` is the query's absolute position i + δ (δ = Sk − Sq), the coordinate shared
with keys, so the same mod is right for a prefill (Sq = Sk) and a cached decode step (Sq = 1).

    >>> import torch, qkv
    >>> q = k = v = torch.randn(1, 2, 6, 8)
    >>> doc = torch.tensor([0, 0, 0, 1, 1, 1])
    >>> keep = qkv.and_masks(qkv.causal_mask, qkv.document_mask(doc))
    >>> out = qkv.attention(q, k, v, mask_mod=keep)   # block-diagonal causal
"""

from __future__ import annotations

import hashlib
import math
import numbers

import torch
from torch import Tensor

from .spec import MaskMod, ScoreMod, Spec

# Ready mods carry `_qkv_key`, a hashable description of what they compute, or a function
# returning one where they capture a tensor (read at each call: `live_key`): the block
# structure of a mask is cached by it (`blockmask.py`). Score mods carry `_qkv_fused`, the
# parameters the fused CPU and Triton kernels evaluate inside their loops (`fused_score_mod`:
# `fused_cpu.py`, `triton_kernel.py`). A mod without
# them is still exact everywhere, just not cached or fused.
# Mods holding a per-batch tensor carry `_qkv_batch`, ((mod, argument, its batch size,
# whether a batch of 1 broadcasts), ...): `make_spec` checks it against the call's B, since
# indexing with b alone reads row 0 of a longer tensor silently when B = 1.


def fused_score_mod(spec: Spec, device: torch.device) -> tuple[float, Tensor | None] | None:
    """What a fused kernel evaluates for `spec.score_mod`: (the cap of `softcap(cap)` or 0,
    the slopes (1|B, Hq) fp32 on `device` of `alibi(slopes)` or None), (0, None) for no score
    mod, None for any other (or slopes whose shape does not fit the call: the tiled backend
    raises the mod's own error naming the shapes)."""
    fn = spec.score_mod
    if fn is None:
        return 0.0, None
    tag = getattr(fn, "_qkv_fused", None)
    if tag is None:
        return None
    if tag[0] == "softcap":
        return float(tag[1]), None
    s = tag[1]
    if tuple(s.shape) not in ((spec.Hq,), (spec.B, spec.Hq)):
        return None
    placed = fn._qkv_placed  # one host → device copy per device, not one per call
    key = (device, torch.float32)
    if key not in placed:
        placed[key] = s.detach().to(device=device, dtype=torch.float32)
    return 0.0, placed[key].detach().reshape(-1, spec.Hq).contiguous()


def live_key(mod) -> tuple | None:
    """A mask_mod's cache key as of now: its `_qkv_key`, called if it is a function (a
    captured tensor's contents can change between calls); None if it has none."""
    key = getattr(mod, "_qkv_key", None)
    return key() if callable(key) else key


def _batched(mods: tuple) -> tuple:
    return tuple(x for m in mods for x in getattr(m, "_qkv_batch", ()))


def _tensor_key(t: Tensor) -> tuple:
    """What a captured tensor holds now: on the CPU a digest of its contents, so a change in
    place is seen, through a NumPy view too (which never bumps `_version`); elsewhere its
    identity and `_version` (reading device memory would sync)."""
    if t.device.type != "cpu":
        return (id(t), t._version, tuple(t.shape), t.dtype)
    data = t.detach().contiguous().numpy().tobytes()
    return (tuple(t.shape), t.dtype, hashlib.blake2b(data, digest_size=16).digest())


def _keyed(mods: tuple, name: str):
    """The key of a combination of mods, read at each call (see `live_key`)."""

    def key() -> tuple | None:
        keys = tuple(live_key(m) for m in mods)
        return None if any(k is None for k in keys) else (name, *keys)

    return key if all(getattr(m, "_qkv_key", None) is not None for m in mods) else None


def and_masks(*mods: MaskMod) -> MaskMod:
    """Keep (b, h, q, kv) only where every mod keeps it. No mods keeps everything."""

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        out = torch.ones((), dtype=torch.bool, device=q_idx.device)
        for m in mods:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    mod._qkv_key = _keyed(mods, "and")
    mod._qkv_batch = _batched(mods)
    return mod


def or_masks(*mods: MaskMod) -> MaskMod:
    """Keep (b, h, q, kv) where any mod keeps it. No mods keeps nothing."""

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        out = torch.zeros((), dtype=torch.bool, device=q_idx.device)
        for m in mods:
            out = out | m(b, h, q_idx, kv_idx)
        return out

    mod._qkv_key = _keyed(mods, "or")
    mod._qkv_batch = _batched(mods)
    return mod


def causal_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """kv_idx ≤ q_idx: the same as `causal=True` (bottom-right aligned)."""
    return kv_idx <= q_idx


causal_mask._qkv_key = ("causal",)


def sliding_window_mask(left: int, right: int = 0) -> MaskMod:
    """q_idx − left ≤ kv_idx ≤ q_idx + right: the same as `window=(left, right)`.
    `(W − 1, 0)` keeps exactly the W most recent keys, the query's own included."""
    if left < 0 or right < 0:
        raise ValueError(f"window sides must be ≥ 0, got left={left}, right={right}")

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)

    mod._qkv_key = ("window", left, right)
    return mod


def key_padding_mask(keep_or_lengths: Tensor) -> MaskMod:
    """Padding keys masked out. Takes `lengths (B,)` (keys `< lengths[b]` are real) or a bool
    `keep (B, Sk)` (True = real token), the `attention_mask` of Hugging Face tokenizers.
    B must be the call's batch size."""
    t = keep_or_lengths
    if not isinstance(t, Tensor):
        raise TypeError(
            "key_padding_mask takes lengths (B,) as an integer tensor or a bool keep-mask "
            f"(B, Sk), got {type(t).__name__}"
        )
    if t.dtype == torch.bool:
        if t.dim() != 2:
            raise ValueError(f"a key padding keep-mask must be (B, Sk), got shape {tuple(t.shape)}")

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return t[b, kv_idx]

    else:
        if t.dim() != 1 or t.is_floating_point():
            raise ValueError(
                f"key lengths must be an integer tensor (B,), got {t.dtype} {tuple(t.shape)}"
            )

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return kv_idx < t[b]

    mod._qkv_key = lambda: ("key_padding", _tensor_key(t))
    arg = "keep" if t.dtype == torch.bool else "lengths"
    mod._qkv_batch = (("key_padding_mask", arg, t.shape[0], False),)
    return mod


def document_mask(doc_ids: Tensor) -> MaskMod:
    """Block-diagonal: a query sees only keys of its own document. `doc_ids (S,)` or `(B, S)`,
    indexed by absolute position (packed sequences, Sk = S). `(S,)` and `(1, S)` serve every
    batch row; otherwise B must be the call's batch size."""
    if not isinstance(doc_ids, Tensor):
        raise TypeError(f"doc_ids must be a tensor (S,) or (B, S), got {type(doc_ids).__name__}")
    ids = doc_ids if doc_ids.dim() == 2 else doc_ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"doc_ids must be (S,) or (B, S), got shape {tuple(doc_ids.shape)}")

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        bb = b if ids.shape[0] > 1 else torch.zeros_like(b)
        return ids[bb, q_idx] == ids[bb, kv_idx]

    mod._qkv_key = lambda: ("document", _tensor_key(doc_ids))
    mod._qkv_batch = (("document_mask", "doc_ids", ids.shape[0], True),)
    return mod


def prefix_lm_mask(prefix_len: int | Tensor) -> MaskMod:
    """Bidirectional over the first `prefix_len` keys, causal after (T5/PaLI prefix-LM).
    `prefix_len` is an int or a per-batch integer tensor (B,), B the call's batch size."""
    p = prefix_len
    if isinstance(p, Tensor):
        if p.dim() != 1 or p.is_floating_point() or p.dtype == torch.bool:
            raise TypeError(
                f"prefix_len must be an int or an integer tensor (B,), got a {p.dtype} tensor of "
                f"shape {tuple(p.shape)}" + (" (pass int(prefix_len))" if p.dim() == 0 else "")
            )
    elif isinstance(p, numbers.Integral) and not isinstance(p, bool):
        p = int(p)  # numpy ints too
    else:
        raise TypeError(
            f"prefix_len must be an int or an integer tensor (B,), got {type(p).__name__} {p!r}"
        )

    def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        n = p[b] if isinstance(p, Tensor) else p
        return (kv_idx < n) | (kv_idx <= q_idx)

    if isinstance(p, Tensor):
        mod._qkv_key = lambda: ("prefix_lm", _tensor_key(p))
        mod._qkv_batch = (("prefix_lm_mask", "prefix_len", p.shape[0], False),)
    else:
        mod._qkv_key = ("prefix_lm", p)
    return mod


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al. 2022): 2^(−8(h+1)/n) for n a power of two, else the
    paper's interleaving of the two nearest powers."""
    if n_heads < 1:
        raise ValueError(f"n_heads must be ≥ 1, got {n_heads}")

    def pow2(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(pow2(n_heads))
    near = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(pow2(near) + pow2(2 * near)[0::2][: n_heads - near])


def alibi(slopes: Tensor | int) -> ScoreMod:
    """score − slope·|q_idx − kv_idx| (for causal attention: + slope·(kv_idx − q_idx)).

    `slopes` is an int n (`alibi_slopes(n)`), a tensor (Hq,) shared by the batch, or (B, Hq)
    per batch row (as flash-attn's `alibi_slopes` accepts). With causal attention flash-attn adds
    slope·(kv_idx − (Sk − 1)) instead: per row that differs by a constant, so the weights and
    output are the same (the LSE is not)."""
    s = alibi_slopes(slopes) if isinstance(slopes, int) else slopes
    if not isinstance(s, Tensor) or s.dim() not in (1, 2) or not s.is_floating_point():
        got = f"{s.dtype} {tuple(s.shape)}" if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(
            f"alibi slopes must be an int or a float tensor (Hq,) or (B, Hq), got {got}"
        )
    # the slopes on each (device, dtype) they meet: one host→device copy, not one per tile
    placed: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        key = (score.device, score.dtype)
        if key not in placed:
            want = (b.shape[0], h.shape[1])[2 - s.dim() :]
            if tuple(s.shape) != want:
                names = ("B", "Hq")[2 - s.dim() :]
                raise ValueError(
                    f"alibi has slopes of shape {tuple(s.shape)} but the call has "
                    + ", ".join(f"{n}={w}" for n, w in zip(names, want, strict=True))
                    + f"; pass slopes of shape {want}"
                )
            placed[key] = s.to(device=score.device, dtype=score.dtype)
        slope = placed[key][h] if s.dim() == 1 else placed[key][b, h]  # (1|B, Hq, 1, 1)
        return score - slope * (q_idx - kv_idx).abs().to(score.dtype)

    mod._qkv_fused = ("alibi", s)
    mod._qkv_placed = placed
    return mod


def softcap(cap: float) -> ScoreMod:
    """cap·tanh(score/cap) (Gemma 2, Grok). The `softcap=` argument does the same, first."""
    if not isinstance(cap, int | float) or not 0 < cap < math.inf:
        raise ValueError(f"softcap must be a finite number > 0, got {cap!r}")

    def mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return cap * torch.tanh(score / cap)

    mod._qkv_fused = ("softcap", float(cap))
    return mod
