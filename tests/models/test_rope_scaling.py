"""RoPE scaling against transformers: tiny random Llama checkpoints with rope_type "llama3",
"linear" and "yarn" (also Qwen3, and GPT-NeoX's partial rotary with DeepSeek's mscale pair),
and Gemma 3 with "linear" on its global layers (as transformers applies it), built
offline and compared in float32 and float64 on positions past `original_max_position_embeddings`
(logits, 10 greedy tokens with and without the KV cache); a tiny llama GGUF carrying llama.cpp's
per-pair `rope_freqs.weight` (computed here by llama.cpp's converter rule) against the
transformers model it was written from. Then: without the scaling the logits move far past the
tolerance, and another rope_type is a clear error. LongRoPE (Phi-3 128k) and dynamic NTK at the
end: their frequencies follow each call's last position; a LongRoPE cached decode re-rotates
every key once past L, a dynamic one rotates each new key by its own step's frequencies.

Sizes as tests/models/test_families.py: d_head 10, base 500, so the wavelengths 6.3, 21.7, 75,
260, 900 fall in all three branches of the Llama 3 rule with L = 32 (kept < 8, smoothed 8 … 32,
divided > 32); sequences of 48 tokens reach position 47 > 32.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch

import qkv
from qkv.nn import RopeScaling
from tests.models.test_families import (
    FAMILIES,
    REL_TOL,
    float64_oracle_,
    greedy_three_ways,
    output_error,
    randomise_,
    rel,
)
from tests.nn.test_rope_scaling import yarn_divisors

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")

N_GREEDY = 10
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # fmt: skip
LINEAR = {"rope_type": "linear", "factor": 8.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
YARN_MSCALE = {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 8.0, "beta_slow": 2.0}
CASES = {
    "llama-yarn": ("llama", YARN),  # pairs kept, ramped and divided; cos/sin × 1.139
    "qwen3-yarn": ("qwen3", YARN),  # head_dim 14, QK-norm before the rotation
    "gpt_neox-yarn": ("gpt_neox", YARN_MSCALE),  # 4 of 10 features rotate (× 1.065), 6 pass
    "llama-llama3": ("llama", LLAMA3),
    "llama-linear": ("llama", LINEAR),
    "qwen2-llama3": ("qwen2", LLAMA3),  # another family reading the same rope parameters
    "gemma3_text-linear": ("gemma3_text", LINEAR),  # on the full_attention layers only
}


def build(model_type: str, rope_scaling: dict, folder, **changes):
    """A random `model_type` checkpoint (FAMILIES' config, updated by `changes`) with
    `rope_scaling`, saved in `folder`; returns the transformers model."""
    cfg = transformers.AutoConfig.for_model(
        model_type, **{**FAMILIES[model_type], **changes}, rope_scaling=dict(rope_scaling)
    )
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomise_(m)
    m.save_pretrained(folder)
    m.generation_config.eos_token_id = None  # greedy picks stay unsuppressed
    return m


def yarn_oracle(d: int, base: float, p: dict) -> tuple[list[float], float]:
    """YaRN's frequencies θ_p / s_p (tests/nn's `yarn_divisors`, the paper's ramp) and its
    cos/sin factor 0.1·ln(factor) + 1, or DeepSeek's ratio with mscale, mscale_all_dim."""
    f, L = p["factor"], p["original_max_position_embeddings"]
    s = yarn_divisors(d, base, f, L, p.get("beta_fast", 32.0), p.get("beta_slow", 1.0))
    theta = [base ** (-2.0 * i / d) / s[i] for i in range(d // 2)]
    if "mscale" in p:
        m = (0.1 * p["mscale"] * math.log(f) + 1) / (0.1 * p["mscale_all_dim"] * math.log(f) + 1)
    else:
        m = 0.1 * math.log(f) + 1
    return theta, m


def plain_inv_freq(d: int, base: float, params: dict | None) -> torch.Tensor:
    """θ_p = base^(−2p/d), scaled as transformers' linear / llama3 / yarn functions say;
    float64 (YaRN's cos/sin factor: `yarn_oracle`)."""
    theta = [base ** (-2.0 * p / d) for p in range(d // 2)]
    kind = (params or {}).get("rope_type", "default")
    if kind == "yarn":
        theta = yarn_oracle(d, base, params)[0]
    elif kind == "linear":
        theta = [t / params["factor"] for t in theta]
    elif kind == "llama3":
        f, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        L = params["original_max_position_embeddings"]
        out = []
        for t in theta:
            wl = 2 * math.pi / t
            if wl < L / hi:
                out.append(t)
            elif wl > L / lo:
                out.append(t / f)
            else:
                s = (L / wl - lo) / (hi - lo)
                out.append((1 - s) * t / f + s * t)
        theta = out
    else:
        assert kind == "default", kind
    return torch.tensor(theta, dtype=torch.float64)


def float64_scaled_oracle_(ref, model) -> None:
    """test_families' float64 oracle (RMSNorm, embed_scale in float64), with RoPE's angles from
    `plain_inv_freq` of each layer type's rope parameters."""
    float64_oracle_(ref, model)
    d = model.blocks[0].attn.rope.rotary_dim

    def rotary(x, position_ids, params):
        ang = position_ids[..., None].double() * plain_inv_freq(d, params["rope_theta"], params)
        emb = torch.cat((ang, ang), -1)
        m = (
            yarn_oracle(d, params["rope_theta"], params)[1]
            if params.get("rope_type") == "yarn"
            else 1
        )
        return (m * emb.cos()).to(x.dtype), (m * emb.sin()).to(x.dtype)

    rp = ref.config.rope_parameters
    for mod in ref.modules():
        if hasattr(mod, "layer_types") and hasattr(mod, "rope_type"):  # Gemma 3
            mod.forward = lambda x, position_ids, layer_type: rotary(
                x, position_ids, rp[layer_type]
            )
        elif hasattr(mod, "inv_freq"):
            mod.forward = lambda x, position_ids: rotary(x, position_ids, rp)


def ids_for(seed: int, n: int = 48) -> torch.Tensor:
    return torch.randint(2, FAMILIES["llama"]["vocab_size"], (1, n),
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    model_type, scaling = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    ref = build(model_type, scaling, folder)
    return request.param, ref, qkv.load(folder)


def test_config_reads_the_scaling(pair):
    name, ref, model = pair
    c = model.config
    if name.startswith("gemma3"):
        # transformers scales the full_attention layers only (its rope_parameters per type)
        assert ref.config.rope_parameters["sliding_attention"]["rope_type"] == "default"
        assert ref.config.rope_parameters["full_attention"]["rope_type"] == "linear"
        kinds = [None if s is None else s.rope_type for s in c.rope_scalings]
        assert kinds == [None if t == "sliding_attention" else "linear"
                         for t in ref.config.layer_types]  # fmt: skip
        assert None in kinds and "linear" in kinds
    else:
        assert c.rope_scaling.rope_type == CASES[name][1]["rope_type"] and c.rope_scalings is None
    assert all(b.attn.rope.scaling is s for b, s in
               zip(model.blocks, c.rope_scalings or [c.rope_scaling] * c.n_layers, strict=True))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_match_transformers(pair, dtype, monkeypatch):
    name, ref, model = pair
    ids = torch.cat([ids_for(0), ids_for(1)])
    err = output_error(ref, model, ids, dtype, monkeypatch, float64_scaled_oracle_)
    assert err <= REL_TOL[dtype], f"{name} {dtype}: relative error {err:.2e}"


def test_greedy_tokens_with_and_without_cache(pair):
    """A 30-token prompt and 10 greedy tokens: positions 30 … 39 cross L = 32."""
    _, ref, model = pair
    prompt = ids_for(5, 30)
    want, cached, uncached = greedy_three_ways(ref, model, prompt, N_GREEDY)
    assert cached == uncached == want


def test_without_the_scaling_parity_breaks(pair):
    name, ref, model = pair
    ids = ids_for(9)
    with torch.no_grad():
        assert rel(model(ids), ref(ids).logits) <= REL_TOL[torch.float32]
        for b in model.blocks:
            b.attn.rope.scaling, b.attn.rope._tables, b.attn.rope._pairs = None, {}, None
        try:
            err = rel(model(ids), ref(ids).logits)
        finally:  # the fixture's model is shared: rebuild the scaled tables
            c = model.config
            for b, s in zip(model.blocks, c.rope_scalings or [c.rope_scaling] * c.n_layers,
                            strict=True):  # fmt: skip
                b.attn.rope.scaling, b.attn.rope._tables, b.attn.rope._pairs = s, {}, None
    assert err > 100 * REL_TOL[torch.float32], f"{name}: {err:.2e}"


# --------------------------------------------------------------------------------------------
# config.json forms and refusals


def _folder(tmp_path, **edit):
    build("llama", LLAMA3, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    for k, v in edit.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_old_config_rope_scaling_with_type_is_read(tmp_path):
    """Llama 3.1's config.json: `rope_scaling` beside `rope_theta`; Llama 2 era: `type`."""
    folder = _folder(tmp_path, rope_parameters=None, rope_theta=500.0,
                     rope_scaling={"type": "linear", "factor": 2.0})  # fmt: skip
    s = qkv.load(folder).config.rope_scaling
    assert (s.rope_type, s.factor) == ("linear", 2.0)
    folder = _folder(tmp_path, rope_parameters=None, rope_theta=500.0, rope_scaling=LLAMA3)
    s = qkv.load(folder).config.rope_scaling
    assert (s.rope_type, s.original_max_positions, s.high_freq_factor) == ("llama3", 32, 4.0)


def test_yarn_config_forms_read_as_transformers_reads_them(tmp_path):
    """Qwen2.5's long-context form (`rope_scaling` with `type` yarn); a top-level
    `original_max_position_embeddings` winning over the dict's (transformers' Phi-3 rule); an
    llama3/yarn dict without one taking max_position_embeddings; beta 0 meaning the default.
    Each against the frequencies and attention factor transformers computes for that config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    forms = [
        dict(rope_parameters=None, rope_theta=500.0, rope_scaling={"type": "yarn", "factor": 4.0,
             "original_max_position_embeddings": 16}),
        dict(original_max_position_embeddings=16, rope_parameters={**YARN, "rope_theta": 500.0}),
        dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 500.0,
                              "beta_fast": 0, "attention_factor": 0.9}),
    ]  # fmt: skip
    for edit in forms:
        folder = _folder(tmp_path, **edit)
        model = qkv.load(folder)
        cfg = transformers.AutoConfig.from_pretrained(folder)
        want, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
        rope = model.blocks[0].attn.rope
        assert rope.scaling.rope_type == "yarn", edit
        assert rope.scaling.attention_factor == pytest.approx(attention_factor, rel=1e-12), edit
        assert ((rope.inv_freq() - want.double()).abs() / want.double()).max() <= 1e-6, edit


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "ntk_by_parts", "factor": 2.0},
        {"rope_type": "su", "short_factor": [1.0] * 5, "long_factor": [2.0] * 5},
    ],
)
def test_other_rope_types_are_a_clear_error(tmp_path, params):
    folder = _folder(tmp_path, rope_parameters={**params, "rope_theta": 500.0})
    kind = params["rope_type"]
    with pytest.raises(
        ValueError,
        match=rf"config.json: rope scaling rope_parameters.rope_type='{kind}' is not supported; "
        r"qkv implements rope_type 'linear', 'llama3', 'yarn', 'longrope', 'dynamic' "
        r"\(and 'default'\)",
    ):
        qkv.load(folder)


def test_gemma3_unknown_scaling_on_a_layer_type_is_named(tmp_path):
    build("gemma3_text", LINEAR, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    cfg["rope_parameters"]["full_attention"].update(rope_type="ntk_by_parts", factor=8.0)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"rope_parameters.full_attention.rope_type='ntk_by_parts'"
    ):
        qkv.load(tmp_path)


def test_missing_llama3_parameter_is_named(tmp_path):
    params = {k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}
    folder = _folder(tmp_path, rope_parameters={**params, "rope_theta": 500.0})
    with pytest.raises(ValueError, match=r"rope_type 'llama3' lacks \['low_freq_factor'\]"):
        qkv.load(folder)


# --------------------------------------------------------------------------------------------
# GGUF: llama.cpp's rope_freqs.weight and rope.scaling.type linear (YaRN, and Qwen's scaling:
# test_gguf_rope_scaling.py)


def llama_cpp_rope_freqs(d: int, base: float, p: dict) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py writes for rope_type llama3: one divisor per pair,
    1 (short waves), factor (long), 1 / ((1 − s)/factor + s) in between; float32."""
    f, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    L = p["original_max_position_embeddings"]
    out = []
    for i in range(0, d, 2):
        wl = 2 * math.pi / base ** (-i / d)
        if wl < L / hi:
            out.append(1.0)
        elif wl > L / lo:
            out.append(f)
        else:
            s = (L / wl - lo) / (hi - lo)
            out.append(1 / ((1 - s) / f + s))
    return np.array(out, dtype=np.float32)


def write_llama_gguf(path, ref, *, rope_freqs=None, kv=None):
    """The transformers Llama `ref` as llama.cpp writes it: q/k rows permuted for its
    interleaved RoPE, a byte vocabulary (the tokenizer is not what is tested here)."""
    gguf = pytest.importorskip("gguf", reason="the gguf package writes the tiny files")
    from qkv.models.gguf import permute_qk

    c = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    for key, val in {"block_count": c.num_hidden_layers, "context_length": 64,
                     "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
                     "attention.head_count": c.num_attention_heads,
                     "attention.head_count_kv": c.num_key_value_heads}.items():  # fmt: skip
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.rope.freq_base", c.rope_parameters["rope_theta"])
    w.add_float32("llama.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    for key, val in (kv or {}).items():  # a str, an int (uint32, as llama.cpp's counts) or float32
        add = w.add_string if isinstance(val, str) else w.add_float32
        (w.add_uint32 if isinstance(val, int) and not isinstance(val, bool) else add)(
            f"llama.{key}", val
        )
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = [chr(0x21 + i) for i in range(c.vocab_size - 1)] + ["AB"]  # "!", '"', ...
    w.add_token_list(tokens)
    w.add_token_types([1] * c.vocab_size)
    w.add_token_merges(["A B"])
    w.add_eos_token_id(0)
    sd = {k: v.detach().float() for k, v in ref.state_dict().items()}
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if not c.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    for i in range(c.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        names |= {
            f"model.layers.{i}.input_layernorm.weight": f"blk.{i}.attn_norm.weight",
            f"model.layers.{i}.post_attention_layernorm.weight": f"blk.{i}.ffn_norm.weight",
            a + "q_proj.weight": f"blk.{i}.attn_q.weight", a + "k_proj.weight": f"blk.{i}.attn_k.weight",
            a + "v_proj.weight": f"blk.{i}.attn_v.weight", a + "o_proj.weight": f"blk.{i}.attn_output.weight",
            m + "gate_proj.weight": f"blk.{i}.ffn_gate.weight", m + "up_proj.weight": f"blk.{i}.ffn_up.weight",
            m + "down_proj.weight": f"blk.{i}.ffn_down.weight",
        }  # fmt: skip
    for src, dst in names.items():
        t = sd[src]
        if dst.endswith("attn_q.weight"):
            t = permute_qk(t, c.num_attention_heads)
        elif dst.endswith("attn_k.weight"):
            t = permute_qk(t, c.num_key_value_heads)
        w.add_tensor(dst, t.numpy())
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# a Llama without biases (llama.cpp's llama architecture has none)
GGUF_LLAMA = {**FAMILIES["llama"], "attention_bias": False, "mlp_bias": False}


def _hf_llama(scaling, folder):
    cfg = transformers.AutoConfig.for_model("llama", **GGUF_LLAMA, rope_scaling=dict(scaling))
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomise_(m)
    m.generation_config.eos_token_id = None
    return m


@pytest.mark.parametrize("kind", ["rope_freqs", "linear"])
def test_gguf_scaling_matches_transformers(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))
    if kind == "rope_freqs":
        ref = _hf_llama(LLAMA3, tmp_path)
        freqs = llama_cpp_rope_freqs(10, GGUF_LLAMA["rope_theta"], LLAMA3)
        assert freqs[0] == 1.0 and 1 < freqs[1] < 8 and (freqs[2:] == 8).all()
        path = write_llama_gguf(tmp_path / "x.gguf", ref, rope_freqs=freqs)
    else:
        ref = _hf_llama(LINEAR, tmp_path)
        kv = {"rope.scaling.type": "linear", "rope.scaling.factor": 8.0}
        path = write_llama_gguf(tmp_path / "x.gguf", ref, kv=kv)
    model = qkv.load(str(path))
    assert model.config.rope_scaling is not None
    assert "rope_freqs.weight" in model.load_report.ignored or kind == "linear"
    ids = torch.cat([ids_for(0), ids_for(1)])
    with torch.no_grad():
        want = ref(ids).logits
        assert rel(model(ids), want) <= REL_TOL[torch.float32]
    greedy, cached, uncached = greedy_three_ways(ref, model, ids_for(5, 30), N_GREEDY)
    assert cached == uncached == greedy
    # the check can fail: the same file read without its scaling
    for b in model.blocks:
        b.attn.rope.scaling, b.attn.rope._tables, b.attn.rope._pairs = None, {}, None
    with torch.no_grad():
        assert rel(model(ids), want) > 100 * REL_TOL[torch.float32]


def test_gguf_other_scaling_type_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))
    ref = _hf_llama(LINEAR, tmp_path)
    kv = {"rope.scaling.type": "longrope", "rope.scaling.factor": 4.0}
    path = write_llama_gguf(tmp_path / "x.gguf", ref, kv=kv)
    with pytest.raises(
        ValueError, match=r"llama GGUF uses RoPE scaling llama.rope.scaling.type='longrope', "
        r"which qkv does not implement for llama; it reads 'linear' and 'yarn'",
    ):  # fmt: skip
        qkv.load(str(path))


def test_gguf_rope_freqs_of_the_wrong_length_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))
    ref = _hf_llama(LLAMA3, tmp_path)
    path = write_llama_gguf(tmp_path / "x.gguf", ref, rope_freqs=np.ones(4, dtype=np.float32))
    with pytest.raises(
        ValueError, match=r"x.gguf: DecoderConfig: rope scaling has 4 freq_factors for the 5 "
    ):
        qkv.load(str(path))


def test_gemma3_gguf_linear_scales_the_global_layers(tmp_path, monkeypatch):
    """Gemma 3 4B+ as llama.cpp writes it: rope.scaling.type linear, factor 8, which llama.cpp
    applies to the global layers only. transformers' GGUF loader does not read the key, so the
    oracle is its model with rope_parameters.full_attention made linear × 8 (transformers' own
    Gemma 3 rule), the file's weights loaded into it."""
    from tests.models.test_gemma3 import ids_for as gemma_ids
    from tests.models.test_gemma3 import tiny_gemma3
    from tests.oracles import gguf_reference

    kv = {"rope.scaling.type": "linear", "rope.scaling.factor": 8.0}
    path = tiny_gemma3(tmp_path / "g.gguf", kv=kv)
    plain = gguf_reference(path)[0]
    assert plain.config.rope_parameters["full_attention"]["rope_type"] == "default"
    cfg = copy.deepcopy(plain.config)
    cfg.rope_parameters["full_attention"].update(rope_type="linear", factor=8.0)
    ref = type(plain)(cfg).eval()
    ref.load_state_dict(plain.state_dict())
    ref.generation_config.eos_token_id = None
    monkeypatch.setenv("QKV_CACHE_DIR", str(tmp_path / "cache"))
    model = qkv.load(str(path))
    kinds = [None if s is None else (s.rope_type, s.factor) for s in model.config.rope_scalings]
    assert kinds == [None] * 5 + [("linear", 8.0), None]  # layer 5 is the global one
    ids = gemma_ids(3, 40)
    with torch.no_grad():
        want = ref(ids).logits
        assert rel(model(ids), want) <= REL_TOL[torch.float32]
        assert rel(model(ids), plain(ids).logits) > 100 * REL_TOL[torch.float32]
    greedy, cached, uncached = greedy_three_ways(ref, model, ids[:, :30], N_GREEDY)
    assert cached == uncached == greedy


# --------------------------------------------------------------------------------------------
# LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): the factors follow each call's last position

LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.5, 2.5],
    "long_factor": [1.0, 4.0, 9.0],
}
L_ORIG = 32  # original_max_position_embeddings; max_position_embeddings 128: factor 4


@pytest.fixture(scope="module")
def phi3_longrope(tmp_path_factory):
    """Phi-3 with rotary_dim 6 (3 pairs), no window, LongRoPE from L = 32 to 128 positions."""
    folder = tmp_path_factory.mktemp("phi3-longrope")
    ref = build("phi3", LONGROPE, folder, sliding_window=None, max_position_embeddings=128,
                original_max_position_embeddings=L_ORIG)  # fmt: skip
    return ref, qkv.load(folder)


def longrope_oracle_(ref, model) -> None:
    """test_families' float64 oracle with RoPE's angles in float64: short factors for a call
    whose positions end before L, long ones past it, cos/sin × √(1 + ln 4 / ln 32)."""
    float64_oracle_(ref, model)
    r, base = model.blocks[0].attn.rope.rotary_dim, ref.config.rope_parameters["rope_theta"]
    m = math.sqrt(1 + math.log(128 / L_ORIG) / math.log(L_ORIG))

    def rotary(x, position_ids):
        long = int(position_ids.max()) + 1 > L_ORIG
        fs = LONGROPE["long_factor" if long else "short_factor"]
        theta = torch.tensor([base ** (-2.0 * p / r) / fs[p] for p in range(r // 2)],
                             dtype=torch.float64)  # fmt: skip
        ang = position_ids[..., None].double() * theta
        emb = torch.cat((ang, ang), -1)
        return (m * emb.cos()).to(x.dtype), (m * emb.sin()).to(x.dtype)

    for mod in ref.modules():
        if hasattr(mod, "inv_freq"):
            mod.forward = rotary


def test_longrope_config_is_read(phi3_longrope):
    _, model = phi3_longrope
    s = model.config.rope_scaling
    assert (s.rope_type, s.original_max_positions) == ("longrope", L_ORIG)
    assert (s.short_factors, s.long_factors) == (tuple(LONGROPE["short_factor"]),
                                                 tuple(LONGROPE["long_factor"]))  # fmt: skip
    assert s.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(32)))


@pytest.mark.parametrize("n", [30, 48])  # within L (short factors), past it (long ones)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_longrope_logits_match_transformers(phi3_longrope, n, dtype, monkeypatch):
    ref, model = phi3_longrope
    ids = torch.cat([ids_for(0, n), ids_for(1, n)])
    err = output_error(ref, model, ids, dtype, monkeypatch, longrope_oracle_)
    assert err <= REL_TOL[dtype], f"n={n} {dtype}: relative error {err:.2e}"


def test_longrope_greedy_across_the_switch_cached_and_uncached(phi3_longrope):
    """A 28-token prompt and 10 tokens, positions 28 … 37 crossing L = 32. At the first step
    past L every key turns to the long factors: ours re-runs the whole sequence there, as
    transformers' Phi-3 drops its cache there; without the cache every step re-rotates all."""
    ref, model = phi3_longrope
    prompt = ids_for(5, 28)
    want, cached, uncached = greedy_three_ways(ref, model, prompt, N_GREEDY)
    assert cached == uncached == want
    with torch.no_grad():
        want_uncached = ref.generate(prompt, max_new_tokens=N_GREEDY, min_new_tokens=N_GREEDY,
                                     do_sample=False, use_cache=False,
                                     pad_token_id=0)[0, prompt.shape[1]:].tolist()  # fmt: skip
    assert uncached == want_uncached
    # the check can fail: keeping the prompt's short-rotated keys past L changes the tokens
    from qkv.models import generate as qgenerate

    real = qgenerate.longrope_switch
    try:
        qgenerate.longrope_switch = lambda m: None
        stale = list(model.generate_ids(prompt[0].tolist(), N_GREEDY, stop_ids=()))
    finally:
        qgenerate.longrope_switch = real
    assert stale != want


def test_longrope_choice_per_call_matters(phi3_longrope):
    """The check can fail: always short, or always long, moves the logits far off."""
    ref, model = phi3_longrope
    rope_scaling = model.config.rope_scaling
    for n, forced in [(48, "short_factors"), (30, "long_factors")]:
        ids = ids_for(2, n)
        with torch.no_grad():
            want = ref(ids).logits
            assert rel(model(ids), want) <= REL_TOL[torch.float32]
            fs = getattr(rope_scaling, forced)
            wrong = RopeScaling.longrope(fs, fs, L_ORIG, factor=4.0)
            try:
                for b in model.blocks:
                    b.attn.rope.scaling, b.attn.rope._tables, b.attn.rope._pairs = wrong, {}, None
                err = rel(model(ids), want)
            finally:
                for b in model.blocks:
                    b.attn.rope.scaling, b.attn.rope._tables = rope_scaling, {}
                    b.attn.rope._pairs = None
        assert err > 100 * REL_TOL[torch.float32], (n, forced, err)


def test_yarn_extends_the_context_to_original_times_factor(tmp_path):
    """Qwen2.5's long-context recipe adds YaRN (× 4 from 32) to a config whose
    max_position_embeddings stays at its original length: qkv takes 4 · 32 = 128 positions
    (transformers sets no limit), and 100 tokens match transformers; without YaRN the limit
    stays max_position_embeddings."""
    params = {**YARN, "rope_theta": 500.0}
    folder = _folder(tmp_path, rope_parameters=params, max_position_embeddings=32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    model = qkv.load(folder)
    assert model.config.max_positions == 128
    ids = ids_for(3, 100)
    with torch.no_grad():
        assert rel(model(ids), ref.eval()(ids).logits) <= REL_TOL[torch.float32]
    with pytest.raises(ValueError, match=r"129 positions .* exceed .* context of 128 tokens"):
        model(ids_for(3, 129))
    plain = qkv.load(_folder(tmp_path, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                             max_position_embeddings=32))  # fmt: skip
    assert plain.config.max_positions == 32


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"rope_type": "yarn", "factor": "4", "original_max_position_embeddings": 32},
         r"rope_parameters: RopeScaling: factor must be a finite number > 0, got '4'"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0},
         r"original_max_positions must be a positive int, got 0"),
        ({"rope_type": "yarn", "factor": 4.0, "truncate": "yes",
          "original_max_position_embeddings": 32}, r"truncate must be a bool, got 'yes'"),
        ({"rope_type": "longrope", "short_factor": ["a"] * 5, "long_factor": [1.0] * 5,
          "original_max_position_embeddings": 32}, r"short_factors\[0\] must be a finite number"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3,
          "original_max_position_embeddings": 32},
         r"DecoderConfig: rope scaling has 3 short_factors for the 5 rotated pairs"),
    ],
)  # fmt: skip
def test_malformed_scaling_is_named_with_its_file(tmp_path, params, message):
    folder = _folder(tmp_path, rope_parameters={**params, "rope_theta": 500.0})
    with pytest.raises(ValueError, match=message) as info:
        qkv.load(folder)
    assert str(info.value).startswith(str(folder / "config.json"))


