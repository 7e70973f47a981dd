"""`qkv train TASK --out DIR` and `qkv experiment projections`: learn Q, K and V from scratch."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import torch

from qkv.models.tiny import PROJECTIONS, TinyConfig
from qkv.train.experiment import DEFAULT_SEEDS, DEFAULT_STEPS, DEFAULT_TASK, VARIANTS, projections
from qkv.train.loop import TrainConfig, train
from qkv.train.tasks import IGNORE, TASKS, RecallTask, make_task

# flag → task parameter; a flag the chosen task lacks is an error
TASK_FLAGS = {
    "records": "n_records",
    "keys": "n_keys",
    "values": "n_values",
    "queries": "n_queries",
    "seq_len": "seq_len",
    "symbols": "n_symbols",
    "length": "length",
}
ARCH_FLAGS = {
    "layers": "n_layers",
    "heads": "n_heads",
    "kv_heads": "n_kv_heads",
    "d_model": "d_model",
    "d_head": "d_head",
    "d_mlp": "d_mlp",
    "projections": "projections",
    "positions": "positions",
}
TRAIN_FLAGS = (
    "steps",
    "batch_size",
    "lr",
    "seed",
    "target",
    "time_limit",
    "eval_every",
    "checkpoint_every",
    "threads",
)
# the library's names for those flags, so that its errors reach the user in flags
PYTHON_NAMES = {f: "--" + k.replace("_", "-") for k, f in {**TASK_FLAGS, **ARCH_FLAGS}.items()}
_TC = TrainConfig()
_AC = {f.name: f.default for f in dataclasses.fields(TinyConfig)}
EXPERIMENT_EVAL_EVERY = 50  # the projections experiment evaluates twice as often as a training run


def _task_from(args: argparse.Namespace, name: str, defaults: dict | None = None):
    params = dict(defaults or {})
    fields = {f.name for f in dataclasses.fields(TASKS[name])} if name in TASKS else set()
    for flag, field in TASK_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if field not in fields:
            have = [f"--{k.replace('_', '-')}" for k, f in TASK_FLAGS.items() if f in fields]
            raise ValueError(
                f"task {name!r} has no --{flag.replace('_', '-')}; its options are {have}"
            )
        params[field] = value
    return make_task(name, **params)


def _arch_from(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    return {
        f: getattr(args, k)
        for k, f in ARCH_FLAGS.items()
        if k not in skip and getattr(args, k) is not None
    }


def _train_config(args: argparse.Namespace, **fixed) -> TrainConfig:
    kw = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "target", None) is not None and args.target <= 0:
        kw["target"] = None  # --target 0: run every step
    return TrainConfig(**{**kw, **fixed, "progress": not args.quiet})


def _add_task_flags(
    p: argparse.ArgumentParser, recall_defaults: dict, recall_only: bool = False
) -> None:
    g = p.add_argument_group("task (defaults from the task's dataclass)")
    r = RecallTask(**recall_defaults)
    g.add_argument("--records", type=int, help=f"recall: key→value records (default {r.n_records})")
    g.add_argument(
        "--keys", type=int, help=f"recall: distinct keys in the vocabulary (default {r.n_keys})"
    )
    g.add_argument("--values", type=int, help=f"recall: distinct values (default {r.n_values})")
    g.add_argument(
        "--queries", type=int, help=f"recall: queries per sequence (default {r.n_queries})"
    )
    g.add_argument(
        "--seq-len",
        type=int,
        help="recall/induction: sequence length (recall: filler '_' pads the records; default: "
        "recall just long enough for the records and queries, induction 16)"
        if not recall_only
        else "sequence length (filler '_' pads the records; default: just long enough for the "
        "records and queries)",
    )
    if recall_only:
        p.set_defaults(symbols=None, length=None)
        return
    g.add_argument("--symbols", type=int, help="induction/copy: alphabet size (default 16)")
    g.add_argument("--length", type=int, help="copy: segment length (default 8)")


def _add_arch_flags(p: argparse.ArgumentParser, with_projections: bool = True) -> None:
    g = p.add_argument_group("model (defaults from qkv.models.tiny.TinyConfig)")
    g.add_argument("--layers", type=int, help=f"attention layers (default {_AC['n_layers']})")
    g.add_argument("--heads", type=int, help=f"heads per layer (default {_AC['n_heads']})")
    g.add_argument("--kv-heads", type=int, help="key/value heads (GQA; default = --heads)")
    g.add_argument("--d-model", type=int, help=f"residual width (default {_AC['d_model']})")
    g.add_argument("--d-head", type=int, help="head dim (default d_model / heads)")
    g.add_argument(
        "--d-mlp", type=int, help=f"MLP hidden width; 0 = attention-only (default {_AC['d_mlp']})"
    )
    g.add_argument(
        "--positions",
        choices=("learned", "rope"),
        help=f"position encoding (default {_AC['positions']})",
    )
    if with_projections:
        g.add_argument(
            "--projections", choices=PROJECTIONS, help="tie W_Q/W_K/W_V (default separate)"
        )


def _add_train_flags(
    p: argparse.ArgumentParser,
    steps: int,
    early_stop: bool = True,
    eval_every: int = _TC.eval_every,
) -> None:
    g = p.add_argument_group("training (defaults from qkv.train.TrainConfig)")
    g.add_argument("--steps", type=int, help=f"optimiser steps, at most (default {steps})")
    g.add_argument("--batch-size", type=int, help=f"sequences per step (default {_TC.batch_size})")
    g.add_argument("--lr", type=float, help=f"AdamW peak learning rate (default {_TC.lr})")
    g.add_argument(
        "--eval-every", type=int, help=f"steps between held-out evaluations (default {eval_every})"
    )
    g.add_argument("--threads", type=int, help=f"torch CPU threads (default {_TC.threads})")
    if early_stop:
        g.add_argument("--seed", type=int, help=f"seed for init and data (default {_TC.seed})")
        g.add_argument(
            "--target",
            type=float,
            help=f"stop once held-out validation accuracy reaches this (default {_TC.target}; 0 = never)",
        )
        g.add_argument(
            "--time-limit", type=float, help="stop after this many seconds (default: no limit)"
        )
        g.add_argument(
            "--checkpoint-every",
            type=int,
            help=f"steps between checkpoints (default {_TC.checkpoint_every})",
        )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run_train(args: argparse.Namespace) -> int:
    task = _task_from(args, args.task)
    out = Path(args.out or f"runs/{args.task}")
    cfg = _train_config(args)
    arch = _arch_from(args)
    TinyConfig(vocab=task.vocab, max_positions=task.seq_len, **arch)  # refuse it before the header
    print(
        f"training on {task.name}: {task.text(task.sample(1, torch.Generator().manual_seed(7)).ids[0])}",
        file=sys.stderr,
    )
    result = train(task, cfg, out=out, arch=arch)
    m = result.metrics
    print(
        f"{task.name}: held-out query accuracy {100 * m['accuracy']:.2f}% ({m['test_queries']} queries), "
        f"sequence accuracy {100 * m['sequence_accuracy']:.2f}% — {m['steps']} steps in {m['seconds']:.1f} s "
        f"({m['threads']} thread{'s' if m['threads'] > 1 else ''}, {m['parameters']} parameters)"
    )
    print(f"checkpoint: {out}/ (config.json, model.safetensors); metrics: {out}/metrics.json")
    # one held-out example, and how to look inside it
    batch = task.sample(1, torch.Generator().manual_seed(11))
    with torch.no_grad():
        pred = result.model(batch.ids)[0].argmax(-1)
    pos = (batch.targets[0] != IGNORE).nonzero().flatten().tolist()
    text = task.text(batch.ids[0])
    got = ", ".join(
        f"at {task.vocab[int(batch.ids[0, p])]} (token {p}) → {task.vocab[int(pred[p])]}"
        f"{'' if int(pred[p]) == int(batch.targets[0, p]) else ' ✗ want ' + task.vocab[int(batch.targets[0, p])]}"
        for p in pos[:4]
    )
    print(f"example: {text}\n  model: {got}")
    print(
        f"look inside: qkv explain {shlex.quote(text)} --index {pos[0]} --model {shlex.quote(str(out))}"
    )
    return 0


def run_experiment(args: argparse.Namespace) -> int:
    task = _task_from(args, "recall", DEFAULT_TASK)
    variants = tuple(v.strip() for v in args.variants.split(",")) if args.variants else VARIANTS
    seeds = tuple(range(args.first_seed, args.first_seed + args.seeds))
    if bad := [v for v in variants if v not in VARIANTS]:
        raise ValueError(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
    if args.seeds <= 0:
        raise ValueError(f"--seeds must be positive, got {args.seeds}")
    png, js = Path(args.png), Path(args.json)
    for path in (png, js):  # fail before minutes of training
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    base = _train_config(args, eval_every=args.eval_every or EXPERIMENT_EVAL_EVERY)
    steps = args.steps or DEFAULT_STEPS
    print(
        f"projections: {len(variants)} variants × {len(seeds)} seeds × {steps} steps on {task.name} "
        f"{task.params()}",
        file=sys.stderr,
    )

    def report(run) -> None:
        reached = run.steps_to_threshold if run.steps_to_threshold is not None else "never"
        print(
            f"  {run.variant:<9} seed {run.seed}: accuracy {100 * run.accuracy:5.1f}%, 90% at step {reached}, "
            f"{run.seconds:.1f} s",
            file=sys.stderr,
        )

    result = projections(
        task,
        variants=variants,
        seeds=seeds,
        steps=steps,
        arch=_arch_from(args, skip=("projections",)),
        train_config=base,
        progress=not args.quiet,
        on_run=report,
    )
    print(result.table())
    result.plot(png)
    result.save_json(js)
    print(f"learning curves: {png}; all runs: {js}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a tiny transformer on a lookup task (recall, induction, copy)",
        description="Train a small transformer built from qkv.nn on a synthetic task; writes DIR/config.json, "
        "DIR/model.safetensors (reload with qkv.load(DIR) or --model DIR) and DIR/metrics.json.",
    )
    p.add_argument(
        "task",
        choices=sorted(TASKS),
        help="recall: key→value records then queries; induction: … A B … A → B; copy: a segment repeated",
    )
    p.add_argument("--out", help="checkpoint directory (default runs/TASK)")
    _add_task_flags(p, {})
    _add_arch_flags(p)
    _add_train_flags(p, _TC.steps)
    p.set_defaults(run=run_train, python_names=PYTHON_NAMES)

    e = sub.add_parser(
        "experiment",
        help="experiments on learned attention (projections: why W_Q, W_K, W_V?)",
        description="Experiments on learned attention. projections: why three projections? "
        "(qkv experiment projections --help; docs/experiment-projections.md)",
    )
    esub = e.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    x = esub.add_parser(
        "projections",
        help="separate vs tied W_Q/W_K/W_V vs no value projection, several seeds, same budget",
        description="Train the same model on recall with W_Q, W_K, W_V separate; W_Q = W_K; W_Q = W_K = W_V; "
        "and V = X. Prints a table (final held-out accuracy, steps to 90%, mean ± sd over seeds) and saves "
        "a learning-curve PNG and a JSON of every run.",
    )
    x.add_argument(
        "--seeds",
        type=int,
        default=DEFAULT_SEEDS,
        help=f"seeds per variant (default {DEFAULT_SEEDS})",
    )
    x.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds are first-seed, first-seed+1, … (default 0)",
    )
    x.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    x.add_argument(
        "--png", default="projections.png", help="learning-curve plot (default projections.png)"
    )
    x.add_argument(
        "--json", default="projections.json", help="every run's numbers (default projections.json)"
    )
    _add_task_flags(x, DEFAULT_TASK, recall_only=True)
    _add_arch_flags(x, with_projections=False)
    _add_train_flags(x, DEFAULT_STEPS, early_stop=False, eval_every=EXPERIMENT_EVAL_EVERY)
    x.set_defaults(run=run_experiment, projections=None, python_names=PYTHON_NAMES)
