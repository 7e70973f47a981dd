"""Whole-sequence rows from one kept capture: exact against transformers' `output_attentions`
on a tiny Llama and against a float64 softmax written here; top-k rows against the dense ones;
re-explaining without a second forward; the export file; errors."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

import qkv
import qkv.lens.export as export_mod
from qkv.lens import explain
from qkv.lens.export import capture_text, check_export_path, export_rows

from .conftest import SENTENCE, WordTokenizer

WEIGHT_TOL = 1e-5  # fp32 rows vs an independent fp32 / float64 computation, absolute
CONTRIB_RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """transformers' LlamaForCausalLM with random weights (GQA 4/2, RoPE), and the same
    checkpoint loaded by qkv from its safetensors folder, with a word tokenizer."""
    transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen the rows so that they are not near uniform
        for lay in hf.model.layers:
            lay.self_attn.q_proj.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(path, safe_serialization=True)
    ours = qkv.load(str(path))
    ours.tokenizer = WordTokenizer(128, specials=False, max_length=256)
    return ours, hf


def hf_rows(hf, ids):
    """transformers' eager rows (l h i j) and ‖v_j W_O^h‖ (l h j) from its own v_proj, o_proj."""
    values = []
    hooks = [
        lay.self_attn.v_proj.register_forward_hook(lambda m, a, out: values.append(out[0]))
        for lay in hf.model.layers
    ]
    try:
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    H, G = hf.config.num_attention_heads, hf.config.num_key_value_heads
    norms = []
    for v, lay in zip(values, hf.model.layers, strict=True):
        d = v.shape[1] // G
        vh = v.view(-1, G, d).transpose(0, 1).repeat_interleave(H // G, 0).double()  # (h j d)
        Wo = lay.self_attn.o_proj.weight.detach().T.reshape(H, d, -1).double()  # (h d m)
        norms.append(torch.einsum("hjd,hdm->hjm", vh, Wo).norm(dim=-1))  # (h j)
    w = torch.stack([a[0] for a in out.attentions]).double().numpy()  # (l h i j)
    return w, torch.stack(norms).numpy()


def test_rows_equal_transformers_output_attentions(tiny_llama):
    ours, hf = tiny_llama
    cap = capture_text(SENTENCE, model=ours, progress=False)
    r = cap.rows()
    want_w, vnorm = hf_rows(hf, ours.tokenizer.encode(SENTENCE).ids)
    assert r.weight.shape == want_w.shape == (2, 4, len(cap.tokens), len(cap.tokens))
    assert want_w.max() > 0.5  # sharp rows: a wrong row would show
    np.testing.assert_allclose(r.weight, want_w, atol=WEIGHT_TOL, rtol=0)
    np.testing.assert_allclose(
        r.contribution, want_w * vnorm[:, :, None, :], rtol=CONTRIB_RTOL, atol=1e-6
    )
    assert r.to_numpy() is r.weight


def softmax64(rec):
    """softmax(q kᵀ/√d) in float64 from the captured q, k (after RoPE), GQA by repeat, masked
    by hand when causal: (h i j). Shares no code with qkv.attention_weights."""
    q, k = rec.q[0].double(), rec.k[0].double()  # (h i d), (g j d)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)  # (h j d)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (h i j)
    if rec.attn_kwargs.get("causal"):
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1).numpy()


@pytest.mark.parametrize("which", ["tiny_causal", "tiny_bidir"])
def test_rows_equal_a_float64_softmax(which, request):
    cap = capture_text(SENTENCE, model=request.getfixturevalue(which), progress=False)
    queries, layers = [0, 4, -1], [2, 0]
    r = cap.rows(queries, layers)
    assert r.queries.tolist() == [0, 4, len(cap.tokens) - 1] and r.layers.tolist() == [2, 0]
    for a, lay in enumerate(layers):
        want = softmax64(cap.records[lay])[:, r.queries]  # (h i j)
        np.testing.assert_allclose(r.weight[a], want, atol=WEIGHT_TOL, rtol=0)


def test_top_rows_are_the_top_k_of_the_dense_rows(tiny_causal):
    cap = capture_text(SENTENCE, model=tiny_causal, progress=False)
    dense, k = cap.rows(), 4
    t = cap.top_rows(k)
    assert t.index.shape == (*dense.weight.shape[:3], k)
    got = np.take_along_axis(dense.weight, t.index.astype(np.int64), -1)
    np.testing.assert_array_equal(t.weight, got)  # the index points at the weight it holds
    want = -np.sort(-dense.weight, axis=-1)[..., :k]
    np.testing.assert_allclose(t.weight, want, atol=1e-7, rtol=0)  # and those are the top k
    got_c = np.take_along_axis(dense.contribution, t.index.astype(np.int64), -1)
    np.testing.assert_allclose(t.contribution, got_c, rtol=1e-6, atol=1e-8)
    assert (t.weight[..., 0, 1:] == 0).all()  # query 0 of a causal model sees one key only


