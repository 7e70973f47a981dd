"""Tokens of a text and finding one by its string.

A token string matches a *whole word* of the text (so "it" never matches inside "item"); the
match resolves to the last token of that word — for a word split into pieces, the piece that
has read the whole word (which is what a causal model's query can rely on). Special tokens
([CLS], [SEP], <|im_start|>) have empty character spans and match their own string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .record import Token, token_list


def make_tokens(
    text: str, tokens: Sequence[str], offsets: Sequence[tuple[int, int]]
) -> list[Token]:
    out = []
    for idx, (tok, (s, e)) in enumerate(zip(tokens, offsets, strict=True)):
        out.append(Token(idx, text[s:e] if e > s else tok, int(s), int(e)))
    return out


def _word_pattern(word: str) -> str:
    pat = re.escape(word)
    if word[:1].isalnum() or word[:1] == "_":
        pat = r"(?<!\w)" + pat
    if word[-1:].isalnum() or word[-1:] == "_":
        pat = pat + r"(?!\w)"
    return pat


def word_spans(text: str, word: str, ignore_case: bool = False) -> list[tuple[int, int]]:
    """Character spans of `word` as a whole word in `text`, in order."""
    flags = re.IGNORECASE if ignore_case else 0
    return [m.span() for m in re.finditer(_word_pattern(word), text, flags)]


def span_tokens(tokens: Sequence[Token], span: tuple[int, int]) -> list[int]:
    """Indices of the (non-special) tokens overlapping the character span, in order."""
    s, e = span
    return [t.index for t in tokens if t.end > t.start and t.start < e and t.end > s]


def occurrences(tokens: Sequence[Token], text: str, word: str) -> list[list[int]]:
    """Every occurrence of `word` as a list of token indices (a special token: its own list)."""
    w = word.strip()
    if not w:
        return []
    specials = [[t.index] for t in tokens if t.special and t.text == w]
    for ignore_case in (False, True):
        found = [span_tokens(tokens, sp) for sp in word_spans(text, w, ignore_case)]
        found = [f for f in found if f]
        if found or specials:
            return sorted(specials + found, key=lambda f: f[-1])
    return []


def find_token(
    tokens: Sequence[Token], text: str, token: str | int, occurrence: int = 1, what: str = "token"
) -> int:
    """The index of `token` (an index, or a word of the text; `occurrence` counts from 1).

    Raises ValueError listing the tokens when it is absent, IndexError for a bad index."""
    n = len(tokens)
    if isinstance(token, bool) or not isinstance(token, int | str):
        raise TypeError(f"{what} must be a token string or an index, got {type(token).__name__}")
    if isinstance(token, int):
        if not -n <= token < n:
            raise IndexError(
                f"{what} index {token} is outside the text's {n} tokens: valid range [0, {n - 1}]"
            )
        return token % n
    if isinstance(occurrence, bool) or not isinstance(occurrence, int) or occurrence < 1:
        raise ValueError(f"occurrence counts from 1, got {occurrence!r}")
    occ = occurrences(tokens, text, token)
    if not occ:
        raise ValueError(
            f"{what} {token!r} is not in the text. Its tokens are: {token_list(list(tokens))}. "
            "Pass one of these words, or an index."
        )
    if occurrence > len(occ):
        raise ValueError(
            f"{what} {token!r} occurs {len(occ)} time(s) (tokens {[o[-1] for o in occ]}); "
            f"occurrence must be in [1, {len(occ)}], got {occurrence}"
        )
    return occ[occurrence - 1][-1]
