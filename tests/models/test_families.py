"""Every Hugging Face family against transformers itself: a tiny random checkpoint per
`model_type` is built offline (AutoConfig.for_model → from_config → save_pretrained), loaded with
`qkv.load(folder)`, and compared in float32 and float64 (logits / last hidden state), through the
lens (`qkv.explain` rows vs `output_attentions=True`), and for decoders on 20 greedy tokens, with
and without the KV cache. Then the checks that prove the comparison can fail, and bad input.

Sizes are awkward on purpose: d_model 60, 6 query heads over 2 or 3 kv heads, d_ff 37, head_dim
14 ≠ 60/6 for qwen3, vocabulary 97, and sequences longer than mistral's window of 5.
"""

import dataclasses
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkv
from qkv.models import hf as qhf

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
tokenizers = pytest.importorskip("tokenizers")

os.environ["HF_HUB_OFFLINE"] = "1"

# max |Δ| / max |reference|: float32 within the 1e-4; float64 a rounding away
REL_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
# |Δ weight| of a lens row vs transformers' attention probabilities (fp32). Two fp32 forwards
# that sum in another order differ by ~100 ulp here (1.14e-5 measured on gemma with
# OMP_NUM_THREADS=1, whose matmuls split differently); a wrong lens is off by > 1e-3
LENS_TOL = 3e-5
N_GREEDY = 20
V = 97
WORDS = "the dog chased ball because it was excited round cat sat on mat and then ran far".split()

_DEC = dict(hidden_size=60, num_attention_heads=6, num_key_value_heads=2, intermediate_size=37,
            num_hidden_layers=2, vocab_size=V, max_position_embeddings=64)  # fmt: skip
_ENC = dict(hidden_size=60, num_attention_heads=5, intermediate_size=37, num_hidden_layers=2,
            vocab_size=V, max_position_embeddings=64)  # fmt: skip