def test_the_top_k_check_can_fail(tiny_causal):
    cap = capture_text(SENTENCE, model=tiny_causal, progress=False)
    t, dense = cap.top_rows(3), cap.rows()
    wrong = -np.sort(-dense.weight, axis=-1)[..., 1:4]  # off by one rank
    assert not np.allclose(t.weight, wrong, atol=1e-7)


@pytest.mark.parametrize("which", ["tiny_causal", "tiny_bidir"])
def test_explain_from_the_capture_runs_no_forward_and_equals_a_fresh_explain(which, request):
    model = request.getfixturevalue(which)
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        cap = capture_text(SENTENCE, model=model, progress=False)
        assert len(calls) == 1
        got = [cap.explain(t, top=3, key="dog") for t in ("it", "excited", "ball")]
        cap.rows()
        cap.top_rows(2)
        assert len(calls) == 1  # no second forward
        fresh = [explain(SENTENCE, t, model=model, top=3, key="dog") for t in ("it", "excited")]
        assert len(calls) == 3  # the counter does count forwards
    finally:
        hook.remove()
    for a, b in zip(got, fresh, strict=False):
        assert a.query == b.query and a.key == b.key and a.notes == b.notes
        assert len(a.layers) == len(b.layers) == model.config.n_layers
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert (la.top_weight, la.top_contribution) == (lb.top_weight, lb.top_contribution)
            for ha, hb in zip(la.heads, lb.heads, strict=True):
                np.testing.assert_array_equal(ha.index, hb.index)
                assert (ha.n_keys, ha.top_weight) == (hb.n_keys, hb.top_weight)
        for field in ("weight", "contribution", "score"):
            np.testing.assert_allclose(
                a.to_numpy(field), b.to_numpy(field), rtol=1e-5, atol=1e-6, equal_nan=True
            )
    assert got[0].query.index != got[1].query.index  # two different tokens were explained


def test_explain_from_the_capture_takes_layer_and_head(tiny_causal):
    cap = capture_text(SENTENCE, model=tiny_causal, progress=False)
    r = cap.explain("it", layer=-1, head=1)
    assert [lay.layer for lay in r.layers] == [2] and [h.head for h in r.layers[0].heads] == [1]
    with pytest.raises(IndexError, match="layer"):
        cap.explain("it", layer=3)
    with pytest.raises(ValueError, match="is not in the text"):
        cap.explain("cat")


