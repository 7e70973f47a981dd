"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE, Qwen2-MoE, gpt-oss, GLM-4.5, dots.llm1,
ERNIE 4.5, Hunyuan-A13B, GraniteMoE, DeepSeek-V2 and V3):
a linear router scores E gated MLPs for each token, the token goes through the top k of them,
and their outputs are blended by the router's weights. Every token is routed on its own (no
capacity limit, nothing dropped), so the layer is position-wise like the dense MLP it replaces.

    moe = SparseMoE(4096, 14336, n_experts=8, top_k=2)                # Mixtral 8x7B's layer
    y = moe(x)                                                        # x (b i m) → (b i m)
    oss = SparseMoE(2880, 2880, n_experts=32, top_k=4, order="topk_softmax", router_bias=True,
                    expert_bias=True, glu=ClampedSwiGLU(alpha=1.702, limit=7.0))  # gpt-oss-20b
    glm = SparseMoE(4096, 1408, n_experts=128, top_k=8, scoring="sigmoid", score_bias=True,
                    d_shared=1408, shared_gated=False, scale=1.0)     # GLM-4.5 (DeepSeek-V3's)

Letters: b batch, i position, m model dim, f expert hidden dim, n tokens (b·i), e experts,
k experts chosen per token, g expert groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import MLP

ORDERS = ("softmax_topk", "topk_softmax")
SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2", "max")


