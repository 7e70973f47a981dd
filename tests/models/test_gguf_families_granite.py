"""The GGUF families `granite` and `granitemoe` against transformers' Granite / GraniteMoe.

transformers' GGUF loader reads neither architecture, so the oracle is a tiny random
transformers model written here into a GGUF by the rules of llama.cpp's converter
(`convert_hf_to_gguf.py`), re-typed in this file rather than taken from qkv's reader:

* GraniteModel subclasses LlamaModel: architecture "granite", llama.cpp's Llama tensor names,
  q_proj rows permuted by `LlamaModel.permute(w, n_head, n_head)` and k_proj's by
  `permute(w, n_head, n_kv_head)` (`_llama_permute`), and the Llama keys; plus the four
  multipliers renamed: attention_multiplier → `granite.attention.scale`,
  embedding_multiplier → `granite.embedding_scale`, residual_multiplier →
  `granite.residual_scale`, logits_scaling → `granite.logit_scale` (gguf-py's
  Keys.Attention.SCALE, Keys.LLM.EMBEDDING_SCALE / RESIDUAL_SCALE / LOGIT_SCALE);
* GraniteMoeModel subclasses GraniteModel under "granitemoe": Hugging Face's input_linear
  (e, 2f, m) split by rows into `ffn_gate_exps` (the first f) and `ffn_up_exps`, output_linear
  (e, m, f) as `ffn_down_exps`, the router as `ffn_gate_inp` (kept float32 by the converter),
  `expert_count` / `expert_used_count` from num_local_experts / num_experts_per_tok.

Q8_0 files: every matrix (2-D and the 3-D experts) quantised with gguf-py, and the oracle's
weights replaced by gguf-py's dequantisation of the same blocks.
"""

import os

import numpy as np
import pytest
import torch

from qkv.models import gguf as qgguf
from qkv.models import llama
from tests.models.test_families import greedy_three_ways, randomise_, rel
from tests.models.test_families_moe import assert_routing_is_clear

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
gguf = pytest.importorskip("gguf", reason="the gguf package writes the tiny files")

os.environ["HF_HUB_OFFLINE"] = "1"

REL_TOL = 1e-4  # max |Δ logit| / max |reference logit|, float32
N_GREEDY = 10
V = 64
CONFIG = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
              num_hidden_layers=2, vocab_size=V, max_position_embeddings=64, rms_norm_eps=1e-6,
              rope_theta=1000.0, embedding_multiplier=3.0, residual_multiplier=0.4,
              attention_multiplier=0.05, logits_scaling=2.5, tie_word_embeddings=False)  # fmt: skip
MOE = dict(num_local_experts=4, num_experts_per_tok=2)


def hf_model(arch: str, quant: str | None = None, **changes):
    """A random transformers Granite(Moe); with `quant`, its matrices rounded through `quant`
    blocks (gguf-py's quantise + dequantise, what the GGUF then holds)."""
    kw = {**CONFIG, **(MOE if arch == "granitemoe" else {}), **changes}
    cfg = transformers.AutoConfig.for_model(arch, **kw)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomise_(m)
    if quant is not None:
        qtype = gguf.GGMLQuantizationType[quant]
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.dim() >= 2 and "router" not in name:
                    q = gguf.quants.quantize(p.numpy(), qtype)
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(p.shape)))
    m.generation_config.eos_token_id = None  # greedy picks stay unsuppressed
    return m


def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute: each head's rows (2, d/2) → (d/2, 2)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(ref, arch: str) -> dict[str, torch.Tensor]:
    """llama.cpp's tensors for the transformers model `ref` (see the module docstring)."""
    c, sd = ref.config, {k: v.detach().float() for k, v in ref.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"],
           "output_norm.weight": sd["model.norm.weight"]}  # fmt: skip
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        L, b = f"model.layers.{i}.", f"blk.{i}."
        a = L + "self_attn."
        out |= {
            b + "attn_norm.weight": sd[L + "input_layernorm.weight"],
            b + "ffn_norm.weight": sd[L + "post_attention_layernorm.weight"],
            b + "attn_q.weight": _llama_permute(sd[a + "q_proj.weight"], c.num_attention_heads),
            b + "attn_k.weight": _llama_permute(sd[a + "k_proj.weight"], c.num_key_value_heads),
            b + "attn_v.weight": sd[a + "v_proj.weight"],
            b + "attn_output.weight": sd[a + "o_proj.weight"],
        }
        if arch == "granite":
            m = L + "mlp."
            out |= {b + "ffn_gate.weight": sd[m + "gate_proj.weight"],
                    b + "ffn_up.weight": sd[m + "up_proj.weight"],
                    b + "ffn_down.weight": sd[m + "down_proj.weight"]}  # fmt: skip
        else:  # input_linear (e, 2f, m): gate rows, then up rows (transformers: gate_up_proj)
            e = L + "block_sparse_moe."
            gate, up = sd[e + "experts.gate_up_proj"].split(c.intermediate_size, dim=-2)
            out |= {b + "ffn_gate_inp.weight": sd[e + "router.weight"],
                    b + "ffn_gate_exps.weight": gate, b + "ffn_up_exps.weight": up,
                    b + "ffn_down_exps.weight": sd[e + "experts.down_proj"]}  # fmt: skip
    return out


