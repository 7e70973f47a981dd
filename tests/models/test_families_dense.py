"""The families of `families_dense.py` (GPT-J, StableLM, Cohere, Falcon) against transformers,
as tests/models/test_families.py does for the others: a tiny random checkpoint per family
(AutoConfig.for_model → from_config → save_pretrained), loaded with `qkv.load(folder)`, compared
in float32 and float64, through the lens (rows vs `output_attentions=True`), on a right-padded
batch, and on 20 greedy tokens with and without the KV cache. Then each family's peculiarity,
switched off or done another way, breaks parity; other config spellings give the same model;
what a family cannot honour is a named error.

Sizes as test_families': d_model 60, 6 query heads (over 2 kv heads where the family has GQA),
d_head 10, d_ff 37, vocabulary 97; partial rotary on 4 of 10 features; Falcon in its three
query_key_value layouts (2 kv heads, multi-query, one kv head per query head).
"""

import functools

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.nn import ParallelBlock, PerHeadNorm, PreNormBlock
from tests.models.parity import (  # noqa: F401  (collected here, with this file's `pair`)
    test_greedy_tokens_with_and_without_the_cache,
    test_lens_rows_match_output_attentions,
    test_padded_batch_matches_transformers,
)
from tests.models.test_families import _DEC as DECODER
from tests.models.test_families import (
    REL_TOL,
    V,
    float64_oracle_,
    ids_for,
    output_error,
    randomise_,
    rel,
    word_tokenizer,
)
from tests.models.test_families_more import _breaks, _each_block, _edit_config, _error

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

TOL = REL_TOL[torch.float32]
_DEC = dict(DECODER, bos_token_id=0, eos_token_id=0)  # test_families' tiny decoder
_FALCON = dict(hidden_size=60, num_attention_heads=6, num_hidden_layers=2, ffn_hidden_size=37,
               vocab_size=V, max_position_embeddings=64, rope_theta=100.0, bos_token_id=0,
               eos_token_id=0)  # fmt: skip
DENSE = {
    # interleaved RoPE on 4 of 10 features, one LayerNorm for attention and MLP in parallel,
    # no attention biases, gelu_new MLP with biases, lm_head bias
    "gptj": dict(
        n_embd=60,
        n_head=6,
        n_layer=2,
        n_inner=37,
        vocab_size=V,
        n_positions=64,
        rotary_dim=4,
        bos_token_id=0,
        eos_token_id=0,
    ),
    # half-split RoPE on 4 of 10 features, LayerNorm with bias, q/k/v biases, a LayerNorm
    # without bias on each head's q and k (each head its own gain), sequential residual
    "stablelm": dict(_DEC, partial_rotary_factor=0.4, use_qkv_bias=True, qk_layernorm=True),
    # the same with one LayerNorm feeding attention and MLP in parallel, no QK-norm
    "stablelm_parallel": dict(_DEC, partial_rotary_factor=0.4, use_parallel_residual=True),
    # LayerNorm without bias, parallel block, interleaved RoPE (base 100), q/k/v/o biases,
    # logits × 0.5, per-head LayerNorm QK-norm with each head's own gain, untied head
    "cohere": dict(
        _DEC,
        rope_theta=100.0,
        attention_bias=True,
        logit_scale=0.5,
        use_qk_norm=True,
        tie_word_embeddings=False,
        pad_token_id=0,
    ),
    # new_decoder_architecture: query_key_value grouped per kv head (2 kv heads of 3 query
    # heads each), two LayerNorms (ln_attn, ln_mlp) in parallel, biases, half-split RoPE
    "falcon": dict(_FALCON, new_decoder_architecture=True, num_kv_heads=2, bias=True),
    # multi-query (one kv head), one LayerNorm feeding attention and MLP in parallel
    "falcon_mq": dict(_FALCON, multi_query=True),
    # one kv head per query head, sequential residual, biases, untied head
    "falcon_seq": dict(
        _FALCON, multi_query=False, parallel_attn=False, bias=True, tie_word_embeddings=False
    ),
}


