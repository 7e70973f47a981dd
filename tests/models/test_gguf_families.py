"""The GGUF families Qwen2, Qwen3, Phi-3 and Gemma 2 against transformers' own GGUF loader.

For each architecture a tiny random GGUF is written here with the `gguf` package as llama.cpp's
converter lays one out (its tensor names and `<arch>.*` keys; Q/K rows as Hugging Face's, since
all four run NeoX RoPE in llama.cpp), twice: float32, and with every matrix Q8_0. `qkv.load` and
`AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)` read the same file; their float32
logits agree within REL_TOL of the logits' scale and 10 greedy tokens agree, with and without the
KV cache. Then the checks that prove the comparison can fail, one per peculiarity (q/k biases,
QK-norm, the fused Q|K|V and gate|up split, softcaps, window, the stored 1 + w norms, no Q/K
permutation), the files qkv refuses (RoPE scaling in Phi-3 and Gemma 2, LongRoPE; Qwen's
linear and YaRN scaling are tested in test_gguf_rope_scaling.py), and the Qwen2 pre-tokenizer.

What transformers reads, and the sizes chosen for it: Qwen3's head_dim is always 128 and
Gemma 2's query_pre_attn_scalar always 256 (neither is read from the file), hence those head
sizes; Gemma 2's softcaps are its config defaults 50 and 30 (the file's values are not read),
which the file states too. Phi-3's partial RoPE (rope.dimension_count < head dim) is not
read by transformers' GGUF loader: its oracle is `Phi3ForCausalLM` built with
partial_rotary_factor from the file's tensors, mapped in `phi3_state_dict`.
"""

import dataclasses
import os

import numpy as np
import pytest
import torch

import qkv
from qkv.models import gguf as qgguf
from qkv.models import gguf_families, llama
from qkv.nn import KVCache
from tests.models.test_families import greedy_three_ways

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
gguf = pytest.importorskip("gguf", reason="the gguf package writes the tiny files")

os.environ["HF_HUB_OFFLINE"] = "1"

REL_TOL = 1e-4  # max |Δ logit| / max |reference logit|, float32
N_GREEDY = 10
N_IDS = 23  # longer than Gemma 2's window of 4


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes → printable characters (the spelling of a byte-level BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


# byte-level BPE vocabulary (Qwen): every byte in GPT-2's alphabet, a few merges, control tokens
BPE_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ d", "o g", "Ġd og", "Ġ c", "a t", "Ġc at", "1 2"]
BPE_TOKENS = [*_byte_alphabet(), *("".join(m.split()) for m in BPE_MERGES)]
BPE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BPE_TOKENS += BPE_SPECIAL
# SentencePiece vocabulary (Phi-3, Gemma 2), as in test_gemma3.py
SPM_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "▁"] + [chr(c) for c in range(97, 123)]
SPM_TOKENS += ["▁t", "he", "▁the", "▁a", "og", "▁d", "▁dog", "at", "▁c", "▁cat"]


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    M: int  # d_model
    H: int  # query heads
    K: int  # kv heads
    D: int  # head dim
    F: int  # d_ff
    L: int  # layers
    tied: bool
    spm: bool  # SentencePiece vocabulary (else byte-level BPE)


ARCHS = {
    "qwen2": Arch("qwen2", 64, 4, 2, 16, 96, 3, tied=True, spm=False),
    "qwen3": Arch("qwen3", 64, 2, 1, 128, 96, 3, tied=False, spm=False),
    "phi3": Arch("phi3", 64, 4, 2, 16, 96, 3, tied=False, spm=True),
    "gemma2": Arch("gemma2", 64, 2, 1, 256, 96, 4, tied=True, spm=True),
}
WINDOW = 4  # Gemma 2's sliding window (even layers)


