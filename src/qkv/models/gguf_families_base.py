"""What every GGUF family is made of (`gguf_families.py` describes the architectures):
`GGUFFamily`, the tensor reshapes its weight rules name (`RESHAPES`), and the pieces several
families share: the Llama tensor layout, the core metadata fields, the RoPE-scaling refusals.
`gguf_families.py`, `gguf_families_more.py` and `gguf_families_extra.py` build on this module.

Letters: h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from . import gguf
from .convert import Reshape, heads_bias, heads_in, heads_out
from .families import W
from .families_base import RESHAPES as HF_RESHAPES


def _qkv_bias(part: int, n_heads: Callable[[Any], int]) -> Callable[[Any], Reshape]:
    """Rows Q | K | V of a fused (h·d + 2·k·d,) bias: block `part`, as (heads d)."""

    def make(c: Any) -> Reshape:
        sizes = (c.n_heads * c.d_head, c.n_kv_heads * c.d_head, c.n_kv_heads * c.d_head)
        inner = heads_bias(n_heads(c), c.d_head)

        def fn(b: Tensor) -> Tensor:
            if b.shape[0] != sum(sizes):
                return b  # convert's shape check names the tensor
            return inner(b.split(sizes, 0)[part])

        return fn

    return make


@dataclass(frozen=True)
class GGUFFamily:
    architecture: str  # general.architecture
    hf_model_type: str  # the transformers family with the same computation (for messages/docs)
    fields: Mapping[str, tuple[str, ...]]
    weights: tuple[W, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    qk_permuted: bool = False
    merges_by: str = "score"  # a SentencePiece vocabulary's merge order (`gguf.sentencepiece_bpe`)
    derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # the rope.scaling.type values read (`_rope_scaling_of`: "linear", "yarn"; a rope_freqs.weight
    # tensor too unless `unsupported` refuses it); (): any RoPE scaling is refused (put
    # `ROPE_SCALING` in `unsupported`)
    rope_scaling: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()  # tensors read into the config, not weights
    # (what, test): a file for which test(contents) holds is refused, naming `what`
    unsupported: tuple[tuple[str, Callable[[gguf.GGUFContents], bool]], ...] = ()
    # fields read from the tensors a file holds, where llama.cpp decides by them (StableLM:
    # attn_q.bias ⇒ q/k/v biases, an ffn_norm ⇒ a sequential block); applied after `fixed`
    from_tensors: Callable[[gguf.GGUFContents], dict[str, Any]] | None = None


def _unpermuted(n_heads: Callable[[Any], int]) -> Callable[[Any], Reshape]:
    """llama.cpp's interleaved-pair attn_q/attn_k (h·d, m) → per-head W (h m d), half-split.
    `gguf.unpermute_qk` is looked up at call time (a test swaps it for the identity)."""

    def make(c: Any) -> Reshape:
        H, to_heads = n_heads(c), heads_in(n_heads(c), c.d_head)

        def fn(w: Tensor) -> Tensor:
            if w.dim() != 2 or w.shape[0] != H * c.d_head:
                return w  # convert's shape check names the tensor
            return to_heads(gguf.unpermute_qk(w, H))

        return fn

    return make


RESHAPES: dict[str, Callable[[Any], Reshape]] = {
    "q": lambda c: heads_in(c.n_heads, c.d_head),  # (h·d, m) → (h m d)
    "kv": lambda c: heads_in(c.n_kv_heads, c.d_head),  # (k·d, m) → (k m d)
    "o": lambda c: heads_out(c.n_heads, c.d_head),  # (m, h·d) → (h d m)
    "permuted.q": _unpermuted(lambda c: c.n_heads),
    "permuted.k": _unpermuted(lambda c: c.n_kv_heads),
    "bq": HF_RESHAPES["bq"],  # (h·d,) → (h d)
    "bkv": HF_RESHAPES["bkv"],  # (k·d,) → (k d)
    # Phi-3's fused attn_qkv (h·d + 2·k·d, m), rows Q | K | V, and ffn_up (2f, m), rows gate | up
    "qkv.q": HF_RESHAPES["qkv_proj.q"],
    "qkv.k": HF_RESHAPES["qkv_proj.k"],
    "qkv.v": HF_RESHAPES["qkv_proj.v"],
    "gate_up.gate": HF_RESHAPES["gate_up.gate"],
    "gate_up.up": HF_RESHAPES["gate_up.up"],
    # GPT-2's and BLOOM's fused attn_qkv.bias (h·d + 2·k·d,), rows Q | K | V
    "qkv.bq": _qkv_bias(0, lambda c: c.n_heads),  # (h·d + 2·k·d,) → (h d)
    "qkv.bk": _qkv_bias(1, lambda c: c.n_kv_heads),  # → (k d)
    "qkv.bv": _qkv_bias(2, lambda c: c.n_kv_heads),  # → (k d)
}

B = "blk.{}."
LLAMA_WEIGHTS = (
    W("embed.weight", "token_embd.weight"),
    W("norm.weight", "output_norm.weight"),
    W("lm_head.weight", "output.weight", when="untied"),
    W("blocks.{}.norm1.weight", B + "attn_norm.weight"),
    W("blocks.{}.attn.W_Q", B + "attn_q.weight", "q"),
    W("blocks.{}.attn.W_K", B + "attn_k.weight", "kv"),
    W("blocks.{}.attn.W_V", B + "attn_v.weight", "kv"),
    W("blocks.{}.attn.W_O", B + "attn_output.weight", "o"),
    W("blocks.{}.norm2.weight", B + "ffn_norm.weight"),
    W("blocks.{}.mlp.gate.weight", B + "ffn_gate.weight"),
    W("blocks.{}.mlp.up.weight", B + "ffn_up.weight"),
    W("blocks.{}.mlp.down.weight", B + "ffn_down.weight"),
)
CORE_FIELDS = {
    "n_layers": ("block_count",),
    "n_heads": ("attention.head_count",),
    "n_kv_heads": ("attention.head_count_kv", "attention.head_count"),
    "d_model": ("embedding_length",),
    "d_head": ("attention.key_length", "rope.dimension_count"),
    "d_ff": ("feed_forward_length",),
    "max_positions": ("context_length",),
    "norm_eps": ("attention.layer_norm_rms_epsilon",),
    "rope_base": ("rope.freq_base",),
    "vocab_size": ("vocab_size",),
}
REQUIRED = ("n_layers", "n_heads", "d_model", "d_ff", "max_positions", "norm_eps")


def _rope_scaling(c: gguf.GGUFContents) -> bool:
    kind = c.metadata.get(f"{c.architecture}.rope.scaling.type")
    return kind not in (None, "none") or "rope_freqs.weight" in c.tensors


# RoPE scaling (linear, YaRN; Llama 3.1's per-dimension rope_freqs): positions rotate otherwise
ROPE_SCALING = ("RoPE scaling (<arch>.rope.scaling.type, or a rope_freqs.weight tensor)",
                 _rope_scaling)  # fmt: skip

ROPE_FREQS = ("a rope_freqs.weight tensor (per-pair RoPE factors)",
               lambda c: "rope_freqs.weight" in c.tensors)  # fmt: skip


def partial_rope(f: dict[str, Any]) -> dict[str, Any]:
    """A `derive`: rope.dimension_count is the rotated part of each head (partial_rotary_factor
    · d_head; Phi-3, StableLM), None when it is the whole head."""
    r = f.get("rope_dim")
    return {"rope_dim": None if r is None or r == f["d_head"] else int(r)}
