"""A thin wrapper over `tokenizers.Tokenizer`: ids, tokens and character offsets (the lens maps
tokens back to text with them), context-length checks, and padded batches.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
from torch import Tensor


@dataclass(frozen=True)
class Encoding:
    """One text: token ids, token strings and (start, end) character offsets into the text.
    Special tokens ([CLS], <s>, ...) have offsets (0, 0)."""

    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class BatchEncoding:
    """Several texts padded to one length S: ids (b s) long, attention_mask (b s) bool
    (True = real token), and each text's own `Encoding` (unpadded)."""

    ids: Tensor
    attention_mask: Tensor
    encodings: list[Encoding]


def no_tokenizer(name: str, *, needs: str, python: str) -> ValueError:
    """The error for text given to a model without a tokenizer (a checkpoint folder without
    tokenizer.json). `needs`: what reads text ("the lens reads text"); `python`: how to do
    without, from Python. Its `cli_text` leaves that advice out (the CLI and the web read text
    only)."""
    fix = (
        f"{name} has no tokenizer (its folder has no tokenizer.json), and {needs}; put the "
        "checkpoint's tokenizer.json beside its config.json"
    )
    e = ValueError(f"{fix}. {python}")
    e.cli_text = fix  # type: ignore[attr-defined]
    return e


def _unreadable(path: Path, e: Exception) -> str:
    """Why the tokenizers library refused `path`, in true words: its own message comes from the
    first field it could not fit, which for a JSON object of another kind reads as a syntax
    error (`{"not": "a tokenizer"}`: "expected `,` or `}` at line 1 column 7")."""
    try:
        doc = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as bad:
        return f"{path} is not valid JSON: {bad}"
    if not isinstance(doc, dict):
        return f"{path} must hold a JSON object (a tokenizers file), got a {type(doc).__name__}"
    if "model" not in doc:
        keys = ", ".join(map(repr, list(doc)[:8])) + (", …" if len(doc) > 8 else "")
        return (
            f'{path} is JSON but not a Hugging Face tokenizers file: it has no "model" field '
            f"(its keys: {keys or 'none'}); use the tokenizer.json saved with the model"
        )
    return f"{path} is not a tokenizer.json that tokenizers {tokenizers.__version__} can read: {e}"


