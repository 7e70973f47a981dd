"""The terminal view of an `ExplainResult` (rich): the text with the query marked, notes, and
tables whose "weight" and "contribution" columns sit side by side, so a sink (much weight,
little content) stands out.
"""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .record import ExplainResult, Head, dtype_words
from .tokens import sink_tokens

BAR = 8  # characters of a full bar


def bar(x: float, full: float = 1.0, width: int = BAR) -> str:
    n = 0 if full <= 0 else max(0.0, min(1.0, x / full)) * width
    whole = int(n)
    part = " ▏▎▍▌▋▊▉"[int((n - whole) * 8)] if whole < width else ""
    return ("█" * whole + part).ljust(width)


def tok(r: ExplainResult, j: int) -> str:
    t = r.tokens[j].text
    return repr(t.strip() or t)[1:-1]


ECHO_CHARS = 600  # a longer text is echoed as this many characters around the query


def _snap(text: str, i: int, step: int, most: int = 40) -> int:
    """Move i (by `step`, at most `most` characters) to the nearest word boundary."""
    for _ in range(most):
        if i <= 0 or i >= len(text) or text[i - (step < 0)].isspace():
            break
        i += step
    return i


def marked_text(r: ExplainResult, limit: int = ECHO_CHARS) -> Text:
    """The source text with the query token (and the chosen key) highlighted; a text longer
    than `limit` characters is cut to a window around the query, saying what was left out."""
    q = r.tokens[r.query.index]
    lo, hi = 0, len(r.text)
    if hi > limit:
        centre = q.start if not q.special else (0 if q.index == 0 else hi)
        start = max(0, min(centre - limit // 2, hi - limit))
        lo, hi = _snap(r.text, start, -1), _snap(r.text, min(start + limit, hi), 1)
        if not q.special:  # snapping stops inside a long word: the query stays in the window
            lo, hi = min(lo, q.start), max(hi, q.end)
    out = Text()
    if lo > 0:
        out.append(f"[… {_left_out(r.text, 0, lo)} before] ", style="dim")
    pos = lo
    for t in r.tokens:
        if t.special:
            if (t.index == 0 and lo == 0) or (t.index > 0 and hi == len(r.text)):
                out.append(
                    f"{t.text} ", style="bold reverse" if t.index == r.query.index else "dim"
                )
            continue
        if t.end <= lo or t.start >= hi:
            continue
        if t.start > pos:
            out.append(r.text[pos : t.start])
        s = max(pos, t.start)
        style = ""
        if t.index == r.query.index:
            style = "bold reverse"
        elif r.key is not None and t.index == r.key.index:
            style = "bold underline"
        out.append(r.text[s : t.end], style=style)
        pos = max(pos, t.end)
    if pos < hi:
        out.append(r.text[pos:hi])
    if hi < len(r.text):
        out.append(f" [{_left_out(r.text, hi, len(r.text))} after …]", style="dim")
    return out


def _left_out(text: str, a: int, b: int) -> str:
    """What the echo leaves out, text[a:b], in words ("152 words"); when the cut falls inside
    a word, in characters ("4,364 characters"), since that word is partly shown."""
    cut = b if a == 0 else a  # where the left-out part meets the shown one
    if 0 < cut < len(text) and not text[cut - 1].isspace() and not text[cut].isspace():
        n = b - a
        return f"{n:,} character{'s' if n != 1 else ''}"
    n = len(text[a:b].split())
    return f"{n:,} word{'s' if n != 1 else ''}"


def label(r: ExplainResult, j: int) -> str:
    """A key as the tables name it: its text and its position, 'dog (1)'."""
    return f"{tok(r, j)} ({j})"


def content_ranks(h: Head, top: int) -> list[tuple[int, bool]]:
    """Each kept key's rank by contribution among all the keys the query sees, and whether it
    is exact: (rank, True), or (a lower bound, False) for a key cut lists cannot place.

    A head keeps the top-k by weight ∪ the top-k by contribution (all with top=0), so a rank
    among the kept keys is the true rank up to k; past k it is only a lower bound (the true
    rank counts keys the record dropped)."""
    order = sorted(range(len(h.index)), key=lambda r: -h.contribution[r])
    cut = bool(top) and len(h.index) < h.n_keys
    ranks = [(0, True)] * len(h.index)
    for rank, r in enumerate(order, 1):
        ranks[r] = (rank, not cut or rank <= top)
    return ranks


def content_flag(weight_rank: int, content: tuple[int, bool], weight: float) -> str:
    """The mark beside a key's rank by content: "less" when it takes weight (> 0.05) but is at
    least two places lower by content than by weight (a lower bound suffices); "more" when it
    is at least three places higher by content (only from an exact rank); else "". Marks
    compare a key's two ranks only: an attention sink (the first token, a special token) is
    often "less", but so is any key whose value is small beside its weight."""
    rank, exact = content
    if rank > weight_rank + 1 and weight > 0.05:
        return "less"
    if exact and rank + 2 < weight_rank:
        return "more"
    return ""


def head_table(r: ExplainResult, layer: int, h: Head, whole: bool = True) -> Table:
    """One head's kept keys. `whole`: the number columns never wrap, so no number is cut (the
    key and rank columns give way); a console too narrow for that passes False (they wrap)."""
    t = Table(
        title=f"layer {layer} head {h.head} (kv head {h.kv_head}) — entropy {h.entropy:.2f} nats, "
        f"‖output‖ {h.output_norm:.3g}, {h.n_keys} keys visible"
        + (f"; the learned sink takes {h.sink:.3g} of the weight" if h.sink else ""),
        title_justify="left",
    )
    num = {"no_wrap": whole}
    for col, kw in (
        ("#", {"justify": "right", **num}),
        ("key", {}),
        ("idx", {"justify": "right", **num}),
        ("score", {"justify": "right", **num}),
        ("weight", num),
        ("contribution", num),
        ("rank by content", {"justify": "right"}),
    ):
        t.add_column(col, **kw)
    wmax = float(h.weight.max()) if len(h.weight) else 1.0
    cmax = float(h.contribution.max()) if len(h.contribution) else 1.0
    ranks = content_ranks(h, r.top)
    for rank, (j, s, w, c) in enumerate(
        zip(h.index, h.score, h.weight, h.contribution, strict=True)
    ):
        n, exact = ranks[rank]
        flag = {"less": " ← carries less than its weight",
                "more": " ← carries more than its weight"}.get(content_flag(rank + 1, ranks[rank], w), "")  # fmt: skip
        t.add_row(
            str(rank + 1),
            tok(r, int(j)),
            str(int(j)),
            f"{s:.2f}",
            f"{bar(w, wmax)} {w:.3f}",
            f"{bar(c, cmax)} {c:.3g}",
            f"{n if exact else f'> {r.top}'}{flag}",
        )
    return t


def _pairs(r: ExplainResult, idx, vals, n: int, fmt: str = "{:.2f}") -> str:
    return "  ".join(
        f"{label(r, int(j))} {fmt.format(v)}" for j, v in list(zip(idx, vals, strict=True))[:n]
    )


def _by_contribution(idx, contrib) -> tuple[list, list]:
    order = sorted(range(len(idx)), key=lambda k: -contrib[k])
    return [idx[k] for k in order], [contrib[k] for k in order]


def layer_table(r: ExplainResult, n: int = 2) -> Table:
    """Per layer, the keys with most weight and most content: the layer's own numbers (over
    every head, kept for at least its top 3 whatever `top`), or, when the record holds one head
    per layer (explain(head=H) without a layer), that head's."""
    one = {h.head for lay in r.layers for h in lay.heads}
    if all(len(lay.heads) == 1 for lay in r.layers) and len(one) == 1 and r.model.n_heads > 1:
        head = one.pop()
        title = f"Per layer, head {head}: the keys with most weight vs most content (‖w·v W_O‖)"
        rows = [(lay.layer, lay.heads[0]) for lay in r.layers]
        n = min(n, r.top) if r.top else n  # a head's first `top` by weight/content are exact
    else:
        title = "Per layer: mean weight over heads vs the content carried (‖Σ_h w·v W_O‖)"
        rows = [(lay.layer, lay) for lay in r.layers]
    t = Table(title=title, title_justify="left")
    t.add_column("layer", justify="right")
    t.add_column("most weight")
    t.add_column("most content")
    for layer, x in rows:
        ci, cv = _by_contribution(list(x.index), list(x.contribution))
        style = "yellow" if x.top_weight != x.top_contribution else ""
        t.add_row(
            str(layer),
            _pairs(r, x.index, x.weight, n),
            Text(_pairs(r, ci, cv, n, "{:.3g}"), style=style),
        )
    return t


def heads_table(r: ExplainResult, n: int = 3) -> Table:
    lay = r.layers[0]
    n = min(n, r.top) if r.top else n  # a head's first `top` by weight/content are exact
    t = Table(title=f"layer {lay.layer}: every head", title_justify="left")
    for col in ("head", "most weight", "most content", "entropy", "‖out‖"):
        t.add_column(col, justify="right" if col in ("head", "entropy", "‖out‖") else "left")
    for h in lay.heads:
        ci, cv = _by_contribution(list(h.index), list(h.contribution))
        style = "yellow" if h.disagrees else ""
        t.add_row(
            str(h.head),
            _pairs(r, h.index, h.weight, n),
            Text(_pairs(r, ci, cv, n, "{:.3g}"), style=style),
            f"{h.entropy:.2f}",
            f"{h.output_norm:.3g}",
        )
    return t


def sinks(r: ExplainResult) -> set[int]:
    """Keys left out of the "focused heads" table: the first token, special tokens, the query."""
    return set(sink_tokens(r.tokens, r.query.index))


def focused_heads(r: ExplainResult, n: int = 10) -> Table:
    """The heads that put the most weight on one token other than the sinks (the first token,
    special tokens) and the query itself — where the lookup is about content. Exact whatever
    `top`: the record keeps the sinks and the next key by weight in every head."""
    skip = sinks(r)
    rows = []
    for lay in r.layers:
        for h in lay.heads:
            for rank, (j, w, c) in enumerate(zip(h.index, h.weight, h.contribution, strict=True)):
                if int(j) not in skip:
                    rows.append((float(w), lay.layer, h, int(j), float(c), rank + 1))
                    break
    rows.sort(key=lambda x: -x[0])
    names = ", ".join(repr(label(r, j)) for j in sorted(skip))
    t = Table(
        title=f"Heads that send {label(r, r.query.index)!r} most to one token (other than {names})",
        title_justify="left",
        caption="rank: the key's place by weight in its head (2: one sink above it). "
        "top content: the key that carried the most through that head",
        caption_justify="left",
    )
    for col in ("layer", "head", "key", "rank", "weight", "content", "top content"):
        t.add_column(
            col,
            justify="left" if col in ("key", "weight", "top content") else "right",
            no_wrap=True,
        )
    for w, layer, h, j, c, rank in rows[:n]:
        tc = h.top_contribution
        t.add_row(
            str(layer),
            str(h.head),
            label(r, j),
            str(rank),
            f"{bar(w)} {w:.3f}",
            f"{c:.3g}",
            "same" if tc == j else label(r, tc),
        )
    return t


def key_table(r: ExplainResult, n: int = 10) -> Table:
    assert r.key is not None
    t = Table(
        title=f"Heads that send {label(r, r.query.index)!r} most to {label(r, r.key.index)!r}",
        title_justify="left",
    )
    for col in ("layer", "head", "weight", "contribution", "rank in head"):
        t.add_column(col, justify="left" if col == "weight" else "right", no_wrap=True)
    for layer, head, k in r.heads_to(n=n):
        h = r.head(layer, head)
        rank = int(sum(h.weight > k.weight)) + 1  # exact up to `top`: those keys are all kept
        t.add_row(
            str(layer),
            str(head),
            f"{bar(k.weight)} {k.weight:.3f}",
            f"{k.contribution:.3g}",
            str(rank) if not r.top or rank <= r.top else f"> {r.top}",
        )
    return t


def neuron_lines(r: ExplainResult) -> str:
    """The identity under the neuron table, with both numbers: Σ q_d k_d · scale = score, and
    the score the record holds for that head and key (when it kept it)."""
    v = r.neuron
    assert v is not None
    s = f"Σ_d q_d·k_d = {v.dot:.6g};  × scale {v.scale:.6g} = score {v.score:.6g}"
    held = None
    for lay in r.layers:
        for h in lay.heads:
            if lay.layer == v.layer and h.head == v.head:
                held = h.key(v.key.index)
    if held is not None:
        s += f"  (the record's score for this key: {held.score:.6g})"
    rope = (
        f"q and k after RoPE ({v.rope_dims} of {len(v.q)} dims rotated)"
        if v.rope_dims
        else "no RoPE: q and k as projected"
    )
    return s + "\n" + rope


def neuron_table(r: ExplainResult, n: int = 10) -> Table:
    """The Q·K neuron view: the `n` dims with the largest |q_d k_d|, with q_d, k_d, their
    product (a bar of |product| and its sign) and the running share of Σ q_d k_d."""
    v = r.neuron
    assert v is not None
    t = Table(
        title=f"Q·K neuron view · layer {v.layer} head {v.head} (kv head {v.kv_head}): "
        f"{label(r, v.query.index)!r} · {label(r, v.key.index)!r}, top {min(n, len(v.q))} of "
        f"{len(v.q)} dims by |q_d·k_d|",
        title_justify="left",
        caption=neuron_lines(r),
        caption_justify="left",
    )
    for col in ("dim", "q_d", "k_d", "q_d·k_d", "running share"):
        t.add_column(col, justify="left" if col == "q_d·k_d" else "right", no_wrap=True)
    prod, dims, share = v.product, v.top(n), v.share(n)
    full = float(abs(prod).max()) if len(prod) else 1.0
    for d, sh in zip(dims, share, strict=True):
        p = prod[d]
        t.add_row(
            str(int(d)),
            f"{v.q[d]:+.3f}",
            f"{v.k[d]:+.3f}",
            f"{'+' if p >= 0 else '−'}{bar(abs(p), full)} {p:+.3f}",
            f"{sh:.0%}",
        )
    rest = len(prod) - len(dims)
    if rest > 0:
        t.add_row(f"{rest} more", "", "", f"{'':{BAR + 1}} {prod[v.top()[n:]].sum():+.3f}", "100%")
    return t


def propagation_table(r: ExplainResult, what: str = "flow", n: int = 8) -> Table:
    """The record's contribution flow (`what="flow"`) or classic rollout, top `n` tokens, with
    the caveat when one token holds more than 90%."""
    from .rollout import rollout_caveat

    p = r.flow if what == "flow" else r.rollout
    assert p is not None
    v = p.values
    order = [j for j in sorted(range(len(v)), key=lambda j: -v[j])[:n] if v[j] >= 1e-3] or [
        int(v.argmax())
    ]
    title = (
        "Contribution flow (norm-based, Kobayashi et al. 2020/2021)"
        if what == "flow"
        else "Attention rollout (Abnar & Zuidema 2020, weights only)"
    )
    t = Table(
        title=f"{title} into {label(r, r.query.index)!r} through layer {p.through_layer}",
        title_justify="left",
        min_width=60,
    )
    t.add_column("token")
    t.add_column("idx", justify="right")
    t.add_column("share")
    vmax = max(float(v.max()), 1e-12)
    for j in order:
        t.add_row(tok(r, j), str(j), f"{bar(float(v[j]), vmax)} {v[j]:.3f}")
    rest = float(v.sum() - sum(v[j] for j in order))
    caption = [f"the other tokens together: {rest:.3f}"] if rest >= 5e-4 else []
    j = int(v.argmax())
    caveat = rollout_caveat(v, repr(tok(r, j)), "contribution flow" if what == "flow" else what)
    if caveat:
        caption.append("caveat: " + caveat)
    t.caption = "\n".join(caption) or None
    t.caption_justify = "left"
    return t


def render(r: ExplainResult, console: Console | None = None, *, n: int = 10) -> None:
    """Print the record: header, notes, then the tables that fit what the record holds —
    one head: its ranked keys; one layer: every head; all layers: per-layer summary,
    content-routing heads, heads to the chosen key, contribution flow and rollout (when asked
    for); a mixture-of-experts model's experts for the query."""
    c = console or Console()
    m = r.model
    kind = "causal decoder" if m.causal else "bidirectional encoder"
    c.print(
        f"[bold]qkv explain[/] · {m.name} ({kind}, {m.n_layers} layers × {m.n_heads} heads, "
        f"{m.n_kv_heads} kv heads{dtype_words(m)}) · {len(r.tokens)} tokens · query [bold reverse]"
        f"{tok(r, r.query.index)}[/] (token {r.query.index})"
    )
    c.print(marked_text(r))
    if m.windows is not None:
        c.print(Text("• " + window_line(m), style="dim"))
    for note in r.notes:
        c.print(Text("• " + note, style="dim"))
    heads = [(lay.layer, h) for lay in r.layers for h in lay.heads]
    if len(heads) <= 3:
        for layer, h in heads:
            t = head_table(r, layer, h)
            if c.measure(t, options=c.options.update_width(10**4)).minimum > c.width:
                # too narrow for whole numbers beside a word of each key: let the numbers wrap
                t = head_table(r, layer, h, whole=False)
            c.print(t)
    elif len(r.layers) == 1:
        c.print(heads_table(r))
    else:
        c.print(layer_table(r))
        c.print(focused_heads(r, n))
    if r.key is not None and len(heads) > 1:
        c.print(key_table(r, n))
    if r.flow is not None:
        c.print(propagation_table(r, "flow"))
    if r.rollout is not None:
        c.print(propagation_table(r, "rollout"))
    if r.neuron is not None:
        c.print(neuron_table(r, n))
    if r.experts is not None:
        c.print(experts_table(r))


def experts_table(r: ExplainResult) -> Table:
    """A mixture-of-experts model: per sparse layer, the experts the query token went to and
    their routing weights (the MLP's own lookup: the router scores one key per expert)."""
    assert r.experts is not None
    sums = [float(x.weights.sum()) for x in r.experts.layers]
    scaled = any(abs(v - 1.0) > 1e-3 for v in sums)
    lo, hi = f"{min(sums):.3g}", f"{max(sums):.3g}"
    t = Table(
        title=f"Experts {label(r, r.query.index)!r} was routed to",
        title_justify="left",
        caption="each sparse MLP's router scores the token against one key per expert; the "
        "top k experts process it, their outputs blended by these weights"
        + (
            f" (here they sum to {lo if lo == hi else f'{lo}–{hi}'}, not 1: the model scales or "
            "does not renormalise them)"
            if scaled
            else ""
        ),
        caption_justify="left",
    )
    for col in ("layer", "experts (weight)", "of"):
        t.add_column(col, justify="left" if col == "experts (weight)" else "right")
    for x in r.experts.layers:
        pairs = ", ".join(f"{int(e)} ({w:.3f})" for e, w in zip(x.experts, x.weights, strict=True))
        t.add_row(str(x.layer), pairs, str(x.n_experts))
    return t


def render_text(r: ExplainResult, width: int = 120, **kwargs: Any) -> str:
    """The terminal view as plain text (no colour codes)."""
    buf = io.StringIO()
    render(r, Console(file=buf, width=width, color_system=None, force_terminal=False), **kwargs)
    return buf.getvalue()


def window_line(m: Any) -> str:
    """Which layers attend through a sliding window and which globally, e.g. "local layers
    (window 512: each query sees its last 512 keys): 15 of 18; global: 5, 11, 17"."""
    local = [(i, w) for i, w in enumerate(m.windows) if w is not None]
    glob = [i for i, w in enumerate(m.windows) if w is None]
    kinds = sorted({w for _, w in local}, key=str)
    if len(kinds) == 1 and m.causal and kinds[0][1] in (0, None) and kinds[0][0] is not None:
        what = f"window {kinds[0][0] + 1}: each query sees its last {kinds[0][0] + 1} keys"
    else:
        what = "windows " + ", ".join(f"(left {w[0]}, right {w[1]})" for w in kinds)
    shown = ", ".join(map(str, glob)) if glob else "none"
    return f"local layers ({what}): {len(local)} of {len(m.windows)}; global: {shown}"
