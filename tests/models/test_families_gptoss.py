"""gpt-oss (`families_gptoss.py`) against transformers, as tests/models/test_families.py does
for the others: a tiny random checkpoint (AutoConfig.for_model → from_config →
save_pretrained) loaded with `qkv.load(folder)`; logits in float32 and float64, a right-padded
batch, lens rows vs `output_attentions=True` (weights that leave the sink its share), and 20
greedy tokens with and without the KV cache. Then each peculiarity, switched off, breaks
parity; the Hub's MXFP4 expert files load to the same model; bad files are named errors.

Sizes as test_families': d_model 60, 6 query heads over 2 kv heads, d_head 10, experts 37
wide; 4 experts, top 2; two layers, sliding (window 5) then full. The parity tests use plain
RoPE (base 500), the float64 oracle's; YaRN, gpt-oss's default, is checked in float32 apart.
swiglu_limit is 1.5 here (7.0 in gpt-oss), so the clamp acts on many features.
"""

import io
import json
import shutil

import pytest
import rich.console
import torch

import qkv
from qkv.lens.terminal import render_text
from qkv.nn import SparseMoE
from tests.models.test_families import _DEC as DECODER
from tests.models.test_families import (
    N_GREEDY,
    REL_TOL,
    assert_lens_rows_match,
    greedy_three_ways,
    ids_for,
    output_error,
    padded_error,
    save_random,
)
from tests.models.test_families_moe import assert_lens_experts_match, assert_routing_is_clear
from tests.models.test_families_more import _breaks, _each_block, _each_moe, _edit_config, _error

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

TOL = REL_TOL[torch.float32]
_SLIDING, _FULL = "sliding_attention", "full_attention"
PLAIN_ROPE = {"rope_type": "default", "rope_theta": 500.0}
CONFIG = dict(DECODER, head_dim=10, num_local_experts=4, num_experts_per_tok=2,
              sliding_window=5, layer_types=[_SLIDING, _FULL], swiglu_limit=1.5,
              rope_parameters=PLAIN_ROPE, pad_token_id=0, bos_token_id=0,
              eos_token_id=0)  # fmt: skip


def build(folder, **changes):
    """A random gpt-oss checkpoint (CONFIG updated by `changes`) saved in `folder` with a word
    tokenizer; returns the transformers model (eager attention and experts)."""
    return save_random("gpt_oss", {**CONFIG, **changes}, folder)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss")
    ref = build(folder)
    return ref, qkv.load(folder), folder


def gptoss_float64_oracle_(ref, model) -> None:
    """transformers' float32 islands in float64: RoPE's angles (gpt-oss's rotary returns the
    d/2 angles' cos and sin, halves rotated by `_apply_rotary_emb`) and RMSNorm."""
    d, base = model.config.d_head, model.config.rope_base

    def rotary(x, position_ids):
        inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
        ang = position_ids[..., None].double() * inv  # (b i d/2)
        return ang.cos().to(x.dtype), ang.sin().to(x.dtype)

    for mod in ref.modules():
        if hasattr(mod, "inv_freq"):
            mod.forward = rotary
        if hasattr(mod, "variance_epsilon"):
            mod.forward = lambda h, m=mod: (
                m.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
            )


# --------------------------------------------------------------------------------------------
# parity


def test_the_model_is_read_as_gpt_oss(pair):
    _, model, _ = pair
    c = model.config
    assert c.attn_sinks and c.windows == (5, None) and c.attn_bias and c.out_bias
    moe = model.blocks[0].mlp
    assert isinstance(moe, SparseMoE) and moe.order == "topk_softmax" and moe.top_k == 2
    assert moe.router.bias is not None and moe.experts[0].down.bias is not None
    assert model.blocks[0].attn.sinks.shape == (6,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_match_transformers(pair, dtype, monkeypatch):
    ref, model, _ = pair
    ids = torch.cat([ids_for(0), ids_for(1)])
    assert_routing_is_clear(model, ids)
    err = output_error(ref, model, ids, dtype, monkeypatch, gptoss_float64_oracle_)
    assert err <= REL_TOL[dtype], f"gpt_oss {dtype}: relative error {err:.2e}"


def test_padded_batch_matches_transformers(pair):
    ref, model, _ = pair
    assert padded_error(ref, model) <= TOL


def test_lens_rows_match_output_attentions(pair):
    """transformers' probabilities drop the sink's column, so a row sums to less than 1; the
    lens' rows are those, and each head's `sink` is the rest."""
    ref, model, _ = pair
    assert_lens_rows_match(ref, model, "gpt_oss")
    r = qkv.explain("the dog chased the ball because it", 6, model=model, top=0,
                    rollout=False, progress=False)  # fmt: skip
    for layer in r.layers:
        for h in layer.heads:
            assert 0.0 < h.sink < 1.0
            assert abs(h.weight.sum() + h.sink - 1.0) < 1e-5, (layer.layer, h.head)
    back = qkv.lens.ExplainResult.from_json(r.to_json())  # "sink" written and read back
    assert [h.sink for lay in back.layers for h in lay.heads] == [
        h.sink for lay in r.layers for h in lay.heads
    ]
    console = rich.console.Console(width=120, record=True, file=io.StringIO())
    r.render(console)
    assert "has learned attention sinks" in console.export_text()  # a note with every view


@pytest.mark.skipif(shutil.which("node") is None, reason="node.js runs the page's script")
def test_html_page_states_each_head_s_sink(pair, tmp_path):
    """The standalone page (`--html`): each head's key table says what its sink took."""
    from tests.lens.test_views import _tables

    _, model, _ = pair
    r = qkv.explain("the dog chased the ball because it", 6, model=model, top=0,
                    rollout=False, progress=False)  # fmt: skip
    tables = _tables(r, tmp_path / "r.html")["heads"]
    for lay in r.layers:
        for h in lay.heads:
            assert "the learned sink takes" in tables[f"{lay.layer}.{h.head}"], (lay.layer, h.head)


def test_lens_experts_are_transformers_routing(pair):
    """The lens' experts of the query token: those transformers' GptOssTopKRouter chose, with
    its weights; the terminal view lists them."""
    ref, model, _ = pair
    text = "the dog chased the ball because it was excited"
    assert_lens_experts_match(ref, model, text, 6)
    r = qkv.explain(text, 6, model=model, top=3, rollout=False, progress=False)
    assert "Experts 'it (6)' was routed to" in render_text(r)


def test_greedy_tokens_with_and_without_the_cache(pair):
    ref, model, _ = pair
    prompt = ids_for(5, 7)
    assert_routing_is_clear(model, prompt)
    ref.generation_config.eos_token_id = None
    want, cached, uncached = greedy_three_ways(ref, model, prompt, N_GREEDY)
    assert cached == uncached == want


def test_yarn_rope_the_default_matches_in_float32(tmp_path):
    """gpt-oss's own RoPE: YaRN, factor 32 over 4096 positions, truncate=False (ids past 64
    are not needed: YaRN changes every frequency and the attention factor at any length)."""
    yarn = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 4096,
            "rope_theta": 150000.0}  # fmt: skip
    ref = build(tmp_path, rope_parameters=yarn, max_position_embeddings=131072)
    model = qkv.load(tmp_path)
    s = model.blocks[0].attn.rope.scaling
    assert s.rope_type == "yarn" and s.factor == 32.0 and s.truncate is False
    assert _error(model, ref) <= TOL


