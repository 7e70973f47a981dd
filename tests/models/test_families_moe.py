"""The mixture-of-experts families (`families_moe.py`) against transformers itself, as
tests/models/test_families.py does for the dense ones: a tiny random checkpoint per model_type
(AutoConfig.for_model → from_config → save_pretrained), loaded with `qkv.load(folder)`, logits
in float32 and float64, 20 greedy tokens with and without the KV cache, lens rows vs
output_attentions; then routing done another way breaks parity, the layer layouts of Qwen's
decoder_sparse_step / mlp_only_layers, and bad configs named.

Tiny and awkward: d_model 60, 6 query heads over 2 or 3 kv heads, 4 experts of width 37 or 23,
top 2, a shared expert of 29 (qwen2_moe). Weights of size 0.3 (`randomise_`) spread the router's
logits over a few units, so no two experts' probabilities come within rounding of each other
(`assert_routing_is_clear` checks it on the very inputs compared: a near tie would let float32
rounding pick another expert, a flaky test rather than a wrong model).
"""

import json

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.models.decoder import DecoderConfig
from qkv.nn import MLP, MoEConfig, SparseMoE
from tests.models.parity import (  # noqa: F401  (collected here, with this file's `pair`)
    test_lens_rows_match_output_attentions,
)
from tests.models.test_families import _DEC as DECODER
from tests.models.test_families import (
    N_GREEDY,
    REL_TOL,
    float64_oracle_,
    greedy_three_ways,
    ids_for,
    output_error,
    padded_error,
    randomise_,
    rel,
    word_tokenizer,
)
from tests.models.test_families_more import assert_clear_routing

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

