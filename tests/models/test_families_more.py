"""What each family of `families_more.py` adds, proved to matter: the parity tests of
tests/models/test_families.py (logits in float32/float64, lens rows, greedy tokens with and
without the cache) run every family there; here each peculiarity, switched off or done another
way, breaks parity with transformers, other config spellings give the same model, and what a
family cannot honour is a named error."""

import dataclasses
import json
import math

import pytest
import torch

import qkv
from qkv.attention.mods import alibi
from qkv.nn import ParallelBlock, PreNormBlock, RMSNorm, SparseMoE
from tests.models.test_families import REL_TOL, build, ids_for, rel

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

TOL = REL_TOL[torch.float32]


def _error(model, ref, seed: int = 9) -> float:
    ids = ids_for(seed)
    with torch.no_grad():
        return rel(model(ids), ref(ids).logits)


def _breaks(folder, ref, edits: dict) -> None:
    """Each edit, applied to a fresh load, moves the logits by far more than the tolerance."""
    for what, edit in edits.items():
        broken = qkv.load(folder)
        edit(broken)
        assert _error(broken, ref) > 100 * TOL, what


def _edit_config(folder, drop=(), **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key in drop:
        del cfg[key]
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _each_block(fn):
    def edit(model):
        for block in model.blocks:
            fn(block)

    return edit


def _each_attn(fn):
    return _each_block(lambda b: fn(b.attn))


def _sparse(model) -> list:
    """The model's SparseMoE MLPs, layer by layer (dense layers left out)."""
    return [b.mlp for b in model.blocks if isinstance(b.mlp, SparseMoE)]


def assert_clear_routing(model, ids, gaps_of, margin: float) -> None:
    """Run `model` on `ids` with each sparse layer's router logits (n e) handed to
    `gaps_of(moe, logits)`, which returns the gaps it finds between a last choice and the next
    (in float64); every gap must exceed `margin`, and there must be one: a near tie would let
    rounding choose another expert."""
    gaps: list[float] = []
    handles = [m.router.register_forward_hook(lambda r, a, o, m=m: gaps.extend(gaps_of(m, o)))
               for m in _sparse(model)]  # fmt: skip
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    assert gaps and min(gaps) > margin, f"a near tie in routing: gap {min(gaps):.1e}"


def _each_moe(fn):
    def edit(model):
        for moe in _sparse(model):
            fn(moe)

    return edit


# --------------------------------------------------------------------------------------------
# SmolLM3: NoPE layers


def test_smollm3_nope_layers_and_what_breaks_parity(tmp_path):
    ref = build("smollm3", tmp_path)
    model = qkv.load(tmp_path)
    assert [b.attn.rope is None for b in model.blocks] == [False, True, False, True]
    assert [b.attn.window for b in model.blocks] == [None, (4, 0), None, (4, 0)]
    assert _error(model, ref) <= TOL

    def rope_everywhere(m):
        for b in m.blocks:
            b.attn.rope = m.blocks[0].attn.rope

    _breaks(tmp_path, ref, {
        "RoPE on the NoPE layers": rope_everywhere,
        "no window": _each_block(lambda b: setattr(b.attn, "window", None)),
    })  # fmt: skip


def test_smollm3_without_no_rope_layers_reads_the_interval(tmp_path):
    ref = build("smollm3", tmp_path)
    _edit_config(tmp_path, drop=("no_rope_layers",))  # interval 2: layers 1 and 3 are NoPE
    model = qkv.load(tmp_path)
    assert model.config.rope_layers == (True, False, True, False)
    assert _error(model, ref) <= TOL
    _edit_config(tmp_path, no_rope_layer_interval=4)  # only layer 3: not the checkpoint's
    assert qkv.load(tmp_path).config.rope_layers == (True, True, True, False)


def test_smollm3_config_errors_are_named(tmp_path):
    build("smollm3", tmp_path)
    _edit_config(tmp_path, no_rope_layers=[1, 0])
    with pytest.raises(ValueError, match=r"no_rope_layers must list 0 or 1 for each of the 4"):
        qkv.load(tmp_path)
    _edit_config(tmp_path, drop=("layer_types",), no_rope_layers=[1, 0, 1, 0])
    with pytest.raises(ValueError, match=r"smollm3 with use_sliding_window without layer_types"):
        qkv.load(tmp_path)


# --------------------------------------------------------------------------------------------
# OLMo 2: QK-norm over whole projections, norms after each sublayer


class _PerHead(torch.nn.Module):
    """The same gains, but each head normalised by its own RMS (Qwen3's QK-norm)."""

    def __init__(self, norm: RMSNorm, n_heads: int) -> None:
        super().__init__()
        self.norm, self.n_heads = norm, n_heads

    def forward(self, x):  # (b i (h d)) → (b i (h d))
        h = x.unflatten(-1, (self.n_heads, -1))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.norm.eps)
        return h.flatten(-2) * self.norm.weight


