"""`compare(text_a, text_b, token=...)`: how one token's lookups moved between two texts.

Both texts are explained (`qkv.lens.explain`, every key kept) by the same model. Keys are
matched between the texts by aligning their token sequences (`align_tokens`: the longest
matching runs of identical tokens, difflib's), so a word inserted or removed in one text
shifts the positions of the keys after it without unmatching them. For every layer and head
the record holds, per matched key pair, the weight and the contribution in each text; the
movement is b − a.

A causal model's query at position i sees only tokens 0..i. When the two texts are the same up
to and including the query, its lookups cannot differ; `compare` measures that they do not and
compares at the first token where the texts differ instead (the seed's "excited" / "round").
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .explain import _check_range, dtype_note, explain, resolve_model, summarize
from .io import write_atomic
from .record import ExplainResult, Head, ModelSummary, Query, Token, dtype_words

SCHEMA = "qkv.compare/1"


@dataclass(eq=False)
class HeadMove:
    """Query's lookup through one head in text a and text b, over the matched keys.

    `index` (k,) are the matched keys' positions in text a and `index_b` (k,) the same keys'
    positions in text b, for the pairs the query sees in either text; `weight_a`, `weight_b`,
    `contribution_a`, `contribution_b` (k,) their values (0 where a causal query cannot see
    the key). `unmatched_a`/`unmatched_b`: the weight on keys with no match."""

    layer: int
    head: int
    index: np.ndarray
    index_b: np.ndarray
    weight_a: np.ndarray
    weight_b: np.ndarray
    contribution_a: np.ndarray
    contribution_b: np.ndarray
    unmatched_a: float
    unmatched_b: float

    @property
    def delta_weight(self) -> np.ndarray:
        return self.weight_b - self.weight_a

    @property
    def delta_contribution(self) -> np.ndarray:
        return self.contribution_b - self.contribution_a

    @property
    def moved(self) -> float:
        """max_j |Δweight_j| over the matched keys."""
        return float(np.abs(self.delta_weight).max(initial=0.0))

    def __repr__(self) -> str:
        return f"<HeadMove layer {self.layer} head {self.head}: max |Δweight| {self.moved:.3f}>"


@dataclass(frozen=True)
class Mover:
    """One (layer, head, key) row of the movers table: the key at position `key` in text a
    and `key_b` in text b."""

    layer: int
    head: int
    key: int
    key_b: int
    weight_a: float
    weight_b: float
    contribution_a: float
    contribution_b: float

    @property
    def delta_weight(self) -> float:
        return self.weight_b - self.weight_a

    @property
    def delta_contribution(self) -> float:
        return self.contribution_b - self.contribution_a


@dataclass(eq=False)
class CompareResult:
    """How one query's lookups moved from text a to text b. Build with `qkv.compare`; save with
    `.to_json()`; print with `.render()` or `str()`."""

    model: ModelSummary
    text_a: str
    text_b: str
    tokens_a: list[Token]
    tokens_b: list[Token]
    query_a: Query
    query_b: Query
    matched: list[int]  # positions in text a of the keys matched in text b (see align_tokens)
    matched_b: list[int]  # their positions in text b
    heads: list[HeadMove]
    asked: Query | None = None  # the asked-for query, when a causal model moved the comparison
    asked_max_delta: float | None = None  # measured max |Δweight| of the asked-for query
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        best = max(self.heads, key=lambda h: h.moved)
        return (
            f"<CompareResult {self.model.name}: query {self.query_a.text.strip()!r}@"
            f"{self.query_a.index} vs {self.query_b.text.strip()!r}@{self.query_b.index}, "
            f"{len(self.matched)} matched keys, {len(self.heads)} heads; most moved: layer "
            f"{best.layer} head {best.head} (max |Δweight| {best.moved:.3f})>"
        )

    def head(self, layer: int, head: int) -> HeadMove:
        for h in self.heads:
            if (h.layer, h.head) == (layer, head):
                return h
        have = sorted({h.layer for h in self.heads})
        raise IndexError(f"layer {layer} head {head} is not in this comparison (layers {have})")

    def movers(self, n: int | None = 10, by: str = "weight") -> list[Mover]:
        """(layer, head, key) rows ranked by |Δweight| (or |Δcontribution| with by='contribution')."""
        if by not in ("weight", "contribution"):
            raise ValueError(f"by must be 'weight' or 'contribution', got {by!r}")
        rows = [
            Mover(
                h.layer,
                h.head,
                int(j),
                int(h.index_b[r]),
                *(
                    float(x[r])
                    for x in (h.weight_a, h.weight_b, h.contribution_a, h.contribution_b)
                ),
            )
            for h in self.heads
            for r, j in enumerate(h.index)
        ]
        rows.sort(key=lambda m: -abs(m.delta_weight if by == "weight" else m.delta_contribution))
        return rows if n is None else rows[:n]

    def to_dict(self) -> dict:
        def toks(ts: list[Token]) -> list[dict]:
            return [{"index": t.index, "text": t.text, "start": t.start, "end": t.end} for t in ts]

        return {
            "schema": SCHEMA,
            "model": self.model.__dict__,
            "texts": [self.text_a, self.text_b],
            "tokens": [toks(self.tokens_a), toks(self.tokens_b)],
            "query": [q.__dict__ for q in (self.query_a, self.query_b)],
            "asked": None
            if self.asked is None
            else {**self.asked.__dict__, "max_delta_weight": self.asked_max_delta},
            "matched": list(self.matched),
            "matched_b": list(self.matched_b),
            "heads": [
                {
                    "layer": h.layer,
                    "head": h.head,
                    "index": h.index.tolist(),
                    "index_b": h.index_b.tolist(),
                    "weight": [h.weight_a.tolist(), h.weight_b.tolist()],
                    "contribution": [h.contribution_a.tolist(), h.contribution_b.tolist()],
                    "unmatched_weight": [h.unmatched_a, h.unmatched_b],
                }
                for h in self.heads
            ],
            "notes": list(self.notes),
        }

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int | None = None) -> str:
        """The "qkv.compare/1" document as a string; with `path`, also written atomically."""
        s = json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)
        if path is not None:
            write_atomic(path, s + "\n")
        return s

    def render(self, console: Any = None, *, n: int = 10) -> None:
        """Print the notes and the top movers (rich)."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        qa, qb = (q.text.strip() for q in (self.query_a, self.query_b))
        name = self.model.name + (f" ({self.model.dtype})" if dtype_words(self.model) else "")
        console.print(f"{name}: {qa!r} (token {self.query_a.index}) in A vs "
                      f"{qb!r} (token {self.query_b.index}) in B")  # fmt: skip
        console.print(f"A: {self.text_a}\nB: {self.text_b}")
        for note in self.notes:
            console.print(f"• {note}")
        t = Table(title=f"top {n} movers by |Δweight| (b − a), matched keys")
        for col in ("layer", "head", "key", "weight A→B", "Δweight", "contrib A→B", "Δcontrib"):
            t.add_column(col, justify="left" if col == "key" else "right")
        for m in self.movers(n):
            at = f"{m.key}" if m.key == m.key_b else f"{m.key}→{m.key_b}"
            t.add_row(str(m.layer), str(m.head), f"{self.tokens_a[m.key].text.strip()!r}@{at}",
                      f"{m.weight_a:.2f}→{m.weight_b:.2f}", f"{m.delta_weight:+z.2f}",
                      f"{m.contribution_a:.2f}→{m.contribution_b:.2f}",
                      f"{m.delta_contribution:+z.2f}")  # fmt: skip
        console.print(t)

    def __str__(self) -> str:
        import io

        from rich.console import Console

        buf = io.StringIO()
        self.render(Console(file=buf, width=120, color_system=None, force_terminal=False))
        return buf.getvalue()


