"""capture(): records what the lens needs, is exact, and cleans up."""

import pytest
import torch

import qkv
from qkv.nn import (
    MLP,
    AttentionRecord,
    MultiHeadAttention,
    PreNormBlock,
    RMSNorm,
    RotaryEmbedding,
    capture,
)
from qkv.nn.capture import active


def model(n_layers=3, d=32, H=4, K=2):
    torch.manual_seed(6)
    return torch.nn.Sequential(
        *[
            PreNormBlock(
                MultiHeadAttention(d, H, n_kv_heads=K, rope=RotaryEmbedding(d // H), causal=True),
                MLP(d, 64),
                RMSNorm(d),
                RMSNorm(d),
            )
            for _ in range(n_layers)
        ]
    ).double()


def test_records_shapes_and_order():
    m = model()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with capture(m) as cap:
        out = m(x)
    assert [r.layer for r in cap.layers] == [0, 1, 2]
    for r in cap.layers:
        assert isinstance(r, AttentionRecord)
        assert r.q.shape == (2, 4, 9, 8) and r.k.shape == (2, 2, 9, 8) and r.v.shape == (2, 2, 9, 8)
        assert r.z.shape == (2, 4, 9, 8) and r.W_O.shape == (4, 8, 32) and r.lse.shape == (2, 4, 9)
        assert r.attn_kwargs["causal"] is True and r.attn_kwargs["scale"] == pytest.approx(8**-0.5)
        assert not r.q.requires_grad
    torch.testing.assert_close(m(x), out)  # capturing does not change the output


def test_z_times_W_O_is_the_module_output_and_rows_are_exact():
    torch.manual_seed(7)
    mha = MultiHeadAttention(
        24, 6, n_kv_heads=3, rope=RotaryEmbedding(4, interleaved=True)
    ).double()
    torch.nn.init.normal_(mha.b_O)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keep[1, ..., 5:] = False
    with capture(mha) as cap:
        out = mha(x, mask=keep)
    (r,) = cap.layers
    per_head = torch.einsum("bhie,hem->bhim", r.z, r.W_O)  # each head's contribution
    torch.testing.assert_close(per_head.sum(1) + r.b_O, out)
    # the recorded q, k, lse and kwargs reproduce the exact softmax rows and z
    w = qkv.attention_weights(r.q, r.k, r.lse, rows=[0, 3, 6], **r.attn_kwargs)  # (b h r j)
    v = r.v.repeat_interleave(2, 1)
    torch.testing.assert_close(w @ v, r.z[:, :, [0, 3, 6]])
    assert (w[1, ..., 5:] == 0).all()


def test_layers_filter_and_cache():
    m = model()
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    cache = qkv.nn.KVCache(3)
    h = x[:, :4]
    for i, blk in enumerate(m):
        h = blk(h, cache=cache[i])
    with capture(m, layers=[1]) as cap:
        h = x[:, 4:]
        for i, blk in enumerate(m):
            h = blk(h, cache=cache[i])
    (r,) = cap.layers
    assert r.layer == 1 and r.q.shape == (1, 4, 1, 8) and r.k.shape == (1, 2, 5, 8)
    assert cap.layer(1) is r
    with pytest.raises(KeyError, match="recorded layers: \\[1\\]"):
        cap.layer(0)
    with pytest.raises(ValueError, match="out of range"):
        with capture(m, layers=[3]):
            pass


def test_cleans_up_after_exception_and_records_nothing_outside():
    m = model()
    x = torch.randn(1, 4, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(m) as cap:
            m(x)
            raise RuntimeError("boom")
    assert active() == ()
    n = len(cap.layers)
    m(x)
    assert len(cap.layers) == n == 3


def test_nested_captures_see_their_own_model():
    a, b = model(2), model(1)
    x = torch.randn(1, 3, 32, dtype=torch.float64)
    with capture(a) as ca:
        with capture(b) as cb:
            a(x)
            b(x)
        a(x)
    assert [r.layer for r in ca.layers] == [0, 1, 0, 1]
    assert [r.layer for r in cb.layers] == [0]
    assert active() == ()


def test_detach_false_keeps_graph():
    m = model(1)
    x = torch.randn(1, 3, 32, dtype=torch.float64)
    with capture(m, detach=False) as cap:
        m(x)
    cap.layers[0].z.sum().backward()
    assert m[0].attn.W_V.grad is not None


def test_bad_input():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        with capture("model"):
            pass
    with pytest.raises(ValueError, match="no MultiHeadAttention"):
        with capture(torch.nn.Linear(2, 2)):
            pass