def test_olmo2_qk_norm_and_norm_placement_matter(tmp_path):
    ref = build("olmo2", tmp_path)
    model = qkv.load(tmp_path)
    attn = model.blocks[0].attn
    assert attn.qk_norm_scope == "all"
    assert attn.q_norm.weight.shape == (60,) and attn.k_norm.weight.shape == (20,)
    assert _error(model, ref) <= TOL

    def per_head(b):
        b.attn.q_norm = _PerHead(b.attn.q_norm, 6)
        b.attn.k_norm = _PerHead(b.attn.k_norm, 2)

    _breaks(tmp_path, ref, {
        "QK-norm per head": _each_block(per_head),
        "no QK-norm": _each_block(lambda b: setattr(b.attn, "q_norm", None)
                                  or setattr(b.attn, "k_norm", None)),
        "norms before the sublayers": _each_block(lambda b: setattr(b, "__class__", PreNormBlock)),
    })  # fmt: skip


# --------------------------------------------------------------------------------------------
# Granite: four multipliers


def test_granite_each_multiplier_matters(tmp_path):
    ref = build("granite", tmp_path)
    model = qkv.load(tmp_path)
    c = model.config
    assert (c.embed_scale, c.residual_scale, c.attn_scale) == (3.0, 0.4, 0.05)
    assert c.logit_scale == pytest.approx(1 / 2.5)
    assert _error(model, ref) <= TOL

    def replace(**kw):
        return lambda m: setattr(m, "config", dataclasses.replace(m.config, **kw))

    _breaks(tmp_path, ref, {
        "no embedding_multiplier": replace(embed_scale=1.0),
        "no logits_scaling": replace(logit_scale=1.0),
        "no residual_multiplier": _each_block(lambda b: setattr(b, "residual_scale", 1.0)),
        "1/√d in place of attention_multiplier": _each_block(
            lambda b: setattr(b.attn, "scale", 1 / math.sqrt(b.attn.d_head))),
    })  # fmt: skip


def test_granite_tied_matches(tmp_path):
    ref = build("granite", tmp_path, changes={"tie_word_embeddings": True})
    model = qkv.load(tmp_path)
    assert model.lm_head is None
    assert _error(model, ref) <= TOL


def test_granite_zero_logits_scaling_is_named(tmp_path):
    build("granite", tmp_path)
    _edit_config(tmp_path, logits_scaling=0)
    with pytest.raises(ValueError, match=r"logits_scaling must be a number > 0, got 0"):
        qkv.load(tmp_path)


# --------------------------------------------------------------------------------------------
# StarCoder2: LayerNorm biases, sliding window, use_bias


def test_starcoder2_window_and_norm_biases_matter(tmp_path):
    ref = build("starcoder2", tmp_path)
    model = qkv.load(tmp_path)
    assert [b.attn.window for b in model.blocks] == [(4, 0), (4, 0)]
    assert isinstance(model.blocks[0].norm1, torch.nn.LayerNorm)
    assert _error(model, ref) <= TOL

    def no_norm_bias(b):
        with torch.no_grad():
            b.norm1.bias.zero_(), b.norm2.bias.zero_()

    _breaks(tmp_path, ref, {
        "no window": _each_block(lambda b: setattr(b.attn, "window", None)),
        "no LayerNorm bias": _each_block(no_norm_bias),
    })  # fmt: skip


def test_starcoder2_without_biases_matches(tmp_path):
    ref = build("starcoder2", tmp_path, changes={"use_bias": False, "sliding_window": None})
    model = qkv.load(tmp_path)
    blk = model.blocks[0]
    assert blk.attn.b_Q is None and blk.attn.b_O is None and blk.mlp.up.bias is None
    assert blk.attn.window is None
    assert _error(model, ref) <= TOL


# --------------------------------------------------------------------------------------------
# Phi-2: one LayerNorm for both sublayers, partial rotary, lm_head bias


