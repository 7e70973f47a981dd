"""Training a tiny transformer on a task: AdamW, a progress bar, held-out evaluation, checkpoints.

    result = train(make_task("recall"), TrainConfig(seed=0), out="runs/recall")
    result.metrics["accuracy"]       # query accuracy on held-out test sequences

Deterministic for a seed (same seed, same thread count → identical weights): the model is
initialised under `torch.manual_seed(seed)` inside a forked RNG, training batches come from a
generator seeded with `seed`, and the validation/test sets from fixed seeds of their own, so
every seed and every variant is scored on the same held-out sequences.

Letters: b batch, i position, v vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._validate import positive_ints
from ..models.tiny import (
    TinyConfig,
    TinyTransformer,
    n_parameters,
    save_checkpoint,
    writable_dir,
    write_atomic,
)
from .tasks import IGNORE, Batch, Task

VAL_SEED = 1_000_003  # held-out sets: fixed, independent of the training seed
TEST_SEED = 2_000_003
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class TrainConfig:
    """How to train. `target`: stop once validation query accuracy reaches it (None: run all
    `steps`). `time_limit`: stop after that many seconds. `checkpoint_every`: steps between
    checkpoints when an output directory is given (the final model is always written)."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_size: int = 500
    test_size: int = 2000
    target: float | None = 0.995
    time_limit: float | None = None
    checkpoint_every: int = 500
    threads: int | None = 1  # torch CPU threads while training; None leaves torch's setting
    progress: bool = True

    def __post_init__(self) -> None:
        positive_ints(
            "TrainConfig",
            self,
            ("steps", "batch_size", "eval_every", "eval_size", "test_size", "checkpoint_every"),
        )
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"TrainConfig: warmup must be an int ≥ 0, got {self.warmup!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"TrainConfig: seed must be an int, got {self.seed!r}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"TrainConfig: {name} must be positive, got {getattr(self, name)!r}"
                )
        if not self.weight_decay >= 0:
            raise ValueError(f"TrainConfig: weight_decay must be ≥ 0, got {self.weight_decay!r}")
        if self.target is not None and not 0 < self.target <= 1:
            raise ValueError(f"TrainConfig: target must be in (0, 1] or None, got {self.target!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads <= 0):
            raise ValueError(
                f"TrainConfig: threads must be a positive int or None, got {self.threads!r}"
            )
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(
                f"TrainConfig: time_limit must be positive seconds or None, got {self.time_limit!r}"
            )


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees after each optimiser step."""

    step: int
    loss: float
    accuracy: float  # on this training batch's scored positions
    val_accuracy: float | None  # the latest held-out evaluation, if any yet
    seconds: float
    model: TinyTransformer


@dataclass
class TrainResult:
    model: TinyTransformer
    metrics: dict
    curve: list[tuple[int, float]] = field(
        default_factory=list
    )  # (step, validation query accuracy)


def build_model(task: Task, **arch) -> TinyTransformer:
    """A TinyTransformer sized for `task` (its vocabulary and sequence length); `arch` are
    TinyConfig fields (n_layers, n_heads, d_model, d_head, d_mlp, projections, positions, ...)."""
    fixed = {"vocab", "max_positions"} & set(arch)
    if fixed:
        raise ValueError(f"{sorted(fixed)} come from the task; do not pass them")
    arch.setdefault("name", f"tiny-{task.name}")
    return TinyTransformer(TinyConfig(vocab=task.vocab, max_positions=task.seq_len, **arch))


def scored(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int, int, int]:
    """(correct queries, scored queries, fully correct sequences, sequences) from logits (b i v)."""
    keep = targets != IGNORE  # (b i)
    hit = (logits.argmax(-1) == targets) & keep
    seq_ok = (hit.sum(1) == keep.sum(1)).sum()
    return int(hit.sum()), int(keep.sum()), int(seq_ok), targets.shape[0]


@torch.no_grad()
def evaluate(model: TinyTransformer, batch: Batch, chunk: int = 1000) -> dict:
    """Query accuracy (argmax over the whole vocabulary at each scored position) and sequence
    accuracy (every query of the sequence right) on `batch`."""
    was_training = model.training
    model.eval()
    tot = [0, 0, 0, 0]
    loss_sum = 0.0
    for s in range(0, batch.ids.shape[0], chunk):
        ids, targets = batch.ids[s : s + chunk], batch.targets[s : s + chunk]
        logits = model(ids)  # (b i v)
        loss_sum += float(
            F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
            )
        )
        tot = [a + b for a, b in zip(tot, scored(logits, targets), strict=True)]
    model.train(was_training)
    return {
        "accuracy": tot[0] / tot[1],
        "sequence_accuracy": tot[2] / tot[3],
        "loss": loss_sum / tot[1],
        "queries": tot[1],
    }


def _optimizer(model: TinyTransformer, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [
        p
        for n, p in model.named_parameters()
        if p.dim() >= 2 and not n.startswith(("embed", "pos"))
    ]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% at `steps`."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t)))


def train(
    task: Task,
    config: TrainConfig | None = None,
    *,
    out: str | Path | None = None,
    arch: dict | None = None,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
) -> TrainResult:
    """Train a TinyTransformer on `task`; returns the model, metrics and the validation curve.

    With `out`, checkpoints go to that directory every `checkpoint_every` steps and at the end
    (atomically: an interrupted run leaves the last complete one), plus `out/metrics.json`.
    Each callback gets a StepInfo after every step; raising KeyboardInterrupt from one (or
    Ctrl-C) stops training and propagates, with the last checkpoint intact.

    Tiny tensors train fastest on one CPU thread (two threads were 5× slower per step on this
    2-core machine under load), so `config.threads` (default 1) is set for the run and restored.
    """
    cfg = config or TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    if not isinstance(task, Task):
        raise TypeError(f"task must be a qkv.train Task (see make_task), got {type(task).__name__}")
    out = None if out is None else writable_dir(out)  # fail now, not after minutes of training
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(task, cfg, out, arch or {}, callbacks)
    finally:
        torch.set_num_threads(threads)


def _train(task: Task, cfg: TrainConfig, out: Path | None, arch: dict, callbacks) -> TrainResult:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(task, **arch)
    model.train()
    val = task.sample(cfg.eval_size, torch.Generator().manual_seed(VAL_SEED))
    data = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    extra = {"task": task.to_dict()}
    curve: list[tuple[int, float]] = []
    val_acc: float | None = None
    saved_step = None
    step = 0
    loss_f = acc = float("nan")
    bar = tqdm(
        total=cfg.steps,
        desc=f"train {task.name}",
        unit="step",
        disable=not cfg.progress,
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    try:
        while step < cfg.steps:
            batch = task.sample(cfg.batch_size, data)
            logits = model(batch.ids)  # (b i v)
            loss = F.cross_entropy(
                logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            hit, n, _, _ = scored(logits.detach(), batch.targets)
            loss_f, acc = float(loss.detach()), hit / n
            done = step == cfg.steps
            if step % cfg.eval_every == 0 or done:
                val_acc = evaluate(model, val)["accuracy"]
                curve.append((step, val_acc))
                done = done or (cfg.target is not None and val_acc >= cfg.target)
            seconds = time.perf_counter() - t0
            done = done or (cfg.time_limit is not None and seconds >= cfg.time_limit)
            if out is not None and (step % cfg.checkpoint_every == 0 or done):
                save_checkpoint(model, out, extra={**extra, "step": step})
                saved_step = step
            bar.update(1)
            if step % 10 == 0 or done:
                post = {"loss": f"{loss_f:.3f}", "acc": f"{acc:.3f}"}
                if val_acc is not None:
                    post["held-out"] = f"{val_acc:.3f}"
                bar.set_postfix(post, refresh=False)
            info = StepInfo(step, loss_f, acc, val_acc, seconds, model)
            for cb in callbacks:
                cb(info)
            if done:
                break
    except KeyboardInterrupt:
        bar.close()
        where = (
            f"; last complete checkpoint: {out} (step {saved_step})" if out and saved_step else ""
        )
        print(f"training interrupted at step {step}{where}", file=sys.stderr)
        raise
    seconds = time.perf_counter() - t0
    bar.close()
    model.eval()
    test = evaluate(model, task.sample(cfg.test_size, torch.Generator().manual_seed(TEST_SEED)))
    steps_to = {
        f"steps_to_{int(p * 100)}": next((s for s, a in curve if a >= p), None) for p in (0.9, 0.99)
    }
    metrics = {
        "task": task.name,
        "accuracy": test["accuracy"],
        "sequence_accuracy": test["sequence_accuracy"],
        "test_loss": test["loss"],
        "test_queries": test["queries"],
        "val_accuracy": val_acc,
        "seconds": round(seconds, 3),
        "steps": step,
        **steps_to,
        "final_train_loss": loss_f,
        "seed": cfg.seed,
        "parameters": n_parameters(model),
        "threads": torch.get_num_threads(),
        "task_params": task.params(),
        "model": model.config.to_dict() | {"vocab": len(model.config.vocab)},
        "train": dataclasses.asdict(cfg),
    }
    if out is not None:
        write_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        metrics["checkpoint"] = str(out)
    return TrainResult(model=model, metrics=metrics, curve=curve)