def test_to_numpy_is_nan_where_the_record_holds_no_number(tiny_bidir):
    r = explain(SENTENCE, "it", model=tiny_bidir, top=2)
    w = r.to_numpy()
    assert w.shape == (3, 4, len(r.tokens))
    h = r.layers[1].heads[2]
    np.testing.assert_array_equal(w[1, 2, h.index], h.weight)
    assert np.isnan(w[1, 2]).sum() == len(r.tokens) - len(h.index) > 0
    full = explain(SENTENCE, "it", model=tiny_bidir, top=0).to_numpy()
    assert not np.isnan(full).any()
    np.testing.assert_allclose(full.sum(-1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="field must be"):
        r.to_numpy("weights")


def test_to_pandas_without_pandas_says_how_to_install_it(tiny_causal, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    r = explain(SENTENCE, "it", model=tiny_causal, top=2)
    with pytest.raises(ImportError, match="pip install pandas"):
        r.to_pandas()
    with pytest.raises(ImportError, match="pip install pandas"):
        capture_text(SENTENCE, model=tiny_causal, progress=False).rows([0]).to_pandas()


def test_to_pandas_holds_the_kept_keys(tiny_causal):
    r = explain(SENTENCE, "it", model=tiny_causal, top=2)
    df = r.to_pandas()
    assert len(df) == sum(len(h.index) for lay in r.layers for h in lay.heads)
    h = r.layers[0].heads[0]
    sub = df[(df["layer"] == 0) & (df["head"] == 0)]  # df.head is the method
    np.testing.assert_array_equal(sub.weight.to_numpy(), h.weight)


def test_export_writes_dense_rows_for_a_short_text(tiny_causal, tmp_path):
    cap = capture_text(SENTENCE, model=tiny_causal, progress=False)
    rows, path = export_rows(cap, tmp_path / "rows.npz")
    z = np.load(path)
    assert str(z["schema"]) == "qkv.export/2" and str(z["text"]) == SENTENCE
    assert z["tokens"].tolist() == [t.text for t in cap.tokens]
    assert "index" not in z.files
    np.testing.assert_array_equal(z["weight"], cap.rows().weight)
    assert "contribution" not in z.files  # dense: weight · value_norm, the factors stored
    np.testing.assert_array_equal(z["weight"] * z["value_norm"][:, :, None, :], rows.contribution)
    np.testing.assert_array_equal(rows.contribution, cap.rows().contribution)
    assert z["weight"].shape == (3, 4, len(cap.tokens), len(cap.tokens))


def test_export_writes_top_k_rows_above_the_threshold(tiny_causal, tmp_path, monkeypatch):
    cap = capture_text(SENTENCE, model=tiny_causal, progress=False)
    monkeypatch.setattr(export_mod, "DENSE_MAX_TOKENS", len(cap.tokens) - 1)
    monkeypatch.setattr(export_mod, "SPARSE_TOP", 3)
    _, path = export_rows(cap, tmp_path / "rows.npz")
    z = np.load(path)
    assert z["index"].shape == (3, 4, len(cap.tokens), 3)
    t = cap.top_rows(3)
    np.testing.assert_array_equal(z["index"], t.index)
    np.testing.assert_array_equal(z["weight"], t.weight)
    _, path = export_rows(cap, tmp_path / "dense.npz", top=0)  # 0: dense, whatever the length
    assert np.load(path)["weight"].shape[-1] == len(cap.tokens)


def test_export_path_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"\.npz or \.parquet"):
        check_export_path(tmp_path / "rows.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_export_path(tmp_path / "no" / "rows.npz")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        check_export_path(tmp_path / "rows.parquet")


def test_bad_queries_layers_and_text(tiny_causal):
    cap = capture_text(SENTENCE, model=tiny_causal, progress=False)
    n = len(cap.tokens)
    with pytest.raises(IndexError, match=str(n)):
        cap.rows([n])
    with pytest.raises(IndexError, match="layer"):
        cap.rows(layers=[5])
    with pytest.raises(ValueError, match="at least one"):
        cap.rows([])
    with pytest.raises(ValueError, match="top must be"):
        cap.top_rows(0)
    with pytest.raises(ValueError, match="empty"):
        capture_text("  ", model=tiny_causal)
    with pytest.raises(TypeError, match="str"):
        capture_text(b"bytes", model=tiny_causal)


@pytest.mark.parametrize("top", [0, 3])
def test_parquet_holds_the_same_rows_as_the_arrays(tiny_causal, tmp_path, top):
    """The .parquet long form: one row per kept (layer, head, query, key), equal to the dense
    rows where the weight is > 0 (top=0) or to the top-k rows (top=3)."""
    import pyarrow.parquet as pq

    cap = capture_text(SENTENCE, model=tiny_causal, progress=False)
    rows, path = export_rows(cap, tmp_path / "rows.parquet", top=top)
    t = pq.read_table(path).to_pydict()
    got = {
        (l, h, i, j): (w, c)
        for l, h, i, j, w, c in zip(
            t["layer"], t["head"], t["query"], t["key"], t["weight"], t["contribution"],
            strict=True,
        )
    }  # fmt: skip
    want = {}
    dense = cap.rows()
    for li, l in enumerate(dense.layers):
        for h in range(dense.weight.shape[1]):
            for qi, i in enumerate(dense.queries):
                keys = (
                    np.nonzero(dense.weight[li, h, qi] > 0)[0]
                    if top == 0
                    else rows.index[li, h, qi]
                )
                for j in keys:
                    want[(int(l), h, int(i), int(j))] = (
                        dense.weight[li, h, qi, j],
                        dense.contribution[li, h, qi, j],
                    )
    assert got.keys() == want.keys()
    for key, (w, c) in want.items():
        assert got[key] == pytest.approx((w, c), rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("which", ["tiny_causal", "tiny_bidir"])
def test_the_batched_rows_equal_attention_weights_rows(which, request):
    """rows() takes the one-matmul-per-layer path for a plain record (causal or not, GQA): its
    rows equal `qkv.attention_weights`' (lookup.rows) for any query list, and a record with a
    window goes the general way."""
    from qkv.lens.lookup import rows as lookup_rows

    cap = capture_text(SENTENCE, model=request.getfixturevalue(which), progress=False)
    idx = [len(cap.tokens) - 1, 0, 3, 2]
    for rec in cap.records:
        plain = export_mod._plain(rec)
        assert plain is not None and plain[1] == (which == "tiny_causal")
        got = export_mod._plain_rows(rec, idx, *plain)
        want = lookup_rows(rec, idx).float()
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6, rtol=0)
        if plain[1]:
            assert (got[:, 2, 4:] == 0).all() and (got[:, 1, 1:] == 0).all()  # queries 3, 0
    rec = cap.records[0]
    saved = rec.attn_kwargs
    try:
        rec.attn_kwargs = {**saved, "window": (2, 0)}
        assert export_mod._plain(rec) is None
    finally:
        rec.attn_kwargs = saved


@pytest.mark.parametrize("chunk", [None, 1], ids=["a layer at once", "a query at a time"])
def test_streamed_export_equals_transformers_output_attentions(
    tiny_llama, tmp_path, monkeypatch, chunk
):
    """The dense .npz is written a layer at a time (two buffers, a writer thread): the file's
    rows equal transformers' eager rows, also when each layer is computed in chunks of
    queries, and the returned rows are read-only maps of that very file."""
    ours, hf = tiny_llama
    if chunk is not None:
        monkeypatch.setattr(export_mod, "_CHUNK", chunk)
    cap = capture_text(SENTENCE, model=ours, progress=False)
    rows, path = export_rows(cap, tmp_path / "rows.npz", top=0)
    want_w, vnorm = hf_rows(hf, ours.tokenizer.encode(SENTENCE).ids)
    z = np.load(path)
    zc = z["weight"] * z["value_norm"][:, :, None, :]
    for got in (
        {"weight": z["weight"], "contribution": zc},
        {"weight": rows.weight, "contribution": rows.contribution},
    ):
        np.testing.assert_allclose(got["weight"], want_w, atol=WEIGHT_TOL, rtol=0)
        np.testing.assert_allclose(
            got["contribution"], want_w * vnorm[:, :, None, :], rtol=CONTRIB_RTOL, atol=1e-6
        )
    assert isinstance(rows.weight, np.memmap) and not rows.weight.flags.writeable
    assert z["layers"].tolist() == [0, 1] and z["queries"].tolist() == list(range(len(cap.tokens)))


def test_a_failed_streamed_export_leaves_nothing(tiny_causal, tmp_path, monkeypatch):
    """An error in the writer thread reaches the caller, and neither the file nor a temp file
    is left (an earlier file at that path is kept)."""
    from qkv.lens import npz

    cap = capture_text(SENTENCE, model=tiny_causal, progress=False)
    (tmp_path / "rows.npz").write_bytes(b"earlier")

    def broken(self, key, buf):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(npz.NpzWriter, "write", broken)
    with pytest.raises(ValueError, match="No space left"):
        export_rows(cap, tmp_path / "rows.npz", top=0)
    assert [p.name for p in tmp_path.iterdir()] == ["rows.npz"]
    assert (tmp_path / "rows.npz").read_bytes() == b"earlier"


@pytest.mark.parametrize("top", [0, 3])
def test_export_text_writes_while_the_model_runs_the_same_file(tiny_llama, tmp_path, top):
    """export_text = export_rows(capture_text(...)): the same arrays (dense: computed in the
    forward's layer hooks, no capture kept; top-k: captured first), and the dense rows equal
    transformers' output_attentions."""
    from qkv.lens.export import export_text

    ours, hf = tiny_llama
    rows, path = export_text(SENTENCE, tmp_path / "a.npz", model=ours, top=top, progress=False)
    cap = capture_text(SENTENCE, model=ours, progress=False)
    _, want_path = export_rows(cap, tmp_path / "b.npz", top=top)
    got, want = np.load(path), np.load(want_path)
    assert got.files == want.files
    for name in want.files:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    if top == 0:
        want_w, _ = hf_rows(hf, ours.tokenizer.encode(SENTENCE).ids)
        np.testing.assert_allclose(rows.weight, want_w, atol=WEIGHT_TOL, rtol=0)
        assert isinstance(rows.weight, np.memmap)


def test_a_failed_export_text_leaves_nothing(tiny_causal, tmp_path, monkeypatch):
    """A model that fails mid-forward: the error is the model's, no file and no temp file."""
    from qkv.lens.export import export_text

    def boom(*a, **k):
        raise RuntimeError("layer 1 exploded")

    monkeypatch.setattr(tiny_causal.blocks[1], "forward", boom)
    with pytest.raises(RuntimeError, match="layer 1 exploded"):
        export_text(SENTENCE, tmp_path / "rows.npz", model=tiny_causal, top=0, progress=False)
    assert list(tmp_path.iterdir()) == []