def test_phi_shared_norm_partial_rotary_and_lm_head_bias_matter(tmp_path):
    ref = build("phi", tmp_path)
    model = qkv.load(tmp_path)
    blk = model.blocks[0]
    assert isinstance(blk, ParallelBlock) and blk.norm2 is None
    assert blk.attn.rope.rotary_dim == 4 and model.lm_head.bias is not None
    assert _error(model, ref) <= TOL

    def rotate_all(m):
        rope = m.blocks[0].attn.rope  # shared by every layer
        rope.rotary_dim, rope._pairs = rope.d_head, None
        rope._tables.clear()

    def no_head_bias(m):
        with torch.no_grad():
            m.lm_head.bias.zero_()

    def sequential(b):  # mlp reads x + attn(norm1(x)), normalised by the same LayerNorm
        b.norm2, b.__class__ = b.norm1, PreNormBlock

    _breaks(tmp_path, ref, {
        "every feature rotated": rotate_all,
        "no lm_head bias": no_head_bias,
        "sequential residual": _each_block(sequential),
    })  # fmt: skip


@pytest.mark.parametrize(
    "change, named",
    [
        ({"qk_layernorm": True}, r"phi with qk_layernorm is not supported"),
        ({"tie_word_embeddings": True}, r"phi with tie_word_embeddings=true"),
    ],
)
def test_phi_unsupported_options_are_named(tmp_path, change, named):
    build("phi", tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(ValueError, match=named):
        qkv.load(tmp_path)


# --------------------------------------------------------------------------------------------
# BLOOM: ALiBi, embedding LayerNorm, its own GELU constant


def _slopes_oracle(n: int) -> list[float]:
    """ALiBi slopes written out from the paper (not from qkv's or transformers' code): the
    geometric sequence from 2^(−8/p) for p the largest power of two ≤ n, then every other
    element of the sequence for 2p."""
    p = 2 ** math.floor(math.log2(n))
    first = [2 ** (-8 / p * (i + 1)) for i in range(p)]
    second = [2 ** (-8 / (2 * p) * (i + 1)) for i in range(2 * p)][0::2]
    return first + second[: n - p]


def test_bloom_alibi_embedding_norm_and_what_breaks_parity(tmp_path):
    ref = build("bloom", tmp_path)
    model = qkv.load(tmp_path)
    assert all(b.attn.rope is None for b in model.blocks)
    slopes = model.blocks[0].attn.score_mod._qkv_fused[1]
    assert slopes.tolist() == pytest.approx(_slopes_oracle(6), rel=1e-7)
    assert _error(model, ref) <= TOL

    def no_embed_norm(m):
        m.embed_norm = None

    def power_of_two_slopes(b):  # 2^(−8/6 · (h+1)): the paper's formula misapplied to n=6
        b.attn.score_mod = alibi(torch.tensor([2 ** (-8 / 6 * (h + 1)) for h in range(6)]))

    _breaks(tmp_path, ref, {
        "no ALiBi": _each_block(lambda b: setattr(b.attn, "score_mod", None)),
        "slopes of the wrong formula": _each_block(power_of_two_slopes),
        "no embedding LayerNorm": no_embed_norm,
    })  # fmt: skip


def test_bloom_sixteen_heads_and_untied_head_match(tmp_path):
    """Slopes 2^(−k/2) that float32 rounds (6 heads' are exact powers of two)."""
    ref = build("bloom", tmp_path, changes={"hidden_size": 64, "n_head": 16,
                                            "tie_word_embeddings": False})  # fmt: skip
    model = qkv.load(tmp_path)
    assert model.lm_head is not None and model.blocks[0].attn.n_heads == 16
    assert _error(model, ref) <= TOL


def test_bloom_gelu_is_its_own(tmp_path):
    """BLOOM's GELU writes √(2/π) as 0.79788456: qkv's `gelu_tanh_bloom` is transformers'
    function to the last bit, and not the exact tanh GELU."""
    from transformers.models.bloom.modeling_bloom import bloom_gelu_forward

    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    ours = qkv.nn.ACTIVATIONS["gelu_tanh_bloom"](x)
    assert torch.equal(ours, bloom_gelu_forward(x))
    exact = torch.nn.functional.gelu(x, approximate="tanh")
    assert float((ours - exact).abs().max()) > 1e-11


def test_bloom_residual_from_the_norm_is_named(tmp_path):
    build("bloom", tmp_path)
    _edit_config(tmp_path, apply_residual_connection_post_layernorm=True)
    with pytest.raises(ValueError, match=r"bloom with apply_residual_connection_post_layernorm"):
        qkv.load(tmp_path)
