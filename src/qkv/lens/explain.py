"""`explain(text, token=...)`: what one token looked up, in every layer and head of a real model.

One forward pass runs under `qkv.nn.capture`, which keeps q, k (after RoPE), v, the per-head
output z and the LSE of every layer — O(N) tensors. The query's row is then recomputed exactly
with `qkv.attention_weights` (O(H·N) per layer), never the N×N matrix that
`output_attentions=True` or TransformerLens keep. Two exact shortcuts:

* a causal model's query at position i cannot see later tokens, so only tokens 0..i are run;
* the forward stops right after the last attention layer needed (the final MLP and the
  unembedding, 50k × N logits for smollm2, are never computed).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.tokenizer import no_tokenizer as models_no_tokenizer
from .experts import Routing, routing, sparse_layers
from .lookup import lookup_layer
from .record import ExplainResult, ModelSummary, Query, Rollout
from .rollout import flow_layer, flow_row, rollout_caveat, rollout_row
from .tokens import index_in, make_tokens, pick_token, sink_tokens

DEFAULT_TOP = 10  # keys kept per head in the record (0 = all)


class _Stop(Exception):
    """Raised by a forward hook once the last needed attention layer has been recorded."""


def resolve_model(model: Any) -> nn.Module:
    """A model from a name / checkpoint path (loaded with `qkv.load`) or an already loaded one."""
    if isinstance(model, str | os.PathLike):
        from qkv.models import load

        return load(model)
    if isinstance(model, nn.Module) and hasattr(model, "tokenizer"):
        return model
    raise TypeError(
        "model must be a name such as 'smollm2' or 'minilm', a checkpoint directory, or a "
        f"model returned by qkv.load, got {type(model).__name__}"
    )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    from qkv.nn import MultiHeadAttention

    mods = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if not mods:
        raise ValueError(
            f"{type(model).__name__} has no qkv.nn.MultiHeadAttention layers to explain"
        )
    return mods


def summarize(model: nn.Module, name: str | None = None) -> ModelSummary:
    """The model's shape, read from its attention modules (the ground truth) and its config."""
    mods = attention_modules(model)
    cfg = getattr(model, "config", None)
    a = mods[0]
    maxpos = (
        getattr(cfg, "max_positions", None) or getattr(model.tokenizer, "max_length", None) or 0
    )
    return ModelSummary(
        name=str(name or getattr(cfg, "name", None) or type(model).__name__),
        n_layers=len(mods),
        n_heads=int(a.n_heads),
        n_kv_heads=int(a.n_kv_heads),
        d_model=int(a.d_model),
        d_head=int(a.d_head),
        causal=bool(getattr(cfg, "causal", a.causal)),
        max_positions=int(maxpos),
        windows=_windows(mods),
        score_steps=_score_steps(mods),
        dtype=str(next(a.parameters()).dtype).removeprefix("torch."),
    )


def _windows(mods: list) -> tuple | None:
    """Each attention module's (left, right) window (None: global), or None if none has one."""
    ws = tuple(getattr(m, "window", None) for m in mods)
    return (
        None if all(w is None for w in ws) else tuple(None if w is None else tuple(w) for w in ws)
    )


def _score_steps(mods: list) -> str | None:
    """What each attention module does to a score q·k × scale before the softmax besides
    masking (a softcap, a score_mod), in words, grouped by layer; None if no layer does any."""
    per = []
    for m in mods:
        steps = []
        if (c := getattr(m, "softcap", None)) is not None:
            steps.append(f"the softcap s → {c:g}·tanh(s/{c:g})")
        if (f := getattr(m, "score_mod", None)) is not None:
            name = getattr(f, "__qualname__", type(f).__name__).split(".<locals>")[0]
            steps.append(
                f"the score_mod {name}" + (" (−slope·|i − j| per head)" if name == "alibi" else "")
            )
        per.append(", then ".join(steps) or None)
    said = list(dict.fromkeys(p for p in per if p))
    if not said:
        return None
    if len(said) == 1 and all(per):
        return f"{said[0]} on every layer"
    return "; ".join(
        f"{p} on layer{'s' * (per.count(p) > 1)} {', '.join(str(i) for i, x in enumerate(per) if x == p)}"
        for p in said
    )


def _check_range(what: str, x: int | None, n: int, model: str) -> int | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{what} must be an int or None, got {type(x).__name__}")
    return index_in(what, x, n, f"{what}s in {model}")


def layer_bar(total: int, desc: str, progress: bool) -> tqdm:
    """A progress bar over layers on stderr, shown only past one second, gone when done."""
    return tqdm(
        total=total,
        desc=desc,
        unit="layer",
        delay=1.0,
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )


