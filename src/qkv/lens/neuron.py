"""The Q·K neuron view (bertviz's neuron view, for any architecture): how one score is made.

For query token i, key token j, layer l and query head h (kv head g = h // (Hq // Hk)):

    q = q_hi (d,)   k = k_gj (d,)       after RoPE where the model rotates them (what it scores)
    q⊙k (d,)        elementwise product; Σ_d q_d k_d = q·k
    score = scale · Σ_d q_d k_d          (scale = 1/√d unless the model sets its own)

which is exactly the `score` the record prints for that key (before any softcap or mask).
The dimensions that drive it are those with the largest |q_d k_d|.

    v = neuron("The dog chased the ball because it was excited.", "excited", "dog",
               layer=13, head=8, model="smollm2")
    v.score, v.top(5)                  # the score, and the 5 dimensions that drive it

Letters: h query head, g kv head, i query position, j key position, d head dim.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .explain import (
    _check_range,
    _encode,
    attention_modules,
    pick_query_key,
    resolve_model,
    run_capture,
    summarize,
)
from .record import Query
from .tokens import make_tokens


@dataclass(eq=False)
class NeuronView:
    """One head's q and k for one (query, key) pair, float64, as the model scored them.

    `product` = q⊙k, `dot` = Σ product, `score` = dot · scale. `rope_dims` is how many of the
    d features RoPE rotated before scoring (0: the model has no RoPE; q and k are then
    X W_Q + b_Q and X W_K + b_K as they are)."""

    layer: int
    head: int
    kv_head: int
    query: Query
    key: Query
    q: np.ndarray  # (d,)
    k: np.ndarray  # (d,)
    scale: float
    rope_dims: int = 0

    def __post_init__(self) -> None:
        self.q = np.ascontiguousarray(np.asarray(self.q, dtype=np.float64).reshape(-1))
        self.k = np.ascontiguousarray(np.asarray(self.k, dtype=np.float64).reshape(-1))
        if self.q.shape != self.k.shape:
            raise ValueError(
                f"q and k must have the same shape, got {self.q.shape} and {self.k.shape}"
            )

    @property
    def product(self) -> np.ndarray:
        """q⊙k (d,)."""
        return self.q * self.k

    @property
    def dot(self) -> float:
        """Σ_d q_d k_d."""
        return float(self.product.sum())

    @property
    def score(self) -> float:
        """scale · Σ_d q_d k_d: the record's score for this key."""
        return self.dot * self.scale

    def top(self, n: int | None = None) -> np.ndarray:
        """The dimensions by |q_d k_d|, largest first (all of them when n is None)."""
        order = np.argsort(-np.abs(self.product), kind="stable")
        return order if n is None else order[:n]

    def share(self, n: int | None = None) -> np.ndarray:
        """Running share of the dot product held by the top dims: Σ_{first t} q_d k_d / Σ q_d k_d
        (it can pass 1 or go negative: products of both signs cancel)."""
        p = self.product[self.top(n)]
        dot = self.dot
        return np.cumsum(p) / dot if dot != 0 else np.full(len(p), np.nan)

    def __repr__(self) -> str:
        return (
            f"<NeuronView layer {self.layer} head {self.head} (kv {self.kv_head}): "
            f"{self.query.text.strip()!r}@{self.query.index} · {self.key.text.strip()!r}@{self.key.index}"
            f", d={len(self.q)}, score={self.score:.4g}>"
        )

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "head": self.head,
            "kv_head": self.kv_head,
            "query": {"index": self.query.index, "text": self.query.text},
            "key": {"index": self.key.index, "text": self.key.text},
            "scale": self.scale,
            "rope_dims": self.rope_dims,
            "q": [float(x) for x in self.q],
            "k": [float(x) for x in self.k],
            "score": self.score,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "neuron") -> NeuronView:
        """The view written by `to_dict`; ValueError naming the field that is wrong."""
        try:
            q, k = d["q"], d["k"]
            if not all(isinstance(x, int | float) and math.isfinite(x) for x in q + k):
                raise ValueError("q and k must hold finite numbers")
            return cls(
                layer=int(d["layer"]),
                head=int(d["head"]),
                kv_head=int(d["kv_head"]),
                query=Query(int(d["query"]["index"]), str(d["query"]["text"])),
                key=Query(int(d["key"]["index"]), str(d["key"]["text"])),
                q=q,
                k=k,
                scale=float(d["scale"]),
                rope_dims=int(d.get("rope_dims", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{where}: not a valid neuron view ({type(e).__name__}: {e})"
            ) from None


def neuron_from_record(
    rec: Any, i: int, j: int, head: int, query: Query, key: Query, rope_dims: int = 0
) -> NeuronView:
    """The view of query row i, key j, query head `head` of one captured layer (`qkv.nn.capture`'s
    AttentionRecord: q (b h i d), k (b g j d) after RoPE; batch item 0)."""
    H, G = rec.q.shape[1], rec.k.shape[1]
    g = head // (H // G)
    scale = (rec.attn_kwargs or {}).get("scale")
    scale = 1.0 / math.sqrt(rec.q.shape[-1]) if scale is None else float(scale)
    q = rec.q[0, head, i].double().cpu().numpy()  # (d,)
    k = rec.k[0, g, j].double().cpu().numpy()  # (d,)
    return NeuronView(int(rec.layer), head, g, query, key, q, k, scale, rope_dims)


def rope_dims(model: Any, layer: int) -> int:
    """How many features of each head RoPE rotates in attention layer `layer` (0: none)."""
    rope = getattr(attention_modules(model)[layer], "rope", None)
    return 0 if rope is None else int(rope.rotary_dim)


def neuron(
    text: str,
    token: str | int,
    key: str | int,
    *,
    layer: int,
    head: int,
    model: Any = "smollm2",
    occurrence: int = 1,
    key_occurrence: int = 1,
) -> NeuronView:
    """The Q·K neuron view of `token` looking at `key` in `head` of `layer`: q, k (after RoPE),
    q⊙k and its sum, with `score == scale · Σ q⊙k` (the score `explain` records for that key).

    Arguments read as `explain` reads them (words or indices; negative layer/head/index count
    from the end). Runs the model once up to `layer` (tokens 0..i only on a causal model).
    Equivalent naive code (no RoPE, no bias)::

        q = X[i] @ W_Q[:, h*d:(h+1)*d];  k = X[j] @ W_K[:, g*d:(g+1)*d];  score = (q * k).sum() / √d

    Raises IndexError naming the valid range for layer/head/an index, ValueError for a word
    that is absent or a key after the query on a causal model."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty: pass the sentence whose token you want explained")
    if key is None:
        raise ValueError("the neuron view needs a key: pass key= (a word or a token index)")
    m = resolve_model(model)
    info = summarize(m, model if isinstance(model, str) and not os.path.isdir(model) else None)
    if layer is None or head is None:
        raise ValueError("the neuron view needs one layer and one head: pass layer= and head=")
    layer = _check_range("layer", layer, info.n_layers, info.name)
    head = _check_range("head", head, info.n_heads, info.name)
    enc, cut = _encode(m.tokenizer, text, info, False)
    tokens = make_tokens(text, enc.tokens, enc.offsets)
    qp, kp = pick_query_key(tokens, text, info, cut, token, occurrence, key, key_occurrence)
    i, j = qp.index, kp.index
    n = i + 1 if info.causal else len(tokens)
    with torch.inference_mode():
        (rec,) = run_capture(m, enc.ids[:n], layers=[layer], progress=False)
        return neuron_from_record(
            rec, i, j, head, Query(i, tokens[i].text), Query(j, tokens[j].text), rope_dims(m, layer)
        )