def build(name: str, folder, *, changes: dict | None = None):
    """A random checkpoint of DENSE[name] (model_type: the name before "_"), updated by
    `changes`, saved in `folder` with a word tokenizer; returns the transformers model."""
    kw = {k: v for k, v in {**DENSE[name], **(changes or {})}.items() if v is not None}
    cfg = transformers.AutoConfig.for_model(name.split("_")[0], **kw)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomise_(m)
    m.save_pretrained(folder)
    word_tokenizer().save(str(folder / "tokenizer.json"))
    return m


# the parity matrix below: each family once, plus multi-query Falcon (one kv head, in the
# cache too); the other variants' parity is checked where their peculiarity is
PARITY = ("gptj", "stablelm", "cohere", "falcon", "falcon_mq")


@pytest.fixture(scope="module", params=PARITY)
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, folder)
    return request.param, ref, qkv.load(folder)


# --------------------------------------------------------------------------------------------
# a float64 oracle: transformers' float32 islands (RoPE tables, GPT-J's scores, Cohere's
# LayerNorm and rotation) done in float64, by formulas written here


def _angles(position_ids, r: int, base: float):
    """position · base^(−2p/r) (b i r/2), float64."""
    inv = 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    return position_ids[..., None].double() * inv


def _eager64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(q·kᵀ·scaling + mask) v without GPT-J's float32 casts (it has no GQA)."""
    s = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        s = s + attention_mask
    w = torch.softmax(s, dim=-1)
    return torch.matmul(w, value).transpose(1, 2).contiguous(), w


def _cohere_rotate64(q, k, cos, sin, unsqueeze_dim=1):
    """Cohere's interleaved rotation, (a, b) → (a·cos − b·sin, b·cos + a·sin) per pair
    (2p, 2p+1), in q's dtype (transformers casts q and k to float32)."""

    def rot(x):
        a, b = x[..., ::2], x[..., 1::2]
        return torch.stack((-b, a), -1).flatten(-2)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def dense_float64_oracle_(name: str, ref, model, monkeypatch) -> None:
    c = model.config
    if name.startswith(("stablelm", "falcon")):  # half-split RoPE: test_families' oracle fits
        float64_oracle_(ref, model)
        return
    r = c.rope_dim or c.d_head
    if name == "gptj":
        from transformers.models.gptj import modeling_gptj

        monkeypatch.setattr(modeling_gptj, "eager_attention_forward", _eager64)
        for mod in ref.modules():
            if type(mod).__name__ == "GPTJRotaryEmbedding":  # (sin, cos) per pair (b i r/2)
                mod.forward = lambda x, position_ids: (
                    _angles(position_ids, r, 1e4).sin(),
                    _angles(position_ids, r, 1e4).cos(),
                )
        return
    from transformers.models.cohere import modeling_cohere

    monkeypatch.setattr(modeling_cohere, "apply_rotary_pos_emb", _cohere_rotate64)
    for mod in ref.modules():
        if type(mod).__name__ == "CohereRotaryEmbedding":  # each angle on both of its features
            mod.forward = lambda x, position_ids: (
                _angles(position_ids, r, c.rope_base).repeat_interleave(2, -1).cos(),
                _angles(position_ids, r, c.rope_base).repeat_interleave(2, -1).sin(),
            )
        if type(mod).__name__ == "CohereLayerNorm":  # (h − mean) / √(var + eps) · w
            mod.forward = lambda h, m=mod: m.weight * (
                (h - h.mean(-1, keepdim=True))
                * torch.rsqrt((h - h.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True)
                              + m.variance_epsilon)
            )  # fmt: skip


# --------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_match_transformers(pair, dtype, monkeypatch):
    name, ref, model = pair
    ids = torch.cat([ids_for(0), ids_for(1)])  # a batch of two
    oracle_ = functools.partial(dense_float64_oracle_, name, monkeypatch=monkeypatch)
    err = output_error(ref, model, ids, dtype, monkeypatch, oracle_)
    assert err <= REL_TOL[dtype], f"{name} {dtype}: relative error {err:.2e}"


# --------------------------------------------------------------------------------------------
# each peculiarity matters


def _half_split(m):
    rope = m.blocks[0].attn.rope  # shared by every layer
    rope.interleaved, rope._pairs = False, None
    rope._tables.clear()


def _rotate_all(m):
    rope = m.blocks[0].attn.rope
    rope.rotary_dim, rope._pairs = rope.d_head, None
    rope._tables.clear()