TOL = REL_TOL[torch.float32]
_DEC = dict(DECODER, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # test_families' tiny decoder
_EXPERTS = dict(num_experts_per_tok=2, moe_intermediate_size=23)
MOE = {
    # Mistral attention with a window of 5 on every layer; weights renormalised (always)
    "mixtral": dict(_DEC, num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
    # QK-norm per head, head_dim 14 ≠ 60/6; renormalised; layer 1 dense (mlp_only_layers)
    "qwen3_moe": dict(_DEC, **_EXPERTS, num_experts=4, head_dim=14, norm_topk_prob=True,
                      mlp_only_layers=[1]),
    # q/k/v biases over 3 kv heads; a sigmoid-gated shared expert; weights not renormalised
    "qwen2_moe": dict(_DEC, **_EXPERTS, num_experts=4, num_key_value_heads=3,
                      shared_expert_intermediate_size=29),
    # QK-norm over all heads' q (60) and k (20) features after their biases; not renormalised
    "olmoe": dict(_DEC, num_experts=4, num_experts_per_tok=2, attention_bias=True),
}  # fmt: skip


def build(model_type: str, folder, *, changes: dict | None = None):
    """A random `model_type` checkpoint (MOE's config updated by `changes`) saved in `folder`;
    returns the transformers model (eager attention and experts: its reference loops)."""
    kw = {**MOE[model_type], **(changes or {})}
    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    randomise_(m)
    m.save_pretrained(folder)
    return m


@pytest.fixture(scope="module", params=list(MOE))
def pair(request, tmp_path_factory):
    """(model_type, transformers model, qkv model, folder) for each MoE family."""
    folder = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, folder)
    word_tokenizer().save(str(folder / "tokenizer.json"))
    return request.param, ref, qkv.load(folder), folder


def assert_routing_is_clear(model, ids, margin: float = 1e-4) -> None:
    """Every token's k-th and (k+1)-th router probabilities differ by more than `margin` (far
    above float32 rounding), on every sparse layer of `model` for `ids`."""

    def gaps_of(moe, logits):
        p = torch.softmax(logits.double(), -1).sort(-1, descending=True).values  # (n e)
        k = moe.top_k
        return [float((p[:, k - 1] - p[:, k]).min()) if k < p.shape[-1] else 1.0]

    assert_clear_routing(model, ids, gaps_of, margin)


def _mixtral_router64(mod):
    """transformers' Mixtral router takes `logits.float()` before its softmax whatever the
    model's dtype; the float64 oracle routes in float64: softmax, top k, renormalise."""

    def forward(h):
        logits = F.linear(h.reshape(-1, mod.hidden_dim), mod.weight)  # (n e)
        w, idx = torch.topk(torch.softmax(logits, -1), mod.top_k, -1)
        return logits, w / w.sum(-1, keepdim=True), idx

    return forward


# --------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_match_transformers(pair, dtype, monkeypatch):
    mt, ref, model, _ = pair
    assert any(isinstance(b.mlp, SparseMoE) for b in model.blocks)
    ids = torch.cat([ids_for(0), ids_for(1)])  # a batch of two
    assert_routing_is_clear(model, ids)

    def oracle_(ref, model):  # the float64 softmax also serves the Qwen/OLMoE routers
        float64_oracle_(ref, model)
        for mod in ref.modules():
            if type(mod).__name__ == "MixtralTopKRouter":
                mod.forward = _mixtral_router64(mod)

    err = output_error(ref, model, ids, dtype, monkeypatch, oracle_)
    assert err <= REL_TOL[dtype], f"{mt} {dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("mt", list(MOE))
def test_greedy_tokens_and_cache(mt, tmp_path):
    ref = build(mt, tmp_path)
    model = qkv.load(tmp_path)
    prompt = ids_for(5, 7)
    ref.generation_config.eos_token_id = None  # no end token: 20 unsuppressed greedy picks
    want, cached, uncached = greedy_three_ways(ref, model, prompt, N_GREEDY)
    assert cached == uncached == want


def test_padded_batch_matches_transformers(pair):
    """Right padding (run on the real tokens only, `qkv.nn.varlen`): each token is routed on
    its own, so the real tokens' logits equal transformers' with its attention mask."""
    ref, model = pair[1], pair[2]
    assert padded_error(ref, model) <= TOL


def assert_lens_experts_match(ref, model, text: str, i: int) -> None:
    """The lens' experts for token i, every sparse layer: the indices and weights transformers'
    own routers (`*TopKRouter`, returning logits, top-k weights, indices) chose for it, in the
    same order; weights within 1e-6. Its JSON round trip keeps them."""
    import re

    ids = torch.tensor([model.tokenizer.encode(text).ids])
    seen, hooks = {}, []
    for name, mod in ref.named_modules():
        if type(mod).__name__.endswith("TopKRouter"):
            layer = int(re.search(r"layers\.(\d+)\.", name)[1])

            def fn(mod, args, out, layer=layer):
                seen[layer] = (out[2][i].tolist(), out[1][i].double().numpy())

            hooks.append(mod.register_forward_hook(fn))
    try:
        with torch.no_grad():
            ref(ids)
    finally:
        for h in hooks:
            h.remove()
    r = qkv.explain(text, i, model=model, top=3, rollout=False, progress=False)
    assert seen and [x.layer for x in r.experts.layers] == sorted(seen)
    for x in r.experts.layers:
        want_idx, want_w = seen[x.layer]
        assert x.experts.tolist() == want_idx, (x.layer, x.experts, want_idx)
        assert abs(x.weights - want_w).max() < 1e-6, x.layer
    back = qkv.lens.ExplainResult.from_json(r.to_json())
    assert back.experts.to_dict() == r.experts.to_dict()


def test_lens_experts_are_transformers_routing(pair):
    _, ref, model, _ = pair
    text = "the dog chased the ball because it was excited"
    assert_routing_is_clear(model, torch.tensor([model.tokenizer.encode(text).ids]))
    assert_lens_experts_match(ref, model, text, 6)


# --------------------------------------------------------------------------------------------
# the checks can fail: routing done another way moves the logits far past the tolerance


def _error(model, ref) -> float:
    ids = ids_for(9)
    with torch.no_grad():
        return rel(model(ids), ref(ids).logits)


def _sparse(model):
    return [b.mlp for b in model.blocks if isinstance(b.mlp, SparseMoE)]


def _swap_gate_and_up(moe) -> None:
    for e in moe.experts:
        e.gate, e.up = e.up, e.gate


def test_routing_done_otherwise_breaks_parity(tmp_path):
    ref = build("mixtral", tmp_path)
    model = qkv.load(tmp_path)
    assert [b.attn.window for b in model.blocks] == [(4, 0), (4, 0)]
    assert [(m.top_k, m.normalise) for m in _sparse(model)] == [(2, True)] * 2
    assert _error(model, ref) <= TOL
    breaks = {
        "top-(k-1)": lambda m: setattr(m, "top_k", 1),
        "no renormalisation": lambda m: setattr(m, "normalise", False),
        "experts in reverse order": lambda m: setattr(
            m, "experts", type(m.experts)(m.experts[::-1])
        ),
        "w1 and w3 swapped": _swap_gate_and_up,
    }
    for what, edit in breaks.items():
        broken = qkv.load(tmp_path)
        for moe in _sparse(broken):
            edit(moe)
        assert _error(broken, ref) > 100 * TOL, what


def test_qwen_norm_topk_prob_and_shared_expert_matter(tmp_path):
    ref = build("qwen2_moe", tmp_path)
    model = qkv.load(tmp_path)
    assert [m.normalise for m in _sparse(model)] == [False, False]
    assert _error(model, ref) <= TOL
    for what, edit in {
        "renormalised": lambda m: setattr(m, "normalise", True),
        "no shared expert": lambda m: setattr(m, "shared", None),
    }.items():
        broken = qkv.load(tmp_path)
        for moe in _sparse(broken):
            edit(moe)
        assert _error(broken, ref) > 100 * TOL, what


@pytest.mark.parametrize(
    ("changes", "sparse"),
    [
        ({"decoder_sparse_step": 2, "mlp_only_layers": []}, [False, True, False, True]),
        ({"decoder_sparse_step": 1, "mlp_only_layers": [0, 2]}, [False, True, False, True]),
        ({"decoder_sparse_step": 3, "mlp_only_layers": [2]}, [False, False, False, False]),
        ({"decoder_sparse_step": 1, "mlp_only_layers": []}, [True, True, True, True]),
    ],
)
def test_qwen3_moe_dense_and_sparse_layers(tmp_path, changes, sparse):
    ref = build("qwen3_moe", tmp_path, changes={"num_hidden_layers": 4, **changes})
    model = qkv.load(tmp_path)
    got = [isinstance(b.mlp, SparseMoE) for b in model.blocks]
    assert got == sparse
    assert all(isinstance(b.mlp, MLP) for b, s in zip(model.blocks, sparse, strict=True) if not s)
    assert model.config.moe is None if not any(sparse) else model.config.moe.d_expert == 23
    assert _error(model, ref) <= TOL


def test_qwen3_moe_sliding_window_only_with_use_sliding_window(tmp_path):
    ref = build("qwen3_moe", tmp_path, changes={"use_sliding_window": True, "sliding_window": 5})
    model = qkv.load(tmp_path)
    assert [b.attn.window for b in model.blocks] == [(4, 0), (4, 0)]
    assert _error(model, ref) <= TOL
    _edit_config(tmp_path, use_sliding_window=False)  # transformers then drops the window
    assert [b.attn.window for b in qkv.load(tmp_path).blocks] == [None, None]


# --------------------------------------------------------------------------------------------
# bad configs and checkpoints: one clear error naming the key


def _edit_config(folder, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("mt", "changes", "match"),
    [
        ("mixtral", {"num_experts_per_tok": 5},
         r"num_experts_per_tok=5 exceeds num_local_experts=4"),
        ("mixtral", {"num_local_experts": 0}, r"num_local_experts must be an int ≥ 1, got 0"),
        ("qwen3_moe", {"decoder_sparse_step": 0}, r"decoder_sparse_step must be an int ≥ 1"),
        ("qwen3_moe", {"mlp_only_layers": "1"}, r"mlp_only_layers must be a list of layer"),
        ("qwen3_moe", {"num_experts_per_tok": 0}, r"num_experts_per_tok must be an int ≥ 1"),
        ("qwen2_moe", {"use_sliding_window": True, "layer_types": None},
         r"qwen2_moe with use_sliding_window without layer_types is not supported"),
        ("olmoe", {"clip_qkv": 8.0}, r"olmoe with clip_qkv \(q, k, v clamped\) is not supported"),
    ],
)  # fmt: skip
def test_bad_config_is_named(tmp_path, mt, changes, match):
    build(mt, tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match) as info:
        qkv.load(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "config.json"))  # which file, in full