FAMILIES = {
    # each family's peculiarity switched on
    "llama": dict(_DEC, attention_bias=True, mlp_bias=True, rope_theta=500.0),
    "mistral": dict(_DEC, sliding_window=5),
    "qwen2": dict(_DEC, num_key_value_heads=3),  # q/k/v biases, no o bias
    "qwen3": dict(_DEC, head_dim=14),  # QK-norm, head_dim ≠ d_model / n_heads
    # partial rotary (4 of 10 features), parallel residual, fused per-head interleaved qkv
    "gpt_neox": dict(
        _DEC, num_key_value_heads=None, rotary_pct=0.4, bos_token_id=0, eos_token_id=2
    ),
    # RMSNorm (1 + w), embeddings × √d, GeGLU with tanh GELU; head_dim ≠ d_model / n_heads
    "gemma": dict(
        _DEC,
        head_dim=14,
        hidden_act="gelu_pytorch_tanh",
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
    ),
    # pre/post norms, scores × 12^−½ capped at 3·tanh(s/3), logits at 5·tanh(l/5), layer 0
    # sliding (window 5) and layer 1 global, head_dim 14 ≠ 60/6
    "gemma2": dict(
        _DEC,
        head_dim=14,
        query_pre_attn_scalar=12,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=5.0,
        sliding_window=5,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    ),
    # Gemma 2's layout plus QK-norm (1 + w); six layers, five sliding (window 5, RoPE base 10)
    # to one global (base 1000); scores × 12^−½, head_dim 14 ≠ 60/6; no softcaps (as Gemma 3)
    "gemma3_text": dict(
        _DEC,
        num_hidden_layers=6,
        head_dim=14,
        query_pre_attn_scalar=12,
        sliding_window=5,
        rope_theta=1000.0,
        rope_local_base_freq=10.0,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    ),
    # fused qkv_proj and gate_up_proj; partial rotary (6 of 10); a window on every layer
    "phi3": dict(
        _DEC,
        partial_rotary_factor=0.6,
        sliding_window=5,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    ),
    # learned positions from 2, ReLU, LayerNorm after each sublayer (OPT-350m), no final norm
    "opt": dict(
        hidden_size=60,
        num_attention_heads=5,
        ffn_dim=37,
        num_hidden_layers=2,
        vocab_size=V,
        max_position_embeddings=64,
        do_layer_norm_before=False,
    ),
    "gpt2": dict(
        n_embd=60, n_head=5, n_layer=2, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    # NoPE on every 2nd layer (1 and 3), those layers sliding (window 5)
    "smollm3": dict(
        _DEC,
        num_hidden_layers=4,
        no_rope_layer_interval=2,
        use_sliding_window=True,
        sliding_window=5,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    ),
    # QK-norm over all heads' q (60) and k (20) features, after the q/k biases; norms after
    # each sublayer only
    "olmo2": dict(_DEC, attention_bias=True, pad_token_id=0, bos_token_id=0, eos_token_id=0),
    "granite": dict(
        _DEC,
        embedding_multiplier=3.0,
        residual_multiplier=0.4,
        attention_multiplier=0.05,
        logits_scaling=2.5,
    ),
    # LayerNorm with bias, plain tanh-GELU MLP, biases, a window on every layer
    "starcoder2": dict(_DEC, sliding_window=5, bos_token_id=0, eos_token_id=0),
    # one LayerNorm for attention and MLP in parallel, partial rotary (4 of 10), lm_head bias
    "phi": dict(_DEC, partial_rotary_factor=0.4),
    # ALiBi over 6 heads (4 + 2 interleaved slopes), embedding LayerNorm, fused per-head qkv
    "bloom": dict(
        hidden_size=60, n_head=6, n_layer=2, vocab_size=V, bos_token_id=0, eos_token_id=0
    ),
    "bert": dict(_ENC),
    "roberta": dict(_ENC, pad_token_id=1),  # positions start at pad_id + 1
    "distilbert": dict(
        dim=60, n_heads=5, hidden_dim=37, n_layers=2, vocab_size=V, max_position_embeddings=64
    ),
}
ENCODERS = ("bert", "roberta", "distilbert")
DECODERS = tuple(f for f in FAMILIES if f not in ENCODERS)


def word_tokenizer() -> "tokenizers.Tokenizer":
    """A word-level tokenizer over WORDS; ids 0 ([UNK]) and 1 ([PAD]) are never a word's."""
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tk


def randomise_(model: torch.nn.Module) -> None:
    """Weights of size 0.3 (norm gains 1 ± 0.3): HF's 0.02 init makes near-uniform attention
    and near-tied logits, which would hide errors and make greedy tokens fragile."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if (
                p.dim() == 1
                and name.endswith("weight")
                and any(s in name for s in ("norm", "ln_", "LayerNorm"))
            ):
                p.add_(1.0)


def build(model_type: str, folder, *, changes: dict | None = None, **save_kw):
    """A random `model_type` checkpoint (FAMILIES' config, updated by `changes`) saved in
    `folder`; returns the transformers model."""
    kw = {k: v for k, v in {**FAMILIES[model_type], **(changes or {})}.items() if v is not None}
    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    auto = transformers.AutoModel if model_type in ENCODERS else transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    m = auto.from_config(cfg, attn_implementation="eager").eval()
    randomise_(m)
    m.save_pretrained(folder, **save_kw)
    return m


def save_random(model_type: str, config: dict, folder, prepare=None):
    """A random `model_type` decoder checkpoint of `config`, eager attention and experts,
    weights by `randomise_` and then `prepare(model)` if given, saved in `folder` with the word
    tokenizer; returns the transformers model (eval)."""
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    randomise_(m)
    if prepare is not None:
        with torch.no_grad():
            prepare(m)
    m.save_pretrained(folder)
    word_tokenizer().save(str(folder / "tokenizer.json"))
    return m


def out(model, ids):
    o = model(ids)
    if isinstance(o, torch.Tensor):
        return o
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def float64_oracle_(ref, model) -> None:
    """transformers computes RoPE's angles and RMSNorm in float32 whatever the model's dtype
    (`.float()`, autocast off): ~1e-6 off float64. The float64 oracle gets them in float64, as
    qkv computes them (same formulas: half-split cos/sin of position · base^(−2p/r), r the
    rotated features; w · h / √(mean h² + eps))."""
    c = model.config
    d, rope_base = getattr(c, "rope_dim", None) or c.d_head, getattr(c, "rope_base", 1e4)

    def rotary(x, position_ids, base=rope_base):
        inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
        ang = position_ids[..., None].double() * inv  # (b i d/2)
        emb = torch.cat((ang, ang), -1)  # (b i d)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    for mod in ref.modules():
        if hasattr(mod, "inv_freq"):
            mod.forward = rotary
        if hasattr(mod, "layer_types") and hasattr(mod, "rope_type"):  # a base per layer type
            mod.forward = lambda x, position_ids, layer_type, m=mod: rotary(
                x, position_ids, m.config.rope_parameters[layer_type]["rope_theta"]
            )
        if hasattr(mod, "variance_epsilon"):  # RMSNorm, also computed in float32
            mod.forward = lambda h, m=mod: (
                m.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
            )
        if type(mod).__name__.startswith("Gemma") and type(mod).__name__.endswith("RMSNorm"):
            mod.forward = lambda h, m=mod: (  # also float32, and its gain is 1 + w
                (1 + m.weight) * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.eps))
            )
        if hasattr(mod, "embed_scale"):  # √d as a float32 buffer: float32's rounding of √d
            mod.embed_scale = torch.tensor(model.config.d_model**0.5, dtype=torch.float64)


def rel(got, ref) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(model_type, transformers model, qkv model, folder) for each family."""
    folder = tmp_path_factory.mktemp(request.param)
    ref = build(request.param, folder)
    word_tokenizer().save(str(folder / "tokenizer.json"))
    return request.param, ref, qkv.load(folder), folder


def ids_for(seed: int = 0, n: int = 24) -> torch.Tensor:
    return torch.randint(2, V, (1, n), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# parity


def greedy_three_ways(ref, model, prompt: torch.Tensor, n: int) -> tuple[list, list, list]:
    """n greedy tokens after `prompt` (1, i): transformers' `generate` (the oracle), ours with
    the KV cache, ours without it (whole sequences each step)."""
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=0)[0, prompt.shape[1] :].tolist()  # fmt: skip
    ids = prompt[0].tolist()
    cached = list(model.generate_ids(ids, n, stop_ids=()))
    return want, cached, list(model.generate_ids(ids, n, stop_ids=(), use_cache=False))


def keep_float64_softmax(monkeypatch) -> None:
    """transformers' eager decoders take the softmax in float32 (`dtype=torch.float32`): a
    float64 oracle keeps float64 there instead."""
    softmax = torch.nn.functional.softmax

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=x.dtype if x.dtype == torch.float64 else dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax64)


def output_error(ref, model, ids, dtype, monkeypatch, oracle_=float64_oracle_) -> float:
    """`rel` of our outputs (logits, or an encoder's last hidden state) against transformers' on
    ids, both models in dtype; in float64 after `oracle_(ref, model)` (it patches ref's modules'
    `forward`) and with a float64 softmax. Both go back to float32, unpatched, afterwards."""
    ref, model = ref.to(dtype), model.to(dtype)
    if dtype == torch.float64:
        oracle_(ref, model)
        keep_float64_softmax(monkeypatch)
    try:
        with torch.no_grad():
            return rel(out(model, ids), out(ref, ids))
    finally:
        ref.float(), model.float()
        for mod in ref.modules():
            mod.__dict__.pop("forward", None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_outputs_match_transformers(pair, dtype, monkeypatch):
    mt, ref, model, _ = pair
    assert type(model).__name__ == ("Encoder" if mt in ENCODERS else "Decoder")
    ids = torch.cat([ids_for(0), ids_for(1)])  # a batch of two
    err = output_error(ref, model, ids, dtype, monkeypatch)
    assert err <= REL_TOL[dtype], f"{mt} {dtype}: relative error {err:.2e}"


def padded_error(ref, model) -> float:
    """`rel` of our outputs on a right-padded batch of two (20 and 13 real tokens) against
    transformers' with its attention mask, over the real tokens."""
    ids = torch.cat([ids_for(2, 20), ids_for(3, 20)])
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[1, 13:] = False
    with torch.no_grad():
        got = model(ids, attention_mask=keep)
        want = ref(ids, attention_mask=keep.long())
    want = want.logits if hasattr(want, "logits") else want.last_hidden_state
    return rel(got[keep], want[keep])


def assert_lens_rows_match(ref, model, label) -> None:
    """The lens' rows of "it" in a sentence (every key, every layer and head) equal
    transformers' `output_attentions` rows within LENS_TOL, on the same keys."""
    text = "the dog chased the ball because it was excited and then ran far"
    ids = torch.tensor([model.tokenizer.encode(text).ids])
    with torch.no_grad():
        att = ref(ids, output_attentions=True).attentions  # per layer (b h i j)
    query = 6  # "it"
    r = qkv.explain(text, query, model=model, top=0, rollout=False, progress=False)
    assert len(r.layers) == model.config.n_layers
    for layer in r.layers:
        for h in layer.heads:
            want = att[layer.layer][0, h.head, query].double().numpy()
            got = dict(zip(h.index.tolist(), h.weight.tolist(), strict=True))
            where = (label, layer.layer, h.head)
            assert set(got) == {j for j in range(len(want)) if want[j] > 0}, where
            assert max(abs(got[j] - want[j]) for j in got) <= LENS_TOL, where


def test_padded_batch_matches_transformers(pair):
    """Right padding: the real tokens' outputs equal transformers' with its attention mask."""
    _, ref, model, _ = pair
    assert padded_error(ref, model) <= REL_TOL[torch.float32]


def test_lens_rows_match_output_attentions(pair):
    mt, ref, model, _ = pair
    assert_lens_rows_match(ref, model, mt)


@pytest.mark.parametrize("mt", DECODERS)
def test_greedy_tokens_and_cache(mt, tmp_path):
    ref = build(mt, tmp_path)
    model = qkv.load(tmp_path)
    prompt = ids_for(5, 7)
    # no end token: greedy picks stay unsuppressed (Gemma's generation_config keeps eos 1)
    ref.generation_config.eos_token_id = None
    want, cached, uncached = greedy_three_ways(ref, model, prompt, N_GREEDY)
    assert cached == uncached == want


@pytest.mark.parametrize("where", ["config.json", "generation_config.json"])
def test_every_end_token_stops_generation_as_in_transformers(where, tmp_path):
    """eos_token_id as a list (Llama 3.1 Instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>),
    in config.json or in generation_config.json alone (which transformers' generate reads
    first): the second id ends the reply too. Oracle: transformers' greedy generate on the
    same folder. Before, only the first id stopped, and generation_config.json was not read."""
    ref = build("llama", tmp_path)
    prompt = ids_for(5, 7)
    ref.generation_config.eos_token_id = None
    free, _, _ = greedy_three_ways(ref, qkv.load(tmp_path), prompt, N_GREEDY)
    end = free[2]  # the third greedy token becomes an end token
    if where == "config.json":  # a folder without generation_config.json (it would rule)
        (tmp_path / "generation_config.json").unlink()
    path = tmp_path / where
    cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    cfg["eos_token_id"] = [V - 1 if end != V - 1 else V - 2, end]
    path.write_text(json.dumps(cfg), encoding="utf-8")
    peer = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want = peer.generate(prompt, max_new_tokens=N_GREEDY, do_sample=False,
                             pad_token_id=0)[0, prompt.shape[1] :].tolist()  # fmt: skip
    model = qkv.load(tmp_path)
    assert want[-1] == end and len(want) <= 3, want  # transformers stopped there
    assert list(model.generate_ids(prompt[0].tolist(), N_GREEDY)) == want
    assert model.config.end_ids == set(cfg["eos_token_id"])


def test_a_config_without_model_type_is_read_by_its_architectures_class():
    """Every family's head class, as transformers names it (its auto mappings: causal LM,
    masked LM, image-text-to-text), leads back to that family: the longest class prefix wins
    ("Qwen2MoeForCausalLM" is qwen2_moe's, not qwen2's)."""
    from transformers.models.auto import modeling_auto as auto

    from qkv.models.hf import family_of

    heads = (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
             auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)  # fmt: skip
    checked = 0
    for mt in qkv.models.families.FAMILIES:
        for cls in {m[mt] for m in heads if mt in m}:
            assert family_of({"architectures": [cls]}, "config.json").model_type == mt, cls
            checked += 1
    assert checked >= len(qkv.models.families.FAMILIES)


def test_sharded_checkpoint_and_architectures_fallback(tmp_path):
    ref = build("qwen3", tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    del cfg["model_type"]  # the architecture then comes from `architectures`
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = qkv.load(tmp_path)
    assert model.tokenizer is None
    ids = ids_for(7)
    with torch.no_grad():
        assert rel(model(ids), ref(ids).logits) <= REL_TOL[torch.float32]


# --------------------------------------------------------------------------------------------
# the checks can fail


def _parity_error(model, ref) -> float:
    ids = ids_for(9)
    with torch.no_grad():
        return rel(out(model, ids), out(ref, ids))


def test_dropping_the_qk_norm_breaks_parity(tmp_path):
    ref = build("qwen3", tmp_path)
    model = qkv.load(tmp_path)
    assert _parity_error(model, ref) <= REL_TOL[torch.float32]
    for block in model.blocks:
        block.attn.q_norm = block.attn.k_norm = None
    assert _parity_error(model, ref) > 100 * REL_TOL[torch.float32]


def test_interleaved_rotary_breaks_parity(tmp_path):
    ref = build("llama", tmp_path)
    model = qkv.load(tmp_path)
    rope = model.blocks[0].attn.rope  # shared by every layer
    rope.interleaved, rope._pairs = True, None
    rope._tables.clear()
    assert _parity_error(model, ref) > 100 * REL_TOL[torch.float32]


def test_ignoring_the_sliding_window_breaks_parity(tmp_path):
    ref = build("mistral", tmp_path)
    model = qkv.load(tmp_path)
    assert model.blocks[0].attn.window == (4, 0)
    for block in model.blocks:
        block.attn.window = None
    assert _parity_error(model, ref) > 100 * REL_TOL[torch.float32]


def test_ignoring_the_partial_rotary_breaks_parity(tmp_path):
    ref = build("gpt_neox", tmp_path)
    model = qkv.load(tmp_path)
    rope = model.blocks[0].attn.rope
    assert rope.rotary_dim == 4 and _parity_error(model, ref) <= REL_TOL[torch.float32]
    rope.rotary_dim, rope._pairs = rope.d_head, None  # rotate every feature
    rope._tables.clear()
    assert _parity_error(model, ref) > 100 * REL_TOL[torch.float32]


def test_a_sequential_residual_breaks_parallel_parity(tmp_path):
    ref = build("gpt_neox", tmp_path)
    model = qkv.load(tmp_path)
    for block in model.blocks:
        assert isinstance(block, qkv.nn.ParallelBlock)
        block.__class__ = qkv.nn.PreNormBlock  # mlp reads x + attn, not x
    assert _parity_error(model, ref) > 100 * REL_TOL[torch.float32]


def test_sequential_gpt_neox_matches(tmp_path):
    ref = build("gpt_neox", tmp_path, changes={"use_parallel_residual": False})
    model = qkv.load(tmp_path)
    assert isinstance(model.blocks[0], qkv.nn.PreNormBlock)
    assert _parity_error(model, ref) <= REL_TOL[torch.float32]


def test_pre_norm_opt_matches_and_the_position_offset_matters(tmp_path):
    ref = build("opt", tmp_path, changes={"do_layer_norm_before": True})
    model = qkv.load(tmp_path)
    assert isinstance(model.blocks[0], qkv.nn.PreNormBlock) and model.config.final_norm
    assert _parity_error(model, ref) <= REL_TOL[torch.float32]
    model.config = dataclasses.replace(model.config, position_offset=0)  # from 0, as GPT-2's
    assert _parity_error(model, ref) > 100 * REL_TOL[torch.float32]


def test_splitting_phi3_qkv_in_the_wrong_order_breaks_parity(tmp_path):
    ref = build("phi3", tmp_path)
    model = qkv.load(tmp_path)
    assert _parity_error(model, ref) <= REL_TOL[torch.float32]
    for block in model.blocks:  # gate and up swapped: the halves of gate_up_proj
        block.mlp.gate, block.mlp.up = block.mlp.up, block.mlp.gate
    assert _parity_error(model, ref) > 100 * REL_TOL[torch.float32]


def test_a_plain_rms_gain_breaks_gemma_parity(tmp_path):
    ref = build("gemma", tmp_path)
    model = qkv.load(tmp_path)
    assert _parity_error(model, ref) <= REL_TOL[torch.float32]
    for m in model.modules():
        if isinstance(m, qkv.nn.RMSNorm):
            assert m.offset == 1.0
            m.offset = 0.0  # scale by w, as Llama, not by 1 + w
    assert _parity_error(model, ref) > 100 * REL_TOL[torch.float32]


def test_gemma2_layers_and_what_breaks_its_parity(tmp_path):
    ref = build("gemma2", tmp_path)
    model = qkv.load(tmp_path)
    assert [b.attn.window for b in model.blocks] == [(4, 0), None]
    assert _parity_error(model, ref) <= REL_TOL[torch.float32]
    breaks = {
        "no attention softcap": (lambda b: setattr(b.attn, "softcap", None)),
        "1/√d_head scale": (lambda b: setattr(b.attn, "scale", None)),
        "no window": (lambda b: setattr(b.attn, "window", None)),
        "no post-norms": (lambda b: setattr(b, "__class__", qkv.nn.PreNormBlock)),
    }
    for what, edit in breaks.items():
        broken = qkv.load(tmp_path)
        for block in broken.blocks:
            edit(block)
        assert _parity_error(broken, ref) > 100 * REL_TOL[torch.float32], what
    model.config = dataclasses.replace(model.config, logit_softcap=None)
    assert _parity_error(model, ref) > 100 * REL_TOL[torch.float32], "no logit softcap"


def test_gemma3_layers_and_what_breaks_its_parity(tmp_path):
    ref = build("gemma3_text", tmp_path)
    model = qkv.load(tmp_path)
    assert [b.attn.window for b in model.blocks] == [(4, 0)] * 5 + [None]
    assert [b.attn.rope.base for b in model.blocks] == [10.0] * 5 + [1000.0]
    assert model.blocks[0].attn.rope is model.blocks[4].attn.rope  # shared per base
    assert _parity_error(model, ref) <= REL_TOL[torch.float32]
    breaks = {  # `glob`: the broken model's own global-layer RoPE, bound below
        "no QK-norm": (lambda b: setattr(b.attn, "q_norm", None) or setattr(b.attn, "k_norm", None)),
        "the global base on local layers": (lambda b: setattr(b.attn, "rope", glob)),
        "no window": (lambda b: setattr(b.attn, "window", None)),
    }  # fmt: skip
    for what, edit in breaks.items():
        broken = qkv.load(tmp_path)
        glob = broken.blocks[5].attn.rope
        for block in broken.blocks:
            edit(block)
        assert _parity_error(broken, ref) > 100 * REL_TOL[torch.float32], what


def test_gemma3_older_config_fields(tmp_path):
    """Configs from before rope_parameters / layer_types: rope_theta, rope_local_base_freq and
    sliding_window_pattern give the same model."""
    ref = build("gemma3_text", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
        del cfg[key]
    cfg.update(rope_theta=1000.0, rope_local_base_freq=10.0, sliding_window_pattern=3)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = qkv.load(tmp_path)
    assert [b.attn.rope.base for b in model.blocks] == [10.0, 10.0, 1000.0] * 2
    assert [b.attn.window for b in model.blocks] == [(4, 0), (4, 0), None] * 2
    del cfg["sliding_window_pattern"]  # Gemma 3's default: every sixth layer global
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = qkv.load(tmp_path)
    assert [b.attn.window for b in model.blocks] == [(4, 0)] * 5 + [None]
    assert _parity_error(model, ref) <= REL_TOL[torch.float32]


def test_gemma3_rope_scaling_is_named(tmp_path):
    """linear, llama3, yarn, longrope and dynamic load (tests/models/test_rope_scaling.py);
    another rope_type is named."""
    build("gemma3_text", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    cfg["rope_parameters"]["full_attention"].update(rope_type="ntk_by_parts", factor=8.0)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"rope scaling rope_parameters.full_attention.rope_type='ntk_by_parts' is not",
    ):
        qkv.load(tmp_path)


# --------------------------------------------------------------------------------------------
# names and paths


def test_a_folder_named_like_a_bundled_model_does_not_shadow_it(tmp_path, monkeypatch):
    build("llama", tmp_path / "minilm")
    build("gpt2", tmp_path / "mygpt")
    monkeypatch.chdir(tmp_path)
    assert type(qkv.load("./minilm")).__name__ == "Decoder"  # a path: contains a separator
    assert type(qkv.load("mygpt")).__name__ == "Decoder"  # no bundled model has this name
    bundled = qkv.load("minilm")
    assert type(bundled).__name__ == "Encoder" and bundled.config.name == "minilm"


def test_cli_explain_takes_a_folder(tmp_path, capsys):
    from qkv.cli import main

    build("qwen2", tmp_path)
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    text = "the dog chased the ball because it was excited"
    assert main(["explain", text, "--token", "it", "--model", str(tmp_path)]) == 0
    assert "it" in capsys.readouterr().out


def test_without_a_tokenizer_ids_work_and_text_is_a_clear_error(tmp_path):
    ref = build("gpt2", tmp_path)
    model = qkv.load(tmp_path)
    assert _parity_error(model, ref) <= REL_TOL[torch.float32]
    with pytest.raises(ValueError, match=r"has no tokenizer .* generate reads and writes text; put "
                       r"the checkpoint's tokenizer\.json beside its config\.json\. With token ids, "
                       r"call generate_ids\(ids\)"):  # fmt: skip
        model.generate("the dog")


# --------------------------------------------------------------------------------------------
# bad input: one clear error, nothing half-loaded


@pytest.fixture
def folder(tmp_path):
    build("llama", tmp_path)
    return tmp_path


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    w = load_file(folder / "model.safetensors")
    fn(w)
    save_file(w, folder / "model.safetensors")


def test_unknown_model_type_lists_the_supported(folder):
    _edit_config(folder, model_type="mamba", architectures=["MambaForCausalLM"])
    with pytest.raises(
        ValueError, match=r"model_type='mamba' is not supported.*'distilbert'.*'qwen3'"
    ):
        qkv.load(folder)


def test_unsupported_feature_is_named(folder):
    _edit_config(
        folder, rope_parameters={"rope_type": "ntk_by_parts", "rope_theta": 1e4, "factor": 2.0}
    )
    with pytest.raises(ValueError, match=r"rope scaling.*not supported"):
        qkv.load(folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_key_value_heads": 4},
         r"num_attention_heads=6 must be a multiple of num_key_value_heads=4 \(GQA\)"),
        ({"hidden_size": "60"}, r"hidden_size must be a positive int, got '60'"),
        ({"num_attention_heads": 0}, r"num_attention_heads must be a positive int, got 0"),
        ({"num_hidden_layers": 2.0}, r"num_hidden_layers must be a positive int, got 2\.0"),
        # 0 is not "absent": it was read as GPT-2's n_inner=None, 4 × hidden_size
        ({"intermediate_size": 0}, r"intermediate_size must be a positive int, got 0"),
        ({"head_dim": 15},
         r"RoPE needs an even head_dim and rope_parameters\.rope_theta > 1, got 15, 500\.0"),
        ({"eos_token_id": 97}, r"eos_token_id=97 is outside the vocabulary \[0, 97\)"),
        ({"max_position_embeddings": None}, r"max_position_embeddings is missing"),
    ],
)  # fmt: skip
def test_config_errors_name_the_config_json_keys(folder, changes, message):
    """A person edits config.json: its errors say num_key_value_heads, not DecoderConfig's
    n_kv_heads (the whole message is matched, so no field name of qkv's is left in it)."""
    _edit_config(folder, **changes)  # None: null, which reads as absent
    where = re.escape(str(folder / "config.json"))
    with pytest.raises(ValueError, match=rf"^{where}: {message}$"):
        qkv.load(folder)


def test_a_config_built_in_python_keeps_its_field_names():
    """The same mistakes in a DecoderConfig made in Python are said in Python's names."""
    from qkv.models.decoder import DecoderConfig

    ok = dict(name="x", n_layers=1, n_heads=4, n_kv_heads=2, d_model=64, d_head=16, d_ff=64,
              vocab_size=10, max_positions=8)  # fmt: skip
    DecoderConfig(**ok)
    with pytest.raises(
        ValueError, match=r"^DecoderConfig: n_heads=4 must be a multiple of n_kv_heads=3 \(GQA\)$"
    ):
        DecoderConfig(**{**ok, "n_kv_heads": 3})
    with pytest.raises(
        ValueError, match=r"^DecoderConfig\.d_model must be a positive int, got '64'$"
    ):
        DecoderConfig(**{**ok, "d_model": "64"})


def test_a_field_config_json_did_not_set_keeps_the_config_s_name():
    """A derived value (d_head = hidden_size / heads) is not renamed after a key that does not
    hold it, and then the message keeps "DecoderConfig" to say whose names these are."""
    from qkv.models.families_base import in_file_terms

    fields = frozenset({"n_heads", "d_head", "rope_dim"})
    said = "DecoderConfig: rope_dim must be an even int in (0, d_head=10], got 3"
    assert in_file_terms(said, "DecoderConfig", {"d_head": "head_dim"}, fields) == (
        "DecoderConfig: rope_dim must be an even int in (0, head_dim=10], got 3"
    )
    assert in_file_terms(said, "DecoderConfig", {}, fields) == said
    said = "DecoderConfig.n_heads must be a positive int, got 0"
    assert in_file_terms(said, "DecoderConfig", {"n_heads": "n_head"}, fields) == (
        "n_head must be a positive int, got 0"
    )


def test_missing_and_unexpected_tensors_are_reported(folder):
    def fn(w):
        del w["model.layers.1.mlp.up_proj.weight"]
        w["model.layers.1.mlp.extra.weight"] = torch.zeros(3)

    _edit_weights(folder, fn)
    with pytest.raises(
        ValueError,
        match=r"lacks tensor 'model\.layers\.1\.mlp\.up_proj\.weight' .*\(1 missing; it also "
        r"holds 1 tensor .* does not have: 'model\.layers\.1\.mlp\.extra\.weight'",
    ):
        qkv.load(folder)


def test_shape_mismatch_names_the_tensor(folder):
    _edit_weights(
        folder, lambda w: w.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(20, 61)})
    )
    with pytest.raises(
        ValueError, match=r"k_proj\.weight' has shape \(20, 61\).*expects \(2, 60, 10\)"
    ):
        qkv.load(folder)