def shapes(a: Arch) -> dict[str, tuple[int, ...]]:
    """Tensor name → PyTorch (out, in) shape, llama.cpp's names for the architecture."""
    n_vocab = len(SPM_TOKENS if a.spm else BPE_TOKENS)
    hd, kd = a.H * a.D, a.K * a.D
    out = {"token_embd.weight": (n_vocab, a.M), "output_norm.weight": (a.M,)}
    if not a.tied:
        out["output.weight"] = (n_vocab, a.M)
    for i in range(a.L):
        b = f"blk.{i}."
        out |= {b + "attn_norm.weight": (a.M,), b + "ffn_norm.weight": (a.M,),
                b + "attn_output.weight": (a.M, hd), b + "ffn_down.weight": (a.M, a.F)}  # fmt: skip
        if a.name == "phi3":  # fused Q|K|V by rows, gate|up by rows
            out |= {b + "attn_qkv.weight": (hd + 2 * kd, a.M), b + "ffn_up.weight": (2 * a.F, a.M)}
        else:
            out |= {b + "attn_q.weight": (hd, a.M), b + "attn_k.weight": (kd, a.M),
                    b + "attn_v.weight": (kd, a.M), b + "ffn_gate.weight": (a.F, a.M),
                    b + "ffn_up.weight": (a.F, a.M)}  # fmt: skip
        if a.name == "qwen2":
            out |= {b + "attn_q.bias": (hd,), b + "attn_k.bias": (kd,), b + "attn_v.bias": (kd,)}
        if a.name == "qwen3":
            out |= {b + "attn_q_norm.weight": (a.D,), b + "attn_k_norm.weight": (a.D,)}
        if a.name == "gemma2":
            out |= {b + "post_attention_norm.weight": (a.M,), b + "post_ffw_norm.weight": (a.M,)}
    return out


def load_cached(path, folder):
    """qkv.load(path) with its disk cache in folder/cache, kept out of ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QKV_CACHE_DIR", str(folder / "cache"))
        return qkv.load(str(path))


def add_tensor(w, name: str, t: np.ndarray, quant: str | None = None) -> None:
    """Write `t` as float32, or as `quant` blocks (e.g. "Q8_0") when it is a matrix."""
    t = t.astype(np.float32)
    if quant is None or t.ndim == 1:
        w.add_tensor(name, t)
    else:
        qtype = gguf.GGMLQuantizationType[quant]
        w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)


def finish(w) -> None:
    """Write the header, the metadata and the tensors, and close the file."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def assert_logits_match(model, ref, ids) -> None:
    """Our logits on `ids` against the transformers model's, within REL_TOL."""
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert ours.shape == theirs.shape
    assert rel(ours, theirs) <= REL_TOL, rel(ours, theirs)


def assert_greedy_match(ref, model, prompt, n: int) -> None:
    """n greedy tokens: transformers' generate, ours with and without the KV cache, equal."""
    want, cached, uncached = greedy_three_ways(ref, model, prompt, n)
    assert len(want) == n
    assert cached == uncached == want


