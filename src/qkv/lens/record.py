"""The lens' record: what one query token looked up, per layer and head, as typed dataclasses.

The record is the contract between the lens and every view (terminal, PNG, HTML, web). It
serialises to the versioned JSON document "qkv.explain/1" (docs/lens-schema.md) and back.

Keys of a head are held column-wise (numpy arrays, ranked by weight, highest first) so a record
of a 8k-token text with every key kept stays small; `Head.keys` gives them as `Key` objects.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .io import write_atomic

if TYPE_CHECKING:
    from .experts import Routing
    from .neuron import NeuronView

SCHEMA = "qkv.explain/1"


@dataclass(frozen=True)
class Token:
    """One token of the text: `start:end` are the characters it touches and
    `byte_start:byte_end` its own exact UTF-8 bytes (disjoint from every other token's).
    `text` is `source[start:end]`, except where a byte-level tokenizer split a character over
    several tokens: then it labels the part, ' 🎉[1-2/4]' (a space and bytes 1–2 of 🎉's 4).
    A special token such as [CLS] has start == end and carries the tokenizer's own string."""

    index: int
    text: str
    start: int
    end: int
    byte_start: int = -1  # -1: not known (a record written before byte spans)
    byte_end: int = -1

    @property
    def special(self) -> bool:
        return self.start == self.end


@dataclass(frozen=True)
class Query:
    """The token whose lookups are explained (also used for the chosen key of a head search)."""

    index: int
    text: str


@dataclass(frozen=True)
class Key:
    """One key j as seen by the query i through one head h.

    score = q_i·k_j·scale (after RoPE), weight = softmax row entry, contribution =
    ‖weight · v_j W_O^h‖ (the norm of what key j actually added to the head's output).
    """

    index: int
    score: float
    weight: float
    contribution: float


@dataclass(frozen=True)
class LayerKey:
    """Key j for a whole layer: `weight` = mean over heads; `contribution` =
    ‖Σ_h weight_h · v_j^h W_O^h‖ (Kobayashi et al. 2020's layer-level norm)."""

    index: int
    weight: float
    contribution: float


def _arr(x: Any, dtype: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=dtype).reshape(-1))


@dataclass(eq=False)
class Head:
    """Query i's lookup through one head: the kept keys — the top-k by weight and the top-k by
    contribution (all when top=0) — ranked by weight.

    `top_weight`/`top_contribution` are the arg-max key over *all* visible keys, so a sink
    (high weight, small contribution) shows even when the key lists are cut to top-k.
    """

    head: int
    kv_head: int
    entropy: float  # −Σ w log w over the visible keys, in nats
    output_norm: float  # ‖z_i^h W_O^h‖, the head's whole output for the query
    n_keys: int  # keys the query can see (after causal/padding masks)
    top_weight: int
    top_contribution: int
    index: np.ndarray  # (k,) int64, ranked by weight
    score: np.ndarray  # (k,) float64
    weight: np.ndarray  # (k,) float64
    contribution: np.ndarray  # (k,) float64
    sink: float = 0.0  # weight on a learned sink (gpt-oss): the keys' weights sum to 1 − sink

    def __post_init__(self) -> None:
        self.index = _arr(self.index, np.int64)
        self.score, self.weight, self.contribution = (
            _arr(x, np.float64) for x in (self.score, self.weight, self.contribution)
        )
        n = {len(self.index), len(self.score), len(self.weight), len(self.contribution)}
        if len(n) != 1:
            raise ValueError(f"head {self.head}: key columns differ in length {sorted(n)}")

    @property
    def keys(self) -> list[Key]:
        return [
            Key(int(j), float(s), float(w), float(c))
            for j, s, w, c in zip(
                self.index, self.score, self.weight, self.contribution, strict=True
            )
        ]

    @property
    def disagrees(self) -> bool:
        """True when the key with most weight is not the key that carried most content."""
        return self.top_weight != self.top_contribution

    def __repr__(self) -> str:
        return (
            f"<Head {self.head} (kv {self.kv_head}): {len(self.index)} of {self.n_keys} keys kept, "
            f"top weight → token {self.top_weight}, top content → token {self.top_contribution}>"
        )

    def key(self, j: int) -> Key | None:
        hit = np.nonzero(self.index == j)[0]
        if not len(hit):
            return None
        r = int(hit[0])
        return Key(j, float(self.score[r]), float(self.weight[r]), float(self.contribution[r]))


@dataclass(eq=False)
class Layer:
    layer: int
    heads: list[Head]
    top_weight: int  # arg-max of the head-mean weight over all visible keys
    top_contribution: int  # arg-max of the layer-level contribution
    index: np.ndarray  # (k,) ranked by head-mean weight
    weight: np.ndarray
    contribution: np.ndarray

    def __post_init__(self) -> None:
        self.index = _arr(self.index, np.int64)
        self.weight, self.contribution = (
            _arr(x, np.float64) for x in (self.weight, self.contribution)
        )

    def __repr__(self) -> str:
        return (
            f"<Layer {self.layer}: {len(self.heads)} heads, top weight → token {self.top_weight}, "
            f"top content → token {self.top_contribution}>"
        )

    @property
    def keys(self) -> list[LayerKey]:
        return [
            LayerKey(int(j), float(w), float(c))
            for j, w, c in zip(self.index, self.weight, self.contribution, strict=True)
        ]


@dataclass(frozen=True)
class ModelSummary:
    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    causal: bool
    max_positions: int
    # per layer, the (left, right) window its attention applies, None where it is global; None
    # when no layer has one
    windows: tuple[tuple[int | None, int | None] | None, ...] | None = None
    # what the attention does to a score (q·k × scale) before the softmax besides masking, in
    # words ("the score_mod alibi on every layer"); None when the logits are the scores
    score_steps: str | None = None
    # the dtype of the model's attention weights ("float32", "bfloat16", "float16", "float64")
    dtype: str = "float32"


def dtype_words(m: ModelSummary, sep: str = ", ") -> str:
    """The model's dtype for a header, after `sep`; nothing for float32 (the default)."""
    return "" if m.dtype == "float32" else f"{sep}{m.dtype}"


@dataclass(eq=False)
class Rollout:
    """A propagation of the query row through layers 0..through_layer (rows sum to 1): the
    record's `flow` (contribution flow, norm-based) or `rollout` (Abnar & Zuidema 2020, weights
    only); `values[j]` is token j's share. See `qkv.lens.rollout` for both mixings."""

    through_layer: int
    values: np.ndarray  # (n_tokens,)

    def __post_init__(self) -> None:
        self.values = _arr(self.values, np.float64)


@dataclass(eq=False)
class ExplainResult:
    """What one token looked up. Build with `qkv.lens.explain`; save with `.to_json()`,
    `.to_html()`, `.to_png(path)`; print with `.render()` (rich) or `str()`."""

    model: ModelSummary
    text: str
    tokens: list[Token]
    query: Query
    layers: list[Layer]
    top: int  # k of the top-k by weight ∪ top-k by contribution kept per head; 0 = all
    key: Query | None = None  # a chosen key kept in every head (see `heads_to`)
    rollout: Rollout | None = None  # classic rollout, only when asked for
    notes: list[str] = field(default_factory=list)
    flow: Rollout | None = None  # the contribution flow
    neuron: NeuronView | None = None  # the Q·K neuron view of one head and key, when asked for
    experts: Routing | None = None  # a mixture-of-experts model: the query's experts per layer

    def __repr__(self) -> str:
        n_heads = sum(len(lay.heads) for lay in self.layers)
        key = "" if self.key is None else f", key={self.key.text.strip()!r}@{self.key.index}"
        return (
            f"<ExplainResult {self.model.name}: query {self.query.text.strip()!r}@{self.query.index}"
            f"{key} of {len(self.tokens)} tokens, {len(self.layers)} layers × "
            f"{n_heads // max(len(self.layers), 1)} heads, top {self.top or 'all'}; "
            "print() it for the tables>"
        )

    # ---- navigation -------------------------------------------------------------------
    def layer(self, layer: int) -> Layer:
        """The record's layer `layer` (negative counts from the model's last layer)."""
        from .tokens import index_in

        n = index_in("layer", layer, self.model.n_layers, f"layers in {self.model.name}")
        for lay in self.layers:
            if lay.layer == n:
                return lay
        have = [lay.layer for lay in self.layers]
        raise IndexError(f"layer {layer} is not in this record; it holds layers {have}")

    def head(self, layer: int, head: int) -> Head:
        """Head `head` of layer `layer` (negative numbers count from the last)."""
        from .tokens import index_in

        lay = self.layer(layer)
        n = index_in("head", head, self.model.n_heads, f"heads in {self.model.name}")
        for h in lay.heads:
            if h.head == n:
                return h
        raise IndexError(
            f"head {head} is not in layer {lay.layer} of this record; it holds heads {[h.head for h in lay.heads]}"
        )

    def token_index(self, token: str | int, occurrence: int = 1) -> int:
        """A token's index, read as `explain` reads its `token`: an int is a position (negative
        counts from the end), a str a word of the text (its `occurrence`-th whole-word match,
        from 1; a word in pieces resolves to its last piece)."""
        from .tokens import find_token

        return find_token(self.tokens, self.text, token, occurrence, what="token")

    def heads_to(
        self, key: str | int | None = None, n: int | None = None, *, occurrence: int = 1
    ) -> list[tuple[int, int, Key]]:
        """The heads that send the query most to `key` (default: the record's chosen key, else
        read as `token_index` reads it): (layer, head, Key), ranked by weight.

        Exact when every head kept that key: the record's own key, a sink, or a record made
        with `top=0`; otherwise a ValueError names the token index to pass to explain."""
        if key is None:
            if self.key is None:
                raise ValueError("this record has no chosen key; pass one (a word or an index)")
            j = self.key.index
        else:
            j = self.token_index(key, occurrence)
        out = []
        for lay in self.layers:
            for h in lay.heads:
                k = h.key(j)
                if k is None:
                    if j >= h.n_keys and self.model.causal:
                        k = Key(j, float("-inf"), 0.0, 0.0)  # a causal query cannot see j
                    else:
                        raise ValueError(
                            f"layer {lay.layer} head {h.head} did not keep key "
                            f"{self.tokens[j].text.strip()!r} (token {j}) among its top {self.top}; "
                            f"rerun explain with key={j} (an int is the token's position) or top=0"
                        )
                out.append((lay.layer, h.head, k))
        out.sort(key=lambda t: -t[2].weight)
        return out if n is None else out[:n]

    # ---- arrays ------------------------------------------------------------------------
    def to_numpy(self, field: str = "weight") -> np.ndarray:
        """The record's `field` ("weight", "contribution" or "score") as a dense (layers,
        heads, keys) float64 array over the record's layers and heads, in their order; NaN
        where the record holds no number (a key cut by `top`, or one the query cannot see).
        With explain(..., top=0) every visible key is filled."""
        if field not in ("weight", "contribution", "score"):
            raise ValueError(f"field must be 'weight', 'contribution' or 'score', got {field!r}")
        H = max((len(lay.heads) for lay in self.layers), default=0)
        out = np.full((len(self.layers), H, len(self.tokens)), np.nan)
        for a, lay in enumerate(self.layers):
            for b, h in enumerate(lay.heads):
                out[a, b, h.index] = getattr(h, field)
        return out

    def to_pandas(self) -> Any:
        """One row per (layer, head, kept key): layer, head, key, key_text, score, weight,
        contribution. Needs pandas."""
        pd = pandas_module("ExplainResult.to_pandas")
        cols: dict[str, list] = {c: [] for c in ("layer", "head", "key", "key_text", "score",
                                                 "weight", "contribution")}  # fmt: skip
        for lay in self.layers:
            for h in lay.heads:
                n = len(h.index)
                cols["layer"] += [lay.layer] * n
                cols["head"] += [h.head] * n
                cols["key"] += h.index.tolist()
                cols["key_text"] += [self.tokens[j].text for j in h.index]
                cols["score"] += h.score.tolist()
                cols["weight"] += h.weight.tolist()
                cols["contribution"] += h.contribution.tolist()
        return pd.DataFrame(cols)

    # ---- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return to_dict(self)

    def to_json(self, path: str | os.PathLike | None = None, *, indent: int | None = None) -> str:
        """The "qkv.explain/1" document as a string; with `path`, also written atomically."""
        s = json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)
        if path is not None:
            write_atomic(path, s + "\n")
        return s

    @classmethod
    def from_json(cls, source: str | os.PathLike | dict) -> ExplainResult:
        return from_json(source)

    # ---- views (imported lazily: matplotlib and rich cost import time) -----------------
    def to_html(self, path: str | os.PathLike | None = None) -> str:
        from .html import to_html

        return to_html(self, path)

    def _repr_html_(self) -> str:
        from .html import to_html

        return to_html(self, None, fragment=True)

    def to_png(self, path: str | os.PathLike) -> Path:
        from .png import to_png

        return to_png(self, path)

    def render(self, console: Any = None, **kwargs: Any) -> None:
        """Print the rich terminal view (see `qkv.lens.terminal.render`)."""
        from .terminal import render

        render(self, console, **kwargs)

    def __str__(self) -> str:
        from .terminal import render_text

        return render_text(self)


