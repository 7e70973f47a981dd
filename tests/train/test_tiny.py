"""The tiny transformer: config validation, tokenizer, tied projections, KV cache, and the
checkpoint format (round trip through qkv.load, mismatch errors, atomic writes)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import torch

import qkv
from qkv.models import tiny
from qkv.models.tiny import (
    PROJECTIONS,
    TinyConfig,
    TinyTransformer,
    load_checkpoint,
    save_checkpoint,
)
from qkv.nn import KVCache, MultiHeadAttention, capture

VOCAB = ("_", "?", *(f"k{i}" for i in range(6)), *(f"v{i}" for i in range(6)))


def make(projections="separate", seed=0, **kw) -> TinyTransformer:
    torch.manual_seed(seed)
    kw = {"vocab": VOCAB, "max_positions": 16, "d_model": 32, **kw}
    return TinyTransformer(TinyConfig(projections=projections, **kw)).eval()


def ids(b=3, s=12, seed=1):
    return torch.randint(len(VOCAB), (b, s), generator=torch.Generator().manual_seed(seed))


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"d_model": 0}, "d_model must be positive"),
        ({"n_layers": -1}, "n_layers must be positive"),
        ({"d_model": 30, "n_heads": 4}, "not divisible by n_heads=4"),
        ({"n_heads": 4, "n_kv_heads": 3}, "multiple of n_kv_heads"),
        ({"projections": "tied"}, "projections must be one of"),
        ({"projections": "tied_qk", "n_heads": 4, "n_kv_heads": 2}, "n_kv_heads == n_heads"),
        ({"projections": "no_v", "d_head": 8}, "n_kv_heads·d_head == d_model"),
        ({"positions": "sinusoidal"}, "positions must be one of"),
        ({"positions": "rope", "d_head": 7}, "even d_head"),
        ({"vocab": ("a", "a")}, "duplicate"),
        ({"vocab": ("a b",)}, "without spaces"),
        ({"vocab": ()}, "non-empty"),
        ({"d_mlp": -1}, "d_mlp"),
    ],
)
def test_config_errors(kw, match):
    args = {"vocab": VOCAB, "max_positions": 16, **kw}
    with pytest.raises(ValueError, match=match):
        TinyConfig(**args)


def test_config_contract_fields():
    cfg = TinyConfig(vocab=list(VOCAB), max_positions=16, d_model=32, n_heads=4)
    assert cfg.vocab == VOCAB and (cfg.n_kv_heads, cfg.d_head) == (4, 8)
    for f in (
        "name",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "d_model",
        "d_head",
        "max_positions",
        "causal",
    ):
        assert hasattr(cfg, f)
    assert TinyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 3


# --- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_offsets():
    tok = make().tokenizer
    text = "k3 v2  k1\tv0 ? k3"
    enc = tok.encode(text)
    assert enc.tokens == ["k3", "v2", "k1", "v0", "?", "k3"]
    assert [text[s:e] for s, e in enc.offsets] == enc.tokens
    assert enc.ids == [VOCAB.index(t) for t in enc.tokens]
    assert tok.decode(enc.ids) == "k3 v2 k1 v0 ? k3"
    with pytest.raises(ValueError, match=r"unknown token 'k9' at characters 3..5"):
        tok.encode("k1 k9")
    with pytest.raises(ValueError, match=r"empty text"):
        tok.encode("   ")
    with pytest.raises(ValueError, match=r"out of range"):
        tok.decode([99])


# --- projections ----------------------------------------------------------------------------


def test_tied_projections_share_one_tensor():
    m = make("tied_qkv", bias=True)
    a = m.blocks[0].attn
    assert a.W_K is a.W_Q and a.W_V is a.W_Q and a.b_K is a.b_Q and a.b_V is a.b_Q
    m2 = make("tied_qk")
    a2 = m2.blocks[1].attn
    assert a2.W_K is a2.W_Q and a2.W_V is not a2.W_Q
    # the shared parameter is optimised once and its gradient sums both uses
    m2.train()
    m2(ids()).square().mean().backward()
    assert a2.W_Q.grad is not None and a2.W_Q.grad.abs().sum() > 0
    n = {id(p) for p in m2.parameters()}
    assert len(n) == len(list(m2.parameters()))
    assert tiny.n_parameters(m2) == tiny.n_parameters(make()) - 2 * a2.W_Q.numel()


def test_tied_qk_scores_are_symmetric():
    """With W_Q = W_K (and no RoPE), q_i·k_j = x_i W Wᵀ x_j: the score matrix is symmetric."""
    m = make("tied_qk", n_layers=1, causal=False)
    with torch.no_grad(), capture(m) as cap:
        m(ids(1, 10))
    rec = cap.layers[0]
    s = rec.q @ rec.k.transpose(-1, -2)  # (b h i j)
    torch.testing.assert_close(s, s.transpose(-1, -2))


def test_no_v_passes_the_input_through():
    """V = X: head h's values are features h·d .. (h+1)·d − 1 of the attention input."""
    m = make("no_v", n_heads=4)
    a = m.blocks[0].attn
    assert not any(n.endswith("W_V") for n, _ in m.named_parameters())
    x = torch.randn(2, 7, 32)
    with torch.no_grad(), capture(a) as cap:
        a(x)
    v = cap.layers[0].v  # (b h j d)
    torch.testing.assert_close(v, x.view(2, 7, 4, 8).transpose(1, 2))


