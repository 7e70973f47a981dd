"""Transformer building blocks around MultiHeadAttention: RMSNorm, LayerNorm with an offset gain
(Nemotron), the MLP (plain or gated), and the residual arrangements (pre-norm as in
Llama/GPT-2, post-norm as in BERT, parallel as in GPT-NeoX/GPT-J/Phi-2, sandwich as in
Gemma 2/3, output-norm as in OLMo 2).

Letters: b batch, i position, m model dim, f MLP hidden dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiHeadAttention
from .cache import LayerCache

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # erf form (BERT)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,  # Llama's SwiGLU gate
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # squared ReLU (Primer; Arcee, Nemotron)
    # BLOOM's (Megatron's) tanh GELU: √(2/π) written as 0.79788456, 6e-11 below it
    "gelu_tanh_bloom": lambda x: (
        x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))
    ),
}


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x², -1) + eps) * (offset + weight)`, normalised in float32 (as HF Llama),
    x (… m); `offset` is 0 (Llama) or 1 (Gemma stores its gain as w − 1)."""

    def __init__(
        self, d_model: int, eps: float = 1e-6, *, offset: float = 0.0, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.eps, self.offset = float(eps), float(offset)
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (
            f", offset={self.offset}" if self.offset else ""
        )

    def gain(self) -> Tensor:
        """(offset + weight) (m,), what x's normalised features are multiplied by."""
        return self.weight + self.offset if self.offset else self.weight

    def forward(self, x: Tensor) -> Tensor:
        w = self.gain()
        if x.dtype == w.dtype and x.dtype in (torch.float32, torch.float64):
            return F.rms_norm(x, w.shape, w, self.eps)  # one fused op
        # half precision: normalised and multiplied by the gain in float32, rounded once (as
        # Gemma's RMSNorm; Llama's rounds h before the gain: a second rounding, never closer)
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.to(h.dtype)
        return ((w + self.offset if self.offset else w) * h).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose gain is `offset + weight`: `(x − mean(x)) / √(var(x) + eps) ·
    (offset + weight) + bias` over the last dim, x (… m). Nemotron's LayerNorm1P stores its gain
    as w − 1 (offset 1); offset 0 is nn.LayerNorm. Equivalent code::

        F.layer_norm(x, (m,), weight + offset, bias, eps)
    """

    def __init__(self, d_model: int, eps: float = 1e-5, *, offset: float = 0.0, **kw) -> None:
        super().__init__(d_model, eps, **kw)
        if offset and self.weight is None:
            raise ValueError("LayerNorm: an offset gain needs a weight (elementwise_affine=True)")
        self.offset = float(offset)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", offset={self.offset}" if self.offset else "")

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight + self.offset if self.offset else self.weight
        return F.layer_norm(x, self.normalized_shape, w, self.bias, self.eps)


class PerHeadNorm(nn.Module):
    """Each head's features normalised on their own, with each head's own gain: x (… h d) →
    (… h d), over the last dim d,

        center=True  (LayerNorm, no bias):  (x − mean(x)) / √(var(x) + eps) · weight[h]
        center=False (RMSNorm):             x / √(mean(x²) + eps) · (offset + weight[h])

    with weight (h d) (var is the biased one, as LayerNorm's). Half-precision x is normalised in
    float32. The QK-norm of Cohere (`q_norm.weight` (h, d)) and StableLM (one
    LayerNorm(d, bias=False) per head). Equivalent code::

        torch.stack([F.layer_norm(x[..., h, :], (d,), weight[h], None, eps)
                     for h in range(n_heads)], -2)                       # center=True
    """

    def __init__(
        self,
        n_heads: int,
        d_head: int,
        eps: float = 1e-5,
        *,
        center: bool = True,
        offset: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.eps, self.center, self.offset = float(eps), bool(center), float(offset)
        self.weight = nn.Parameter(torch.ones(n_heads, d_head, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        n, d = self.weight.shape
        return f"n_heads={n}, d_head={d}, eps={self.eps}, center={self.center}" + (
            f", offset={self.offset}" if self.offset else ""
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != self.weight.shape:
            raise ValueError(
                f"PerHeadNorm expects x of shape (..., {self.weight.shape[0]}, "
                f"{self.weight.shape[1]}) (heads, d_head), got {tuple(x.shape)}"
            )
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if self.center:
            h = F.layer_norm(h, h.shape[-1:], None, None, self.eps)
        else:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight + self.offset if self.offset else self.weight
        return (h * w.to(h.dtype)).to(x.dtype)


class MLP(nn.Module):
    """Position-wise feed-forward, x (b i m) → (b i m).

    plain (`gated=False`, BERT/GPT-2): `down(act(up(x)))`
    gated (`gated=True`, Llama SwiGLU):  `down(act(gate(x)) * up(x))`

    `act` is a name in ACTIVATIONS ("gelu", "gelu_tanh", "gelu_tanh_bloom", "silu", "relu",
    "relu2": relu(x)²) or a callable.
    Weights are nn.Linear: up/gate (f, m), down (m, f).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        act: str | Callable[[Tensor], Tensor] = "gelu",
        gated: bool = False,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        if isinstance(act, str):
            if act not in ACTIVATIONS:
                raise ValueError(
                    f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)} or pass a callable"
                )
            self.act_name, act = act, ACTIVATIONS[act]
        elif callable(act):
            self.act_name = getattr(act, "__name__", "custom")
        else:
            raise TypeError(
                f"act must be an activation name or a callable, got {type(act).__name__}"
            )
        self.act = act
        self.up = nn.Linear(d_model, d_hidden, bias=bias, **fk)
        self.gate = nn.Linear(d_model, d_hidden, bias=bias, **fk) if gated else None
        self.down = nn.Linear(d_hidden, d_model, bias=bias, **fk)

    def extra_repr(self) -> str:
        return f"act={self.act_name}, gated={self.gate is not None}"

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        return self.down(self.act(self.gate(x)) * self.up(x))