def _sequential(b):  # mlp reads x + attn(norm1(x)), normalised by the same norm
    b.norm2, b.__class__ = b.norm1, PreNormBlock


def _no_qk_norm(b):
    b.attn.q_norm = b.attn.k_norm = None


def _shared_qk_gain(b):  # every head scaled by the heads' mean gain
    with torch.no_grad():
        for n in (b.attn.q_norm, b.attn.k_norm):
            n.weight.copy_(n.weight.mean(0, keepdim=True).expand_as(n.weight))


def _uncentred_qk_norm(b):  # RMSNorm with the same gains
    b.attn.q_norm.center = b.attn.k_norm.center = False


def test_gptj_interleaved_partial_rotary_parallel_block_and_head_bias_matter(tmp_path):
    ref = build("gptj", tmp_path)
    model = qkv.load(tmp_path)
    blk, rope = model.blocks[0], model.blocks[0].attn.rope
    assert isinstance(blk, ParallelBlock) and blk.norm2 is None
    assert rope.interleaved and rope.rotary_dim == 4 and rope.base == 1e4
    assert blk.attn.b_Q is None and blk.attn.b_O is None and blk.mlp.up.bias is not None
    assert _error(model, ref) <= TOL

    def no_head_bias(m):
        with torch.no_grad():
            m.lm_head.bias.zero_()

    _breaks(tmp_path, ref, {
        "half-split pairs": _half_split,
        "every feature rotated": _rotate_all,
        "sequential residual": _each_block(_sequential),
        "no lm_head bias": no_head_bias,
    })  # fmt: skip


def test_stablelm_per_head_qk_layernorm_partial_rotary_and_biases_matter(tmp_path):
    ref = build("stablelm", tmp_path)
    model = qkv.load(tmp_path)
    blk = model.blocks[0]
    assert isinstance(blk, PreNormBlock) and isinstance(blk.attn.q_norm, PerHeadNorm)
    assert blk.attn.q_norm.weight.shape == (6, 10) and blk.attn.k_norm.weight.shape == (2, 10)
    assert blk.attn.rope.rotary_dim == 4 and not blk.attn.rope.interleaved
    assert blk.attn.b_Q is not None and blk.attn.b_O is None and blk.norm1.bias is not None
    assert _error(model, ref) <= TOL

    def no_qkv_bias(b):
        with torch.no_grad():
            b.attn.b_Q.zero_(), b.attn.b_K.zero_()

    _breaks(tmp_path, ref, {
        "no QK-norm": _each_block(_no_qk_norm),
        "one gain shared by the heads": _each_block(_shared_qk_gain),
        "QK-norm without centring": _each_block(_uncentred_qk_norm),
        "every feature rotated": _rotate_all,
        "no q/k biases": _each_block(no_qkv_bias),
    })  # fmt: skip


def test_stablelm_parallel_residual_matters(tmp_path):
    ref = build("stablelm_parallel", tmp_path)
    model = qkv.load(tmp_path)
    blk = model.blocks[0]
    assert isinstance(blk, ParallelBlock) and blk.norm2 is None and blk.attn.q_norm is None
    assert blk.attn.b_Q is None
    assert _error(model, ref) <= TOL
    _breaks(tmp_path, ref, {"sequential residual": _each_block(_sequential)})


def test_stablelm_older_config_fields(tmp_path):
    """Configs from before rope_parameters: top-level rope_theta and partial_rotary_factor."""
    ref = build("stablelm", tmp_path, changes={"rope_theta": 100.0})
    _edit_config(tmp_path, drop=("rope_parameters",), rope_theta=100.0, partial_rotary_factor=0.4)
    model = qkv.load(tmp_path)
    assert model.blocks[0].attn.rope.base == 100.0 and model.config.rope_dim == 4
    assert _error(model, ref) <= TOL
    _edit_config(tmp_path, drop=("partial_rotary_factor",))  # transformers' default: 0.25
    assert qkv.load(tmp_path).config.rope_dim == int(10 * 0.25)


