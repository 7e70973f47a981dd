"""A small trainable decoder over a symbolic vocabulary, built from `qkv.nn.MultiHeadAttention`,
and its checkpoint format (written by `qkv train`, read back by `qkv.load(directory)`).

    ids (b i) → embed + positions → n_layers × [x + attn(LN(x)), x + mlp(LN(x)) if d_mlp] → LN
              → unembed → logits (b i v)

Attention-only by default (`d_mlp=0`). `projections` chooses how W_Q, W_K, W_V relate — the
experiment behind the seed's claim that they must be three separate jobs:

    "separate"  W_Q, W_K, W_V independent (the standard)
    "tied_qk"   W_K is W_Q (one Parameter): scores x_i·W·Wᵀ·x_j, a symmetric form
    "tied_qkv"  W_K and W_V are W_Q
    "no_v"      V = X: W_V is a fixed identity split (head h reads features h·d .. (h+1)·d − 1);
                needs n_kv_heads·d_head == d_model

Generation (`generate`, `generate_ids`: greedy or sampled, KV cache, context limit) is the
loop every decoder shares, `models.generate.Generation`; this model brings its symbol text layer.

A checkpoint is a directory with `config.json` ({"format": "qkv.tiny/1", "config": {...}, ...})
and `model.safetensors` (tied tensors stored once, under W_Q). Both files are replaced
atomically, with Ctrl-C held back between the two renames, so an interrupted save leaves the
previous checkpoint intact.

Letters: b batch, i position, m model dim, v vocabulary, h head, d head dim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from ..nn import KVCache, MultiHeadAttention, RotaryEmbedding
from .files import save_safetensors
from .generate import Generation, deliver
from .tokenizer import Encoding, ids_shape

FORMAT = "qkv.tiny/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROJECTIONS = ("separate", "tied_qk", "tied_qkv", "no_v")
POSITIONS = ("learned", "rope")


def _positive_int(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{owner}: {name} must be positive, got {value}")


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of a tiny decoder. `n_kv_heads` defaults to n_heads, `d_head` to
    d_model // n_heads; `d_mlp=0` means attention-only."""

    vocab: tuple[str, ...]
    max_positions: int
    n_layers: int = 2
    n_heads: int = 2
    n_kv_heads: int | None = None
    d_model: int = 64
    d_head: int | None = None
    d_mlp: int = 0
    projections: str = "separate"
    positions: str = "learned"
    causal: bool = True
    bias: bool = False
    name: str = "tiny"

    def __post_init__(self) -> None:
        own = "TinyConfig"
        vocab = tuple(self.vocab) if isinstance(self.vocab, list | tuple) else self.vocab
        if not isinstance(vocab, tuple) or not vocab:
            raise ValueError(
                f"{own}: vocab must be a non-empty sequence of token strings, got {self.vocab!r}"
            )
        bad = [t for t in vocab if not isinstance(t, str) or not t or t.split() != [t]]
        if bad:
            raise ValueError(
                f"{own}: vocab tokens must be non-empty strings without spaces, got {bad[:5]}"
            )
        if len(set(vocab)) != len(vocab):
            dup = sorted({t for t in vocab if vocab.count(t) > 1})
            raise ValueError(f"{own}: vocab has duplicate tokens {dup[:5]}")
        object.__setattr__(self, "vocab", vocab)
        for name in ("max_positions", "n_layers", "n_heads", "d_model"):
            _positive_int(own, name, getattr(self, name))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"{own}: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set d_head explicitly"
                )
            object.__setattr__(self, "d_head", self.d_model // self.n_heads)
        _positive_int(own, "n_kv_heads", self.n_kv_heads)
        _positive_int(own, "d_head", self.d_head)
        if not isinstance(self.d_mlp, int) or isinstance(self.d_mlp, bool) or self.d_mlp < 0:
            raise ValueError(
                f"{own}: d_mlp must be an int ≥ 0 (0 = attention-only), got {self.d_mlp!r}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"{own}: n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.projections not in PROJECTIONS:
            raise ValueError(
                f"{own}: projections must be one of {PROJECTIONS}, got {self.projections!r}"
            )
        if self.projections.startswith("tied") and self.n_kv_heads != self.n_heads:
            raise ValueError(
                f"{own}: projections={self.projections!r} shares W_Q's tensor, which needs "
                f"n_kv_heads == n_heads, got {self.n_kv_heads} and {self.n_heads}"
            )
        if self.projections == "no_v" and self.n_kv_heads * self.d_head != self.d_model:
            raise ValueError(
                f"{own}: projections='no_v' (V = X split across heads) needs n_kv_heads·d_head == "
                f"d_model, got {self.n_kv_heads}·{self.d_head} = {self.n_kv_heads * self.d_head} "
                f"vs d_model={self.d_model}"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"{own}: positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.positions == "rope" and self.d_head % 2:
            raise ValueError(f"{own}: positions='rope' needs an even d_head, got {self.d_head}")
        for name in ("causal", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{own}: {name} must be a bool, got {getattr(self, name)!r}")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def eos_id(self) -> None:
        """A symbolic vocabulary has no end token: generation runs to `max_new_tokens` or the
        context."""
        return None

    @property
    def end_ids(self) -> frozenset[int]:
        """No id ends generation (what `Generation` reads)."""
        return frozenset()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["vocab"] = list(self.vocab)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TinyConfig:
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(
                f"config has unknown fields {unknown}; known fields are {sorted(fields)}"
            )
        return cls(**d)


class SymbolTokenizer:
    """Whitespace-separated symbols ("k3 v7 ? k3") ↔ ids; offsets are character spans in the text."""

    def __init__(self, vocab: tuple[str, ...]) -> None:
        self.vocab = tuple(vocab)
        self.token_to_id = {t: i for i, t in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> Encoding:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids, tokens, offsets = [], [], []
        pos = 0
        for tok in text.split():
            start = text.index(tok, pos)
            pos = start + len(tok)
            if tok not in self.token_to_id:
                shown = ", ".join(self.vocab[:8]) + (", …" if len(self.vocab) > 8 else "")
                raise ValueError(
                    f"unknown token {tok!r} at characters {start}..{pos}; this model's "
                    f"{len(self.vocab)} tokens are {shown} (space-separated)"
                )
            ids.append(self.token_to_id[tok])
            tokens.append(tok)
            offsets.append((start, pos))
        if not ids:
            raise ValueError(
                "empty text: give space-separated tokens, e.g. " + " ".join(self.vocab[:3])
            )
        return Encoding(ids=ids, tokens=tokens, offsets=offsets)

    def decode(self, ids: list[int] | Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < len(self.vocab)]
        if bad:
            raise ValueError(f"token ids {bad[:5]} out of range 0..{len(self.vocab) - 1}")
        return " ".join(self.vocab[i] for i in ids)


def tie_projections(attn: MultiHeadAttention, projections: str) -> None:
    """Make `attn` share or drop projections in place (see the module docstring)."""
    if projections in ("tied_qk", "tied_qkv"):
        attn.W_K = attn.W_Q  # the same Parameter under two names: one tensor, summed gradients
        if attn.b_Q is not None:
            attn.b_K = attn.b_Q
    if projections == "tied_qkv":
        attn.W_V = attn.W_Q
        if attn.b_Q is not None:
            attn.b_V = attn.b_Q
    if projections == "no_v":
        k, m, d = attn.W_V.shape
        eye = (
            torch.eye(m).view(m, k, d).transpose(0, 1).contiguous()
        )  # (k m d): x[:, k·d + c] → v_k[c]
        del attn.W_V
        attn.register_buffer("W_V", eye, persistent=False)
        if attn.b_V is not None:
            del attn.b_V
            attn.register_buffer("b_V", torch.zeros(k, d), persistent=False)


class Block(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)) when the model has an MLP."""

    def __init__(self, cfg: TinyConfig, rope: RotaryEmbedding | None) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = MultiHeadAttention(
            cfg.d_model,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.d_head,
            bias=cfg.bias,
            rope=rope,
            causal=cfg.causal,
        )
        tie_projections(self.attn, cfg.projections)
        self.mlp = None
        if cfg.d_mlp:
            self.ln2 = nn.LayerNorm(cfg.d_model)
            self.mlp = nn.Sequential(
                nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias),
                nn.GELU(),
                nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias),
            )

    def forward(self, x: Tensor, *, mask: Tensor | None, cache) -> Tensor:
        x = x + self.attn(self.ln1(x), mask=mask, cache=cache)  # (b i m)
        if self.mlp is not None:
            x = x + self.mlp(self.ln2(x))
        return x


class TinyTransformer(Generation, nn.Module):
    """The tiny decoder. `model(ids (b i), attention_mask=(b j) bool | None, cache=KVCache | None)
    → logits (b i v)`; `model.tokenizer` maps the symbolic text to ids and back. `generate_ids`
    comes from `Generation`, as for every decoder; `generate` continues symbol text."""

    chat_template = None  # symbols, no chat

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        if not isinstance(config, TinyConfig):
            raise TypeError(f"config must be a TinyConfig, got {type(config).__name__}")
        self.config = config
        self.tokenizer = SymbolTokenizer(config.vocab)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = (
            nn.Embedding(config.max_positions, config.d_model)
            if config.positions == "learned"
            else None
        )
        rope = RotaryEmbedding(config.d_head) if config.positions == "rope" else None
        self.blocks = nn.ModuleList(Block(config, rope) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.unembed = nn.Linear(config.d_model, config.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=1.0)
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=1.0)

    def forward(
        self, ids: Tensor, *, attention_mask: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        return self.unembed(self.hidden(ids, attention_mask=attention_mask, cache=cache))  # (b i v)

    def hidden(
        self, ids: Tensor, *, attention_mask: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """The final-LN hidden states (b i m) that `forward` unembeds."""
        cfg = self.config
        B, S = ids_shape(ids)
        start = 0 if cache is None else cache.length
        if start + S > cfg.max_positions:
            raise ValueError(
                f"{start + S} tokens exceed this model's context of max_positions={cfg.max_positions}; "
                "shorten the input"
            )
        if S and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise ValueError(
                f"token ids must lie in 0..{cfg.vocab_size - 1}, got {int(ids.min())}..{int(ids.max())}"
            )
        mask = None
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool or attention_mask.shape != (B, start + S):
                raise ValueError(
                    f"attention_mask must be bool of shape (B, cached + S) = {(B, start + S)}, got "
                    f"{attention_mask.dtype} {tuple(attention_mask.shape)}"
                )
            mask = attention_mask[:, None, None, :]  # (b 1 1 j): key padding
        x = self.embed(ids)  # (b i m)
        if self.pos is not None:
            x = x + self.pos(torch.arange(start, start + S, device=ids.device))
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, cache=None if cache is None else cache[i])
        return self.ln_f(x)  # (b i m)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 1,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        chat: bool = False,
        seed: int | None = None,
        stream: Callable[[str], Any] | bool | None = True,
        truncate: bool = False,
    ) -> Iterator[str] | str:
        """Continue `prompt` (space-separated symbols) with up to `max_new_tokens` tokens, fewer
        when the context (`max_positions`) fills first. The tokens are `generate_ids`' (greedy at
        temperature 0, else sampled over `top_k` with `seed`; KV cache).

        Returns an iterator over the pieces of the continuation, "v7", " v3", ... (joined, its
        text), by default (`stream=True`); `stream=None` returns the joined text, a callable is
        also called with each piece. `truncate=True` keeps the prompt's last `max_positions`
        tokens; a longer prompt is otherwise a ValueError, as is `chat=True` (no template).
        """
        ids = self.encode_prompt(prompt, chat=chat)
        if truncate:
            ids = ids[-self.config.max_positions :]
        new_ids = self.generate_ids(
            ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed
        )
        return deliver(self._pieces(new_ids), stream)

    def encode_prompt(self, prompt: str, *, chat: bool = False) -> list[int]:
        """Symbol text → token ids (ValueError naming an unknown symbol, or for chat=True)."""
        if chat:
            raise ValueError(
                f"{self.config.name} is a symbol model without a chat template; call generate "
                "with chat=False"
            )
        return self.tokenizer.encode(prompt).ids

    def _pieces(self, new_ids: Iterator[int]) -> Iterator[str]:
        """Each new token's symbol, after a space from the one before (none before the first)."""
        for n, i in enumerate(new_ids):
            yield ("" if n == 0 else " ") + self.config.vocab[i]


def checkpoint_tensors(model: TinyTransformer) -> dict[str, Tensor]:
    """The tensors a checkpoint stores: the state dict with each tied parameter once (under the
    first name it has, W_Q) and without fixed buffers (no_v's identity W_V)."""
    state = model.state_dict()
    kept = {
        name for name, _ in model.named_parameters()
    }  # deduplicated: W_K tied to W_Q is dropped
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in state.items() if k in kept or k not in every}


@contextlib.contextmanager
def _hold_interrupts() -> Iterator[None]:
    """Defer Ctrl-C (SIGINT) until the block ends, so a pair of renames is never split.
    Only the main thread can install signal handlers, and only Python's default handler is
    replaced; otherwise this is a no-op."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):  # not the main thread, or Ctrl-C is ignored / handled by someone else: leave it alone
        yield
        return
    caught: list[tuple] = []
    old = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if caught:
            raise KeyboardInterrupt


def writable_dir(path: str | Path) -> Path:
    """Create `path` (and parents) and check a file can be written there; a clear ValueError if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".qkv-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"cannot write a checkpoint to {str(path)!r}: {e.strerror or e}; choose a writable directory"
        ) from e
    return path


def _write_temp(path: Path, write) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: str | Path, text: str) -> None:
    """Write a text file so readers see the old or the new content, never a partial one."""
    path = Path(path)
    tmp = _write_temp(path, lambda p: p.write_text(text, encoding="utf-8"))
    os.replace(tmp, path)