# --------------------------------------------------------------------------------------------
# dynamic NTK: the base grows with each call's length past L = max_position_embeddings

DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}
L_DYN = 32


def dynamic_pair(tmp_path, model_type="llama"):
    """A fresh transformers model (its dynamic RoPE keeps state across calls) and ours, with
    max_position_embeddings L_DYN."""
    ref = build(model_type, DYNAMIC, tmp_path, max_position_embeddings=L_DYN)
    return ref, qkv.load(tmp_path)


def dynamic_oracle_(ref, model) -> None:
    """test_families' float64 oracle, RoPE's angles from the float64 formula
    (tests/nn's `dynamic_theta`) for the call's own length max(position) + 1."""
    from tests.nn.test_rope_scaling import dynamic_theta

    float64_oracle_(ref, model)
    r, base = model.blocks[0].attn.rope.rotary_dim, model.config.rope_base

    def rotary(x, position_ids):
        n = int(position_ids.max()) + 1
        theta = torch.tensor(
            dynamic_theta(r, base, DYNAMIC["factor"], L_DYN, n), dtype=torch.float64
        )
        emb = torch.cat((ang := position_ids[..., None].double() * theta, ang), -1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    for mod in ref.modules():
        if hasattr(mod, "inv_freq"):
            mod.forward = rotary


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])  # gpt_neox: 4 of 10 rotate
@pytest.mark.parametrize("n", [30, 48])  # within L (plain), past it (a larger base)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dynamic_logits_match_transformers(tmp_path, model_type, n, dtype, monkeypatch):
    ref, model = dynamic_pair(tmp_path, model_type)
    s = model.config.rope_scaling
    assert (s.rope_type, s.factor, s.original_max_positions) == ("dynamic", 2.0, L_DYN)
    assert model.config.max_positions == 2 * L_DYN  # L · factor, what the scaling is made for
    ids = torch.cat([ids_for(0, n), ids_for(1, n)])
    err = output_error(ref, model, ids, dtype, monkeypatch, dynamic_oracle_)
    assert err <= REL_TOL[dtype], f"{model_type} n={n} {dtype}: relative error {err:.2e}"