@pytest.mark.parametrize("projections", PROJECTIONS)
def test_every_layer_is_a_qkv_nn_attention(projections):
    m = make(projections)
    assert sum(isinstance(x, MultiHeadAttention) for x in m.modules()) == m.config.n_layers


# --- forward, cache, masks ------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_cached_decoding_equals_full_forward(positions):
    m = make(positions=positions, d_mlp=16)
    x = ids(2, 12)
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.config.n_layers)
        parts = [m(x[:, :5], cache=cache)] + [m(x[:, i : i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_causal_and_padding_mask():
    m = make()
    x = ids(1, 10)
    with torch.no_grad():
        a = m(x)
        y = x.clone()
        y[0, 7:] = (y[0, 7:] + 1) % len(VOCAB)
        b = m(y)  # later tokens never change earlier logits
        keep = torch.ones(1, 10, dtype=torch.bool)
        keep[0, 2] = False
        c = m(x, attention_mask=keep)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 3:], c[:, 3:])
    torch.testing.assert_close(a[:, :2], c[:, :2])


def test_forward_errors():
    m = make()
    with pytest.raises(ValueError, match=r"max_positions=16"):
        m(ids(1, 17))
    with pytest.raises(ValueError, match=r"token ids must lie in 0..13"):
        m(torch.tensor([[0, 14]]))
    with pytest.raises(TypeError, match=r"torch.long"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"attention_mask"):
        m(ids(1, 4), attention_mask=torch.ones(1, 5, dtype=torch.bool))


def test_generate_greedy_matches_argmax():
    m = make()
    text = "k1 v2 k3 v4 ? k1"
    with torch.no_grad():
        logits = m(torch.tensor([m.tokenizer.encode(text).ids]))
    assert next(iter(m.generate(text))) == VOCAB[int(logits[0, -1].argmax())]


# --- checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("projections", PROJECTIONS)
def test_checkpoint_round_trip_via_qkv_load(tmp_path, projections):
    m = make(projections, bias=True, d_mlp=8)
    with torch.no_grad():  # move biases off their zero init so they are really checked
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(m, tmp_path / "ck", extra={"step": 7, "task": {"name": "recall"}})
    back = qkv.load(tmp_path / "ck")
    assert isinstance(back, TinyTransformer) and not back.training
    assert back.config == m.config and back.meta == {"step": 7, "task": {"name": "recall"}}
    x = ids()
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    assert qkv.load(str(tmp_path / "ck")).config == m.config
    a = back.blocks[0].attn
    if projections.startswith("tied"):
        assert a.W_K is a.W_Q  # tying survives the round trip
    names = set(tiny.checkpoint_tensors(m))
    assert ("blocks.0.attn.W_K" in names) == (projections in ("separate", "no_v"))
    assert ("blocks.0.attn.W_V" in names) == (projections in ("separate", "tied_qk"))


def test_checkpoint_config_tensor_mismatch(tmp_path):
    save_checkpoint(make(), tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    doc["config"]["d_model"] = 64
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(
        ValueError,
        match=r"disagree: shape mismatch embed\.weight: file \(14, 32\), config implies \(14, 64\);.* and 14 more",
    ):
        load_checkpoint(tmp_path)
    doc["config"]["d_model"], doc["config"]["n_layers"] = 32, 3
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"missing tensors \['blocks\.2\."):
        load_checkpoint(tmp_path)
    doc["config"]["n_layers"], doc["config"]["projections"] = 2, "tied_qk"
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"unexpected tensors \['blocks\.0\.attn\.W_K'"):
        load_checkpoint(tmp_path)


def test_checkpoint_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.json is missing"):
        load_checkpoint(tmp_path)
    save_checkpoint(make(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"not valid JSON"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match=r"expected format 'qkv.tiny/1'"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"format": "qkv.tiny/1", "config": {"vocab": ["a"], "max_positions": 4, "colour": 1}}
        )
    )
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        load_checkpoint(tmp_path)


def test_unwritable_checkpoint_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"cannot write a checkpoint to .*file/ck"):
        save_checkpoint(make(), tmp_path / "file" / "ck")


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    old = make(seed=0)
    save_checkpoint(old, tmp_path)
    real = tiny.save_safetensors

    def half_then_ctrl_c(tensors, path, metadata=None):
        real(tensors, path, metadata)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "save_safetensors", half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(make(seed=1, n_layers=3), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    back = load_checkpoint(tmp_path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(back(x), old(x))


def test_ctrl_c_between_the_renames_is_held_back():
    # Python's own handler, even when this run was started with SIGINT ignored (nohup, `&`)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with tiny._hold_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("both renames ran")
        assert done == ["both renames ran"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, old)


def test_ignored_ctrl_c_stays_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job
    try:
        with tiny._hold_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)