def _real(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's gated unit, (gate, up) (… f) each → (… f):

        g = gate.clamp(max=limit)                      no clamp when limit is None
        u = up.clamp(-limit, limit)
        return g · sigmoid(alpha · g) · (u + up_offset)

    gpt-oss: alpha 1.702 (`swiglu_alpha`), limit 7.0 (`swiglu_limit`), up_offset 1. With
    alpha=1, limit=None, up_offset=0 it is Llama's SwiGLU, silu(gate) · up.
    """

    alpha: float = 1.702
    limit: float | None = 7.0
    up_offset: float = 1.0

    def __post_init__(self) -> None:
        if not _real(self.alpha) or self.alpha <= 0:
            raise ValueError(
                f"ClampedSwiGLU: alpha must be a finite number > 0, got {self.alpha!r}"
            )
        if self.limit is not None and (not _real(self.limit) or self.limit <= 0):
            raise ValueError(
                f"ClampedSwiGLU: limit must be a finite number > 0 or None (no clamp), "
                f"got {self.limit!r}"
            )
        if not _real(self.up_offset):
            raise ValueError(
                f"ClampedSwiGLU: up_offset must be a finite number, got {self.up_offset!r}"
            )

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:
        if self.limit is not None:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(-self.limit, self.limit)
        return gate * torch.sigmoid(gate * self.alpha) * (up + self.up_offset)


@dataclass(frozen=True)
class MoEConfig:
    """A sparse MLP's shape: `n_experts` gated MLPs of hidden width `d_expert`, `top_k` of them
    per token, their weights renormalised to sum to 1 (`normalise`: Mixtral always; Qwen's
    `norm_topk_prob`) or left as the softmax gave them; `d_shared` > 0 adds a shared expert of
    that width, gated by sigmoid(linear(x)), that every token goes through (Qwen2-MoE).

    gpt-oss's layer: `order="topk_softmax"` (the softmax over the k chosen logits, see `route`;
    its weights sum to 1, so `normalise` must stay True), `router_bias` (the router an
    nn.Linear with bias), `expert_bias` (gate, up and down with biases) and `glu` (a
    `ClampedSwiGLU` where the experts' gate and up meet; None: act(gate) · up).

    DeepSeek-V3's routing (GLM-4.5, dots.llm1; see `route`): `scoring="sigmoid"` (each
    expert's score sigmoid(logit), not a softmax; order stays "softmax_topk", the scores come
    before the top k), `score_bias` (a learned (e,) bias added to
    the scores for the choice only, `SparseMoE.score_bias`; also with softmax scores: ERNIE 4.5),
    `n_group` / `topk_group` (the experts in n_group equal groups, a token choosing among those
    of its topk_group best groups only), `scale` (the chosen weights × routed_scaling_factor,
    after `normalise`), and `shared_gated=False` (the shared expert added as it is, with no
    sigmoid gate: DeepSeek's n_shared_experts, one MLP of width n_shared · d_expert).

    `norm_min` (ERNIE 4.5's moe_norm_min): `normalise` divides by max(Σ weights, norm_min), not
    by the sum itself; 0 (the default) leaves the sum as it is. Needs normalise=True and order
    "softmax_topk" (topk_softmax's weights always sum to 1).

    `group_score` (with n_group > 1): how a group of experts is ranked, "top2" (the default:
    the sum of its 2 best scores, DeepSeek-V3's noaux_tc) or "max" (its best score alone,
    DeepSeek-V2's group_limited_greedy).

    `router_fp32`: the router's matmul runs in float32 for a float16/bfloat16 model, and
    `qkv.nn.cast` keeps its weight, bias and `score_bias` float32 (transformers' DeepSeek-V2/V3,
    GLM-4.5, dots.llm1, ERNIE 4.5 and Hunyuan gates, `_keep_in_fp32_modules_strict`). False (Mixtral,
    Qwen, gpt-oss): the matmul in the model's dtype, the softmax in float32.
    """

    n_experts: int
    top_k: int
    d_expert: int
    normalise: bool = True
    d_shared: int = 0
    order: str = "softmax_topk"
    router_bias: bool = False
    expert_bias: bool = False
    glu: ClampedSwiGLU | None = None
    scoring: str = "softmax"
    score_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    shared_gated: bool = True
    norm_min: float = 0.0
    group_score: str = "top2"
    router_fp32: bool = False

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
        for f in ("normalise", "router_bias", "expert_bias", "score_bias", "shared_gated",
                  "router_fp32"):  # fmt: skip
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"MoEConfig: {f} must be a bool, got {getattr(self, f)!r}")
        if (
            isinstance(self.d_shared, bool)
            or not isinstance(self.d_shared, int)
            or self.d_shared < 0
        ):
            raise ValueError(f"MoEConfig: d_shared must be an int ≥ 0, got {self.d_shared!r}")
        _check_order(self.order, self.normalise, "MoEConfig: ")
        _check_groups(self, "MoEConfig: ")
        _check_norm_min(self.norm_min, self.normalise, self.order, "MoEConfig: ")
        if not self.shared_gated and not self.d_shared:
            raise ValueError(
                "MoEConfig: shared_gated=False says how a shared expert joins, but there is none "
                "(d_shared=0); give d_shared > 0 or leave shared_gated True"
            )
        if self.glu is not None and not isinstance(self.glu, ClampedSwiGLU):
            raise ValueError(
                f"MoEConfig: glu must be a ClampedSwiGLU or None, got {type(self.glu).__name__}"
            )


def _check_order(order: object, normalise: object, owner: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"{owner}order must be one of {ORDERS}, got {order!r}")
    if order == "topk_softmax" and normalise is not True:
        raise ValueError(
            f"{owner}order='topk_softmax' takes a softmax over the k chosen logits, whose "
            f"weights always sum to 1; normalise must be True, got {normalise!r}"
        )


def _check_norm_min(norm_min: object, normalise: object, order: object, owner: str) -> None:
    if not _real(norm_min) or norm_min < 0:
        raise ValueError(f"{owner}norm_min must be a finite number ≥ 0, got {norm_min!r}")
    if norm_min and (normalise is not True or order != "softmax_topk"):
        raise ValueError(
            f"{owner}norm_min={norm_min!r} bounds the renormalising sum from below; it needs "
            f"normalise=True and order='softmax_topk', got normalise={normalise!r}, "
            f"order={order!r}"
        )


def _check_groups(spec: object, owner: str) -> None:
    """score_bias / n_group / topk_group / scale of `spec` (anything with those attributes, and
    order, n_experts, top_k), checked together."""
    g, tg, e, k = spec.n_group, spec.topk_group, spec.n_experts, spec.top_k
    if spec.group_score not in GROUP_SCORES:
        raise ValueError(
            f"{owner}group_score must be one of {GROUP_SCORES}, got {spec.group_score!r}"
        )
    for name, v in (("n_group", g), ("topk_group", tg)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}{name} must be an int ≥ 1, got {v!r}")
    if e % g:
        raise ValueError(f"{owner}n_group={g} must divide n_experts={e} into equal groups")
    if tg > g:
        raise ValueError(f"{owner}topk_group={tg} exceeds n_group={g}")
    if g == 1 and spec.group_score != "top2":
        raise ValueError(
            f"{owner}group_score={spec.group_score!r} ranks expert groups, but n_group=1 makes "
            "none; give n_group > 1 or leave group_score 'top2'"
        )
    if g > 1 and spec.group_score == "top2" and e // g < 2:
        raise ValueError(
            f"{owner}n_group={g} leaves {e // g} expert per group; a group's score is the sum "
            "of its 2 best experts' scores, so each group needs ≥ 2"
        )
    if g > 1 and k > tg * (e // g):
        raise ValueError(
            f"{owner}top_k={k} exceeds the {tg * (e // g)} experts of topk_group={tg} groups of "
            f"{e // g}"
        )
    if not _real(spec.scale) or spec.scale <= 0:
        raise ValueError(f"{owner}scale must be a finite number > 0, got {spec.scale!r}")
    if spec.scoring not in SCORINGS:
        raise ValueError(f"{owner}scoring must be one of {SCORINGS}, got {spec.scoring!r}")
    if spec.order == "topk_softmax" and (spec.scoring != "softmax" or spec.score_bias or g > 1):
        raise ValueError(
            f"{owner}order='topk_softmax' chooses by the logits themselves; scoring='sigmoid', "
            f"score_bias and n_group > 1 need order 'softmax_topk', got scoring="
            f"{spec.scoring!r}, score_bias={spec.score_bias!r}, n_group={g}"
        )


@dataclass(frozen=True)
class _Routing:  # route's arguments, checked as MoEConfig's are
    order: str
    scoring: str
    n_experts: int
    top_k: int
    score_bias: bool
    n_group: int
    topk_group: int
    scale: float
    group_score: str


def route(
    logits: Tensor,
    top_k: int,
    normalise: bool = True,
    order: str = "softmax_topk",
    *,
    scoring: str = "softmax",
    score_bias: Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scale: float = 1.0,
    norm_min: float = 0.0,
    group_score: str = "top2",
) -> tuple[Tensor, Tensor]:
    """Router logits (n e) → (weights (n k), experts (n k) int64), best first.

    order="softmax_topk" (Mixtral, Qwen, OLMoE):

        p = softmax(logits, -1)                       float32 (float64 for float64 logits)
        weights, experts = torch.topk(p, top_k, -1)   ties as torch.topk resolves them
        weights /= weights.sum(-1, keepdim=True)      if normalise

    The top k of the probabilities, not of the logits: the same order, and the same choice
    between near-equal experts as transformers' routers, which take the top k after the
    softmax. Weights stay float32 for float16/bfloat16 logits (Mixtral multiplies by them so).

    order="topk_softmax" (gpt-oss, GraniteMoE; needs normalise=True):

        top, experts = torch.topk(logits, top_k, -1)  on the logits as given
        weights = softmax(top, -1)                    in the logits' dtype (as gpt-oss)

    Both give exp(l_e) / Σ_chosen exp(l_j) for the same experts, so they differ only by
    rounding: in the weights' last bits, and in which of two experts whose logits differ
    by less than the softmax can resolve is chosen (the softmax may round them to one value).

    scoring="sigmoid", and DeepSeek-V3's choice (`score_bias`, `n_group` > 1; GLM-4.5,
    dots.llm1; ERNIE 4.5's bias with softmax scores), all under order="softmax_topk", as
    transformers' Glm4MoeTopkRouter:

        p = sigmoid(logits)                           float32 (float64 for float64 logits);
                                                      softmax(logits, -1) for scoring="softmax"
        s = p + score_bias                            the choice's scores; p where None
        group = s.view(n, g, e/g).topk(2).values.sum(-1)          (n g)   if n_group g > 1;
                                                      .amax(-1) for group_score="max"
        s[experts outside the topk_group best groups] = -inf
        experts = torch.topk(s, top_k, -1).indices    best first by s
        weights = p.gather(-1, experts)               the unbiased scores
        weights /= weights.sum(-1, keepdim=True) + ε  if normalise (ε = 1e-20 under sigmoid,
                                                      0 under softmax); the divisor clamped to
                                                      ≥ norm_min (ERNIE 4.5) when norm_min > 0
        weights *= scale                              routed_scaling_factor

    The bias moves which experts are chosen, never their weights. `score_bias` (e,) is added
    in p's dtype.

    DeepSeek-V2's group_limited_greedy is scoring="softmax", n_group > 1, group_score="max"
    (transformers' DeepseekV2TopkRouter sets the other groups' scores to 0 rather than -inf:
    the same choice, softmax scores being > 0), normalise=False, scale; its "greedy" is
    n_group=1.
    """
    if logits.dim() != 2 or not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(
            f"route takes logits (n, e) and 1 ≤ top_k ≤ e, got shape {tuple(logits.shape)} "
            f"and top_k={top_k}"
        )
    _check_order(order, normalise, "route: ")
    e = logits.shape[-1]
    if score_bias is not None and (not isinstance(score_bias, Tensor) or score_bias.shape != (e,)):
        raise ValueError(
            f"route: score_bias must be a tensor of shape ({e},), one per expert, got "
            f"{tuple(score_bias.shape) if isinstance(score_bias, Tensor) else score_bias!r}"
        )
    spec = _Routing(order, scoring, e, top_k, score_bias is not None, n_group, topk_group, scale,
                    group_score)  # fmt: skip
    _check_groups(spec, "route: ")
    _check_norm_min(norm_min, normalise, order, "route: ")
    if order == "topk_softmax":
        top, experts = torch.topk(logits, top_k, dim=-1)  # (n k)
        return torch.softmax(top, dim=-1), experts
    wide = logits.dtype if logits.dtype == torch.float64 else torch.float32
    sigmoid = scoring == "sigmoid"
    p = torch.sigmoid(logits.to(wide)) if sigmoid else torch.softmax(logits.to(wide), dim=-1)
    if score_bias is None and n_group == 1:
        weights, experts = torch.topk(p, top_k, dim=-1)  # (n k)
    else:
        s = p if score_bias is None else p + score_bias.to(wide)  # (n e) the choice's scores
        if n_group > 1:
            grouped = s.view(-1, n_group, e // n_group)  # (n g e/g)
            if group_score == "max":
                rank = grouped.amax(-1)  # (n g)
            else:
                rank = grouped.topk(2, dim=-1).values.sum(-1)  # (n g)
            best = torch.topk(rank, topk_group, dim=-1)
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool)  # (n g)
            keep.scatter_(1, best.indices, True)
            s = grouped.masked_fill(~keep[..., None], -math.inf).view(-1, e)
        experts = torch.topk(s, top_k, dim=-1).indices  # (n k)
        weights = p.gather(1, experts)
    if normalise:
        total = weights.sum(-1, keepdim=True) + (1e-20 if sigmoid else 0.0)  # (n 1)
        weights = weights / (total.clamp(min=norm_min) if norm_min else total)
    if scale != 1.0:
        weights = weights * scale
    return weights, experts


class GLUMLP(MLP):
    """A gated MLP whose gate and up meet in `glu`, x (… m) → (… m):

        down(glu(gate(x), up(x)))                     e.g. glu = ClampedSwiGLU() (gpt-oss)

    An `MLP` (gate, up nn.Linear (f, m), down (m, f), with (f,), (f,), (m,) biases when
    `bias`) whose `act` is unused: `glu` takes both halves. `accelerate` leaves it as it is
    (its Linears get their twins).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        glu: Callable[[Tensor, Tensor], Tensor],
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not callable(glu):
            raise TypeError(f"glu must be a callable (gate, up) → hidden, got {type(glu).__name__}")
        super().__init__(d_model, d_hidden, gated=True, bias=bias, device=device, dtype=dtype)
        self.glu, self.act, self.act_name = glu, None, "glu"

    def extra_repr(self) -> str:
        return f"glu={self.glu!r}"

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.glu(self.gate(x), self.up(x)))


class SparseMoE(nn.Module):
    """Sparse mixture of `n_experts` gated MLPs, x (b i m) → (b i m):

        h = x viewed as (n m)                          n = b·i tokens
        logits = router(h)                             (n e), router an nn.Linear (e, m), bias (e,)
                                                       only with router_bias
        w, idx = route(logits, top_k, normalise, order, scoring=scoring,
                       score_bias=score_bias, n_group, topk_group, scale,
                       norm_min, group_score)          (n k) each; `route`
        y[t] = Σ_j w[t, j] · experts[idx[t, j]](h[t])  experts[e](h) = down(act(gate(h)) · up(h)),
                                                       or down(glu(gate(h), up(h))) with glu
        y += sigmoid(shared_gate(h)) · shared(h)       only with a shared expert (d_shared > 0);
                                                       y += shared(h) when not shared_gated

    Equivalent PyTorch (the naive code it equals, one token at a time):

        for t in range(n):
            y[t] = sum(w[t, j] * experts[idx[t, j]](h[t]) for j in range(top_k))

    Each expert runs once, on the tokens routed to it; y sums the experts in index order from
    zero (as transformers' `index_add_`), so float32 results match it to rounding. The product
    w · expert(h) is taken in w's dtype (float32 for half inputs under softmax_topk, the
    input's under topk_softmax) and cast back to x's.
    Weights, as a person inspects them: router.weight (e, m) (and router.bias (e,));
    experts[e] a `qkv.nn.MLP` (gate, up (f, m), down (m, f)), a `GLUMLP` with `glu`, with
    gate.bias, up.bias (f,) and down.bias (m,) under expert_bias; shared an MLP and
    shared_gate (1, m) when present (and gated); score_bias (e,), a buffer, with score_bias
    (zeros until loaded: DeepSeek-V3's `e_score_correction_bias`, set by load balancing, not
    by gradients). With `glu`, `act` must be "silu" (the glu has its own).
    The router's matmul runs in the model's dtype, as Mixtral's, unless `router_fp32` (see
    `MoEConfig`): then in float32, from a router (and score_bias) that `qkv.nn.cast` leaves
    float32 (`keep_float32`).
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
        order: str = "softmax_topk",
        router_bias: bool = False,
        expert_bias: bool = False,
        glu: ClampedSwiGLU | None = None,
        scoring: str = "softmax",
        score_bias: bool = False,
        n_group: int = 1,
        topk_group: int = 1,
        scale: float = 1.0,
        shared_gated: bool = True,
        norm_min: float = 0.0,
        group_score: str = "top2",
        router_fp32: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        spec = MoEConfig(n_experts, top_k, d_expert, normalise, d_shared, order, router_bias,
                         expert_bias, glu, scoring, score_bias, n_group, topk_group, scale,
                         shared_gated, norm_min, group_score, router_fp32)  # fmt: skip
        if glu is not None and act != "silu":
            raise ValueError(
                f"SparseMoE: glu={glu!r} applies its own activation to the gate; act must be "
                f"'silu' (the default) with it, got {act!r}"
            )
        fk = {"device": device, "dtype": dtype}
        self.top_k, self.normalise, self.order = spec.top_k, spec.normalise, spec.order
        self.scoring, self.n_group, self.topk_group = spec.scoring, spec.n_group, spec.topk_group
        self.scale, self.norm_min, self.group_score = spec.scale, spec.norm_min, spec.group_score
        self.router = nn.Linear(d_model, n_experts, bias=router_bias, **fk)

        def expert() -> MLP:
            if glu is not None:
                return GLUMLP(d_model, d_expert, glu, bias=expert_bias, **fk)
            return MLP(d_model, d_expert, act=act, gated=True, bias=expert_bias, **fk)

        self.experts = nn.ModuleList(expert() for _ in range(n_experts))
        self.shared = self.shared_gate = None
        if d_shared:
            self.shared = MLP(d_model, d_shared, act=act, gated=True, bias=False, **fk)
            if shared_gated:
                self.shared_gate = nn.Linear(d_model, 1, bias=False, **fk)
        self.register_buffer("score_bias", torch.zeros(n_experts, **fk) if score_bias else None)
        self.router_fp32 = spec.router_fp32
        # what `qkv.nn.cast` leaves float32 when the model goes to another dtype
        self.keep_float32 = ("router.weight", "router.bias", "score_bias") if router_fp32 else ()

    @classmethod
    def from_config(cls, d_model: int, spec: MoEConfig, act: str = "silu") -> SparseMoE:
        return cls(d_model, spec.d_expert, spec.n_experts, spec.top_k, act=act,
                   normalise=spec.normalise, d_shared=spec.d_shared, order=spec.order,
                   router_bias=spec.router_bias, expert_bias=spec.expert_bias,
                   glu=spec.glu, scoring=spec.scoring, score_bias=spec.score_bias, n_group=spec.n_group,
                   topk_group=spec.topk_group, scale=spec.scale,
                   shared_gated=spec.shared_gated, norm_min=spec.norm_min,
                   group_score=spec.group_score, router_fp32=spec.router_fp32)  # fmt: skip

    def extra_repr(self) -> str:
        out = f"top_k={self.top_k}, normalise={self.normalise}"
        if self.order != "softmax_topk":
            out += f", order={self.order}"
        if self.scoring != "softmax":
            out += f", scoring={self.scoring}"
        if self.n_group > 1:
            out += f", n_group={self.n_group}, topk_group={self.topk_group}"
            if self.group_score != "top2":
                out += f", group_score={self.group_score}"
        if self.norm_min:
            out += f", norm_min={self.norm_min}"
        if self.router_fp32:
            out += ", router_fp32=True"
        return out if self.scale == 1.0 else f"{out}, scale={self.scale}"

    def choose(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens h (n m) → (weights (n k), experts (n k)): the routing `forward` uses (the lens
        reads it for one token, `qkv.lens.experts`)."""
        if self.router_fp32 and h.dtype in (torch.float16, torch.bfloat16):
            r, bias = self.router, self.score_bias
            logits = F.linear(
                h.float(), r.weight.float(), None if r.bias is None else r.bias.float()
            )
            bias = None if bias is None else bias.float()
        else:
            logits, bias = self.router(h), self.score_bias
        return route(logits, self.top_k, self.normalise, self.order,
                     scoring=self.scoring, score_bias=bias, n_group=self.n_group,
                     topk_group=self.topk_group, scale=self.scale,
                     norm_min=self.norm_min, group_score=self.group_score)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        h = x.reshape(-1, x.shape[-1])  # (n m)
        w, idx = self.choose(h)  # (n k), (n k)
        y = torch.zeros_like(h)  # (n m)
        used = torch.bincount(idx.flatten(), minlength=len(self.experts))  # (e,) tokens each
        for e in used.nonzero().flatten().tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)  # tokens routed to e, where in top k
            out = self.experts[e](h[tok]) * w[tok, slot, None]  # (t m)
            y.index_add_(0, tok, out.to(y.dtype))
        if self.shared is not None:
            out = self.shared(h)  # (n m)
            y = y + (out if self.shared_gate is None else torch.sigmoid(self.shared_gate(h)) * out)
        return y.view(x.shape)
