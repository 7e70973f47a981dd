"""One decoder for every causal family (Llama, Mistral, Qwen2, Qwen3, GPT-2, ...), built from
`qkv.nn` blocks; a family is a `DecoderConfig` (read from its checkpoint by `models/hf.py`).

    ids (b i) → embed (× embed_scale, + learned positions, embed_norm) → n_layers × block
              → norm → logits (b i v) (+ lm_head bias, × logit_scale, softcap)
    block: pre          h = x + attn(norm1(x));  out = h + mlp(norm2(h))
           parallel     out = x + attn(norm1(x)) + mlp(norm2(x))
           parallel1    out = x + attn(n) + mlp(n),  n = norm1(x)  (one norm)
           post         h = norm1(x + attn(x));  out = norm2(h + mlp(h))
           sandwich     h = x + post1(attn(norm1(x)));  out = h + post2(mlp(norm2(h)))
           output_norm  h = x + norm1(attn(x));  out = h + norm2(mlp(h))
           (each sublayer's output × residual_scale before it joins the residual)
    attn:  causal GQA; RoPE (whole or partial, half-split or interleaved pairs, its base per
           layer, or off on some layers), ALiBi or none; optional q/k/v(/o) biases, a clamp
           of q, k, v (clip_qkv), QK-norm
           (RMSNorm or LayerNorm; per head, with each head's own gain, or over all heads;
           before RoPE, or after it on each head),
           sliding window; or DeepSeek's multi-head latent attention (`mla`: q, k, v made from
           small latents, RoPE on part of each head, one rotary key shared by the heads)
    mlp:   down(act(gate(x)) · up(x)) (gated) or down(act(up(x))); or, on the layers
           `moe_layers` marks, a sparse mixture of gated experts (`qkv.nn.SparseMoE`)

Letters: b batch, i query position, j key position, m model dim, v vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._validate import positive_ints
from ..attention import alibi, alibi_slopes
from ..nn import (
    ACTIVATIONS,
    MLP,
    Embedding,
    KVCache,
    LatentAttention,
    MLAConfig,
    MoEConfig,
    MultiHeadAttention,
    ParallelBlock,
    PerHeadNorm,
    PostNormBlock,
    PreNormBlock,
    RMSNorm,
    RopeScaling,
    RotaryEmbedding,
    SandwichBlock,
    SparseMoE,
)
from ..nn.blocks import LayerNorm, OutputNormBlock
from ..nn.varlen import one_run_per_row, run_blocks, unpadded
from .generate import Generation
from .tokenizer import Tokenizer, ids_shape

NORMS = ("rms", "layer")
POSITIONS = ("rope", "learned", "alibi")
QK_NORM_SCOPES = ("head", "all", "per_head")
BLOCKS = {"pre": PreNormBlock, "parallel": ParallelBlock, "parallel1": ParallelBlock,
          "post": PostNormBlock, "sandwich": SandwichBlock,
          "output_norm": OutputNormBlock}  # fmt: skip
_NORMS_PER_BLOCK = {"sandwich": 4, "parallel1": 1}


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a pre-norm causal decoder (one source of defaults; validated).

    `windows` holds one entry per layer: None (global attention) or W, the number of keys a
    query sees (itself and the W−1 before it; Mistral's `sliding_window`). `qk_norm` puts an
    RMSNorm(d_head) on each head's q and k before RoPE (Qwen3). `attn_bias` biases q, k, v;
    `out_bias` the output projection (Qwen2: q, k, v only). `rope_dim` rotates only the first
    rope_dim features of each head (None: all; GPT-NeoX, Phi-3). `block` is the residual
    arrangement (see the module docstring: "parallel" GPT-NeoX, "post" OPT-350m); `final_norm`
    False leaves the last hidden state unnormalised (OPT's post-norm). `position_offset`: token
    i reads learned position embedding i + offset (OPT: 2). `norm_offset` 1 makes every norm
    (RMSNorm or LayerNorm: block, final, embedding and QK-norms) scale by 1 + weight (Gemma's
    RMSNorm, Nemotron's LayerNorm1P), and `embed_scale` multiplies the token embeddings (Gemma: √d_model).
    `attn_scale` replaces 1/√d_head in the scores (Gemma 2); `attn_softcap` c caps every score
    at c·tanh(s/c) and `logit_softcap` every logit likewise (Gemma 2). `rope_bases` holds one
    RoPE base per layer (None: `rope_base` on every layer; Gemma 3: 10⁴ on its sliding layers,
    10⁶ on its global ones), `rope_layers` one bool per layer, False for a layer without
    positions (NoPE; SmolLM3; None: every layer rotates). `rope_scaling` (a
    `qkv.nn.RopeScaling`: linear, Llama 3's rule, YaRN, llama.cpp's per-pair factors) slows RoPE's
    frequencies on every layer, `rope_scalings` holds one RopeScaling or None per layer in its
    place (Gemma 3: linear on the global layers only). `positions="alibi"` biases each
    score by −slope_h·|i − j| (`qkv.alibi`, BLOOM) instead of rotating.
    `qk_norm_scope` "all" normalises the whole q and k projections, (h·d) and (k·d) features,
    not each head (OLMo 2). `residual_scale` multiplies each sublayer's output before the
    residual sum, `logit_scale` the logits (Granite: residual_multiplier, 1/logits_scaling).
    `embed_norm` puts a norm on the embeddings (BLOOM's word_embeddings_layernorm);
    `lm_head_bias` gives the untied unembedding a bias (Phi-2).
    `rope_interleaved` rotates pairs (x[2p], x[2p+1]) of the rotated features instead of
    (x[p], x[p + r/2]) (GPT-J, Cohere; `qkv.nn.RotaryEmbedding`'s `interleaved`).
    `norm_bias` False drops the bias of every LayerNorm (`norm="layer"` only: Cohere's
    LayerNorm is (x − mean)/√(var + eps) · w, no + b). `norm_affine` False drops weight and
    bias both (`norm="layer"` only: OLMo's LayerNorm is (x − mean)/√(var + eps), nothing
    learned, on every LayerNorm the decoder builds: block, final, embed_norm). `clip_qkv` c
    clamps every q, k and v feature to [−c, c] after the projections (and their biases),
    before QK-norm and RoPE (OLMo's clip_qkv; `qkv.nn.MultiHeadAttention`'s `clip`); None:
    no clamp.
    `qk_norm_kind` is the QK-norm's formula: "rms" (RMSNorm, its gain offset by `norm_offset`)
    or "layer" (LayerNorm without bias, mean subtracted; Cohere, StableLM). `qk_norm_scope`
    "per_head" normalises each head's d features as "head" does, but each head has its own
    gain, weights (h d) and (k d) (`qkv.nn.PerHeadNorm`; Cohere, StableLM), where "head"
    shares one gain (d) among the heads. `qk_norm_after_rope` applies the QK-norm to each head's
    q and k after RoPE, not before (Hunyuan; "head" or "per_head" scope). `moe` (a `qkv.nn.MoEConfig`)
    makes the MLP of each layer `moe_layers` marks True (None: every layer) a
    `qkv.nn.SparseMoE` of gated experts (Mixtral, Qwen3-MoE); the other layers keep the dense
    d_ff MLP. `attn_sinks` gives every attention layer a learned sink logit per query head
    (`qkv.nn.MultiHeadAttention`'s `sinks`; gpt-oss). `mla` (a `qkv.nn.MLAConfig`) makes every
    attention layer DeepSeek's multi-head latent attention (`qkv.nn.LatentAttention`): d_head
    is then qk_nope_head_dim + qk_rope_head_dim, RoPE (its base, scaling and
    `rope_interleaved`) turns the last qk_rope_head_dim features of each head, `attn_bias`
    biases the latent projections, `out_bias` the output; every query head has its own k and v
    (n_kv_heads = n_heads), and the per-head options of MultiHeadAttention (QK-norm, clip,
    windows, softcap, sinks, partial rope_dim, ALiBi) are refused with it. `eos_id` ends
    generation, and so does every id in `stop_ids` (a checkpoint with several end tokens:
    Llama 3.1 Instruct's <|eom_id|> and <|eot_id|> beside <|end_of_text|>; `end_ids` has them
    all)."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_ff: int
    vocab_size: int
    max_positions: int
    norm: str = "rms"
    norm_eps: float = 1e-6
    act: str = "silu"
    gated: bool = True
    positions: str = "rope"
    rope_base: float = 10000.0
    rope_dim: int | None = None
    rope_bases: tuple[float, ...] | None = None
    rope_layers: tuple[bool, ...] | None = None
    rope_scaling: RopeScaling | None = None
    rope_scalings: tuple[RopeScaling | None, ...] | None = None
    block: str = "pre"
    final_norm: bool = True
    position_offset: int = 0
    norm_offset: float = 0.0
    embed_scale: float = 1.0
    embed_norm: bool = False
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    lm_head_bias: bool = False
    attn_scale: float | None = None
    attn_softcap: float | None = None
    logit_softcap: float | None = None
    attn_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    qk_norm_scope: str = "head"
    qk_norm_kind: str = "rms"
    qk_norm_after_rope: bool = False
    rope_interleaved: bool = False
    norm_bias: bool = True
    norm_affine: bool = True
    clip_qkv: float | None = None
    attn_sinks: bool = False
    windows: tuple[int | None, ...] | None = None
    tie_embeddings: bool = True
    moe: MoEConfig | None = None
    moe_layers: tuple[bool, ...] | None = None
    mla: MLAConfig | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    stop_ids: tuple[int, ...] = ()
    causal: bool = True

    def __post_init__(self) -> None:
        own = "DecoderConfig"
        positive_ints(own, self, ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_head",
                                  "d_ff", "vocab_size", "max_positions"))  # fmt: skip
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"{own}: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (GQA)"
            )
        if self.norm not in NORMS or self.positions not in POSITIONS:
            raise ValueError(
                f"{own}: norm must be one of {NORMS} and positions one of {POSITIONS}, "
                f"got {self.norm!r}, {self.positions!r}"
            )
        if self.act not in ACTIVATIONS:
            raise ValueError(f"{own}: act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        rotated = self.d_head if self.mla is None else self.mla.qk_rope_head_dim
        if self.positions == "rope" and (rotated % 2 or not self.rope_base > 1):
            raise ValueError(
                f"{own}: RoPE needs an even d_head and rope_base > 1, got {rotated}, {self.rope_base}"
            )
        if self.rope_bases is not None and (
            len(self.rope_bases) != self.n_layers
            or any(not isinstance(b, int | float) or not b > 1 for b in self.rope_bases)
        ):
            raise ValueError(
                f"{own}: rope_bases must hold one number > 1 per layer ({self.n_layers}), "
                f"got {self.rope_bases!r}"
            )
        if self.rope_dim is not None and not (
            0 < self.rope_dim <= self.d_head and self.rope_dim % 2 == 0
        ):
            raise ValueError(
                f"{own}: rope_dim must be an even int in (0, d_head={self.d_head}], got {self.rope_dim}"
            )
        if self.rope_layers is not None and (
            len(self.rope_layers) != self.n_layers
            or any(not isinstance(r, bool) for r in self.rope_layers)
        ):
            raise ValueError(
                f"{own}: rope_layers must hold one bool per layer ({self.n_layers}), "
                f"got {self.rope_layers!r}"
            )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(
                f"{own}: rope_scaling must be a qkv.nn.RopeScaling or None, "
                f"got {type(self.rope_scaling).__name__}"
            )
        if self.rope_scalings is not None and (
            len(self.rope_scalings) != self.n_layers
            or any(s is not None and not isinstance(s, RopeScaling) for s in self.rope_scalings)
        ):
            raise ValueError(
                f"{own}: rope_scalings must hold one qkv.nn.RopeScaling or None per layer "
                f"({self.n_layers}), got {self.rope_scalings!r}"
            )
        pairs = (self.rope_dim or rotated) // 2
        for s in (self.rope_scaling, *(self.rope_scalings or ())):
            for name in ("factors", "short_factors", "long_factors"):
                fs = None if s is None else getattr(s, name)
                if fs is not None and len(fs) != pairs:
                    what = "freq_factors" if name == "factors" else name
                    raise ValueError(
                        f"{own}: rope scaling has {len(fs)} {what} for the {pairs} rotated "
                        f"pairs of each head (rope_dim or d_head={self.d_head}, halved)"
                    )
        if self.qk_norm_scope not in QK_NORM_SCOPES:
            raise ValueError(
                f"{own}: qk_norm_scope must be one of {QK_NORM_SCOPES}, got {self.qk_norm_scope!r}"
            )
        if self.qk_norm_kind not in NORMS:
            raise ValueError(
                f"{own}: qk_norm_kind must be one of {NORMS}, got {self.qk_norm_kind!r}"
            )
        for f in ("rope_interleaved", "norm_bias", "norm_affine", "attn_sinks",
                  "qk_norm_after_rope"):  # fmt: skip
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{own}: {f} must be a bool, got {getattr(self, f)!r}")
        if not self.norm_bias and self.norm != "layer":
            raise ValueError(
                f"{own}: norm_bias=False drops LayerNorm's bias; it needs norm='layer', "
                f"got norm={self.norm!r} (RMSNorm has no bias)"
            )
        if not self.norm_affine and self.norm != "layer":
            raise ValueError(
                f"{own}: norm_affine=False (LayerNorm without weight or bias) needs "
                f"norm='layer', got norm={self.norm!r}"
            )
        if self.norm_offset and not self.norm_affine:
            raise ValueError(
                f"{own}: norm_offset={self.norm_offset} offsets the norms' gain; it needs "
                f"norm_affine=True (norm_affine=False has no gain)"
            )
        if self.qk_norm_after_rope and (not self.qk_norm or self.qk_norm_scope == "all"):
            raise ValueError(
                f"{own}: qk_norm_after_rope normalises each head's rotated q and k; it needs "
                f"qk_norm=True and qk_norm_scope 'head' or 'per_head', got qk_norm="
                f"{self.qk_norm}, qk_norm_scope={self.qk_norm_scope!r}"
            )
        if self.clip_qkv is not None and not (
            isinstance(self.clip_qkv, int | float)
            and not isinstance(self.clip_qkv, bool)
            and 0 < self.clip_qkv < float("inf")
        ):
            raise ValueError(
                f"{own}: clip_qkv must be None or a finite number > 0, got {self.clip_qkv!r}"
            )
        if self.lm_head_bias and self.tie_embeddings:
            raise ValueError(f"{own}: lm_head_bias needs an untied lm_head (tie_embeddings=False)")
        if self.block not in BLOCKS:
            raise ValueError(f"{own}: block must be one of {sorted(BLOCKS)}, got {self.block!r}")
        for f in ("embed_scale", "residual_scale", "logit_scale"):
            v = getattr(self, f)
            if not (isinstance(v, int | float) and v > 0):
                raise ValueError(f"{own}: {f} must be a number > 0, got {v!r}")
        for f in ("attn_scale", "attn_softcap", "logit_softcap"):
            v = getattr(self, f)
            if v is not None and not v > 0:
                raise ValueError(f"{own}: {f} must be None or > 0, got {v}")
        if self.position_offset < 0:
            raise ValueError(f"{own}: position_offset must be ≥ 0, got {self.position_offset}")
        if not self.norm_eps > 0:
            raise ValueError(f"{own}: norm_eps must be > 0, got {self.norm_eps}")
        if self.windows is not None and (
            len(self.windows) != self.n_layers
            or any(w is not None and (not isinstance(w, int) or w <= 0) for w in self.windows)
        ):
            raise ValueError(
                f"{own}: windows must hold one positive int or None per layer ({self.n_layers}), "
                f"got {self.windows!r}"
            )
        if not self.causal:
            raise ValueError(f"{own}: a decoder is causal; causal must be True")
        self._check_moe(own)
        self._check_mla(own)
        for f in ("bos_id", "eos_id"):
            v = getattr(self, f)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(f"{own}.{f}={v} is outside the vocabulary [0, {self.vocab_size})")
        if not isinstance(self.stop_ids, tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < self.vocab_size
            for v in self.stop_ids
        ):
            raise ValueError(
                f"{own}.stop_ids must be a tuple of token ids in [0, {self.vocab_size}), "
                f"got {self.stop_ids!r}"
            )

    @property
    def end_ids(self) -> frozenset[int]:
        """Every id that ends generation: eos_id and stop_ids."""
        return frozenset(self.stop_ids) | ({self.eos_id} if self.eos_id is not None else set())

    def _check_moe(self, own: str) -> None:
        if self.moe is None:
            if self.moe_layers is not None:
                raise ValueError(f"{own}: moe_layers needs moe (a qkv.nn.MoEConfig), got None")
            return
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(
                f"{own}: moe must be a qkv.nn.MoEConfig or None, got {type(self.moe).__name__}"
            )
        if not self.gated or self.mlp_bias:
            raise ValueError(
                f"{own}: moe experts are gated MLPs without biases; got gated={self.gated}, "
                f"mlp_bias={self.mlp_bias}"
            )
        if self.moe_layers is not None and (
            len(self.moe_layers) != self.n_layers
            or any(not isinstance(f, bool) for f in self.moe_layers)
        ):
            raise ValueError(
                f"{own}: moe_layers must hold one bool per layer ({self.n_layers}), "
                f"got {self.moe_layers!r}"
            )

    def _check_mla(self, own: str) -> None:
        if self.mla is None:
            return
        if not isinstance(self.mla, MLAConfig):
            raise ValueError(
                f"{own}: mla must be a qkv.nn.MLAConfig or None, got {type(self.mla).__name__}"
            )
        if self.d_head != self.mla.qk_head_dim or self.n_kv_heads != self.n_heads:
            raise ValueError(
                f"{own}: with mla, d_head must be qk_nope_head_dim + qk_rope_head_dim = "
                f"{self.mla.qk_head_dim} and n_kv_heads = n_heads = {self.n_heads}, got "
                f"d_head={self.d_head}, n_kv_heads={self.n_kv_heads}"
            )
        given = {"positions": self.positions != "rope", "rope_dim": self.rope_dim is not None,
                 "qk_norm": self.qk_norm, "clip_qkv": self.clip_qkv is not None,
                 "windows": self.windows is not None, "attn_softcap": self.attn_softcap is not None,
                 "attn_sinks": self.attn_sinks}  # fmt: skip
        if bad := [f for f, on in given.items() if on]:
            raise ValueError(
                f"{own}: multi-head latent attention (mla) does not take {', '.join(bad)}; "
                f"got {', '.join(f'{f}={getattr(self, f)!r}' for f in bad)}"
            )

    @property
    def mla_q(self) -> str:
        """How multi-head latent attention makes q, which says which tensors a checkpoint
        holds: "direct" (W_Q from x), "latent" (through q_down and a norm), "latent_bias"
        (q_down biased too); "none" without mla."""
        if self.mla is None:
            return "none"
        if self.mla.q_lora_rank is None:
            return "direct"
        return "latent_bias" if self.attn_bias else "latent"

    @property
    def shared_expert(self) -> bool:
        """Whether the sparse layers have a shared expert (`moe.d_shared` > 0): a `W.when`
        for its tensors."""
        return self.moe is not None and self.moe.d_shared > 0

    def sparse_layers(self) -> tuple[bool, ...]:
        """One bool per layer: True where the MLP is a SparseMoE."""
        if self.moe is None:
            return (False,) * self.n_layers
        return self.moe_layers or (True,) * self.n_layers


class Decoder(Generation, nn.Module):
    """Causal decoder. `model(ids (b i), *, attention_mask=None, cache=None)` → logits (b i v).

    `cache` (a `qkv.nn.KVCache`) makes a call continue where the cached tokens end: positions
    start at `cache.length`, and the outputs equal one uncached call on the concatenated ids.
    `attention_mask` (b, j) bool, True = real token, covers every key (cached ones included);
    padded keys are never attended to (positions still count them: pad on the right).
    Generation (`generate`, `generate_ids`) comes from `models.generate.Generation`.
    """

    def __init__(
        self,
        config: DecoderConfig,
        tokenizer: Tokenizer | None = None,
        chat_template: str | None = None,
    ) -> None:
        super().__init__()
        c = self.config = config
        self.tokenizer, self.chat_template = tokenizer, chat_template
        # one RotaryEmbedding per distinct (base, scaling), shared by the layers that use it
        bases = c.rope_bases or (c.rope_base,) * c.n_layers
        scalings = c.rope_scalings or (c.rope_scaling,) * c.n_layers
        ropes: dict[tuple, RotaryEmbedding | None] = {
            (b, s): RotaryEmbedding(
                c.d_head if c.mla is None else c.mla.qk_rope_head_dim,
                base=b,
                interleaved=c.rope_interleaved,
                rotary_dim=c.rope_dim,
                scaling=s,
            )
            if c.positions == "rope"
            else None
            for b, s in dict.fromkeys(zip(bases, scalings, strict=True))
        }
        # left uninitialised (`_weight`): every weight comes from the checkpoint
        self.embed = Embedding(
            c.vocab_size, c.d_model, _weight=torch.empty(c.vocab_size, c.d_model)
        )
        self.embed_positions = None
        if c.positions == "learned":
            self.embed_positions = nn.Embedding(c.max_positions + c.position_offset, c.d_model)
        self.embed_norm = self._norm(c) if c.embed_norm else None
        windows = c.windows or (None,) * c.n_layers
        rotates = c.rope_layers or (True,) * c.n_layers
        # ALiBi: one score_mod shared by every layer; its slopes (h,) are values, not weights,
        # made on the CPU even under a meta-device build (the mod moves them where scores are)
        score_mod = None
        if c.positions == "alibi":
            with torch.device("cpu"):
                score_mod = alibi(alibi_slopes(c.n_heads))
        block = BLOCKS[c.block]
        self.blocks = nn.ModuleList(
            block(
                LatentAttention(c.d_model, c.n_heads, c.mla, rope=ropes[b, s] if r else None,
                                bias=c.attn_bias, out_bias=c.out_bias, scale=c.attn_scale)
                if c.mla is not None else
                MultiHeadAttention(
                    c.d_model, c.n_heads, c.n_kv_heads, c.d_head, bias=c.attn_bias,
                    rope=ropes[b, s] if r else None, causal=True, out_bias=c.out_bias,
                    window=None if w is None else (w - 1, 0), scale=c.attn_scale,
                    softcap=c.attn_softcap, score_mod=score_mod, clip=c.clip_qkv,
                    qk_norm_scope="all" if c.qk_norm_scope == "all" else "head",
                    qk_norm_after_rope=c.qk_norm_after_rope,
                    q_norm=self._qk_norm(c, c.n_heads), k_norm=self._qk_norm(c, c.n_kv_heads),
                    sinks=c.attn_sinks,
                ),
                SparseMoE.from_config(c.d_model, c.moe, c.act) if sparse
                else MLP(c.d_model, c.d_ff, act=c.act, gated=c.gated, bias=c.mlp_bias),
                *(self._norm(c) for _ in range(_NORMS_PER_BLOCK.get(c.block, 2))),
                *((None,) if c.block == "parallel1" else ()),  # norm2: mlp reads norm1(x) too
                residual_scale=c.residual_scale,
            )
            for w, b, s, r, sparse in zip(windows, bases, scalings, rotates, c.sparse_layers(),
                                          strict=True)
        )  # fmt: skip
        self.norm = self._norm(c) if c.final_norm else nn.Identity()
        self.lm_head = None
        if not c.tie_embeddings:
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=c.lm_head_bias)

    @staticmethod
    def _norm(c: DecoderConfig) -> nn.Module:
        if c.norm == "rms":
            return RMSNorm(c.d_model, c.norm_eps, offset=c.norm_offset)
        return Decoder._layer_norm(c, c.d_model, elementwise_affine=c.norm_affine, bias=c.norm_bias)

    @staticmethod
    def _layer_norm(c: DecoderConfig, n: int, **kw) -> nn.Module:
        """nn.LayerNorm(n), or qkv's with the gain offset by `norm_offset` (Nemotron)."""
        if c.norm_offset:
            return LayerNorm(n, c.norm_eps, offset=c.norm_offset, **kw)
        return nn.LayerNorm(n, c.norm_eps, **kw)

    @staticmethod
    def _qk_norm(c: DecoderConfig, heads: int) -> nn.Module | None:
        """QK-norm of q (heads = h) or k (heads = k): over each head's d features with one
        gain ("head") or each head's own ("per_head"), or over all (heads·d) ("all")."""
        if not c.qk_norm:
            return None
        rms = c.qk_norm_kind == "rms"
        if c.qk_norm_scope == "per_head":
            return PerHeadNorm(heads, c.d_head, c.norm_eps, center=not rms, offset=c.norm_offset)
        n = c.d_head if c.qk_norm_scope == "head" else heads * c.d_head
        if rms:
            return RMSNorm(n, c.norm_eps, offset=c.norm_offset)
        return Decoder._layer_norm(c, n, bias=False)

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, tie_embeddings={self.config.tie_embeddings}"

    def unembed(self, h: Tensor) -> Tensor:
        """Final hidden states (… m) → logits (… v), × `logit_scale`, then capped at
        c·tanh(logit/c) if `logit_softcap` is c."""
        logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
        if self.config.logit_scale != 1.0:
            logits = logits * self.config.logit_scale
        c = self.config.logit_softcap
        if c is None:
            return logits
        wide = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        return (c * torch.tanh(logits.to(wide) / c)).to(logits.dtype)  # half: rounded once

    def hidden(
        self, ids: Tensor, *, attention_mask: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """The final-norm hidden states (b i m) that `forward` unembeds."""
        return self._run(ids, attention_mask, cache, self.norm)

    def forward(
        self, ids: Tensor, *, attention_mask: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        return self._run(ids, attention_mask, cache, lambda h: self.unembed(self.norm(h)))

    def _run(
        self, ids: Tensor, attention_mask: Tensor | None, cache: KVCache | None, head: Callable
    ) -> Tensor:
        """Embed, the blocks, then `head`. A left- or right-padded batch without a cache of a
        RoPE model runs on its real tokens only (`qkv.nn.varlen`): its padded rows are 0, and
        `capture` records each text apart (`AttentionRecord.segment`). RoPE positions then restart per text, which attention cannot
        see (it depends only on offsets); a mask with holes would change offsets, so it keeps
        the masked batch, as do learned absolute positions."""
        _, S, past = self._check(ids, attention_mask, cache)
        x = self.embed(ids)  # (b i m)
        c = self.config
        if c.embed_scale != 1.0:
            x = x * c.embed_scale
        if self.embed_positions is not None:
            start = past + c.position_offset
            x = x + self.embed_positions(torch.arange(start, start + S, device=ids.device))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        padded = attention_mask is not None and not bool(attention_mask.all())
        packable = self.embed_positions is None and cache is None
        if padded and packable and one_run_per_row(attention_mask):
            run = lambda h, segments: head(run_blocks(self.blocks, h, segments))  # noqa: E731
            return unpadded(x, attention_mask, run)
        mask = None if attention_mask is None else attention_mask[:, None, None, :]  # (b 1 1 j)
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, cache=None if cache is None else cache[i])
        return head(x)

    def _check(self, ids: object, attention_mask: object, cache: object) -> tuple[int, int, int]:
        c = self.config
        B, S = ids_shape(ids)
        if S == 0 or B == 0:
            raise ValueError(f"ids is empty (shape {tuple(ids.shape)}): pass at least one token")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {c.vocab_size}), got values in [{lo}, {hi}]"
            )
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a qkv.nn.KVCache or None, got {type(cache).__name__}")
        if cache is not None and len(cache) != c.n_layers:
            raise ValueError(f"cache has {len(cache)} layers but {c.name} has {c.n_layers}")
        past = 0 if cache is None else cache.length
        if past + S > c.max_positions:
            raise ValueError(
                f"{past + S} positions ({past} cached + {S} new) exceed {c.name}'s context of "
                f"{c.max_positions} tokens; shorten the input (or use truncate=True in generate)"
            )
        if attention_mask is not None:
            want = (B, past + S)
            if (
                not isinstance(attention_mask, Tensor)
                or attention_mask.dtype != torch.bool
                or tuple(attention_mask.shape) != want
            ):
                got = (
                    f"{tuple(attention_mask.shape)} {attention_mask.dtype}"
                    if isinstance(attention_mask, Tensor)
                    else type(attention_mask).__name__
                )
                raise ValueError(
                    f"attention_mask must be a (B, cached + S) = {want} bool tensor, got {got}"
                )
        return B, S, past