class Embedding(nn.Embedding):
    """nn.Embedding (ids (…) → rows of weight (… m)) that can also run backwards:
    `attend(h)` = h @ weightᵀ, h (… m) → (… v), the tied unembedding (flax's `Embed.attend`)."""

    def attend(self, h: Tensor) -> Tensor:
        return F.linear(h, self.weight)


def _residual(branch: Tensor, x: Tensor) -> Tensor:
    """`branch + x`, in place into `branch` (a fresh tensor nobody else holds) when no
    autograd graph is being built; saves one (b i m) allocation per residual."""
    if not torch.is_grad_enabled() or not (branch.requires_grad or x.requires_grad):
        same = branch.shape == x.shape and branch.dtype == x.dtype
        if same and branch.is_contiguous() and branch.data_ptr() != x.data_ptr():
            return branch.add_(x)
    return branch + x


class _Block(nn.Module):
    """An attention sublayer and an MLP sublayer, each with its norm and residual. `mask`,
    `cache` and `segments` go to the attention (see MultiHeadAttention.forward).
    `residual_scale` s multiplies each sublayer's output before it joins the residual,
    x + s·attn(…) (Granite's residual_multiplier; 1: plain)."""

    _one_norm = False  # whether norm2=None (both sublayers read norm1's output) is allowed

    def __init__(
        self,
        attn: MultiHeadAttention,
        mlp: nn.Module,
        norm1: nn.Module,
        norm2: nn.Module | None,
        *,
        residual_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.attn, self.mlp, self.norm1, self.norm2 = attn, mlp, norm1, norm2
        if norm2 is None and not self._one_norm:
            raise ValueError(f"{type(self).__name__} needs norm2; only ParallelBlock shares norm1")
        if not (isinstance(residual_scale, int | float) and residual_scale > 0):
            raise ValueError(f"residual_scale must be a number > 0, got {residual_scale!r}")
        self.residual_scale = float(residual_scale)

    def extra_repr(self) -> str:
        return "" if self.residual_scale == 1.0 else f"residual_scale={self.residual_scale}"

    def _add(self, branch: Tensor, x: Tensor) -> Tensor:
        """x + residual_scale · branch."""
        s = self.residual_scale
        return _residual(branch if s == 1.0 else branch * s, x)


class PreNormBlock(_Block):
    """`h = x + attn(norm1(x)); out = h + mlp(norm2(h))` (GPT-2, Llama)."""

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        segments: Sequence[int] | None = None,
    ) -> Tensor:
        h = self._add(self.attn(self.norm1(x), mask=mask, cache=cache, segments=segments), x)
        return self._add(self.mlp(self.norm2(h)), h)


class PostNormBlock(_Block):
    """`h = norm1(x + attn(x)); out = norm2(h + mlp(h))` (original Transformer, BERT)."""

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        segments: Sequence[int] | None = None,
    ) -> Tensor:
        h = self.norm1(self._add(self.attn(x, mask=mask, cache=cache, segments=segments), x))
        return self.norm2(self._add(self.mlp(h), h))


class ParallelBlock(_Block):
    """`out = x + attn(norm1(x)) + mlp(norm2(x))`: both sublayers read the block's input
    (GPT-NeoX's `use_parallel_residual`, GPT-J). With `norm2=None` both read the one
    `n = norm1(x)`: `out = x + attn(n) + mlp(n)` (Phi-2)."""

    _one_norm = True

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        segments: Sequence[int] | None = None,
    ) -> Tensor:
        n = self.norm1(x)
        a = self.attn(n, mask=mask, cache=cache, segments=segments)
        m = self.mlp(n if self.norm2 is None else self.norm2(x))
        return self._add(_residual(m, a), x)


class SandwichBlock(_Block):
    """`h = x + post1(attn(norm1(x))); out = h + post2(mlp(norm2(h)))`: each sublayer's output
    is normalised too before it joins the residual (Gemma 2/3's pre- and post-norms)."""

    def __init__(
        self,
        attn: MultiHeadAttention,
        mlp: nn.Module,
        norm1: nn.Module,
        norm2: nn.Module,
        post1: nn.Module,
        post2: nn.Module,
        *,
        residual_scale: float = 1.0,
    ) -> None:
        super().__init__(attn, mlp, norm1, norm2, residual_scale=residual_scale)
        self.post1, self.post2 = post1, post2

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        segments: Sequence[int] | None = None,
    ) -> Tensor:
        a = self.attn(self.norm1(x), mask=mask, cache=cache, segments=segments)
        h = self._add(self.post1(a), x)
        return self._add(self.post2(self.mlp(self.norm2(h))), h)


class OutputNormBlock(_Block):
    """`h = x + norm1(attn(x)); out = h + norm2(mlp(h))`: each sublayer's output is normalised
    before it joins the residual, its input is not (OLMo 2's post_attention_layernorm and
    post_feedforward_layernorm)."""

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        segments: Sequence[int] | None = None,
    ) -> Tensor:
        h = self._add(self.norm1(self.attn(x, mask=mask, cache=cache, segments=segments)), x)
        return self._add(self.norm2(self.mlp(h)), h)
