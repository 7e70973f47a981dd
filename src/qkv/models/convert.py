"""Declarative weight conversion: checkpoint tensors → a model's parameters.

A conversion is a list of `Rule(dst, src, fn)`: `dst` is a parameter/buffer name of the model,
`src` a key of the checkpoint, `{}` in both stands for the layer index, and `fn` an explicit
reshape (e.g. `heads_in(n_heads, d_head)` turns an nn.Linear weight (h·d, m) into the per-head
W_Q (h m d)). `convert` checks every shape, reports missing and unexpected keys strictly, and
loads nothing unless everything fits (no half-loaded model).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

Reshape = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Rule:
    """Model tensor `dst` ← `fn(checkpoint[src])`; `{}` in dst/src is the layer index."""

    dst: str
    src: str
    fn: Reshape | None = None


@dataclass
class Report:
    """What `convert` did: model names loaded, and what did not match."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # rule sources the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys no rule uses
    ignored: list[str] = field(default_factory=list)  # checkpoint keys matching `ignore`


def heads_in(n_heads: int, d_head: int) -> Reshape:
    """nn.Linear weight (h·d, m) → per-head input projection (h, m, d) (W_Q, W_K, W_V)."""

    def fn(w: Tensor) -> Tensor:
        if w.dim() != 2 or w.shape[0] != n_heads * d_head:
            return w  # the shape check reports it
        return w.view(n_heads, d_head, w.shape[1]).transpose(1, 2)  # a view, no copy

    return fn


def heads_out(n_heads: int, d_head: int) -> Reshape:
    """nn.Linear weight (m, h·d) → per-head output projection (h, d, m) (W_O)."""

    def fn(w: Tensor) -> Tensor:
        if w.dim() != 2 or w.shape[1] != n_heads * d_head:
            return w
        return w.t().view(n_heads, d_head, w.shape[0])  # a view, no copy

    return fn


def heads_bias(n_heads: int, d_head: int) -> Reshape:
    """Bias (h·d,) → per-head bias (h, d) (b_Q, b_K, b_V)."""

    def fn(b: Tensor) -> Tensor:
        if b.dim() != 1 or b.shape[0] != n_heads * d_head:
            return b
        return b.reshape(n_heads, d_head)

    return fn


def expand(rules: Iterable[Rule], n_layers: int) -> list[Rule]:
    """Rules with `{}` repeated for layers 0..n_layers-1; others as they are."""
    out = []
    for r in rules:
        if "{}" in r.dst or "{}" in r.src:
            out += [Rule(r.dst.format(i), r.src.format(i), r.fn) for i in range(n_layers)]
        else:
            out.append(r)
    return out


def _shape(t: Tensor | torch.Size) -> tuple[int, ...]:
    return tuple(t.shape if isinstance(t, Tensor) else t)


