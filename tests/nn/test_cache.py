"""Cached incremental decoding equals the uncached forward."""

import pytest
import torch

from qkv.nn import (
    MLP,
    KVCache,
    LayerCache,
    MultiHeadAttention,
    PreNormBlock,
    RMSNorm,
    RotaryEmbedding,
)

TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def stack(n_layers, d, H, K, interleaved, dtype):
    torch.manual_seed(4)
    blocks = torch.nn.ModuleList()
    for _ in range(n_layers):
        rope = RotaryEmbedding(d // H, base=1e4, interleaved=interleaved)
        attn = MultiHeadAttention(d, H, n_kv_heads=K, rope=rope, causal=True, bias=False)
        blocks.append(
            PreNormBlock(
                attn, MLP(d, 2 * d, act="silu", gated=True, bias=False), RMSNorm(d), RMSNorm(d)
            )
        )
    return blocks.to(dtype)


def run(blocks, x, cache=None):
    for i, blk in enumerate(blocks):
        x = blk(x, cache=None if cache is None else cache[i])
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (4, 4)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_incremental_equals_uncached(dtype, heads, interleaved):
    blocks = stack(3, 32, *heads, interleaved, dtype)
    x = torch.randn(2, 40, 32, dtype=dtype)
    with torch.no_grad():
        full = run(blocks, x)
        cache = KVCache(3)
        parts, start = [], 0
        for step in (7, 1, 1, 16, 1, 14):  # prefill, single tokens, a chunk spanning a regrow
            parts.append(run(blocks, x[:, start : start + step], cache))
            start += step
            assert cache.length == start
    got = torch.cat(parts, 1)
    assert (got - full).abs().max() <= TOL[dtype] * full.abs().max()


def test_cache_with_key_padding_mask():
    """A bool mask over all keys (cached + new) works with the cache too."""
    torch.manual_seed(5)
    mha = MultiHeadAttention(16, 2, rope=RotaryEmbedding(8), causal=True).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, :2] = False  # left padding in row 1
    full = mha(x, mask=keep[:, None, None, :])
    cache = LayerCache()
    a = mha(x[:, :4], mask=keep[:, None, None, :4], cache=cache)
    b = mha(x[:, 4:], mask=keep[:, None, None, :], cache=cache)
    got = torch.cat((a, b), 1)
    torch.testing.assert_close(got[0], full[0])
    torch.testing.assert_close(got[1, 2:], full[1, 2:])


def test_layer_cache_views_and_errors():
    c = LayerCache()
    assert c.k is None and c.length == 0
    k1, v1 = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5)
    K, _ = c.append(k1, v1)
    saved = K.clone()
    c.append(torch.randn(1, 2, 30, 4), torch.randn(1, 2, 30, 5))  # grows
    assert c.length == 33 and c.k.shape == (1, 2, 33, 4) and c.v.shape == (1, 2, 33, 5)
    torch.testing.assert_close(K, saved)
    torch.testing.assert_close(c.k[:, :, :3], k1)
    with pytest.raises(ValueError, match="fresh KVCache"):
        c.append(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 5))
    with pytest.raises(ValueError, match="n_layers"):
        KVCache(0)
    kv = KVCache(2)
    assert len(kv) == 2 and kv.length == 0 and isinstance(kv[1], LayerCache)
