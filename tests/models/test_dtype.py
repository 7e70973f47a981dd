"""`qkv.load(..., dtype=)`: a checkpoint read straight into bfloat16 / float16, against
transformers loaded in the same dtype.

Oracle: transformers in float64 (`float64_oracle_`: RoPE, RMSNorm and the softmax in float64
too). Criterion, flash-attn's for half precision (`tests/test_flash_attn.py`): our error against
that oracle is at most 2 × transformers' own error in the same dtype + HALF_TOL (relative to
the largest output). The routers transformers keeps in float32 (`_keep_in_fp32_modules_strict`)
are checked on their own: the same experts and weights as transformers' gate modules.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

import qkv
from qkv.nn import SparseMoE, as_dtype, cast

from .test_families import (
    ENCODERS,
    build,
    float64_oracle_,
    ids_for,
    keep_float64_softmax,
    out,
    rel,
    word_tokenizer,
)

HALF = (torch.bfloat16, torch.float16)
HALF_TOL = 1e-3  # flash-attn's "+ tol" above twice the peer's error (relative to max |out|)
# one of each kind: plain GQA + biases, QK-norm, softcaps and pre/post norms, partial rotary
# with a parallel residual, sliding windows with local/global RoPE, an encoder
PARITY = ("llama", "qwen3", "gemma2", "gpt_neox", "gemma3_text", "bert")


def test_as_dtype_reads_names_and_refuses_the_rest():
    assert as_dtype(None) == torch.float32
    for names, want in ((("bf16", "bfloat16", "torch.bfloat16", "BF16"), torch.bfloat16),
                        (("fp16", "float16", "half"), torch.float16),
                        (("fp32", "float32", "float"), torch.float32),
                        (("fp64", "float64", "double"), torch.float64)):  # fmt: skip
        for n in names:
            assert as_dtype(n) == want, n
        assert as_dtype(want) is want
    for bad in ("int8", torch.int8, "fp8", 16):
        with pytest.raises(ValueError, match=r"dtype must be one of 'float32', 'bfloat16'"):
            as_dtype(bad)
    with pytest.raises(ValueError, match="got 'int8'"):
        qkv.load("smollm2", dtype="int8")  # refused before anything is read


def test_cast_keeps_ties_integers_and_what_a_module_keeps_float32():
    emb = torch.nn.Embedding(5, 4)
    model = torch.nn.ModuleDict({"emb": emb, "moe": SparseMoE(4, 6, 4, 2, score_bias=True,
                                                              router_fp32=True)})  # fmt: skip
    model.head = torch.nn.Linear(4, 5, bias=False)
    model.head.weight = emb.weight  # tied
    model.register_buffer("steps", torch.arange(3))
    before = emb.weight.detach().clone()
    cast(model, "bf16")
    assert model.head.weight is model.emb.weight and emb.weight.dtype == torch.bfloat16
    assert torch.equal(emb.weight, before.to(torch.bfloat16))  # round to nearest, once
    assert model.steps.dtype == torch.int64
    moe = model.moe
    assert moe.router.weight.dtype == moe.score_bias.dtype == torch.float32
    assert moe.experts[0].up.weight.dtype == torch.bfloat16
    assert {n for n, p in model.named_parameters() if p.dtype == torch.float32} == {
        "moe.router.weight"
    }


@pytest.fixture(scope="module", params=PARITY)
def saved(request, tmp_path_factory):
    """(model_type, folder of a random float32 checkpoint with a word tokenizer)."""
    folder = tmp_path_factory.mktemp(request.param)
    build(request.param, folder)
    word_tokenizer().save(str(folder / "tokenizer.json"))
    return request.param, folder


def _reference(mt: str, folder, dtype: torch.dtype):
    auto = transformers.AutoModel if mt in ENCODERS else transformers.AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_is_as_exact_as_transformers(saved, dtype, monkeypatch):
    mt, folder = saved
    ids = torch.cat([ids_for(0), ids_for(1)])
    ours = qkv.load(folder, dtype=dtype)
    assert {p.dtype for p in ours.parameters()} == {dtype}
    with torch.no_grad():
        got, peer = out(ours, ids), out(_reference(mt, folder, dtype), ids)
        ref64 = _reference(mt, folder, torch.float64)
        float64_oracle_(ref64, qkv.load(folder, dtype=torch.float64))
        keep_float64_softmax(monkeypatch)
        want = out(ref64, ids)
    assert got.dtype == dtype
    ours_err, peer_err = rel(got, want), rel(peer, want)
    assert ours_err <= 2 * peer_err + HALF_TOL, f"{mt} {dtype}: {ours_err:.2e} vs {peer_err:.2e}"


def test_a_bfloat16_file_is_read_as_it_is(tmp_path):
    """A checkpoint saved in bfloat16 and loaded with dtype=bfloat16 holds the file's values
    exactly (no trip through float32 changes a bit); dtype=float32 widens them exactly."""
    ref = build("llama", tmp_path).to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    file = load_file(str(tmp_path / "model.safetensors"))
    assert file["model.embed_tokens.weight"].dtype == torch.bfloat16
    half, full = qkv.load(tmp_path, dtype="bfloat16"), qkv.load(tmp_path)
    for model, dtype in ((half, torch.bfloat16), (full, torch.float32)):
        emb, norm = model.embed.weight, model.blocks[1].norm2.weight
        assert emb.dtype == norm.dtype == dtype
        assert torch.equal(emb, file["model.embed_tokens.weight"].to(dtype))
        assert torch.equal(norm, file["model.layers.1.post_attention_layernorm.weight"].to(dtype))


def test_lens_rows_in_bfloat16_are_as_exact_as_transformers(tmp_path, monkeypatch):
    """The lens' rows of a bfloat16 model against transformers' `output_attentions` in float64,
    by the same criterion as the outputs (the max over every row of every head and layer): at
    most 2 × transformers' bfloat16 error + HALF_TOL."""
    build("llama", tmp_path)
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    model = qkv.load(tmp_path, dtype="bf16")
    text = "the dog chased the ball because it was excited and then ran far"
    ids = torch.tensor([model.tokenizer.encode(text).ids])
    query = 6  # "it"
    r = qkv.explain(text, query, model=model, top=0, rollout=False, progress=False)
    assert r.model.dtype == "bfloat16"
    with torch.no_grad():
        peer = _reference("llama", tmp_path, torch.bfloat16)(ids, output_attentions=True)
        ref64 = _reference("llama", tmp_path, torch.float64)
        float64_oracle_(ref64, qkv.load(tmp_path, dtype=torch.float64))
        keep_float64_softmax(monkeypatch)
        want = ref64(ids, output_attentions=True).attentions
    ours_err = peer_err = 0.0  # max over every layer, head and key, as flash-attn's max
    for layer in r.layers:
        for h in layer.heads:
            w64 = want[layer.layer][0, h.head, query].numpy()
            p16 = peer.attentions[layer.layer][0, h.head, query].double().numpy()
            got = dict(zip(h.index.tolist(), h.weight.tolist(), strict=True))
            assert set(got) == {j for j in range(len(w64)) if w64[j] > 0}, (layer.layer, h.head)
            ours_err = max(ours_err, *(abs(got[j] - w64[j]) for j in got))
            peer_err = max(peer_err, *(abs(p16[j] - w64[j]) for j in got))
    assert ours_err <= 2 * peer_err + HALF_TOL, (ours_err, peer_err)


