"""MultiHeadAttention: the module that owns W_Q, W_K, W_V, W_O and calls `qkv.attention`.

Letters: b batch, i query position, j key position, m model dim, h query head, k kv head,
d head dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import ScoreMod, attention, auto_backend
from .cache import LayerCache
from .capture import record, recorders
from .rope import RotaryEmbedding


def _check_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class MultiHeadAttention(nn.Module):
    """Multi-head (GQA/MQA) attention with weights stored per head, as a person inspects them.

    Parameters: W_Q (h m d), W_K and W_V (k m d), W_O (h d m); with `bias`: b_Q (h d),
    b_K and b_V (k d), and b_O (m) unless `out_bias=False` (Qwen2 biases q, k, v only).
    `n_kv_heads` defaults to `n_heads` (MHA), `d_head` to d_model // n_heads. `rope`, if given,
    rotates q and k at their absolute positions. `q_norm` / `k_norm` (modules over the last
    dim d, e.g. RMSNorm(d)) normalise each head's q and k before RoPE (QK-norm, Qwen3); with
    `qk_norm_scope="all"` they take the whole projections instead, q as (b i (h d)) and k as
    (b i (k d)) (e.g. RMSNorm(h·d), RMSNorm(k·d): OLMo 2). `qk_norm_after_rope=True` normalises
    each head's q and k after RoPE instead (Hunyuan; "head" scope only).
    `window` = (left, right) limits each query to keys within that band of its diagonal, as
    `qkv.attention`'s `window` ((W−1, 0) with `causal`: the last W keys, Mistral's sliding window).
    `scale` replaces 1/√d (Gemma 2: query_pre_attn_scalar^−½); `softcap` c caps each score at
    c·tanh(s/c) before the masks, as `qkv.attention`'s `softcap` (Gemma 2). `score_mod` goes to
    `qkv.attention` as it is (e.g. `qkv.alibi(n_heads)`: BLOOM's ALiBi). `clip` c clamps every
    q, k and v feature to [−c, c] after the projections and their biases, before QK-norm and
    RoPE (OLMo's `clip_qkv`). `sinks=True` adds a learned sink logit per query head, the
    parameter `sinks` (h), initialised to 0: one more softmax term with no value, so a head can
    put weight on nothing (gpt-oss; `qkv.attention`'s `sinks`).

    forward(x (b i m), *, mask=None, cache=None) → (b i m). Equivalent code::

        q = einsum("bim,hmd->bhid", x, W_Q) + b_Q[:, None]      # likewise k, v with W_K, W_V
        q, k, v = q.clamp(-clip, clip), k.clamp(…), v.clamp(…)   # if clip
        q, k = q_norm(q), k_norm(k)                              # if given (QK-norm)
        q, k = rope(q, pos), rope(k, pos)                        # pos = cache.length + arange(i)
        # (qk_norm_after_rope: the two lines above the other way round)
        z = qkv.attention(q, k, v, causal=causal, window=window, mask=mask, scale=scale,
                          softcap=softcap, score_mod=score_mod,
                          sinks=sinks)                                 # kv head = h // (h/k)
        out = einsum("bhid,hdm->bim", z, W_O) + b_O

    `mask` is bool keep (True = attend) or a float additive bias, broadcastable to (b, h, i, j),
    e.g. key padding (b, 1, 1, j); with a cache j counts the cached tokens too. `causal` is
    bottom-right aligned, so decoding with a cache needs no mask. With `cache` (a `LayerCache`),
    the new k/v are appended and attention runs over all cached positions. With `segments`
    (lengths), x is (1, n, m) holding that many whole sequences back to back (padding removed):
    each attends only within itself, positions restarting at 0 (FlashAttention's
    variable-length mode).

    The module is the formula in PyTorch ops on any device and dtype; `qkv.nn.accelerate`
    swaps in its float32-CPU-inference twin (same parameters) where that pays.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        d_head: int | None = None,
        bias: bool = True,
        rope: RotaryEmbedding | None = None,
        causal: bool = False,
        *,
        scale: float | None = None,
        out_bias: bool | None = None,
        window: tuple[int | None, int | None] | None = None,
        softcap: float | None = None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        qk_norm_scope: str = "head",
        qk_norm_after_rope: bool = False,
        score_mod: ScoreMod | None = None,
        clip: float | None = None,
        sinks: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d_model = _check_int("d_model", d_model)
        n_heads = _check_int("n_heads", n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else _check_int("n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(
                f"n_heads must be a multiple of n_kv_heads (GQA), got {n_heads} and {n_kv_heads}"
            )
        if d_head is None:
            if d_model % n_heads:
                raise ValueError(
                    f"d_model={d_model} is not divisible by n_heads={n_heads}; pass d_head explicitly"
                )
            d_head = d_model // n_heads
        d_head = _check_int("d_head", d_head)
        if rope is not None and not isinstance(rope, RotaryEmbedding):
            raise TypeError(
                f"rope must be a qkv.nn.RotaryEmbedding or None, got {type(rope).__name__}"
            )
        if rope is not None and rope.d_head != d_head:
            raise ValueError(f"rope.d_head={rope.d_head} must equal d_head={d_head}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {causal!r}")
        if window is not None and (
            not isinstance(window, tuple)
            or len(window) != 2
            or any(
                w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 0)
                for w in window
            )
        ):
            raise ValueError(
                f"window must be None or a (left, right) pair of ints ≥ 0 or None, got {window!r}"
            )
        if softcap is not None and not (
            isinstance(softcap, int | float) and 0 < softcap < math.inf
        ):
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
        if (q_norm is None) != (k_norm is None):
            raise ValueError("q_norm and k_norm come together (QK-norm): pass both or neither")
        if qk_norm_scope not in ("head", "all"):
            raise ValueError(f"qk_norm_scope must be 'head' or 'all', got {qk_norm_scope!r}")
        if not isinstance(qk_norm_after_rope, bool):
            raise TypeError(f"qk_norm_after_rope must be a bool, got {qk_norm_after_rope!r}")
        if qk_norm_after_rope and (q_norm is None or qk_norm_scope != "head"):
            raise ValueError(
                "qk_norm_after_rope normalises each head's rotated q and k: it needs q_norm and "
                f"k_norm with qk_norm_scope='head', got q_norm={type(q_norm).__name__}, "
                f"qk_norm_scope={qk_norm_scope!r}"
            )
        if clip is not None and not (
            isinstance(clip, int | float) and not isinstance(clip, bool) and 0 < clip < math.inf
        ):
            raise ValueError(f"clip must be None or a finite number > 0, got {clip!r}")
        if not isinstance(sinks, bool):
            raise TypeError(f"sinks must be a bool (a learned sink logit per head), got {sinks!r}")
        if score_mod is not None and not callable(score_mod):
            raise TypeError(f"score_mod must be a function or None, got {type(score_mod).__name__}")
        self.d_model, self.n_heads, self.n_kv_heads, self.d_head = (
            d_model,
            n_heads,
            n_kv_heads,
            d_head,
        )
        self.causal = causal
        self.window = window
        self.softcap = None if softcap is None else float(softcap)
        self.q_norm, self.k_norm, self.qk_norm_scope = q_norm, k_norm, qk_norm_scope
        self.qk_norm_after_rope = qk_norm_after_rope
        self.score_mod = score_mod
        self.clip = None if clip is None else float(clip)
        self.scale = 1.0 / math.sqrt(d_head) if scale is None else float(scale)
        self.rope = rope
        fk = {"device": device, "dtype": dtype}  # factory kwargs, as torch.nn modules take them
        self.W_Q = nn.Parameter(torch.empty(n_heads, d_model, d_head, **fk))
        self.W_K = nn.Parameter(torch.empty(n_kv_heads, d_model, d_head, **fk))
        self.W_V = nn.Parameter(torch.empty(n_kv_heads, d_model, d_head, **fk))
        self.W_O = nn.Parameter(torch.empty(n_heads, d_head, d_model, **fk))
        if bias:
            self.b_Q = nn.Parameter(torch.zeros(n_heads, d_head, **fk))
            self.b_K = nn.Parameter(torch.zeros(n_kv_heads, d_head, **fk))
            self.b_V = nn.Parameter(torch.zeros(n_kv_heads, d_head, **fk))
        else:
            self.register_parameter("b_Q", None)
            self.register_parameter("b_K", None)
            self.register_parameter("b_V", None)
        if bias if out_bias is None else out_bias:
            self.b_O = nn.Parameter(torch.zeros(d_model, **fk))
        else:
            self.register_parameter("b_O", None)
        if sinks:
            self.sinks = nn.Parameter(torch.zeros(n_heads, **fk))
        else:
            self.register_parameter("sinks", None)
        self._fused: tuple | None = None  # (params, versions, w, b), see fused_qkv
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init: U(±1/√fan_in) per projection, biases 0."""
        for w, fan_in in (
            (self.W_Q, self.d_model),
            (self.W_K, self.d_model),
            (self.W_V, self.d_model),
            (self.W_O, self.n_heads * self.d_head),
        ):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        for b in (self.b_Q, self.b_K, self.b_V, self.b_O, self.sinks):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
            f"d_head={self.d_head}, bias={self.b_Q is not None}, causal={self.causal}"
            + ("" if self.b_O is None or self.b_Q is not None else ", out_bias=True")
            + ("" if self.b_Q is None or self.b_O is not None else ", out_bias=False")
            + ("" if self.window is None else f", window={self.window}")
            + ("" if self.softcap is None else f", softcap={self.softcap}")
            + ("" if self.clip is None else f", clip={self.clip}")
            + ("" if self.qk_norm_scope == "head" else f", qk_norm_scope={self.qk_norm_scope!r}")
            + (", qk_norm_after_rope=True" if self.qk_norm_after_rope else "")
            + ("" if self.score_mod is None else ", score_mod=yes")
            + ("" if self.sinks is None else ", sinks=True")
        )

    def fused_qkv(self) -> tuple[Tensor, Tensor | None]:
        """W_Q, W_K, W_V as one nn.Linear-layout weight ((h+2k)·d, m), so `F.linear(x, w, b)`
        gives q|k|v per head, and the matching bias.

        Without autograd: a concatenated copy cached while the parameters keep their identity,
        version and storage. With autograd (some parameter requires grad) or under
        torch.compile: concatenated afresh, so gradients flow.
        """
        params = (self.W_Q, self.W_K, self.W_V, self.b_Q, self.b_K, self.b_V)
        grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
        grad = grad or torch.compiler.is_compiling()  # a traced graph keeps the concatenation
        if not grad:
            key = (
                tuple(None if p is None else (p._version, p.data_ptr(), p.dtype) for p in params),
                torch.is_inference_mode_enabled(),  # an inference tensor is no use outside it
            )
            if self._fused is not None:
                old, old_key, w, b = self._fused
                if old_key == key and all(a is c for a, c in zip(old, params, strict=True)):
                    return w, b
        w = torch.cat((self.W_Q, self.W_K, self.W_V), 0)  # ((h+2k) m d)
        w = w.transpose(1, 2).reshape(-1, self.d_model)  # ((h+2k)·d m)
        b = self._bias()
        self._fused = None if grad else (params, key, w, b)
        return w, b

    def _bias(self) -> Tensor | None:
        if self.b_Q is None:
            return None
        return torch.cat((self.b_Q, self.b_K, self.b_V), 0).reshape(-1)  # ((h+2k)·d,)

    def _check(self, x: object, mask: object, cache: object) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(
                f"x must be a torch.Tensor of shape (B, S, d_model), got {type(x).__name__}"
            )
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape (B, S, d_model={self.d_model}), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")
        if x.dtype != self.W_Q.dtype:
            raise TypeError(
                f"x is {x.dtype} but the weights are {self.W_Q.dtype}; cast one to the other"
            )
        if x.device != self.W_Q.device:
            raise ValueError(
                f"x is on {x.device} but the weights are on {self.W_Q.device}; move one to the "
                f"other (x.to({str(self.W_Q.device)!r}) or module.to({str(x.device)!r}))"
            )
        if cache is not None and not isinstance(cache, LayerCache):
            raise TypeError(
                f"cache must be a qkv.nn.LayerCache (e.g. kv_cache[layer]) or None, got {type(cache).__name__}"
            )
        if mask is not None and not isinstance(mask, Tensor):
            raise TypeError(
                f"mask must be a bool (True = keep) or float (additive bias) tensor or None, "
                f"got {type(mask).__name__}"
            )

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        segments: Sequence[int] | None = None,
    ) -> Tensor:
        self._check(x, mask, cache)
        if segments is not None:
            return self._forward_segments(x, segments, mask, cache)
        B, S, _ = x.shape
        q, k, v = self._positioned(self._tokens(x), 0 if cache is None else cache.length)
        if cache is not None:
            k, v = cache.append(k, v)  # (b k j d)
        z = self._attend(q, k, v, self._attn_kwargs(mask))  # (b h i e)
        return self._out(z.transpose(1, 2).reshape(B, S, -1))  # (b i m)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, kw: dict, segment: int | None = None):
        """z (b h i e) = qkv.attention(q, k, v, **kw), recorded for an active capture (with
        its LSE) as the call of this module (of `segment` in a packed batch)."""
        recording = recorders(self)
        if not recording:
            return attention(q, k, v, **kw)
        z, lse = attention(q, k, v, **kw, return_lse=True)
        if auto_backend(q, k, v, **kw) != auto_backend(q, k, v, **kw, return_lse=True):
            # the LSE comes from another kernel (fp16/bf16 on CPU: tiled, not SDPA) whose out
            # may differ in its last bit: keep the out an unrecorded forward computes, so a
            # lens record never changes what the model computes
            z = attention(q, k, v, **kw)
        record(recording, self, q, k, v, z, lse, kw, segment=segment)
        return z

    def _tokens(self, x: Tensor) -> Tensor:
        """What each token contributes before positions: x (b i m) → q|k|v per head
        (b i (h+2k) d) (`_project`). A subclass may return any per-token structure that its
        `_positioned` and `_span` read (LatentAttention: MLA's latents)."""
        return self._project(x)

    def _positioned(self, tokens: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
        """`_tokens` of positions start … → q (b h i d), k, v (b k i d): rotated (RoPE) and,
        with `qk_norm_after_rope`, normalised."""
        return self._normed(*self._rotate(tokens, start))

    def _span(self, tokens: Tensor, a: int, b: int) -> Tensor:
        """`_tokens` of the token positions a … b−1."""
        return tokens[:, a:b]

    def _attn_kwargs(self, mask: Tensor | None) -> dict:
        """What `qkv.attention` takes besides q, k, v (and what a record replays)."""
        kw = {"causal": self.causal, "mask": mask, "scale": self.scale}
        if self.window is not None:
            kw["window"] = self.window
        if self.softcap is not None:
            kw["softcap"] = self.softcap
        if self.score_mod is not None:
            kw["score_mod"] = self.score_mod
        if self.sinks is not None:
            kw["sinks"] = self.sinks
        return kw

    def _project(self, x: Tensor) -> Tensor:
        """x (b i m) → q|k|v per head (b i (h+2k) d), clamped to ±clip if `clip`, q and k
        normalised if QK-norm is on (before RoPE: not with `qk_norm_after_rope`)."""
        B, S, _ = x.shape
        H, K = self.n_heads, self.n_kv_heads
        qkv = self._qkv(x).view(B, S, H + 2 * K, self.d_head)
        if self.clip is not None:
            qkv = qkv.clamp(-self.clip, self.clip)
        if self.q_norm is None or self.qk_norm_after_rope:
            return qkv
        q, k, v = qkv.split((H, K, K), dim=2)  # (b i h d), (b i k d) ×2
        if self.qk_norm_scope == "all":  # over (h d) and (k d) features
            q, k = self.q_norm(q.flatten(2)).view_as(q), self.k_norm(k.flatten(2)).view_as(k)
        else:
            q, k = self.q_norm(q), self.k_norm(k)
        return torch.cat((q, k, v), dim=2)

    def _normed(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (b h i d), k, v (b k i d) after RoPE; q and k normalised per head if
        `qk_norm_after_rope` (the norms see (b i h d), as before RoPE)."""
        if not self.qk_norm_after_rope or self.q_norm is None:
            return q, k, v
        q = self.q_norm(q.transpose(1, 2)).transpose(1, 2)
        return q, self.k_norm(k.transpose(1, 2)).transpose(1, 2), v

    def _qkv(self, x: Tensor) -> Tensor:
        """x (b i m) → (b i (h+2k)·d): the three projections as one matmul."""
        return F.linear(x, *self.fused_qkv())

    def _rotate(self, qkv: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
        """qkv (b i (h+2k) d) → q (b h i d), k, v (b k i d); q and k rotated at positions
        start … start+i−1 when the module has RoPE."""
        H, K = self.n_heads, self.n_kv_heads
        if self.rope is None:
            return qkv.transpose(1, 2).split((H, K, K), dim=1)
        return self.rope.rotate_qkv(qkv, start, H, K)

    def _out(self, zf: Tensor) -> Tensor:
        """The heads' outputs side by side, zf (b i (h d)) → (b i m): W_O and b_O."""
        return F.linear(zf, self.out_weight(), self.b_O)

    def out_weight(self) -> Tensor:
        """W_O (h d m) as one nn.Linear-layout weight (m, (h d)), a view."""
        return self.W_O.reshape(self.n_heads * self.d_head, self.d_model).t()

    def _forward_segments(
        self, x: Tensor, segments: Sequence[int], mask: object, cache: object
    ) -> Tensor:
        """x (1 n m) holds whole sequences back to back, of lengths `segments`: the projections
        run once over all n tokens, attention within each sequence (RoPE positions and the
        causal diagonal restart at each), as FlashAttention's variable-length mode does."""
        if mask is not None or cache is not None:
            raise ValueError("segments cannot be combined with a mask or a cache")
        lengths = [int(n) for n in segments]
        if x.shape[0] != 1 or sum(lengths) != x.shape[1] or min(lengths, default=0) <= 0:
            raise ValueError(
                f"segments must be positive lengths summing to x's tokens, with x of shape "
                f"(1, n, {self.d_model}); got x {tuple(x.shape)} and segments of sum "
                f"{sum(lengths)}, smallest {min(lengths, default=None)}"
            )
        tokens = self._tokens(x)  # the projections, once over all n tokens
        kw = self._attn_kwargs(None)
        parts, start = [], 0
        for s, n in enumerate(lengths):
            q, k, v = self._positioned(self._span(tokens, start, start + n), 0)
            parts.append(self._attend(q, k, v, kw, segment=s).transpose(1, 2))  # (1 i h e)
            start += n
        return self._out(torch.cat(parts, 1).reshape(1, sum(lengths), -1))  # (1 n m)
