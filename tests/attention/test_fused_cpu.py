"""The fused CPU backend against the float64 oracle of conftest (plain code, no engine code),
with the tiled tests' error budget, at awkward sizes; its block mask and its cache; thread
count independence; a silent compile."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import qkv
from qkv.attention import blockmask, fused_cpu
from qkv.attention.api import choose_backend
from qkv.attention.spec import make_spec

from .conftest import (
    GRAD_FACTOR,
    assert_within_budget,
    err,
    make_qkv,
    naive,
    oracle,
    same_dtype,
)

# block edges ± 1 (blocks are 64 × 64), Sq ≠ Sk both ways, one query against many keys
SIZES = [(64, 64), (63, 65), (129, 128), (1, 239), (113, 203), (203, 113)]


def combos(B: int, Sk: int) -> dict[str, dict]:
    doc = torch.arange(Sk) * 3 // Sk  # three documents
    lengths = torch.tensor([Sk, max(1, Sk // 2)])[:B]
    keep = torch.arange(Sk).expand(B, Sk) % 3 != 1
    return {
        "causal": dict(causal=True),
        "window": dict(window=(17, 3)),
        "window_left_only": dict(window=(40, None)),
        "window_causal": dict(window=(70, 9), causal=True),
        "sliding_window_mask": dict(mask_mod=qkv.sliding_window_mask(20, 2)),
        "causal_mask": dict(mask_mod=qkv.causal_mask),
        "document_causal": dict(mask_mod=qkv.document_mask(doc), causal=True),
        "prefix_lm": dict(mask_mod=qkv.prefix_lm_mask(Sk // 3)),
        "key_padding_lengths": dict(mask_mod=qkv.key_padding_mask(lengths)),
        "key_padding_keep": dict(mask_mod=qkv.key_padding_mask(keep), window=(30, 30)),
        "and_or": dict(
            mask_mod=qkv.or_masks(
                qkv.prefix_lm_mask(5), qkv.and_masks(qkv.causal_mask, qkv.document_mask(doc))
            )
        ),
        "alibi_causal": dict(score_mod=qkv.alibi(4), causal=True),
        "alibi_per_batch": dict(score_mod=qkv.alibi(torch.rand(B, 4)), window=(33, 0)),
        "softcap": dict(softcap=2.0, causal=True),
        "softcap_mod_and_arg": dict(softcap=9.0, score_mod=qkv.softcap(3.0)),
        "plain": dict(),
    }


@pytest.mark.parametrize("Sq,Sk", SIZES)
@pytest.mark.parametrize("name", list(combos(2, 64)))
def test_forward_within_budget_fp32(name, Sq, Sk):
    _check(name, Sq, Sk, torch.float32, Hk=2)


@pytest.mark.parametrize("name", list(combos(2, 64)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_within_budget_half(name, dtype):
    _check(name, 129, 200, dtype, Hk=1)  # MQA


def _check(name, Sq, Sk, dtype, Hk):
    kw = combos(2, Sk)[name]
    q, k, v = make_qkv(2, 4, Hk, Sq, Sk, 40, Dv=24, dtype=dtype)
    spec = make_spec(q, k, v, **kw)
    assert fused_cpu.supported(q, spec) is None, name
    out, lse = qkv.attention(q, k, v, **kw, backend="fused", return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    truth, plain = oracle(q, k, v, **kw), same_dtype(q, k, v, **kw)
    assert_within_budget(out, plain.out, truth.out, dtype)
    assert_within_budget(lse, plain.lse, truth.lse, dtype, what="lse")
    empty = truth.lse == float("-inf")
    assert (lse[empty] == float("-inf")).all() and (out[empty] == 0).all()
    assert not out.isnan().any()


@pytest.mark.parametrize("name", ["window_causal", "document_causal", "alibi_causal", "softcap"])
def test_gradients_within_budget(name):
    Sq, Sk = 129, 130
    kw = combos(2, Sk)[name]
    q, k, v = make_qkv(2, 4, 2, Sq, Sk, 40, dtype=torch.float32, requires_grad=True)
    out = qkv.attention(q, k, v, **kw, backend="fused")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    truth = torch.autograd.grad(naive(q64, k64, v64, **kw).out, (q64, k64, v64), g.double())
    qp, kp, vp = (t.detach().requires_grad_() for t in (q, k, v))
    plain = torch.autograd.grad(naive(qp, kp, vp, **kw).out, (qp, kp, vp), g)
    for what, a, p, t in zip("qkv", grads, plain, truth, strict=True):
        assert_within_budget(a, p, t, torch.float32, GRAD_FACTOR, what=f"d{what}")


def test_empty_rows_are_zero_with_lse_minus_inf():
    # causal with more queries than keys: the top Sq − Sk rows see no key; batch 1 pads all
    q, k, v = make_qkv(2, 2, 2, 100, 70, 16)
    lengths = torch.tensor([70, 0])
    out, lse = qkv.attention(q, k, v, causal=True, mask_mod=qkv.key_padding_mask(lengths),
                             backend="fused", return_lse=True)  # fmt: skip
    assert (out[:, :, :30] == 0).all() and (lse[:, :, :30] == float("-inf")).all()
    assert (out[1] == 0).all() and (lse[1] == float("-inf")).all()
    assert torch.isfinite(lse[0, :, 30:]).all() and not out.isnan().any()


@pytest.mark.parametrize("where", ["k", "v", "both"])
def test_nan_and_inf_in_masked_keys_and_values_do_not_leak(where):
    q, k, v = make_qkv(2, 4, 2, 70, 130, 16)
    lengths = torch.tensor([125, 61])
    kw = dict(mask_mod=qkv.key_padding_mask(lengths), window=(80, 2))
    truth = oracle(q, k, v, **kw)
    k2, v2 = k.clone(), v.clone()
    if where in ("k", "both"):
        k2[1, :, 61:, 3] = float("nan")
        k2[0, :, 125:] = float("inf")
    if where in ("v", "both"):
        v2[1, :, 61:] = float("nan")
        v2[0, :, 125:, 2] = float("-inf")
    out, lse = qkv.attention(q, k2, v2, **kw, backend="fused", return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    assert err(out, truth.out) < 1e-5 and err(lse, truth.lse) < 1e-5


def test_a_kept_nan_key_still_poisons_its_rows():
    """Masks are not a NaN filter: a row that keeps a NaN key gets NaN, as plain math."""
    q, k, v = make_qkv(1, 1, 1, 8, 8, 16)
    v[0, 0, 3, 0] = float("nan")
    out = qkv.attention(q, k, v, causal=True, backend="fused")
    assert out[0, 0, :3].isfinite().all() and out[0, 0, 3:, 0].isnan().all()


def test_thread_count_does_not_change_the_result():
    q, k, v = make_qkv(2, 4, 2, 300, 300, 32)
    kw = dict(mask_mod=qkv.document_mask(torch.arange(300) // 70), causal=True)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(qkv.attention(q, k, v, **kw, backend="fused", return_lse=True))
    finally:
        torch.set_num_threads(threads)
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])


def test_arbitrary_score_mod_runs_on_tiled_never_dropped():
    q, k, v = make_qkv(1, 2, 2, 90, 90, 16)

    def bump(score, b, h, q_idx, kv_idx):
        return score + (kv_idx % 2) * 3.0

    spec = make_spec(q, k, v, score_mod=bump)
    assert "score_mod" in fused_cpu.supported(q, spec)
    got = qkv.attention(q, k, v, score_mod=bump, backend="fused")
    truth = oracle(q, k, v, score_mod=bump)
    assert err(got, truth.out) < 1e-5
    assert err(got, oracle(q, k, v).out) > 1e-2  # the mod mattered
    assert choose_backend(q, k, v, spec, False) == "tiled"


def test_arbitrary_mask_mod_is_evaluated_into_the_block_mask_uncached():
    q, k, v = make_qkv(1, 2, 2, 90, 150, 16)

    def odd(b, h, q_idx, kv_idx):
        return (kv_idx % 2 == 1) | (kv_idx == q_idx)

    got = qkv.attention(q, k, v, mask_mod=odd, backend="fused")
    assert err(got, oracle(q, k, v, mask_mod=odd).out) < 1e-5
    spec = make_spec(q, k, v, mask_mod=odd)
    assert blockmask.block_mask(spec, 64, 64) is not blockmask.block_mask(spec, 64, 64)


def test_block_mask_is_cached_and_skips_empty_blocks():
    blockmask.clear_cache()
    q, k, v = make_qkv(1, 2, 2, 1000, 1000, 16)
    doc = torch.arange(1000) // 250
    mk = lambda: qkv.and_masks(qkv.causal_mask, qkv.document_mask(doc))  # noqa: E731
    a = blockmask.block_mask(make_spec(q, k, v, mask_mod=mk()), 64, 64)
    b = blockmask.block_mask(make_spec(q, k, v, mask_mod=mk()), 64, 64)  # a new closure
    assert a is b
    full, partial, empty = a.counts
    assert empty > full + partial and partial > 0 and full > 0
    # every listed block holds a kept entry, no unlisted block does, a full block keeps all
    # its real rows, a partial one's mask is the mask (checked against the plain mask)
    i, j = torch.arange(1000).view(-1, 1), torch.arange(1000).view(1, -1)
    dense = (j <= i) & (doc.view(-1, 1) == doc.view(1, -1))
    pad = torch.zeros(16 * 64, 16 * 64, dtype=torch.bool)
    pad[:1000, :1000] = dense
    blocks = pad.view(16, 64, 16, 64).transpose(1, 2)
    listed = torch.zeros(16, 16, dtype=torch.bool)
    for qb in range(16):
        for idx in range(a.ptr[qb], a.ptr[qb + 1]):
            listed[qb, a.kblk[idx]] = True
            if a.part[idx] >= 0:
                assert torch.equal(
                    torch.from_numpy(a.masks[a.part[idx]]).bool(), blocks[qb, a.kblk[idx]]
                )
            else:
                real = torch.arange(qb * 64, qb * 64 + 64) < 1000
                assert blocks[qb, a.kblk[idx]][real].all()
    assert torch.equal(listed, blocks.any(-1).any(-1))
    doc[:10] = 7  # changed in place: a new structure
    c = blockmask.block_mask(make_spec(q, k, v, mask_mod=mk()), 64, 64)
    assert c is not a


def test_auto_picks_fused_for_windows_and_mods_but_not_plain_or_fp64():
    q, _, _ = make_qkv(1, 2, 2, 200, 200, 16)
    pick = lambda t, **kw: choose_backend(t, t, t, make_spec(t, t, t, **kw), False)  # noqa: E731
    assert pick(q, window=(31, 0)) == "fused"
    assert pick(q, mask_mod=qkv.prefix_lm_mask(40)) == "fused"
    assert pick(q, softcap=5.0, causal=True) == "fused"
    assert pick(q, causal=True) == "sdpa"
    assert pick(q.double(), window=(31, 0)) == "tiled"


def test_compiling_from_an_empty_cache_prints_nothing(tmp_path):
    code = (
        "import torch, qkv\n"
        "q = k = v = torch.randn(1, 2, 70, 16)\n"
        "qkv.attention(q, k, v, window=(9, 0), softcap=3.0, backend='fused')\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == "" and res.stderr == "", (res.stdout + res.stderr)[-3000:]
    assert any(tmp_path.rglob("*.nbi")), "the kernel was not cached"
