"""RoPE scaling read from GGUF files: llama.cpp's YaRN (rope.scaling.type yarn: Qwen2.5 / Qwen3
long-context files) for llama, qwen2 and qwen3, linear for qwen2 and qwen3 (llama's linear
and rope_freqs are in test_rope_scaling.py), and Phi-3's LongRoPE factor tensors (at the end).

First the formula: llama.cpp's rope_yarn (ggml's CPU kernel, with its correction dims), written
here in float64, equals `RopeScaling.yarn(factor, n_ctx_orig, beta_fast, beta_slow,
attention_factor=attn_factor·(1 + 0.1·ln factor))` on the cos/sin tables the model reads; where
the two rules part (an empty correction range) the reader refuses the file.

Then parity: transformers' GGUF loader does not read RoPE scaling, so the oracle is the
transformers model of the file's weights built with the matching `rope_parameters` (llama: the
HF model written into a GGUF as llama.cpp's converter does, `write_llama_gguf`; qwen2 / qwen3:
the tiny GGUF read by transformers' loader, its weights moved into a model with yarn / linear
rope_parameters, as test_rope_scaling's Gemma 3 case). Float32 logits within 1e-4 on sequences
reaching past original_context_length, greedy tokens equal with and without the KV cache, and
the same model without its scaling far off (> 100× the tolerance). Last, the YaRN keys qkv
does not implement are clear errors naming the key and its value.
"""

import copy
import math

import numpy as np
import pytest
import torch

from qkv.models import gguf as qgguf
from qkv.models import gguf_families
from qkv.nn import RopeScaling, RotaryEmbedding
from tests.models.test_families import greedy_three_ways, rel
from tests.models.test_gguf_families import ARCHS, load_cached, reference, tiny_gguf
from tests.models.test_gguf_families import ids_for as arch_ids
from tests.models.test_rope_scaling import _hf_llama, ids_for, write_llama_gguf

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
pytest.importorskip("gguf", reason="the gguf package writes the tiny files")

REL_TOL = 1e-4  # float32 logits: max |Δ| / max |reference|
N_GREEDY = 10


# --------------------------------------------------------------------------------------------
# llama.cpp's formula


