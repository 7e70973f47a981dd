"""Rotary position embeddings (RoFormer): rotate each pair of q/k features by an angle that
grows with the token's position, so q·k depends only on the relative offset.

Letters: b batch, h head, i position, d head dim.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

ROPE_TYPES = ("linear", "llama3", "yarn", "longrope", "dynamic", "freq_factors")


def _positive(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"RopeScaling: {name} must be a finite number > 0, got {v!r}")
    return float(v)


def _positive_int(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"RopeScaling: {name} must be a positive int, got {v!r}")
    return v


def yarn_attention_factor(
    factor: float, mscale: float | None = None, mscale_all_dim: float | None = None
) -> float:
    """YaRN's default cos/sin multiplier: m(factor) = 0.1·ln(factor) + 1 (1 for factor ≤ 1), or
    m(factor, mscale) / m(factor, mscale_all_dim) with m(s, a) = 0.1·a·ln(s) + 1 when both are
    given and non-zero (DeepSeek's form), as transformers' `_compute_yarn_parameters` states."""

    def m(s: float, a: float = 1.0) -> float:
        return 1.0 if s <= 1 else 0.1 * a * math.log(s) + 1.0

    if mscale and mscale_all_dim:
        return m(factor, mscale) / m(factor, mscale_all_dim)
    return m(factor)


def longrope_attention_factor(factor: float, original_max_positions: int) -> float:
    """LongRoPE's default cos/sin multiplier: √(1 + ln(factor) / ln(original_max_positions)),
    1 for factor ≤ 1 (transformers' `_compute_longrope_parameters`)."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_max_positions))


def _is_n(variant: Any) -> bool:
    """Whether a tables key's variant is dynamic NTK's n (an int, not LongRoPE's bool)."""
    return isinstance(variant, int) and not isinstance(variant, bool)


@dataclass(frozen=True)
class RopeScaling:
    """Slower RoPE frequencies for a longer context: pair p turns by `positions · θ_p / s_p`
    instead of `positions · θ_p` (θ_p = base^(−2p/r)), with the divisor s_p by `rope_type`:

        "linear"        s_p = factor (the same as dividing every position by factor; transformers'
                        rope_type "linear", llama.cpp's rope.scaling.type linear)
        "llama3"        Meta's Llama 3.1 rule (transformers' `_compute_llama3_parameters`), with
                        λ_p = 2π/θ_p the wavelength, L = original_max_positions:
                            λ_p < L / high_freq_factor  →  s_p = 1        (short waves kept)
                            λ_p > L / low_freq_factor   →  s_p = factor   (long waves slowed)
                            otherwise                   →  θ_p / s_p = (1 − t)·θ_p/factor + t·θ_p,
                                                           t = (L/λ_p − low_freq_factor)
                                                               / (high_freq_factor − low_freq_factor)
        "yarn"          YaRN (Peng et al. 2023; transformers' `_compute_yarn_parameters`): with
                        c(n) = r·ln(L / (2π·n)) / (2·ln base) the pair index that turns n times
                        over L = original_max_positions,
                            lo = max(⌊c(beta_fast)⌋, 0),  hi = min(⌈c(beta_slow)⌉, r − 1)
                            (no ⌊⌋ ⌈⌉ when truncate=False; hi += 0.001 when lo == hi),
                            ramp_p = clamp((p − lo) / (hi − lo), 0, 1),
                            θ_p / s_p = ramp_p · θ_p/factor + (1 − ramp_p) · θ_p
                        (fast pairs kept, slow ones divided by factor), and cos, sin of the
                        rotated pairs multiplied by `attention_factor` (so every q·k by its
                        square); None → `yarn_attention_factor(factor, mscale, mscale_all_dim)`
        "longrope"      LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini; transformers'
                        `_compute_longrope_parameters`): s_p = long_factors[p] for a call whose
                        last position is ≥ L = original_max_positions, short_factors[p] otherwise
                        (the whole call either way: transformers' seq_len = max(position_ids) + 1
                        > L; keys cached by earlier calls keep their rotation), and cos, sin of the
                        rotated pairs × attention_factor, None → √(1 + ln(factor) / ln L) (1 for
                        factor ≤ 1), factor = the model's context / L
        "dynamic"       dynamic NTK (transformers' `_compute_dynamic_ntk_parameters`): for a
                        call whose last position is n − 1 ≥ L = original_max_positions, every
                        θ_p from the base θ·(factor·n/L − (factor − 1))^(r/(r−2)) instead of
                        θ; below L the plain θ_p. The whole call either way, from its own n
                        (transformers keeps the largest n seen since its last call shorter than
                        L: the same for one forward and for generation, which only grows n;
                        keys cached by earlier calls keep their rotation)
        "freq_factors"  s_p = factors[p], one per pair (llama.cpp's rope_freqs.weight tensor)

    cos and sin are not rescaled but by YaRN and LongRoPE (transformers' attention_factor is 1 for linear,
    llama3 and dynamic). Build one with `RopeScaling.linear(8.0)`, `RopeScaling.llama3(...)`,
    `RopeScaling.yarn(...)`, `RopeScaling.longrope(...)`, `RopeScaling.dynamic(...)` or
    `RopeScaling.freq_factors(...)`;
    values are validated here, the number of factors by the `RotaryEmbedding` that takes it."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_positions: int | None = None
    factors: tuple[float, ...] | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    truncate: bool | None = None
    short_factors: tuple[float, ...] | None = None
    long_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"RopeScaling: rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}"
            )
        set_ = object.__setattr__
        set_(self, "factor", _positive("factor", self.factor))
        self._check_owned()
        if self.rope_type in ("llama3", "yarn", "longrope", "dynamic"):
            n = _positive_int("original_max_positions", self.original_max_positions)
            set_(self, "original_max_positions", n)
        if self.rope_type == "llama3":
            lo = _positive("low_freq_factor", self.low_freq_factor)
            hi = _positive("high_freq_factor", self.high_freq_factor)
            if not lo < hi:
                raise ValueError(
                    f"RopeScaling: low_freq_factor={lo} must be < high_freq_factor={hi}"
                )
            set_(self, "low_freq_factor", lo)
            set_(self, "high_freq_factor", hi)
        if self.rope_type == "yarn":
            fast = _positive("beta_fast", 32.0 if self.beta_fast is None else self.beta_fast)
            slow = _positive("beta_slow", 1.0 if self.beta_slow is None else self.beta_slow)
            if self.truncate is not None and not isinstance(self.truncate, bool):
                raise ValueError(f"RopeScaling: truncate must be a bool, got {self.truncate!r}")
            a = self.attention_factor
            a = yarn_attention_factor(self.factor) if a is None else a
            set_(self, "beta_fast", fast)
            set_(self, "beta_slow", slow)
            set_(self, "attention_factor", _positive("attention_factor", a))
            set_(self, "truncate", True if self.truncate is None else self.truncate)
        if self.rope_type == "longrope":
            pairs = []
            for name in ("short_factors", "long_factors"):
                fs = getattr(self, name)
                if fs is None or not len(fs):
                    raise ValueError(f"RopeScaling: rope_type 'longrope' takes {name}, got {fs!r}")
                pairs.append(tuple(_positive(f"{name}[{i}]", f) for i, f in enumerate(fs)))
            if len(pairs[0]) != len(pairs[1]):
                raise ValueError(
                    f"RopeScaling: short_factors has {len(pairs[0])} entries, long_factors "
                    f"{len(pairs[1])}; both hold one per rotated pair"
                )
            set_(self, "short_factors", pairs[0])
            set_(self, "long_factors", pairs[1])
            a = self.attention_factor
            a = (
                longrope_attention_factor(self.factor, self.original_max_positions)
                if a is None
                else a
            )
            set_(self, "attention_factor", _positive("attention_factor", a))
        if self.rope_type == "freq_factors":
            fs = self.factors
            if fs is None or not len(fs) or self.factor != 1.0:
                raise ValueError(
                    "RopeScaling: rope_type 'freq_factors' takes factors (one per pair) and no "
                    f"factor, got factors={fs!r}, factor={self.factor}"
                )
            set_(self, "factors", tuple(_positive(f"factors[{i}]", f) for i, f in enumerate(fs)))

    def _check_owned(self) -> None:
        """Each optional field belongs to the rope_types named here; setting it on another is
        an error (a misspelt constructor call, not a silent no-op)."""
        owners = {
            "low_freq_factor": ("llama3",), "high_freq_factor": ("llama3",),
            "original_max_positions": ("llama3", "yarn", "longrope", "dynamic"),
            "factors": ("freq_factors",), "beta_fast": ("yarn",), "beta_slow": ("yarn",),
            "attention_factor": ("yarn", "longrope"), "truncate": ("yarn",),
            "short_factors": ("longrope",), "long_factors": ("longrope",),
        }  # fmt: skip
        for name, kinds in owners.items():
            if getattr(self, name) is not None and self.rope_type not in kinds:
                raise ValueError(
                    f"RopeScaling: {name} belongs to rope_type "
                    f"{' or '.join(map(repr, kinds))}, not {self.rope_type!r}"
                )

    @classmethod
    def linear(cls, factor: float) -> RopeScaling:
        return cls("linear", factor)

    @classmethod
    def llama3(
        cls,
        factor: float,
        low_freq_factor: float,
        high_freq_factor: float,
        original_max_positions: int,
    ) -> RopeScaling:
        return cls("llama3", factor, low_freq_factor, high_freq_factor, original_max_positions)

    @classmethod
    def yarn(
        cls,
        factor: float,
        original_max_positions: int,
        *,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        attention_factor: float | None = None,
        mscale: float | None = None,
        mscale_all_dim: float | None = None,
        truncate: bool = True,
    ) -> RopeScaling:
        """YaRN; attention_factor None → `yarn_attention_factor(factor, mscale, mscale_all_dim)`."""
        if attention_factor is None:
            attention_factor = yarn_attention_factor(
                _positive("factor", factor), mscale, mscale_all_dim
            )
        return cls("yarn", factor, original_max_positions=original_max_positions,
                   beta_fast=beta_fast, beta_slow=beta_slow, attention_factor=attention_factor,
                   truncate=truncate)  # fmt: skip

    @classmethod
    def longrope(
        cls,
        short_factors,
        long_factors,
        original_max_positions: int,
        *,
        factor: float = 1.0,
        attention_factor: float | None = None,
    ) -> RopeScaling:
        """LongRoPE; `factor` (the model's context / original_max_positions) sets the default
        attention_factor, `longrope_attention_factor(factor, original_max_positions)`."""
        return cls("longrope", factor, original_max_positions=original_max_positions,
                   attention_factor=attention_factor,
                   short_factors=tuple(short_factors), long_factors=tuple(long_factors))  # fmt: skip

    @classmethod
    def dynamic(cls, factor: float, original_max_positions: int) -> RopeScaling:
        """Dynamic NTK; transformers' L is the config's `max_position_embeddings`."""
        return cls("dynamic", factor, original_max_positions=original_max_positions)

    @classmethod
    def freq_factors(cls, factors) -> RopeScaling:
        return cls("freq_factors", factors=tuple(factors))

    @property
    def cos_sin_scale(self) -> float:
        """What cos and sin of the rotated pairs are multiplied by: YaRN's and LongRoPE's
        attention_factor, 1 for the other types."""
        return self.attention_factor if self.rope_type in ("yarn", "longrope") else 1.0

    def context(self, max_positions: int) -> int:
        """The longest sequence a model whose config says `max_positions` is scaled for: YaRN
        → max(max_positions, original_max_positions · factor), since Qwen2.5's and Qwen3's
        configs (and llama.cpp's context_length) keep the original length; every other type:
        max_positions (their configs state the extended length: Llama 3.1's 131072, Gemma 3's,
        Phi-3's)."""
        if self.rope_type in ("yarn", "dynamic"):
            return max(max_positions, int(self.original_max_positions * self.factor))
        return max_positions

    def is_long(self, n: int) -> bool:
        """Whether a call whose positions end before n (its last is n − 1) takes LongRoPE's
        long factors: n > original_max_positions; False for every other type."""
        return self.rope_type == "longrope" and n > self.original_max_positions

    def variant(self, n: int) -> bool | int | None:
        """What a call whose positions end before n picks: LongRoPE's long factors
        (`is_long`), dynamic NTK's n once past original_max_positions (None below it), None for
        every other type. Calls of one variant share their tables."""
        if self.rope_type == "longrope":
            return self.is_long(n)
        if self.rope_type == "dynamic" and n > self.original_max_positions:
            return n
        return None

    def dynamic_base(self, base: float, n: int, rotary_dim: int) -> float:
        """Dynamic NTK's base θ·(factor·n/L − (factor − 1))^(r/(r−2)) for a call ending before
        n > L = original_max_positions, r = rotary_dim (the base itself for n ≤ L)."""
        L, f, r = self.original_max_positions, self.factor, rotary_dim
        return base if n <= L else base * (f * n / L - (f - 1)) ** (r / (r - 2))

    def apply(self, inv_freq: Tensor, base: float, long: bool = False) -> Tensor:
        """θ_p → θ_p / s_p for inv_freq (r/2,) float64 = base^(−2p/r), as the class docstring
        says (`base` is read by YaRN's correction range only, `long` by LongRoPE only; dynamic
        NTK changes the base itself, `dynamic_base`, and leaves θ_p as given)."""
        if self.rope_type == "dynamic":
            return inv_freq
        if self.rope_type == "longrope":
            fs = self.long_factors if long else self.short_factors
            if len(fs) != inv_freq.shape[0]:
                raise ValueError(
                    f"RopeScaling: longrope has {len(fs)} factors for {inv_freq.shape[0]} "
                    "rotated pairs (rotary_dim / 2)"
                )
            return inv_freq / torch.tensor(fs, dtype=inv_freq.dtype)
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "freq_factors":
            if len(self.factors) != inv_freq.shape[0]:
                raise ValueError(
                    f"RopeScaling: freq_factors has {len(self.factors)} factors for "
                    f"{inv_freq.shape[0]} rotated pairs (rotary_dim / 2)"
                )
            return inv_freq / torch.tensor(self.factors, dtype=inv_freq.dtype)
        if self.rope_type == "yarn":
            return self._yarn(inv_freq, base)
        L, lo, hi = self.original_max_positions, self.low_freq_factor, self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        t = (L / wavelen - lo) / (hi - lo)
        mid = (1 - t) * inv_freq / self.factor + t * inv_freq
        out = torch.where(wavelen > L / lo, inv_freq / self.factor, inv_freq)
        return torch.where((wavelen >= L / hi) & (wavelen <= L / lo), mid, out)

    def _yarn(self, inv_freq: Tensor, base: float) -> Tensor:
        r, L = 2 * inv_freq.shape[0], self.original_max_positions

        def turns_at(n: float) -> float:  # the pair index that turns n times over L
            return r * math.log(L / (n * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = turns_at(self.beta_fast), turns_at(self.beta_slow)
        if self.truncate:
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, r - 1)
        if lo == hi:
            hi += 0.001
        p = torch.arange(inv_freq.shape[0], dtype=inv_freq.dtype)
        ramp = ((p - lo) / (hi - lo)).clamp(0, 1)
        return ramp * inv_freq / self.factor + (1 - ramp) * inv_freq


class RotaryEmbedding(nn.Module):
    """`rope(x, positions)`: x (b h i d), positions (i,) or (b, i) long → (b h i d).

    Pair p ∈ [0, d/2) rotates by angle `positions · θ_p` with `θ_p = base^(−2p/d)`:

        interleaved=False (half-split, HF Llama / GPT-NeoX): pair p is (x[p], x[p + d/2])
        interleaved=True  (GPT-J / Meta Llama):               pair p is (x[2p], x[2p + 1])

    `rotary_dim` r (even, ≤ d; default d) rotates only the first r features of each head, as
    above with r in place of d (θ_p = base^(−2p/r), p < r/2), and passes x[r:] through
    (partial rotary: GPT-NeoX's `rotary_pct`, Phi-3's `partial_rotary_factor`).
    Equivalent complex code (pair p as a + ib): `(a + ib) · exp(i · pos · θ_p)`.
    `scaling` (a `RopeScaling`; None: none) replaces θ_p by θ_p / s_p, its per-pair divisor
    (linear, Llama 3's rule, YaRN, or llama.cpp's rope_freqs factors, one per rotated pair),
    and YaRN multiplies the rotated pairs by its attention_factor (x[r:] passes unscaled):
    every table below, the fused CPU path's and the KV cache's positions read these.
    Angles are computed in float64 and cached per (device, dtype); the result has x's dtype.
    No parameters: the module has no state_dict entries.
    """

    def __init__(
        self,
        d_head: int,
        base: float = 10000.0,
        interleaved: bool = False,
        *,
        rotary_dim: int | None = None,
        scaling: RopeScaling | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(d_head, int) or isinstance(d_head, bool) or d_head <= 0 or d_head % 2:
            raise ValueError(
                f"d_head must be a positive even int (features rotate in pairs), got {d_head!r}"
            )
        if not isinstance(base, int | float) or not base > 1:
            raise ValueError(f"base must be a number > 1, got {base!r}")
        r = d_head if rotary_dim is None else rotary_dim
        if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= d_head or r % 2:
            raise ValueError(
                f"rotary_dim must be a positive even int ≤ d_head={d_head}, got {rotary_dim!r}"
            )
        if scaling is not None and not isinstance(scaling, RopeScaling):
            raise TypeError(
                f"scaling must be a qkv.nn.RopeScaling or None, got {type(scaling).__name__}"
            )
        for name in ("factors", "short_factors", "long_factors"):
            fs = None if scaling is None else getattr(scaling, name)
            if fs is not None and len(fs) != r // 2:
                what = "freq_factors" if name == "factors" else name
                raise ValueError(
                    f"scaling has {len(fs)} {what}; rotary_dim={r} rotates "
                    f"{r // 2} pairs, one factor each"
                )
        self.d_head, self.rotary_dim, self.scaling = d_head, r, scaling
        self.base = float(base)
        self.interleaved = bool(interleaved)
        # per (device, dtype, scaling.variant: LongRoPE's long factors, dynamic NTK's n)
        self._tables: dict[tuple[torch.device, torch.dtype, Any], tuple[Tensor, Tensor]] = {}
        # float32 CPU cos, sin (n, d/2), and the variant they are of
        self._pairs: tuple[Tensor, Tensor, Any] | None = None

    def extra_repr(self) -> str:
        partial = "" if self.rotary_dim == self.d_head else f", rotary_dim={self.rotary_dim}"
        scaled = "" if self.scaling is None else f", scaling={self.scaling.rope_type}"
        return (
            f"d_head={self.d_head}, base={self.base}, interleaved={self.interleaved}"
            f"{partial}{scaled}"
        )

    def inv_freq(self, variant: bool | int | None = None) -> Tensor:
        """θ_p = base^(−2p/r) for p in [0, r/2) (r = rotary_dim), divided by `scaling`'s s_p
        if given, for `scaling.variant(n)` (LongRoPE: True for its long factors; dynamic NTK: n,
        whose base it changes); float64 on the CPU."""
        p = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64)
        if self.scaling is None:
            return self.base ** (-p / self.rotary_dim)
        base = self.base
        if self.scaling.rope_type == "dynamic" and variant is not None:
            base = self.scaling.dynamic_base(base, int(variant), self.rotary_dim)
        return self.scaling.apply(base ** (-p / self.rotary_dim), self.base, bool(variant))

    def tables(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos_w, sin_w of shape (≥n, d) for positions 0.. on `device` in `dtype` (grown on
        demand), for a call whose positions end before n (LongRoPE picks its factors by n):
        each pair's cos on both its features, and its sin signed −sin on the first;
        features past rotary_dim get cos 1, sin 0 (they pass through)."""
        variant = None if self.scaling is None else self.scaling.variant(n)
        key = (device, dtype, variant)
        got = self._tables.get(key)
        if got is None or got[0].shape[0] < n:
            if _is_n(variant):  # dynamic NTK: only the latest n's tables are kept
                self._tables = {k: t for k, t in self._tables.items() if not _is_n(k[2])}
            size = max(256, 1 << (max(n, 1) - 1).bit_length())
            ang = torch.arange(size, dtype=torch.float64)[:, None] * self.inv_freq(variant)[None, :]
            cos, sin = ang.cos(), ang.sin()
            if self.scaling is not None and self.scaling.cos_sin_scale != 1.0:  # YaRN, LongRoPE
                cos, sin = cos * self.scaling.cos_sin_scale, sin * self.scaling.cos_sin_scale
            if self.interleaved:  # features (2p, 2p+1) form pair p
                cos_w = torch.stack((cos, cos), -1).flatten(-2)
                sin_w = torch.stack((-sin, sin), -1).flatten(-2)
            else:  # features (p, p + d/2) form pair p
                cos_w, sin_w = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
            rest = self.d_head - self.rotary_dim
            cos_w = torch.cat((cos_w, cos_w.new_ones(size, rest)), -1)
            sin_w = torch.cat((sin_w, sin_w.new_zeros(size, rest)), -1)
            got = (cos_w.to(device, dtype), sin_w.to(device, dtype))
            self._tables[key] = got
        return got

    def rotate_qkv(
        self, qkv: Tensor, start: int, n_q: int, n_k: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Split a fused projection qkv (b i n_q+2·n_k d) into q (b n_q i d), k and v
        (b n_k i d), q and k rotated at positions start … start+i−1: the same values as
        `q, k = self(qk, start).split(...)` on the transposed heads; v is a view."""
        T, D = qkv.shape[2:]
        if T != n_q + 2 * n_k or D != self.d_head:
            raise ValueError(
                f"qkv must have shape (B, S, {n_q}+2·{n_k}, d_head={self.d_head}), got {tuple(qkv.shape)}"
            )
        qk, v = qkv.transpose(1, 2).split((n_q + n_k, n_k), dim=1)
        q, k = self(qk, start).split((n_q, n_k), dim=1)
        return q, k, v

    def pair_tables(self, n: int) -> tuple[Tensor, Tensor]:
        """float32 CPU cos and sin per (position, pair): (≥n, d/2), contiguous, as
        `nn.fused.rope_qkv` takes them (for rotary_dim = d_head), for a call whose positions
        end before n (as `tables`)."""
        variant = None if self.scaling is None else self.scaling.variant(n)
        if self._pairs is None or self._pairs[0].shape[0] < n or self._pairs[2] != variant:
            cos_w, sin_w = self.tables(n, torch.device("cpu"), torch.float32)
            P = self.d_head // 2
            if self.interleaved:  # pair p is (2p, 2p+1); sin_w holds (−sin, sin) per pair
                cos, sin = cos_w[:, 0::2], sin_w[:, 1::2]
            else:  # pair p is (p, p + d/2); sin_w holds (−sin | sin)
                cos, sin = cos_w[:, :P], sin_w[:, P:]
            self._pairs = (cos.contiguous(), sin.contiguous(), variant)
        return self._pairs[:2]

    def forward(self, x: Tensor, positions: Tensor | int) -> Tensor:
        """Rotate x (b h i d) by its positions: a tensor (i,) or (b, i), or an int `start` for
        the contiguous positions start … start+i−1 (a slice of the tables, no gather)."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != self.d_head:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"rope expects x of shape (B, H, S, d_head={self.d_head}), got {got}")
        if isinstance(positions, int) and not isinstance(positions, bool):
            if positions < 0:
                raise ValueError(f"positions must be ≥ 0, got start={positions}")
            S = x.shape[2]
            cdt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            cos_w, sin_w = self.tables(positions + S, x.device, cdt)
            end = positions + S
            return self._rotate(x, cos_w[positions:end], sin_w[positions:end], cdt)
        if not isinstance(positions, Tensor) or positions.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"positions must be an int64 tensor of shape (S,) or (B, S), got {positions!r}"
            )
        B, _, S, _ = x.shape
        if positions.dim() == 1:
            if positions.shape[0] != S:
                raise ValueError(
                    f"positions has {positions.shape[0]} entries but x has S={S} positions"
                )
        elif positions.dim() == 2:
            if positions.shape[1] != S or positions.shape[0] not in (1, B):
                raise ValueError(
                    f"positions of shape {tuple(positions.shape)} must be (S,) or (B, S) = ({B}, {S})"
                )
        else:
            raise ValueError(
                f"positions must have shape (S,) or (B, S), got {tuple(positions.shape)}"
            )
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError("positions must be ≥ 0")
        n = int(positions.max()) + 1 if positions.numel() else 0
        cdt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        cos_w, sin_w = self.tables(n, x.device, cdt)
        pos = positions.to(x.device)
        cos, sin = cos_w[pos], sin_w[pos]  # (i d) or (b i d)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (b 1 i d)
        return self._rotate(x, cos, sin, cdt)

    def _rotate(self, x: Tensor, cos_w: Tensor, sin_w: Tensor, cdt: torch.dtype) -> Tensor:
        """x·cos_w + swap(x)·sin_w, where swap exchanges the two features of each pair: for
        pair (a, b) that is (a·cos − b·sin, b·cos + a·sin), the same products and sums as the
        complex form, in four ops (plus two casts for half-precision x). Features past
        rotary_dim meet cos 1 and sin 0: they pass through whatever swap puts beside them."""
        xc = x if x.dtype == cdt else x.to(cdt)
        r = self.rotary_dim
        if self.interleaved:
            swapped = xc.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (b a) per pair
        elif r == self.d_head:
            swapped = xc.roll(r // 2, dims=-1)  # (x[d/2:], x[:d/2])
        else:  # (x[r/2:r], x[:r/2], x[r:])
            swapped = torch.cat((xc[..., :r].roll(r // 2, dims=-1), xc[..., r:]), -1)
        out = xc * cos_w + swapped * sin_w
        return out if out.dtype == x.dtype else out.to(x.dtype)
