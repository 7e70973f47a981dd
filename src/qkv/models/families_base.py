"""Hugging Face architectures as declarative descriptions: what a `Family` is, how a config.json
is read through one (`read_fields`), and the pieces several families share (the fused-weight
reshapes, the Llama layout). The families themselves: `families.py`, `families_more.py`,
`families_dense.py`, `families_dense2.py`, `families_dense3.py`, `families_dense4.py`,
`families_moe.py`, `families_moe2.py`, `families_extra.py`, `families_gptoss.py`,
`families_multimodal.py`.

A family says how to read its `config.json` into the generic `DecoderConfig` / `EncoderConfig`
(`fields`: our field ← the first present HF key, dotted for nested dicts; `fixed`: values the
architecture implies) and how its checkpoint keys map onto the model (`weights`: `W(dst, src,
reshape, when)` with `{}` for the layer; `reshape` names a conversion in `RESHAPES`; `when`
names a bool config field that must hold for the tensor to exist, "untied" (an lm_head of
its own), or "field=value" / "field!=value" (a config field's value, e.g. "block=pre");
`layers` "moe" or "dense" keeps a `{}` rule to the layers whose MLP is, or is not, a
SparseMoE, `{e}` then standing for each expert. Keys are matched after the family's
`prefix` (the base model's name inside a *ForCausalLM / *ForMaskedLM) is stripped, and
after `stacked` joined numbered per-head tensors into one.
RoPE scaling (`rope_parameters` / `rope_scaling` with rope_type "linear", "llama3", "yarn",
"longrope" or "dynamic") is read for every RoPE decoder by `rope_scaling_from`; any other
rope_type is a clear error.
`unsupported` lists config settings the generic models do not implement: each is a clear
error naming the setting, never a silently wrong model.

Letters: h query heads, k kv heads, d head dim, m model dim.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from .._validate import positive_ints
from ..nn import RopeScaling
from .convert import Reshape, Rule, heads_bias, heads_in, heads_out


@dataclass(frozen=True)
class W:
    """Model tensor `dst` ← `RESHAPES[reshape](config)(checkpoint[src])`, if config.`when`;
    with `layers` ("moe" / "dense"), on the layers whose MLP is (is not) sparse only, `{e}` in
    dst and src standing for each expert."""

    dst: str
    src: str
    reshape: str | None = None
    when: str | None = None
    layers: str | None = None

    def kept(self, config: Any, flags: Mapping[str, bool]) -> bool:
        """Whether this tensor exists for `config`: no `when`; a flag of `flags` ("untied");
        "field=value" / "field!=value" (the config field's str compared); a bool field."""
        when = self.when
        if when is None:
            return True
        if "=" in when:
            name, value = when.split("=", 1)
            return (str(getattr(config, name.rstrip("!"))) == value) != name.endswith("!")
        return flags[when] if when in flags else bool(getattr(config, when))


@dataclass(frozen=True)
class Family:
    model_type: str
    kind: str  # "decoder" | "encoder"
    fields: Mapping[str, tuple[str, ...]]
    weights: tuple[W, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    prefix: str = ""
    ignore: tuple[str, ...] = ()
    unsupported: tuple[tuple[str, Callable[[Any], bool]], ...] = ()
    window: str = "none"  # "all": `sliding_window` on every layer; "layer_types": per layer
    # (`layer_types`, else every `window_pattern`-th layer global, else Qwen's max_window_layers)
    classes: tuple[str, ...] = ()  # `architectures` names (prefixes) when model_type is absent
    derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # fields from fields
    # RoPE parameters per layer type (`rope_parameters.<layer type>`; an old config's
    # `rope_scaling` is the full_attention layers'): Gemma 3
    rope_by_layer_type: bool = False
    # (src, dst): checkpoint tensors numbered 0..n−1 at the `*` of src, stacked into one (n, …)
    # tensor named dst before conversion (`stack_numbered`; StableLM's per-head norms)
    stacked: tuple[tuple[str, str], ...] = ()
    # (src, dst): a checkpoint tensor (n, …) at src split along its first dim into n tensors
    # named dst, `*` the index, before conversion (`unstack`; GraniteMoE's experts in one)
    unstacked: tuple[tuple[str, str], ...] = ()
    # a multimodal checkpoint's language model (`families_multimodal.py`): how its config.json
    # and tensor names wrap this family's
    wrapper: Wrapper | None = None
    # a "dynamic" RoPE scaling with an `alpha` is NTK-alpha (Hunyuan): no length-dependent
    # scaling but a fixed base, which the family's `derive` computes (`ntk_alpha`)
    rope_alpha: bool = False


def ntk_alpha(cfg: Mapping[str, Any]) -> float | None:
    """The `alpha` of an NTK-alpha RoPE: `rope_parameters` / `rope_scaling` of type "dynamic"
    with an alpha (Hunyuan's checkpoints label it so; the base becomes θ·alpha^(d/(d−2)), the
    same at every length). None: no such setting."""
    for key in ("rope_scaling", "rope_parameters"):
        p = cfg.get(key)
        if isinstance(p, Mapping) and p.get("rope_type", p.get("type")) == "dynamic":
            alpha = p.get("alpha")
            if alpha:
                return alpha
    return None


@dataclass(frozen=True)
class Wrapper:
    """The language model inside a multimodal checkpoint (Gemma3ForConditionalGeneration,
    Mistral3ForConditionalGeneration): its settings are config.json's `text_config`, over
    `text_defaults` (the text config class's defaults, which transformers fills in for keys a
    sparse text_config leaves out), with `top_level` keys taken from config.json's top level as
    transformers takes them (value: the wrapper class's default, None for none; a top-level null
    or absent key leaves the text_config's). Its tensors are named after one of `prefixes`
    (transformers ≥ 4.52 in memory: `model.language_model.*` and `lm_head.*`; the files
    save_pretrained writes and the Hub holds: `language_model.model.*`, `language_model.lm_head.*`).
    The vision tower and projector are read by no rule: `ignore` lists them."""

    text_model_type: str  # text_config's model_type, and its default when absent
    text_defaults: Mapping[str, Any]
    top_level: Mapping[str, Any]
    prefixes: tuple[str, ...] = (
        "model.language_model.",
        "language_model.model.",
        "language_model.",
    )
    ignore: tuple[str, ...] = (
        "vision_tower.*", "multi_modal_projector.*",
        "model.vision_tower.*", "model.multi_modal_projector.*",
    )  # fmt: skip

    def config(self, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The text model's config.json, as transformers resolves it from the wrapper's."""
        text = cfg.get("text_config")
        if not isinstance(text, Mapping):
            raise ValueError(
                f"{where}: model_type={cfg.get('model_type')!r} keeps its language model's "
                f"settings in text_config, but text_config is {text!r}; expected a dict"
            )
        mt = text.get("model_type", self.text_model_type)
        if mt != self.text_model_type:
            raise ValueError(
                f"{where}: text_config.model_type={mt!r} is not supported inside "
                f"model_type={cfg.get('model_type')!r}; qkv reads {self.text_model_type!r} there"
            )
        out = {**self.text_defaults, **text}
        for key, default in self.top_level.items():
            value = cfg.get(key, default)
            if value is not None:
                out[key] = value
        return out

    def key_of(self, cfg: Mapping[str, Any], key: str) -> str:
        """Where the wrapper's config.json `cfg` sets `key` of the text model's config: at its
        top level (a `top_level` key set there, or with a default of its own there, as `config`
        reads it), else in text_config."""
        top = key in self.top_level and (cfg.get(key), self.top_level[key]) != (None, None)
        return key if top else f"text_config.{key}"


def stack_numbered(
    state: dict[str, Tensor], stacked: tuple[tuple[str, str], ...]
) -> dict[str, Tensor]:
    """`state` with each run of tensors matching a `Family.stacked` src (`{}`: the layer, `*`:
    an index) replaced by one tensor, the run stacked in index order along a new first dim,
    under dst (its `{}` the same layer): `layers.0.q_layernorm.norms.{0..5}.weight` (d,) →
    `layers.0.q_layernorm.weight` (6, d). A run whose indices are not exactly 0..n−1 stays as
    it is (convert then names its tensors as unexpected, and dst as missing)."""
    if not stacked:
        return state
    out = dict(state)
    for src, dst in stacked:
        pattern = re.compile(
            re.escape(src).replace(r"\{\}", r"(?P<layer>\d+)").replace(r"\*", r"(?P<i>\d+)")
        )
        runs: dict[str, dict[int, str]] = {}
        for key in state:
            if m := pattern.fullmatch(key):
                runs.setdefault(m["layer"], {})[int(m["i"])] = key
        for layer, run in runs.items():
            if sorted(run) != list(range(len(run))):
                continue
            out[dst.format(layer)] = torch.stack([out.pop(run[i]) for i in range(len(run))])
    return out


def unstack(state: dict[str, Tensor], unstacked: tuple[tuple[str, str], ...]) -> dict[str, Tensor]:
    """`state` with each tensor matching a `Family.unstacked` src (`{}`: the layer) replaced by
    its slices along the first dim, under dst (`{}` the same layer, `*` the slice's index):
    `layers.0.block_sparse_moe.input_linear.weight` (e, 2f, m) →
    `layers.0.block_sparse_moe.experts.{0..e−1}.input_linear.weight` (2f, m) each. The
    inverse of `stack_numbered`; a tensor that is not at least 1-D stays as it is (convert
    then names it as unexpected)."""
    if not unstacked:
        return state
    out = dict(state)
    for src, dst in unstacked:
        pattern = re.compile(re.escape(src).replace(r"\{\}", r"(?P<layer>\d+)"))
        for key in state:
            if (m := pattern.fullmatch(key)) and state[key].dim() >= 1:
                whole = out.pop(key)
                for i, part in enumerate(whole.unbind(0)):
                    out[dst.format(m["layer"]).replace("*", str(i))] = part
    return out


def _split(part: int, reshape: Callable[[Any], Reshape]) -> Callable[[Any], Reshape]:
    """GPT-2's fused c_attn, (m, 3m) Conv1D (in, out) or its (3m,) bias: third `part` of the
    output features, then `reshape`."""

    def make(c: Any) -> Reshape:
        inner = reshape(c)

        def fn(w: Tensor) -> Tensor:
            if w.shape[-1] != 3 * c.d_model:
                return w  # convert's shape check names the tensor
            return inner(w.chunk(3, dim=-1)[part].transpose(0, -1))

        return fn

    return make


def _per_head(part: int, reshape: Callable[[Any], Reshape]) -> Callable[[Any], Reshape]:
    """GPT-NeoX's fused query_key_value, (h·3·d, m) or its (h·3·d,) bias, interleaved per head
    (head h's q, k, v are rows h·3d + [0, d), [d, 2d), [2d, 3d)): the `part` of every head,
    as the (h·d, …) tensor of a separate projection, then `reshape`."""

    def make(c: Any) -> Reshape:
        inner, H, D = reshape(c), c.n_heads, c.d_head

        def fn(w: Tensor) -> Tensor:
            if w.shape[0] != 3 * H * D:
                return w  # convert's shape check names the tensor
            return inner(w.unflatten(0, (H, 3, D))[:, part].flatten(0, 1))

        return fn

    return make


def _grouped(part: int, reshape: Callable[[Any], Reshape]) -> Callable[[Any], Reshape]:
    """Falcon's fused query_key_value, ((h + 2k)·d, m) or its bias, grouped per kv head: the
    rows of kv head j are its g = h/k query heads, then its k, then its v, each d rows
    (((k, g+2, d), …)); multi-query (k = 1) and one kv head per query head (k = h: q, k, v per
    head, as GPT-NeoX) are its two ends. `part` 0: the q heads in order (h·d, …), 1: the k
    heads, 2: the v heads ((k·d, …)), then `reshape`."""

    def make(c: Any) -> Reshape:
        inner, H, K, D = reshape(c), c.n_heads, c.n_kv_heads, c.d_head
        G = H // K

        def fn(w: Tensor) -> Tensor:
            if w.shape[0] != (H + 2 * K) * D:
                return w  # convert's shape check names the tensor
            grouped = w.unflatten(0, (K, G + 2, D))
            rows = grouped[:, :G] if part == 0 else grouped[:, G + part - 1 : G + part]
            return inner(rows.flatten(0, 2))

        return fn

    return make


def _rows(part: int, sizes: Callable[[Any], tuple[int, ...]], reshape: Callable[[Any], Reshape]):
    """A fused projection stacked by rows (Phi-3's qkv_proj (h·d + 2·k·d, m), gate_up_proj
    (2f, m)): block `part` of the row blocks `sizes(config)`, then `reshape`."""

    def make(c: Any) -> Reshape:
        inner, n = reshape(c), sizes(c)

        def fn(w: Tensor) -> Tensor:
            if w.shape[0] != sum(n):
                return w
            return inner(w.split(n, 0)[part])

        return fn

    return make


def _qkv_rows(c: Any) -> tuple[int, int, int]:
    return c.n_heads * c.d_head, c.n_kv_heads * c.d_head, c.n_kv_heads * c.d_head


def _conv1d(reshape: Callable[[Any], Reshape]) -> Callable[[Any], Reshape]:
    """A Conv1D weight (in, out) is an nn.Linear weight transposed."""

    def make(c: Any) -> Reshape:
        inner = reshape(c)
        return lambda w: inner(w.t())

    return make


RESHAPES: dict[str, Callable[[Any], Reshape]] = {
    "q": lambda c: heads_in(c.n_heads, c.d_head),  # (h·d, m) → (h m d)
    "kv": lambda c: heads_in(c.n_kv_heads, c.d_head),  # (k·d, m) → (k m d)
    "o": lambda c: heads_out(c.n_heads, c.d_head),  # (m, h·d) → (h d m)
    "bq": lambda c: heads_bias(c.n_heads, c.d_head),  # (h·d,) → (h d)
    "bkv": lambda c: heads_bias(c.n_kv_heads, c.d_head),
    "t": lambda c: Tensor.t,  # Conv1D (in, out) → nn.Linear (out, in)
    "c_attn.q": _split(0, lambda c: heads_in(c.n_heads, c.d_head)),
    "c_attn.k": _split(1, lambda c: heads_in(c.n_kv_heads, c.d_head)),
    "c_attn.v": _split(2, lambda c: heads_in(c.n_kv_heads, c.d_head)),
    "c_attn.bq": _split(0, lambda c: heads_bias(c.n_heads, c.d_head)),
    "c_attn.bk": _split(1, lambda c: heads_bias(c.n_kv_heads, c.d_head)),
    "c_attn.bv": _split(2, lambda c: heads_bias(c.n_kv_heads, c.d_head)),
    "c_proj.o": _conv1d(lambda c: heads_out(c.n_heads, c.d_head)),
    "neox.q": _per_head(0, lambda c: heads_in(c.n_heads, c.d_head)),
    "neox.k": _per_head(1, lambda c: heads_in(c.n_heads, c.d_head)),
    "neox.v": _per_head(2, lambda c: heads_in(c.n_heads, c.d_head)),
    "neox.bq": _per_head(0, lambda c: heads_bias(c.n_heads, c.d_head)),
    "neox.bk": _per_head(1, lambda c: heads_bias(c.n_heads, c.d_head)),
    "neox.bv": _per_head(2, lambda c: heads_bias(c.n_heads, c.d_head)),
    "falcon.q": _grouped(0, lambda c: heads_in(c.n_heads, c.d_head)),
    "falcon.k": _grouped(1, lambda c: heads_in(c.n_kv_heads, c.d_head)),
    "falcon.v": _grouped(2, lambda c: heads_in(c.n_kv_heads, c.d_head)),
    "falcon.bq": _grouped(0, lambda c: heads_bias(c.n_heads, c.d_head)),
    "falcon.bk": _grouped(1, lambda c: heads_bias(c.n_kv_heads, c.d_head)),
    "falcon.bv": _grouped(2, lambda c: heads_bias(c.n_kv_heads, c.d_head)),
    "qkv_proj.q": _rows(0, _qkv_rows, lambda c: heads_in(c.n_heads, c.d_head)),
    "qkv_proj.k": _rows(1, _qkv_rows, lambda c: heads_in(c.n_kv_heads, c.d_head)),
    "qkv_proj.v": _rows(2, _qkv_rows, lambda c: heads_in(c.n_kv_heads, c.d_head)),
    "gate_up.gate": _rows(0, lambda c: (c.d_ff, c.d_ff), lambda c: lambda w: w),
    "gate_up.up": _rows(1, lambda c: (c.d_ff, c.d_ff), lambda c: lambda w: w),
    # gpt-oss's fused expert, x @ W with W (m, 2f): gate the even columns, up the odd ones
    "oai.gate": lambda c: lambda w: w[..., ::2].t().contiguous(),  # (m, 2f) → (f, m)
    "oai.up": lambda c: lambda w: w[..., 1::2].t().contiguous(),
    "oai.bgate": lambda c: lambda b: b[::2].contiguous(),  # (2f,) → (f,)
    "oai.bup": lambda c: lambda b: b[1::2].contiguous(),
    # ERNIE 4.5 MoE keeps its score-correction bias as (1, e) (one row: one expert group)
    "ernie.bias": lambda c: lambda b: b[0] if b.dim() == 2 and b.shape[0] == 1 else b,
    # a shared expert's fused input_linear (2f, m): the gate's f rows, then the up's (GraniteMoeShared)
    "shared_gate_up.gate": _rows(0, lambda c: (c.moe.d_shared,) * 2, lambda c: lambda w: w),
    "shared_gate_up.up": _rows(1, lambda c: (c.moe.d_shared,) * 2, lambda c: lambda w: w),
}

# --------------------------------------------------------------------------------------------
# decoders: the Llama layout and its relatives

ROPE_BASE = ("rope_parameters.rope_theta", "rope_theta")
# the names most decoders' configs share
CORE_FIELDS = {
    "n_layers": ("num_hidden_layers",),
    "n_heads": ("num_attention_heads",),
    "d_model": ("hidden_size",),
    "vocab_size": ("vocab_size",),
    "max_positions": ("max_position_embeddings",),
    "tie_embeddings": ("tie_word_embeddings",),
    "bos_id": ("bos_token_id",),
    "eos_id": ("eos_token_id",),
}
LLAMA_FIELDS = {
    **CORE_FIELDS,
    "n_kv_heads": ("num_key_value_heads", "num_attention_heads"),
    "d_head": ("head_dim",),
    "d_ff": ("intermediate_size",),
    "norm_eps": ("rms_norm_eps",),
    "act": ("hidden_act",),
    "rope_base": ROPE_BASE,
    "attn_bias": ("attention_bias",),
    "out_bias": ("attention_bias",),
    "mlp_bias": ("mlp_bias",),
}
LLAMA_DEFAULTS = {"rope_base": 10000.0, "tie_embeddings": True, "attn_bias": False,
                   "out_bias": False, "mlp_bias": False}  # fmt: skip
# what `rope_scaling_from` reads; the rest is refused
SCALED_ROPE_TYPES = ("linear", "llama3", "yarn", "longrope", "dynamic")
_YARN_OPTIONAL = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim",
                  "truncate")  # fmt: skip
_NEEDS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
    "dynamic": ("factor", "original_max_position_embeddings"),
}


def rope_scaling_from(
    params: Any, where: str, key: str, *, original_max: Any = None, max_positions: Any = None
) -> RopeScaling | None:
    """One rope_parameters / rope_scaling dict (`key` names it in messages) → a RopeScaling, or
    None for rope_type "default" (or no dict). transformers' names: `rope_type` (older configs:
    `type`), `factor`; llama3 also `low_freq_factor`, `high_freq_factor`; llama3, yarn and
    longrope `original_max_position_embeddings`, which transformers takes from `original_max`
    (a config's top-level key: it wins, as for Phi-3), else the dict, else `max_positions`.
    yarn's and longrope's factor None is max_positions / original; yarn's `beta_fast`,
    `beta_slow` (0 or None: 32 and 1), `attention_factor`, `mscale`, `mscale_all_dim` and
    `truncate` are optional; longrope takes `short_factor` and `long_factor` (one per rotated
    pair) and an optional `attention_factor`; dynamic `factor`, its L being `max_positions`
    (transformers' `config.max_position_embeddings`). Any other rope_type is a ValueError
    naming it."""
    if not params:
        return None
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}: {key} must be a dict, got {params!r}")
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind == "default":
        return None
    if kind not in SCALED_ROPE_TYPES:
        raise ValueError(
            f"{where}: rope scaling {key}.rope_type={kind!r} is not supported; qkv implements "
            f"rope_type {', '.join(map(repr, SCALED_ROPE_TYPES))} (and 'default')"
        )
    params = dict(params)
    if kind == "dynamic":  # transformers' L here is max_position_embeddings itself
        params["original_max_position_embeddings"] = max_positions
    elif kind != "linear":
        given = (original_max, params.get("original_max_position_embeddings"), max_positions)
        L = next((n for n in given if n is not None), None)
        params["original_max_position_embeddings"] = L
        if kind in ("yarn", "longrope") and params.get("factor") is None and L and max_positions:
            params["factor"] = max_positions / L
    names = _NEEDS[kind]
    missing = [n for n in names if params.get(n) is None]
    if missing:
        raise ValueError(f"{where}: {key} with rope_type {kind!r} lacks {missing}")
    try:
        if kind == "yarn":
            opt = {n: params[n] for n in _YARN_OPTIONAL if params.get(n) is not None}
            opt["beta_fast"] = opt.get("beta_fast") or 32.0  # transformers: `or 32`, `or 1`
            opt["beta_slow"] = opt.get("beta_slow") or 1.0
            return RopeScaling.yarn(*(params[n] for n in names), **opt)
        if kind == "longrope":
            return RopeScaling.longrope(
                *(params[n] for n in names),
                factor=params.get("factor") or 1.0,
                attention_factor=params.get("attention_factor"),
            )
        if kind == "dynamic":
            return RopeScaling.dynamic(*(params[n] for n in names))
        return RopeScaling(kind, *(params[n] for n in names))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {key}: {e}") from e


SELF_ATTN, LAYER_MLP = "layers.{}.self_attn.", "layers.{}.mlp."
LLAMA_WEIGHTS = (
    W("embed.weight", "embed_tokens.weight"),
    W("norm.weight", "norm.weight"),
    W("lm_head.weight", "lm_head.weight", when="untied"),
    W("blocks.{}.norm1.weight", "layers.{}.input_layernorm.weight"),
    W("blocks.{}.norm2.weight", "layers.{}.post_attention_layernorm.weight"),
    W("blocks.{}.attn.W_Q", SELF_ATTN + "q_proj.weight", "q"),
    W("blocks.{}.attn.W_K", SELF_ATTN + "k_proj.weight", "kv"),
    W("blocks.{}.attn.W_V", SELF_ATTN + "v_proj.weight", "kv"),
    W("blocks.{}.attn.W_O", SELF_ATTN + "o_proj.weight", "o"),
    W("blocks.{}.attn.b_Q", SELF_ATTN + "q_proj.bias", "bq", when="attn_bias"),
    W("blocks.{}.attn.b_K", SELF_ATTN + "k_proj.bias", "bkv", when="attn_bias"),
    W("blocks.{}.attn.b_V", SELF_ATTN + "v_proj.bias", "bkv", when="attn_bias"),
    W("blocks.{}.attn.b_O", SELF_ATTN + "o_proj.bias", when="out_bias"),
    W("blocks.{}.attn.q_norm.weight", SELF_ATTN + "q_norm.weight", when="qk_norm"),
    W("blocks.{}.attn.k_norm.weight", SELF_ATTN + "k_norm.weight", when="qk_norm"),
    W("blocks.{}.mlp.gate.weight", LAYER_MLP + "gate_proj.weight"),
    W("blocks.{}.mlp.up.weight", LAYER_MLP + "up_proj.weight"),
    W("blocks.{}.mlp.down.weight", LAYER_MLP + "down_proj.weight"),
    W("blocks.{}.mlp.gate.bias", LAYER_MLP + "gate_proj.bias", when="mlp_bias"),
    W("blocks.{}.mlp.up.bias", LAYER_MLP + "up_proj.bias", when="mlp_bias"),
    W("blocks.{}.mlp.down.bias", LAYER_MLP + "down_proj.bias", when="mlp_bias"),
)
DECODER_IGNORE = ("layers.*.self_attn.rotary_emb.inv_freq", "rotary_emb.inv_freq")


def llama_like(model_type: str, **kw: Any) -> Family:
    fields = {**LLAMA_FIELDS, **kw.pop("fields", {})}
    return Family(
        model_type, "decoder", fields, kw.pop("weights", LLAMA_WEIGHTS),
        defaults={**LLAMA_DEFAULTS, **kw.pop("defaults", {})},
        prefix="model.", ignore=DECODER_IGNORE,
        unsupported=kw.pop("unsupported", ()), **kw,
    )  # fmt: skip


def rope_dim(f: dict[str, Any]) -> dict[str, Any]:
    """Partial rotary: the first int(d_head · fraction) features of each head rotate."""
    frac = f.get("rope_fraction", 1.0)
    return {} if frac == 1.0 else {"rope_dim": int(f["d_head"] * frac)}


ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh", "silu": "silu", "swish": "silu", "relu": "relu",
        "bloom_gelu": "gelu_tanh_bloom", "relu2": "relu2"}  # fmt: skip


def config_at(cfg: Mapping[str, Any], key: str) -> Any:
    """cfg's value at `key` (dotted keys reach into nested dicts), None when absent."""
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def config_get(cfg: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    """The value of the first of `keys` present (dotted keys reach into nested dicts)."""
    return next((v for key in keys if (v := config_at(cfg, key)) is not None), None)


def file_keys(
    fields: Mapping[str, tuple[str, ...]],
    got: Callable[[str], Any],
    built: Mapping[str, Any],
) -> dict[str, str]:
    """field → the file's key it was read from (the first of its `fields` keys that `got`
    returns a value for), for each field whose value in `built`, what the config is built
    from, is that very value: a derived or converted value keeps qkv's name."""
    out = {}
    for ours, keys in fields.items():
        key = next((k for k in keys if got(k) is not None), None)
        if key is not None and ours in built and built[ours] is got(key):
            out[ours] = key
    return out


def in_file_terms(message: str, owner: str, keys: Mapping[str, str], fields: frozenset) -> str:
    """An error of the config dataclass `owner` ("DecoderConfig") built from a file, in that
    file's words: each field of `keys` (`file_keys`) named by its key, and the "owner: " /
    "owner." prefix dropped unless one of the owner's `fields` is still named by qkv's name.

    "DecoderConfig: n_heads=4 must be a multiple of n_kv_heads=3 (GQA)" read from a Llama
    config.json → "num_attention_heads=4 must be a multiple of num_key_value_heads=3 (GQA)"."""
    word = r"(?<!\w)({})(?!\w)"
    if keys:
        names = "|".join(map(re.escape, sorted(keys, key=len, reverse=True)))
        message = re.sub(word.format(names), lambda m: keys[m.group(1)], message)
    rest = fields - set(keys)
    if rest and re.search(word.format("|".join(map(re.escape, rest))), message):
        return message
    return re.sub(rf"^{re.escape(owner)}(?::\s*|\.(?=\w))", "", message)


def check_sizes(
    f: Mapping[str, Any],
    names: tuple[str, ...],
    where: str,
    owner: str,
    keys: Mapping[str, str],
    fields: frozenset,
) -> None:
    """`positive_ints` over `names` of the fields read from a file, before anything is computed
    from them (d_head = d_model // n_heads); its error in the file's words (`in_file_terms`)."""
    try:
        positive_ints(owner, SimpleNamespace(**{n: f.get(n) for n in names}), names)
    except ValueError as e:
        raise ValueError(f"{where}: {in_file_terms(str(e), owner, keys, fields)}") from e


def read_fields(family: Family, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """config.json → the generic config's fields (unconverted: see `hf.build_config`)."""
    for what, present in family.unsupported:
        if present(cfg):
            raise ValueError(
                f"{where}: {family.model_type} with {what} is not supported by qkv's generic "
                f"{family.kind}; only the plain architecture is"
            )
    out = dict(family.defaults)
    out.update(
        {k: v for k, keys in family.fields.items() if (v := config_get(cfg, keys)) is not None}
    )
    out.update(family.fixed)
    return out


def weight_rules(
    weights: tuple[W, ...], config: Any, reshapes: Mapping[str, Callable[[Any], Reshape]]
) -> list[Rule]:
    """A family's weight map (Hugging Face or GGUF) for this config: `W.kept` tensors only
    ("untied": an lm_head of its own), reshapes looked up in `reshapes`; `layers` "moe" /
    "dense" written out on the sparse / dense layers, `{e}` for each expert, the src's slice e
    where the src has no `{e}` (experts stacked in one (e, ...) tensor: llama.cpp's ffn_*_exps)."""
    out, flags = [], {"untied": not getattr(config, "tie_embeddings", True)}
    for w in weights:
        if not w.kept(config, flags):
            continue
        fn = None if w.reshape is None else reshapes[w.reshape](config)
        if w.layers is None:
            out.append(Rule(w.dst, w.src, fn))
            continue
        for i, sparse in enumerate(config.sparse_layers()):
            if sparse != (w.layers == "moe"):
                continue
            if "{e}" not in w.dst:
                out.append(Rule(w.dst.format(i), w.src.format(i), fn))
                continue
            n = config.moe.n_experts
            out += [Rule(w.dst.format(i, e=e), w.src.format(i, e=e),
                         fn if "{e}" in w.src else _expert(e, n, fn)) for e in range(n)]  # fmt: skip
    return out


def _expert(e: int, n: int, then: Reshape | None) -> Reshape:
    """Expert e's slice of an (n, ...) tensor (llama.cpp's ffn_*_exps), then `then`."""

    def fn(t: Tensor) -> Tensor:
        if t.dim() < 2 or t.shape[0] != n:
            return t  # convert's shape check names the tensor
        return t[e] if then is None else then(t[e])

    return fn