def _row(h: Head, n: int, what: str) -> np.ndarray:
    """The head's full row (n,) of `what` from a record that kept every key it sees."""
    if len(h.index) < h.n_keys:
        raise ValueError(
            f"head {h.head} kept {len(h.index)} of its {h.n_keys} keys; compare needs every "
            "key: explain with top=0"
        )
    out = np.zeros(n)
    out[h.index] = getattr(h, what)
    return out


def align_tokens(a: list[Token], b: list[Token]) -> list[tuple[int, int]]:
    """Pairs (i, j), increasing in both, of tokens a[i] and b[j] with the same text: the
    longest matching runs of the two token sequences (difflib.SequenceMatcher, no junk
    heuristic). "The dog ran" vs "The big dog ran" → (0, 0), (1, 2), (2, 3)."""
    sm = difflib.SequenceMatcher(None, [t.text for t in a], [t.text for t in b], autojunk=False)
    return [(m.a + k, m.b + k) for m in sm.get_matching_blocks() for k in range(m.size)]


def compare_records(a: ExplainResult, b: ExplainResult) -> CompareResult:
    """The movement between two records of the same model (made with top=0), per layer and
    head, over the keys matched by `align_tokens`. Equivalent naive code, per head::

        pairs = align_tokens(ta, tb)                       # [(i, j), ...]
        delta_weight = [row_b[j] - row_a[i] for i, j in pairs]   # rows from output_attentions
    """
    if a.model != b.model:
        raise ValueError(
            f"the records come from different models ({a.model.name} and {b.model.name}); "
            "compare two records of the same model"
        )
    na, nb = len(a.tokens), len(b.tokens)
    pairs = align_tokens(a.tokens, b.tokens)
    heads_b = {(lay.layer, h.head): h for lay in b.layers for h in lay.heads}
    if set(heads_b) != {(lay.layer, h.head) for lay in a.layers for h in lay.heads}:
        raise ValueError("the two records hold different layers or heads; explain both alike")
    moves = []
    for lay in a.layers:
        for ha in lay.heads:
            hb = heads_b[(lay.layer, ha.head)]
            wa, wb = _row(ha, na, "weight"), _row(hb, nb, "weight")
            ca, cb = _row(ha, na, "contribution"), _row(hb, nb, "contribution")
            seen = [(i, j) for i, j in pairs if i < ha.n_keys or j < hb.n_keys]
            ia, ib = (np.array(x, dtype=np.int64).reshape(-1) for x in zip(*seen, strict=True)) \
                if seen else (np.zeros(0, np.int64), np.zeros(0, np.int64))  # fmt: skip
            moves.append(HeadMove(lay.layer, ha.head, ia, ib, wa[ia], wb[ib], ca[ia], cb[ib],
                                  float(wa.sum() - wa[ia].sum()),
                                  float(wb.sum() - wb[ib].sum())))  # fmt: skip
    return CompareResult(a.model, a.text, b.text, a.tokens, b.tokens, a.query, b.query,
                         [i for i, _ in pairs], [j for _, j in pairs], moves)  # fmt: skip