def write_granite_gguf(path, ref, arch: str, *, quant=None, kv=None, drop=(), extra=None):
    """`ref` as llama.cpp's converter writes it; `kv`: `<arch>.` keys changed (None: left out),
    `drop`: tensors left out, `extra`: tensors added."""
    c = ref.config
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        "block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
        "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads,
        "attention.head_count_kv": c.num_key_value_heads,
        "rope.dimension_count": c.hidden_size // c.num_attention_heads, "vocab_size": V,
        "rope.freq_base": float(c.rope_parameters["rope_theta"]),
        "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        "attention.scale": float(c.attention_multiplier),
        "embedding_scale": float(c.embedding_multiplier),
        "residual_scale": float(c.residual_multiplier),
        "logit_scale": float(c.logits_scaling),
    }  # fmt: skip
    if arch == "granitemoe":
        keys |= {"expert_count": c.num_local_experts, "expert_used_count": c.num_experts_per_tok}
    for key, val in {**keys, **(kv or {})}.items():
        if val is not None:  # llama.cpp's counts are uint32, its scales float32
            (w.add_uint32 if isinstance(val, int) else w.add_float32)(f"{arch}.{key}", val)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([chr(0x21 + i) for i in range(V - 1)] + ["AB"])  # "!", '"', ...
    w.add_token_types([1] * V)
    w.add_token_merges(["A B"])
    w.add_eos_token_id(0)
    for name, t in {**gguf_tensors(ref, arch), **(extra or {})}.items():
        if name in drop:
            continue
        t = t.numpy().astype(np.float32)
        if quant is None or t.ndim == 1 or "ffn_gate_inp" in name:
            w.add_tensor(name, t)
        else:
            qtype = gguf.GGMLQuantizationType[quant]
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load(path):
    return llama.load_gguf(path, cache_dir=False)


def ids_for(seed: int, n: int = 20) -> torch.Tensor:
    return torch.randint(1, V, (1, n), generator=torch.Generator().manual_seed(seed))


VARIANTS = [(a, q) for a in ("granite", "granitemoe") for q in (None, "Q8_0")]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{a}-{q or 'f32'}" for a, q in VARIANTS])
def pair(request, tmp_path_factory):
    arch, quant = request.param
    ref = hf_model(arch, quant)
    path = write_granite_gguf(tmp_path_factory.mktemp(arch) / "g.gguf", ref, arch, quant=quant)
    return arch, quant, ref, load(path), path


# --------------------------------------------------------------------------------------------
# parity


def test_config_reads_the_metadata(pair):
    arch, quant, _, model, path = pair
    c = model.config
    assert (c.embed_scale, c.residual_scale, c.attn_scale) == pytest.approx((3.0, 0.4, 0.05))
    assert c.logit_scale == pytest.approx(1 / 2.5)
    assert (c.n_heads, c.n_kv_heads, c.d_head, c.rope_base) == (4, 2, 16, 1000.0)
    if arch == "granitemoe":
        assert (c.moe.n_experts, c.moe.top_k, c.moe.d_expert, c.moe.normalise) == (4, 2, 96, True)
    if quant is not None:  # the 3-D experts are not kept as blocks, the 2-D matrices are
        types = qgguf.read_gguf(path, cache_dir=False).types
        assert types["blk.0.attn_q.weight"] == quant
        assert arch == "granite" or types["blk.0.ffn_up_exps.weight"] == quant


def test_logits_match_transformers(pair):
    arch, _, ref, model, _ = pair
    ids = torch.cat([ids_for(0), ids_for(100)])  # no near tie in routing (granitemoe)
    if arch == "granitemoe":
        assert_routing_is_clear(model, ids)
    with torch.no_grad():
        assert rel(model(ids), ref(ids).logits) <= REL_TOL


def test_greedy_tokens_with_and_without_cache(pair):
    arch, _, ref, model, _ = pair
    prompt = ids_for(2, 8)
    if arch == "granitemoe":
        assert_routing_is_clear(model, prompt)
    want, cached, uncached = greedy_three_ways(ref, model, prompt, N_GREEDY)
    assert len(want) == N_GREEDY
    assert cached == uncached == want


# --------------------------------------------------------------------------------------------
# the check can fail


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    ref = hf_model("granite")
    return ref, tmp_path_factory.mktemp("undone")