def tiny_gguf(
    path,
    a: Arch,
    *,
    quant=None,
    keep=(),
    seed=0,
    kv=None,
    extra_tensors=None,
    rope_dim=None,
    space_prefix=False,
):
    """A random GGUF of architecture `a` as llama.cpp writes one; every matrix stored as `quant`
    (e.g. "Q8_0") if given, but those of the kinds in `keep` (e.g. "ffn_up"). `kv`: extra
    `<arch>.` keys (name → value), `extra_tensors`: name → float32 array, `rope_dim`: a
    rope.dimension_count below the head dim (Phi-3 partial RoPE).

    Gemma 2's attn_norm and output_norm gains are ×8, so that its score and logit softcaps bind
    (a score or logit of 5 is capped by 0.4 % at 30, and these reach tens)."""
    w = gguf.GGUFWriter(str(path), a.name)
    arch = a.name
    for key, val in {
        "block_count": a.L, "context_length": 64, "embedding_length": a.M,
        "feed_forward_length": a.F, "attention.head_count": a.H, "attention.head_count_kv": a.K,
    }.items():  # fmt: skip
        w.add_uint32(f"{arch}.{key}", val)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 1000.0)
    if arch in ("qwen3", "gemma2"):  # what llama.cpp writes when head_dim ≠ d_model/h
        w.add_uint32(f"{arch}.attention.key_length", a.D)
        w.add_uint32(f"{arch}.attention.value_length", a.D)
    if arch == "phi3":
        w.add_uint32(f"{arch}.rope.dimension_count", rope_dim or a.D)
        w.add_uint32(f"{arch}.attention.sliding_window", 0)
    if arch == "gemma2":
        w.add_uint32(f"{arch}.attention.sliding_window", WINDOW)
        w.add_float32(f"{arch}.attn_logit_softcapping", 50.0)
        w.add_float32(f"{arch}.final_logit_softcapping", 30.0)
    for key, val in (kv or {}).items():
        if isinstance(val, str):
            w.add_string(f"{arch}.{key}", val)
        elif isinstance(val, int) and not isinstance(val, bool):  # llama.cpp's counts: uint32
            w.add_uint32(f"{arch}.{key}", val)
        else:
            w.add_float32(f"{arch}.{key}", val)
    if a.spm:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(SPM_TOKENS)
        w.add_token_scores([-float(i) for i in range(len(SPM_TOKENS))])
        w.add_token_types([3] * 4 + [1] * (len(SPM_TOKENS) - 4))
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        if space_prefix is not None:  # None: an older file without the key
            w.add_add_space_prefix(space_prefix)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(BPE_TOKENS)
        w.add_token_merges(BPE_MERGES)
        w.add_token_types([1] * (len(BPE_TOKENS) - 3) + [3] * 3)
        w.add_eos_token_id(BPE_TOKENS.index("<|im_end|>"))
        w.add_pad_token_id(BPE_TOKENS.index("<|endoftext|>"))
    rng = np.random.default_rng(seed)
    for name, shape in {
        **shapes(a),
        **{n: t.shape for n, t in (extra_tensors or {}).items()},
    }.items():
        if name in (extra_tensors or {}):
            w.add_tensor(name, extra_tensors[name].astype(np.float32))
        elif len(shape) == 1:  # norm gains (Gemma's stored as 1 + w) and biases
            g = (
                8
                if arch == "gemma2" and name.endswith(("attn_norm.weight", "output_norm.weight"))
                else 1
            )
            w.add_tensor(name, (g * (1 + 0.3 * rng.standard_normal(shape))).astype(np.float32))
        else:
            m = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
            add_tensor(w, name, m, None if name.split(".")[-2] in keep else quant)
    finish(w)
    return path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def reference(path):
    """transformers' reading of the same file (its own dequantisation, eager attention)."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    ref.generation_config.eos_token_id = None  # greedy picks stay unsuppressed
    return ref.eval()


def ids_for(a: Arch, seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo = 4 if a.spm else 0  # past the SentencePiece control tokens
    hi = len(SPM_TOKENS) if a.spm else len(BPE_TOKENS) - len(BPE_SPECIAL)
    return torch.randint(lo, hi, (1, n), generator=g)


VARIANTS = [(name, q) for name in ARCHS for q in (None, "Q8_0")]
# Phi-3's ffn_up (gate | up, 2f rows) stays float32 in its Q8_0 variant: the decode step's block
# map (`llama.gguf_blocks`) takes a quantised ffn_up for the up half alone and refuses the file
# (test_phi3_quantised_ffn_up_loads)
KEEP = {"phi3": ("ffn_up",)}


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{n}-{q or 'f32'}" for n, q in VARIANTS])
def tiny(request, tmp_path_factory):
    name, quant = request.param
    a = ARCHS[name]
    folder = tmp_path_factory.mktemp(f"{name}-{quant}")
    path = tiny_gguf(folder / "tiny.gguf", a, quant=quant, keep=KEEP.get(name, ()))
    model = load_cached(path, folder)
    return a, path, model, reference(path)


def load(path):
    return llama.load_gguf(path, cache_dir=False)


# --------------------------------------------------------------------------------------------
# parity


def test_config_reads_the_metadata(tiny):
    a, _, model, ref = tiny
    c = model.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.d_head, c.d_model, c.d_ff) == (
        a.L, a.H, a.K, a.D, a.M, a.F)  # fmt: skip
    assert c.tie_embeddings == a.tied == ref.config.tie_word_embeddings
    assert c.rope_base == 1000.0 and c.rope_dim is None
    assert c.attn_bias == (a.name == "qwen2") and not c.out_bias
    assert c.qk_norm == (a.name == "qwen3")
    if a.name == "gemma2":
        assert c.windows == tuple(WINDOW if i % 2 == 0 else None for i in range(a.L))
        assert ref.config.layer_types == [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(a.L)
        ]
        assert (c.attn_softcap, c.logit_softcap, c.norm_offset) == (50.0, 30.0, 0.0)
        assert c.embed_scale == pytest.approx(a.M**0.5) and c.attn_scale == a.D**-0.5
    else:
        assert c.windows is None and c.attn_softcap is None and c.logit_softcap is None


def test_logits_match_transformers_gguf(tiny):
    a, _, model, ref = tiny
    assert_logits_match(model, ref, ids_for(a, 1, N_IDS))


def test_greedy_tokens_with_and_without_cache(tiny):
    a, _, model, ref = tiny
    assert_greedy_match(ref, model, ids_for(a, 2, 6), N_GREEDY)


def test_incremental_logits_match_transformers(tiny):
    """Four tokens, then one at a time through the KV cache (past Gemma 2's window of 4): every
    position's logits as transformers' one-shot run (a stronger check of the cache than the
    greedy picks, which a tiny random model soon repeats)."""
    a, _, model, ref = tiny
    ids = ids_for(a, 3, N_IDS)
    with torch.no_grad():
        cache = KVCache(model.config.n_layers)
        parts = [model(ids[:, :4], cache=cache)]
        parts += [model(ids[:, i : i + 1], cache=cache) for i in range(4, N_IDS)]
        err = rel(torch.cat(parts, 1), ref(ids).logits)
    assert cache.length == N_IDS and err <= REL_TOL, err


# --------------------------------------------------------------------------------------------
# each peculiarity matters: the same file read without it is far from transformers


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    """name → (Arch, path of its float32 tiny file, transformers' model of it)."""
    out = {}
    for name, a in ARCHS.items():
        path = tiny_gguf(tmp_path_factory.mktemp(f"{name}-break") / "tiny.gguf", a)
        out[name] = a, path, reference(path)
    return out


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    return torch.cat(t.chunk(2)[::-1])


def _permute_as_llama(monkeypatch, arch):
    """The family as if llama.cpp had permuted its Q/K rows (Llama's un-permutation applied)."""
    fam = gguf_families.GGUF_FAMILIES[arch]
    to = {"q": "permuted.q", "kv": "permuted.k"}
    weights = tuple(
        dataclasses.replace(w, reshape=to[w.reshape])
        if w.reshape in to and w.src.endswith(("attn_q.weight", "attn_k.weight"))
        else w
        for w in fam.weights
    )
    monkeypatch.setitem(
        gguf_families.GGUF_FAMILIES, arch, dataclasses.replace(fam, weights=weights)
    )


def broken(path, monkeypatch, change):
    """The tiny model read with one peculiarity undone: a tensor, the config or the family."""
    contents = qgguf.read_gguf(path, cache_dir=False)
    t, n = contents.tensors, contents.metadata[f"{contents.architecture}.block_count"]
    if change == "no-qk-bias":  # Qwen2 without its q and k biases (v kept)
        for i in range(n):
            t[f"blk.{i}.attn_q.bias"] = torch.zeros_like(t[f"blk.{i}.attn_q.bias"])
            t[f"blk.{i}.attn_k.bias"] = torch.zeros_like(t[f"blk.{i}.attn_k.bias"])
    elif change == "gate-up-swapped":  # Phi-3's ffn_up read as up | gate
        for i in range(n):
            t[f"blk.{i}.ffn_up.weight"] = _swap_halves(t[f"blk.{i}.ffn_up.weight"])
    elif change == "permuted" and contents.architecture == "phi3":  # Q, K rows of attn_qkv
        c = gguf_families.config_from_gguf(contents)
        hd, kd = c.n_heads * c.d_head, c.n_kv_heads * c.d_head
        for i in range(n):
            q, k, v = t[f"blk.{i}.attn_qkv.weight"].split([hd, kd, kd])
            q, k = qgguf.unpermute_qk(q, c.n_heads), qgguf.unpermute_qk(k, c.n_kv_heads)
            t[f"blk.{i}.attn_qkv.weight"] = torch.cat([q, k, v])
    elif change == "permuted":
        _permute_as_llama(monkeypatch, contents.architecture)
    elif change != "no-qk-norm":
        real = gguf_families.config_from_gguf(contents)
        config = dataclasses.replace(real, **{
            "no-attn-softcap": {"attn_softcap": None},
            "no-logit-softcap": {"logit_softcap": None},
            "no-window": {"windows": None},
            "norm-offset": {"norm_offset": 1.0},  # Hugging Face's 1 + w on the stored 1 + w
        }[change])  # fmt: skip
        monkeypatch.setattr(llama, "config_from_gguf", lambda *a, **k: config)
    model = llama.from_gguf(contents, cache_dir=False)
    if change == "no-qk-norm":  # Qwen3 without its per-head RMSNorm on q and k
        for block in model.blocks:
            block.attn.q_norm = block.attn.k_norm = None
    return model


CHANGES = [
    ("qwen2", "no-qk-bias"), ("qwen2", "permuted"),
    ("qwen3", "no-qk-norm"), ("qwen3", "permuted"),
    ("phi3", "gate-up-swapped"), ("phi3", "permuted"),
    ("gemma2", "no-attn-softcap"), ("gemma2", "no-logit-softcap"), ("gemma2", "no-window"),
    ("gemma2", "norm-offset"), ("gemma2", "permuted"),
]  # fmt: skip


def assert_breaks_parity(a: Arch, path, ref, make_broken) -> None:
    """The file matches `ref` (the premise), and the model `make_broken()` then reads from it
    (one peculiarity undone; it may patch the loader) is > 100× off."""
    ids = ids_for(a, 1, N_IDS)
    with torch.no_grad():
        want = ref(ids).logits
        assert rel(load(path)(ids), want) <= REL_TOL  # the premise, before any patch
        err = rel(make_broken()(ids), want)
    assert err > 100 * REL_TOL, err


@pytest.mark.parametrize(("arch", "change"), CHANGES)
def test_the_check_can_fail(f32, monkeypatch, arch, change):
    a, path, ref = f32[arch]
    assert_breaks_parity(a, path, ref, lambda: broken(path, monkeypatch, change))


def test_phi3_quantised_fused_matrices_decode_from_their_blocks(tmp_path):
    """Every Phi-3 matrix Q8_0, its fused attn_qkv and gate|up ffn_up included (what a real
    Phi-3 GGUF holds): the one-row step multiplies by their blocks, split by rows, and equals
    transformers one token at a time."""
    from qkv.nn.accelerate import mirrors

    a = ARCHS["phi3"]
    path = tiny_gguf(tmp_path / "q.gguf", a, quant="Q8_0")
    model = load(path)
    backed = mirrors(model)
    assert {"blocks.0.attn.qkv", "blocks.0.mlp.gate_up"} <= set(backed), sorted(backed)
    ids = ids_for(a, 1, N_IDS)
    with torch.no_grad():
        want = reference(path)(ids).logits
        assert rel(model(ids), want) <= REL_TOL  # the prefill: dense weights
        cache = KVCache(model.config.n_layers)
        steps = torch.cat([model(ids[:, j : j + 1], cache=cache) for j in range(ids.shape[1])], 1)
    assert rel(steps, want) <= REL_TOL  # one row at a time: the blocks
    assert all(m.valid() for m, _ in backed.values())  # the blocks were usable, not retired


# --------------------------------------------------------------------------------------------
# Phi-3 partial RoPE (Phi-4-mini): transformers' GGUF reader ignores rope.dimension_count, so
# the oracle is Phi3ForCausalLM with partial_rotary_factor, filled from the file's tensors


def phi3_state_dict(contents, n_layers: int) -> dict[str, torch.Tensor]:
    """llama.cpp's Phi-3 names → Hugging Face's (fused qkv_proj and gate_up_proj as stored)."""
    t, sd = contents.tensors, {}
    sd["model.embed_tokens.weight"] = t["token_embd.weight"]
    sd["model.norm.weight"] = t["output_norm.weight"]
    sd["lm_head.weight"] = t["output.weight"]
    for i in range(n_layers):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        sd[h + "input_layernorm.weight"] = t[b + "attn_norm.weight"]
        sd[h + "self_attn.qkv_proj.weight"] = t[b + "attn_qkv.weight"]
        sd[h + "self_attn.o_proj.weight"] = t[b + "attn_output.weight"]
        sd[h + "post_attention_layernorm.weight"] = t[b + "ffn_norm.weight"]
        sd[h + "mlp.gate_up_proj.weight"] = t[b + "ffn_up.weight"]
        sd[h + "mlp.down_proj.weight"] = t[b + "ffn_down.weight"]
    return sd


def test_phi3_partial_rope_matches_phi3_for_causal_lm(tmp_path):
    a, rot = ARCHS["phi3"], 8  # 8 of 16 features rotate
    path = tiny_gguf(tmp_path / "partial.gguf", a, rope_dim=rot)
    model = load(path)
    assert model.config.rope_dim == rot
    cfg = transformers.Phi3Config(
        vocab_size=len(SPM_TOKENS), hidden_size=a.M, intermediate_size=a.F,
        num_hidden_layers=a.L, num_attention_heads=a.H, num_key_value_heads=a.K,
        max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                         "partial_rotary_factor": rot / a.D},
        pad_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    ref = transformers.Phi3ForCausalLM(cfg).eval()
    ref.load_state_dict(phi3_state_dict(qgguf.read_gguf(path, cache_dir=False), a.L), strict=True)
    full = load(tiny_gguf(tmp_path / "full.gguf", a))
    ids = ids_for(a, 1, N_IDS)
    with torch.no_grad():
        want = ref(ids).logits
        assert rel(model(ids), want) <= REL_TOL
        assert rel(full(ids), want) > 100 * REL_TOL  # the same weights rotating every feature


# --------------------------------------------------------------------------------------------
# refused files, the list of architectures, the Qwen2 pre-tokenizer


@pytest.mark.parametrize(
    ("arch", "extra", "message"),
    [
        ("qwen2", {"kv": {"rope.scaling.type": "longrope", "rope.scaling.factor": 4.0}},
         r"this qwen2 GGUF uses RoPE scaling qwen2.rope.scaling.type='longrope', which qkv does "
         r"not implement for qwen2; it reads 'linear' and 'yarn'"),
        ("qwen3", {"extra_tensors": {"rope_freqs.weight": np.ones(64)}},
         r"this qwen3 GGUF uses a rope_freqs.weight tensor"),
        ("phi3", {"kv": {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}},
         r"this phi3 GGUF uses RoPE scaling phi3.rope.scaling.type='yarn', which qkv does not "
         r"implement for phi3; it reads 'longrope'"),
        ("gemma2", {"kv": {"rope.scaling.type": "linear", "rope.scaling.factor": 8.0}},
         r"RoPE scaling"),
    ],
)  # fmt: skip
def test_unsupported_options_are_a_clear_error(tmp_path, arch, extra, message):
    path = tiny_gguf(tmp_path / "x.gguf", ARCHS[arch], **extra)
    with pytest.raises(ValueError, match=message):
        load(path)


def test_rope_scaling_none_is_accepted(tmp_path):
    path = tiny_gguf(tmp_path / "x.gguf", ARCHS["qwen2"], kv={"rope.scaling.type": "none"})
    assert load(path).config.rope_base == 1000.0


def test_unknown_architecture_lists_every_family(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_uint32("mamba.block_count", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    names = sorted(gguf_families.GGUF_FAMILIES)  # this file's six and other files' families
    assert {"gemma2", "gemma3", "llama", "phi3", "qwen2", "qwen3"} <= set(names)
    want = str(names)
    with pytest.raises(ValueError, match=r"'mamba'; qkv reads these GGUF architectures: \[") as e:
        llama.load_gguf(tmp_path / "x.gguf", cache_dir=False)
    assert want in str(e.value)


QWEN_TEXTS = [
    "the dog", "  the  cat ", "12345 and 3.14", "I'll we've THEY'RE don't",
    "line\n\n  next\r\nend", "thé dog\tcat", "a🙂b", "<|im_start|>user\nthe cat<|im_end|>",
]  # fmt: skip


def test_qwen2_pre_tokenizer_matches_transformers(tmp_path):
    path = tiny_gguf(tmp_path / "qwen.gguf", ARCHS["qwen2"])
    model = load(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in QWEN_TEXTS:
        assert model.tokenizer.encode(text).ids == theirs(text).input_ids, text
    digits = model.tokenizer.encode("12345").ids
    assert len(digits) == 5  # each digit alone, though "12" is a merge


@pytest.mark.parametrize(
    ("arch", "space_prefix"), [("gemma2", False), ("phi3", True), ("phi3", None)]
)
def test_sentencepiece_tokenizers_match_transformers(tmp_path, arch, space_prefix):
    """Gemma 2 (merges in file order, no prefix space, as its converter writes) and Phi-3 (a
    prefix space: transformers' Phi-3 GGUF tokenizer always prepends one), also from a file
    without tokenizer.ggml.add_space_prefix (older converters; llama.cpp then prepends, its
    default for a SentencePiece vocabulary). Texts the tiny
    vocabulary covers: on a character it lacks, transformers' Phi-3 tokenizer drops it where
    llama.cpp and qkv write <unk> (a real Phi-3 vocabulary has byte fallback instead)."""
    path = tiny_gguf(tmp_path / "t.gguf", ARCHS[arch], space_prefix=space_prefix)
    model = load(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in ["the dog", "the  cat a dog", " the cat", "<bos>the cat", "a dog  "]:
        assert model.tokenizer.encode(text).ids == theirs(text).input_ids, text


LLAMA3_TEXTS = [*QWEN_TEXTS, "1234567 and 12", "call 555-0123 now", "x=10000;y=99"]


@pytest.mark.parametrize("pre", ["llama-bpe", "llama3"])
def test_llama3_pre_tokenizer_matches_transformers(tmp_path, pre):
    """Llama 3.x files (tokenizer.ggml.pre "llama-bpe"): digits go in runs of up to three before
    BPE ("12345" → "123" + "45"), unlike Qwen2's one by one and GPT-2's whole number. Oracle: transformers' GGUF
    tokenizer of the same file (arch llama), which uses Meta's Llama 3 split pattern."""
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, val in {"block_count": 1, "context_length": 32, "embedding_length": 8,
                     "feed_forward_length": 16, "attention.head_count": 2,
                     "attention.head_count_kv": 1}.items():  # fmt: skip
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    tokens = [*BPE_TOKENS, "34"]
    w.add_token_list(tokens)
    w.add_token_merges([*BPE_MERGES, "3 4"])
    w.add_token_types([1] * (len(tokens) - 4) + [3] * 3 + [1])
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = qgguf.make_tokenizer(qgguf.read_gguf(path, cache_dir=False).metadata)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in LLAMA3_TEXTS:
        want = theirs(text, add_special_tokens=False).input_ids
        assert ours.encode(text, add_special_tokens=False).ids == want, text
    pieces = [tokens[i] for i in ours.encode("12345", add_special_tokens=False).ids]
    assert pieces == ["12", "3", "4", "5"]  # "123" + "45": the merge "3 4" cannot cross runs


CHAT_TEMPLATES = [
    # loop controls, as Qwen3's and other templates use them
    "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
    "<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    # tojson keeps non-ASCII text as it is
    "{% for m in messages %}{{ m.content | tojson }}\n{% endfor %}",
    # Llama 3.x: the system prompt's date from strftime_now when the renderer defines it
    "{% if strftime_now is defined %}{% set d = strftime_now('%Y') %}{% else %}{% set d = 'never' %}"
    "{% endif %}{{ d | length }}{% for m in messages %}|{{ m['content'] | trim }}{% endfor %}",
]


@pytest.mark.parametrize("template", CHAT_TEMPLATES)
def test_chat_templates_render_as_transformers(template):
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "system", "content": "Be brief. ü"},
                {"role": "user", "content": " Où est 🙂? "}, {"role": "user", "content": "x"}]  # fmt: skip
    (want,), _ = render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=True
    )
    assert qgguf.render_chat(template, messages, add_generation_prompt=True) == want