def _fp32_router_families():
    """(name, build(folder)) of each family whose gate transformers keeps in float32."""
    from . import test_families_deepseek as ds
    from . import test_families_moe2 as moe2
    from . import test_families_moe3 as moe3

    return {
        "glm4_moe": lambda f: moe2.build("glm4_moe", f),
        "dots1": lambda f: moe2.build("dots1", f),
        "ernie4_5_moe": lambda f: moe3.build("ernie4_5_moe", f),
        "hunyuan_v1_moe": lambda f: moe3.build("hunyuan_v1_moe", f),
        "deepseek_v3": lambda f: ds.build(next(iter(ds.VARIANTS)), f),
        "deepseek_v2": lambda f: ds.build(next(iter(ds.V2_VARIANTS)), f),
    }


@pytest.mark.parametrize("mt", list(_fp32_router_families()))
def test_float32_routers_choose_as_transformers_in_bfloat16(mt, tmp_path):
    """A bfloat16 model of a family whose gate transformers keeps in float32: the router's
    weight (and score bias) stay float32 after `qkv.load(dtype=bfloat16)`, and on the same
    bfloat16 hidden states each sparse layer picks transformers' gate's experts, with its
    weights (float32: 1e-6; ERNIE rounds its weights to bfloat16: within bfloat16's step)."""
    _fp32_router_families()[mt](tmp_path)
    ours = qkv.load(tmp_path, dtype="bfloat16")
    peer = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, attn_implementation="eager",
        experts_implementation="eager",
    ).eval()  # fmt: skip
    sparse = [(i, b.mlp) for i, b in enumerate(ours.blocks) if isinstance(b.mlp, SparseMoE)]
    assert sparse, mt
    g = torch.Generator().manual_seed(0)
    for i, moe in sparse:
        assert moe.router_fp32 and moe.router.weight.dtype == torch.float32
        assert moe.score_bias is None or moe.score_bias.dtype == torch.float32
        assert moe.experts[0].up.weight.dtype == torch.bfloat16
        h = torch.randn(64, ours.config.d_model, generator=g).to(torch.bfloat16)
        with torch.no_grad():
            _, want_w, want_i = peer.model.layers[i].mlp.gate(h)
            got_w, got_i = moe.choose(h)
        order_w, order_g = want_i.argsort(-1), got_i.argsort(-1)
        assert torch.equal(want_i.gather(1, order_w), got_i.gather(1, order_g)), (mt, i)
        tol = 2.0**-8 if want_w.dtype == torch.bfloat16 else 1e-6  # ERNIE rounds to bfloat16
        want_w, got_w = want_w.gather(1, order_w).double(), got_w.gather(1, order_g).double()
        err = (got_w - want_w).abs().max()
        assert err <= tol * want_w.abs().max(), (mt, i, float(err))