def test_cohere_layernorm_interleaved_rotary_logit_scale_and_qk_norm_matter(tmp_path):
    ref = build("cohere", tmp_path)
    model = qkv.load(tmp_path)
    blk, c = model.blocks[0], model.config
    assert isinstance(blk, ParallelBlock) and blk.norm2 is None
    assert isinstance(blk.norm1, torch.nn.LayerNorm) and blk.norm1.bias is None
    assert blk.attn.rope.interleaved and blk.attn.rope.rotary_dim == 10
    assert c.logit_scale == 0.5 and isinstance(blk.attn.q_norm, PerHeadNorm)
    assert _error(model, ref) <= TOL

    def no_logit_scale(m):
        m.config = type(m.config)(**{**m.config.__dict__, "logit_scale": 1.0})

    def rms_norms(m):  # RMSNorm with the same gains: no mean subtracted
        for blk in m.blocks:
            w = blk.norm1.weight
            blk.norm1 = qkv.nn.RMSNorm(w.shape[0], blk.norm1.eps)
            blk.norm1.weight = w

    _breaks(tmp_path, ref, {
        "half-split pairs": _half_split,
        "no logit_scale": no_logit_scale,
        "RMSNorm for LayerNorm": rms_norms,
        "sequential residual": _each_block(_sequential),
        "no QK-norm": _each_block(_no_qk_norm),
        "one gain shared by the heads": _each_block(_shared_qk_gain),
    })  # fmt: skip


def test_cohere_tied_without_qk_norm_matches(tmp_path):
    """Command-R's own defaults: tied embeddings, no QK-norm, no biases."""
    ref = build("cohere", tmp_path, changes={"tie_word_embeddings": True, "use_qk_norm": False,
                                             "attention_bias": False})  # fmt: skip
    model = qkv.load(tmp_path)
    blk = model.blocks[0]
    assert model.lm_head is None and blk.attn.q_norm is None and blk.attn.b_Q is None
    assert _error(model, ref) <= TOL


def test_falcon_grouped_query_key_value_and_two_norms_matter(tmp_path):
    from safetensors.torch import load_file

    from qkv.models.families import RESHAPES

    ref = build("falcon", tmp_path)
    model = qkv.load(tmp_path)
    blk = model.blocks[0]
    assert isinstance(blk, ParallelBlock) and blk.norm2 is not None
    assert (blk.attn.n_heads, blk.attn.n_kv_heads) == (6, 2) and blk.attn.b_Q is not None
    assert _error(model, ref) <= TOL
    weights = load_file(tmp_path / "model.safetensors")

    def split_as_rows(m):  # q | k | v stacked by rows (Phi-3's qkv_proj), not per kv head
        with torch.no_grad():
            for i, b in enumerate(m.blocks):
                w = weights[f"transformer.h.{i}.self_attention.query_key_value.weight"]
                for p, part in (("W_Q", "q"), ("W_K", "k"), ("W_V", "v")):
                    getattr(b.attn, p).copy_(RESHAPES[f"qkv_proj.{part}"](m.config)(w))

    _breaks(tmp_path, ref, {
        "q|k|v by rows": split_as_rows,
        "one LayerNorm for both": _each_block(lambda b: setattr(b, "norm2", None)),
        "sequential residual": _each_block(lambda b: setattr(b, "__class__", PreNormBlock)),
    })  # fmt: skip


def test_falcon_multi_query_and_sequential_layouts(tmp_path):
    ref = build("falcon_mq", tmp_path / "mq")
    model = qkv.load(tmp_path / "mq")
    blk = model.blocks[0]
    assert isinstance(blk, ParallelBlock) and blk.norm2 is None and blk.attn.n_kv_heads == 1
    assert blk.attn.b_Q is None and model.lm_head is None
    assert _error(model, ref) <= TOL
    _breaks(tmp_path / "mq", ref, {"sequential residual": _each_block(_sequential)})
    ref = build("falcon_seq", tmp_path / "seq")
    model = qkv.load(tmp_path / "seq")
    blk = model.blocks[0]
    assert isinstance(blk, PreNormBlock) and blk.attn.n_kv_heads == 6
    assert blk.attn.b_O is not None and model.lm_head is not None
    assert _error(model, ref) <= TOL
    _breaks(tmp_path / "seq", ref, {
        "parallel residual": _each_block(lambda b: setattr(b, "__class__", ParallelBlock)),
    })  # fmt: skip


