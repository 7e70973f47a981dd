"""Head search: which heads route a pronoun to its antecedent (Clark et al. 2019 style).

Each example is a Winograd-style sentence with a query (the pronoun), two or more candidate
antecedents and the answer; minimal pairs differ in one word (`word`) that flips the answer:
"The dog chased the ball because it was excited / round." A head predicts the candidate that
receives the most weight from the query (weights summed over the candidate's tokens); its
accuracy is compared with the nearest-candidate baseline (the candidate closest before the
query), which scores exactly 50% on minimal pairs.

For a causal model the pronoun has not read the deciding word, so its lookups are identical
in both sentences of a pair: every head scores 50% at the pronoun. The search therefore also
scores the query at the deciding word, which has read both candidates and itself.

Data format (JSONL, one object a line; the bundled set is qkv/data/winograd.jsonl):
    {"id": "p01a", "pair": "p01", "text": "The dog chased the ball because it was excited.",
     "query": "it", "candidates": ["dog", "ball"], "answer": "dog", "word": "excited"}
`id`, `pair` and `word` are optional; the query, candidates and word must be whole words of
the text, and each candidate must occur before the query.
"""

from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from tqdm.auto import tqdm

from .explain import no_tokenizer, resolve_model, run_capture, summarize
from .lookup import rows
from .record import ModelSummary
from .tokens import make_tokens, occurrences, word_spans

DATA_PATH = Path(__file__).resolve().parent.parent / "data" / "winograd.jsonl"
AT = ("query", "word")  # where a head is scored: at the pronoun, at the deciding word


@dataclass(frozen=True)
class Example:
    text: str
    query: str
    candidates: tuple[str, ...]
    answer: str
    word: str | None = None
    pair: str | None = None
    id: str | None = None