@pytest.mark.parametrize("mt", list(_fp32_router_families()))
def test_float64_models_with_float32_routers_run_in_float64(mt, tmp_path):
    """`dtype=float64` casts every parameter, the routers transformers keeps float32 in half
    precision too (they crashed: a float64 input met a float32 gate). Oracle: transformers'
    float64 model, whose gate computes in float32: logits within 1e-5 of the largest."""
    _fp32_router_families()[mt](tmp_path)
    ours = qkv.load(tmp_path, dtype="float64")
    assert {p.dtype for p in ours.parameters()} == {torch.float64}
    peer = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float64, attn_implementation="eager",
        experts_implementation="eager",
    ).eval()  # fmt: skip
    ids = torch.randint(
        0, ours.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        got, want = ours(ids), peer(ids).logits
    assert got.dtype == torch.float64
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), mt


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_recording_never_changes_a_half_precision_forward(dtype, tmp_path):
    """In fp16/bf16 on CPU `qkv.attention` takes SDPA without the LSE and tiled with it, whose
    outs may differ in the last bit: a recorded forward keeps the unrecorded out. Logits with
    every layer recorded, one layer recorded and none are bitwise equal, and so are the lens'
    rows of layer 1 whether it is asked for alone or with every layer."""
    from qkv.nn import capture

    build("llama", tmp_path)
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    model = qkv.load(tmp_path, dtype=dtype)
    ids = torch.cat([ids_for(0), ids_for(1)])
    with torch.no_grad():
        plain = model(ids)
        with capture(model):
            every = model(ids)
        with capture(model, layers=[1]):
            one = model(ids)
    assert torch.equal(plain, every) and torch.equal(plain, one)
    text = "the dog chased the ball because it was excited and then ran far"
    alone, whole = (
        qkv.explain(text, 6, model=model, layer=layer, top=0, progress=False).layer(1)
        for layer in (1, None)
    )
    for a, b in zip(alone.heads, whole.heads, strict=True):
        assert a.head == b.head and a.index.tolist() == b.index.tolist()
        assert a.weight.tolist() == b.weight.tolist(), a.head


def test_a_half_precision_record_s_weights_are_the_softmax_of_its_scores(tmp_path):
    """The score column of a bfloat16 model is q·k × scale summed in float32 from its bfloat16
    q and k, as the engine sums it (not rounded to bfloat16): softmax(score) equals the weight
    column within float32's rounding, on every head of every layer."""
    build("llama", tmp_path)
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    model = qkv.load(tmp_path, dtype="bf16")
    text = "the dog chased the ball because it was excited and then ran far"
    r = qkv.explain(text, 6, model=model, top=0, progress=False)
    for layer in r.layers:
        for h in layer.heads:
            s = torch.tensor(h.score, dtype=torch.float64)
            err = (torch.softmax(s, 0) - torch.tensor(h.weight)).abs().max()
            assert err <= 2e-6, (layer.layer, h.head, float(err))
