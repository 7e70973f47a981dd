"""MultiHeadAttention against torch.nn.MultiheadAttention and an explicit float64 computation."""

import pytest
import torch

from qkv.nn import MultiHeadAttention, RotaryEmbedding, accelerate, capture

F64_TOL = 1e-10


def copy_from_torch(ref: torch.nn.MultiheadAttention, mha: MultiHeadAttention) -> None:
    """torch keeps in_proj_weight ((q|k|v)·(h d), m) and out_proj.weight (m, h d)."""
    H, D, E = mha.n_heads, mha.d_head, mha.d_model
    wq, wk, wv = ref.in_proj_weight.detach().chunk(3, 0)
    bq, bk, bv = ref.in_proj_bias.detach().chunk(3, 0)
    with torch.no_grad():
        for w, src in ((mha.W_Q, wq), (mha.W_K, wk), (mha.W_V, wv)):
            w.copy_(src.view(H, D, E).transpose(1, 2))
        for b, src in ((mha.b_Q, bq), (mha.b_K, bk), (mha.b_V, bv)):
            b.copy_(src.view(H, D))
        mha.W_O.copy_(ref.out_proj.weight.detach().t().reshape(H, D, E))
        mha.b_O.copy_(ref.out_proj.bias.detach())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_torch_multihead_attention(causal, padded):
    torch.manual_seed(0)
    B, S, E, H = 3, 11, 64, 4
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True, dtype=torch.float64)
    torch.nn.init.normal_(ref.in_proj_bias)
    torch.nn.init.normal_(ref.out_proj.bias)
    mha = MultiHeadAttention(E, H, causal=causal).double()
    copy_from_torch(ref, mha)
    x = torch.randn(B, S, E, dtype=torch.float64)
    lengths = torch.tensor([11, 7, 1]) if padded else torch.tensor([S] * B)
    keep = torch.arange(S)[None, :] < lengths[:, None]  # (b j)
    attn_mask = torch.ones(S, S, dtype=torch.bool).triu(1) if causal else None  # True = blocked
    want, _ = ref(
        x, x, x, key_padding_mask=~keep if padded else None, attn_mask=attn_mask, need_weights=False
    )
    got = mha(x, mask=keep[:, None, None, :] if padded else None)
    real = keep[:, :, None].expand_as(got)  # padded query rows are don't-care
    assert (got - want)[real].abs().max() < F64_TOL


def explicit(x, mha, mask, causal, pos=None):
    """float64 einsum reference with kv heads repeated for GQA."""
    q = torch.einsum("bim,hmd->bhid", x, mha.W_Q) + (0 if mha.b_Q is None else mha.b_Q[:, None])
    k = torch.einsum("bim,hmd->bhid", x, mha.W_K) + (0 if mha.b_K is None else mha.b_K[:, None])
    v = torch.einsum("bim,hmd->bhid", x, mha.W_V) + (0 if mha.b_V is None else mha.b_V[:, None])
    if mha.rope is not None:
        q, k = mha.rope(q, pos), mha.rope(k, pos)
    g = mha.n_heads // mha.n_kv_heads
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) / mha.d_head**0.5
    S = x.shape[1]
    keep = torch.ones(S, S, dtype=torch.bool)
    if causal:
        keep = keep.tril()
    if mask is not None:
        keep = keep & mask
    s = s.masked_fill(~keep, float("-inf"))
    if mha.sinks is not None:  # the sink as one more column, dropped after the softmax
        col = mha.sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)
        w = torch.cat([s, col], -1).softmax(-1)[..., :-1]
        z = torch.einsum("bhij,bhjd->bhid", w, v)
        out = torch.einsum("bhid,hdm->bim", z, mha.W_O)
        return out if mha.b_O is None else out + mha.b_O
    z = torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)
    out = torch.einsum("bhid,hdm->bim", z, mha.W_O)
    return out if mha.b_O is None else out + mha.b_O


