"""Synthetic lookup tasks, generated on the fly from a seed.

Every task is a frozen dataclass of its parameters (validated in `__post_init__`) with a
symbolic vocabulary (`task.vocab`, strings such as "k3", "v7", "?") and
`task.sample(b, generator) -> Batch(ids (b i), targets (b i))`; `targets` holds the token the
model must predict *at* each position (next-token prediction) and `IGNORE` where nothing is scored.

`recall` — associative recall, the database lookup literally::

    k3 v7 k1 v2 k9 v7 ? k1 v2 k3      targets: at "k1" → v2, at "k3" → v7

  `n_records` key→value records with distinct keys, then "?", then `n_queries` distinct queried
  keys, each followed by its answer (so later queries see earlier answers; the answer after the
  last query is only a target). `seq_len` longer than needed inserts filler "_" tokens at random
  places between the records.

`induction` — "… A B … A → B": random symbols, where the last symbol A occurred exactly once
before, followed by B; the model must predict B at the end. Needs two layers working together
(a previous-token head writes "my predecessor was A" into B, an induction head matches on it).

`copy` — a random segment of distinct symbols, then the same segment again; every position of
the repeat after its first symbol is scored (induction at every step).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

IGNORE = -100  # targets at unscored positions (torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class Batch:
    """ids (b i) long token ids; targets (b i) long, `IGNORE` where nothing is scored."""

    ids: Tensor
    targets: Tensor


def _positive(task: object, *names: str) -> None:
    for name in names:
        value = getattr(task, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{type(task).name}: {name} must be an int, got {value!r}")
        if value <= 0:
            raise ValueError(f"{type(task).name}: {name} must be positive, got {value}")


class Task:
    """Shared helpers. Subclasses are frozen dataclasses with `name`, `vocab` (tuple of str),
    `seq_len` (int) and `sample(batch_size, generator) -> Batch`."""

    name: ClassVar[str]
    vocab: tuple[str, ...]
    seq_len: int

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def params(self) -> dict:
        return dataclasses.asdict(self)

    def to_dict(self) -> dict:
        return {"name": self.name, **self.params()}

    def text(self, ids: Tensor | list[int]) -> str:
        """Token ids (i) → the space-separated text the model's tokenizer reads back."""
        vocab = self.vocab
        return " ".join(vocab[int(t)] for t in ids)

    def _check_batch(self, batch_size: int) -> None:
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


@dataclass(frozen=True)
class RecallTask(Task):
    """Associative recall: `n_records` key→value records, "?", then `n_queries` queried keys.

    Vocabulary: "_" (filler), "?" (start of queries), "k0".."k{n_keys-1}", "v0".."v{n_values-1}".
    Minimum length 2·n_records + 2·n_queries; `seq_len=None` means exactly that.
    """

    name: ClassVar[str] = "recall"
    n_records: int = 16
    n_keys: int = 32
    n_values: int = 32
    n_queries: int = 4
    seq_len: int | None = None

    def __post_init__(self) -> None:
        _positive(self, "n_records", "n_keys", "n_values", "n_queries")
        if self.n_records > self.n_keys:
            raise ValueError(
                f"recall: n_records={self.n_records} records need as many distinct keys, but "
                f"n_keys={self.n_keys}; raise n_keys to at least {self.n_records} or use fewer records"
            )
        if self.n_queries > self.n_records:
            raise ValueError(
                f"recall: n_queries={self.n_queries} distinct queries need as many records, but "
                f"n_records={self.n_records}; use at most {self.n_records} queries"
            )
        if self.seq_len is not None:
            if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool):
                raise TypeError(f"recall: seq_len must be an int or None, got {self.seq_len!r}")
            if self.seq_len < self.min_len:
                raise ValueError(
                    f"recall: seq_len={self.seq_len} is too short for {self.n_records} records and "
                    f"{self.n_queries} queries: need at least 2·{self.n_records} + 2·{self.n_queries} "
                    f"= {self.min_len} tokens"
                )
        object.__setattr__(self, "seq_len", self.seq_len or self.min_len)

    @property
    def min_len(self) -> int:
        return 2 * self.n_records + 2 * self.n_queries

    @property
    def vocab(self) -> tuple[str, ...]:
        keys = tuple(f"k{i}" for i in range(self.n_keys))
        return ("_", "?", *keys, *(f"v{i}" for i in range(self.n_values)))

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        self._check_batch(batch_size)
        B, R, Q, L = batch_size, self.n_records, self.n_queries, self.seq_len
        FILL, SEP, K0, V0 = 0, 1, 2, 2 + self.n_keys
        g = generator
        keys = torch.rand(B, self.n_keys, generator=g).argsort(1)[:, :R]  # (b r) distinct
        values = torch.randint(self.n_values, (B, R), generator=g)  # (b r)
        asked = torch.rand(B, R, generator=g).argsort(1)[:, :Q]  # (b q) distinct records
        # filler: each of the L - min_len "_" tokens goes into one of the R + 1 gaps
        n_fill = L - self.min_len
        gaps = torch.randint(R + 1, (B, n_fill), generator=g)
        per_gap = torch.zeros(B, R + 1, dtype=torch.long).scatter_add_(
            1, gaps, torch.ones_like(gaps)
        )
        key_pos = 2 * torch.arange(R) + per_gap.cumsum(1)[:, :R]  # (b r)
        ids = torch.full((B, L), FILL, dtype=torch.long)
        ids.scatter_(1, key_pos, K0 + keys)
        ids.scatter_(1, key_pos + 1, V0 + values)
        sep = 2 * R + n_fill
        ids[:, sep] = SEP
        q_pos = sep + 1 + 2 * torch.arange(Q)  # query j at sep+1+2j, its answer right after
        q_keys = keys.gather(1, asked)
        q_vals = values.gather(1, asked)
        ids[:, q_pos] = K0 + q_keys
        ids[:, q_pos[:-1] + 1] = V0 + q_vals[:, :-1]
        targets = torch.full((B, L), IGNORE, dtype=torch.long)
        targets[:, q_pos] = V0 + q_vals
        return Batch(ids, targets)