def _validate(d: Any, where: str) -> Example:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: each line must be a JSON object, got {type(d).__name__}")
    for name in ("text", "query", "answer"):
        if not isinstance(d.get(name), str) or not d[name].strip():
            raise ValueError(
                f"{where}: field {name!r} must be a non-empty string, got {d.get(name)!r}"
            )
    cands = d.get("candidates")
    if (
        not isinstance(cands, list)
        or len(cands) < 2
        or not all(isinstance(c, str) and c.strip() for c in cands)
    ):
        raise ValueError(
            f"{where}: 'candidates' must be a list of at least two words, got {cands!r}"
        )
    if d["answer"] not in cands:
        raise ValueError(f"{where}: answer {d['answer']!r} is not one of the candidates {cands}")
    for name in ("word", "pair", "id"):
        if d.get(name) is not None and not isinstance(d[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {d[name]!r}")
    text = d["text"]
    q = word_spans(text, d["query"])
    if not q:
        raise ValueError(f"{where}: query {d['query']!r} is not a word of {text!r}")
    for c in cands:
        sp = word_spans(text, c)
        if not sp or sp[0][0] >= q[-1][0]:
            raise ValueError(
                f"{where}: candidate {c!r} must occur in the text before the query {d['query']!r}"
            )
    if d.get("word") is not None and not word_spans(text, d["word"]):
        raise ValueError(f"{where}: word {d['word']!r} is not a word of {text!r}")
    return Example(
        text, d["query"], tuple(cands), d["answer"], d.get("word"), d.get("pair"), d.get("id")
    )


def load_examples(path: str | os.PathLike | None = None) -> list[Example]:
    """Read and validate a JSONL data set (default: the bundled Winograd-style pairs)."""
    p = Path(path) if path is not None else DATA_PATH
    if not p.is_file():
        raise FileNotFoundError(f"no data file at {str(p)!r}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not JSON ({e.msg}); expected one object per line") from e
        out.append(_validate(d, f"{p}:{n}"))
    if not out:
        raise ValueError(
            f"{p} holds no examples (expected JSONL lines with text, query, candidates, answer)"
        )
    return out


ALPHA = 0.05  # a head beats chance when its corrected p-value is below this


def chance_counts(n_candidates: np.ndarray) -> np.ndarray:
    """The exact distribution (n+1,) of how many of n sentences a random guesser gets right,
    sentence e right with probability 1/n_candidates[e] (a Poisson binomial; a convolution)."""
    pmf = np.ones(1)
    for k in np.asarray(n_candidates, dtype=float):
        pmf = np.concatenate((pmf * (1 - 1 / k), [0.0])) + np.concatenate(([0.0], pmf / k))
    return pmf


def corrected_p(correct: np.ndarray, pmf: np.ndarray, n_heads: int) -> np.ndarray:
    """P(the best of `n_heads` independent random guessers gets at least `correct` right) for
    each count in `correct`: 1 − F(c−1)^n_heads (Šidák's correction, exact for independent
    heads; conservative when heads are correlated, which lowers the best of them)."""
    cdf = np.concatenate(([0.0], np.cumsum(pmf)))  # cdf[c] = P(X ≤ c − 1)
    below = np.clip(cdf[np.asarray(correct, dtype=int)], 0.0, 1.0)
    return 1.0 - below**n_heads


def chance_best(pmf: np.ndarray, n_heads: int, q: float) -> float:
    """The q-quantile of the best accuracy among `n_heads` independent random guessers."""
    cdf = np.minimum(np.cumsum(pmf), 1.0)
    return float(np.searchsorted(cdf**n_heads, q) / (len(pmf) - 1))


@dataclass
class HeadScores:
    """Accuracy of every head at one position (`at`: "query" or "word"), shape (layers, heads),
    with its null: how well the best of as many random guessers would do."""

    at: str
    n: int
    accuracy: np.ndarray  # (l h)
    answer_weight: np.ndarray  # (l h) mean weight on the answer's tokens
    other_weight: np.ndarray  # (l h) mean weight on the other candidates' tokens
    baseline: float  # nearest candidate
    n_pairs: int = 0
    pair_accuracy: np.ndarray | None = None  # (l h): both sentences of a pair right
    baseline_pair: float = 0.0
    margin: np.ndarray | None = None  # (l h) mean weight gap between its two top candidates
    chance: np.ndarray | None = None  # (n+1,) pmf of a random guesser's correct count

    @property
    def p_value(self) -> np.ndarray:
        """(l h) chance of the best of all L·H random guessers doing at least as well."""
        assert self.chance is not None
        L, H = self.accuracy.shape
        return corrected_p(np.rint(self.accuracy * self.n), self.chance, L * H)

    @property
    def beats_chance(self) -> np.ndarray:
        return self.p_value < ALPHA

    def chance_best(self, q: float) -> float:
        """The q-quantile (0.5: median, 0.95) of the best of L·H random guessers' accuracy."""
        assert self.chance is not None
        return chance_best(self.chance, self.accuracy.size, q)

    def best(self, n: int = 10) -> list[tuple[int, int, float]]:
        """(layer, head, accuracy) of the n best heads (ties: higher answer weight first)."""
        L, H = self.accuracy.shape
        order = sorted(
            ((lay, h) for lay in range(L) for h in range(H)),
            key=lambda t: (-self.accuracy[t], -(self.answer_weight[t] - self.other_weight[t])),
        )
        return [(lay, h, float(self.accuracy[lay, h])) for lay, h in order[:n]]


@dataclass
class HeadSearch:
    model: ModelSummary
    data: str
    n_examples: int
    scores: dict[str, HeadScores]
    skipped: list[str] = field(default_factory=list)

    def render(self, console: Console | None = None, n: int = 10) -> None:
        render(self, console, n)

    def __str__(self) -> str:
        buf = io.StringIO()
        render(self, Console(file=buf, width=110, color_system=None, force_terminal=False))
        return buf.getvalue()


@dataclass
class _Prepared:
    ex: Example
    ids: list[int]
    pos: dict[str, int]  # "query"/"word" → token index
    cands: list[list[int]]  # token indices of each candidate (its first occurrence)
    answer: int


def _prepare(ex: Example, tokenizer: Any, where: str) -> _Prepared | str:
    enc = tokenizer.encode(ex.text)
    toks = make_tokens(ex.text, enc.tokens, enc.offsets)
    cands = []
    for c in ex.candidates:
        occ = occurrences(toks, ex.text, c)
        if not occ:
            return f"{where}: candidate {c!r} not found among the tokens"
        cands.append(occ[0])
    last = max(t[-1] for t in cands)
    qs = [o[-1] for o in occurrences(toks, ex.text, ex.query) if o[-1] > last]
    if not qs:
        return f"{where}: no query {ex.query!r} after the candidates"
    pos = {"query": qs[0]}
    if ex.word is not None:
        ws = [o[-1] for o in occurrences(toks, ex.text, ex.word) if o[-1] > last]
        if ws:
            pos["word"] = ws[0]
    return _Prepared(ex, list(enc.ids), pos, cands, ex.candidates.index(ex.answer))


def head_search(
    model: Any = "smollm2", data: str | os.PathLike | None = None, *, progress: bool | None = None
) -> HeadSearch:
    """Rank every head by how often the query sends most weight to the right antecedent.

    One forward per example under capture; rows recomputed exactly for the query (and the
    deciding word). Returns a `HeadSearch` with accuracies at "query" and at "word"."""
    if progress is None:
        progress = sys.stderr.isatty()
    examples = load_examples(data)  # before the (slow) model load
    m = resolve_model(model)
    info = summarize(m, model if isinstance(model, str) and not os.path.isdir(model) else None)
    if getattr(m, "tokenizer", None) is None:
        raise no_tokenizer(info.name)
    src = str(data) if data is not None else "bundled winograd.jsonl"
    L, H = info.n_layers, info.n_heads
    correct = {a: np.zeros((len(examples), L, H), dtype=bool) for a in AT}
    wans = {a: np.zeros((len(examples), L, H)) for a in AT}
    woth = {a: np.zeros((len(examples), L, H)) for a in AT}
    gap = {a: np.zeros((len(examples), L, H)) for a in AT}
    base = {a: np.zeros(len(examples), dtype=bool) for a in AT}
    n_cands = np.zeros(len(examples), dtype=int)
    have = {a: np.zeros(len(examples), dtype=bool) for a in AT}
    skipped = []
    bar = tqdm(
        examples,
        desc=f"heads ({info.name})",
        unit="sentence",
        delay=1.0,
        disable=not progress,
        file=sys.stderr,
    )
    with torch.inference_mode():
        for e, ex in enumerate(bar):
            prep = _prepare(ex, m.tokenizer, ex.id or f"example {e + 1}")
            if isinstance(prep, str):
                skipped.append(prep)
                continue
            at = list(prep.pos)
            stop = max(prep.pos.values()) + 1 if info.causal else len(prep.ids)
            recs = run_capture(m, prep.ids[:stop], layers=list(range(L)), progress=False)
            for rec in recs:
                w = rows(rec, [prep.pos[a] for a in at]).double().cpu().numpy()  # (h r j)
                cw = np.stack([w[:, :, c].sum(-1) for c in prep.cands], -1)  # (h r c)
                pred = cw.argmax(-1)  # (h r)
                for r, a in enumerate(at):
                    correct[a][e, rec.layer] = pred[:, r] == prep.answer
                    wans[a][e, rec.layer] = cw[:, r, prep.answer]
                    woth[a][e, rec.layer] = np.delete(cw[:, r], prep.answer, -1).sum(-1)
                    two = np.sort(cw[:, r], -1)[:, -2:]  # (h 2): the runner-up, the chosen
                    gap[a][e, rec.layer] = two[:, 1] - two[:, 0]
            n_cands[e] = len(prep.cands)
            for a in at:
                have[a][e] = True
                dist = [abs(prep.pos[a] - c[-1]) for c in prep.cands]
                base[a][e] = int(np.argmin(dist)) == prep.answer
    scores = {}
    for a in AT:
        sel = have[a]
        if not sel.any():
            continue
        sc = HeadScores(
            at=a,
            n=int(sel.sum()),
            accuracy=correct[a][sel].mean(0),
            answer_weight=wans[a][sel].mean(0),
            other_weight=woth[a][sel].mean(0),
            baseline=float(base[a][sel].mean()),
            margin=gap[a][sel].mean(0),
            chance=chance_counts(n_cands[sel]),
        )
        pairs: dict[str, list[int]] = {}
        for e, ex in enumerate(examples):
            if ex.pair is not None and sel[e]:
                pairs.setdefault(ex.pair, []).append(e)
        full = [v for v in pairs.values() if len(v) == 2]
        if full:
            a_idx, b_idx = np.array([v[0] for v in full]), np.array([v[1] for v in full])
            sc.n_pairs = len(full)
            sc.pair_accuracy = (correct[a][a_idx] & correct[a][b_idx]).mean(0)
            sc.baseline_pair = float((base[a][a_idx] & base[a][b_idx]).mean())
        scores[a] = sc
    return HeadSearch(
        model=info, data=src, n_examples=len(examples), scores=scores, skipped=skipped
    )


def chance_line(sc: HeadScores) -> str:
    """What random guessing scores on these sentences, best of as many heads as the model has."""
    m = sc.accuracy.size
    n_beat = int(sc.beats_chance.sum())
    return (
        f"Chance: {m} heads guessing at random on these {sc.n} sentences — the best of them "
        f"scores {sc.chance_best(0.5):.1%} (median), {sc.chance_best(1 - ALPHA):.1%} (95th "
        f"percentile). {n_beat} of {m} heads beat that (p < {ALPHA}, corrected for {m} heads; "
        "marked *)."
    )


def _table(s: HeadSearch, sc: HeadScores, n: int, title: str) -> Table:
    t = Table(
        title=title,
        title_justify="left",
        caption="p: the chance that the best of all the model's heads, each guessing at random, "
        "does at least as well. margin: in each sentence, the weight on the head's chosen "
        "candidate minus that on the runner-up, averaged over the sentences (not 'weight on "
        "answer' minus 'on the other', which average over right and wrong choices alike).",
        caption_justify="left",
    )
    # headers broken by hand: left to rich, the wrapped headers were measured back wider than
    # the widths it gave them, and the table overflowed 80 columns (its last column cropped)
    for col in (
        "rank",
        "layer",
        "head",
        "accuracy",
        "p",
        "pairs\nboth\nright",
        "weight\non\nanswer",
        "on the\nother",
        "margin",
    ):
        t.add_column(col, justify="right", min_width=9 if col == "accuracy" else None)
    p = sc.p_value
    for rank, (lay, h, acc) in enumerate(sc.best(n), 1):
        pa = "—" if sc.pair_accuracy is None else f"{sc.pair_accuracy[lay, h]:.0%}"
        beat = p[lay, h] < ALPHA
        mark = Text(f"{acc:.1%}{' *' if beat else '  '}", style="bold" if beat else "")
        gap = sc.margin[lay, h] if sc.margin is not None else float("nan")
        t.add_row(
            str(rank), str(lay), str(h), mark, f"{p[lay, h]:.2g}", pa,
            f"{sc.answer_weight[lay, h]:.3f}", f"{sc.other_weight[lay, h]:.3f}", f"{gap:.3f}",
        )  # fmt: skip
    return t


def render(s: HeadSearch, console: Console | None = None, n: int = 10) -> None:
    c = console or Console()
    m = s.model
    kind = "causal decoder" if m.causal else "bidirectional encoder"
    c.print(
        f"[bold]qkv heads[/] · {m.name} ({kind}, {m.n_layers} layers × {m.n_heads} heads) · {s.n_examples} sentences from {s.data}"
    )
    c.print(
        "A head predicts the candidate that gets the most weight from the query; the baseline predicts the nearest candidate before it."
    )
    for msg in s.skipped:
        c.print(Text(f"skipped: {msg}", style="yellow"))
    q = s.scores.get("query")
    if q is not None:
        c.print(
            f"\nAt the pronoun ({q.n} sentences, {q.n_pairs} minimal pairs): baseline {q.baseline:.1%}"
            + (f", pairs both right {q.baseline_pair:.0%}" if q.n_pairs else "")
        )
        flat = bool(q.accuracy.min() == q.accuracy.max())
        if m.causal:
            spread = (
                f"{q.accuracy.min():.1%}"
                if flat
                else f"{q.accuracy.min():.1%}–{q.accuracy.max():.1%}"
            )
            c.print(
                Text(
                    f"{m.name} is causal: at the pronoun it has not yet read the word that decides the "
                    'referent ("excited" vs "round" comes after "it"), so both sentences of a pair give '
                    f"identical lookups and no head can tell them apart: every head scores {spread}, "
                    "never both sentences of a pair. The reference is resolved later, at the deciding "
                    "word — scored below.",
                    style="cyan",
                )
            )
        if not (m.causal and flat):
            c.print(chance_line(q))
            c.print(_table(s, q, n, "Best heads at the pronoun"))
    w = s.scores.get("word")
    if w is not None:
        c.print(
            f"\nAt the deciding word ({w.n} sentences, {w.n_pairs} minimal pairs): baseline {w.baseline:.1%}"
            + (f", pairs both right {w.baseline_pair:.0%}" if w.n_pairs else "")
        )
        c.print(chance_line(w))
        c.print(
            _table(
                s, w, n, "Best heads at the deciding word (it has read both candidates and itself)"
            )
        )
