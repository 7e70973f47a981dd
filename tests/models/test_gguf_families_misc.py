"""The GGUF families Gemma (1), OLMo 2 and Cohere 2 against the transformers models they were
converted from.

transformers' GGUF loader reads none of the three architectures, so the oracle is a tiny
random transformers model of the family (AutoConfig.for_model → from_config → `randomise_`),
written here into a GGUF as llama.cpp's `convert_hf_to_gguf.py` writes it, its rules re-typed
below (not taken from qkv's reader): float32, and Q8_0 (the model's matrices first rounded
through Q8_0 with gguf-py's own `quantize` / `dequantize`, so that the file holds exactly the
transformers weights). `qkv` reads the file; logits agree within REL_TOL, and 10 greedy tokens
agree with transformers' `generate`, with and without the KV cache. Then each peculiarity
undone breaks parity by > 100 × REL_TOL, and bad files are clear errors.

The converter's rules as assumed here (tensor and key names from gguf-py's `constants.py`; the
name map is checked against gguf-py's `TensorNameMap`, which the converter uses):

* every family: TextModel's keys (context_length, embedding_length, block_count,
  feed_forward_length, attention.head_count / head_count_kv, rope.freq_base from rope_theta,
  attention.layer_norm_rms_epsilon from rms_norm_eps or attention.layer_norm_epsilon from
  layer_norm_eps, attention.key_length / value_length when the config has head_dim); Q/K rows
  as Hugging Face's: llama.cpp runs Gemma and OLMo 2 with NeoX RoPE (half-split) and Cohere 2
  with its "norm" RoPE on Hugging Face's interleaved pairs, and none of the three converters
  permutes them;
* GemmaModel: its own keys only (those above but rope.freq_base: llama.cpp's 10⁴, Gemma's
  rope_theta), key_length = head_dim, every `*norm.weight` written as 1 + w, lm_head skipped;
  a SentencePiece vocabulary;
* Olmo2Model: TextModel's keys; attention.sliding_window only for OLMo 3 configs (refused);
  lm_head as output.weight when untied; no bias tensors exist for olmo2 (attention_bias False);
* Cohere2Model: plus logit_scale, attention.sliding_window, attention.sliding_window_pattern
  (4, which llama.cpp also hard-codes), vocab_size, rope.dimension_count = rotary_pct · d with
  rotary_pct 1.0 (Command R7B's), rope.scaling.type "none"; tied unembedding (no output
  tensor in llama.cpp's cohere2).
"""

import dataclasses
import os

import numpy as np
import pytest
import torch

from qkv.models import gguf_families
from tests.models.test_families import randomise_
from tests.models.test_gguf_families import (
    BPE_MERGES,
    BPE_SPECIAL,
    BPE_TOKENS,
    N_GREEDY,
    N_IDS,
    REL_TOL,
    SPM_TOKENS,
    add_tensor,
    assert_greedy_match,
    assert_logits_match,
    finish,
    load,
    rel,
)

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
gguf = pytest.importorskip("gguf", reason="the gguf package writes the tiny files")

os.environ["HF_HUB_OFFLINE"] = "1"

# matrices' rows a multiple of 32 (Q8_0 blocks); Gemma's head dim 24 ≠ 64/4
_BASE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=1)  # fmt: skip
CONFIGS = {
    "gemma": dict(_BASE, num_hidden_layers=2, head_dim=24, hidden_activation="gelu_pytorch_tanh",
                  rms_norm_eps=1e-6, vocab_size=len(SPM_TOKENS)),
    "olmo2": dict(_BASE, num_hidden_layers=2, rms_norm_eps=1e-6, rope_theta=500.0,
                  tie_word_embeddings=False, vocab_size=len(BPE_TOKENS)),
    # layers 0-2 slide over 5 keys and rotate, layer 3 is global and NoPE
    "cohere2": dict(_BASE, num_hidden_layers=4, sliding_window=5, sliding_window_pattern=4,
                    logit_scale=0.25, layer_norm_eps=1e-5, rope_theta=500.0,
                    vocab_size=len(BPE_TOKENS)),
}  # fmt: skip