def run_capture(
    model: nn.Module,
    ids: list[int],
    *,
    layers: list[int],
    progress: bool = True,
    desc: str = "forward",
    on_layer: Callable[[Any], Any] | None = None,
    stop_after: nn.Module | None = None,
) -> list:
    """One forward of `ids` recording the attention `layers`, stopping after the last of them
    (after `stop_after`'s forward instead, when given: the last layer's sparse MLP, whose
    routing the lens reads).

    Returns the AttentionRecords ordered by layer. With `on_layer`, each record is handed to it
    as soon as its layer has run, and only what it returns (a record, or None) is kept — so a
    caller that reduces each layer at once holds one layer's q, k, v, z at a time instead of all.
    Must run under torch.inference_mode()."""
    from qkv.nn import capture

    mods = attention_modules(model)
    wanted = set(layers)
    last = max(wanted)
    kept: dict[int, Any] = {}
    bar = layer_bar(last + 1, desc, progress)

    with capture(model, layers=sorted(wanted)) as cap:

        def after(index: int) -> Callable[..., None]:
            def hook(*_: Any) -> None:
                bar.update(1)
                if index in wanted:
                    if not cap.layers or cap.layers[-1].layer != index:
                        raise RuntimeError(f"capture recorded no call of attention layer {index}")
                    rec = (
                        cap.layers.pop()
                    )  # the capture keeps nothing; we keep what on_layer returns
                    out = rec if on_layer is None else on_layer(rec)
                    if out is not None:
                        kept[index] = out
                if index == last and stop_after is None:
                    raise _Stop

            return hook

        def stop(*_: Any) -> None:
            raise _Stop

        hooks = [m.register_forward_hook(after(n)) for n, m in enumerate(mods[: last + 1])]
        if stop_after is not None:
            hooks.append(stop_after.register_forward_hook(stop))
        try:
            device = next(model.parameters()).device  # the ids go where the weights are
            model(torch.tensor([ids], dtype=torch.long, device=device))
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()
            bar.close()
    return [kept[n] for n in sorted(kept)]


