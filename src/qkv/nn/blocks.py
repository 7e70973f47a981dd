"""Transformer building blocks around MultiHeadAttention: RMSNorm, the MLP (plain or gated),
and the residual arrangements (pre-norm as in Llama/GPT-2, post-norm as in BERT, parallel as
in GPT-NeoX/GPT-J, sandwich as in Gemma 2/3).

Letters: b batch, i position, m model dim, f MLP hidden dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused
from .attention import MultiHeadAttention
from .cache import LayerCache
from .quant import Mirror, linear

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # erf form (BERT)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,  # Llama's SwiGLU gate
    "relu": F.relu,
}
_INPLACE: dict[str, Callable[[Tensor], Tensor]] = {  # the same functions, overwriting x
    "gelu": lambda x: torch.ops.aten.gelu_(x),
    "gelu_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "silu": lambda x: F.silu(x, inplace=True),
    "relu": lambda x: F.relu(x, inplace=True),
}


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x², -1) + eps) * (offset + weight)`, normalised in float32 (as HF Llama),
    x (… m); `offset` is 0 (Llama) or 1 (Gemma stores its gain as w − 1). Float32 CPU inference
    takes one fused pass (`nn.fused.rms_norm`, its sum of squares in float64)."""

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

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight + self.offset if self.offset else self.weight
        if x.dim() and fused.eligible(x, w):
            return fused.rms_norm(x, w, self.eps)  # one pass (sum of squares in f64)
        if x.dtype == w.dtype and x.dtype in (torch.float32, torch.float64):
            return F.rms_norm(x, w.shape, w, self.eps)  # one fused op
        h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(x.dtype)


class MLP(nn.Module):
    """Position-wise feed-forward, x (b i m) → (b i m).

    plain (`gated=False`, BERT/GPT-2): `down(act(up(x)))`
    gated (`gated=True`, Llama SwiGLU):  `down(act(gate(x)) * up(x))`

    `act` is a name in ACTIVATIONS ("gelu", "gelu_tanh", "silu", "relu") or a callable.
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
        # "up", "gate", "down", or "gate_up" once packed: the checkpoint's blocks (nn.quant)
        self.mirrors: dict[str, Mirror] = {}
        self._gate_up: tuple | None = None  # (layout key, fused_gate_up's answer)

    def extra_repr(self) -> str:
        return f"act={self.act_name}, gated={self.gate is not None}"

    def _linear(self, name: str, x: Tensor) -> Tensor:
        layer = getattr(self, name)
        return linear(x, layer.weight, layer.bias, self.mirrors.get(name))

    @torch.no_grad()
    def pack_(self) -> MLP:
        """Gated: lay gate and up (weights and biases) out in place as the two halves of one
        (2f, m) matrix, so inference computes both in one matmul (see `fused_gate_up`). Values,
        Parameter objects and requires_grad are unchanged; the weights become views sharing one
        storage. Plain MLPs are left as they are. Loaders call it once. Returns self."""
        if self.gate is None or self.fused_gate_up() is not None:
            return self  # nothing to fuse, or already one storage (e.g. from the GGUF cache)
        f = self.gate.weight.shape[0]
        w = torch.cat((self.gate.weight, self.up.weight), 0)  # (2f m)
        self.gate.weight.data, self.up.weight.data = w[:f], w[f:]
        if self.gate.bias is not None:
            b = torch.cat((self.gate.bias, self.up.bias), 0)
            self.gate.bias.data, self.up.bias.data = b[:f], b[f:]
        return self

    def fused_gate_up(self) -> tuple[Tensor, Tensor | None] | None:
        """The (2f, m) weight (and (2f,) bias) gate and up are the halves of, if `pack_` laid
        them out so and they still are; else None (also while torch.compile traces: the check
        reads storage addresses)."""
        if self.gate is None or torch.compiler.is_compiling():
            return None
        g, u = self.gate, self.up
        halves = [(g.weight, u.weight)] + ([(g.bias, u.bias)] if g.bias is not None else [])
        # a decode step asks once per layer: reuse the answer while the layout is unchanged
        key = tuple((t.data_ptr(), t.shape, t.stride()) for pair in halves for t in pair)
        key += (torch.is_inference_mode_enabled(),)  # an inference view is no use outside it
        if self._gate_up is not None and self._gate_up[0] == key:
            return self._gate_up[1]
        joined = self._join(halves)
        self._gate_up = (key, joined)
        return joined

    @staticmethod
    def _join(halves: list) -> tuple[Tensor, Tensor | None] | None:
        joined = []
        for a, b in halves:
            if a.shape != b.shape or not (a.is_contiguous() and b.is_contiguous()):
                return None
            if b.data_ptr() != a.data_ptr() + a.numel() * a.element_size():
                return None
            if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
                return None
            joined.append(a.detach().as_strided((2 * a.shape[0], *a.shape[1:]), (*a.stride(),)))
        return joined[0], (joined[1] if len(joined) > 1 else None)

    def forward(self, x: Tensor) -> Tensor:
        layers = (self.up, self.down) if self.gate is None else (self.gate, self.up, self.down)
        params = [x] + [p for layer in layers for p in (layer.weight, layer.bias)]
        grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
        if self.gate is None:
            h = self._linear("up", x)
            return self._linear("down", self.act(h) if grad else self._act_(h))
        if grad:
            return self._linear("down", self.act(self._linear("gate", x)) * self._linear("up", x))
        fused = self.fused_gate_up()
        if fused is not None:  # one (… 2f) matmul; gate and up are its two halves
            g, u = linear(x, *fused, self.mirrors.get("gate_up")).chunk(2, dim=-1)
        else:
            g, u = self._linear("gate", x), self._linear("up", x)
        return self._linear("down", self._act_(g).mul_(u))  # no graph to keep: in place

    def _act_(self, h: Tensor) -> Tensor:
        """act(h), in place for the built-in activations (h is a fresh tensor no graph needs):
        one large allocation fewer per layer, each a round of fresh pages to fault in."""
        inplace = (
            _INPLACE.get(self.act_name) if self.act is ACTIVATIONS.get(self.act_name) else None
        )
        return inplace(h) if inplace is not None else self.act(h)


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
    `cache` and `segments` go to the attention (see MultiHeadAttention.forward)."""

    def __init__(
        self, attn: MultiHeadAttention, mlp: nn.Module, norm1: nn.Module, norm2: nn.Module
    ) -> None:
        super().__init__()
        self.attn, self.mlp, self.norm1, self.norm2 = attn, mlp, norm1, norm2


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
        h = _residual(self.attn(self.norm1(x), mask=mask, cache=cache, segments=segments), x)
        return _residual(self.mlp(self.norm2(h)), h)


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
        h = self.norm1(_residual(self.attn(x, mask=mask, cache=cache, segments=segments), x))
        return self.norm2(_residual(self.mlp(h), h))


class ParallelBlock(_Block):
    """`out = x + attn(norm1(x)) + mlp(norm2(x))`: both sublayers read the block's input
    (GPT-NeoX's `use_parallel_residual`, GPT-J)."""

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        cache: LayerCache | None = None,
        segments: Sequence[int] | None = None,
    ) -> Tensor:
        a = self.attn(self.norm1(x), mask=mask, cache=cache, segments=segments)
        return _residual(_residual(self.mlp(self.norm2(x)), a), x)


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
    ) -> None:
        super().__init__(attn, mlp, norm1, norm2)
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
        h = _residual(self.post1(a), x)
        return _residual(self.post2(self.mlp(self.norm2(h))), h)
