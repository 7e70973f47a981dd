"""Whole-sequence lookups from one forward: keep the capture, then exact rows for any queries.

    cap = capture_text("The dog chased the ball because it was excited.", model="smollm2")
    cap.explain("it"); cap.explain("excited")   # no second forward
    cap.neuron("excited", "dog", layer=13, head=8)  # the Q·K neuron view, no second forward
    rows = cap.rows()                            # dense (l h i j) weights, (l h j) value norms
    export_rows(cap, "rows.npz")                    # dense when short, top-k per row when long

Letters: l layer, h query head, g kv head, i query position, j key position, k kept key.
`capture_text` runs the model once under `qkv.nn.capture` and keeps, per layer, q and k (after
RoPE), v, z, W_O and the LSE: O(L·N·H·d) memory, never N×N. A row is then recomputed exactly
by `qkv.attention_weights` from q, k and the LSE (O(H·N) per query and layer), and a key's
contribution is weight_hij · ‖v_gj W_O^h‖, the same numbers `explain` reports.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .experts import TokenRouting, every_routing, sparse_layers
from .explain import (
    DEFAULT_TOP,
    _check_range,
    _encode,
    layer_bar,
    make_result,
    pick_query_key,
    resolve_model,
    run_capture,
    summarize,
)
from .io import check_writable, write_atomic
from .lookup import lookup_layer, rows, value_norms, weight_kwargs
from .neuron import NeuronView, neuron_from_record, rope_dims
from .npz import NpzWriter
from .record import ExplainResult, ModelSummary, Query, Token, pandas_module
from .tokens import index_in, make_tokens, sink_tokens

EXPORT_SCHEMA = "qkv.export/2"  # /2: dense files hold value_norm (l h j), not contribution
DENSE_MAX_TOKENS = 256  # export: dense (l h i j) rows up to this many tokens, top-k rows beyond
SPARSE_TOP = 32  # keys kept per row in a top-k export
_CHUNK = 1 << 22  # row entries (h·i·j) computed at once per layer


@dataclass(eq=False)
class Rows:
    """Exact attention rows: `weight[l, h, i, j]` is the softmax weight of query `queries[i]`
    on key j in head h of layer `layers[l]` (0 where the query cannot see j), and
    `value_norm[l, h, j]` = ‖v_gj W_O^h‖, the size of what key j's value carries through head
    h; key j's contribution to query i is their product (`contribution`; float32)."""

    model: ModelSummary
    tokens: list[Token]
    layers: np.ndarray  # (l,)
    queries: np.ndarray  # (i,)
    weight: np.ndarray  # (l h i j)
    value_norm: np.ndarray  # (l h j)

    @property
    def contribution(self) -> np.ndarray:
        """weight · value_norm, (l h i j) float32 — computed on each access (L·H·Q·N floats):
        the very product `explain` reports, so nothing is lost by storing the factors."""
        return self.weight * self.value_norm[:, :, None, :]

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.value_norm.nbytes

    def to_numpy(self) -> np.ndarray:
        """The weights, (layers, heads, queries, keys)."""
        return self.weight

    def to_pandas(self) -> Any:
        """One row per (layer, head, query, key) the query can see (weight > 0)."""
        pd = pandas_module("Rows.to_pandas")
        return pd.DataFrame(_long_form(self))


@dataclass(eq=False)
class TopRows:
    """The top-k keys of each row by weight: `index[l, h, i, :]` (highest weight first, ties in
    any order), with their `weight` and `contribution` (float32, (l h i k)). A row that sees
    fewer than k keys is padded with keys of weight 0."""

    model: ModelSummary
    tokens: list[Token]
    layers: np.ndarray  # (l,)
    queries: np.ndarray  # (i,)
    index: np.ndarray  # (l h i k) int32
    weight: np.ndarray  # (l h i k)
    contribution: np.ndarray  # (l h i k)

    @property
    def nbytes(self) -> int:
        return self.index.nbytes + self.weight.nbytes + self.contribution.nbytes