def explain(
    text: str,
    token: str | int,
    *,
    model: Any = "smollm2",
    occurrence: int = 1,
    layer: int | None = None,
    head: int | None = None,
    top: int = DEFAULT_TOP,
    key: str | int | None = None,
    key_occurrence: int = 1,
    flow: bool = False,
    rollout: bool = False,
    truncate: bool = False,
    progress: bool | None = None,
) -> ExplainResult:
    """What `token` of `text` looked up: per layer and head, each key's score, weight and
    contribution, ranked by weight.

    Args:
        text: the input; tokenized by the model's tokenizer (special tokens included).
        token: the query — a word of the text (its `occurrence`-th whole-word match, counting
            from 1, negative from the end; a word split into pieces, or several words, resolve
            to the last token) or a token index. A str is always a word (even "1"), an int
            always a position.
        model: a bundled name ("smollm2", "minilm", "gemma3": `qkv.available()` lists them),
            a checkpoint directory or .gguf file, or a model from `qkv.load` (pass a loaded
            model to avoid reloading it on every call). A checkpoint folder needs its
            tokenizer.json: explain reads text, not token ids.
        layer, head: restrict the record to one layer and/or head (0-based). Every index here
            (layer, head, token, key) follows Python: negative counts from the end, so -1 is
            the last layer; anything outside -n..n-1 raises IndexError.
        top: keys kept per head and per layer: the top-k by weight and the top-k by
            contribution, ranked by weight; 0 keeps all. Whatever k, each head also keeps the
            sinks (the first token, special tokens), the query, `key`, and the key with most
            weight besides those; a layer's list keeps at least its top 3.
        key: a token (word or index, read as `token` is) kept in every head whatever its rank,
            so that `result.heads_to()` ranks the heads that send the query most to it.
        key_occurrence: which occurrence of a repeated `key` word (from 1, negative from the
            end), as `occurrence` is for the query.
        flow: also compute the contribution flow of the query through the layers: per layer,
            each key's share of ‖Σ_h w·v W_O‖ beside the residual ‖x‖ (Kobayashi et al.
            2020/2021), multiplied through the layers. Off by default: it recomputes every row
            the query depends on, O(L·H·N²·d) time in O(chunk·N) memory (see
            `qkv.lens.rollout`), and on a model with attention sinks it too piles onto the sink
            (smollm2, seed sentence: 0.95 on "The").
        rollout: also compute classic attention rollout (Abnar & Zuidema 2020), weights only;
            same cost. Whenever one token holds more than 90% of a flow or a rollout, a note
            says that it converged there and says little about this text.
        truncate: keep the text's first tokens when it is longer than the model's context
            (the query must lie among them; a note says how much was cut) instead of raising.
        progress: show progress bars for steps that take longer than a second (default: when
            stderr is a terminal).

    Returns an `ExplainResult` (see `qkv.lens.record`). Exact: the rows equal the model's own
    softmax weights; nothing N×N is materialised. Equivalent naive code (transformers, which
    keeps all L·H·N² weights)::

        out = hf_model(ids, output_attentions=True)
        w = out.attentions[l][0, h, i]                 # head h's row for query i: weight (j,)
        contribution = w * (v_h @ W_O_h).norm(dim=-1)  # v_h (j e), W_O_h (e m) → (j,)

    Raises ValueError for empty text or text beyond the model's context, ValueError listing
    the tokens when `token` is absent, and IndexError naming the valid range for
    `layer`/`head`/an index out of range.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty: pass the sentence whose token you want explained")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be an int ≥ 0 (0 keeps every key), got {top!r}")
    if progress is None:
        progress = sys.stderr.isatty()
    m = resolve_model(model)
    info = summarize(m, model if isinstance(model, str) and not os.path.isdir(model) else None)
    layer = _check_range("layer", layer, info.n_layers, info.name)
    head = _check_range("head", head, info.n_heads, info.name)

    enc, cut = _encode(m.tokenizer, text, info, truncate)
    tokens = make_tokens(text, enc.tokens, enc.offsets)
    qpick, kpick = pick_query_key(tokens, text, info, cut, token, occurrence, key, key_occurrence)
    i, j = qpick.index, None if kpick is None else kpick.index

    n = i + 1 if info.causal else len(tokens)  # a causal query never sees later tokens
    last = info.n_layers - 1 if layer is None else layer
    if not isinstance(flow, bool) or not isinstance(rollout, bool):
        raise TypeError(f"flow and rollout must be True or False, got {flow!r}, {rollout!r}")
    do_flow = flow
    wanted = list(range(last + 1)) if do_flow or rollout or layer is None else [layer]
    heads = None if head is None else [head]
    pins = sink_tokens(tokens, i) + ([] if j is None else [j])
    layers: list = []
    residual: dict[int, torch.Tensor] = {}

    def reduce(rec: Any) -> Any:
        """Each layer's lookups as soon as it has run; keep only what the propagations need."""
        if layer is None or rec.layer == layer:
            layers.append(lookup_layer(rec, i, top=top, keep=pins, heads=heads))
        if not (do_flow or rollout):
            return None
        fl = flow_layer(rec, residual.pop(rec.layer)) if do_flow else None
        rec.v = rec.z = None
        return rec, fl

    chosen = Routing()  # a mixture-of-experts model: the experts token i went to, per layer
    stop = sparse_layers(m).get(max(wanted))  # run the last layer's sparse MLP too
    with torch.inference_mode(), _residual_norms(m, residual, do_flow), routing(m, i, chosen):
        recs = run_capture(m, enc.ids[:n], layers=wanted, progress=progress, on_layer=reduce,
                           stop_after=stop)  # fmt: skip
        ro = fl = None
        if rollout:
            ro = _propagated(
                rollout_row, [r for r, _ in recs], i, n, len(tokens), last, "rollout", progress
            )
        if do_flow:
            fl = _propagated(
                flow_row, [f for _, f in recs], i, n, len(tokens), last, "flow", progress
            )
        del recs
    if layer is not None:  # as the layers: the one asked for
        chosen.layers = [x for x in chosen.layers if x.layer == layer]
    return make_result(info, text, tokens, layers, top, qpick, kpick, cut, rollout=ro, flow=fl,
                       experts=chosen)  # fmt: skip


def pick_query_key(
    tokens: list,
    text: str,
    info: ModelSummary,
    cut: bool,
    token: str | int,
    occurrence: int,
    key: str | int | None,
    key_occurrence: int,
) -> tuple[Any, Any]:
    """The query's and the key's `Pick` (key None when not asked), read as `explain` reads
    them; errors say when only the part of a cut text that fits was searched, and a causal
    model's key must not come after the query."""
    try:
        qpick = pick_token(tokens, text, token, occurrence, what="token")
        kpick = (
            None
            if key is None
            else pick_token(tokens, text, key, key_occurrence, "key", "key_occurrence")
        )
    except (ValueError, IndexError) as e:
        if cut:  # say that only the part that fits was searched
            raise type(e)(f"{e} (only the first {len(tokens)} tokens fit {info.name})") from None
        raise
    i, j = qpick.index, None if kpick is None else kpick.index
    if j is not None and info.causal and j > i:
        raise ValueError(
            f"key {tokens[j].text.strip()!r} (token {j}) comes after the query {tokens[i].text.strip()!r} (token {i}); "
            f"{info.name} is causal, so the query cannot see it. Pick a key at or before token {i}."
        )
    return qpick, kpick


