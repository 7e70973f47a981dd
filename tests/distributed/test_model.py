"""`shard(model)`: a decoder run with its sequence sharded over 2 gloo ranks equals the same
decoder run whole on one process (logits and summed parameter gradients)."""

from __future__ import annotations

import pytest
from torch import nn

from qkv.distributed import shard
from qkv.models.tiny import TinyConfig, TinyTransformer
from qkv.nn import LatentAttention, MLAConfig, RopeScaling

from . import spawn

TOL = {"float64": 1e-12, "float32": 1e-5}  # max |error| / max |value|


@pytest.fixture(scope="module")
def report(two_rank_report):
    return [r["model"] for r in two_rank_report]


@pytest.mark.parametrize("positions", ["", "alibi:", "sinks:"])  # RoPE, ALiBi, learned sinks
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sharded_decoder_equals_the_whole_model(report, positions, layout, dtype):
    for r, rep in enumerate(report):
        got = rep[f"{positions}{layout}/{dtype}"]
        for what in ("logits", "grads", "unsharded"):
            assert got[what] <= TOL[dtype], (
                f"rank {r} {positions}{layout} {dtype} {what}: {got[what]:.3g}"
            )


@pytest.mark.parametrize("positions", ["", "alibi:", "sinks:"])
def test_the_check_can_fail(report, positions):
    assert max(rep[f"{positions}mislabeled/float64"] for rep in report) > 1e-3


@pytest.mark.slow
def test_sharded_smollm2_equals_the_whole_model():
    results, _ = spawn.run("tests.distributed.model_workers:smollm2_sharded", 2, timeout=400,
                           pg_timeout=300)  # fmt: skip
    for r, got in enumerate(spawn.ok(results)):
        assert got["n"] > 60
        assert got["logits"] <= 1e-4, (
            f"rank {r}: {got['logits']:.3g} (logits up to {got['scale']:.1f})"
        )


def test_shard_refuses_what_it_cannot_shard():
    learned = TinyTransformer(TinyConfig(vocab=("a", "b"), max_positions=8, positions="learned"))
    with pytest.raises(ValueError, match="pos looks like learned absolute position embeddings"):
        shard(learned)
    rope = TinyTransformer(TinyConfig(vocab=("a", "b"), max_positions=8, positions="rope"))
    with pytest.raises(RuntimeError, match=r"call dist\.init_process_group"):
        shard(rope)  # this test process has no process group
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        shard("model")
    with pytest.raises(ValueError, match="layout must be one of"):
        shard(rope, layout="striped")
    with pytest.raises(ValueError, match=r"holds no qkv\.nn\.MultiHeadAttention"):
        shard(nn.Linear(2, 2))
    long = TinyTransformer(TinyConfig(vocab=("a", "b"), max_positions=8, positions="rope"))
    for b in long.blocks:  # LongRoPE picks its factors by the whole sequence's length
        n = b.attn.rope.rotary_dim // 2
        b.attn.rope.scaling = RopeScaling.longrope([1.0] * n, [2.0] * n, 4)
    with pytest.raises(ValueError, match=r"rope uses LongRoPE.*run this model unsharded"):
        shard(long)
    mla = nn.Sequential(LatentAttention(16, 2, MLAConfig(None, 8, 4, 4, 4)))
    with pytest.raises(
        ValueError, match=r"0 is multi-head latent attention.*run the model unsharded"
    ):
        shard(mla)
    assert type(rope.blocks[0].attn).__name__ == "MultiHeadAttention"  # nothing half-swapped
    assert type(long.blocks[0].attn).__name__ == "MultiHeadAttention"
