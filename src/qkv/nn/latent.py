"""LatentAttention: DeepSeek's multi-head latent attention (MLA; DeepSeek-V2, V3, R1, Kimi K2),
computed per head in the open and handed to `qkv.attention` like any other attention.

MLA squeezes each token into small latents: the keys and values of every head are made from one
shared vector c_kv (kv_lora_rank features), the queries from c_q (q_lora_rank) or straight from x.
Only part of each head's q and k is rotated, by RoPE, and that part of k is one vector shared
by all heads (DeepSeek-V2 §2.1; the "decoupled" rotary key):

    c_q  = RMSNorm(x W_DQ + b_DQ)                 (b i c_q)    (x itself without q_lora_rank)
    q    = c_q W_Q                                (b h i n+r)  = [q_nope | q_pe]
    [c_kv | k_pe] = x W_DKV + b_DKV               (b i c_kv), (b i r): the one shared rotary key
    k    = [RMSNorm(c_kv) W_UK | k_pe]            (b h i n+r), k_pe broadcast to every head
    v    = RMSNorm(c_kv) W_UV                     (b h i e)
    q_pe, k_pe rotated at their positions; z = qkv.attention(q, k, v, causal=True, scale=scale)

Weights are kept per head, as a person inspects them; nothing is absorbed into anything (the
inference trick that scores against c_kv directly equals this, up to rounding). The KV cache
holds the per-head k and v, as MultiHeadAttention's does (more memory than caching c_kv and
k_pe, the same outputs).

Letters: b batch, h head, i query position, j key position, m model dim, c latent dim,
n non-rotated (nope) head dim, r rotated head dim, d = n + r the q/k head dim, e value head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import MultiHeadAttention, _check_int
from .blocks import RMSNorm
from .rope import RotaryEmbedding


@dataclass(frozen=True)
class MLAConfig:
    """The shape of multi-head latent attention, in transformers' DeepSeek names:
    `q_lora_rank` c_q (None: q projected from x directly, DeepSeek-V2-Lite), `kv_lora_rank`
    c_kv, `qk_nope_head_dim` n and `qk_rope_head_dim` r (each head's q and k have n + r
    features, the last r rotated), `v_head_dim` e; `norm_eps` the latents' RMSNorm epsilon
    (1e-6 in DeepSeek's code and transformers', whatever the model's rms_norm_eps)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for f in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"MLAConfig: {f} must be a positive int, got {v!r}")
        q = self.q_lora_rank
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q <= 0):
            raise ValueError(f"MLAConfig: q_lora_rank must be a positive int or None, got {q!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"MLAConfig: qk_rope_head_dim must be even (RoPE turns pairs), "
                f"got {self.qk_rope_head_dim}"
            )
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < math.inf:
            raise ValueError(f"MLAConfig: norm_eps must be a finite number > 0, got {eps!r}")

    @property
    def qk_head_dim(self) -> int:
        """d = n + r, the features of each head's q and k."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class LatentAttention(MultiHeadAttention):
    """Multi-head latent attention (see the module docstring for the formula).

    Parameters: with `q_lora_rank`: `q_down` (nn.Linear m → c_q, biased if `bias`) and
    `q_latent_norm` (RMSNorm(c_q)); W_Q (h c d) with c = c_q, else c = m; `kv_down`
    (nn.Linear m → c_kv + r, biased if `bias`: the checkpoints' kv_a_proj_with_mqa, latent then
    shared rotary key), `kv_latent_norm` (RMSNorm(c_kv)); W_UK (h c_kv n), W_UV (h c_kv e);
    W_O (h e m) and b_O (m) if `out_bias` (default: `bias`). `rope` (a RotaryEmbedding of
    d_head = r; None: nothing rotates) turns q_pe and k_pe at their absolute positions;
    `scale` replaces 1/√(n + r).

    forward(x (b i m), *, mask=None, cache=None, segments=None) → (b i m), as
    MultiHeadAttention's: `mask` bool keep or float bias broadcastable to (b, h, i, j), causal
    bottom-right, `cache` a LayerCache holding the per-head k (b h j d) and v (b h j e),
    `segments` packed whole sequences attending within themselves. Equivalent code::

        c = q_latent_norm(q_down(x)) if q_lora_rank else x                  # (b i c)
        q = einsum("bic,hcd->bhid", c, W_Q)                                  # (b h i d)
        c_kv, k_pe = kv_down(x).split((c_kv, r), -1)                         # (b i c_kv), (b i r)
        c_kv = kv_latent_norm(c_kv)
        k = cat(einsum("bic,hcn->bhin", c_kv, W_UK), k_pe[:, None].expand(b, h, i, r), -1)
        v = einsum("bic,hce->bhie", c_kv, W_UV)
        q[..., n:], k[..., n:] = rope(q[..., n:], pos), rope(k[..., n:], pos)
        z = qkv.attention(q, k, v, causal=True, mask=mask, scale=scale)      # (b h i e)
        out = einsum("bhie,hem->bim", z, W_O) + b_O

    Under `qkv.nn.capture` it records q, k (after RoPE), v, z, W_O and the LSE exactly as
    MultiHeadAttention does (one kv head per query head), so the lens reads it unchanged.
    It is a MultiHeadAttention for that reason only: it has no W_K, W_V, QK-norm, window,
    softcap or sinks, and `qkv.distributed.shard` does not run it.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        mla: MLAConfig,
        *,
        rope: RotaryEmbedding | None = None,
        bias: bool = False,
        out_bias: bool | None = None,
        scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not MultiHeadAttention's: none of its projections exist here
        d_model = _check_int("d_model", d_model)
        n_heads = _check_int("n_heads", n_heads)
        if not isinstance(mla, MLAConfig):
            raise TypeError(f"mla must be a qkv.nn.MLAConfig, got {type(mla).__name__}")
        if rope is not None and not isinstance(rope, RotaryEmbedding):
            raise TypeError(
                f"rope must be a qkv.nn.RotaryEmbedding or None, got {type(rope).__name__}"
            )
        if rope is not None and rope.d_head != mla.qk_rope_head_dim:
            raise ValueError(
                f"rope.d_head={rope.d_head} must equal mla.qk_rope_head_dim="
                f"{mla.qk_rope_head_dim} (only that part of each head rotates)"
            )
        if scale is not None and not (
            isinstance(scale, int | float) and not isinstance(scale, bool) and 0 < scale < math.inf
        ):
            raise ValueError(f"scale must be None or a finite number > 0, got {scale!r}")
        H, D, E = n_heads, mla.qk_head_dim, mla.v_head_dim
        self.mla = mla
        self.d_model, self.n_heads, self.n_kv_heads, self.d_head = d_model, H, H, D
        self.d_value = E
        self.causal = True
        self.rope = rope
        self.scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        # what MultiHeadAttention's readers (the lens' summary) look for: none of it here
        self.window = self.softcap = self.score_mod = self.clip = None
        self.q_norm = self.k_norm = None
        self.qk_norm_scope, self.qk_norm_after_rope = "head", False
        self.register_parameter("sinks", None)
        fk = {"device": device, "dtype": dtype}
        cq = mla.q_lora_rank
        if cq is None:
            self.q_down = self.q_latent_norm = None
        else:
            self.q_down = nn.Linear(d_model, cq, bias=bias, **fk)
            self.q_latent_norm = RMSNorm(cq, mla.norm_eps, **fk)
        ckv, r = mla.kv_lora_rank, mla.qk_rope_head_dim
        self.W_Q = nn.Parameter(torch.empty(H, d_model if cq is None else cq, D, **fk))
        self.kv_down = nn.Linear(d_model, ckv + r, bias=bias, **fk)
        self.kv_latent_norm = RMSNorm(ckv, mla.norm_eps, **fk)
        self.W_UK = nn.Parameter(torch.empty(H, ckv, mla.qk_nope_head_dim, **fk))
        self.W_UV = nn.Parameter(torch.empty(H, ckv, E, **fk))
        self.W_O = nn.Parameter(torch.empty(H, E, d_model, **fk))
        if bias if out_bias is None else out_bias:
            self.b_O = nn.Parameter(torch.zeros(d_model, **fk))
        else:
            self.register_parameter("b_O", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init (U(±1/√fan_in)) for the per-head projections, b_O 0; the
        nn.Linear and RMSNorm submodules initialise themselves."""
        for w in (self.W_Q, self.W_UK, self.W_UV, self.W_O):
            fan_in = w.shape[0] * w.shape[1] if w is self.W_O else w.shape[1]
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        if self.b_O is not None:
            nn.init.zeros_(self.b_O)

    def extra_repr(self) -> str:
        m = self.mla
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, q_lora_rank={m.q_lora_rank}, "
            f"kv_lora_rank={m.kv_lora_rank}, qk_nope_head_dim={m.qk_nope_head_dim}, "
            f"qk_rope_head_dim={m.qk_rope_head_dim}, v_head_dim={m.v_head_dim}, "
            f"bias={self.kv_down.bias is not None}, out_bias={self.b_O is not None}"
        )

    def fused_qkv(self) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError(self._not_fused("fused_qkv"))

    def _project(self, x: Tensor) -> Tensor:
        raise NotImplementedError(self._not_fused("_project"))

    @staticmethod
    def _not_fused(what: str) -> str:
        return (
            f"LatentAttention (MLA) has no fused W_Q|W_K|W_V for {what}: its k and v come from "
            "a shared latent (qkv.distributed.shard does not run it; run the model unsharded)"
        )

    def out_weight(self) -> Tensor:
        """W_O (h e m) as one nn.Linear-layout weight (m, (h e)), a view."""
        return self.W_O.reshape(self.n_heads * self.d_value, self.d_model).t()

    def _tokens(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (b i m) → q_nope (b h i n), q_pe (b h i r), k_nope (b h i n), k_pe (b 1 i r),
        v (b h i e), nothing rotated yet: everything MLA computes per token."""
        n = self.mla.qk_nope_head_dim
        c = x if self.q_down is None else self.q_latent_norm(self.q_down(x))  # (b i c)
        q = torch.einsum("bic,hcd->bhid", c, self.W_Q)  # (b h i d)
        c_kv, k_pe = self.kv_down(x).split((self.mla.kv_lora_rank, self.mla.qk_rope_head_dim), -1)
        c_kv = self.kv_latent_norm(c_kv)  # (b i c_kv)
        k_nope = torch.einsum("bic,hcn->bhin", c_kv, self.W_UK)  # (b h i n)
        v = torch.einsum("bic,hce->bhie", c_kv, self.W_UV)  # (b h i e)
        return (*q.split((n, q.shape[-1] - n), -1), k_nope, k_pe[:, None], v)

    def _positioned(
        self, parts: tuple[Tensor, Tensor, Tensor, Tensor, Tensor], start: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The per-token parts (`_tokens`) → q (b h i d), k (b h i d), v (b h i e), q_pe and
        the shared k_pe rotated at positions start … start+i−1."""
        q_nope, q_pe, k_nope, k_pe, v = parts
        if self.rope is not None:
            q_pe, k_pe = self.rope(q_pe, start), self.rope(k_pe, start)
        q = torch.cat((q_nope, q_pe), -1)
        k = torch.cat((k_nope, k_pe.expand(-1, k_nope.shape[1], -1, -1)), -1)
        return q, k, v

    def _span(self, parts: tuple[Tensor, ...], a: int, b: int) -> tuple[Tensor, ...]:
        """The per-token parts of positions a … b−1 (each (b h i …): positions on dim 2)."""
        return tuple(p[:, :, a:b] for p in parts)
