"""Why three projections? Train the same model on the same task with W_Q, W_K, W_V separate,
Q and K tied, all three tied, and no value projection (V = X), several seeds each at the same
budget, and compare accuracy and speed of learning.

    result = projections(make_task("recall", n_records=8), seeds=(0, 1, 2), steps=600)
    print(result.table())
    result.plot("curves.png")
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..models.tiny import PROJECTIONS, write_atomic
from .loop import TrainConfig, train
from .tasks import RecallTask, Task

VARIANTS = PROJECTIONS  # ("separate", "tied_qk", "tied_qkv", "no_v")
DESCRIPTIONS = {
    "separate": "W_Q, W_K, W_V separate (standard)",
    "tied_qk": "W_Q = W_K",
    "tied_qkv": "W_Q = W_K = W_V",
    "no_v": "no value projection (V = X)",
}
# the experiment's default task: small enough that a dozen runs take a few minutes
DEFAULT_TASK = {"n_records": 8, "n_keys": 16, "n_values": 16, "n_queries": 4}
DEFAULT_STEPS = 600
DEFAULT_SEEDS = 3
THRESHOLD = 0.9  # "steps to 90%"


@dataclass
class Run:
    variant: str
    seed: int
    accuracy: float  # held-out test query accuracy at the end of the budget
    sequence_accuracy: float
    steps_to_threshold: int | None  # first evaluation step with validation accuracy ≥ THRESHOLD
    seconds: float
    steps: int
    parameters: int
    curve: list[tuple[int, float]]


def _mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


@dataclass
class ProjectionsResult:
    task: dict
    arch: dict
    train: dict
    runs: list[Run] = field(default_factory=list)

    def variants(self) -> list[str]:
        return list(dict.fromkeys(r.variant for r in self.runs))

    def summary(self) -> list[dict]:
        """Per variant: accuracy mean/sd/min/max, steps to 90% (mean/sd over the seeds that got
        there, and how many did), seconds, parameter count."""
        rows = []
        for v in self.variants():
            rs = [r for r in self.runs if r.variant == v]
            acc = [r.accuracy for r in rs]
            reached = [r.steps_to_threshold for r in rs if r.steps_to_threshold is not None]
            m, sd = _mean_sd(acc)
            sm, ssd = _mean_sd(reached)
            rows.append(
                {
                    "variant": v,
                    "accuracy_mean": m,
                    "accuracy_sd": sd,
                    "accuracy_min": min(acc),
                    "accuracy_max": max(acc),
                    "steps_to_90_mean": sm,
                    "steps_to_90_sd": ssd,
                    "reached_90": len(reached),
                    "seeds": len(rs),
                    "seconds_mean": statistics.fmean(r.seconds for r in rs),
                    "parameters": rs[0].parameters,
                }
            )
        return rows

    def table(self) -> str:
        """A plain-text table: final held-out accuracy (mean ± sd [min, max]), steps to 90%."""
        head = f"{'variant':<10} {'what':<34} {'params':>7} {'final accuracy':>26} {'steps to 90%':>20} {'s/run':>6}"
        lines = [head, "-" * len(head)]
        for row in self.summary():
            acc = (
                f"{100 * row['accuracy_mean']:5.1f} ± {100 * row['accuracy_sd']:4.1f} "
                f"[{100 * row['accuracy_min']:4.1f}, {100 * row['accuracy_max']:5.1f}]"
            )
            if row["reached_90"]:
                steps = f"{row['steps_to_90_mean']:.0f} ± {row['steps_to_90_sd']:.0f} ({row['reached_90']}/{row['seeds']})"
            else:
                steps = f"never (0/{row['seeds']})"
            lines.append(
                f"{row['variant']:<10} {DESCRIPTIONS[row['variant']]:<34} {row['parameters']:>7} "
                f"{acc:>26} {steps:>20} {row['seconds_mean']:>6.1f}"
            )
        t = self.task
        params = ", ".join(f"{k}={v}" for k, v in t.items() if k != "name")
        lines.append("")
        lines.append(
            f"task {t['name']}({params}); {self.train['steps']} steps × batch {self.train['batch_size']}, "
            f"{len({r.seed for r in self.runs})} seeds; accuracy in % on held-out queries, "
            "mean ± sd [min, max] over seeds; steps to 90%: mean ± sd over the seeds that got there"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "arch": self.arch,
            "train": self.train,
            "summary": self.summary(),
            "runs": [dataclasses.asdict(r) for r in self.runs],
        }

    def save_json(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    def plot(self, path: str | Path) -> Path:
        """Learning curves (held-out validation accuracy vs step): the mean over seeds per
        variant, with the min–max band. Written with matplotlib's Agg backend."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
        for v in self.variants():
            rs = [r for r in self.runs if r.variant == v]
            steps = [s for s, _ in rs[0].curve]
            accs = [[a for _, a in r.curve] for r in rs]
            n = min(len(a) for a in accs)
            cols = list(zip(*(a[:n] for a in accs), strict=True))
            mean = [statistics.fmean(c) for c in cols]
            (line,) = ax.plot(steps[:n], mean, label=f"{v}: {DESCRIPTIONS[v]}")
            ax.fill_between(
                steps[:n],
                [min(c) for c in cols],
                [max(c) for c in cols],
                color=line.get_color(),
                alpha=0.2,
            )
        t = self.task
        params = ", ".join(f"{k}={v}" for k, v in t.items() if k != "name")
        ax.set_title(f"{t['name']}({params})", fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out query accuracy")
        ax.set_ylim(0, 1.02)
        ax.axhline(THRESHOLD, color="grey", lw=0.5, ls=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right")
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.png")
        try:
            fig.savefig(tmp)
            tmp.replace(path)
        finally:
            plt.close(fig)
            tmp.unlink(missing_ok=True)
        return path


def projections(
    task: Task | None = None,
    *,
    variants: Sequence[str] = VARIANTS,
    seeds: Sequence[int] = tuple(range(DEFAULT_SEEDS)),
    steps: int = DEFAULT_STEPS,
    arch: dict | None = None,
    train_config: TrainConfig | None = None,
    progress: bool = True,
    on_run=None,
) -> ProjectionsResult:
    """Train every variant with every seed for exactly `steps` steps (no early stop) on `task`
    (default: recall with 8 records, 16 keys, 16 values, 4 queries) and collect the results.

    `arch` are TinyConfig fields shared by all variants (`projections` is set per variant);
    `train_config` supplies the other training settings (its steps, seed, target are replaced).
    `on_run(run)` is called after each run (for printing progress)."""
    task = task if task is not None else RecallTask(**DEFAULT_TASK)
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    if not seeds:
        raise ValueError("give at least one seed")
    arch = dict(arch or {})
    if "projections" in arch:
        raise ValueError("arch['projections'] is what the experiment varies; do not pass it")
    base = train_config or TrainConfig(eval_every=50)
    base = dataclasses.replace(base, steps=steps, target=None, progress=progress)
    result = ProjectionsResult(task=task.to_dict(), arch=arch, train=dataclasses.asdict(base))
    for v in variants:
        for s in seeds:
            cfg = dataclasses.replace(base, seed=int(s))
            r = train(task, cfg, arch={**arch, "projections": v})
            m = r.metrics
            run = Run(
                variant=v,
                seed=int(s),
                accuracy=m["accuracy"],
                sequence_accuracy=m["sequence_accuracy"],
                steps_to_threshold=next((st for st, a in r.curve if a >= THRESHOLD), None),
                seconds=m["seconds"],
                steps=m["steps"],
                parameters=m["parameters"],
                curve=r.curve,
            )
            result.runs.append(run)
            if on_run is not None:
                on_run(run)
    return result