class Tokenizer:
    """`Tokenizer(tk, max_length=512, name="minilm")` wraps a `tokenizers.Tokenizer`.

    The wrapped tokenizer's own truncation and padding settings are switched off (on a copy):
    texts longer than `max_length` tokens (special tokens included) raise a ValueError naming
    the limit unless `truncate=True`. `padding_side` ("right" for encoders, "left" for
    batched generation) and `pad_id` (default: the tokenizer's pad token, else 0) shape
    `encode_batch`. `add_special_tokens` applies the tokenizer's post-processor
    ([CLS] … [SEP] for BERT). `vocab_limit` = (n, what): the model's embeddings take ids below
    n only, as `what` ("config.json's vocab_size") says; a text that encodes to an id ≥ n
    raises a ValueError naming both (`check_ids`), a text that does not encodes as usual.
    """

    def __init__(
        self,
        tk: tokenizers.Tokenizer,
        *,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        pad_id: int | None = None,
        padding_side: str = "right",
        name: str = "model",
        vocab_limit: tuple[int, str] | None = None,
        _copy: bool = True,
        _source: str | None = None,
    ) -> None:
        if not isinstance(tk, tokenizers.Tokenizer):
            raise TypeError(f"tk must be a tokenizers.Tokenizer, got {type(tk).__name__}")
        if max_length is not None and (not isinstance(max_length, int) or max_length <= 0):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        # our own copy with truncation and padding off (from_file's tokenizer is ours already)
        self._tk = tokenizers.Tokenizer.from_str(tk.to_str()) if _copy else tk
        self._tk.no_truncation()
        self._tk.no_padding()
        self._truncating: tokenizers.Tokenizer | None = None
        self.max_length = max_length
        self.add_special_tokens = add_special_tokens
        self.padding_side = padding_side
        self.name = name
        self.vocab_limit = vocab_limit
        self.source = _source or f"{name}'s tokenizer"  # what errors call it: its file, if any
        if pad_id is None:
            pad = tk.padding
            pad_id = pad["pad_id"] if pad else 0
        self.pad_id = int(pad_id)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs) -> Tokenizer:
        """Load a `tokenizer.json`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(_unreadable(path, e)) from e
        return cls(tk, _copy=False, _source=str(path), **kwargs)

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, max_length={self.max_length})"

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (truncation and padding off)."""
        return self._tk

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(i)

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        """`ids` as a list; ValueError when one reaches `vocab_limit`: the tokenizer gives ids
        the model's embeddings do not have, so it is not the model's (a tokenizer whose last
        ids are unused by the model still encodes texts that avoid them)."""
        ids = list(ids)
        if self.vocab_limit is not None and ids and max(ids) >= self.vocab_limit[0]:
            n, what = self.vocab_limit
            raise ValueError(
                f"{self.source}: the text's token ids reach {max(ids)} but {what} is {n}: the "
                "tokenizer does not belong to this checkpoint's embeddings"
            )
        return ids

    def _check_text(self, text: object) -> str:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if text == "":
            raise ValueError("empty text: pass at least one character to tokenize")
        return text

    def _truncator(self) -> tokenizers.Tokenizer:
        if self._truncating is None:
            self._truncating = tokenizers.Tokenizer.from_str(self._tk.to_str())
            self._truncating.no_padding()
            self._truncating.enable_truncation(self.max_length)
        return self._truncating

    def _wrap(self, text: str, enc: tokenizers.Encoding) -> Encoding:
        if all(enc.special_tokens_mask):
            raise ValueError(
                f"text {text!r} produces no tokens (only special tokens); pass some content"
            )
        if self.max_length is not None and len(enc.ids) > self.max_length:
            raise ValueError(
                f"text is {len(enc.ids)} tokens but {self.name} takes at most {self.max_length} "
                "(special tokens included); shorten it or pass truncate=True"
            )
        return Encoding(
            ids=self.check_ids(enc.ids),
            tokens=list(enc.tokens),
            offsets=[tuple(o) for o in enc.offsets],
        )

    def encode(
        self, text: str, *, truncate: bool = False, add_special_tokens: bool | None = None
    ) -> Encoding:
        """Tokenize one text → Encoding(ids, tokens, offsets). Raises ValueError for empty text
        or text beyond `max_length` tokens (unless `truncate=True`, which keeps the first ones)."""
        text = self._check_text(text)
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        tk = self._truncator() if truncate and self.max_length is not None else self._tk
        return self._wrap(text, tk.encode(text, add_special_tokens=special))

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        truncate: bool = False,
        add_special_tokens: bool | None = None,
    ) -> BatchEncoding:
        """Tokenize several texts and pad them to the longest: ids (b s), attention_mask (b s)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("texts is empty: pass at least one text")
        texts = [self._check_text(t) for t in texts]
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        tk = self._truncator() if truncate and self.max_length is not None else self._tk
        encs = [
            self._wrap(t, e)
            for t, e in zip(texts, tk.encode_batch(texts, add_special_tokens=special), strict=True)
        ]
        S = max(len(e) for e in encs)
        ids = torch.full((len(encs), S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), S), dtype=torch.bool)
        for b, e in enumerate(encs):
            sl = slice(0, len(e)) if self.padding_side == "right" else slice(S - len(e), S)
            ids[b, sl] = torch.tensor(e.ids, dtype=torch.long)
            mask[b, sl] = True
        return BatchEncoding(ids=ids, attention_mask=mask, encodings=encs)

    def decode(self, ids: Sequence[int] | Tensor, *, skip_special_tokens: bool = True) -> str:
        """Token ids → text."""
        if isinstance(ids, Tensor):
            if ids.dim() > 1:
                raise ValueError(
                    f"decode takes one sequence of ids, got a tensor of shape {tuple(ids.shape)}"
                )
            ids = ids.tolist()
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)


def ids_shape(ids: object) -> tuple[int, int]:
    """(B, S) of a batch of token ids; TypeError unless it is a (B, S) int64 tensor."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
        got = (
            f"{ids.dtype} {tuple(ids.shape)}"
            if isinstance(ids, torch.Tensor)
            else type(ids).__name__
        )
        raise TypeError(f"ids must be a (B, S) int64 (torch.long) tensor of token ids, got {got}")
    return ids.shape[0], ids.shape[1]
