"""GGUF architectures as declarative descriptions, one `GGUFFamily` per `general.architecture`.

The GGUF counterpart of `families.py`: how llama.cpp's metadata (`<arch>.block_count`,
`<arch>.attention.head_count`, ...) reads into the generic `DecoderConfig`, and how its tensor
names (`blk.{}.attn_q.weight`, ...) map onto the generic `Decoder`. The architecture comes from
the file's `general.architecture`, never from its name. What differs between families is data:

* `fields`: our field ← the first present metadata key (relative to `<arch>.`);
* `fixed` / `defaults`: values the architecture implies, or assumes when a key is absent
  (llama.cpp hard-codes some, e.g. Gemma 3's five local layers to one global, its local RoPE
  base 10⁴);
* `weights`: `W(dst, src, reshape, when)` with `{}` for the layer (reshapes in
  `gguf_families_base.RESHAPES`, beside `GGUFFamily` and the shared Llama layout;
  `when` names a bool config field, "untied" an untied unembedding);
* `qk_permuted`: llama.cpp reordered attn_q/attn_k rows for its interleaved RoPE (Llama), so the
  loader undoes it (`gguf.unpermute_qk`); the NeoX-RoPE families (Qwen 2/3, Phi-3, Gemma) keep
  Hugging Face's half-split rows;
* `rope_scaling`: the `rope.scaling.type` values the family reads (`_rope_scaling_of`): linear
  (Llama, Qwen 2/3, Gemma 3), YaRN (Llama, Qwen 2/3: Qwen2.5 / Qwen3 long-context files), plus
  Llama's `rope_freqs.weight` factors (Llama 3.1's rule), and "longrope" (Phi-3 128k, Phi-3.5,
  Phi-4-mini: its `rope_factors_long` / `rope_factors_short` tensors), into
  `DecoderConfig.rope_scaling` (Gemma 3: `rope_scalings`, on its global layers, as
  llama.cpp); other types are refused by
  name, and a family reading none refuses any scaling (`ROPE_SCALING` in `unsupported`);
* `unsupported`: what the generic decoder does not implement (RoPE scaling in some families),
  each a clear error naming it, never a silently different model;
* norms: llama.cpp stores Gemma's RMSNorm gain as 1 + w (its converter adds the 1), so a Gemma
  GGUF runs with `norm_offset` 0, where the Hugging Face checkpoint needs 1.

The families here: llama, qwen2, qwen3, phi3, gemma2, gemma3; `gguf_families_more.py`: gpt2,
starcoder2, bloom; `gguf_families_extra.py`: stablelm, falcon (7B); `gguf_families_misc.py`:
gemma, olmo2, cohere2; `gguf_families_granite.py`: granite, granitemoe; `GGUF_FAMILIES` lists
all.

Letters: h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..nn import RopeScaling
from ..nn.rope import longrope_attention_factor, yarn_attention_factor
from . import gguf
from .convert import Rule
from .decoder import DecoderConfig
from .families import W
from .families_base import check_sizes, file_keys, in_file_terms, weight_rules
from .gguf_families_base import (
    CORE_FIELDS,
    LLAMA_WEIGHTS,
    REQUIRED,
    RESHAPES,
    ROPE_FREQS,
    ROPE_SCALING,
    B,
    GGUFFamily,
    partial_rope,
)
from .gguf_families_extra import EXTRA_GGUF_FAMILIES
from .gguf_families_granite import GRANITE_GGUF_FAMILIES
from .gguf_families_misc import MISC_GGUF_FAMILIES
from .gguf_families_more import MORE_GGUF_FAMILIES


def _rope_scaling_of(
    c: gguf.GGUFContents, kinds: tuple[str, ...], f: Mapping[str, Any]
) -> RopeScaling | None:
    """llama.cpp's RoPE scaling as a RopeScaling (`kinds`: the rope.scaling.type values this
    family reads; `f`: its fields so far, for rope_base, d_head / rope_dim and max_positions):

    * linear: pair p turns by pos · θ_p / factor (freq_scale = 1/factor), factor =
      `rope.scaling.factor`; with a `rope_freqs.weight` tensor (d/2,), the per-pair divisors
      llama.cpp's converter stores for Llama 3.1's rule ("freq_factors" in ggml_rope_ext),
      pos · θ_p / (rope_freqs[p] · factor) (no type: factor 1).
    * yarn: ggml's rope_yarn with ext_factor 1, which is transformers' YaRN
      (`RopeScaling.yarn`): with r the rotated dims, L = `rope.scaling.original_context_length`
      (default: `context_length`) and c(n) = r·ln(L / (2π·n)) / (2·ln base),
          lo = max(0, ⌊c(beta_fast)⌋), hi = min(r − 1, ⌈c(beta_slow)⌉),
          ramp_p = 1 − clamp((p − lo) / max(0.001, hi − lo), 0, 1),
          θ_p ← (θ_p / factor)·(1 − ramp_p) + θ_p·ramp_p,
      cos and sin × attn_factor · (0.1·ln(factor) + 1) (× attn_factor alone for factor ≤ 1, as
      llama.cpp since its PR 17945 and transformers' get_mscale); beta_fast / beta_slow from
      `rope.scaling.yarn_beta_fast` / `yarn_beta_slow` (default 32 / 1; llama.cpp reads these
      two for some architectures only, and uses 32 / 1 for llama and qwen: a file that sets
      them gets the values it states, as the transformers model it was converted from),
      attn_factor from `rope.scaling.attn_factor` (default 1).

    Refused by name, never read differently: another type; a missing factor; YaRN with a
    rope_freqs tensor; `yarn_ext_factor` ≠ 1 (a partial ramp), `yarn_log_multiplier` ≠ 0
    (DeepSeek's mscale pair), `yarn_attn_factor` (transformers' attention_factor, which
    llama.cpp's YaRN does not apply); `attn_factor` ≠ 1 without YaRN; an empty correction range
    (hi < lo, only for tiny L or huge beta, where transformers' ramp and llama.cpp's differ)."""
    arch, md = c.architecture, c.metadata
    key = f"{arch}.rope.scaling."
    kind = md.get(key + "type") or "none"
    freqs = c.tensors.get("rope_freqs.weight")
    if "longrope" in kinds and (
        kind == "longrope" or any(n in c.tensors for n in _LONGROPE_TENSORS)
    ):
        try:
            return _longrope_of(c, f, kind)
        except ValueError as e:
            raise ValueError(f"{c.path}: {e}") from e

    uses = f"{c.path}: this {arch} GGUF uses"
    if kind not in ("none", *kinds):
        reads = " and ".join(repr(k) for k in kinds)
        raise ValueError(f"{uses} RoPE scaling {key}type={kind!r}, which qkv does not implement "
                         f"for {arch}; it reads {reads}")  # fmt: skip
    attn = md.get(key + "attn_factor")
    if attn is not None and kind != "yarn" and float(attn) != 1.0:
        raise ValueError(f"{uses} {key}attn_factor={attn!r} with {key}type={kind!r} (cos and sin "
                         "scaled without YaRN), which qkv does not implement")  # fmt: skip
    factor = 1.0
    if kind != "none":
        factor = md.get(key + "factor")
        if factor is None:
            raise ValueError(f"{c.path}: {key}type is {kind} but '{key}factor' is missing")
    try:
        if kind == "yarn":
            return _yarn_of(c, f, float(factor), 1.0 if attn is None else float(attn))
        if freqs is not None:
            return RopeScaling.freq_factors([float(x) * float(factor) for x in freqs.flatten()])
        return None if kind == "none" else RopeScaling.linear(float(factor))
    except ValueError as e:
        raise ValueError(f"{c.path}: {e}") from e


def _yarn_of(c: gguf.GGUFContents, f: Mapping[str, Any], factor: float, attn: float) -> RopeScaling:
    """`_rope_scaling_of`'s yarn branch (its docstring states the rule and the refusals)."""
    md, key = c.metadata, f"{c.architecture}.rope.scaling."
    if "rope_freqs.weight" in c.tensors:
        raise ValueError(f"{key}type yarn with a rope_freqs.weight tensor (per-pair factors "
                         "under the YaRN ramp) is not implemented")  # fmt: skip
    for name, ok, why in (
        ("yarn_ext_factor", lambda v: float(v) == 1.0,
         "qkv implements YaRN's full ramp only (1, llama.cpp's default for yarn)"),
        ("yarn_log_multiplier", lambda v: float(v) == 0.0,
         "DeepSeek's mscale pair is not implemented for GGUF files (0: none)"),
        ("yarn_attn_factor", lambda v: False,
         "transformers' attention_factor: transformers scales cos and sin by it in place of "
         "0.1·ln(factor) + 1, llama.cpp's YaRN ignores it; qkv reads neither way"),
    ):  # fmt: skip
        v = md.get(key + name)
        if v is not None and not ok(v):
            raise ValueError(f"'{key}{name}' is {v!r}: {why}")
    L = md.get(key + "original_context_length", f["max_positions"])
    if isinstance(L, float) and L.is_integer():
        L = int(L)
    if isinstance(L, bool) or not isinstance(L, int) or L <= 0:
        raise ValueError(f"'{key}original_context_length' (or context_length) must be a "
                         f"positive int, got {L!r}")  # fmt: skip
    s = RopeScaling.yarn(factor, L, beta_fast=md.get(key + "yarn_beta_fast", 32.0),
                         beta_slow=md.get(key + "yarn_beta_slow", 1.0),
                         attention_factor=attn * yarn_attention_factor(factor))  # fmt: skip
    r, base = int(f.get("rope_dim") or f["d_head"]), float(f["rope_base"])
    lo, hi = _yarn_corr_dims(r, L, base, s.beta_fast, s.beta_slow)
    if hi < lo:
        raise ValueError(
            f"YaRN's correction range is empty: lo={lo} > hi={hi} for {r} rotated dims, "
            f"base {base}, original_context_length {L}, beta_fast {s.beta_fast}, beta_slow "
            f"{s.beta_slow}; llama.cpp and transformers ramp such a range differently"
        )
    return s


_LONGROPE_TENSORS = ("rope_factors_short.weight", "rope_factors_long.weight")


def _longrope_of(c: gguf.GGUFContents, f: Mapping[str, Any], kind: str) -> RopeScaling:
    """Phi-3's LongRoPE as llama.cpp's converter writes it: the per-pair divisors in the
    `rope_factors_short` / `rope_factors_long` tensors (r/2 each), L =
    `rope.scaling.original_context_length` (required), cos/sin × `rope.scaling.attn_factor`
    (absent: √(1 + ln(context_length / L) / ln L), what the converter stores). Which set a call
    uses is `RopeScaling.longrope`'s rule, transformers' (its last position past L: long);
    llama.cpp picks once by the context size it was started with (n_ctx > L: long), which for
    a sequence past L is the same choice; for a shorter one, llama.cpp started with a context
    past L uses the long set where transformers and qkv use the short one."""
    md, key = c.metadata, f"{c.architecture}.rope.scaling."
    if kind not in ("none", "longrope"):
        raise ValueError(f"{key}type={kind!r} with LongRoPE factor tensors is not implemented")
    missing = [n for n in _LONGROPE_TENSORS if n not in c.tensors]
    if missing:
        raise ValueError(
            f"LongRoPE needs both {' and '.join(_LONGROPE_TENSORS)}; {missing} is missing"
        )
    L = md.get(key + "original_context_length")
    if isinstance(L, float) and L.is_integer():
        L = int(L)
    if isinstance(L, bool) or not isinstance(L, int) or L <= 0:
        raise ValueError(
            f"LongRoPE needs '{key}original_context_length' (a positive int), got {L!r}"
        )
    factor = f["max_positions"] / L
    attn = md.get(key + "attn_factor")
    short, long = (c.tensors[n].flatten().tolist() for n in _LONGROPE_TENSORS)
    return RopeScaling.longrope(
        short, long, L, factor=factor,
        attention_factor=longrope_attention_factor(factor, L) if attn is None else float(attn),
    )  # fmt: skip


def _yarn_corr_dims(r: int, L: int, base: float, fast: float, slow: float) -> tuple[int, int]:
    """ggml_rope_yarn_corr_dims: the pairs turning beta_fast and beta_slow times over L."""

    def c(n: float) -> float:
        return r * math.log(L / (n * 2 * math.pi)) / (2 * math.log(base))

    return max(0, math.floor(c(fast))), min(r - 1, math.ceil(c(slow)))


_LLAMA = GGUFFamily(
    "llama", "llama", CORE_FIELDS,
    (
        *(w for w in LLAMA_WEIGHTS if w.dst not in ("blocks.{}.attn.W_Q", "blocks.{}.attn.W_K")),
        W("blocks.{}.attn.W_Q", B + "attn_q.weight", "permuted.q"),
        W("blocks.{}.attn.W_K", B + "attn_k.weight", "permuted.k"),
    ),
    fixed={"norm": "rms", "act": "silu", "gated": True},
    defaults={"rope_base": 10000.0}, qk_permuted=True, rope_scaling=("linear", "yarn"),
    ignore=("rope_freqs.weight",),
)  # fmt: skip

# Qwen2 / Qwen2.5: Llama with q, k, v biases (none on the output); llama.cpp runs it with NeoX
# RoPE, so its converter leaves the Q/K rows as Hugging Face's (no permutation). RoPE scaling
# linear or YaRN (Qwen2.5's long-context files: rope.scaling.type yarn, factor 4, 32768 original)
_QWEN2 = GGUFFamily(
    "qwen2", "qwen2", CORE_FIELDS,
    (
        *LLAMA_WEIGHTS,
        W("blocks.{}.attn.b_Q", B + "attn_q.bias", "bq"),
        W("blocks.{}.attn.b_K", B + "attn_k.bias", "bkv"),
        W("blocks.{}.attn.b_V", B + "attn_v.bias", "bkv"),
    ),
    fixed={"norm": "rms", "act": "silu", "gated": True, "attn_bias": True},
    defaults={"rope_base": 10000.0}, rope_scaling=("linear", "yarn"), unsupported=(ROPE_FREQS,),
)  # fmt: skip

# Qwen3: Llama without biases, plus an RMSNorm (d) on each head's q and k before RoPE; head dim
# from attention.key_length (128, not d_model/h); Q/K rows not permuted (NeoX RoPE); RoPE
# scaling linear or YaRN (Qwen3's 128k files) as Qwen2
_QWEN3 = GGUFFamily(
    "qwen3", "qwen3",
    {**CORE_FIELDS, "d_head": ("attention.key_length",)},
    (
        *LLAMA_WEIGHTS,
        W("blocks.{}.attn.q_norm.weight", B + "attn_q_norm.weight"),
        W("blocks.{}.attn.k_norm.weight", B + "attn_k_norm.weight"),
    ),
    fixed={"norm": "rms", "act": "silu", "gated": True, "qk_norm": True},
    defaults={"rope_base": 10000.0},  # llama.cpp's default base
    rope_scaling=("linear", "yarn"), unsupported=(ROPE_FREQS,),
)  # fmt: skip


# Phi-3: attn_qkv holds W_Q | W_K | W_V by rows and ffn_up holds gate | up, as in Hugging Face's
# qkv_proj / gate_up_proj; NeoX RoPE (no permutation), possibly on part of the head.
# phi3.attention.sliding_window is not applied: llama.cpp disables Phi-3's SWA (its PR 13676) and
# transformers' GGUF reader does not read it, so neither does this family
_PHI3 = GGUFFamily(
    "phi3", "phi3",
    {**CORE_FIELDS, "d_head": ("attention.key_length",), "rope_dim": ("rope.dimension_count",)},
    (
        *(w for w in LLAMA_WEIGHTS if w.src.split(".")[-2] not in (
            "attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")),
        W("blocks.{}.attn.W_Q", B + "attn_qkv.weight", "qkv.q"),
        W("blocks.{}.attn.W_K", B + "attn_qkv.weight", "qkv.k"),
        W("blocks.{}.attn.W_V", B + "attn_qkv.weight", "qkv.v"),
        W("blocks.{}.mlp.gate.weight", B + "ffn_up.weight", "gate_up.gate"),
        W("blocks.{}.mlp.up.weight", B + "ffn_up.weight", "gate_up.up"),
    ),
    fixed={"norm": "rms", "act": "silu", "gated": True},
    defaults={"rope_base": 10000.0}, derive=partial_rope, rope_scaling=("longrope",),
    unsupported=(ROPE_FREQS,), ignore=_LONGROPE_TENSORS,
)  # fmt: skip


def _gemma2(f: dict[str, Any]) -> dict[str, Any]:
    """Embeddings × √d_model; scores × d_head^−½, but × (d_model/h)^−½ for the 46-layer 27B
    (llama.cpp's rule, Hugging Face's query_pre_attn_scalar); a window on the even layers
    (llama.cpp's pattern 2: layer i slides when i mod 2 = 0, as transformers' layer_types)."""
    n = f["n_layers"]
    d = f["d_model"] // f["n_heads"] if n == 46 else f["d_head"]
    return {
        "embed_scale": f["d_model"] ** 0.5,
        "attn_scale": d**-0.5,
        "windows": tuple(int(f["window"]) if i % 2 == 0 else None for i in range(n)),
    }


def _gemma3(f: dict[str, Any]) -> dict[str, Any]:
    """Embeddings × √d_model; scores × d_head^−½ (llama.cpp's rule for every size but 27B, whose
    `query_pre_attn_scalar` is d_model/h: a file may say `attention.scale`); the local layers'
    window and RoPE base; RoPE scaling (4B+: linear × 8) on the global layers only, as
    llama.cpp (its rope_freq_scale_train_swa is 1)."""
    out = {"embed_scale": f["d_model"] ** 0.5}
    out["attn_scale"] = f.get("attn_scale") or f["d_head"] ** -0.5
    n, p, w = f["n_layers"], f.get("window_pattern"), f.get("window")
    if isinstance(p, list):  # one bool per layer (True = sliding), newer llama.cpp files
        local = [bool(x) for x in p]
    else:
        local = [(i + 1) % int(p) != 0 for i in range(n)]
    if len(local) != n:
        raise ValueError(
            f"attention.sliding_window_pattern has {len(local)} entries for {n} layers"
        )
    if w is not None:
        out["windows"] = tuple(int(w) if s else None for s in local)
    g, lo = float(f["rope_base"]), float(f["local_rope_base"])
    out["rope_bases"] = tuple(lo if s else g for s in local)
    if f.get("rope_scaling") is not None:  # llama.cpp: freq_scale on the global layers only
        out["rope_scaling"] = None
        out["rope_scalings"] = tuple(None if s else f["rope_scaling"] for s in local)
    return out


# Gemma 3 (text): Gemma 2's sandwich norms plus QK-norm; norms stored as 1 + w (offset 0 here);
# Q/K rows as Hugging Face's (no permutation); five sliding-window layers to one global
_GEMMA3 = GGUFFamily(
    "gemma3", "gemma3_text",
    {**CORE_FIELDS, "window": ("attention.sliding_window",),
     "window_pattern": ("attention.sliding_window_pattern",),
     "local_rope_base": ("rope.freq_base_swa",), "attn_scale": ("attention.scale",),
     "logit_softcap": ("final_logit_softcapping",),
     "attn_softcap": ("attn_logit_softcapping",)},
    (
        *LLAMA_WEIGHTS,
        W("blocks.{}.post1.weight", B + "post_attention_norm.weight"),
        W("blocks.{}.post2.weight", B + "post_ffw_norm.weight"),
        W("blocks.{}.attn.q_norm.weight", B + "attn_q_norm.weight"),
        W("blocks.{}.attn.k_norm.weight", B + "attn_k_norm.weight"),
    ),
    fixed={"norm": "rms", "act": "gelu_tanh", "gated": True, "block": "sandwich",
           "qk_norm": True, "norm_offset": 0.0},
    defaults={"rope_base": 1e6, "local_rope_base": 1e4, "window_pattern": 6},
    merges_by="file", derive=_gemma3, rope_scaling=("linear",),  # 4B+: × 8, global layers
    unsupported=(ROPE_FREQS,),
)  # fmt: skip

# Gemma 2: sandwich norms (stored 1 + w: offset 0), GELU-tanh, scores capped at 50·tanh(s/50)
# and logits at 30·tanh(l/30) (llama.cpp's defaults when the file omits them), a 4096-key window
# on every other layer; no QK-norm; Q/K rows not permuted
_GEMMA2 = GGUFFamily(
    "gemma2", "gemma2",
    {**CORE_FIELDS, "window": ("attention.sliding_window",),
     "logit_softcap": ("final_logit_softcapping",),
     "attn_softcap": ("attn_logit_softcapping",)},
    (
        *LLAMA_WEIGHTS,
        W("blocks.{}.post1.weight", B + "post_attention_norm.weight"),
        W("blocks.{}.post2.weight", B + "post_ffw_norm.weight"),
    ),
    fixed={"norm": "rms", "act": "gelu_tanh", "gated": True, "block": "sandwich",
           "norm_offset": 0.0},
    defaults={"rope_base": 10000.0, "window": 4096, "attn_softcap": 50.0, "logit_softcap": 30.0},
    merges_by="file", derive=_gemma2, unsupported=(ROPE_SCALING,),
)  # fmt: skip

GGUF_FAMILIES: dict[str, GGUFFamily] = {
    f.architecture: f
    for f in (
        _LLAMA,
        _QWEN2,
        _QWEN3,
        _PHI3,
        _GEMMA2,
        _GEMMA3,
        *MORE_GGUF_FAMILIES,
        *EXTRA_GGUF_FAMILIES,
        *MISC_GGUF_FAMILIES,
        *GRANITE_GGUF_FAMILIES,
    )
}


def family_of(contents: gguf.GGUFContents) -> GGUFFamily:
    """The family `general.architecture` names; ValueError listing the supported ones."""
    arch = contents.architecture
    if arch not in GGUF_FAMILIES:
        raise ValueError(
            f"{contents.path}: general.architecture is {arch!r}; qkv reads these GGUF "
            f"architectures: {sorted(GGUF_FAMILIES)} (and any Hugging Face folder of "
            "the families `qkv models` lists)"
        )
    return GGUF_FAMILIES[arch]


def config_from_gguf(contents: gguf.GGUFContents, *, name: str | None = None) -> DecoderConfig:
    """The generic decoder's description of a GGUF, from its `<arch>.*` metadata through its
    family (validated by `DecoderConfig`); ValueError for a foreign file or a missing key."""
    family = family_of(contents)
    md, arch = contents.metadata, family.architecture
    for what, found in family.unsupported:
        if found(contents):
            raise ValueError(
                f"{contents.path}: this {arch} GGUF uses {what}, which qkv does not implement"
            )
    f: dict[str, Any] = dict(family.defaults)
    for ours, keys in family.fields.items():
        v = next((md[f"{arch}.{k}"] for k in keys if md.get(f"{arch}.{k}") is not None), None)
        if v is not None:
            f[ours] = v
    for ours in REQUIRED:
        if ours not in f:
            keys = " or ".join(f"'{arch}.{k}'" for k in family.fields[ours])
            raise ValueError(f"{contents.path}: metadata key {keys} is missing")
    f.update(family.fixed)
    if family.from_tensors is not None:
        f.update(family.from_tensors(contents))
    known = frozenset(DecoderConfig.__dataclass_fields__)

    def keys() -> dict[str, str]:  # field → its metadata key, for errors in the file's words
        read = file_keys(family.fields, lambda k: md.get(f"{arch}.{k}"), f)
        return {ours: f"{arch}.{k}" for ours, k in read.items()}

    where = str(contents.path)
    check_sizes(f, ("n_layers", "n_heads", "d_model"), where, "DecoderConfig", keys(), known)
    f.setdefault("n_kv_heads", f["n_heads"])
    f.setdefault("d_head", f["d_model"] // f["n_heads"])
    f.setdefault("vocab_size", len(md.get("tokenizer.ggml.tokens") or ()))
    f["tie_embeddings"] = "output.weight" not in contents.tensors
    f["bos_id"] = md.get("tokenizer.ggml.bos_token_id")
    f["eos_id"] = md.get("tokenizer.ggml.eos_token_id")
    if family.rope_scaling:
        f["rope_scaling"] = s = _rope_scaling_of(contents, family.rope_scaling, f)
        if s is not None and s.rope_type == "yarn":  # context_length is the original one
            f["max_positions"] = s.context(f["max_positions"])
    if family.derive is not None:
        f.update(family.derive(f))
    try:
        return DecoderConfig(
            name=name or str(md.get("general.name", arch)),
            **{k: v for k, v in f.items() if k in known and k != "name"},
        )
    except (TypeError, ValueError) as e:  # in the metadata's words, not the dataclass's
        raise ValueError(f"{where}: {in_file_terms(str(e), 'DecoderConfig', keys(), known)}") from e


def rules(family: GGUFFamily, config: DecoderConfig) -> list[Rule]:
    """The family's key map GGUF → model for this config (`families_base.weight_rules`: `{}`
    the layer index, `when` as a Hugging Face family's, `layers` / `{e}` for MoE experts)."""
    return weight_rules(family.weights, config, RESHAPES)
