"""One encoder for the BERT-style families (BERT, RoBERTa, DistilBERT): config, model, sentence
embeddings. A family is an `EncoderConfig` (read from its checkpoint by `models/hf.py`).

    ids (b i) → word + position (+ token-type) embeddings → LayerNorm
              → n_layers × post-norm [LN(x + attn(x)), LN(h + mlp(h))]  (bidirectional
                attention with a key padding mask) → last hidden state (b i m)
    embed(texts) = L2-normalise(mean of the last hidden state over real tokens)

Letters: b batch, i position, m model dim.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._validate import positive_ints
from ..nn import ACTIVATIONS, MLP, MultiHeadAttention, PostNormBlock
from ..nn.varlen import run_blocks, unpadded
from .tokenizer import Tokenizer, ids_shape


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of a post-norm bidirectional encoder (BERT, RoBERTa, DistilBERT); defaults are
    all-MiniLM-L6-v2's. `type_vocab_size=0`: no token-type embedding (DistilBERT).
    `position_offset`: token i reads position embedding i + offset (RoBERTa: pad_id + 1)."""

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
    position_offset: int = 0
    layer_norm_eps: float = 1e-12
    act: str = "gelu"  # erf form
    pad_id: int = 0
    causal: bool = False

    def __post_init__(self) -> None:
        positive_ints(
            "EncoderConfig",
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
        if self.type_vocab_size < 0 or self.position_offset < 0:
            raise ValueError(
                f"EncoderConfig: type_vocab_size and position_offset must be ≥ 0, got "
                f"{self.type_vocab_size}, {self.position_offset}"
            )
        if self.act not in ACTIVATIONS:
            raise ValueError(
                f"EncoderConfig: act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}"
            )
        if self.n_heads * self.d_head != self.d_model:
            raise ValueError(
                f"an encoder needs n_heads·d_head == d_model, got {self.n_heads}·{self.d_head} != {self.d_model}"
            )
        if self.n_kv_heads != self.n_heads:
            raise ValueError(
                f"these encoders have no GQA: n_kv_heads must equal n_heads={self.n_heads}, got {self.n_kv_heads}"
            )
        if self.causal:
            raise ValueError("an encoder is bidirectional: causal must be False")


class Encoder(nn.Module):
    """A BERT-style encoder on `qkv.nn.MultiHeadAttention`.

    `model(ids (b i), attention_mask=(b i) bool)` → last hidden state (b i m); padded positions
    (mask False) are never attended to, and their own rows are 0: a padded batch runs on its
    real tokens only (`qkv.nn.varlen`). `model.embed(texts)`
    → (n, m) unit-norm mean-pooled sentence embeddings. `model.tokenizer` encodes text.
    """

    def __init__(
        self,
        config: EncoderConfig,
        tokenizer: Tokenizer | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        c = self.config = config
        self.tokenizer = tokenizer
        fk = {"device": device}  # device="meta": no storage, no init (the loader assigns weights)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model, **fk)
        self.embed_positions = nn.Embedding(c.max_positions + c.position_offset, c.d_model, **fk)
        self.embed_types = None
        if c.type_vocab_size:
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
        S, c = ids.shape[1], self.config
        pos = self.embed_positions(
            torch.arange(c.position_offset, c.position_offset + S, device=ids.device)
        )
        if token_type_ids is not None and self.embed_types is None:
            raise ValueError(f"{c.name} has no token types: pass token_type_ids=None")
        if self.embed_types is None:
            x = self.embed_tokens(ids) + pos
        elif token_type_ids is None:  # all type 0: fold it into the (i m) position term
            x = self.embed_tokens(ids) + (pos + self.embed_types.weight[0])
        else:
            x = self.embed_tokens(ids) + pos + self.embed_types(token_type_ids)
        x = self.embed_norm(x)
        if keep is None or bool(keep.all()):
            for blk in self.blocks:
                x = blk(x)
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