def pandas_module(what: str) -> Any:
    """pandas, or an ImportError that says how to get it (pandas is optional)."""
    try:
        import pandas
    except ImportError:
        raise ImportError(
            f"{what} needs pandas, which is not installed: pip install pandas"
        ) from None
    return pandas


def token_list(tokens: list[Token], limit: int = 80) -> str:
    """'0:"The" 1:" dog" ...' for error messages."""
    shown = " ".join(f"{t.index}:{t.text!r}" for t in tokens[:limit])
    return shown + (f" … ({len(tokens)} tokens)" if len(tokens) > limit else "")


# ---- dict <-> record ------------------------------------------------------------------------


def _f(x: float) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"the record holds a non-finite number {x}; cannot serialise it")
    return x


def _score(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _propagation(p: Rollout | None) -> dict | None:
    return (
        None
        if p is None
        else {"through_layer": p.through_layer, "values": [_f(x) for x in p.values]}
    )


def to_dict(r: ExplainResult) -> dict:
    m = r.model
    return (
        {
            "schema": SCHEMA,
            "model": m.name,
            "model_config": {
                "n_layers": m.n_layers,
                "n_heads": m.n_heads,
                "n_kv_heads": m.n_kv_heads,
                "d_model": m.d_model,
                "d_head": m.d_head,
                "causal": m.causal,
                "max_positions": m.max_positions,
                "windows": None
                if m.windows is None
                else [None if w is None else list(w) for w in m.windows],
                "score_steps": m.score_steps,
                "dtype": m.dtype,
            },
            "text": r.text,
            "tokens": [
                {
                    "index": t.index,
                    "text": t.text,
                    "start": t.start,
                    "end": t.end,
                    "bytes": [t.byte_start, t.byte_end],
                }
                for t in r.tokens
            ],
            "query": {"index": r.query.index, "text": r.query.text},
            "key": None if r.key is None else {"index": r.key.index, "text": r.key.text},
            "top": r.top,
            "layers": [
                {
                    "layer": lay.layer,
                    "top_weight": lay.top_weight,
                    "top_contribution": lay.top_contribution,
                    "keys": [
                        {"index": int(j), "weight": _f(w), "contribution": _f(c)}
                        for j, w, c in zip(lay.index, lay.weight, lay.contribution, strict=True)
                    ],
                    "heads": [
                        {
                            "head": h.head,
                            "kv_head": h.kv_head,
                            "entropy": _f(h.entropy),
                            "output_norm": _f(h.output_norm),
                            "n_keys": h.n_keys,
                            "top_weight": h.top_weight,
                            "top_contribution": h.top_contribution,
                            **({"sink": _f(h.sink)} if h.sink else {}),
                            "keys": [
                                {
                                    "index": int(j),
                                    "score": _score(s),
                                    "weight": _f(w),
                                    "contribution": _f(c),
                                }
                                for j, s, w, c in zip(
                                    h.index, h.score, h.weight, h.contribution, strict=True
                                )
                            ],
                        }
                        for h in lay.heads
                    ],
                }
                for lay in r.layers
            ],
            "rollout": _propagation(r.rollout),
            "flow": _propagation(r.flow),
            "notes": list(r.notes),
        }
        | ({} if r.neuron is None else {"neuron": r.neuron.to_dict()})
        | ({} if r.experts is None else {"experts": r.experts.to_dict()})
    )


class _Reader:
    """Typed access into a parsed document; every failure names the JSON path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, msg: str) -> ValueError:
        return ValueError(f"{self.where}: not a valid {SCHEMA} document: {path} {msg}")

    def get(self, obj: Any, name: str, path: str) -> Any:
        if not isinstance(obj, dict):
            raise self.fail(path, f"must be an object, got {type(obj).__name__}")
        if name not in obj:
            raise self.fail(f"{path}.{name}" if path else name, "is missing")
        return obj[name]

    def integer(self, obj: Any, name: str, path: str, lo: int = 0, hi: int | None = None) -> int:
        x = self.get(obj, name, path)
        p = f"{path}.{name}" if path else name
        if not isinstance(x, int) or isinstance(x, bool):
            raise self.fail(p, f"must be an integer, got {x!r}")
        if x < lo or (hi is not None and x >= hi):
            raise self.fail(p, f"must lie in [{lo}, {hi if hi is not None else '∞'}), got {x}")
        return x

    def num(self, obj: Any, name: str, path: str, nullable: bool = False) -> float:
        x = self.get(obj, name, path)
        if x is None and nullable:
            return float("-inf")
        if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x):
            raise self.fail(f"{path}.{name}", f"must be a finite number, got {x!r}")
        return float(x)

    def string(self, obj: Any, name: str, path: str) -> str:
        x = self.get(obj, name, path)
        if not isinstance(x, str):
            raise self.fail(f"{path}.{name}" if path else name, f"must be a string, got {x!r}")
        return x

    def array(self, obj: Any, name: str, path: str) -> list:
        x = self.get(obj, name, path)
        if not isinstance(x, list):
            raise self.fail(
                f"{path}.{name}" if path else name, f"must be a list, got {type(x).__name__}"
            )
        return x


def from_json(source: str | os.PathLike | dict) -> ExplainResult:
    """Read and validate a "qkv.explain/1" document (a path, a JSON string, or a parsed dict).

    Malformed input raises ValueError naming the offending field; a missing file raises
    FileNotFoundError."""
    if isinstance(source, dict):
        doc, where = source, "<dict>"
    else:
        s = os.fspath(source)
        if isinstance(source, os.PathLike) or not s.lstrip().startswith("{"):
            p = Path(s)
            if not p.is_file():
                raise FileNotFoundError(f"no explain record at {s!r}")
            where, s = str(p), p.read_text(encoding="utf-8")
        else:
            where = "<string>"
        try:
            doc = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e}); expected a {SCHEMA} document") from e
    rd = _Reader(where)
    if not isinstance(doc, dict):
        raise rd.fail("(top level)", f"must be an object, got {type(doc).__name__}")
    schema = doc.get("schema")
    if schema != SCHEMA:
        raise rd.fail("schema", f"must be {SCHEMA!r}, got {schema!r}")
    cfg = rd.get(doc, "model_config", "")
    model = ModelSummary(
        name=rd.string(doc, "model", ""),
        n_layers=rd.integer(cfg, "n_layers", "model_config", 1),
        n_heads=rd.integer(cfg, "n_heads", "model_config", 1),
        n_kv_heads=rd.integer(cfg, "n_kv_heads", "model_config", 1),
        d_model=rd.integer(cfg, "d_model", "model_config", 1),
        d_head=rd.integer(cfg, "d_head", "model_config", 1),
        causal=bool(rd.get(cfg, "causal", "model_config")),
        max_positions=rd.integer(cfg, "max_positions", "model_config", 1),
        windows=_windows(cfg.get("windows"), rd),
        score_steps=_optional_string(cfg, "score_steps", rd),
        dtype=_dtype(cfg, rd),
    )
    text = rd.string(doc, "text", "")
    tokens = []
    for i, t in enumerate(rd.array(doc, "tokens", "")):
        p = f"tokens[{i}]"
        span = t.get("bytes", [-1, -1]) if isinstance(t, dict) else None  # optional
        if (
            not isinstance(span, list)
            or len(span) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= -1 for b in span)
        ):
            raise rd.fail(f"{p}.bytes", f"must be [start, end] byte offsets, got {span!r}")
        tok = Token(
            rd.integer(t, "index", p, i, i + 1),
            rd.string(t, "text", p),
            rd.integer(t, "start", p, 0, len(text) + 1),
            rd.integer(t, "end", p, 0, len(text) + 1),
            *span,
        )
        if tok.end < tok.start:
            raise rd.fail(p, f"has end {tok.end} < start {tok.start}")
        tokens.append(tok)
    n = len(tokens)
    if n == 0:
        raise rd.fail("tokens", "is empty")

    def query(name: str) -> Query | None:
        q = rd.get(doc, name, "")
        if q is None and name == "key":
            return None
        return Query(rd.integer(q, "index", name, 0, n), rd.string(q, "text", name))

    top = rd.integer(doc, "top", "", 0)
    layers = []
    for li, lay in enumerate(rd.array(doc, "layers", "")):
        lp = f"layers[{li}]"
        heads = []
        for hi, h in enumerate(rd.array(lay, "heads", lp)):
            hp = f"{lp}.heads[{hi}]"
            cols: tuple[list, list, list, list] = ([], [], [], [])
            for ki, k in enumerate(rd.array(h, "keys", hp)):
                kp = f"{hp}.keys[{ki}]"
                cols[0].append(rd.integer(k, "index", kp, 0, n))
                cols[1].append(rd.num(k, "score", kp, nullable=True))
                cols[2].append(rd.num(k, "weight", kp))
                cols[3].append(rd.num(k, "contribution", kp))
            heads.append(
                Head(
                    head=rd.integer(h, "head", hp, 0, model.n_heads),
                    kv_head=rd.integer(h, "kv_head", hp, 0, model.n_kv_heads),
                    entropy=rd.num(h, "entropy", hp),
                    output_norm=rd.num(h, "output_norm", hp),
                    n_keys=rd.integer(h, "n_keys", hp, 0, n + 1),
                    top_weight=rd.integer(h, "top_weight", hp, 0, n),
                    top_contribution=rd.integer(h, "top_contribution", hp, 0, n),
                    index=cols[0],
                    score=cols[1],
                    weight=cols[2],
                    contribution=cols[3],
                    sink=rd.num(h, "sink", hp) if "sink" in h else 0.0,
                )
            )
        lcols: tuple[list, list, list] = ([], [], [])
        for ki, k in enumerate(rd.array(lay, "keys", lp)):
            kp = f"{lp}.keys[{ki}]"
            lcols[0].append(rd.integer(k, "index", kp, 0, n))
            lcols[1].append(rd.num(k, "weight", kp))
            lcols[2].append(rd.num(k, "contribution", kp))
        layers.append(
            Layer(
                layer=rd.integer(lay, "layer", lp, 0, model.n_layers),
                heads=heads,
                top_weight=rd.integer(lay, "top_weight", lp, 0, n),
                top_contribution=rd.integer(lay, "top_contribution", lp, 0, n),
                index=lcols[0],
                weight=lcols[1],
                contribution=lcols[2],
            )
        )

    def propagation(name: str) -> Rollout | None:
        ro = doc.get(name) if name == "flow" else rd.get(doc, name, "")  # flow: optional
        if ro is None:
            return None
        vals = rd.array(ro, "values", name)
        if len(vals) != n:
            raise rd.fail(f"{name}.values", f"must hold one value per token ({n}), got {len(vals)}")
        for i, v in enumerate(vals):
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise rd.fail(f"{name}.values[{i}]", f"must be a finite number, got {v!r}")
        return Rollout(rd.integer(ro, "through_layer", name, 0, model.n_layers), vals)

    notes = rd.array(doc, "notes", "")
    if not all(isinstance(x, str) for x in notes):
        raise rd.fail("notes", "must be a list of strings")
    return ExplainResult(
        model=model,
        text=text,
        tokens=tokens,
        query=query("query"),  # type: ignore[arg-type]
        layers=layers,
        top=top,
        key=query("key"),
        rollout=propagation("rollout"),
        notes=notes,
        flow=propagation("flow"),
        neuron=_neuron(doc.get("neuron")),
        experts=_experts(doc.get("experts"), model.n_layers),
    )


def _experts(d: Any, n_layers: int) -> Routing | None:
    """The optional "experts" member (see `qkv.lens.experts`), its layers within the model."""
    if d is None:
        return None
    from .experts import Routing

    r = Routing.from_dict(d)
    if bad := [x.layer for x in r.layers if x.layer >= n_layers]:
        raise ValueError(f"experts: layer {bad[0]} is outside the model's {n_layers} layers")
    return r


def _neuron(d: Any) -> NeuronView | None:
    """The optional "neuron" member (see `qkv.lens.neuron`)."""
    if d is None:
        return None
    from .neuron import NeuronView

    return NeuronView.from_dict(d)


def _optional_string(cfg: dict, key: str, rd: Any) -> str | None:
    """model_config[key]: absent or null, or a string."""
    v = cfg.get(key)
    if v is not None and not isinstance(v, str):
        raise rd.fail(f"model_config.{key}", f"must be null or a string, got {type(v).__name__}")
    return v


def _dtype(cfg: dict, rd: Any) -> str:
    """model_config.dtype: absent (float32, records written before it existed) or a name."""
    v = cfg.get("dtype", "float32")
    if v not in ("float32", "bfloat16", "float16", "float64"):
        raise rd.fail("model_config.dtype", "must be one of 'float32', 'bfloat16', 'float16', "
                      f"'float64', got {v!r}")  # fmt: skip
    return v


def _windows(ws: Any, rd: Any) -> tuple | None:
    """model_config.windows: absent or null, or one null / [left, right] per layer."""
    if ws is None:
        return None
    ok = isinstance(ws, list) and all(
        w is None
        or (isinstance(w, list) and len(w) == 2
            and all(x is None or (isinstance(x, int) and x >= 0) for x in w))
        for w in ws
    )  # fmt: skip
    if not ok:
        raise rd.fail("model_config.windows", "must be null or one null / [left, right] per layer")
    return tuple(None if w is None else (w[0], w[1]) for w in ws)