@pytest.mark.parametrize("heads", [(6, 2), (6, 1), (6, 6)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_gqa_matches_explicit_float64(heads, causal, bias):
    torch.manual_seed(1)
    H, K = heads
    mha = MultiHeadAttention(48, H, n_kv_heads=K, d_head=20, bias=bias, causal=causal).double()
    if bias:
        for b in (mha.b_Q, mha.b_K, mha.b_V, mha.b_O):
            torch.nn.init.normal_(b)
    x = torch.randn(2, 13, 48, dtype=torch.float64)
    mask = torch.ones(2, 1, 1, 13, dtype=torch.bool)
    mask[1, ..., 9:] = False
    got = mha(x, mask=mask)
    want = explicit(x, mha, mask, causal)
    assert (got - want)[0].abs().max() < F64_TOL
    assert (got - want)[1, :9].abs().max() < F64_TOL


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_attention_matches_explicit(interleaved):
    torch.manual_seed(2)
    rope = RotaryEmbedding(16, base=1e5, interleaved=interleaved)
    mha = MultiHeadAttention(32, 4, n_kv_heads=2, d_head=16, rope=rope, causal=True).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(
        mha(x), explicit(x, mha, None, True, torch.arange(9)), rtol=0, atol=F64_TOL
    )


def test_float32_close_to_float64_and_gradients_flow():
    torch.manual_seed(3)
    mha = MultiHeadAttention(64, 4, n_kv_heads=2, causal=True)
    x = torch.randn(2, 17, 64)
    out = mha(x)
    want = explicit(x.double(), mha.double(), None, True)
    mha.float()
    assert (out.double() - want).abs().max() < 1e-5
    out = mha(x)  # after .float(), the fused weights are rebuilt
    assert (out.double() - want).abs().max() < 1e-5
    out.square().sum().backward()
    for p in mha.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_fused_weights_follow_in_place_updates():
    mha = MultiHeadAttention(16, 2)
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        before = mha(x)
        mha.W_V.mul_(2.0)
        after = mha(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, explicit(x, mha, None, False).detach())


def test_parameter_shapes():
    mha = MultiHeadAttention(576, 9, n_kv_heads=3, d_head=64, bias=False)
    assert mha.W_Q.shape == (9, 576, 64)
    assert mha.W_K.shape == mha.W_V.shape == (3, 576, 64)
    assert mha.W_O.shape == (9, 64, 576)
    assert mha.b_Q is None and mha.b_O is None
    assert set(dict(mha.named_parameters())) == {"W_Q", "W_K", "W_V", "W_O"}
    mha = MultiHeadAttention(64, 4)
    assert mha.b_Q.shape == (4, 16) and mha.b_K.shape == (4, 16) and mha.b_O.shape == (64,)


def test_bad_input():
    with pytest.raises(ValueError, match="d_head explicitly"):
        MultiHeadAttention(64, 5)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        MultiHeadAttention(64, 6, n_kv_heads=4)
    with pytest.raises(ValueError, match=r"rope\.d_head=8"):
        MultiHeadAttention(64, 4, rope=RotaryEmbedding(8))
    with pytest.raises(TypeError, match="causal"):
        MultiHeadAttention(64, 4, causal=1)
    mha = MultiHeadAttention(64, 4)
    with pytest.raises(ValueError, match=r"\(B, S, d_model=64\), got \(2, 3, 32\)"):
        mha(torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="d_model=64"):
        mha(torch.randn(3, 64))
    with pytest.raises(TypeError, match="float64"):
        mha(torch.randn(1, 3, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="LayerCache"):
        mha(torch.randn(1, 3, 64), cache=object())
    with pytest.raises(ValueError, match="broadcast"):
        mha(torch.randn(1, 3, 64), mask=torch.ones(1, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x is on meta but the weights are on cpu"):
        mha(torch.randn(1, 3, 64, device="meta"))
    with pytest.raises(ValueError, match=r"window .*got \(True, 0\)"):
        MultiHeadAttention(64, 4, window=(True, 0))
    for cap in (float("inf"), float("nan")):  # inf gave NaN outputs; nan was refused already
        with pytest.raises(ValueError, match="softcap must be None or a finite number > 0"):
            MultiHeadAttention(64, 4, softcap=cap)


def test_nan_in_padded_positions_never_leaks():
    """The fast backend choice keeps the engine's guarantee: masked NaN keys stay out."""
    torch.manual_seed(8)
    mha = MultiHeadAttention(16, 2)
    x = torch.randn(2, 6, 16)
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[1, ..., 4:] = False
    clean = mha(x, mask=keep)
    x[1, 4:] = float("nan")
    dirty = mha(x, mask=keep)
    torch.testing.assert_close(dirty[0], clean[0])
    torch.testing.assert_close(dirty[1, :4], clean[1, :4])


def test_pack_keeps_values_and_needs_no_fused_copy():
    torch.manual_seed(9)
    mha = MultiHeadAttention(24, 6, n_kv_heads=2, d_head=4, rope=RotaryEmbedding(4), causal=True)
    torch.nn.init.normal_(mha.b_K)
    x = torch.randn(2, 5, 24)
    want = mha(x)
    before = {n: p.detach().clone() for n, p in mha.named_parameters()}
    ids = {n: id(p) for n, p in mha.named_parameters()}
    accelerate(mha)  # packs W_Q, W_K, W_V into one matrix
    for n, p in mha.named_parameters():
        torch.testing.assert_close(p, before[n])
        assert id(p) == ids[n] and p.requires_grad
    assert not mha.W_Q.is_contiguous()
    assert mha.W_K.untyped_storage().data_ptr() == mha.W_Q.untyped_storage().data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(mha(x), want)
    assert mha._fused is None  # the packed view was used, nothing cached
    got = mha(x)  # autograd path still concatenates, gradients reach every parameter
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert all(p.grad is not None for p in mha.parameters())


def test_packed_view_follows_in_place_edits_and_relayouts():
    """The packed fused view is reused across calls only while it is still the weights' storage:
    an in-place edit shows at once, and `.double()` (new storage) is computed afresh."""
    torch.manual_seed(10)
    mha = MultiHeadAttention(24, 6, n_kv_heads=2, d_head=4, rope=RotaryEmbedding(4), causal=True)
    accelerate(mha.requires_grad_(False))
    x = torch.randn(2, 5, 24)
    mha(x)  # caches the packed view
    with torch.no_grad():
        mha.W_K.mul_(-2.0)
        mha.b_V.add_(1.0)
    pos = torch.arange(5)
    m64 = MultiHeadAttention(24, 6, n_kv_heads=2, d_head=4, rope=RotaryEmbedding(4), causal=True)
    m64.load_state_dict({n: p.double() for n, p in mha.state_dict().items()}, strict=True)
    m64.double()
    got = mha(x)
    torch.testing.assert_close(
        got.double(), explicit(x.double(), m64, None, True, pos), atol=1e-5, rtol=0
    )
    want = explicit(x.double(), mha.double(), None, True, pos)  # new storage: packed view dropped
    torch.testing.assert_close(mha(x.double()), want, rtol=0, atol=F64_TOL)
    assert mha._packed is None


def test_cache_built_in_inference_mode_is_not_reused_for_autograd():
    mha = MultiHeadAttention(16, 2).requires_grad_(False)
    x = torch.randn(1, 3, 16)
    with torch.inference_mode():
        mha(x)
    xg = x.clone().requires_grad_(True)
    mha(xg).sum().backward()  # would fail if the inference-mode fused weight were reused
    assert xg.grad is not None


@pytest.mark.parametrize("rope, causal, kv", [(False, False, 4), (True, True, 2)])
def test_segments_equal_separate_sequences(rope, causal, kv):
    """Sequences packed back to back with `segments` give, per sequence, what that sequence
    alone gives in float64 (attention never crosses a boundary; RoPE restarts at 0), and the
    gradients flow through the packed call."""
    torch.manual_seed(3)
    lengths = [5, 1, 9]
    mha = MultiHeadAttention(
        32, 4, n_kv_heads=kv, rope=RotaryEmbedding(8) if rope else None, causal=causal
    )
    torch.nn.init.normal_(mha.b_Q)
    torch.nn.init.normal_(mha.b_O)
    xs = [torch.randn(1, n, 32) for n in lengths]
    packed = torch.cat(xs, 1).requires_grad_()
    got = mha(packed, segments=lengths)
    ref = MultiHeadAttention(
        32, 4, n_kv_heads=kv, rope=RotaryEmbedding(8) if rope else None, causal=causal
    ).double()
    ref.load_state_dict(mha.state_dict())
    want = torch.cat([ref(x.double()) for x in xs], 1)
    assert got.shape == (1, sum(lengths), 32)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    got.square().sum().backward()
    leaf = torch.cat(xs, 1).double().requires_grad_()
    torch.cat(
        [ref(part) for part in leaf.split(lengths, 1)], 1
    ).square().sum().backward()  # fmt: skip
    torch.testing.assert_close(packed.grad.double(), leaf.grad, rtol=0, atol=1e-4)


@pytest.mark.parametrize("fast", [False, True])
def test_capture_records_each_segment_as_that_sequence_alone(fast):
    """Under capture, a packed call files one record per sequence (`segment`), holding what
    capturing that sequence alone records: q, k, v, z and the LSE, compared in float64."""
    torch.manual_seed(4)
    lengths = [5, 1, 9]
    mha = MultiHeadAttention(32, 4, n_kv_heads=2, rope=RotaryEmbedding(8), causal=True)
    ref = MultiHeadAttention(32, 4, n_kv_heads=2, rope=RotaryEmbedding(8), causal=True).double()
    ref.load_state_dict(mha.state_dict())
    if fast:
        accelerate(mha)
    xs = [torch.randn(1, n, 32) for n in lengths]
    with torch.no_grad(), capture(mha) as cap:
        mha(torch.cat(xs, 1), segments=lengths)
    assert [r.segment for r in cap.layers] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"pass segment=0\.\.2"):
        cap.layer(0)
    for s, x in enumerate(xs):
        with torch.no_grad(), capture(ref) as alone:
            ref(x.double())
        got, want = cap.layer(0, segment=s), alone.layers[0]
        for name in ("q", "k", "v", "z", "lse"):
            a, b = getattr(got, name).double(), getattr(want, name)
            assert a.shape == b.shape, name
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name
        assert got.attn_kwargs["causal"] and got.attn_kwargs["mask"] is None


def test_segments_bad_input():
    from qkv.nn import KVCache

    mha = MultiHeadAttention(16, 2)
    x = torch.randn(1, 6, 16)
    for segments, match in (([2, 3], "summing to x's tokens"), ([6, 0], "positive lengths")):
        with pytest.raises(ValueError, match=match):
            mha(x, segments=segments)
    with pytest.raises(ValueError, match=r"x of shape \(1, n, 16\)"):
        mha(torch.randn(2, 3, 16), segments=[3])
    with pytest.raises(ValueError, match="mask or a cache"):
        mha(x, segments=[6], mask=torch.ones(1, 1, 1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask or a cache"):
        mha(x, segments=[6], cache=KVCache(1)[0])


@pytest.mark.parametrize("fast", [False, True])
def test_sinks_match_explicit_with_cache_and_capture(fast):
    """sinks=True (gpt-oss): the float64 explicit formula with the sink as a dropped softmax
    column, in one call and decoded token by token with a cache (float32 within 1e-5 when
    `accelerate`d); the captured record replays weights that sum to 1 − the sink's share."""
    from qkv import attention_weights
    from qkv.nn import KVCache

    torch.manual_seed(4)
    rope = RotaryEmbedding(8)
    mha = MultiHeadAttention(32, 4, n_kv_heads=2, d_head=8, rope=rope, causal=True, sinks=True)
    assert mha.sinks.shape == (4,) and "sinks=True" in repr(mha)
    with torch.no_grad():
        mha.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 4.0]))
    x = torch.randn(2, 7, 32)
    want = explicit(x.double(), mha.double(), None, True, torch.arange(7))
    tol = 1e-10
    if fast:
        mha = accelerate(mha.float())
        tol = 1e-5
    else:
        x = x.double()
    with torch.no_grad(), capture(mha) as cap:
        got = mha(x.to(mha.W_Q.dtype))
    assert (got.double() - want).abs().max() < tol
    cache = KVCache(1)
    with torch.no_grad():
        steps = [mha(x[:, t : t + 1].to(mha.W_Q.dtype), cache=cache[0]) for t in range(7)]
    assert (torch.cat(steps, 1).double() - want).abs().max() < tol
    rec = cap.layers[0]
    w = attention_weights(rec.q, rec.k, rec.lse, **rec.attn_kwargs).double()
    sink = torch.exp(mha.sinks.detach().double().view(1, -1, 1) - rec.lse.double())
    assert (w.sum(-1) + sink - 1).abs().max() < tol


def test_sinks_must_be_a_bool():
    with pytest.raises(TypeError, match="sinks must be a bool"):
        MultiHeadAttention(8, 2, sinks=1)
