"""Training: a short run learns a tiny recall instance, runs are deterministic for a seed,
checkpoints survive an interrupted run, and the lens reads a trained model."""

from __future__ import annotations

import json

import pytest
import torch

import qkv
from qkv.lens import explain
from qkv.models.tiny import checkpoint_tensors, load_checkpoint
from qkv.train import RecallTask
from qkv.train.loop import TEST_SEED, TrainConfig, evaluate, train
from qkv.train.tasks import IGNORE

TINY = RecallTask(n_records=6, n_keys=12, n_values=12, n_queries=3)  # 100% by ~200 steps, seconds
QUICK = {"steps": 30, "eval_every": 10, "eval_size": 50, "test_size": 50, "progress": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    cfg = TrainConfig(steps=1500, eval_every=50, test_size=1000, progress=False, seed=0)
    return train(TINY, cfg, out=out), out


def test_short_run_learns_recall(trained):
    result, out = trained
    m = result.metrics
    assert m["accuracy"] >= 0.98, m  # held-out test queries (3000 of them)
    assert m["test_queries"] == 3000 and m["steps"] < 1500 and m["seconds"] > 0  # no clock limit
    on_disk = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for k in ("task", "accuracy", "seconds", "steps"):
        assert on_disk[k] == m[k]
    # the reported accuracy is reproducible from the checkpoint with an independent lookup
    model = qkv.load(out)
    batch = TINY.sample(200, torch.Generator().manual_seed(TEST_SEED + 1))
    with torch.no_grad():
        pred = model(batch.ids).argmax(-1)
    hits = total = 0
    for ids, p, tg in zip(batch.ids.tolist(), pred.tolist(), batch.targets.tolist(), strict=True):
        toks = [TINY.vocab[i] for i in ids]
        sep = toks.index("?")
        db = dict(zip(toks[:sep:2], toks[1:sep:2], strict=True))
        for pos, t in enumerate(tg):
            if t != IGNORE:
                total += 1
                hits += TINY.vocab[p[pos]] == db[toks[pos]]
    assert hits / total >= 0.97
    assert evaluate(model, batch)["accuracy"] == pytest.approx(hits / total)


def test_lens_sees_the_lookup(trained):
    """`qkv explain` on a recall sequence: in the last layer the query key puts its weight on
    the record it asks for (the value token right after the matching key)."""
    _, out = trained
    model = qkv.load(out)
    text = "k3 v7 k1 v2 k9 v7 k4 v0 k11 v5 k6 v1 ? k9"
    toks = text.split()
    q = len(toks) - 1
    r = explain(text, q, model=model, progress=False)
    last = r.layers[-1]
    best = max(last.heads, key=lambda h: h.weight[0])
    assert toks[int(best.index[0])] == "v7" and int(best.index[0]) == toks.index("k9") + 1
    assert best.weight[0] > 0.5
    assert next(iter(model.generate(text))) == "v7"


def test_same_seed_same_weights_other_seed_differs():
    a = train(TINY, TrainConfig(seed=3, **QUICK))
    b = train(TINY, TrainConfig(seed=3, **QUICK))
    c = train(TINY, TrainConfig(seed=4, **QUICK))
    ta, tb, tc = (checkpoint_tensors(r.model) for r in (a, b, c))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.curve == b.curve
    assert not torch.equal(ta["embed.weight"], tc["embed.weight"])


def test_threads_restored():
    """The run's thread count is set for the run and put back, whatever the host's count."""
    before = torch.get_num_threads()
    during = 2 if before == 1 else 1  # differs from the count before, on any host
    result = train(TINY, TrainConfig(threads=during, **{**QUICK, "steps": 2}))
    assert result.metrics["threads"] == during and torch.get_num_threads() == before


def test_interrupted_run_keeps_last_checkpoint(tmp_path):
    snap = {}

    def stop(info):
        if info.step == 20:  # the checkpoint of step 20 has just been written
            snap.update({k: v.clone() for k, v in checkpoint_tensors(info.model).items()})
        if info.step == 25:
            raise KeyboardInterrupt

    cfg = TrainConfig(checkpoint_every=10, **QUICK)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, cfg, out=tmp_path, callbacks=[stop])
    back = load_checkpoint(tmp_path)
    assert back.meta["step"] == 20
    got = checkpoint_tensors(back)
    assert got.keys() == snap.keys() and all(torch.equal(got[k], snap[k]) for k in snap)
    assert not (tmp_path / "metrics.json").exists()  # the run never finished
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_target_and_time_limit_stop_early():
    r = train(TINY, TrainConfig(**{**QUICK, "steps": 1000}, target=0.01))
    assert r.metrics["steps"] == 10
    r = train(TINY, TrainConfig(**{**QUICK, "steps": 1000}, target=None, time_limit=1e-9))
    assert r.metrics["steps"] == 1


def test_architecture_options_train():
    r = train(
        TINY,
        TrainConfig(**QUICK),
        arch={
            "n_layers": 1,
            "n_heads": 4,
            "d_model": 16,
            "d_mlp": 32,
            "positions": "rope",
            "projections": "tied_qk",
        },
    )
    cfg = r.model.config
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.projections) == (1, 4, 16, "tied_qk")
    assert r.metrics["model"]["d_mlp"] == 32


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"steps": 0}, "steps must be a positive int"),
        ({"lr": -1.0}, "lr must be positive"),
        ({"target": 1.5}, "target must be in"),
        ({"threads": 0}, "threads"),
        ({"batch_size": 2.5}, "batch_size"),
    ],
)
def test_bad_train_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_bad_inputs(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ValueError, match=r"cannot write a checkpoint"):
        train(TINY, TrainConfig(**QUICK), out=tmp_path / "f" / "run")
    with pytest.raises(TypeError, match=r"task must be"):
        train("recall", TrainConfig(**QUICK))
    with pytest.raises(ValueError, match=r"come from the task"):
        train(TINY, TrainConfig(**QUICK), arch={"max_positions": 9})
    with pytest.raises(ValueError, match=r"d_model=30 is not divisible"):
        train(TINY, TrainConfig(**QUICK), arch={"d_model": 30, "n_heads": 4})