def test_dynamic_greedy_across_l_cached_and_uncached(tmp_path):
    """A 28-token prompt and 10 tokens, positions 28 … 37 crossing L = 32: cached, each new key
    rotates by its own step's frequencies (the earlier keys keep theirs), as transformers'
    cached generate; uncached, every step re-rotates all, as its use_cache=False."""
    ref, model = dynamic_pair(tmp_path)
    prompt = ids_for(5, 28)
    want, cached, uncached = greedy_three_ways(ref, model, prompt, N_GREEDY)
    assert cached == want
    ref2, _ = dynamic_pair(tmp_path)
    with torch.no_grad():
        want_uncached = ref2.generate(prompt, max_new_tokens=N_GREEDY, min_new_tokens=N_GREEDY,
                                      do_sample=False, use_cache=False,
                                      pad_token_id=0)[0, prompt.shape[1]:].tolist()  # fmt: skip
    assert uncached == want_uncached


def test_without_dynamic_past_l_parity_breaks(tmp_path):
    """The check can fail: the plain frequencies past L move the logits far off."""
    ref, model = dynamic_pair(tmp_path)
    ids = ids_for(2, 60)
    with torch.no_grad():
        want = ref(ids).logits
        assert rel(model(ids), want) <= REL_TOL[torch.float32]
        for b in model.blocks:
            b.attn.rope.scaling, b.attn.rope._tables, b.attn.rope._pairs = None, {}, None
        err = rel(model(ids), want)
    assert err > 100 * REL_TOL[torch.float32], err