def hf_model(arch: str, quant: str | None = None):
    """The random transformers model; with `quant`, its matrices rounded through that type."""
    cfg = transformers.AutoConfig.for_model(arch, **CONFIGS[arch])
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    randomise_(ref)
    if quant is not None:
        qtype = gguf.GGMLQuantizationType[quant]
        with torch.no_grad():
            for p in ref.parameters():
                if p.dim() == 2:
                    q = gguf.quants.quantize(p.numpy(), qtype)
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(q, qtype)))
    ref.generation_config.eos_token_id = None  # greedy picks stay unsuppressed
    return ref


def gguf_names(arch: str, n_layers: int, tied: bool) -> dict[str, str]:
    """Hugging Face tensor name → llama.cpp's (gguf-py's tensor map for the architecture)."""
    out = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight"}  # fmt: skip
    if arch == "olmo2" and not tied:
        out["lm_head.weight"] = "output.weight"
    for i in range(n_layers):
        h, b = f"model.layers.{i}.", f"blk.{i}."
        for src, dst in {
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
            **{
                "gemma": {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"},
                "olmo2": {"post_attention_layernorm": "post_attention_norm",
                          "post_feedforward_layernorm": "post_ffw_norm",
                          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
                "cohere2": {"input_layernorm": "attn_norm"},
            }[arch],
        }.items():  # fmt: skip
            out[h + src + ".weight"] = b + dst + ".weight"
    return out


def metadata(arch: str, c) -> dict[str, object]:
    """`<arch>.` key → value, as the converter writes them for config `c`."""
    md = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
          "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
          "attention.head_count": c.num_attention_heads,
          "attention.head_count_kv": c.num_key_value_heads}  # fmt: skip
    if arch != "gemma":  # GemmaModel writes no rope.freq_base
        md["rope.freq_base"] = float(c.rope_parameters["rope_theta"])
    if arch == "cohere2":
        md["attention.layer_norm_epsilon"] = float(c.layer_norm_eps)
        md |= {"logit_scale": float(c.logit_scale), "attention.sliding_window": c.sliding_window,
               "attention.sliding_window_pattern": 4, "vocab_size": c.vocab_size,
               "rope.dimension_count": c.hidden_size // c.num_attention_heads,
               "rope.scaling.type": "none"}  # fmt: skip
    else:
        md["attention.layer_norm_rms_epsilon"] = float(c.rms_norm_eps)
    if getattr(c, "head_dim", None) is not None:
        md["attention.key_length"] = md["attention.value_length"] = c.head_dim
    return md


def write_gguf(path, ref, arch: str, *, quant=None, kv=None, drop=(), extra=None):
    """`ref` as llama.cpp's converter writes an `arch` file; `kv` changes keys (None: removed),
    `drop` leaves tensors out, `extra` adds tensors."""
    c = ref.config
    w = gguf.GGUFWriter(str(path), arch)
    for key, val in {**metadata(arch, c), **(kv or {})}.items():
        if val is None:
            continue
        if isinstance(val, str):
            w.add_string(f"{arch}.{key}", val)
        elif isinstance(val, int) and not isinstance(val, bool):  # llama.cpp's counts: uint32
            w.add_uint32(f"{arch}.{key}", val)
        else:
            w.add_float32(f"{arch}.{key}", val)
    if arch == "gemma":
        w.add_tokenizer_model("llama")
        w.add_token_list(SPM_TOKENS)
        w.add_token_scores([-float(i) for i in range(len(SPM_TOKENS))])
        w.add_token_types([3] * 4 + [1] * (len(SPM_TOKENS) - 4))
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(BPE_TOKENS)
        w.add_token_merges(BPE_MERGES)
        w.add_token_types([1] * (len(BPE_TOKENS) - 3) + [3] * 3)
        w.add_eos_token_id(BPE_TOKENS.index("<|im_end|>"))
    sd = {k: v.detach().float() for k, v in ref.state_dict().items()}
    for src, dst in gguf_names(arch, c.num_hidden_layers, c.tie_word_embeddings).items():
        if dst in drop:
            continue
        t = sd[src].numpy()
        if arch == "gemma" and src.endswith("norm.weight"):  # GemmaModel: data_torch + 1
            t = t + 1
        add_tensor(w, dst, t, quant)
    for name, t in (extra or {}).items():
        w.add_tensor(name, t.astype(np.float32))
    finish(w)
    return path


def ids_for(arch: str, seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if arch == "gemma":  # past the SentencePiece control tokens
        return torch.randint(4, len(SPM_TOKENS), (1, n), generator=g)
    return torch.randint(0, len(BPE_TOKENS) - len(BPE_SPECIAL), (1, n), generator=g)


VARIANTS = [(a, q) for a in CONFIGS for q in (None, "Q8_0")]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{a}-{q or 'f32'}" for a, q in VARIANTS])
def tiny(request, tmp_path_factory):
    arch, quant = request.param
    ref = hf_model(arch, quant)
    path = write_gguf(tmp_path_factory.mktemp(arch) / "tiny.gguf", ref, arch, quant=quant)
    return arch, path, load(path), ref


@pytest.fixture(scope="module")
def refs():
    """arch → the float32 transformers model (for the files written per test)."""
    return {a: hf_model(a) for a in CONFIGS}


# --------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_name_map_is_gguf_pys(arch, refs):
    """The re-typed name map against gguf-py's, which the converter looks names up in."""
    c = refs[arch].config
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    names = gguf_names(arch, c.num_hidden_layers, c.tie_word_embeddings)
    assert {s: tmap.get_name(s, try_suffixes=(".weight",)) for s in names} == names


def test_config_reads_the_file(tiny):
    arch, _, model, ref = tiny
    c = model.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.d_model) == (
        ref.config.num_hidden_layers, 4, 2, 64)  # fmt: skip
    if arch == "gemma":
        assert (c.d_head, c.norm_offset, c.embed_scale, c.act) == (24, 0.0, 8.0, "gelu_tanh")
        assert c.rope_base == 10000.0 and c.tie_embeddings
    if arch == "olmo2":
        assert (c.block, c.qk_norm, c.qk_norm_scope, c.tie_embeddings) == (
            "output_norm", True, "all", False)  # fmt: skip
    if arch == "cohere2":
        assert c.windows == (5, 5, 5, None) and c.rope_layers == (True, True, True, False)
        assert (c.logit_scale, c.norm, c.norm_bias, c.block, c.rope_interleaved) == (
            0.25, "layer", False, "parallel1", True)  # fmt: skip


def test_logits_match_transformers(tiny):
    arch, _, model, ref = tiny
    assert_logits_match(model, ref, torch.cat([ids_for(arch, 0, N_IDS), ids_for(arch, 1, N_IDS)]))


def test_greedy_tokens_with_and_without_cache(tiny):
    arch, _, model, ref = tiny
    assert_greedy_match(ref, model, ids_for(arch, 2, 12), N_GREEDY)


# --------------------------------------------------------------------------------------------
# the check can fail: each peculiarity undone


def _derived(fam, **changes):
    return lambda f: {**(fam.derive(f) if fam.derive else {}), **changes}


CHANGES = {
    # the stored 1 + w read as Hugging Face's w: gains 2 + w
    ("gemma", "gains-read-as-w"): lambda fam: dataclasses.replace(
        fam, fixed={**fam.fixed, "norm_offset": 1.0}),
    ("gemma", "no-embed-scale"): lambda fam: dataclasses.replace(
        fam, derive=_derived(fam, embed_scale=1.0)),
    ("olmo2", "output-norms-dropped"): None,
    ("olmo2", "qk-norm-dropped"): None,
    ("olmo2", "interleaved-rope"): lambda fam: dataclasses.replace(
        fam, fixed={**fam.fixed, "rope_interleaved": True}),
    ("cohere2", "nope-layers-rotated"): lambda fam: dataclasses.replace(
        fam, derive=_derived(fam, rope_layers=(True,) * 4)),
    ("cohere2", "no-window"): lambda fam: dataclasses.replace(
        fam, derive=_derived(fam, windows=None)),
    ("cohere2", "no-logit-scale"): lambda fam: dataclasses.replace(
        fam, derive=_derived(fam, logit_scale=1.0)),
    ("cohere2", "half-split-rope"): lambda fam: dataclasses.replace(
        fam, fixed={**fam.fixed, "rope_interleaved": False}),
}  # fmt: skip


@pytest.mark.parametrize(("arch", "change"), list(CHANGES), ids=[f"{a}-{c}" for a, c in CHANGES])
def test_the_check_can_fail(refs, tmp_path, monkeypatch, arch, change):
    ref = refs[arch]
    path = write_gguf(tmp_path / "x.gguf", ref, arch)
    ids = ids_for(arch, 1, N_IDS)
    with torch.no_grad():
        want = ref(ids).logits
        assert rel(load(path)(ids), want) <= REL_TOL  # the premise
        fam = gguf_families.GGUF_FAMILIES[arch]
        if CHANGES[arch, change] is not None:
            monkeypatch.setitem(gguf_families.GGUF_FAMILIES, arch, CHANGES[arch, change](fam))
        model = load(path)
        for b in model.blocks:
            if change == "output-norms-dropped":
                b.norm1, b.norm2 = torch.nn.Identity(), torch.nn.Identity()
            if change == "qk-norm-dropped":
                b.attn.q_norm, b.attn.k_norm = torch.nn.Identity(), torch.nn.Identity()
        err = rel(model(ids), want)
    assert err > 100 * REL_TOL, err


# --------------------------------------------------------------------------------------------
# bad files


@pytest.mark.parametrize(
    ("arch", "extra", "message"),
    [
        ("gemma", {"kv": {"block_count": None}}, r"metadata key 'gemma.block_count' is missing"),
        ("olmo2", {"kv": {"attention.layer_norm_rms_epsilon": None}},
         r"metadata key 'olmo2.attention.layer_norm_rms_epsilon' is missing"),
        ("cohere2", {"kv": {"logit_scale": None}},
         r"x.gguf: metadata key 'cohere2.logit_scale' is missing"),
        ("cohere2", {"kv": {"attention.sliding_window": None}},
         r"x.gguf: metadata key 'cohere2.attention.sliding_window' is missing"),
        ("gemma", {"drop": ("blk.1.ffn_norm.weight",)},
         r"lacks tensor 'blk\.1\.ffn_norm\.weight' that a gemma GGUF"),
        ("olmo2", {"drop": ("blk.0.attn_k_norm.weight",)},
         r"lacks tensor 'blk\.0\.attn_k_norm\.weight' that an olmo2 GGUF"),
        ("cohere2", {"drop": ("blk.3.attn_norm.weight",)},
         r"lacks tensor 'blk\.3\.attn_norm\.weight' that a cohere2 GGUF"),
        ("cohere2", {"kv": {"attention.sliding_window_pattern": 6}},
         r"'cohere2.attention.sliding_window_pattern' is 6; qkv reads cohere2 with llama.cpp's "
         r"pattern 4"),
        ("cohere2", {"kv": {"rope.dimension_count": 8}},
         r"'cohere2.rope.dimension_count' is 8, not the head dim 16 \(partial rotary\)"),
        ("olmo2", {"kv": {"attention.sliding_window": 4}},
         r"this olmo2 GGUF uses sliding-window attention \(olmo2.attention.sliding_window: OLMo 3"),
        ("gemma", {"kv": {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}},
         r"this gemma GGUF uses RoPE scaling"),
        ("cohere2", {"kv": {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}},
         r"this cohere2 GGUF uses RoPE scaling"),
    ],
)  # fmt: skip
def test_bad_files_are_a_clear_error(refs, tmp_path, arch, extra, message):
    path = write_gguf(tmp_path / "x.gguf", refs[arch], arch, **extra)
    with pytest.raises(ValueError, match=message):
        load(path)
