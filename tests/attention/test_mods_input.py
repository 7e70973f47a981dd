"""The ready mods and user mods refuse input they would misread, at the attention call, naming
the mod, its argument and what the call has; input they do take gives the float64 oracle's
answer with the same mask written out here as a plain tensor."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import qkv

from .conftest import err, make_qkv, oracle

Sq = Sk = 9


def _qkv(B):
    return make_qkv(B, 2, 2, Sq, Sk, 8, dtype=torch.float64)


def _keep(B, fn):
    """(b h i j) bool keep-mask from a plain Python predicate fn(b, i, j) (Sq = Sk: i is the
    query's absolute position)."""
    return torch.tensor([[[[fn(b, i, j) for j in range(Sk)] for i in range(Sq)]] for b in range(B)])


# ---- batch size of a mod's tensor against the call's B ------------------------------------


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: qkv.document_mask(torch.zeros(3, Sk, dtype=torch.long)), "document_mask(doc_ids)"),
        (lambda: qkv.key_padding_mask(torch.tensor([9, 2, 3])), "key_padding_mask(lengths)"),
        (lambda: qkv.key_padding_mask(torch.ones(3, Sk, dtype=torch.bool)), "key_padding_mask(keep)"),
        (lambda: qkv.prefix_lm_mask(torch.tensor([4, 5, 6])), "prefix_lm_mask(prefix_len)"),
    ],
    ids=["document", "lengths", "keep", "prefix"],
)  # fmt: skip
@pytest.mark.parametrize("backend", ["auto", "reference", "tiled", "fused", "sdpa"])
def test_a_mod_for_another_batch_size_is_refused_naming_both(make, words, backend):
    """B = 1 with a tensor for 3 batch rows: indexing by b read row 0 and ignored the rest."""
    q, k, v = _qkv(1)
    with pytest.raises(ValueError) as e:
        qkv.attention(q, k, v, mask_mod=make(), backend=backend)
    msg = str(e.value)
    assert f"mask_mod={words}" in msg and "batch of 3" in msg and "B=1" in msg, msg


def test_the_batch_check_sees_through_and_masks_or_masks():
    q, k, v = _qkv(2)
    pad = qkv.key_padding_mask(torch.tensor([9, 2, 3]))
    for combine in (qkv.and_masks, qkv.or_masks):
        with pytest.raises(ValueError, match=r"key_padding_mask\(lengths\).*batch of 3.*B=2"):
            qkv.attention(q, k, v, mask_mod=combine(qkv.causal_mask, combine(pad)))


def test_a_one_row_batch_tensor_is_refused_where_it_would_not_broadcast():
    """key_padding_mask/prefix_lm_mask index their tensor by b: one row for B=2 cannot serve."""
    q, k, v = _qkv(2)
    with pytest.raises(
        ValueError, match=r"batch of 1 but the call has B=2; its first dim must be 2$"
    ):
        qkv.attention(q, k, v, mask_mod=qkv.key_padding_mask(torch.tensor([4])))
    with pytest.raises(
        ValueError, match=r"prefix_lm_mask\(prefix_len\) has prefix_len for a batch of 1"
    ):
        qkv.attention(q, k, v, mask_mod=qkv.prefix_lm_mask(torch.tensor([4])))  # fmt: skip


