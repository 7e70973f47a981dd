"""A local Hugging Face checkpoint directory → a qkv model, for every family in `families.py`.

    folder/config.json                       architecture: `model_type` (else `architectures`)
    folder/model.safetensors                 or model.safetensors.index.json + its shards
    folder/tokenizer.json                    optional: without it, pass token ids
    folder/tokenizer_config.json             optional: its `chat_template` (or chat_template.jinja)

The family's description is read into the generic `DecoderConfig` / `EncoderConfig`, the model
is built on the meta device (no memory, no init), and `convert` fills every tensor through the
family's weight map with shape, dtype and NaN/inf checks and a strict missing/unexpected report:
any error leaves nothing half-loaded. Weights are float32 whatever the file's dtype, or the
`dtype` asked for: read straight into it, never through float32 (`qkv.nn.cast`).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..nn import accelerate, as_dtype, cast
from .convert import Rule, convert, read_safetensors, with_article
from .decoder import Decoder, DecoderConfig
from .encoder import Encoder, EncoderConfig
from .families import ACTS, FAMILIES, RESHAPES, Family, read_fields
from .families_base import (
    check_sizes,
    config_at,
    file_keys,
    in_file_terms,
    ntk_alpha,
    rope_scaling_from,
    stack_numbered,
    unstack,
    weight_rules,
)
from .gguf import page_out
from .memory import check_fits
from .mxfp4 import Dequantized
from .tokenizer import Tokenizer

# the sizes every family reads from config.json, checked before anything is computed from them
SIZES = ("n_layers", "n_heads", "d_model", "vocab_size", "max_positions")
CONFIG, WEIGHTS, INDEX, TOKENIZER = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} at {path}")
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(out, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(out).__name__}")
    return out


def family_of(cfg: dict[str, Any], where: str) -> Family:
    """The family `config.json` names by `model_type`, else by its `architectures` classes: the
    family with the longest class prefix of the first class any family knows
    ("Qwen2MoeForCausalLM" is qwen2_moe's, though it starts with qwen2's "Qwen2")."""
    mt = cfg.get("model_type")
    if mt is None:
        for arch in cfg.get("architectures") or ():
            known = [(len(c), f.model_type) for f in FAMILIES.values() for c in f.classes
                     if str(arch).startswith(c)]  # fmt: skip
            if known:
                mt = max(known)[1]
                break
    if mt is None and not cfg.get("architectures"):
        raise ValueError(
            f"{where} has no model_type (nor architectures): add the model_type it was saved "
            f"with, one of {sorted(FAMILIES)}"
        )
    if mt not in FAMILIES:
        got = (
            f"model_type={mt!r}"
            if mt is not None
            else f"architectures={cfg.get('architectures')!r}"
        )
        raise ValueError(
            f"{where}: {got} is not supported; qkv reads these model_types: {sorted(FAMILIES)}"
        )
    return FAMILIES[mt]


def build_config(
    family: Family,
    cfg: dict[str, Any],
    *,
    name: str,
    where: str,
    key_of: Callable[[str], str] | None = None,
):
    """config.json → a validated DecoderConfig or EncoderConfig; errors name config.json's
    keys (`in_file_terms`; `key_of(key)`: how the file names a key of `cfg`, when `cfg` is a
    wrapper's text_config), not the dataclass's fields."""
    f = read_fields(family, cfg, where)
    kind = EncoderConfig if family.kind == "encoder" else DecoderConfig
    known = frozenset(x.name for x in dataclasses.fields(kind))

    in_file = key_of or (lambda k: k)

    def keys() -> dict[str, str]:
        read = file_keys(family.fields, lambda k: config_at(cfg, k), f)
        return {ours: in_file(k) for ours, k in read.items()}

    for ours in SIZES:  # every family maps them; the sums below and `derive` use them
        if f.get(ours) is None:
            said = " or ".join(map(in_file, family.fields.get(ours, (ours,))))
            raise ValueError(f"{where}: {said} is missing")
    check_sizes(f, SIZES, where, kind.__name__, keys(), known)
    act = f.get("act", "gelu")
    if act not in ACTS:
        raise ValueError(f"{where}: activation {act!r} is not supported; qkv knows {sorted(ACTS)}")
    f["act"] = ACTS[act]
    if f.get("n_kv_heads") is None:  # 0 is an error DecoderConfig names, not "absent"
        f["n_kv_heads"] = f["n_heads"]
    if f.get("d_head") is None:
        if f["d_model"] % f["n_heads"]:
            raise ValueError(f"{where}: hidden size {f['d_model']} is not a multiple of "
                             f"{f['n_heads']} heads and config.json gives no head_dim")  # fmt: skip
        f["d_head"] = f["d_model"] // f["n_heads"]
    if family.derive is not None:
        try:
            f.update(family.derive(f))
        except ValueError as e:  # derive names "config.json: key"; say which config.json
            msg = str(e)
            if not msg.startswith("config.json"):
                raise
            raise ValueError(where + msg.removeprefix("config.json")) from e
    if family.kind != "encoder":
        if f.get("d_ff") is None:  # GPT-2's n_inner=None
            f["d_ff"] = 4 * f["d_model"]
        if isinstance(f.get("eos_id"), list):  # several end tokens: each stops generation
            f["eos_id"], f["stop_ids"] = end_tokens(f["eos_id"])
        if isinstance(f.get("bos_id"), list):
            f["bos_id"] = f["bos_id"][0] if f["bos_id"] else None
        f["windows"] = _windows(family, cfg, f)
        f["rope_bases"] = _rope_bases(family, cfg, f)
        if f.get("positions", "rope") == "rope":
            f["rope_scaling"], f["rope_scalings"] = _rope_scalings(family, cfg, f, where)
            scalings = [f["rope_scaling"], *(f["rope_scalings"] or ())]
            n = f["max_positions"]  # the context the scaling is for: transformers has no limit
            f["max_positions"] = max([n, *(s.context(n) for s in scalings if s is not None)])
    try:
        return kind(name=name, **{k: v for k, v in f.items() if k in known})
    except (TypeError, ValueError) as e:  # in config.json's words, not the dataclass's
        raise ValueError(f"{where}: {in_file_terms(str(e), kind.__name__, keys(), known)}") from e


def end_tokens(ids: list) -> tuple[Any, tuple]:
    """eos_token_id as a list (several end tokens) → (eos_id, stop_ids): the first, the rest."""
    return (ids[0] if ids else None), tuple(ids[1:])


def generation_ends(d: Path, config: Any) -> Any:
    """`config` with generation_config.json's eos_token_id, where the folder has one: that file,
    not config.json, says when transformers' `generate` stops (Llama 3.1 Instruct: three end
    tokens). Errors name the file."""
    path = d / "generation_config.json"
    if not path.is_file() or not hasattr(config, "stop_ids"):
        return config
    ids = read_json(path).get("eos_token_id")
    if ids is None:
        return config
    ids = ids if isinstance(ids, list) else [ids]
    eos, rest = end_tokens(ids)
    try:
        return dataclasses.replace(config, eos_id=eos, stop_ids=rest)
    except (TypeError, ValueError):
        raise ValueError(
            f"{path}: eos_token_id must be a token id or a list of them in "
            f"[0, {config.vocab_size}) (config.json's vocab_size), got {ids!r}"
        ) from None


def _layer_types(cfg: dict[str, Any], f: dict[str, Any]) -> list[str] | None:
    """Per layer "sliding_attention" or "full_attention": `layer_types`; else every
    `window_pattern`-th layer global (Gemma's sliding_window_pattern); else Qwen's
    use_sliding_window from max_window_layers on; else None."""
    n, types, p = f["n_layers"], cfg.get("layer_types"), f.get("window_pattern")
    if types is None and p:
        types = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]
    if types is None:
        if not cfg.get("use_sliding_window"):
            return None
        start = cfg.get("max_window_layers", 0)
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(n)]
    if len(types) != n:
        raise ValueError(f"config.json: layer_types has {len(types)} entries for {n} layers")
    return list(types)


def _windows(family: Family, cfg: dict[str, Any], f: dict[str, Any]) -> tuple | None:
    """Per-layer sliding window (keys seen) or None: Mistral's on every layer; elsewhere on
    the layers `_layer_types` calls sliding_attention."""
    w, n = f.get("window"), f["n_layers"]
    if family.window == "none" or w is None:
        return None
    if family.window == "all":
        return (int(w),) * n
    types = _layer_types(cfg, f)
    if types is None:
        return None
    out = tuple(int(w) if t == "sliding_attention" else None for t in types)
    return None if all(x is None for x in out) else out


def _rope_bases(family: Family, cfg: dict[str, Any], f: dict[str, Any]) -> tuple | None:
    """Per-layer RoPE base where the family reads a `local_rope_base` (Gemma 3): that base on
    the sliding_attention layers, `rope_base` on the others; None: `rope_base` everywhere."""
    local = f.get("local_rope_base")
    types = None if local is None or family.window != "layer_types" else _layer_types(cfg, f)
    if types is None:
        return None
    g = float(f["rope_base"])
    return tuple(float(local) if t == "sliding_attention" else g for t in types)


def _rope_scalings(family: Family, cfg: dict[str, Any], f: dict[str, Any], where: str):
    """(rope_scaling, rope_scalings): RoPE scaling on every layer, or one per layer. Read from
    `rope_parameters`, updated by an older config's `rope_scaling` as transformers does; for a
    family with RoPE parameters per layer type (Gemma 3), `rope_parameters.<layer type>` on
    each layer of that type, the old `rope_scaling` on the full_attention layers only."""
    params, legacy = cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise ValueError(f"{where}: rope_parameters and rope_scaling must be dicts")
    key = "rope_scaling" if legacy else "rope_parameters"
    n_max = cfg.get("max_position_embeddings")
    if family.rope_alpha and ntk_alpha(cfg) is not None:  # a fixed base: the family's derive
        return None, None
    if not family.rope_by_layer_type:
        return rope_scaling_from({**params, **legacy}, where, key, max_positions=n_max,
                                 original_max=cfg.get("original_max_position_embeddings")), None  # fmt: skip
    types = _layer_types(cfg, f) or ["full_attention"] * f["n_layers"]
    by_type = {}
    for t in dict.fromkeys(types):
        mine = {**(params.get(t) or {}), **(legacy if t == "full_attention" else {})}
        by_type[t] = rope_scaling_from(mine, where, f"rope_parameters.{t}", max_positions=n_max)
    per_layer = tuple(by_type[t] for t in types)
    if len(set(per_layer)) == 1:
        return per_layer[0], None
    return None, per_layer


def read_weights(d: Path, auto: str = "AutoModelForCausalLM") -> dict[str, Tensor]:
    """Every tensor of `model.safetensors`, or of the shards `model.safetensors.index.json`
    lists; ValueError for a shard that lacks a tensor its index promises. A folder of PyTorch
    pickle files (pytorch_model.bin) is a FileNotFoundError saying how to convert it with
    transformers' `auto` class."""
    if (d / WEIGHTS).is_file():
        return read_safetensors(d / WEIGHTS)
    if not (d / INDEX).is_file():
        found = sorted(p.name for p in d.iterdir())
        pickles = [n for n in found if n.startswith("pytorch_model") and ".bin" in n]
        if pickles:
            here = str(d).replace("'", "\\'")
            raise FileNotFoundError(
                f"{d} holds PyTorch pickle weights ({', '.join(pickles[:3])}"
                f"{', …' if len(pickles) > 3 else ''}) but no {WEIGHTS}: qkv does not read "
                "pickle files, as loading one can run code; convert them once with "
                f'transformers, which writes {WEIGHTS} beside them: python -c "from '
                f"transformers import {auto} as M; M.from_pretrained('{here}')"
                f".save_pretrained('{here}')\""
            )
        raise FileNotFoundError(f"{d} has no {WEIGHTS} nor {INDEX}; it holds {found[:20]}")
    weight_map = read_json(d / INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{d / INDEX} has no weight_map")
    out: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = read_safetensors(d / shard)
        if dup := sorted(set(part) & set(out)):
            raise ValueError(f"{d / shard} repeats tensors of another shard: {dup[:5]}")
        out.update(part)
    if absent := sorted(k for k in weight_map if k not in out):
        raise ValueError(f"{d / INDEX}: " + _misplaced(d, absent, weight_map))
    return out


def _misplaced(d: Path, absent: list[str], weight_map: dict[str, str]) -> str:
    """Why the tensors `absent` are not in the shards `weight_map` points them to: each shard
    named, and the folder's other .safetensors file that holds the tensor, if one does."""
    from safetensors import SafetensorError, safe_open

    listed = set(weight_map.values())
    holders: dict[str, str] = {}
    for f in sorted(d.glob("*.safetensors")):
        if f.name in listed:
            continue
        try:
            with safe_open(str(f), "pt") as handle:
                keys = set(handle.keys())
        except (SafetensorError, OSError, RuntimeError):  # unreadable: it holds nothing to name
            continue
        holders.update({k: f.name for k in absent if k in keys and k not in holders})

    def held(k: str) -> str:
        return f" ({holders[k]}, which the index does not list, holds it)" if k in holders else ""

    def one(k: str) -> str:
        return f"{k!r} → {weight_map[k]}{held(k)}"

    n = len(absent)
    if n == 1:
        k = absent[0]
        says = f"maps tensor {k!r} to {weight_map[k]}, but that shard lacks it{held(k)}"
    else:
        more = ", …" if n > 3 else ""
        says = (f"maps {n} tensors to shards that lack them: {', '.join(map(one, absent[:3]))}"
                f"{more}")  # fmt: skip
    return says + "; is the index the one saved with these shards?"


def strip_prefixes(
    state: dict[str, Tensor], prefixes: tuple[str, ...], source: str
) -> dict[str, Tensor]:
    """`state` with each key's first matching prefix of `prefixes` removed (the base model's
    name inside a *ForCausalLM); ValueError when two keys then share a name."""
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        short = next((key.removeprefix(p) for p in prefixes if p and key.startswith(p)), key)
        if short in out:
            raise ValueError(f"{source}: two tensors are both {short!r} once {prefixes} are "
                             f"stripped (one is {key!r}); the file mixes two layouts")  # fmt: skip
        out[short] = t
    return out


def file_names(
    raw: Iterable[str], prefixes: tuple[str, ...], family: Family
) -> Callable[[str], str]:
    """How the file whose keys are `raw` names a key of the state `load_dir` converts (its
    `prefixes` stripped, `family.stacked` / `family.unstacked` applied): its own key where it
    holds that key; else the key as the family's weight map names it, under the prefix the
    file's keys of the same module carry ('layers.0.mlp.up_proj.weight' beside
    'model.layers.1.…': 'model.layers.0.mlp.up_proj.weight'), else under the prefix most of its
    prefixed keys carry, or for the output head (lm_head, beside the base model) the longest of
    `prefixes` that prefix starts with ('language_model.' beside 'language_model.model.')."""
    own: dict[str, str] = {}
    for key in raw:
        p = next((p for p in prefixes if p and key.startswith(p)), "")
        own.setdefault(key.removeprefix(p), key)
    by_module: dict[str, str] = {}
    counts: dict[str, int] = {}
    for short, key in own.items():
        p = key[: len(key) - len(short)]
        by_module.setdefault(short.split(".")[0], p)
        if p:
            counts[p] = counts.get(p, 0) + 1
    main = max(counts, key=counts.get, default="")  # the base model's, if the file uses one
    outer = max((p for p in prefixes if p != main and main.startswith(p)), key=len, default="")
    heads = {w.src.split(".")[0] for w in family.weights if w.dst.startswith("lm_head")}
    renamed = [(_pattern(dst), src) for src, dst in (*family.stacked, *family.unstacked)]

    def name(key: str) -> str:
        if key in own:
            return own[key]
        for pattern, src in renamed:  # one tensor of the file, or a run of them, under its name
            if m := pattern.fullmatch(key):
                key = src.format(m["layer"])
                break
        module = key.split(".")[0]
        if module in by_module:
            return by_module[module] + key
        return (outer if module in heads else main) + key

    return name


def _pattern(template: str) -> re.Pattern[str]:
    """`template` ('layers.{}.experts.*.w') as a regex: `{}` the layer, `*` any index."""
    return re.compile(
        re.escape(template).replace(r"\{\}", r"(?P<layer>\d+)").replace(r"\*", r"\d+")
    )


def rules(family: Family, config: Any) -> list[Rule]:
    """The family's weight map for this config (`families_base.weight_rules`)."""
    return weight_rules(family.weights, config, RESHAPES)


def load_dir(
    path: str | Path,
    *,
    name: str | None = None,
    need_tokenizer: bool = False,
    dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """A Hugging Face checkpoint directory → an eval-mode `Decoder` or `Encoder` (with
    `load_report`, and the tokenizer when tokenizer.json is there), in `dtype` (None: float32;
    see `qkv.nn.cast` for what stays float32)."""
    dtype = as_dtype(dtype)
    d = Path(path).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {d}")
    cfg = read_json(d / CONFIG)
    family = family_of(cfg, str(d / CONFIG))
    prefixes, key_of = (family.prefix,), None
    if family.wrapper is not None:  # a multimodal checkpoint: its language model only
        wrapper, top = family.wrapper, cfg
        cfg = wrapper.config(cfg, str(d / CONFIG))
        prefixes = wrapper.prefixes
        name = name or f"{d.resolve().name} (text model)"

        def key_of(key: str) -> str:
            return wrapper.key_of(top, key)

    name = name or d.resolve().name
    config = build_config(family, cfg, name=name, where=str(d / CONFIG), key_of=key_of)
    config = generation_ends(d, config)
    tokenizer = None
    if (d / TOKENIZER).is_file():
        said = next((k for k in family.fields.get("vocab_size", ()) if config_at(cfg, k)
                     is not None), "vocab_size")  # fmt: skip
        limit = (config.vocab_size, f"{d / CONFIG}'s {(key_of or str)(said)}")
        tokenizer = Tokenizer.from_file(d / TOKENIZER, max_length=config.max_positions,
                                        pad_id=cfg.get("pad_token_id"), name=name,
                                        vocab_limit=limit)  # fmt: skip
    elif need_tokenizer:
        raise FileNotFoundError(f"{d} has no {TOKENIZER}")
    auto = {"encoder": "AutoModel"}.get(family.kind, "AutoModelForCausalLM")
    if family.wrapper is not None:
        auto = "AutoModelForImageTextToText"
    raw = read_weights(d, auto)  # memory-mapped from the files
    state = strip_prefixes(raw, prefixes, str(d))
    if family.wrapper is not None and config.tie_embeddings and "lm_head.weight" in state:
        # transformers ties lm_head to the embedding only where the file holds no other one
        config = dataclasses.replace(config, tie_embeddings=False)
    with empty_modules():  # no memory, no random init: every tensor is assigned below
        if family.kind == "encoder":
            model = Encoder(config, tokenizer)
        else:
            model = Decoder(config, tokenizer, _chat_template(d))
        cast(model, dtype)  # on the meta device: `convert` then casts each tensor it loads
    check_fits(model, str(d))  # before any tensor is dequantised, stacked or converted
    try:  # MXFP4 pairs (gpt-oss's experts, X_blocks + X_scales) → X, as transformers holds it
        state = dict(Dequantized(state, dtype))
    except ValueError as e:
        raise ValueError(f"{d}: {e}") from e
    state = stack_numbered(state, family.stacked)
    state = unstack(state, family.unstacked)
    model.load_report = convert(
        state, rules(family, config), model, n_layers=config.n_layers, ignore=family.ignore,
        source=str(d), assign=True, expected=f"{with_article(family.model_type)} checkpoint of this config.json",
        hint="is the file complete, and is config.json the one saved with it?",
        file_key=file_names(raw, prefixes, family),
    )  # fmt: skip
    # fused W_Q|W_K|W_V (and gate|up): one matmul, no copy per forward
    accelerate(model)
    page_out(unread(raw.values(), model))
    return model.eval()


def unread(tensors: Iterable[Tensor], model: nn.Module) -> list[Tensor]:
    """The `tensors` no parameter or buffer of `model` starts inside: checkpoint tensors the
    model copied (cast to another dtype, fused into W_Q|W_K|W_V or gate|up) and reads no more.
    `gguf.page_out` drops their pages of the memory-mapped file from the resident set, so RSS
    shows what the model holds (a bfloat16 model read as bfloat16: the file's size, not 1.6×)."""
    live = sorted(t.data_ptr() for t in model.state_dict(keep_vars=True).values())
    out = []
    for t in tensors:
        start = t.data_ptr()
        i = bisect.bisect_left(live, start)
        if i == len(live) or live[i] >= start + t.numel() * t.element_size():
            out.append(t)
    return out


class _SkipInit(TorchFunctionMode):
    """Returns a meta tensor unchanged from `normal_`, the one random init that costs on the meta
    device: torch's meta `normal_` (what `nn.Embedding.reset_parameters` calls) imports
    torch._dynamo on its first call, 1.5 s of minilm's 1.6 s load. A meta tensor holds no
    values, so skipping its fill changes nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NORMAL_:
            t = args[0] if args else kwargs.get("tensor")  # init.normal_ passes it by name
            if isinstance(t, Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


_NORMAL_ = frozenset({nn.init.normal_, Tensor.normal_})


@contextlib.contextmanager
def empty_modules() -> Iterator[None]:
    """Build modules inside on the meta device (no memory), without their random init: for a
    loader that assigns every tensor afterwards (`convert(..., assign=True)`)."""
    with torch.device("meta"), _SkipInit():
        yield


def _chat_template(d: Path) -> str | None:
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "tokenizer_config.json").is_file():
        t = read_json(d / "tokenizer_config.json").get("chat_template")
        return t if isinstance(t, str) else None
    return None
