"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE, Qwen2-MoE): a linear router scores E
gated MLPs for each token, the token goes through the top k of them, and their outputs are
blended by the router's probabilities. Every token is routed on its own (no capacity limit,
nothing dropped), so the layer is position-wise like the dense MLP it replaces.

    moe = SparseMoE(4096, 14336, n_experts=8, top_k=2)                # Mixtral 8x7B's layer
    y = moe(x)                                                        # x (b i m) → (b i m)

Letters: b batch, i position, m model dim, f expert hidden dim, n tokens (b·i), e experts,
k experts chosen per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .blocks import MLP


@dataclass(frozen=True)
class MoEConfig:
    """A sparse MLP's shape: `n_experts` gated MLPs of hidden width `d_expert`, `top_k` of them
    per token, their weights renormalised to sum to 1 (`normalise`: Mixtral always; Qwen's
    `norm_topk_prob`) or left as the softmax gave them; `d_shared` > 0 adds a shared expert of
    that width, gated by sigmoid(linear(x)), that every token goes through (Qwen2-MoE)."""

    n_experts: int
    top_k: int
    d_expert: int
    normalise: bool = True
    d_shared: int = 0

    def __post_init__(self) -> None:
        for f in ("n_experts", "top_k", "d_expert"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MoEConfig: {f} must be an int ≥ 1, got {v!r}")
        if self.top_k > self.n_experts:
            raise ValueError(
                f"MoEConfig: top_k={self.top_k} exceeds n_experts={self.n_experts}; a token "
                "can use each expert once"
            )
        if not isinstance(self.normalise, bool):
            raise ValueError(f"MoEConfig: normalise must be a bool, got {self.normalise!r}")
        if (
            isinstance(self.d_shared, bool)
            or not isinstance(self.d_shared, int)
            or self.d_shared < 0
        ):
            raise ValueError(f"MoEConfig: d_shared must be an int ≥ 0, got {self.d_shared!r}")


def route(logits: Tensor, top_k: int, normalise: bool = True) -> tuple[Tensor, Tensor]:
    """Router logits (n e) → (weights (n k), experts (n k) int64), best first:

        p = softmax(logits, -1)                       float32 (float64 for float64 logits)
        weights, experts = torch.topk(p, top_k, -1)   ties as torch.topk resolves them
        weights /= weights.sum(-1, keepdim=True)      if normalise

    The top k of the probabilities, not of the logits: the same order, and the same choice
    between near-equal experts as transformers' routers, which take the top k after the
    softmax. Weights stay float32 for float16/bfloat16 logits (Mixtral multiplies by them so).
    """
    if logits.dim() != 2 or not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(
            f"route takes logits (n, e) and 1 ≤ top_k ≤ e, got shape {tuple(logits.shape)} "
            f"and top_k={top_k}"
        )
    wide = logits.dtype if logits.dtype == torch.float64 else torch.float32
    p = torch.softmax(logits.to(wide), dim=-1)  # (n e)
    weights, experts = torch.topk(p, top_k, dim=-1)  # (n k)
    if normalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts


class SparseMoE(nn.Module):
    """Sparse mixture of `n_experts` gated MLPs, x (b i m) → (b i m):

        h = x viewed as (n m)                          n = b·i tokens
        logits = router(h)                             (n e), router an nn.Linear (e, m), no bias
        w, idx = route(logits, top_k, normalise)       (n k) each; see `route`
        y[t] = Σ_j w[t, j] · experts[idx[t, j]](h[t])  experts[e](h) = down(act(gate(h)) · up(h))
        y += sigmoid(shared_gate(h)) · shared(h)       only with a shared expert (d_shared > 0)

    Equivalent PyTorch (the naive code it equals, one token at a time):

        for t in range(n):
            y[t] = sum(w[t, j] * experts[idx[t, j]](h[t]) for j in range(top_k))

    Each expert runs once, on the tokens routed to it; y sums the experts in index order from
    zero (as transformers' `index_add_`), so float32 results match it to rounding. The product
    w · expert(h) is taken in w's dtype (float32 for half inputs) and cast back to x's.
    Weights, as a person inspects them: router.weight (e, m); experts[e] a `qkv.nn.MLP`
    (gate, up (f, m), down (m, f)); shared an MLP and shared_gate (1, m) when present.
    """

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        n_experts: int,
        top_k: int,
        *,
        act: str | Callable[[Tensor], Tensor] = "silu",
        normalise: bool = True,
        d_shared: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        spec = MoEConfig(n_experts, top_k, d_expert, normalise, d_shared)  # validates
        fk = {"device": device, "dtype": dtype}
        self.top_k, self.normalise = spec.top_k, spec.normalise
        self.router = nn.Linear(d_model, n_experts, bias=False, **fk)
        self.experts = nn.ModuleList(
            MLP(d_model, d_expert, act=act, gated=True, bias=False, **fk) for _ in range(n_experts)
        )
        self.shared = self.shared_gate = None
        if d_shared:
            self.shared = MLP(d_model, d_shared, act=act, gated=True, bias=False, **fk)
            self.shared_gate = nn.Linear(d_model, 1, bias=False, **fk)

    @classmethod
    def from_config(cls, d_model: int, spec: MoEConfig, act: str = "silu") -> SparseMoE:
        return cls(d_model, spec.d_expert, spec.n_experts, spec.top_k, act=act,
                   normalise=spec.normalise, d_shared=spec.d_shared)  # fmt: skip

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, normalise={self.normalise}"

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(-1, x.shape[-1])  # (n m)
        w, idx = route(self.router(h), self.top_k, self.normalise)  # (n k), (n k)
        y = torch.zeros_like(h)  # (n m)
        used = torch.bincount(idx.flatten(), minlength=len(self.experts))  # (e,) tokens each
        for e in used.nonzero().flatten().tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)  # tokens routed to e, where in top k
            out = self.experts[e](h[tok]) * w[tok, slot, None]  # (t m)
            y.index_add_(0, tok, out.to(y.dtype))
        if self.shared is not None:
            y = y + torch.sigmoid(self.shared_gate(h)) * self.shared(h)
        return y.view(x.shape)