def make_result(
    info: ModelSummary,
    text: str,
    tokens: list,
    layers: list,
    top: int,
    qpick: Any,
    kpick: Any,
    cut: bool,
    *,
    rollout: Rollout | None = None,
    flow: Rollout | None = None,
    experts: Routing | None = None,
) -> ExplainResult:
    """The record of one query's `layers`, with its notes (picks, a cut text, `notes`)."""
    i, j = qpick.index, None if kpick is None else kpick.index
    query = Query(i, tokens[i].text)
    result = ExplainResult(
        model=info,
        text=text,
        tokens=tokens,
        query=query,
        layers=layers,
        top=top,
        key=None if j is None else Query(j, tokens[j].text),
        rollout=rollout,
        flow=flow,
        experts=experts if experts is not None and experts.layers else None,
    )
    for pick, what, option in ((qpick, "query", "--occurrence N / occurrence=N"),
                               (kpick, "key", "--key-occurrence N / key_occurrence=N")):  # fmt: skip
        said = None if pick is None else pick.note(tokens, what, option)
        if said:
            result.notes.append(said)
    if cut:
        end = max(t.end for t in tokens)
        result.notes.append(
            f"The text is longer than {info.name} reads at once: only its first {len(tokens)} "
            f"tokens (characters 0..{end} of {len(text)}) were read; the rest is left out."
        )
    result.notes.extend(notes(result))
    return result


def _propagated(
    fn: Callable, recs: list, i: int, n: int, n_tokens: int, last: int, what: str, progress: bool
) -> Rollout:
    """`fn(recs, i)` (rollout_row or flow_row) padded to every token, with a progress bar."""
    bar = layer_bar(len(recs), what, progress)
    values = np.zeros(n_tokens)
    values[:n] = fn(recs, i, progress=lambda: bar.update(1))
    bar.close()
    return Rollout(through_layer=last, values=values)


@contextmanager
def _residual_norms(model: nn.Module, into: dict[int, torch.Tensor], on: bool) -> Iterator[None]:
    """While on, `into[l]` receives ‖x_j‖ (j,) of the residual stream entering attention layer
    l: the input of the module that holds it (a pre-norm block's x, before its norm; a post-norm
    block's x, which its attention reads as is)."""
    if not on:
        yield
        return
    mods = attention_modules(model)
    parent = {id(c): p for p in model.modules() for c in p.children()}
    hooks = []
    for n, mod in enumerate(mods):
        block = parent.get(id(mod))
        if block is None:
            raise ValueError(
                f"attention layer {n} has no enclosing block to read its residual from"
            )

        def pre(_: nn.Module, args: tuple, kwargs: dict, n: int = n) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            into[n] = x[0].double().norm(dim=-1)  # (j,)

        hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class _Encoding(NamedTuple):
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]


def no_tokenizer(name: str) -> ValueError:
    """The error for a model without a tokenizer (a checkpoint folder without tokenizer.json)
    given text."""
    return models_no_tokenizer(
        name,
        needs="the lens reads text",
        python="With token ids only, record the attention with qkv.nn.capture(model) around "
        "model(ids) and read rows with qkv.attention_weights",
    )


def _encode(tokenizer: Any, text: str, info: ModelSummary, truncate: bool) -> tuple[Any, bool]:
    """The text's encoding, and whether `truncate` cut it to the model's context (its first
    tokens: the tokenizer's own truncation, which keeps its special tokens, where it has one)."""
    if tokenizer is None:  # a checkpoint folder without tokenizer.json
        raise no_tokenizer(info.name)
    try:
        enc = tokenizer.encode(text)  # raises for text beyond its limit, naming it
    except ValueError:
        if not truncate:
            raise
        enc = tokenizer.encode(text, truncate=True)
    limit = info.max_positions
    if limit and len(enc.ids) > limit:
        if not truncate:
            raise ValueError(
                f"text is {len(enc.ids)} tokens but {info.name} takes at most {limit}; "
                "shorten it or pass truncate=True"
            )
        enc = _Encoding(list(enc.ids[:limit]), list(enc.tokens[:limit]), list(enc.offsets[:limit]))
    return enc, truncate and max((e for _, e in enc.offsets), default=0) < len(text.rstrip())