def test_fused_expert_tensors_are_reported(tmp_path):
    """transformers 5's in-memory layout (experts.gate_up_proj (e, 2f, m)) is not what
    save_pretrained writes; a file holding it is a strict missing / unexpected report."""
    from safetensors.torch import load_file, save_file

    build("mixtral", tmp_path)
    w = load_file(tmp_path / "model.safetensors")
    p = "model.layers.0.block_sparse_moe.experts."
    w[p + "gate_up_proj"] = torch.cat(
        [torch.stack([w.pop(f"{p}{e}.{n}.weight") for e in range(4)]) for n in ("w1", "w3")], 1
    )
    save_file(w, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"lacks 8 tensors .*\(8 missing: 'model\.layers\.0\.block_sparse_moe\.experts\.\d"
        r"\.w[13]\.weight'.*; it also holds 1 tensor .*: '"
        r"model\.layers\.0\.block_sparse_moe\.experts\.gate_up_proj'",
    ):
        qkv.load(tmp_path)


def test_decoder_config_checks_its_moe_fields():
    base = dict(name="t", n_layers=2, n_heads=2, n_kv_heads=1, d_model=8, d_head=4, d_ff=6,
                vocab_size=11, max_positions=16)  # fmt: skip
    moe = MoEConfig(4, 2, 5)
    assert DecoderConfig(**base, moe=moe).sparse_layers() == (True, True)
    assert DecoderConfig(**base).sparse_layers() == (False, False)
    with pytest.raises(ValueError, match=r"moe_layers needs moe"):
        DecoderConfig(**base, moe_layers=(True, False))
    with pytest.raises(ValueError, match=r"moe_layers must hold one bool per layer \(2\)"):
        DecoderConfig(**base, moe=moe, moe_layers=(True,))
    with pytest.raises(ValueError, match=r"moe experts are gated MLPs without biases"):
        DecoderConfig(**base, moe=moe, gated=False)
    with pytest.raises(ValueError, match=r"moe must be a qkv.nn.MoEConfig"):
        DecoderConfig(**base, moe={"n_experts": 4})