def llama_cpp_rope_yarn(n_dims, base, n_ctx_orig, factor, beta_fast, beta_slow, attn_factor,
                        positions, ext_factor=1.0):  # fmt: skip
    """cos, sin (positions, n_dims/2) as ggml's CPU rope computes them for rope.scaling.type yarn
    (ggml_rope_yarn_corr_dims, rope_yarn_ramp, rope_yarn), in float64."""

    def corr_dim(n_rot):
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(beta_fast)))
    high = min(n_dims - 1.0, math.ceil(corr_dim(beta_slow)))
    freq_scale = 1.0 / factor
    cos = np.zeros((len(positions), n_dims // 2))
    sin = np.zeros_like(cos)
    for a, pos in enumerate(positions):
        for i0 in range(0, n_dims, 2):
            theta_extrap = pos * base ** (-i0 / n_dims)
            theta_interp = freq_scale * theta_extrap
            y = (i0 // 2 - low) / max(0.001, high - low)
            ramp_mix = (1 - min(1.0, max(0.0, y))) * ext_factor
            theta = theta_interp * (1 - ramp_mix) + theta_extrap * ramp_mix
            mscale = attn_factor * (1.0 + 0.1 * math.log(1.0 / freq_scale))
            cos[a, i0 // 2] = math.cos(theta) * mscale
            sin[a, i0 // 2] = math.sin(theta) * mscale
    return cos, sin


def ours(n_dims, base, n_ctx_orig, factor, beta_fast, beta_slow, attn_factor, positions):
    """The same from qkv's tables (half-split: pair p is features p and p + d/2)."""
    s = RopeScaling.yarn(factor, n_ctx_orig, beta_fast=beta_fast, beta_slow=beta_slow,
                         attention_factor=attn_factor * (1 + 0.1 * math.log(factor)))  # fmt: skip
    cos_w, sin_w = RotaryEmbedding(n_dims, base, scaling=s).tables(
        max(positions) + 1, torch.device("cpu"), torch.float64
    )
    P = n_dims // 2
    return cos_w[positions, :P].numpy(), sin_w[positions, P:].numpy()


POSITIONS = [0, 1, 7, 31, 32, 33, 100, 1000, 4095, 4096, 9999]
# n_dims, base, n_ctx_orig, factor, beta_fast, beta_slow, attn_factor
FORMULA_CASES = {
    "qwen3-128k": (128, 1e6, 32768, 4.0, 32.0, 1.0, 1.0),  # pairs 23 … 40 ramp
    "qwen2.5-64d": (64, 1e6, 32768, 4.0, 32.0, 1.0, 1.0),
    "llama-betas-attn": (128, 5e5, 8192, 8.0, 16.0, 2.0, 0.9),  # both ends inside the head
    "hi-clamped": (16, 10.0, 4096, 2.0, 32.0, 1.0, 1.0),  # ⌈c(beta_slow)⌉ > n_dims − 1
    "lo-equals-hi": (16, 1e4, 64, 2.0, 2.0, 5.0, 1.0),  # the 0.001 guard (lo = hi = 1)
    "tiny-test-file": (10, 500.0, 32, 4.0, 32.0, 1.0, 1.0),  # c(beta_fast) < 0: lo clamped
    "qwen2-test-file": (16, 1000.0, 16, 4.0, 32.0, 1.0, 1.0),
}


@pytest.mark.parametrize("case", list(FORMULA_CASES))
def test_llama_cpp_yarn_equals_rope_scaling_yarn(case):
    args = FORMULA_CASES[case]
    want_cos, want_sin = llama_cpp_rope_yarn(*args, POSITIONS)
    got_cos, got_sin = ours(*args, POSITIONS)
    scale = args[-1] * (1 + 0.1 * math.log(args[3]))
    # angles up to 1e4 rad: float64 rounding of pos·θ is ~1e-12 of a unit; cos/sin follow it
    assert np.abs(got_cos - want_cos).max() <= 1e-9 * scale, case
    assert np.abs(got_sin - want_sin).max() <= 1e-9 * scale, case
    # the check can fail: without YaRN's factor, or with the ramp reversed
    plain = RotaryEmbedding(args[0], args[1]).tables(max(POSITIONS) + 1, torch.device("cpu"),
                                                      torch.float64)[0]  # fmt: skip
    assert np.abs(plain[POSITIONS, : args[0] // 2].numpy() - want_cos).max() > 1e-3


def test_the_corr_dims_in_the_cases():
    """The cases cover what they claim: lo clamped to 0, hi clamped to n_dims − 1, lo == hi
    (each value against ggml_rope_yarn_corr_dims' rule, here in the reader)."""
    dims = {
        k: gguf_families._yarn_corr_dims(a[0], a[2], a[1], a[4], a[5])
        for k, a in FORMULA_CASES.items()
    }
    assert dims["qwen3-128k"] == (23, 40)
    assert dims["tiny-test-file"] == (0, 2)  # c(32) < 0
    assert dims["hi-clamped"] == (10, 15)  # c(1) = 22.5
    assert dims["lo-equals-hi"][0] == dims["lo-equals-hi"][1] > 0
    assert 0 < dims["llama-betas-attn"][0] < dims["llama-betas-attn"][1] < 127


def test_an_empty_correction_range_is_where_the_rules_part():
    """beta_slow turning 100 times over L = 32: ⌈c(100)⌉ < 0 = lo. llama.cpp's ramp divides by
    max(0.001, hi − lo) = 0.001, transformers' by hi − lo < 0: different frequencies, which is
    why the reader refuses such a file (test_unsupported_yarn_keys_are_clear_errors)."""
    args = (16, 1000.0, 32, 4.0, 200.0, 100.0, 1.0)
    lo, hi = gguf_families._yarn_corr_dims(16, 32, 1000.0, 200.0, 100.0)
    assert hi < lo == 0
    want_cos, _ = llama_cpp_rope_yarn(*args, POSITIONS)
    got_cos, _ = ours(*args, POSITIONS)
    assert np.abs(got_cos - want_cos).max() > 0.1


# --------------------------------------------------------------------------------------------
# parity against transformers

L_ORIG = 16  # original_context_length in the files: the 40-token prompts reach 2.5 L
YARN_HF = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L_ORIG}
YARN_KV = {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
           "rope.scaling.original_context_length": L_ORIG}  # fmt: skip
# non-default betas and llama.cpp's attn_factor (× the mscale): transformers' attention_factor
BETAS_HF = {**YARN_HF, "beta_fast": 8.0, "beta_slow": 2.0,
            "attention_factor": 0.9 * (1 + 0.1 * math.log(4.0))}  # fmt: skip
BETAS_KV = {**YARN_KV, "rope.scaling.yarn_beta_fast": 8.0, "rope.scaling.yarn_beta_slow": 2.0,
            "rope.scaling.attn_factor": 0.9}  # fmt: skip
LINEAR_HF = {"rope_type": "linear", "factor": 8.0}
LINEAR_KV = {"rope.scaling.type": "linear", "rope.scaling.factor": 8.0}
CASES = {
    "llama-yarn": ("llama", YARN_HF, YARN_KV),
    "llama-yarn-betas": ("llama", BETAS_HF, BETAS_KV),
    "qwen2-yarn": ("qwen2", YARN_HF, YARN_KV),  # d_head 16, q/k/v biases
    "qwen3-yarn": ("qwen3", YARN_HF, YARN_KV),  # d_head 128, QK-norm
    "qwen3-yarn-betas": ("qwen3", BETAS_HF, BETAS_KV),
    "qwen2-linear": ("qwen2", LINEAR_HF, LINEAR_KV),
    "qwen3-linear": ("qwen3", LINEAR_HF, LINEAR_KV),
}


def scaled_reference(path, rope_parameters):
    """transformers' reading of the GGUF `path` (RoPE unscaled: its loader ignores the keys),
    its weights moved into the same model class built with `rope_parameters`."""
    plain = reference(path)
    assert plain.config.rope_parameters["rope_type"] == "default"
    cfg = copy.deepcopy(plain.config)
    cfg.rope_parameters = {
        **rope_parameters,
        "rope_theta": plain.config.rope_parameters["rope_theta"],
    }
    ref = type(plain)(cfg).eval()
    ref.load_state_dict(plain.state_dict(), strict=True)
    ref.generation_config.eos_token_id = None
    return ref


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    arch, hf, kv = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    if arch == "llama":
        ref = _hf_llama(hf, folder)
        path = write_llama_gguf(folder / "x.gguf", ref, kv=kv)

        def ids(seed, n):
            return ids_for(seed, n)
    else:
        path = tiny_gguf(folder / "x.gguf", ARCHS[arch], kv=kv)
        ref = scaled_reference(path, hf)

        def ids(seed, n):
            return arch_ids(ARCHS[arch], seed, n)

    model = load_cached(path, folder)
    return request.param, ref, model, ids


def test_config_reads_the_scaling(case):
    name, ref, model, _ = case
    s, hf = model.config.rope_scaling, CASES[name][1]
    assert s.rope_type == hf["rope_type"] and s.factor == hf["factor"]
    assert all(b.attn.rope.scaling is s for b in model.blocks)
    if s.rope_type == "yarn":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](ref.config)
        assert s.original_max_positions == L_ORIG
        assert (s.beta_fast, s.beta_slow) == (hf.get("beta_fast", 32.0), hf.get("beta_slow", 1.0))
        assert s.attention_factor == pytest.approx(attention_factor, rel=1e-6)  # float32 key
        got = model.blocks[0].attn.rope.inv_freq()
        assert ((got - inv_freq.double()).abs() / inv_freq.double()).max() <= 1e-6


def test_logits_match_transformers(case):
    name, ref, model, ids = case
    x = torch.cat([ids(0, 40), ids(1, 40)])  # positions 0 … 39: past L = 16
    with torch.no_grad():
        err = rel(model(x), ref(x).logits)
    assert err <= REL_TOL, f"{name}: {err:.2e}"


def test_greedy_tokens_with_and_without_cache(case):
    _, ref, model, ids = case
    want, cached, uncached = greedy_three_ways(ref, model, ids(5, 24), N_GREEDY)
    assert len(want) == N_GREEDY and cached == uncached == want


def test_without_the_scaling_parity_breaks(case):
    name, ref, model, ids = case
    x = ids(9, 40)
    s = model.config.rope_scaling
    with torch.no_grad():
        want = ref(x).logits
        assert rel(model(x), want) <= REL_TOL
        try:
            for b in model.blocks:
                b.attn.rope.scaling, b.attn.rope._tables, b.attn.rope._pairs = None, {}, None
            err = rel(model(x), want)
        finally:  # the fixture's model is shared: rebuild the scaled tables
            for b in model.blocks:
                b.attn.rope.scaling, b.attn.rope._tables, b.attn.rope._pairs = s, {}, None
    assert err > 100 * REL_TOL, f"{name}: {err:.2e}"


def test_original_context_length_defaults_to_context_length(tmp_path):
    """llama.cpp's n_ctx_orig_yarn is context_length (64 in the tiny files) when the key is absent."""
    kv = {k: v for k, v in YARN_KV.items() if not k.endswith("original_context_length")}
    path = tiny_gguf(tmp_path / "x.gguf", ARCHS["qwen2"], kv=kv)
    s = gguf_families.config_from_gguf(qgguf.read_gguf(path, cache_dir=False)).rope_scaling
    assert (s.rope_type, s.original_max_positions, s.factor) == ("yarn", 64, 4.0)
    assert s.attention_factor == pytest.approx(1 + 0.1 * math.log(4.0))


def test_yarn_context_is_original_times_factor(tmp_path):
    """A Qwen2.5 file keeps context_length at the original 64 (llama.cpp is run with -c 256 to
    use YaRN): qkv's limit is 64 · 4; a file without scaling keeps 64."""
    kv = {**YARN_KV, "rope.scaling.original_context_length": 64}
    path = tiny_gguf(tmp_path / "x.gguf", ARCHS["qwen2"], kv=kv)
    assert (
        gguf_families.config_from_gguf(qgguf.read_gguf(path, cache_dir=False)).max_positions == 256
    )
    path = tiny_gguf(tmp_path / "y.gguf", ARCHS["qwen2"])
    assert (
        gguf_families.config_from_gguf(qgguf.read_gguf(path, cache_dir=False)).max_positions == 64
    )


# --------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize(
    ("arch", "kv", "message"),
    [
        ("qwen2", {**YARN_KV, "rope.scaling.yarn_ext_factor": 0.5},
         r"'qwen2.rope.scaling.yarn_ext_factor' is 0.5: qkv implements YaRN's full ramp only"),
        ("qwen3", {**YARN_KV, "rope.scaling.yarn_log_multiplier": 0.1},
         r"'qwen3.rope.scaling.yarn_log_multiplier' is 0.10000000149011612: DeepSeek's mscale"),
        ("qwen2", {**YARN_KV, "rope.scaling.yarn_attn_factor": 1.25},
         r"'qwen2.rope.scaling.yarn_attn_factor' is 1.25: transformers' attention_factor"),
        ("qwen2", {**YARN_KV, "rope.scaling.yarn_beta_fast": 200.0,
                   "rope.scaling.yarn_beta_slow": 100.0},
         r"YaRN's correction range is empty: lo=0 > hi=-4 for 16 rotated dims"),
        ("qwen3", {"rope.scaling.type": "yarn"},
         r"qwen3.rope.scaling.type is yarn but 'qwen3.rope.scaling.factor' is missing"),
        ("qwen2", {**YARN_KV, "rope.scaling.factor": 0.0},
         r"RopeScaling: factor must be a finite number > 0, got 0.0"),
        ("qwen2", {**LINEAR_KV, "rope.scaling.attn_factor": 0.5},
         r"this qwen2 GGUF uses qwen2.rope.scaling.attn_factor=0.5 with "
         r"qwen2.rope.scaling.type='linear' \(cos and sin scaled without YaRN\)"),
        ("gemma2", YARN_KV, r"this gemma2 GGUF uses RoPE scaling \(<arch>.rope.scaling.type"),
    ],
)  # fmt: skip
def test_unsupported_yarn_keys_are_clear_errors(tmp_path, arch, kv, message):
    path = tiny_gguf(tmp_path / "x.gguf", ARCHS[arch], kv=kv)
    with pytest.raises(ValueError, match=message) as e:
        gguf_families.config_from_gguf(qgguf.read_gguf(path, cache_dir=False))
    assert str(path) in str(e.value)


def test_gemma3_yarn_is_refused(tmp_path):
    """Gemma 3 reads linear only (on its global layers); YaRN there is not read differently."""
    from tests.models.test_gemma3 import tiny_gemma3

    path = tiny_gemma3(tmp_path / "g.gguf", kv={"rope.scaling.type": "yarn",
                                                 "rope.scaling.factor": 8.0})  # fmt: skip
    with pytest.raises(ValueError, match=r"gemma3.rope.scaling.type='yarn', which qkv does not "
                       r"implement for gemma3; it reads 'linear'"):  # fmt: skip
        gguf_families.config_from_gguf(qgguf.read_gguf(path, cache_dir=False))


def test_llama_yarn_with_rope_freqs_is_refused(tmp_path):
    ref = _hf_llama(YARN_HF, tmp_path)
    path = write_llama_gguf(tmp_path / "x.gguf", ref, kv=YARN_KV,
                            rope_freqs=np.full(5, 2.0, dtype=np.float32))  # fmt: skip
    with pytest.raises(ValueError, match=r"llama.rope.scaling.type yarn with a rope_freqs.weight"):
        gguf_families.config_from_gguf(qgguf.read_gguf(path, cache_dir=False))


# --------------------------------------------------------------------------------------------
# Phi-3's LongRoPE: rope_factors_short / rope_factors_long tensors, as llama.cpp's converter
# writes them (with rope.scaling.attn_factor and original_context_length, no scaling type)

SHORT = np.array([1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5], dtype=np.float32)  # 8 pairs: d 16
LONG = np.array([1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0], dtype=np.float32)
M_LONGROPE = math.sqrt(1 + math.log(64 / L_ORIG) / math.log(L_ORIG))  # context_length 64


def phi3_longrope_gguf(path, **changes):
    """A tiny Phi-3 GGUF with LongRoPE; `changes`: metadata keys (rope.…) to set, or keys and
    tensors to leave out (None)."""
    kv = {"rope.scaling.attn_factor": M_LONGROPE, "rope.scaling.original_context_length": L_ORIG}
    tensors = {"rope_factors_short.weight": SHORT, "rope_factors_long.weight": LONG}
    for k, v in changes.items():
        where = kv if k.startswith("rope.") else tensors
        if v is None:
            del where[k]
        else:
            where[k] = v
    return tiny_gguf(path, ARCHS["phi3"], kv=kv, extra_tensors=tensors)


@pytest.fixture(scope="module")
def phi3_longrope(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3-longrope")
    path = phi3_longrope_gguf(folder / "x.gguf")
    plain = reference(path)
    cfg = copy.deepcopy(plain.config)
    cfg.original_max_position_embeddings = L_ORIG  # Phi-3's top-level key wins in transformers
    cfg.rope_parameters = {
        "rope_type": "longrope", "short_factor": SHORT.tolist(), "long_factor": LONG.tolist(),
        "original_max_position_embeddings": L_ORIG,
        "rope_theta": plain.config.rope_parameters["rope_theta"],
    }  # fmt: skip
    ref = type(plain)(cfg).eval()
    ref.load_state_dict(plain.state_dict(), strict=True)
    ref.generation_config.eos_token_id = None
    model = load_cached(path, folder)
    return ref, model


def test_phi3_longrope_is_read_as_transformers_computes_it(phi3_longrope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ref, model = phi3_longrope
    s = model.config.rope_scaling
    assert (s.rope_type, s.original_max_positions) == ("longrope", L_ORIG)
    _, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](ref.config)
    assert s.attention_factor == pytest.approx(attention_factor, rel=1e-6)  # a float32 key
    assert "rope_factors_long.weight" in model.load_report.ignored


@pytest.mark.parametrize("n", [12, 40])  # within L = 16 (short factors), past it (long)
def test_phi3_longrope_logits_match_transformers(phi3_longrope, n):
    ref, model = phi3_longrope
    x = torch.cat([arch_ids(ARCHS["phi3"], 0, n), arch_ids(ARCHS["phi3"], 1, n)])
    with torch.no_grad():
        assert rel(model(x), ref(x).logits) <= REL_TOL


def test_phi3_longrope_greedy_across_l(phi3_longrope):
    """A 10-token prompt, 10 tokens: the step to position 16 turns every key to the long set
    (transformers' Phi-3 drops its cache there; qkv re-runs the sequence once)."""
    ref, model = phi3_longrope
    want, cached, uncached = greedy_three_ways(ref, model, arch_ids(ARCHS["phi3"], 5, 10), N_GREEDY)
    assert cached == uncached == want


def test_phi3_without_longrope_parity_breaks(phi3_longrope):
    ref, model = phi3_longrope
    x = arch_ids(ARCHS["phi3"], 9, 40)
    s = model.config.rope_scaling
    with torch.no_grad():
        want = ref(x).logits
        try:
            for b in model.blocks:
                b.attn.rope.scaling, b.attn.rope._tables, b.attn.rope._pairs = None, {}, None
            err = rel(model(x), want)
        finally:
            for b in model.blocks:
                b.attn.rope.scaling, b.attn.rope._tables, b.attn.rope._pairs = s, {}, None
    assert err > 100 * REL_TOL


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_factors_long.weight": None}, r"LongRoPE needs both rope_factors_short.weight "
         r"and rope_factors_long.weight; \['rope_factors_long.weight'\] is missing"),
        ({"rope.scaling.original_context_length": None},
         r"LongRoPE needs 'phi3.rope.scaling.original_context_length' \(a positive int\), got None"),
        ({"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0},
         r"phi3.rope.scaling.type='yarn' with LongRoPE factor tensors is not implemented"),
    ],
)  # fmt: skip
def test_phi3_longrope_errors_are_named(tmp_path, changes, message):
    path = phi3_longrope_gguf(tmp_path / "x.gguf", **changes)
    with pytest.raises(ValueError, match=message):
        gguf_families.config_from_gguf(qgguf.read_gguf(path, cache_dir=False))
