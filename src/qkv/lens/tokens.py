"""Tokens of a text and finding one by its string.

A token string matches a *whole word* of the text (so "it" never matches inside "item"); the
match resolves to the last token of that word — for a word split into pieces, the piece that
has read the whole word (which is what a causal model's query can rely on). Special tokens
([CLS], [SEP], <|im_start|>) have empty character spans and match their own string.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

from .record import Token, token_list


@cache
def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's `bytes_to_unicode`, inverted):
    printable Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100.."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


def token_bytes(tok: str) -> bytes | None:
    """The bytes a token string stands for under byte-level BPE ('ĠðŁ' → b' \xf0\x9f') or
    byte fallback ('<0xF0>'), or None when it is not such a string."""
    m = _BYTE_TOKEN.fullmatch(tok)
    if m:
        return bytes([int(m.group(1), 16)])
    table = _byte_alphabet()
    if not tok or any(c not in table for c in tok):
        return None
    return bytes(table[c] for c in tok)


def make_tokens(
    text: str, tokens: Sequence[str], offsets: Sequence[tuple[int, int]]
) -> list[Token]:
    """Tokens with their character spans (the tokenizer's offsets) and their exact UTF-8 byte
    spans, disjoint and in order. A byte-level tokenizer may split one character over several
    tokens (🎉 = 4 bytes); each such token's bytes are found by matching its string's bytes
    against the text where the previous token ended, and its `text` is a label that names the
    part: ' 🎉[1-2/4]' holds a space and bytes 1–2 of the 4 of 🎉, '🎉[3/4]' its third byte.
    Tokens whose bytes cannot be matched (WordPiece '##s', lower-cased text) take the bytes of
    their character span, which such tokenizers never split."""
    data = text.encode("utf-8")
    cb = [0]  # cb[c]: byte offset of character c
    for ch in text:
        cb.append(cb[-1] + len(ch.encode("utf-8")))
    out, cursor = [], 0
    for idx, (tok, (s, e)) in enumerate(zip(tokens, offsets, strict=True)):
        s, e = int(s), int(e)
        if e <= s:  # a special token: its own string, an empty span
            out.append(Token(idx, tok, s, e, cb[s], cb[s]))
            continue
        lo = max(cursor, cb[s]) if cursor < cb[e] else cb[s]
        piece = token_bytes(tok)
        if piece and data[lo : lo + len(piece)] == piece:
            bs, be = lo, lo + len(piece)
        else:
            bs, be = lo, cb[e]
        cursor = be
        out.append(_token(idx, text, cb, bs, be))
    return out


def _token(idx: int, text: str, cb: list[int], bs: int, be: int) -> Token:
    """The token of bytes [bs, be): its characters and a label with any partial character."""
    c0 = bisect.bisect_right(cb, bs) - 1  # the character holding byte bs
    c1 = bisect.bisect_left(cb, be)  # one past the character holding byte be-1
    label = []
    for c in range(c0, c1):
        a, b = max(bs, cb[c]) - cb[c] + 1, min(be, cb[c + 1]) - cb[c]
        n = cb[c + 1] - cb[c]
        if a == 1 and b == n:
            label.append(text[c])
        else:
            label.append(f"{text[c]}[{a}/{n}]" if a == b else f"{text[c]}[{a}-{b}/{n}]")
    return Token(idx, "".join(label), c0, c1, bs, be)


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


def match_word(tokens: Sequence[Token], text: str, word: str) -> tuple[list[list[int]], bool]:
    """Every occurrence of `word` as a list of token indices (a special token: its own list),
    in order; exact case first, ignoring case only when nothing matches (the bool says so)."""
    w = word.strip()
    if not w:
        return [], False
    specials = [[t.index] for t in tokens if t.special and t.text == w]
    for ignore_case in (False, True):
        found = [
            f for f in (span_tokens(tokens, sp) for sp in word_spans(text, w, ignore_case)) if f
        ]
        if found or specials:
            return sorted(specials + found, key=lambda f: f[-1]), ignore_case
    return [], False


def occurrences(tokens: Sequence[Token], text: str, word: str) -> list[list[int]]:
    """Every occurrence of `word` as a list of token indices (see `match_word`)."""
    return match_word(tokens, text, word)[0]


def _few(xs: list[int], n: int = 12) -> str:
    """'[1, 5]', or '[1, 5, …, 99]' past n items."""
    return str(xs) if len(xs) <= n else "[" + ", ".join(map(str, xs[: n - 1])) + f", …, {xs[-1]}]"


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


@dataclass(frozen=True)
class Pick:
    """How a token was chosen: `index`, and for a word, every occurrence (token indices each),
    which one (`occurrence`, from 1) and whether the match ignored case."""

    index: int
    word: str | None = None
    found: tuple[tuple[int, ...], ...] = ()
    occurrence: int = 1
    ignore_case: bool = False

    def note(self, tokens: Sequence[Token], what: str, option: str) -> str | None:
        """One line saying what was chosen when the choice was not the only one possible
        (repeats, a word split into pieces, several words, a case-insensitive match); else None."""
        if self.word is None:
            return None
        t = tokens[self.index]
        said = []
        if len(self.found) > 1:
            where = _few([o[-1] for o in self.found])[1:-1]
            said.append(
                f"{self.word!r} occurs {len(self.found)} times (tokens {where}); this is the "
                f"{_ordinal(self.occurrence)} (token {self.index}); pick another with {option}"
            )
        span = self.found[self.occurrence - 1]
        if len(span) > 1:
            pieces = "|".join(tokens[k].text for k in span).strip()
            several = len(self.word.split()) > 1
            said.append(
                f"{self.word!r} is {'several words' if several else 'split into pieces'} "
                f"({len(span)} tokens: {pieces!r}); the {what} is the last of them, "
                f"{t.text.strip()!r} (token {self.index})"
            )
        if self.ignore_case:
            said.append(f"{self.word!r} matched {t.text.strip()!r} ignoring case")
        return (f"The {what}: " + "; ".join(said) + ".") if said else None


def index_in(what: str, x: int, n: int, unit: str) -> int:
    """A 0-based index into n things; negative counts from the end (-1 = the last), as Python does.

    Raises IndexError naming both valid ranges."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{what} must be an int, got {type(x).__name__}")
    if not -n <= x < n:
        raise IndexError(
            f"{what} {x} out of range: there are {n} {unit}; valid 0..{n - 1}, or -{n}..-1 "
            "counting from the end"
        )
    return x % n