def test_document_ids_of_one_row_serve_every_batch_row():
    """doc_ids (S,) and (1, S) are shared by the batch (the docstring); (B, S) is per row."""
    q, k, v = _qkv(2)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    per_row = torch.stack([ids, torch.arange(Sk) // 4])
    want = oracle(q, k, v, mask=_keep(2, lambda b, i, j: ids[i] == ids[j])).out
    for doc in (ids, ids[None]):
        assert err(qkv.attention(q, k, v, mask_mod=qkv.document_mask(doc)), want) < 1e-12
    want = oracle(q, k, v, mask=_keep(2, lambda b, i, j: per_row[b, i] == per_row[b, j])).out
    assert err(qkv.attention(q, k, v, mask_mod=qkv.document_mask(per_row)), want) < 1e-12
    with pytest.raises(ValueError, match=r"batch of 2 but the call has B=3; its first dim must "
                                         r"be 3, or 1 to share one row with every batch row"):  # fmt: skip
        qkv.attention(*_qkv(3), mask_mod=qkv.document_mask(per_row))


def test_per_row_lengths_and_prefixes_of_the_call_s_batch_work():
    q, k, v = _qkv(2)
    lengths = torch.tensor([3, 7])
    got = qkv.attention(q, k, v, mask_mod=qkv.key_padding_mask(lengths))
    assert err(got, oracle(q, k, v, mask=_keep(2, lambda b, i, j: j < lengths[b])).out) < 1e-12
    prefix = torch.tensor([2, 6])
    got = qkv.attention(q, k, v, mask_mod=qkv.prefix_lm_mask(prefix))
    want = oracle(q, k, v, mask=_keep(2, lambda b, i, j: j < prefix[b] or j <= i)).out
    assert err(got, want) < 1e-12


# ---- argument types of the ready mods -----------------------------------------------------


@pytest.mark.parametrize(
    "bad, words",
    [
        (64.5, ["prefix_len", "float 64.5"]),
        ("4", ["prefix_len", "str"]),
        (True, ["prefix_len", "bool"]),
        (torch.tensor([2.5, 3.0]), ["prefix_len", "torch.float32"]),
        (torch.tensor(4), ["prefix_len", "int(prefix_len)"]),
    ],
    ids=["float", "str", "bool", "float-tensor", "0-dim"],
)
def test_prefix_lm_mask_refuses_a_prefix_that_is_not_an_int(bad, words):
    with pytest.raises(TypeError) as e:
        qkv.prefix_lm_mask(bad)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_prefix_lm_mask_takes_a_numpy_int_as_an_int():
    q, k, v = _qkv(1)
    got = qkv.attention(q, k, v, mask_mod=qkv.prefix_lm_mask(np.int64(4)))
    assert err(got, oracle(q, k, v, mask=_keep(1, lambda b, i, j: j < 4 or j <= i)).out) < 1e-12


def test_document_and_padding_mods_refuse_a_list():
    with pytest.raises(TypeError, match=r"doc_ids must be a tensor .* got list"):
        qkv.document_mask([0, 0, 1])
    with pytest.raises(TypeError, match=r"key_padding_mask takes lengths .* got list"):
        qkv.key_padding_mask([3, 4])


# ---- a user mod's signature ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(mask_mod=lambda i, j: j <= i), r"mask_mod must take \(b, h, q_idx, kv_idx\), 4 "
                                             r"positional arguments, but it is <lambda>\(i, j\)$"),
        (dict(score_mod=lambda s, i, j: s), r"score_mod must take \(score, b, h, q_idx, kv_idx\), "
                                            r"5 positional arguments, but it is <lambda>\(s, i, j\)$"),
        (dict(score_mod=lambda b, h, i, j: j <= i), r"score_mod must take .*<lambda>\(b, h, i, j\), "
                                                    r"which takes mask_mod's arguments: a mod that "
                                                    r"says keep/drop is a mask_mod$"),
        (dict(mask_mod=lambda s, b, h, i, j: s), r"mask_mod must take .* which takes score_mod's "
                                                 r"arguments: a mod that rewrites the score is a score_mod$"),
        (dict(mask_mod=lambda b, h, i, j, *, scale: j <= i), r"mask_mod must take .*\*, scale\)$"),
    ],
    ids=["mask-2", "score-3", "score-as-mask", "mask-as-score", "required-keyword"],
)  # fmt: skip
@pytest.mark.parametrize("backend", ["auto", "reference", "tiled"])
def test_a_mod_with_the_wrong_arguments_is_named_with_its_contract(kw, needle, backend):
    """It was Python's bare "<lambda>() takes 2 positional arguments but 4 were given"."""
    q, k, v = _qkv(1)
    with pytest.raises(TypeError, match=needle):
        qkv.attention(q, k, v, backend=backend, **kw)
    with pytest.raises(TypeError, match=needle):  # the same function again: a cached answer
        qkv.attention(q, k, v, backend=backend, **kw)


class _Keep:
    def __call__(self, b, h, q_idx, kv_idx):
        return kv_idx <= q_idx


def _shift(shift, s, b, h, q_idx, kv_idx):
    return s - shift * (q_idx - kv_idx).abs()


@pytest.mark.parametrize(
    "kw, want",
    [
        (dict(mask_mod=_Keep()), dict(causal=True)),
        (dict(mask_mod=lambda *idx: idx[3] <= idx[2]), dict(causal=True)),
        (dict(mask_mod=lambda b, h, i, j, extra=0: j <= i + extra), dict(causal=True)),
        (dict(score_mod=functools.partial(_shift, 0.5)),
         dict(score_mod=lambda s, b, h, i, j: s - 0.5 * (i - j).abs())),
    ],
    ids=["callable-object", "star-args", "default-arg", "partial"],
)  # fmt: skip
def test_mods_of_every_fitting_signature_still_run(kw, want):
    q, k, v = _qkv(1)
    assert err(qkv.attention(q, k, v, **kw), oracle(q, k, v, **want).out) < 1e-12


@pytest.mark.parametrize("backend", ["auto", "reference", "tiled", "fused"])
def test_a_score_mod_returning_keep_drop_is_refused(backend):
    """A bool from a score_mod was cast to 0/1 scores: every key kept, weights skewed."""
    q, k, v = _qkv(1)
    with pytest.raises(TypeError, match=r"^score_mod must return a floating score tensor, got "
                                        r"torch\.bool; a mod that says keep/drop is a mask_mod$"):  # fmt: skip
        qkv.attention(q, k, v, score_mod=lambda s, b, h, i, j: j <= i, backend=backend)
    with pytest.raises(TypeError, match=r"floating score tensor, got torch\.int64$"):
        qkv.attention(q, k, v, score_mod=lambda s, b, h, i, j: i - j, backend=backend)