def test_falcon_older_config_without_num_ln_has_two_norms(tmp_path):
    """A new_decoder_architecture config without num_ln_in_parallel_attn: two LayerNorms, as
    transformers sets it."""
    ref = build("falcon", tmp_path)
    _edit_config(tmp_path, drop=("num_ln_in_parallel_attn",))
    model = qkv.load(tmp_path)
    assert model.config.block == "parallel"
    assert _error(model, ref) <= TOL


# --------------------------------------------------------------------------------------------
# what cannot be honoured is named


@pytest.mark.parametrize(
    "change, named",
    [
        ({"alibi": True}, r"falcon with alibi=true is not supported"),
        ({"parallel_attn": False}, r"falcon with new_decoder_architecture and parallel_attn"),
    ],
)
def test_falcon_config_errors_are_named(tmp_path, change, named):
    build("falcon", tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(ValueError, match=named):
        qkv.load(tmp_path)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"rotary_dim": None}, r"gptj with rotary_dim=null is not supported"),
        ({"tie_word_embeddings": True}, r"gptj with tie_word_embeddings=true"),
        (
            {"rotary_dim": 12},
            r"rotary_dim must be an even int in \(0, 10\] \(n_embd / n_head\), got 12",
        ),
        ({"rotary_dim": 3}, r"rotary_dim must be an even int in \(0, 10\].*got 3"),
    ],
)
def test_gptj_config_errors_are_named(tmp_path, change, named):
    build("gptj", tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(ValueError, match=named):
        qkv.load(tmp_path)


def test_a_missing_per_head_norm_is_reported(tmp_path):
    """StableLM's per-head norms are stacked only when heads 0..n−1 are all there; a gap is a
    missing / unexpected report, nothing loaded."""
    from safetensors.torch import load_file, save_file

    build("stablelm", tmp_path)
    w = load_file(tmp_path / "model.safetensors")
    del w["model.layers.1.self_attn.q_layernorm.norms.3.weight"]
    save_file(w, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"lacks tensor 'model\.layers\.1\.self_attn\.q_layernorm\.norms\.\*\.weight' "
        r".*\(1 missing; it also holds 5 tensors .*: "
        r"'model\.layers\.1\.self_attn\.q_layernorm\.norms\.0\.weight'",
    ):
        qkv.load(tmp_path)


def test_per_head_norm_is_layernorm_per_head():
    """`PerHeadNorm` against a plain loop over heads (center: F.layer_norm, else the RMS
    formula), float64 and bfloat16 (normalised in float32)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=gen, dtype=torch.float64) * 3 + 1
    w = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    for center in (True, False):
        norm = PerHeadNorm(3, 8, 1e-5, center=center).double()
        with torch.no_grad():
            norm.weight.copy_(w)
        heads = []
        for h in range(3):
            xh = x[..., h, :]
            if center:
                heads.append(F.layer_norm(xh, (8,), w[h], None, 1e-5))
            else:
                heads.append(xh / (xh.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w[h])
        want = torch.stack(heads, -2)
        with torch.no_grad():
            got, half = norm(x), norm.to(torch.bfloat16)(x.to(torch.bfloat16))
        assert rel(got, want) <= 1e-14
        assert half.dtype == torch.bfloat16 and rel(half, want) <= 2e-2
    with pytest.raises(ValueError, match=r"expects x of shape \(\.\.\., 3, 8\).*got \(2, 5, 24\)"):
        PerHeadNorm(3, 8)(torch.zeros(2, 5, 24))


def test_decoder_config_names_its_new_options():
    base = dict(name="t", n_layers=1, n_heads=2, n_kv_heads=2, d_model=8, d_head=4, d_ff=8,
                vocab_size=10, max_positions=8)  # fmt: skip
    DecoderConfig = qkv.models.decoder.DecoderConfig
    with pytest.raises(ValueError, match=r"norm_bias=False .* needs norm='layer', got norm='rms'"):
        DecoderConfig(**base, norm_bias=False)
    with pytest.raises(ValueError, match=r"qk_norm_kind must be one of \('rms', 'layer'\)"):
        DecoderConfig(**base, qk_norm_kind="group")
    with pytest.raises(ValueError, match=r"rope_interleaved must be a bool, got 1"):
        DecoderConfig(**base, rope_interleaved=1)