def dtype_note(m: ModelSummary) -> str | None:
    """What a float16/bfloat16 model's weights are; None for float32/float64."""
    if m.dtype not in ("bfloat16", "float16"):
        return None
    return (
        f"{m.name} runs in {m.dtype}: its q, k and v are {m.dtype} numbers, and the weights are "
        "what it computed from them (scores and softmax in float32). A float32 run of the same "
        "checkpoint differs by the rounding of every layer before."
    )


def notes(r: ExplainResult) -> list[str]:
    """Plain-language remarks shown with every view."""
    out = []
    i, q = r.query.index, r.query.text.strip()
    if r.model.causal and i < len(r.tokens) - 1:
        later = r.text[r.tokens[i].end :].strip()
        out.append(
            f"{r.model.name} is causal: {q!r} (token {i}) sees only tokens 0..{i}; what follows "
            f"({later[:60]!r}{'…' if len(later) > 60 else ''}) cannot change its lookups."
        )
    if r.model.score_steps:
        out.append(
            f"The score column is q·k × the attention's scale; before the softmax "
            f"{r.model.name} applies {r.model.score_steps}, so the weights are the softmax of the "
            "modified scores, not of the scores shown."
        )
    if (half := dtype_note(r.model)) is not None:
        out.append(half)
    sink = sink_note(r)
    if sink:
        out.append(sink)
    learned = learned_sink_note(r)
    if learned:
        out.append(learned)
    for what, p in (("contribution flow", r.flow), ("rollout", r.rollout)):
        if p is not None:
            j = int(np.argmax(p.values))
            said = rollout_caveat(
                p.values, repr(r.tokens[j].text.strip() or r.tokens[j].text), what
            )
            if said:
                out.append(said)
    return out


def _n(k: int, thing: str) -> str:
    return f"{k} {thing}{'' if k == 1 else 's'}"


def learned_sink_note(r: ExplainResult) -> str | None:
    """For a model with learned attention sinks (gpt-oss): what a sink is, and how much weight
    this query's heads gave theirs (a head's keys then sum to 1 − that)."""
    shares = [(h.sink, lay.layer, h.head) for lay in r.layers for h in lay.heads if h.sink]
    if not shares:
        return None
    top, layer, head = max(shares)
    what = (
        f"Here the sink of layer {layer} head {head} takes {top:.3g} of the weight."
        if len(shares) == 1
        else f"Here the sinks take {min(shares)[0]:.3g} to {top:.3g} of the weight (most: "
        f"layer {layer} head {head}; mean {np.mean([s[0] for s in shares]):.3g})."
    )
    return (
        f"{r.model.name} has learned attention sinks: each head has one more softmax logit with "
        "no value behind it, so it can put weight on no key at all, and its keys' weights sum to "
        f"1 − the sink's share. {what}"
    )


def sink_note(r: ExplainResult) -> str | None:
    """Where the weight and the content part ways, in this run's numbers: the key that most
    often takes a head's most weight without carrying its most content, how much it carries
    there relative to the top content key, and the heads where it tops both."""
    heads = [(lay.layer, h) for lay in r.layers for h in lay.heads]
    dis = [h for _, h in heads if h.disagrees]
    if not dis:
        return None
    j, cnt = Counter(h.top_weight for h in dis).most_common(1)[0]
    t = r.tokens[j]
    name = f"{t.text.strip()!r} (token {j}{', an attention sink' if j == 0 or t.special else ''})"
    mine = [h for h in dis if h.top_weight == j]
    w = np.mean([h.key(j).weight for h in mine])
    ratio = np.mean(
        [h.key(j).contribution / max(h.key(h.top_contribution).contribution, 1e-30) for h in mine]
    )
    s = (
        f"In {len(dis)} of {_n(len(heads), 'head')} the key with the most weight is not the key "
        f"that carried the most content. Most often that key is {name}: in {_n(cnt, 'head')} it "
        "takes the "
        f"most weight (mean {w:.2f}) yet carries on average {ratio:.0%} of what the head's top "
        "content key carries."
    )
    both = [(lay, h) for lay, h in heads if h.top_weight == j and not h.disagrees]
    if both:
        lay, h = max(both, key=lambda t: t[1].key(j).contribution)
        k = h.key(j)
        s += (
            f" Not everywhere: in {_n(len(both), 'head')} it takes the most weight and also carries the "
            f"most content (largest: layer {lay} head {h.head}, weight {k.weight:.2f}, "
            f"content {k.contribution:.3g})."
        )
    return s