@pytest.mark.parametrize(
    "key, value",
    [("embedding_scale", 1.0), ("residual_scale", 1.0), ("attention.scale", 0.0),
     ("logit_scale", 1.0)],
)  # fmt: skip
def test_each_multiplier_undone_breaks_parity(f32, key, value):
    """The file with one multiplier at what a loader ignoring it would use (attention.scale 0:
    llama.cpp's 1/√d) reads as another model."""
    ref, folder = f32
    path = write_granite_gguf(folder / f"{key}.gguf", ref, "granite", kv={key: value})
    ids = ids_for(0)
    with torch.no_grad():
        assert rel(load(path)(ids), ref(ids).logits) > 100 * REL_TOL


def test_skipping_unpermute_breaks_parity(f32, monkeypatch):
    ref, folder = f32
    path = write_granite_gguf(folder / "plain.gguf", ref, "granite")
    monkeypatch.setattr(qgguf, "unpermute_qk", lambda w, n_heads: w)
    ids = ids_for(0)
    with torch.no_grad():
        assert rel(load(path)(ids), ref(ids).logits) > 100 * REL_TOL


def test_attention_scale_zero_is_one_over_sqrt_d(f32):
    """llama.cpp's rule for a 0 `attention.scale`: the plain 1/√d, i.e. transformers' Granite
    with attention_multiplier d^−½."""
    _, folder = f32
    ref = hf_model("granite", attention_multiplier=16**-0.5)
    path = write_granite_gguf(folder / "zero.gguf", ref, "granite", kv={"attention.scale": 0.0})
    model = load(path)
    assert model.config.attn_scale is None
    ids = ids_for(0)
    with torch.no_grad():
        assert rel(model(ids), ref(ids).logits) <= REL_TOL


# --------------------------------------------------------------------------------------------
# clear errors


@pytest.mark.parametrize(
    "arch, key", [("granite", "embedding_scale"), ("granite", "residual_scale"),
                  ("granite", "attention.scale"), ("granite", "logit_scale"),
                  ("granitemoe", "expert_count"), ("granitemoe", "expert_used_count")],
)  # fmt: skip
def test_a_missing_key_is_named(tmp_path, arch, key):
    path = write_granite_gguf(tmp_path / "g.gguf", hf_model(arch), arch, kv={key: None})
    with pytest.raises(ValueError, match=rf"metadata key '{arch}\.{key}' is missing"):
        load(path)


@pytest.mark.parametrize(
    "arch, kv, message",
    [("granite", {"logit_scale": -2.5}, r"'granite.logit_scale' must be a number > 0, got -2.5"),
     ("granitemoe", {"expert_used_count": 5},
      r"'granitemoe.expert_used_count' is 5, more than 'granitemoe.expert_count' 4")],
)  # fmt: skip
def test_bad_values_are_named(tmp_path, arch, kv, message):
    path = write_granite_gguf(tmp_path / "g.gguf", hf_model(arch), arch, kv=kv)
    with pytest.raises(ValueError, match=message):
        load(path)


@pytest.mark.parametrize(
    "arch, drop, message",
    [("granite", ("blk.1.attn_q.weight",), r"lacks tensor 'blk\.1\.attn_q\.weight' .*\(1 missing"),
     ("granitemoe", ("blk.0.ffn_up_exps.weight",),
      r"lacks tensor 'blk\.0\.ffn_up_exps\.weight' .*\(1 missing")],  # one, not 4 experts
)  # fmt: skip
def test_a_missing_tensor_is_named(tmp_path, arch, drop, message):
    path = write_granite_gguf(tmp_path / "g.gguf", hf_model(arch), arch, drop=drop)
    with pytest.raises(ValueError, match=message):
        load(path)


def test_wrong_expert_count_is_a_shape_error(tmp_path):
    """expert_count 3 for tensors of 4 experts: the stacked tensor is named with its shape."""
    ref = hf_model("granitemoe")
    path = write_granite_gguf(tmp_path / "g.gguf", ref, "granitemoe", kv={"expert_count": 3})
    with pytest.raises(ValueError, match=r"tensor 'blk.0.ffn_gate_inp.weight' has shape \(4, 64\)"):
        load(path)


def test_shared_expert_and_rope_scaling_are_refused(tmp_path):
    ref = hf_model("granitemoe")
    shexp = {"blk.0.ffn_up_shexp.weight": torch.zeros(32, 64)}
    path = write_granite_gguf(tmp_path / "s.gguf", ref, "granitemoe", extra=shexp)
    with pytest.raises(ValueError, match=r"granitemoe GGUF uses a shared expert"):
        load(path)
    freqs = {"rope_freqs.weight": torch.ones(8)}  # Llama 3.1's per-pair factors
    path = write_granite_gguf(tmp_path / "r.gguf", hf_model("granite"), "granite", extra=freqs)
    with pytest.raises(ValueError, match=r"granite GGUF uses RoPE scaling"):
        load(path)