@dataclass(eq=False)
class Capture:
    """One forward of `text`, kept: per layer the AttentionRecord of `qkv.nn.capture` (q, k
    after RoPE, v, z, W_O, LSE; batch item 0). `explain` and `rows` reuse it; the model is not
    run again. A mixture-of-experts model's `routing`: every token's experts and weights in
    each sparse layer (`qkv.lens.experts.every_routing`; None for a dense model)."""

    model: nn.Module
    info: ModelSummary
    text: str
    tokens: list[Token]
    cut: bool
    records: list[Any]
    routing: TokenRouting | None = None

    def __repr__(self) -> str:
        return (
            f"<Capture {self.info.name}: {len(self.tokens)} tokens, {len(self.records)} layers; "
            ".explain(token), .neuron(token, key, layer=, head=), .rows(), .top_rows(k)>"
        )

    def explain(
        self,
        token: str | int,
        *,
        occurrence: int = 1,
        layer: int | None = None,
        head: int | None = None,
        top: int = DEFAULT_TOP,
        key: str | int | None = None,
        key_occurrence: int = 1,
    ) -> ExplainResult:
        """The record `qkv.explain(text, token, ...)` gives (same arguments; no flow or
        rollout), from the kept capture: no forward pass."""
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise ValueError(f"top must be an int ≥ 0 (0 keeps every key), got {top!r}")
        layer = _check_range("layer", layer, self.info.n_layers, self.info.name)
        head = _check_range("head", head, self.info.n_heads, self.info.name)
        qpick, kpick = pick_query_key(
            self.tokens, self.text, self.info, self.cut, token, occurrence, key, key_occurrence
        )
        i = qpick.index
        pins = sink_tokens(self.tokens, i) + ([] if kpick is None else [kpick.index])
        heads = None if head is None else [head]
        with torch.inference_mode():
            layers = [
                lookup_layer(rec, i, top=top, keep=pins, heads=heads)
                for rec in self.records
                if layer is None or rec.layer == layer
            ]
        chosen = None if self.routing is None else self.routing.token(i)
        if chosen is not None and layer is not None:  # as `explain`: the layer asked for
            chosen.layers = [x for x in chosen.layers if x.layer == layer]
        return make_result(self.info, self.text, self.tokens, layers, top, qpick, kpick, self.cut,
                           experts=chosen)  # fmt: skip

    def neuron(
        self,
        token: str | int,
        key: str | int,
        *,
        layer: int,
        head: int,
        occurrence: int = 1,
        key_occurrence: int = 1,
    ) -> NeuronView:
        """The view `qkv.lens.neuron(text, token, key, layer=, head=)` gives (same arguments),
        from the kept capture's q (b h i d) and k (b g j d): no forward pass."""
        if key is None:
            raise ValueError("the neuron view needs a key: pass key= (a word or a token index)")
        if layer is None or head is None:
            raise ValueError("the neuron view needs one layer and one head: pass layer= and head=")
        layer = _check_range("layer", layer, self.info.n_layers, self.info.name)
        head = _check_range("head", head, self.info.n_heads, self.info.name)
        qp, kp = pick_query_key(
            self.tokens, self.text, self.info, self.cut, token, occurrence, key, key_occurrence
        )
        i, j = qp.index, kp.index
        q, k = Query(i, self.tokens[i].text), Query(j, self.tokens[j].text)
        rec = self.records[layer]
        with torch.inference_mode():
            return neuron_from_record(rec, i, j, head, q, k, rope_dims(self.model, layer))

    def _pick(self, queries: Sequence[int] | None, layers: Sequence[int] | None) -> tuple:
        n, L = len(self.tokens), self.info.n_layers
        qs = (
            range(n)
            if queries is None
            else [index_in("query", _int(q), n, "tokens") for q in queries]
        )
        ls = (
            range(L)
            if layers is None
            else [index_in("layer", _int(x), L, "layers") for x in layers]
        )
        if not len(qs) or not len(ls):
            raise ValueError("queries and layers must name at least one token and one layer")
        return np.asarray(qs, dtype=np.int64), np.asarray(ls, dtype=np.int64)

    def _scan(
        self, queries: Any, layers: Any, progress: bool | None, on_chunk: Any, dest: Any = None
    ) -> tuple:
        """Per layer and chunk of queries: on_chunk(l, slice of queries, w (h c j), vn (h j)).
        `dest(l, slice)`, when given, is a CPU tensor (h c j) the plain path may write w into."""
        qs, ls = self._pick(queries, layers)
        progress = sys.stderr.isatty() if progress is None else progress
        H, n = self.info.n_heads, len(self.tokens)
        step = max(1, _CHUNK // (H * n))
        bar = layer_bar(len(ls), "rows", progress)
        try:
            with torch.inference_mode():
                for li, lay in enumerate(ls):
                    _layer_rows(self.records[lay], li, qs, H, step, on_chunk, dest)
                    bar.update(1)
        finally:
            bar.close()
        return qs, ls

    def rows(
        self,
        queries: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        *,
        progress: bool | None = None,
    ) -> Rows:
        """Dense exact rows for `queries` (token indices; default all) in `layers` (default
        all): memory 2·4·L·H·Q·N bytes, so meant for short texts (see `top_rows`).
        Equivalent to transformers' `output_attentions=True` rows: `attentions[l][0, :, queries]`."""
        qs, ls = self._pick(queries, layers)
        shape = (len(ls), self.info.n_heads, len(qs), len(self.tokens))
        weight = np.empty(shape, np.float32)
        vnorm = np.empty((len(ls), self.info.n_heads, len(self.tokens)), np.float32)

        def put(li: int, sl: slice, w: torch.Tensor, vn: torch.Tensor) -> None:
            _fill(torch.from_numpy(weight[li, :, sl]), w)
            vnorm[li] = vn.cpu().numpy()

        def dest(li: int, sl: slice) -> torch.Tensor:
            return torch.from_numpy(weight[li, :, sl])

        self._scan(qs.tolist(), ls.tolist(), progress, put, dest)
        return Rows(self.info, self.tokens, ls, qs, weight, vnorm)

    def _stream_rows(self, f: Any, meta: dict[str, Any], progress: bool | None) -> dict[str, int]:
        """Write meta + the dense rows of every query and layer to the open file `f` as an
        .npz, a layer at a time (see `_DenseStream`). Returns where the `weight` and
        `value_norm` arrays start in the file."""
        qs, ls = self._pick(None, None)
        progress = sys.stderr.isatty() if progress is None else progress
        bar = layer_bar(len(ls), "rows", progress)
        stream = _DenseStream(f, meta, ls, qs, self.info.n_heads, len(self.tokens))
        try:
            with torch.inference_mode():
                for li, lay in enumerate(ls):
                    stream.layer(li, self.records[lay])
                    bar.update(1)
        except BaseException:
            stream.abort()
            raise
        finally:
            bar.close()
        return stream.close()

    def top_rows(
        self,
        top: int = SPARSE_TOP,
        queries: Sequence[int] | None = None,
        layers: Sequence[int] | None = None,
        *,
        progress: bool | None = None,
    ) -> TopRows:
        """The `top` keys of every row by weight (see `TopRows`): memory 3·4·L·H·Q·top bytes,
        computed a chunk of rows at a time, never L·H·N² at once."""
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ValueError(f"top must be an int ≥ 1 (keys kept per row), got {top!r}")
        qs, ls = self._pick(queries, layers)
        k = min(top, len(self.tokens))
        shape = (len(ls), self.info.n_heads, len(qs), k)
        index = np.zeros(shape, np.int32)
        weight, contrib = np.zeros(shape, np.float32), np.zeros(shape, np.float32)

        def put(li: int, sl: slice, w: torch.Tensor, vn: torch.Tensor) -> None:
            val, idx = w.topk(k, dim=-1)  # (h c k)
            index[li, :, sl] = idx.cpu().numpy()
            weight[li, :, sl] = val.cpu().numpy()
            contrib[li, :, sl] = (val * vn.gather(1, idx.flatten(1)).view_as(val)).cpu().numpy()

        self._scan(qs.tolist(), ls.tolist(), progress, put)
        return TopRows(self.info, self.tokens, ls, qs, index, weight, contrib)


def capture_text(
    text: str,
    *,
    model: Any = "smollm2",
    truncate: bool = False,
    progress: bool | None = None,
) -> Capture:
    """Run `model` once on `text` and keep every layer's capture (see `Capture`).

    `model`, `truncate` and `progress` are read as `qkv.explain` reads them. Raises ValueError
    for a text that is empty or longer than the model's context."""
    m, info, ids, tokens, cut = _prepare(text, model, truncate)
    return _capture(m, info, text, ids, tokens, cut, progress)


def _prepare(text: str, model: Any, truncate: bool) -> tuple:
    """(model, ModelSummary, token ids, Tokens, cut) for `text`, checked as `capture_text`
    documents."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty: pass the text whose lookups you want")
    m = resolve_model(model)
    info = summarize(m, model if isinstance(model, str) and not os.path.isdir(model) else None)
    enc, cut = _encode(m.tokenizer, text, info, truncate)
    return m, info, enc.ids, make_tokens(text, enc.tokens, enc.offsets), cut


def _capture(
    m: nn.Module, info: ModelSummary, text: str, ids: list[int], tokens: list[Token], cut: bool,
    progress: bool | None,
) -> Capture:  # fmt: skip
    """One forward of `ids` under capture, every layer kept (and, for a mixture-of-experts
    model, every token's routing, the last layer's sparse MLP run for it)."""
    progress = sys.stderr.isatty() if progress is None else progress
    routing = TokenRouting()
    stop = sparse_layers(m).get(info.n_layers - 1)
    with torch.inference_mode(), every_routing(m, routing):
        recs = run_capture(m, ids, layers=list(range(info.n_layers)), progress=progress,
                           stop_after=stop)  # fmt: skip
    return Capture(m, info, text, tokens, cut, recs, routing if routing.layers else None)


def export_rows(
    cap: Capture, path: str | os.PathLike, *, top: int | None = None, progress: bool | None = None
) -> tuple[Rows | TopRows, Path]:
    """Write every row of `cap` to `path` (.npz, or .parquet with pyarrow): dense (l h i j)
    weights when `top` is 0, or None and the text has at most DENSE_MAX_TOKENS tokens; else the
    top-`top` (default SPARSE_TOP) keys of each row.

    The .npz ("qkv.export/2") holds `schema`, `model`, `text`, `tokens`, `offsets` (n, 2),
    `layers`, `queries` and either `weight` (l h i j) + `value_norm` (l h j) — contribution =
    weight · value_norm[:, :, None, :], exactly the product `explain` reports — or `index`,
    `weight`, `contribution` (l h i k). The .parquet holds one row per (layer, head, query,
    key) kept (dense: weight > 0), contribution included. Returns the rows and the path."""
    p = check_export_path(path)
    if top is None:
        top = 0 if len(cap.tokens) <= DENSE_MAX_TOKENS else SPARSE_TOP
    meta = _meta(cap.info, cap.text, cap.tokens)
    if p.suffix == ".npz" and top == 0:  # streamed a layer at a time; read back as memmaps
        at: dict[str, int] = {}
        write_atomic(p, lambda f: at.update(cap._stream_rows(f, meta, progress)))
        return _mapped(p, at, cap.info, cap.tokens), p
    r = cap.rows(progress=progress) if top == 0 else cap.top_rows(top, progress=progress)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = _pyarrow().table(_long_form(r))
        return r, write_atomic(p, lambda f: pq.write_table(table, f))
    arrays = {k: v for k, v in vars(r).items() if isinstance(v, np.ndarray)}

    def savez(f: Any) -> None:  # uncompressed, straight into the atomic temp file
        NpzWriter(f.fileno(), {**meta, **arrays}).close()

    return r, write_atomic(p, savez)


def export_text(
    text: str,
    path: str | os.PathLike,
    *,
    model: Any = "smollm2",
    top: int | None = None,
    truncate: bool = False,
    progress: bool | None = None,
) -> tuple[Rows | TopRows, Path]:
    """`export_rows(capture_text(text, ...), path, top=top)` — the same file — in one pass:
    for a dense .npz (see `export_rows` for when), each layer's rows are computed and written
    while the model runs the next layer, and no layer's capture is kept, so the file is done
    about when the forward is. Other exports capture first, then write."""
    p = check_export_path(path)
    m, info, ids, tokens, cut = _prepare(text, model, truncate)
    n = len(tokens)
    if top is None:
        top = 0 if n <= DENSE_MAX_TOKENS else SPARSE_TOP
    if p.suffix != ".npz" or top != 0:
        cap = _capture(m, info, text, ids, tokens, cut, progress)
        return export_rows(cap, p, top=top, progress=progress)
    progress = sys.stderr.isatty() if progress is None else progress
    L = info.n_layers
    ls, qs = np.arange(L, dtype=np.int64), np.arange(n, dtype=np.int64)
    at: dict[str, int] = {}

    def write(f: Any) -> None:
        stream = _DenseStream(f, _meta(info, text, tokens), ls, qs, info.n_heads, n)

        def on_layer(rec: Any) -> None:  # the layer's rows now; its capture is not kept
            stream.layer(rec.layer, rec)

        try:
            with torch.inference_mode():
                run_capture(m, ids, layers=list(range(L)), progress=progress,
                            on_layer=on_layer)  # fmt: skip
        except BaseException:
            stream.abort()
            raise
        at.update(stream.close())

    write_atomic(p, write)
    return _mapped(p, at, info, tokens), p


def _meta(info: ModelSummary, text: str, tokens: list[Token]) -> dict[str, Any]:
    """The .npz members every export holds besides the rows."""
    return {
        "schema": EXPORT_SCHEMA,
        "model": info.name,
        "dtype": info.dtype,  # the model's: "bfloat16" rows come from a bfloat16 forward
        "text": text,
        "tokens": np.array([t.text for t in tokens]),
        "offsets": np.array([(t.start, t.end) for t in tokens], dtype=np.int64),
    }


def _mapped(p: Path, at: dict[str, int], info: ModelSummary, tokens: list[Token]) -> Rows:
    """The dense rows of every layer and query in the .npz at `p`, as read-only memmaps."""
    n = len(tokens)
    ls, qs = np.arange(info.n_layers, dtype=np.int64), np.arange(n, dtype=np.int64)
    L, H = info.n_layers, info.n_heads
    weight = np.memmap(p, np.float32, "r", offset=at["weight"], shape=(L, H, n, n))
    vnorm = np.memmap(p, np.float32, "r", offset=at["value_norm"], shape=(L, H, n))
    return Rows(info, tokens, ls, qs, weight, vnorm)


def check_export_path(path: str | os.PathLike) -> Path:
    """Raise now, before any work, for a path `export_rows` cannot write: a suffix other than
    .npz/.parquet (ValueError), .parquet without pyarrow (ImportError), a place that is not
    writable (see `check_writable`)."""
    p = Path(path)
    if p.suffix not in (".npz", ".parquet"):
        raise ValueError(f"export path must end in .npz or .parquet, got {str(p)!r}")
    if p.suffix == ".parquet":
        _pyarrow()
    return check_writable(p)


def _long_form(r: Rows | TopRows) -> dict[str, np.ndarray]:
    """Columns layer, head, query, key, weight, contribution: one entry per kept (l h i j)."""
    if isinstance(r, TopRows):
        lay, hd, qi, _ = np.indices(r.index.shape).reshape(4, -1)
        key = r.index.reshape(-1).astype(np.int64)
        w, c = r.weight.reshape(-1), r.contribution.reshape(-1)
    else:
        lay, hd, qi, key = np.nonzero(r.weight > 0)
        w = r.weight[lay, hd, qi, key]
        c = w * r.value_norm[lay, hd, key]  # = r.contribution[lay, hd, qi, key]
    return {
        "layer": r.layers[lay],
        "head": hd,
        "query": r.queries[qi],
        "key": key,
        "weight": w,
        "contribution": c,
    }


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise ImportError(
            "writing .parquet needs pyarrow, which is not installed: pip install pyarrow "
            "(or write .npz, which needs nothing)"
        ) from None
    return pyarrow


def _layer_rows(
    rec: Any, li: int, qs: np.ndarray, H: int, step: int, on_chunk: Any, dest: Any = None
) -> None:
    """One layer's rows for queries `qs`, `step` queries at a time: on_chunk(li, slice of qs,
    w (h c j), vn (h j)); `dest(li, slice)`, when given, is a CPU tensor (h c j) the plain path
    may compute w into."""
    G = rec.k.shape[1]
    kv = torch.arange(H, device=rec.k.device) // (H // G)
    vn = value_norms(rec.v[0][kv], rec.W_O).float()  # (h j): ‖v_gj W_O^h‖
    plain = _plain(rec)
    for a in range(0, len(qs), step):
        idx = qs[a : a + step].tolist()
        if plain:
            out = None if dest is None else dest(li, slice(a, a + step))
            w = _plain_rows(rec, idx, *plain, out=out)
        else:
            w = rows(rec, idx).float()
        on_chunk(li, slice(a, a + step), w, vn)  # w (h c j)


class _DenseStream:
    """Dense rows written into an .npz as each layer comes: `layer(li, record)` computes that
    layer's (h i j) weights into one of two reusable buffers and hands it, with the layer's
    value norms (h j), to a writer thread (pwrite + CRC) while the next layer is computed — or,
    in `export_text`, while the model runs the next layer. The L·H·N² rows are never held."""

    def __init__(self, f: Any, meta: dict, layers: np.ndarray, queries: np.ndarray, H: int,
                 N: int) -> None:  # fmt: skip
        self.qs, self.H, self.N = queries, H, N
        self.out = NpzWriter(f.fileno(), {**meta, "layers": layers, "queries": queries,
                                          "weight": ((len(layers), H, len(queries), N), np.float32),
                                          "value_norm": ((len(layers), H, N), np.float32)})  # fmt: skip
        self.bufs = [torch.empty(H, len(queries), N) for _ in range(2)]
        self.busy: list[Future | None] = [None, None]
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="qkv-export")

    def _slot(self, li: int) -> torch.Tensor:
        job = self.busy[li % 2]
        if job is not None:  # the writer is done with this buffer before it is refilled
            job.result()
            self.busy[li % 2] = None
        return self.bufs[li % 2]

    def _flush(self, w: torch.Tensor, vn: np.ndarray) -> None:
        self.out.write("weight", w.numpy())
        self.out.write("value_norm", vn)

    def layer(self, li: int, rec: Any) -> None:
        Q = len(self.qs)

        def put(li: int, sl: slice, w: torch.Tensor, vn: torch.Tensor) -> None:
            bw = self._slot(li)
            _fill(bw[:, sl], w)
            if sl.stop >= Q:  # the layer is complete: hand it to the writer, in order
                vn = np.ascontiguousarray(vn.cpu().numpy(), dtype=np.float32)
                self.busy[li % 2] = self.pool.submit(self._flush, bw, vn)

        step = max(1, _CHUNK // (self.H * self.N))
        _layer_rows(rec, li, self.qs, self.H, step, put, lambda li, sl: self._slot(li)[:, sl])

    def abort(self) -> None:
        """After an error elsewhere: let the writer finish, keep its error quiet (the caller's
        is the one to report; the temp file is removed by `write_atomic`)."""
        for job in self.busy:
            if job is not None:
                job.exception()
        self.pool.shutdown()

    def close(self) -> dict[str, int]:
        """Wait for the writer (its error surfaces here), finish the file; the data offsets."""
        try:
            for job in self.busy:
                if job is not None:
                    job.result()
        finally:
            self.pool.shutdown()
        self.out.close()
        return {k: self.out.data_offset(k) for k in ("weight", "value_norm")}


def _plain(rec: Any) -> tuple | None:
    """(scale, causal) when the record's rows are plain: fp32 q and k with only finite values, a
    fp32 LSE, at most a causal mask and a scale (no window, mask, mods or softcap); else None."""
    kw = weight_kwargs(rec)
    lse = getattr(rec, "lse", None)
    if set(kw) - {"causal", "scale", "mask", "window", "score_mod", "mask_mod", "softcap"}:
        return None
    if any(kw.get(x) is not None for x in ("mask", "window", "score_mod", "mask_mod", "softcap")):
        return None
    if lse is None or any(t.dtype != torch.float32 for t in (rec.q, rec.k, lse)):
        return None
    H, G = rec.q.shape[1], rec.k.shape[1]
    if G == 0 or H % G or not bool(torch.isfinite(rec.k[:1]).all()):
        return None
    scale = kw.get("scale")
    return (rec.q.shape[-1] ** -0.5 if scale is None else float(scale)), bool(kw.get("causal"))


def _plain_rows(
    rec: Any, idx: list[int], scale: float, causal: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """exp(scale·q_i·k_jᵀ − lse_i) for query rows `idx` (h c j), 0 where a causal query cannot see
    j: the rows `attention_weights` gives for a plain record, as one batched matmul per layer
    (the g query heads of a kv head as rows of one product, no expanded k); computed in `out`
    (h c j) when it is a contiguous fp32 tensor on q's device."""
    H, G, Sq, Sk = rec.q.shape[1], rec.k.shape[1], rec.q.shape[2], rec.k.shape[2]
    dev = rec.q.device
    t = torch.as_tensor(idx, device=dev)
    q = rec.q[0][:, t] * scale  # (h c d), scale folded into q as attention_weights does
    qg = q.unflatten(0, (G, H // G)).flatten(1, 2)  # (g (r c) d)
    kt = rec.k[0].transpose(-1, -2)
    shape = (H, len(idx), Sk)
    if (
        out is not None
        and out.is_contiguous()
        and tuple(out.shape) == shape
        and out.dtype == torch.float32
        and out.device == dev
    ):
        s = torch.bmm(qg, kt, out=out.view(G, -1, Sk)).view(shape)  # (h c j)
    else:
        s = torch.bmm(qg, kt).view(shape)
    lse = rec.lse[0][:, t].unsqueeze(-1)  # (h c 1)
    s.sub_(torch.where(torch.isneginf(lse), torch.inf, lse)).exp_()  # an empty row is all 0
    if causal:
        j = torch.arange(Sk, device=dev)
        s.masked_fill_(j > (t + (Sk - Sq)).unsqueeze(-1), 0.0)
    return s


def _fill(weight: torch.Tensor, w: torch.Tensor) -> None:
    """weight ← w (h c j); w may already be `weight` (computed in place)."""
    w = w.cpu()
    if w.data_ptr() != weight.data_ptr():
        weight.copy_(w)


def _int(x: Any) -> Any:
    return int(x) if isinstance(x, np.integer) else x
