"""Three more dense decoder families, each a declarative `Family` (see `families_base.py`):

    glm4      GLM-4-0414: a norm after each sublayer as well as before it (block "sandwich":
              input_layernorm → attention → post_self_attn_layernorm, post_attention_layernorm
              → MLP → post_mlp_layernorm), RoPE on the first partial_rotary_factor (0.5) of each
              head in interleaved pairs (x[2p], x[2p+1]), q/k/v biases (attention_bias, True;
              o_proj never has one), the MLP's gate and up rows fused in gate_up_proj
    seed_oss  Seed-OSS: Llama with q/k/v biases (attention_bias, True) and a switch of its own
              for the output projection's (attention_out_bias, False)
    ernie4_5  ERNIE 4.5 (dense): Llama with RoPE in interleaved pairs over the whole head, one
              switch (use_bias, False) for every projection's bias (q, k, v, o and the MLP's),
              tied embeddings and RoPE base 500 000 by default

Defaults are transformers' own (`configuration_<name>.py`) for configs that omit a key; among
them head_dim 128 (not hidden_size / num_attention_heads) and num_key_value_heads 2 (glm4,
ernie4_5) or 8 (seed_oss). A key present as null means something else to transformers
(seed_oss, ernie4_5: hidden_size / num_attention_heads, num_attention_heads; glm4: an error),
which `read_fields` cannot tell from an absent key: it is refused by name.

Letters: h query heads, k kv heads, d head dim, m model dim, f MLP hidden dim.
"""

from __future__ import annotations

from typing import Any

from .families_base import LAYER_MLP, LLAMA_WEIGHTS, Family, W, llama_like, rope_dim

# transformers reads null head_dim / num_key_value_heads as "derive it"; qkv reads an absent
# key as transformers' default, and a null one would be read the same
_KV_HEADS = {"n_kv_heads": ("num_key_value_heads",)}  # absent: the default, not h
_NULL_SHAPES = tuple(
    (f"{key}=null", lambda cfg, key=key: key in cfg and cfg[key] is None)
    for key in ("head_dim", "num_key_value_heads")
)


# GLM-4: r = int(d · partial_rotary_factor) features rotate; for an odd r transformers turns
# r + 1 of them (⌈r/2⌉ pairs, θ_p = base^(−2p/r)), a RoPE no rope_dim describes: refused
def _glm4_rope(f: dict[str, Any]) -> dict[str, Any]:
    frac, d = f["rope_fraction"], f["d_head"]
    ok = isinstance(frac, int | float) and not isinstance(frac, bool) and 0 < frac <= 1
    r = int(d * frac) if ok else 0
    if r < 2 or r % 2:
        raise ValueError(
            f"config.json: partial_rotary_factor={frac!r} of head_dim={d} must rotate an even "
            f"number ≥ 2 of features (int(head_dim · partial_rotary_factor) = {r})"
        )
    return rope_dim(f)


_GLM4 = llama_like(
    "glm4", classes=("Glm4For", "Glm4Model"),
    weights=(
        *(w for w in LLAMA_WEIGHTS if not w.dst.startswith("blocks.{}.mlp.")),
        W("blocks.{}.post1.weight", "layers.{}.post_self_attn_layernorm.weight"),
        W("blocks.{}.post2.weight", "layers.{}.post_mlp_layernorm.weight"),
        W("blocks.{}.mlp.gate.weight", LAYER_MLP + "gate_up_proj.weight", "gate_up.gate"),
        W("blocks.{}.mlp.up.weight", LAYER_MLP + "gate_up_proj.weight", "gate_up.up"),
        W("blocks.{}.mlp.down.weight", LAYER_MLP + "down_proj.weight"),
    ),
    fields={**_KV_HEADS,
            "rope_fraction": ("rope_parameters.partial_rotary_factor", "partial_rotary_factor")},
    fixed={"block": "sandwich", "rope_interleaved": True, "out_bias": False, "mlp_bias": False},
    defaults={"d_head": 128, "n_kv_heads": 2, "rope_fraction": 0.5, "norm_eps": 1.5625e-07,
              "attn_bias": True, "tie_embeddings": False, "act": "silu",
              "max_positions": 131072, "eos_id": 151329},
    unsupported=_NULL_SHAPES, derive=_glm4_rope,
)  # fmt: skip

# Seed-OSS: Llama's layout; q/k/v biases by attention_bias, o_proj's by attention_out_bias,
# the MLP's by mlp_bias
_SEED_OSS = llama_like(
    "seed_oss", classes=("SeedOss",),
    fields={**_KV_HEADS, "out_bias": ("attention_out_bias",)},
    defaults={"d_head": 128, "n_kv_heads": 8, "attn_bias": True, "out_bias": False,
              "mlp_bias": False, "tie_embeddings": False, "norm_eps": 1e-6, "act": "silu",
              "max_positions": 524288, "bos_id": 0, "eos_id": 2},
    unsupported=_NULL_SHAPES,
)  # fmt: skip

# ERNIE 4.5: Llama's layout; RoPE on pairs (2p, 2p+1) of the whole head, one use_bias for
# q, k, v, o and gate, up, down (attention_bias / mlp_bias are not read by transformers)
_ERNIE4_5 = llama_like(
    "ernie4_5", classes=("Ernie4_5For", "Ernie4_5Model"),
    fields={**_KV_HEADS, "attn_bias": ("use_bias",), "out_bias": ("use_bias",),
            "mlp_bias": ("use_bias",)},
    fixed={"rope_interleaved": True},
    defaults={"d_head": 128, "n_kv_heads": 2, "rope_base": 500000.0, "tie_embeddings": True,
              "norm_eps": 1e-5, "act": "silu", "max_positions": 131072, "bos_id": 1,
              "eos_id": 2},
    unsupported=_NULL_SHAPES,
)  # fmt: skip

DENSE3_FAMILIES: tuple[Family, ...] = (_GLM4, _SEED_OSS, _ERNIE4_5)
