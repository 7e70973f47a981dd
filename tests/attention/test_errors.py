"""Bad input raises ValueError/TypeError that names what was expected and what came."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import qkv
from qkv.attention import auto_backend

from .conftest import err, make_qkv, oracle


def _qkv():
    return make_qkv(2, 8, 2, 5, 7, 16)


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, ["4 dims", "3"]),
        (
            lambda q, k, v: (q, k[:, :1].expand(2, 3, 7, 16), v[:, :1].expand(2, 3, 7, 16)),
            ValueError,
            ["Hq=8", "Hk=3"],
        ),
        (lambda q, k, v: (q, k, v[:, :1]), ValueError, ["Hk=2", "Hv=1"]),
        (lambda q, k, v: (q, k[..., :8], v), ValueError, ["D=16", "Dk=8"]),
        (lambda q, k, v: (q, k, v[:, :, :6]), ValueError, ["Sk=7", "Sv=6"]),
        (lambda q, k, v: (q[:1], k, v), ValueError, ["batch"]),
        (lambda q, k, v: (q.double(), k, v), TypeError, ["float64", "float32"]),
        (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, ["int64"]),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, ["ndarray"]),
    ],
    ids=["rank", "heads", "kv-heads", "head-dim", "kv-len", "batch", "dtype-mix", "int", "numpy"],
)
def test_bad_tensors(mutate, exc, words):
    q, k, v = mutate(*_qkv())
    with pytest.raises(exc) as e:
        qkv.attention(q, k, v)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize(
    "shape, hint",
    [
        ((8, 5, 16), r"add the missing batch/head axis with q\.unsqueeze\(0\)$"),
        ((5, 16), r"add the 2 missing leading axes with q\[None, None\]$"),
        ((1, 2, 8, 5, 16), r"fold its 1 extra leading dim into the batch with q\.flatten\(0, 1\) "
                           r"\(shape \(2, 8, 5, 16\)\), or reshape it to \(B, H, S, D\)$"),
        ((3, 1, 2, 8, 5, 16), r"fold its 2 extra leading dims into the batch with "
                              r"q\.flatten\(0, 2\) \(shape \(6, 8, 5, 16\)\)"),
    ],
)  # fmt: skip
def test_a_q_of_another_rank_gets_the_fix_for_its_rank(shape, hint):
    """unsqueeze(0) only adds an axis: for a 5-D q it would make 6 dims."""
    _, k, v = _qkv()
    q = torch.randn(shape)
    with pytest.raises(ValueError, match=rf"^q must have 4 dims \(B, H, S, D\) but has "
                                         rf"{len(shape)}: shape .*; {hint}"):  # fmt: skip
        qkv.attention(q, k, v)


def test_device_mismatch_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="meta"):
        qkv.attention(q, k.to("meta"), v)


@pytest.mark.parametrize(
    "kw, exc, words",
    [
        (
            dict(mask=torch.ones(3, 1, 5, 7, dtype=torch.bool)),
            ValueError,
            ["(3, 1, 5, 7)", "(2, 8, 5, 7)"],
        ),
        (dict(mask=torch.ones(5, 8, dtype=torch.bool)), ValueError, ["cannot broadcast"]),
        (dict(mask=torch.ones(5, 7, dtype=torch.int32)), TypeError, ["int32"]),
        (dict(dropout_p=1.0), ValueError, ["[0, 1)", "1.0"]),
        (dict(dropout_p=-0.1), ValueError, ["[0, 1)"]),
        (dict(window=5), TypeError, ["(left, right)"]),
        (dict(window=(-1, 0)), ValueError, ["≥ 0"]),
        (dict(softcap=0.0), ValueError, ["softcap"]),
        (dict(scale=float("nan")), ValueError, ["scale"]),
        (dict(backend="flash"), ValueError, ["'flash'", "tiled"]),
        (dict(mask_mod=lambda b, h, q, kv: q - kv), TypeError, ["bool"]),
        (dict(score_mod=3), TypeError, ["callable"]),
        (dict(causal="yes"), TypeError, ["causal"]),
    ],
    ids=lambda x: str(x)[:40] if not isinstance(x, dict) else "-".join(x),
)
def test_bad_options(kw, exc, words):
    q, k, v = _qkv()
    with pytest.raises(exc) as e:
        qkv.attention(q, k, v, **kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_sdpa_backend_refuses_what_it_cannot_compute_exactly():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="softcap"):
        qkv.attention(q, k, v, softcap=5.0, backend="sdpa")
    with pytest.raises(ValueError, match="LSE"):
        qkv.attention(q, k, v, window=(2, 2), return_lse=True, backend="sdpa")
    with pytest.raises(ValueError, match="LSE"):
        qkv.attention(q.requires_grad_(), k, v, return_lse=True, backend="sdpa")


def test_attention_weights_bad_rows_and_lse():
    q, k, _ = _qkv()
    with pytest.raises(IndexError, match=r"\[-5, 5\)"):
        qkv.attention_weights(q, k, rows=[5])
    with pytest.raises(TypeError, match="rows"):
        qkv.attention_weights(q, k, rows=[0.5])
    with pytest.raises(ValueError, match=r"\(2, 8, 5\)"):
        qkv.attention_weights(q, k, torch.zeros(2, 8, 4), rows=[0])


@pytest.mark.parametrize(
    "slopes, words",
    [
        (torch.rand(3, 8), ["(3, 8)", "B=2, Hq=8", "(2, 8)"]),
        (torch.rand(4), ["(4,)", "Hq=8", "(8,)"]),
        (torch.rand(2, 8, 1), ["(Hq,) or (B, Hq)"]),
    ],
)
def test_alibi_slopes_of_the_wrong_shape_are_named(slopes, words):
    q, k, v = _qkv()
    with pytest.raises(ValueError) as e:
        qkv.attention(q, k, v, score_mod=qkv.alibi(slopes))
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("B", [2, 9], ids=["fails-to-index", "wrong-shape"])
def test_flex_style_chained_indexing_is_explained(B):
    """FlexAttention mods index captured tensors as bias[b][q]; ours are broadcast index tensors,
    so that fails to index (B < Sq) or yields a shape that cannot broadcast (B ≥ Sq)."""
    q, k, v = make_qkv(B, 8, 2, 5, 7, 16)
    bias = torch.randn(B, 5)
    with pytest.raises((IndexError, RuntimeError, ValueError)) as e:
        qkv.attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s + bias[b][q_idx - 2])
    assert "score_mod" in str(e.value) and "bias[b, q_idx]" in str(e.value), str(e.value)
    assert "broadcast" in str(e.value)
    with pytest.raises((IndexError, RuntimeError, ValueError)) as e:
        qkv.attention(q, k, v, mask_mod=lambda b, h, q_idx, kv_idx: bias[b][q_idx - 2] > 0)
    assert "mask_mod" in str(e.value) and "bias[b, q_idx]" in str(e.value), str(e.value)


@pytest.mark.parametrize("cap", [float("inf"), 1e300], ids=str)
def test_a_softcap_that_overflows_is_refused_not_nan(cap):
    # cap·tanh(s/cap) is inf·0 = NaN for every score once cap is inf in the compute dtype
    q, k, v = _qkv()
    for backend in ("auto", "reference", "tiled", "fused"):
        with pytest.raises(
            ValueError, match=f"softcap must be a finite number > 0.*{re.escape(repr(cap))}"
        ):
            qkv.attention(q, k, v, softcap=cap, backend=backend)
    if cap == float("inf"):
        with pytest.raises(ValueError, match="softcap must be a finite number > 0, got inf"):
            qkv.softcap(cap)


def test_a_softcap_beyond_float32_is_fine_in_float64():
    q, k, v = (t.double() for t in _qkv())
    got = qkv.attention(q, k, v, softcap=1e300)
    assert err(got, oracle(q, k, v, softcap=1e300).out) < 1e-12


def test_reference_out_of_memory_names_the_matrix_and_the_way_out():
    # was the allocator's "[enforce fail at alloc_cpu.cpp:127] ... can't allocate memory"
    q = torch.zeros(1, 8, 200_000, 8).expand(1024, 8, 200_000, 8)  # no memory of its own
    with pytest.raises(MemoryError, match=r"\(1024, 8, 200000, 200000\).*backend='tiled'"):
        qkv.attention(q, q, q, backend="reference")
    with pytest.raises(MemoryError, match=r"GiB per matrix"):
        qkv.reference_attention(q, q, q)


@pytest.mark.parametrize("scale", [np.float32(0.5), torch.tensor(0.5)], ids=["numpy", "tensor"])
def test_a_scale_that_is_not_a_python_number_says_so(scale):
    # the message said "must be a finite number" of a finite 0.5
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"Python float .*pass float\(scale\)"):
        qkv.attention(q, k, v, scale=scale)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"window": (3, 0)}, r"this request has a window \(3, 0\)"),
        ({"causal": True}, r"this request has causal with Sq=4 ≠ Sk=100"),
        ({"mask": torch.ones(4, 100, dtype=torch.bool)}, r"this request has a mask"),
    ],
)
def test_sdpa_lse_refusal_names_the_reason_in_the_caller_s_terms(kw, reason):
    """A window's keys before every row are cut before the backend runs; the refusal used to
    quote that cut length ("got Sq=4, Sk=7") for a call with 100 keys."""
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    with pytest.raises(ValueError, match=reason) as e:
        qkv.attention(q, k, v, **kw, backend="sdpa", return_lse=True)
    assert "Sk=7" not in str(e.value)


@pytest.mark.parametrize("scale", [True, False], ids=str)
def test_a_bool_scale_is_refused(scale):
    """A bool is an int to Python: scale=True ran as scale 1.0 (and False as 0: uniform)."""
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=rf"^scale must be a finite Python float .*, got {scale}$"):
        qkv.attention(q, k, v, scale=scale)


@pytest.mark.parametrize("flag", ["yes", 1, None, torch.tensor(True)], ids=repr)
def test_return_lse_must_be_a_bool(flag):
    """return_lse="yes" returned (out, lse), 0 or None out alone: its truth value was read."""
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"^return_lse must be a bool, got "):
        qkv.attention(q, k, v, return_lse=flag)
    with pytest.raises(TypeError, match=r"^return_lse must be a bool, got "):
        auto_backend(q, k, v, return_lse=flag)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_attention_weights_refuses_an_lse_that_is_not_floating(dtype):
    """An integer LSE was cast and used: the weights of a truncated log-sum-exp."""
    q, k, _ = _qkv()
    lse = torch.zeros(2, 8, 5, dtype=dtype)
    with pytest.raises(TypeError, match=rf"^lse must be a floating tensor.*got {dtype}$"):
        qkv.attention_weights(q, k, lse)


def test_reference_attention_says_its_result_has_the_lse():
    """It was "make_spec() got an unexpected keyword argument 'return_lse'"."""
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"reference_attention takes no return_lse.*read \.lse"):
        qkv.reference_attention(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match=r"no backend.*qkv\.attention\(q, k, v, backend='tiled'"):
        qkv.reference_attention(q, k, v, backend="tiled")
    r = qkv.reference_attention(q, k, v, causal=True)  # what the message points to
    truth = oracle(q, k, v, causal=True)
    assert err(r.lse, truth.lse) < 1e-5 and err(r.out, truth.out) < 1e-5


@pytest.mark.parametrize("backend", ["tiled", "fused"])
def test_a_learned_float_mask_names_the_backend_that_was_asked_for(backend):
    """fused runs a mask= call on tiled, and the refusal named "the tiled backend"."""
    q, k, v = _qkv()
    bias = torch.randn(5, 7, requires_grad=True)
    with pytest.raises(ValueError, match=rf"^backend='{backend}' does not differentiate through "
                                         r"a float mask; pass mask\.detach\(\)"):  # fmt: skip
        qkv.attention(q, k, v, mask=bias, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "tiled", "fused"])
def test_a_learned_float_mask_under_no_grad_is_just_a_mask(backend):
    """Under torch.no_grad there is no gradient to refuse: `auto` with return_lse (→ tiled)
    and explicit tiled/fused raised "does not differentiate through a float mask"."""
    q, k, v = _qkv()
    bias = torch.randn(5, 7, requires_grad=True)
    with torch.no_grad():
        out, lse = qkv.attention(q, k, v, mask=bias, return_lse=True, backend=backend)
    truth = oracle(q, k, v, mask=bias.detach().double())
    assert err(out, truth.out) < 1e-5 and err(lse, truth.lse) < 1e-5