def compare(
    text_a: str,
    text_b: str,
    token: str | int,
    *,
    model: Any = "smollm2",
    occurrence: int = 1,
    layer: int | None = None,
    head: int | None = None,
    progress: bool | None = None,
) -> CompareResult:
    """How `token`'s lookups moved from `text_a` to `text_b`: per layer and head, each matched
    key's weight and contribution in both texts (keys matched by `align_tokens`).

    Args:
        text_a, text_b: the two texts; `token` must occur in both.
        token, occurrence, layer, head, progress: as for `qkv.lens.explain`.
        model: one model for both texts (a name, a checkpoint directory, or a loaded model).

    For a causal model whose texts are the same up to and including the query, the query's
    lookups cannot differ: both are measured and the largest |Δweight| kept in
    `asked_max_delta`, then the comparison moves to the first token where the texts differ
    (at the same position in both), named in the notes.

    Equivalent naive code (transformers): `out_b.attentions[l][0, h, i_b, matched_b] -
    out_a.attentions[l][0, h, i_a, matched]`.

    Raises ValueError for an empty text, a token missing from either text (naming which),
    identical texts, or (causal, same up to the query) one text being a prefix of the other.
    """
    for what, t in (("text_a", text_a), ("text_b", text_b)):
        if not isinstance(t, str):
            raise TypeError(f"{what} must be a str, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"{what} is empty: pass two texts to compare")
    if text_a == text_b:
        raise ValueError("text_a and text_b are identical: nothing can move; change one of them")
    m = resolve_model(model)
    name = model if isinstance(model, str) and not os.path.isdir(model) else None
    info = summarize(m, name)  # the ranges are the model's, not either text's: checked once
    _check_range("layer", layer, info.n_layers, info.name)
    _check_range("head", head, info.n_heads, info.name)

    def run(text: str, which: str, tok: str | int) -> ExplainResult:
        try:
            r = explain(text, tok, model=m, occurrence=occurrence, layer=layer, head=head, top=0,
                        progress=progress)  # fmt: skip
        except (ValueError, IndexError) as e:
            raise type(e)(f"{which}: {e}") from None
        if name is not None:  # the record names the model as asked, as explain does
            r.model = ModelSummary(**{**r.model.__dict__, "name": name})
        return r

    a, b = run(text_a, "text_a", token), run(text_b, "text_b", token)
    result = compare_records(a, b)
    i = a.query.index
    same = {j for j, jb in zip(result.matched, result.matched_b, strict=True) if j == jb}
    prefix = i == b.query.index and all(j in same for j in range(i + 1))  # tokens 0..i alike
    if a.model.causal and prefix:
        delta = max((h.moved for h in result.heads), default=0.0)
        d = next((j for j in range(i + 1, min(len(a.tokens), len(b.tokens)))
                  if a.tokens[j].text != b.tokens[j].text), None)  # fmt: skip
        q = a.query.text.strip()
        if d is None:
            shorter = "text_a" if len(a.tokens) < len(b.tokens) else "text_b"
            raise ValueError(
                f"{a.model.name} is causal and the texts differ only after {shorter} ends, so "
                f"no token of both sees the difference; extend {shorter}"
            )
        a2, b2 = run(text_a, "text_a", d), run(text_b, "text_b", d)
        asked = a.query
        result = compare_records(a2, b2)
        result.asked, result.asked_max_delta = asked, delta
        wa, wb = (r.tokens[d].text.strip() for r in (a2, b2))
        result.notes.append(
            f"{a.model.name} is causal and both texts are the same up to and including {q!r} "
            f"(token {i}), so its lookups cannot differ: measured max |Δweight| = {delta:.2g} "
            f"over {len(result.heads)} heads. Compared instead at the first token that differs: "
            f"{wa!r} (A) vs {wb!r} (B), token {d}."
        )
    for which, toks, got in (("A", a.tokens, result.matched), ("B", b.tokens, result.matched_b)):
        left = sorted(set(range(len(toks))) - set(got))
        if left:
            shown = ", ".join(f"{toks[j].text.strip()!r}@{j}" for j in left[:6])
            more = f" and {len(left) - 6} more" if len(left) > 6 else ""
            result.notes.append(f"Keys of {which} with no match in the other text: {shown}{more}.")
    if (half := dtype_note(result.model)) is not None:
        result.notes.append(half)
    qa, qb = result.query_a.index, result.query_b.index
    seen = [(i, j) for i, j in zip(result.matched, result.matched_b, strict=True)
            if not result.model.causal or i <= qa or j <= qb]  # fmt: skip
    moved = sum(i != j for i, j in seen)
    if moved:
        of = " the query sees" if result.model.causal else ""
        result.notes.append(
            f"{moved} matched keys{of} stand at other positions in B (tokens inserted or "
            "removed before them); they are matched by aligning the two token sequences."
        )
    return result