def save_checkpoint(model: TinyTransformer, path: str | Path, *, extra: dict | None = None) -> Path:
    """Write `path/config.json` and `path/model.safetensors` atomically (temp files, then two
    renames with Ctrl-C held back). `extra` goes into config.json next to the config (e.g. the
    task, the step). Returns the directory."""
    path = writable_dir(path)
    doc = {"format": FORMAT, "config": model.config.to_dict(), **(extra or {})}
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in checkpoint_tensors(model).items()
    }
    meta = {"format": FORMAT, **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    tmp_w = _write_temp(path / WEIGHTS_FILE, lambda p: save_safetensors(tensors, p, meta))
    try:
        tmp_c = _write_temp(
            path / CONFIG_FILE,
            lambda p: p.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8"),
        )
    except BaseException:
        tmp_w.unlink(missing_ok=True)
        raise
    with _hold_interrupts():
        os.replace(tmp_w, path / WEIGHTS_FILE)
        os.replace(tmp_c, path / CONFIG_FILE)
    return path


def load_checkpoint(path: str | Path) -> TinyTransformer:
    """A checkpoint directory written by `save_checkpoint` → TinyTransformer (eval, float32).

    Every tensor is checked against the shapes the config implies; a mismatch, a missing or an
    unexpected tensor raises ValueError naming it. Extra config.json entries land in `model.meta`."""
    path = Path(path)
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(
                f"{path} is not a qkv checkpoint: {f.name} is missing (write one with `qkv train`)"
            )
    try:
        doc = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{cfg_file}: expected format {FORMAT!r}, got {got!r}")
    try:
        config = TinyConfig.from_dict(doc.get("config"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: invalid config: {e}") from e
    try:
        tensors = load_file(str(w_file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{w_file}: not a readable safetensors file ({e})") from e
    model = TinyTransformer(config)
    expected = checkpoint_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)}, config implies {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = [f"missing tensors {missing}"] if missing else []
        parts += [f"unexpected tensors {unexpected}"] if unexpected else []
        parts += [f"shape mismatch {w}" for w in wrong[:3]]
        parts += [f"and {len(wrong) - 3} more shape mismatches"] if len(wrong) > 3 else []
        raise ValueError(
            f"checkpoint {path}: config.json and model.safetensors disagree: "
            + "; ".join(parts)
            + " (were the files written by different runs?)"
        )
    with torch.no_grad():
        for k, v in expected.items():
            t = tensors[k]
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"checkpoint {path}: tensor {k} holds non-finite or non-float values"
                )
            v.copy_(t.to(v.dtype))
    model.meta = {k: v for k, v in doc.items() if k not in ("format", "config")}
    return model.eval()


def n_parameters(model: nn.Module) -> int:
    """Trainable parameters, each tied tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "POSITIONS",
    "PROJECTIONS",
    "WEIGHTS_FILE",
    "SymbolTokenizer",
    "TinyConfig",
    "TinyTransformer",
    "checkpoint_tensors",
    "load_checkpoint",
    "n_parameters",
    "save_checkpoint",
    "writable_dir",
    "write_atomic",
]
