"""Training benchmark: how fast `qkv train recall` learns the lookup, and what qkv's modules cost.

    python benchmarks/train.py [--seeds 3] [--timing-steps 60]

1. Step time: one full training step (forward, backward, AdamW) of the default recall model,
   qkv's TinyTransformer (qkv.nn.MultiHeadAttention → qkv.attention) vs the same architecture
   written in plain PyTorch (nn.Linear projections + F.scaled_dot_product_attention), same
   batches, alternated step by step, one CPU thread each; medians and their ratio.
2. Time to learn: `qkv train recall` with its defaults (the library call the CLI makes), per
   seed: steps, wall seconds, held-out query accuracy (8000 test queries), pass/fail against
   the target (≥ 99% within 180 s).
The load average is printed before and after: on a shared machine it says how contended the
CPUs were while the numbers were taken.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from qkv.train import make_task
from qkv.train.loop import TrainConfig, build_model, train
from qkv.train.tasks import IGNORE

TARGET_ACCURACY = 0.99
TARGET_SECONDS = 180.0


class PeerBlock(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.h = h
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b h i d)
        return x + self.out(z.transpose(1, 2).reshape(B, S, D))


class Peer(nn.Module):
    """The default TinyTransformer (2 attention-only layers, 2 heads, d_model 64, learned
    positions, pre-LN) in plain PyTorch."""

    def __init__(self, vocab: int, max_pos: int, d: int = 64, h: int = 2, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_pos, d)
        self.blocks = nn.ModuleList(PeerBlock(d, h) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.unembed = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.unembed(self.ln_f(x))


def step_times(steps: int) -> dict:
    task = make_task("recall")
    torch.manual_seed(0)
    models = {"qkv": build_model(task), "pytorch": Peer(len(task.vocab), task.seq_len)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(steps + 5):
        batch = task.sample(64, g)
        for k, m in models.items():
            t = time.perf_counter()
            loss = F.cross_entropy(
                m(batch.ids).flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE
            )
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
            if i >= 5:  # warm-up
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--seeds", type=int, default=1, help="training runs of `qkv train recall` (default 1)"
    )
    ap.add_argument(
        "--timing-steps", type=int, default=60, help="timed steps per model for the step-time table"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"CPU cores: {os.cpu_count()}, torch {torch.__version__}, threads 1; load average before: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )

    med = step_times(args.timing_steps)
    print(
        f"\n1. training step, default recall model, batch 64 × {make_task('recall').seq_len} tokens "
        f"(median of {args.timing_steps})"
    )
    print(f"{'implementation':<34}{'ms/step':>9}{'ratio':>8}")
    print(
        f"{'qkv TinyTransformer (qkv.nn)':<34}{1e3 * med['qkv']:>9.2f}{med['pytorch'] / med['qkv']:>8.2f}×"
    )
    print(f"{'plain PyTorch (nn.Linear + SDPA)':<34}{1e3 * med['pytorch']:>9.2f}{1.0:>8.2f}×")
    print("(ratio = PyTorch time / qkv time: ≥ 1 means qkv is as fast or faster)")

    task = make_task("recall")
    print(
        f"\n2. `qkv train recall` (defaults: {task.params()}; stop at ≥ 99.5% validation accuracy)"
    )
    print(
        f"{'seed':>4}{'steps':>7}{'seconds':>9}{'held-out acc':>14}{'seq acc':>9}{'test queries':>14}  result"
    )
    results = []
    for seed in range(args.seeds):
        m = train(task, TrainConfig(seed=seed, progress=False)).metrics
        ok = m["accuracy"] >= TARGET_ACCURACY and m["seconds"] <= TARGET_SECONDS
        results.append((m, ok))
        print(
            f"{seed:>4}{m['steps']:>7}{m['seconds']:>9.1f}{100 * m['accuracy']:>13.2f}%"
            f"{100 * m['sequence_accuracy']:>8.2f}%{m['test_queries']:>14}  {'PASS' if ok else 'FAIL'}",
            flush=True,
        )
    secs = [m["seconds"] for m, _ in results]
    print(
        f"time to ≥ 99% held-out: median {statistics.median(secs):.1f} s, max {max(secs):.1f} s "
        f"(target ≤ {TARGET_SECONDS:.0f} s); {sum(ok for _, ok in results)}/{len(results)} runs pass"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"peak RSS {peak:.0f} MiB; load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