def pick_token(
    tokens: Sequence[Token],
    text: str,
    token: str | int,
    occurrence: int = 1,
    what: str = "token",
    option: str = "occurrence",
) -> Pick:
    """Which token `token` names: an index (negative counts from the end), or a word of the
    text — its `occurrence`-th whole-word match (from 1; negative counts from the end), resolved
    to the last token of the match. `what` and `option` name the token and its occurrence
    argument in errors.

    Raises ValueError listing the tokens when it is absent, IndexError for a bad index."""
    n = len(tokens)
    if isinstance(token, bool) or not isinstance(token, int | str):
        raise TypeError(f"{what} must be a token string or an index, got {type(token).__name__}")
    if isinstance(token, int):
        return Pick(index_in(f"{what} index", token, n, "tokens in the text"))
    if isinstance(occurrence, bool) or not isinstance(occurrence, int) or occurrence == 0:
        raise ValueError(
            f"{option} counts from 1 (negative from the end: -1 = the last), got {occurrence!r}"
        )
    occ, ignore_case = match_word(tokens, text, token)
    if not occ:
        raise ValueError(
            f"{what} {token!r} is not in the text. Its tokens are: {token_list(list(tokens))}. "
            f"Pass one of these words, or its position ({what} index)."
        )
    if not -len(occ) <= occurrence <= len(occ):
        raise ValueError(
            f"{what} {token!r} occurs {len(occ)} time(s) (tokens {_few([o[-1] for o in occ])}); "
            f"{option} must be in [1, {len(occ)}] (or -{len(occ)}..-1 from the end), got {occurrence}"
        )
    k = occurrence - 1 if occurrence > 0 else len(occ) + occurrence
    return Pick(occ[k][-1], token, tuple(tuple(o) for o in occ), k + 1, ignore_case)


def find_token(
    tokens: Sequence[Token], text: str, token: str | int, occurrence: int = 1, what: str = "token"
) -> int:
    """The index of `token` (see `pick_token`)."""
    return pick_token(tokens, text, token, occurrence, what).index


def sink_tokens(tokens: Sequence[Token], query: int) -> list[int]:
    """The keys a lookup often parks weight on regardless of content: the first token, the
    special tokens ([CLS], [SEP]) and the query itself. The record keeps them in every head
    whatever their rank, and the "focused heads" view looks past them."""
    return sorted({0, query} | {t.index for t in tokens if t.special})
