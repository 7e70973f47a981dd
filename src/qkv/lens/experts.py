"""The experts a token was routed to, in a mixture-of-experts model: the MLP's own lookup.

A sparse MLP's router is a soft lookup too. The token's hidden state h (m,) is scored against
one learned key per expert, the router's rows W_r (e m), and the top k experts by those scores
each process the token; their outputs are blended by the routing weights:

    logits = W_r · h (+ b)                     (e,)  one score per expert
    w, idx = route(logits, ...)                (k,)  `qkv.nn.route`: the model's own rule
    y      = Σ_j w_j · expert_{idx_j}(h)

`routing(model, i)` records, for query token i, every sparse layer's chosen experts and their
weights — exactly the `w, idx` the forward used (the same module computes them from the same
input), in float64 for the record. `every_routing(model, into)` records the same for every
token of the forward at once (`capture_text` keeps it, `Capture.routing.token(i)`).

    r = qkv.explain("The dog chased the ball because it was excited.", "it", model=path)
    r.experts.layers[0].experts, r.experts.layers[0].weights   # layer 0: experts of 'it'

Letters: e experts, k experts per token, m model dim.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from qkv.nn import SparseMoE


@dataclass
class LayerExperts:
    """Layer `layer`'s sparse MLP for the query token: the `experts` it went to (k,), best
    first, their routing `weights` (k,), of `n_experts` in all."""

    layer: int
    n_experts: int
    experts: np.ndarray  # (k,) int64
    weights: np.ndarray  # (k,) float64

    def __post_init__(self) -> None:
        self.experts = np.asarray(self.experts, dtype=np.int64)
        self.weights = np.asarray(self.weights, dtype=np.float64)
        if self.experts.shape != self.weights.shape or self.experts.ndim != 1:
            raise ValueError(
                f"layer {self.layer}: experts {self.experts.shape} and weights "
                f"{self.weights.shape} must be two (k,) arrays"
            )


@dataclass
class Routing:
    """The query token's experts in every sparse layer of the model (dense layers are absent)."""

    layers: list[LayerExperts] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "layers": [
                {
                    "layer": x.layer,
                    "n_experts": x.n_experts,
                    "experts": [int(e) for e in x.experts],
                    "weights": [float(w) for w in x.weights],
                }
                for x in self.layers
            ]
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "experts") -> Routing:
        """The routing written by `to_dict`; ValueError naming the field that is wrong."""
        if not isinstance(d, dict) or not isinstance(d.get("layers"), list):
            raise ValueError(f"{where}: must be an object with a list 'layers'")
        out = []
        for n, x in enumerate(d["layers"]):
            p = f"{where}.layers[{n}]"
            try:
                experts, weights = x["experts"], x["weights"]
                n_exp, layer = x["n_experts"], x["layer"]
            except (KeyError, TypeError) as e:
                raise ValueError(f"{p}: missing {e}") from None
            ints = [layer, n_exp, *experts]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
                raise ValueError(f"{p}: layer, n_experts and experts must be integers")
            if any(not 0 <= e < n_exp for e in experts) or layer < 0:
                raise ValueError(f"{p}: experts must lie in [0, n_experts={n_exp})")
            if not all(isinstance(w, int | float) and math.isfinite(w) for w in weights):
                raise ValueError(f"{p}: weights must be finite numbers")
            if len(weights) != len(experts):
                raise ValueError(f"{p}: {len(experts)} experts but {len(weights)} weights")
            out.append(LayerExperts(layer, n_exp, experts, weights))
        return cls(out)


def sparse_layers(model: nn.Module) -> dict[int, SparseMoE]:
    """{layer index: its SparseMoE} for a decoder's blocks (empty for a dense model)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return {}
    return {
        n: b.mlp for n, b in enumerate(blocks) if isinstance(getattr(b, "mlp", None), SparseMoE)
    }


@contextlib.contextmanager
def routing(model: nn.Module, i: int, into: Routing) -> Iterator[None]:
    """While on, each sparse layer's forward adds to `into` the experts and weights it chose
    for token i of batch item 0 (`SparseMoE.choose` on that token's input: the very rule and
    numbers of the forward). Nothing is recorded for a dense model."""
    hooks = []

    def hook(layer: int):
        def pre(moe: SparseMoE, args: tuple) -> None:
            h = args[0][0, i : i + 1]  # (1 m): token i of batch item 0
            w, idx = moe.choose(h)
            into.layers.append(
                LayerExperts(
                    layer,
                    len(moe.experts),
                    idx[0].cpu().numpy(),
                    w[0].to(torch.float64).cpu().numpy(),
                )
            )

        return pre

    for layer, moe in sparse_layers(model).items():
        hooks.append(moe.register_forward_pre_hook(hook(layer)))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@dataclass
class LayerRoutes:
    """Layer `layer`'s sparse MLP for every token of one forward: the `experts` (n k) each
    token went to, best first, and their routing `weights` (n k), of `n_experts` in all."""

    layer: int
    n_experts: int
    experts: np.ndarray  # (n k) int64
    weights: np.ndarray  # (n k) float64


@dataclass
class TokenRouting:
    """Every token's experts in each sparse layer of one forward (dense layers are absent):
    what `routing` records for one token, for all of them (2·8·L·n·k bytes)."""

    layers: list[LayerRoutes] = field(default_factory=list)

    def token(self, i: int) -> Routing:
        """Token i's `Routing`: the record's "experts" member, as `routing(model, i)` gives."""
        return Routing(
            [LayerExperts(x.layer, x.n_experts, x.experts[i], x.weights[i]) for x in self.layers]
        )

    @property
    def nbytes(self) -> int:
        return sum(x.experts.nbytes + x.weights.nbytes for x in self.layers)


@contextlib.contextmanager
def every_routing(model: nn.Module, into: TokenRouting) -> Iterator[None]:
    """While on, each sparse layer's forward adds to `into` the experts and weights it chose
    for every token of batch item 0 (`SparseMoE.choose` on its input, as `routing` does for
    one token). Nothing is recorded for a dense model."""
    hooks = []

    def hook(layer: int):
        def pre(moe: SparseMoE, args: tuple) -> None:
            w, idx = moe.choose(args[0][0])  # (n k), (n k): batch item 0's tokens
            into.layers.append(
                LayerRoutes(
                    layer,
                    len(moe.experts),
                    idx.cpu().numpy().astype(np.int64),
                    w.to(torch.float64).cpu().numpy(),
                )
            )

        return pre

    for layer, moe in sparse_layers(model).items():
        hooks.append(moe.register_forward_pre_hook(hook(layer)))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