def test_config_contradicting_the_tensors(folder):
    _edit_config(folder, intermediate_size=38)
    with pytest.raises(
        ValueError, match=r"gate_proj\.weight' has shape \(37, 60\).*expects \(38, 60\)"
    ):
        qkv.load(folder)


def test_nan_weights(folder):
    def fn(w):
        w["model.norm.weight"][3] = float("inf")

    _edit_weights(folder, fn)
    with pytest.raises(ValueError, match=r"norm\.weight' contains NaN or inf"):
        qkv.load(folder)


def test_truncated_safetensors(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        qkv.load(folder)


def test_shard_missing_a_tensor_its_index_lists(tmp_path):
    build("llama", tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text(encoding="utf-8"))
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(
        iter(index["weight_map"].values())
    )
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError,
        match=r"maps tensor 'model\.layers\.9\.mlp\.up_proj\.weight' to "
        r"model-\d+-of-\d+\.safetensors, but that shard lacks it; is the index",
    ):
        qkv.load(tmp_path)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        qkv.load(tmp_path / "nowhere")
    with pytest.raises(
        FileNotFoundError,
        match=rf"^{re.escape(str(tmp_path))} is a folder without config\.json, so not a "
        r"checkpoint: .*one of \['gemma3', 'minilm', 'smollm2'\]",
    ):
        qkv.load(tmp_path)
    for empty in ("", "  "):  # not the current directory, which Path("") is
        with pytest.raises(
            ValueError,
            match=r"^the model name or path is empty \('\s*'\): give a bundled name, one of "
            r"\['gemma3', 'minilm', 'smollm2'\], a checkpoint folder or a \.gguf file$",
        ):
            qkv.load(empty)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors nor"):
        qhf.read_weights(tmp_path)
