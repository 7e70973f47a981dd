"""`qkv demo`: the soft lookup on three tokens, every number printed."""

from __future__ import annotations

import argparse

import torch

from qkv.attention import reference_attention

TOKENS = ("dog", "ball", "it")
# hand-made 2-d queries/keys/values: "it" asks for an animate thing, "dog" advertises one
Q = [[0.0, 0.0], [0.0, 0.0], [2.0, 0.5]]
K = [[2.0, 0.0], [0.0, 2.0], [0.5, 0.5]]
V = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]


def run_worked_example() -> str:
    q, k, v = (torch.tensor(x, dtype=torch.float64).view(1, 1, 3, 2) for x in (Q, K, V))
    r = reference_attention(q, k, v)
    i = TOKENS.index("it")
    lines = ["Attention as a soft lookup — the query of 'it' against every key (d = 2):", ""]
    lines += [f"  q of 'it' = ({', '.join(f'{x:.1f}' for x in Q[i])})", ""]
    lines.append(f"  {'key':<6}{'k':>14}{'q·k/√d':>10}{'weight':>9}{'v':>14}")
    for j, tok in enumerate(TOKENS):
        kj = ", ".join(f"{x:.1f}" for x in K[j])
        vj = ", ".join(f"{x:.1f}" for x in V[j])
        score, w = r.scores[0, 0, i, j].item(), r.weights[0, 0, i, j].item()
        lines.append(f"  {tok:<6}{'(' + kj + ')':>14}{score:>10.3f}{w:>9.3f}{'(' + vj + ')':>14}")
    out = ", ".join(f"{x:.3f}" for x in r.out[0, 0, i].tolist())
    lines += ["", f"  output of 'it' = Σ weight·v = ({out})  — mostly the value of 'dog'"]
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the soft lookup on a tiny worked example",
        description="Three tokens with hand-made 2-d queries, keys and values: the query of 'it' "
        "scored against every key (q·k/√d), the softmax weights, and the output Σ weight·v, every "
        "number printed. No model is loaded.",
    )
    p.set_defaults(run=lambda args: print(run_worked_example()))