@dataclass(frozen=True)
class InductionTask(Task):
    """ "… A B … A → B": `seq_len` symbols from `n_symbols`; the last one (A) occurred exactly
    once before, followed by B ≠ A; the target at the last position is B.

    Vocabulary: "t0".."t{n_symbols-1}". Needs n_symbols ≥ 3 and seq_len ≥ 3.
    """

    name: ClassVar[str] = "induction"
    n_symbols: int = 16
    seq_len: int = 16

    def __post_init__(self) -> None:
        _positive(self, "n_symbols", "seq_len")
        if self.n_symbols < 3:
            raise ValueError(
                f"induction: n_symbols={self.n_symbols} is too few: A, B and at least one other "
                "symbol are needed; use n_symbols ≥ 3"
            )
        if self.seq_len < 3:
            raise ValueError(
                f"induction: seq_len={self.seq_len} is too short for the pattern 'A B … A'; "
                "use seq_len ≥ 3"
            )

    @property
    def vocab(self) -> tuple[str, ...]:
        return tuple(f"t{i}" for i in range(self.n_symbols))

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        self._check_batch(batch_size)
        B, V, L = batch_size, self.n_symbols, self.seq_len
        g = generator
        a = torch.randint(V, (B, 1), generator=g)  # (b 1)
        ids = torch.randint(V - 1, (B, L), generator=g)  # symbols other than A: skip over a
        ids = ids + (ids >= a).long()
        b = torch.randint(V - 1, (B, 1), generator=g)
        b = b + (b >= a).long()
        p = torch.randint(L - 2, (B, 1), generator=g)  # A at p, B at p + 1, A again at L - 1
        ids.scatter_(1, p, a)
        ids.scatter_(1, p + 1, b)
        ids[:, -1:] = a
        targets = torch.full((B, L), IGNORE, dtype=torch.long)
        targets[:, -1:] = b
        return Batch(ids, targets)


@dataclass(frozen=True)
class CopyTask(Task):
    """A segment of `length` distinct symbols, then the same segment again: positions
    length..2·length−2 are scored, each predicting the next symbol of the repeat.

    Vocabulary: "t0".."t{n_symbols-1}". seq_len = 2·length.
    """

    name: ClassVar[str] = "copy"
    n_symbols: int = 16
    length: int = 8

    def __post_init__(self) -> None:
        _positive(self, "n_symbols", "length")
        if self.length < 2:
            raise ValueError(
                f"copy: length={self.length} leaves nothing to predict; use length ≥ 2"
            )
        if self.length > self.n_symbols:
            raise ValueError(
                f"copy: a segment of length={self.length} distinct symbols needs n_symbols ≥ "
                f"{self.length}, got n_symbols={self.n_symbols}"
            )

    @property
    def seq_len(self) -> int:
        return 2 * self.length

    @property
    def vocab(self) -> tuple[str, ...]:
        return tuple(f"t{i}" for i in range(self.n_symbols))

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        self._check_batch(batch_size)
        B, n = batch_size, self.length
        seg = torch.rand(B, self.n_symbols, generator=generator).argsort(1)[:, :n]  # (b n)
        ids = torch.cat([seg, seg], 1)
        targets = torch.full_like(ids, IGNORE)
        targets[:, n : 2 * n - 1] = seg[:, 1:]
        return Batch(ids, targets)


TASKS: dict[str, type[Task]] = {t.name: t for t in (RecallTask, InductionTask, CopyTask)}


def make_task(name: str, **params) -> Task:
    """`make_task("recall", n_records=8)`: a task by name; unknown names or parameters raise."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task {name!r}: choose one of {sorted(TASKS)}{hint}")
    cls = TASKS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(
            f"task {name!r} has no parameter(s) {unknown}; its parameters are {fields}"
        )
    return cls(**params)