# --------------------------------------------------------------------------------------------
# each peculiarity matters


def _no_clamp(moe):
    for e in moe.experts:
        e.glu = type(e.glu)(alpha=e.glu.alpha, limit=None, up_offset=e.glu.up_offset)


def test_each_peculiarity_breaks_parity(tmp_path):
    ref = build(tmp_path)
    assert _error(qkv.load(tmp_path), ref) <= TOL
    _breaks(tmp_path, ref, {
        "no sinks": _each_block(lambda b: torch.nn.init.constant_(b.attn.sinks, -torch.inf)),
        "no window": _each_block(lambda b: setattr(b.attn, "window", None)),
        "no router bias": _each_moe(lambda m: torch.nn.init.zeros_(m.router.bias)),
        "no expert biases": _each_moe(
            lambda m: [torch.nn.init.zeros_(e.down.bias) for e in m.experts]),
        "no clamp": _each_moe(_no_clamp),
        "gate and up swapped": _each_moe(
            lambda m: [setattr(e, "gate", e.up) or setattr(e, "up", e.gate) for e in m.experts]),
    })  # fmt: skip


def _pack_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e, k, r) float weights → MXFP4 (blocks (e, r, k/32, 16), scales (e, r, k/32)) holding
    their nearest E2M1 values, one exponent per 32 (written here, not qkv's): the inverse of
    transformers' layout (`convert_moe_packed_tensors`: rows become columns)."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    rows = w.transpose(1, 2)  # (e r k)
    e, r, k = rows.shape
    g = rows.reshape(e, r, k // 32, 32)
    amax = g.abs().amax(-1).clamp_min(1e-30)  # (e r g)
    exp = torch.ceil(torch.log2(amax / 6.0))  # 6 · 2^exp ≥ amax
    scaled = g / torch.exp2(exp).unsqueeze(-1)
    code = (scaled.abs().unsqueeze(-1) - grid).abs().argmin(-1) + 8 * (scaled < 0)  # (e r g 32)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8)


def test_mxfp4_expert_files_load_as_transformers_dequantises_them(tmp_path):
    """The Hub's gpt-oss files: experts as `*_blocks` / `*_scales`. Ours, loaded from those,
    equals transformers' model holding `convert_moe_packed_tensors`' dense weights (its own
    dequantiser, the oracle), within float32's tolerance."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    # experts 64 wide over d_model 64: groups of 32 along both of the experts' inputs
    ref = build(tmp_path, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)  # fmt: skip
    w = load_file(tmp_path / "model.safetensors")
    state = ref.state_dict()
    for i in range(2):
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{i}.mlp.experts.{name}"
            blocks, scales = _pack_mxfp4(w.pop(key))
            w[key + "_blocks"], w[key + "_scales"] = blocks, scales
            dense = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            state[key] = dense  # (e, k, r): its rows are already the model's columns
    save_file(w, tmp_path / "model.safetensors")
    ref.load_state_dict(state)
    model = qkv.load(tmp_path)
    assert _error(model, ref) <= TOL


def test_a_blocks_tensor_without_scales_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    build(tmp_path, hidden_size=64, intermediate_size=64, num_attention_heads=4,
          num_key_value_heads=2, head_dim=16)  # fmt: skip
    w = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.mlp.experts.down_proj"
    w[key + "_blocks"] = _pack_mxfp4(w.pop(key))[0]
    save_file(w, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"down_proj_blocks'? has no '?.*down_proj_scales"):
        qkv.load(tmp_path)


def test_bad_swiglu_settings_are_named(tmp_path):
    build(tmp_path)
    _edit_config(tmp_path, swiglu_limit=-1.0)
    with pytest.raises(ValueError, match=r"swiglu_limit must be a number > 0, got -1\.0"):
        qkv.load(tmp_path)


def test_architectures_without_model_type_find_the_family(tmp_path):
    ref = build(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    del cfg["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert _error(qkv.load(tmp_path), ref) <= TOL
