"""Propagations through the layers: the contribution flow against a float64 oracle, on a model
where the truth is known (a trained recall model), and classic rollout's caveat.

The oracle gets each block's input x (the residual stream) and each attention module's input
from forward pre-hooks, and writes the mixing out: Ã[t, j] = ‖Σ_h w_htj v_hj W_O^h‖ + δ_tj ‖x_t‖,
rows normalised, R = Ã_L ⋯ Ã_1.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import qkv
from qkv.lens import explain
from qkv.nn import MultiHeadAttention

from .conftest import SENTENCE
from .test_lookup import forward_inputs, oracle


def residual_norms(model, text: str) -> list[torch.Tensor]:
    """‖x_t‖ (t,) of the input of each module that holds an attention module, in order."""
    mods = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    blocks = [p for m in mods for p in model.modules() if any(c is m for c in p.children())]
    return [x[0].double().norm(dim=-1) for x in forward_inputs(model, text, blocks)]


def flow64(model, text: str, i: int) -> np.ndarray:
    R = None
    for lay, xn in zip(oracle(model, text), residual_norms(model, text), strict=True):
        A = lay["lc"] + torch.diag(xn)  # (t j)
        A = A / A.sum(-1, keepdim=True)
        R = A if R is None else A @ R
    return R[i].numpy()


@pytest.mark.parametrize("which", ["tiny_causal", "tiny_bidir"])
def test_flow_matches_the_float64_oracle(which, request):
    model = request.getfixturevalue(which)
    r = explain(SENTENCE, "it", model=model, flow=True)
    want = flow64(model, SENTENCE, r.query.index)
    np.testing.assert_allclose(r.flow.values, want, atol=1e-6)
    assert r.flow.values.sum() == pytest.approx(1.0, abs=1e-9)
    assert r.rollout is None  # classic rollout only on request
    back = type(r).from_json(r.to_json())
    np.testing.assert_array_equal(back.flow.values, r.flow.values)


def test_the_default_run_propagates_nothing(tiny_causal):
    r = explain(SENTENCE, "it", model=tiny_causal)
    assert r.flow is None and r.rollout is None
    s = str(r)
    assert "rollout" not in s.lower() and "flow" not in s.lower()


def test_the_oracle_can_fail(tiny_causal):
    """The same oracle without the residual term disagrees: the test measures something."""
    r = explain(SENTENCE, "it", model=tiny_causal, flow=True)
    R = None
    for lay in oracle(tiny_causal, SENTENCE):
        A = lay["lc"] / lay["lc"].sum(-1, keepdim=True)
        R = A if R is None else A @ R
    assert np.abs(R[r.query.index].numpy() - r.flow.values).max() > 1e-3


@pytest.fixture(scope="module")
def recall(tmp_path_factory):
    from qkv.train import RecallTask
    from qkv.train.loop import TrainConfig, train

    task = RecallTask(n_records=6, n_keys=12, n_values=12, n_queries=3)
    out = tmp_path_factory.mktemp("recall")
    train(
        task,
        TrainConfig(steps=1500, eval_every=50, test_size=1000, progress=False, seed=0),
        out=out,
    )
    return qkv.load(out)


def test_flow_finds_the_answer_on_a_trained_recall_model(recall):
    """`k3 v7 k1 v2 … ? k1` → v2: the answer is known, so is the record it comes from. Over 60
    random sequences the flow's top token is always the answer's record (its value, or the key
    that the value token read in layer 0), and the value token itself tops most of them; the
    answer token gets more than any other record's tokens. Measured with seed 0: value on top
    in 79 of 100, its key in the other 21; classic rollout puts the value on top in 93."""
    rng = random.Random(0)
    value_top = 0
    n = 60
    for _ in range(n):
        keys = rng.sample(range(12), 6)
        vals = [rng.randrange(12) for _ in keys]
        pick = rng.randrange(6)
        toks = [t for k, v in zip(keys, vals, strict=True) for t in (f"k{k}", f"v{v}")]
        toks += ["?", f"k{keys[pick]}"]
        answer = 2 * pick + 1
        assert next(iter(recall.generate(" ".join(toks)))) == toks[answer]  # the model is right
        r = explain(" ".join(toks), len(toks) - 1, model=recall, flow=True)
        v = r.flow.values
        top = int(v.argmax())
        assert top in (answer - 1, answer), (toks, v.round(3))
        others = [2 * p + 1 for p in range(6) if p != pick]
        assert v[answer] > 3 * v[others].max()
        value_top += top == answer
    assert value_top >= 0.7 * n


def test_rollout_says_when_one_token_holds_it_all(tiny_causal, monkeypatch):
    """Classic rollout stays on request and carries its caveat above 90% on one token."""
    r = explain(SENTENCE, "it", model=tiny_causal, rollout=True)
    j = int(r.rollout.values.argmax())
    has = any("converges to that token" in n for n in r.notes)
    assert has == (r.rollout.values[j] > 0.9)
    from qkv.lens import rollout as ro

    monkeypatch.setattr(ro, "DOMINANT", 0.0)  # every rollout now counts as dominated
    r = explain(SENTENCE, "it", model=tiny_causal, rollout=True)
    assert any(f"rollout puts {r.rollout.values[j]:.3f} on" in n for n in r.notes)
    assert "caveat: The rollout puts" in str(r)


@pytest.mark.slow
def test_rollout_caveat_on_smollm2(smollm2):
    r = explain(SENTENCE, "it", model=smollm2, rollout=True, flow=True, top=3)
    assert r.rollout.values[0] > 0.99  # 'The' holds it all: the measurement
    assert any("rollout puts 1.000 on 'The' (token 0)" in n for n in r.notes)
    s = str(r)
    assert "what 'it' is made of" not in s and "caveat" in s