def convert(
    checkpoint: Mapping[str, Tensor],
    rules: Iterable[Rule],
    model: nn.Module,
    *,
    n_layers: int,
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
    check_finite: bool = True,
    assign: bool = False,
    expected: str = "the model",
    hint: str = "is the file complete, and does it belong to this model?",
    file_key: Callable[[str], str] | None = None,
) -> Report:
    """Fill every tensor of `model.state_dict()` from `checkpoint` through `rules`, or raise.

    Raises ValueError (nothing loaded) if a model tensor has no rule, a rule's source key is
    absent, a checkpoint key is used by no rule and matches no `ignore` glob, a converted tensor's
    shape differs from the model's (naming the tensor, the expected and the actual shape), or a
    tensor holds NaN/inf. Tensors are cast to the model tensor's dtype. `assign=True` makes the
    converted tensors the model's parameters (no copy; lets a model built on the meta device
    load); the per-head reshapes are views, so such parameters may be non-contiguous.

    Errors are one line in the file's words: `file_key(key)` is how the file names a key of
    `checkpoint` (a loader that strips a prefix puts it back: 'model.layers.0.mlp.up_proj.weight'),
    `expected` what the rules describe ("a llama checkpoint of this config.json"), `hint` what
    to check when tensors are missing or unexpected.
    """
    named = file_key or (lambda k: k)
    rules = expand(rules, n_layers)
    target = model.state_dict()
    by_dst: dict[str, Rule] = {}
    for r in rules:
        if r.dst in by_dst:
            raise ValueError(f"two rules fill {r.dst!r}: {by_dst[r.dst].src!r} and {r.src!r}")
        by_dst[r.dst] = r
    report = Report()
    if unfilled := [name for name in target if name not in by_dst]:
        raise ValueError(f"{source}: no rule fills {len(unfilled)} tensors of "
                         f"{type(model).__name__}: {unfilled[:10]} (qkv's weight map is "
                         "incomplete)")  # fmt: skip
    extra = [r.dst for r in rules if r.dst not in target]
    if extra:
        raise ValueError(f"rules name tensors the model does not have: {extra[:10]}")
    keys = set(checkpoint.keys())
    report.missing += [r.src for r in rules if r.src not in keys]
    used = {r.src for r in rules}
    patterns = list(ignore)
    for key in sorted(keys - used):
        (
            report.ignored
            if any(fnmatch.fnmatchcase(key, p) for p in patterns)
            else report.unexpected
        ).append(key)
    if report.missing or report.unexpected:
        raise ValueError(f"{source}: " + _mismatch(report, named, expected, hint))
    state: dict[str, Tensor] = {}
    for r in rules:
        raw = checkpoint[r.src]
        if not isinstance(raw, Tensor):
            raise TypeError(
                f"{source}: {named(r.src)!r} is a {type(raw).__name__}, expected a tensor"
            )
        t = r.fn(raw) if r.fn is not None else raw
        want = target[r.dst]
        if _shape(t) != _shape(want):
            same = r.fn is None or _shape(t) == _shape(raw)
            after = "" if same else f" (→ {_shape(t)} after conversion)"
            raise ValueError(
                f"{source}: tensor {named(r.src)!r} has shape {_shape(raw)}{after} but {r.dst!r} expects "
                f"{_shape(want)}; the file is corrupted or belongs to another model"
            )
        if want.is_floating_point():
            if not t.is_floating_point():
                raise ValueError(
                    f"{source}: tensor {named(r.src)!r} is {t.dtype}, expected a floating tensor "
                    f"for {r.dst!r}"
                )
            t = t.to(want.dtype)
            # a finite sum implies every element is finite (NaN/inf propagate); exact check otherwise
            if (
                check_finite
                and not bool(torch.isfinite(t.sum()))
                and not bool(torch.isfinite(t).all())
            ):
                raise ValueError(
                    f"{source}: tensor {named(r.src)!r} contains NaN or inf; the file is corrupted"
                )
        state[r.dst] = t
        report.loaded.append(r.dst)
    model.load_state_dict(state, strict=True, assign=assign)
    return report


def with_article(word: str) -> str:
    """`word` after its indefinite article: 'a llama', 'an olmo2'."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _listed(names: list[str], n: int = 5) -> str:
    """'a', 'b', 'c', … : the first `n` names quoted, an ellipsis for the rest."""
    return ", ".join(map(repr, names[:n])) + (", …" if len(names) > n else "")


def _mismatch(report: Report, named: Callable[[str], str], expected: str, hint: str) -> str:
    """One line: the tensors `expected` has that the checkpoint lacks, and those it holds that
    `expected` does not have, each by the file's own name (`named`; several keys of qkv's that
    come from one tensor of the file, as GraniteMoE's experts do, are named once)."""
    missing = list(dict.fromkeys(map(named, report.missing)))
    extra = list(dict.fromkeys(map(named, report.unexpected)))
    parts = []
    if len(missing) == 1:
        parts.append(f"the checkpoint lacks tensor {missing[0]!r} that {expected} has (1 missing")
    elif missing:
        parts.append(
            f"the checkpoint lacks {len(missing)} tensors that {expected} has "
            f"({len(missing)} missing: {_listed(missing)}"
        )
    if extra:
        s = "" if len(extra) == 1 else "s"
        holds = f"{len(extra)} tensor{s} {expected} does not have: {_listed(extra)}"
        parts.append(f"; it also holds {holds}" if missing else f"the checkpoint holds {holds} (")
    return "".join(parts) + ("; " if missing else "") + hint + ")"


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a .safetensors file (CPU), with a clear error for a missing/corrupted file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file (corrupted or truncated?): {e}"
        ) from e
