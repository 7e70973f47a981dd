"""The GGUF families StableLM and Falcon against transformers' own GGUF loader.

Tiny random GGUFs written here as llama.cpp's converter writes each architecture (its tensor
names and `<arch>.*` keys, see `qkv.models.gguf_families_extra`), float32 and with every matrix
Q8_0: StableLM 2 as 1.6B (q/k/v biases, a sequential block with ffn_norm; GQA) and as 12B
without its QK-norm (no biases, parallel residual: no ffn_norm), both with a quarter of each
head rotating; Falcon 7B (multi-query attn_qkv in Q | K | V rows, one LayerNorm feeding
attention and a GELU MLP side by side). `qkv.load` and `AutoModelForCausalLM.from_pretrained(
folder, gguf_file=name)` read the same file: logits within REL_TOL, 10 greedy tokens equal
with and without the KV cache, the tokenizer's ids equal. Then each peculiarity undone breaks
parity by > 100 × REL_TOL, llama.cpp's split rules for the "stablelm2" and "falcon"
pre-tokenizers against its expressions applied here with the `regex` module, and the files
refused with a clear error.

What transformers reads, and the files chosen for it: StableLM's rope.dimension_count and
rope.freq_base are not read (partial_rotary_factor 0.25 and θ 10⁴, its defaults), so the
files rotate d/4 features and state no base, as the converter (which writes none); Falcon's
attention.layer_norm_epsilon is not read (1e-5, its default), so the files state 1e-5, and
Falcon's unembedding is always tied to token_embd (the file either has no output.weight or
one equal to token_embd). Its GGUF tokenizer ignores tokenizer.ggml.pre (GPT-2's split for
both), so the parity texts are ones every split rule cuts alike; the split rules themselves
are checked against llama.cpp's expressions.
"""

import dataclasses
import os

import numpy as np
import pytest
import torch

import qkv
from qkv.models import gguf as qgguf
from qkv.models import gguf_families, llama
from qkv.models.families import W
from tests.models.test_gguf_families import (
    BPE_MERGES,
    BPE_TOKENS,
    N_GREEDY,
    N_IDS,
    REL_TOL,
    Arch,
    _byte_alphabet,
    add_tensor,
    assert_greedy_match,
    assert_logits_match,
    finish,
    ids_for,
    load,
    load_cached,
    reference,
    rel,
)

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
gguf = pytest.importorskip("gguf", reason="the gguf package writes the tiny files")
regex = pytest.importorskip("regex", reason="llama.cpp's split expressions are run with it")

os.environ["HF_HUB_OFFLINE"] = "1"

STABLELM = Arch("stablelm", 64, 4, 2, 16, 96, 3, tied=False, spm=False)
FALCON = Arch("falcon", 64, 4, 1, 16, 256, 3, tied=True, spm=False)  # d_ff = 4·d_model
PRE = {"stablelm": "stablelm2", "falcon": "falcon"}


@dataclasses.dataclass(frozen=True)
class Kind:
    arch: Arch
    parallel: bool = False  # StableLM: no ffn_norm (Falcon is always parallel)
    qkv_bias: bool = False  # StableLM: attn_q/k/v.bias


KINDS = {
    "stablelm2-1.6b": Kind(STABLELM, parallel=False, qkv_bias=True),
    "stablelm2-12b": Kind(STABLELM, parallel=True),
    "falcon-7b": Kind(FALCON, parallel=True),
}


def shapes(k: Kind) -> dict[str, tuple[int, ...]]:
    """Tensor name → PyTorch (out, in) shape, llama.cpp's names for the architecture."""
    a, n_vocab = k.arch, len(BPE_TOKENS)
    hd, kd = a.H * a.D, a.K * a.D
    out = {"token_embd.weight": (n_vocab, a.M), "output_norm.weight": (a.M,),
           "output_norm.bias": (a.M,)}  # fmt: skip
    if not a.tied:
        out["output.weight"] = (n_vocab, a.M)
    for i in range(a.L):
        b = f"blk.{i}."
        out |= {b + "attn_norm.weight": (a.M,), b + "attn_norm.bias": (a.M,),
                b + "attn_output.weight": (a.M, hd), b + "ffn_up.weight": (a.F, a.M),
                b + "ffn_down.weight": (a.M, a.F)}  # fmt: skip
        if a.name == "falcon":
            out[b + "attn_qkv.weight"] = (hd + 2 * kd, a.M)
            continue
        out |= {b + "attn_q.weight": (hd, a.M), b + "attn_k.weight": (kd, a.M),
                b + "attn_v.weight": (kd, a.M), b + "ffn_gate.weight": (a.F, a.M)}  # fmt: skip
        if k.qkv_bias:
            out |= {b + "attn_q.bias": (hd,), b + "attn_k.bias": (kd,), b + "attn_v.bias": (kd,)}
        if not k.parallel:
            out |= {b + "ffn_norm.weight": (a.M,), b + "ffn_norm.bias": (a.M,)}
    return out


def tiny_gguf(path, k: Kind, *, quant=None, seed=0, kv=None, drop=(), extra_tensors=None,
              output_copy=False):  # fmt: skip
    """A random GGUF of kind `k` as llama.cpp writes one; every matrix stored as `quant` (e.g.
    "Q8_0") if given. `kv`: `<arch>.` keys to add (None: remove), `drop`: tensors to leave out,
    `extra_tensors`: name → float32 array, `output_copy`: an output.weight equal to token_embd
    (the converter writing a tied lm_head)."""
    a = k.arch
    arch = a.name
    w = gguf.GGUFWriter(str(path), arch)
    keys = {"context_length": 64, "embedding_length": a.M, "block_count": a.L,
            "feed_forward_length": a.F, "attention.head_count": a.H,
            "attention.head_count_kv": a.K, "attention.layer_norm_epsilon": 1e-5}  # fmt: skip
    if arch == "stablelm":
        keys["rope.dimension_count"] = a.D // 4  # partial_rotary_factor 0.25
        keys["use_parallel_residual"] = k.parallel
    keys |= kv or {}
    for key, val in keys.items():
        if val is None:
            continue
        if isinstance(val, bool):
            w.add_bool(f"{arch}.{key}", val)
        elif isinstance(val, int):  # llama.cpp's counts: uint32
            w.add_uint32(f"{arch}.{key}", val)
        elif isinstance(val, str):
            w.add_string(f"{arch}.{key}", val)
        else:
            w.add_float32(f"{arch}.{key}", val)
    if arch == "falcon":
        w.add_string("general.tensor_data_layout", "jploski")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE[arch])
    w.add_token_list(BPE_TOKENS)
    w.add_token_merges(BPE_MERGES)
    w.add_token_types([1] * (len(BPE_TOKENS) - 3) + [3] * 3)
    w.add_eos_token_id(BPE_TOKENS.index("<|endoftext|>"))
    w.add_bos_token_id(BPE_TOKENS.index("<|endoftext|>"))
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in shapes(k).items():
        if name.endswith(".bias"):  # LayerNorm and q/k/v biases
            arrays[name] = 0.3 * rng.standard_normal(shape)
        elif len(shape) == 1:  # LayerNorm gains
            arrays[name] = 1 + 0.3 * rng.standard_normal(shape)
        else:
            arrays[name] = rng.standard_normal(shape) / np.sqrt(shape[1])
    if output_copy:
        arrays["output.weight"] = arrays["token_embd.weight"].copy()
    arrays |= extra_tensors or {}
    for name, m in arrays.items():
        if name in drop:
            continue
        m = m.astype(np.float32)
        add_tensor(w, name, m, quant)
    finish(w)
    return path


VARIANTS = [(name, q) for name in KINDS for q in (None, "Q8_0")]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{n}-{q or 'f32'}" for n, q in VARIANTS])
def tiny(request, tmp_path_factory):
    name, quant = request.param
    k = KINDS[name]
    folder = tmp_path_factory.mktemp(f"{name}-{quant}")
    path = tiny_gguf(folder / "tiny.gguf", k, quant=quant)
    model = load_cached(path, folder)
    return k, path, model, reference(path)


# --------------------------------------------------------------------------------------------
# parity


def test_config_reads_the_file(tiny):
    k, _, model, ref = tiny
    a, c = k.arch, model.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.d_head, c.d_model, c.d_ff) == (
        a.L, a.H, a.K, a.D, a.M, a.F)  # fmt: skip
    assert c.tie_embeddings == a.tied
    assert (c.norm, c.rope_base) == ("layer", 10000.0) and c.norm_eps == pytest.approx(1e-5)
    assert c.block == ("parallel1" if k.parallel else "pre")
    assert c.attn_bias == k.qkv_bias and not (c.out_bias or c.mlp_bias or c.qk_norm)
    if a.name == "stablelm":
        assert c.rope_dim == a.D // 4 and (c.act, c.gated) == ("silu", True)
        assert ref.config.use_parallel_residual == k.parallel
        assert ref.config.use_qkv_bias == k.qkv_bias
    else:
        assert c.rope_dim is None and (c.act, c.gated) == ("gelu", False)
        assert ref.config.multi_query and ref.config.parallel_attn


def test_logits_match_transformers_gguf(tiny):
    k, _, model, ref = tiny
    assert_logits_match(model, ref, ids_for(k.arch, 1, N_IDS))


def test_greedy_tokens_with_and_without_cache(tiny):
    k, _, model, ref = tiny
    assert_greedy_match(ref, model, ids_for(k.arch, 2, 6), N_GREEDY)


def test_one_token_steps_match_transformers(tiny):
    """Four tokens, then one at a time through the KV cache (the Q8_0 files: the decode step
    multiplies by the stored blocks, the split attn_qkv's included): every position's logits
    as transformers' one-shot run."""
    k, _, model, ref = tiny
    ids = ids_for(k.arch, 3, N_IDS)
    with torch.no_grad():
        cache = qkv.nn.KVCache(model.config.n_layers)
        parts = [model(ids[:, :4], cache=cache)]
        parts += [model(ids[:, i : i + 1], cache=cache) for i in range(4, N_IDS)]
        err = rel(torch.cat(parts, 1), ref(ids).logits)
    assert err <= REL_TOL, err


def test_falcon_with_the_tied_lm_head_written_out(tmp_path):
    """The converter writes a checkpoint's lm_head.weight as output.weight, a copy of the
    embeddings for Falcon 7B: read (llama.cpp's rule), it equals transformers' tied model."""
    path = tiny_gguf(tmp_path / "out.gguf", KINDS["falcon-7b"], output_copy=True)
    model = load(path)
    assert not model.config.tie_embeddings
    ids = ids_for(FALCON, 1, N_IDS)
    with torch.no_grad():
        assert rel(model(ids), reference(path)(ids).logits) <= REL_TOL


# texts every split rule (GPT-2's, Qwen2's, Falcon's) cuts alike
TEXTS = ["the dog", "the cat the dog", " the  cat", "dog\n\ncat", "<|im_start|>the cat<|im_end|>"]


@pytest.mark.parametrize("kind", ["stablelm2-1.6b", "falcon-7b"])
def test_tokenizer_matches_transformers(tmp_path, kind):
    path = tiny_gguf(tmp_path / "t.gguf", KINDS[kind])
    model = load(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        want = theirs(text, add_special_tokens=False).input_ids
        assert model.tokenizer.encode(text, add_special_tokens=False).ids == want, text


# llama.cpp's expressions (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_FALCON and _STABLELM2 / _QWEN2),
# applied in turn: each splits every piece of the last into its matches and the gaps between
LLAMA_CPP_SPLITS = {
    "falcon": [
        "[\\p{P}\\$\\+<=>\\^~\\|`]+",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        "[0-9][0-9][0-9]",
    ],
    "stablelm2": [
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"
        "|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ],
    "gpt-2": ["'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"],
}
SPLIT_TEXTS = [
    "Hello, world!!! 1234567 and 12", "x+=y $$ ~|` <=>", "I'll we've THEY'RE don't",
    "line\n\n  next\r\nend  ", "thé dog\tcat... (a)", "a🙂b 3.14159",
]  # fmt: skip


def llama_cpp_split(text: str, exprs: list[str]) -> list[str]:
    pieces = [text]
    for e in exprs:
        out = []
        for p in pieces:
            at = 0
            for m in regex.finditer(e, p):
                out += [s for s in (p[at : m.start()], m.group()) if s]
                at = m.end()
            out += [p[at:]] if at < len(p) else []
        pieces = out
    return pieces


@pytest.mark.parametrize("pre", ["falcon", "stablelm2"])
def test_split_rules_are_llama_cpps(pre):
    alphabet = _byte_alphabet()
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
          "tokenizer.ggml.tokens": BPE_TOKENS, "tokenizer.ggml.merges": BPE_MERGES}  # fmt: skip
    tok = qgguf.make_tokenizer(md)
    differs = False
    for text in SPLIT_TEXTS:
        want = llama_cpp_split(text, LLAMA_CPP_SPLITS[pre])
        got = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
        assert got == ["".join(alphabet[b] for b in s.encode()) for s in want], text
        differs |= want != llama_cpp_split(text, LLAMA_CPP_SPLITS["gpt-2"])
    assert differs  # the texts tell the rule from GPT-2's


# --------------------------------------------------------------------------------------------
# each peculiarity matters: the same file read without it is far from transformers


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    """kind → (its float32 tiny file, transformers' model of it)."""
    out = {}
    for name, k in KINDS.items():
        path = tiny_gguf(tmp_path_factory.mktemp(f"{name}-break") / "tiny.gguf", k)
        out[name] = path, reference(path)
    return out


def broken(path, monkeypatch, change):
    """The tiny model read with one peculiarity undone: a tensor, the config or the family."""
    contents = qgguf.read_gguf(path, cache_dir=False)
    t, arch = contents.tensors, contents.architecture
    n = contents.metadata[f"{arch}.block_count"]
    if change == "no-qkv-bias":  # StableLM 2 1.6B without its q/k/v biases
        for i in range(n):
            for p in "qkv":
                t[f"blk.{i}.attn_{p}.bias"] = torch.zeros_like(t[f"blk.{i}.attn_{p}.bias"])
    elif change == "no-norm-bias":  # LayerNorm read as bias-free
        for name in [x for x in t if x.endswith("norm.bias")]:
            t[name] = torch.zeros_like(t[name])
    elif change == "sequential" and arch == "stablelm":  # an ffn_norm equal to attn_norm
        for i in range(n):
            for p in ("weight", "bias"):
                t[f"blk.{i}.ffn_norm.{p}"] = t[f"blk.{i}.attn_norm.{p}"].clone()
    elif change == "sequential":  # Falcon: x + attn(n(x)), then + mlp(n(·)) with the same norm
        fam = gguf_families.GGUF_FAMILIES[arch]
        norm2 = (W("blocks.{}.norm2.weight", "blk.{}.attn_norm.weight"),
                 W("blocks.{}.norm2.bias", "blk.{}.attn_norm.bias"))  # fmt: skip
        monkeypatch.setitem(gguf_families.GGUF_FAMILIES, arch, dataclasses.replace(
            fam, weights=fam.weights + norm2, fixed={**fam.fixed, "block": "pre"}))  # fmt: skip
    else:
        real = gguf_families.config_from_gguf(contents)
        config = dataclasses.replace(real, **{
            "full-rotary": {"rope_dim": None},
            "interleaved-rope": {"rope_interleaved": True},  # GPT-J pairs, not NeoX halves
        }[change])  # fmt: skip
        monkeypatch.setattr(llama, "config_from_gguf", lambda *a, **k: config)
    return llama.from_gguf(contents, cache_dir=False)


CHANGES = [
    ("stablelm2-1.6b", "full-rotary"), ("stablelm2-1.6b", "no-qkv-bias"),
    ("stablelm2-1.6b", "no-norm-bias"), ("stablelm2-1.6b", "interleaved-rope"),
    ("stablelm2-12b", "sequential"), ("stablelm2-12b", "full-rotary"),
    ("falcon-7b", "sequential"), ("falcon-7b", "no-norm-bias"),
    ("falcon-7b", "interleaved-rope"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "change"), CHANGES)
def test_the_check_can_fail(f32, monkeypatch, kind, change):
    path, ref = f32[kind]
    ids = ids_for(KINDS[kind].arch, 1, N_IDS)
    with torch.no_grad():
        want = ref(ids).logits
        assert rel(load(path)(ids), want) <= REL_TOL  # the premise
        err = rel(broken(path, monkeypatch, change)(ids), want)
    assert err > 100 * REL_TOL, err


# --------------------------------------------------------------------------------------------
# refused files


Q_NORM = {f"blk.{i}.attn_q_norm.weight": np.ones((4, 16)) for i in range(3)}
NORM_2 = {f"blk.{i}.attn_norm_2.{p}": np.ones(64) for i in range(3) for p in ("weight", "bias")}


@pytest.mark.parametrize(
    ("kind", "extra", "message"),
    [
        ("stablelm2-1.6b", {"kv": {"attention.layer_norm_epsilon": None}},
         r"metadata key 'stablelm.attention.layer_norm_epsilon' is missing"),
        ("falcon-7b", {"kv": {"block_count": None}},
         r"metadata key 'falcon.block_count' is missing"),
        # the metadata's own keys, not DecoderConfig's n_heads / n_kv_heads / d_model
        ("stablelm2-1.6b", {"kv": {"attention.head_count_kv": 3}},
         r"x\.gguf: stablelm\.attention\.head_count=4 must be a multiple of "
         r"stablelm\.attention\.head_count_kv=3 \(GQA\)$"),
        ("stablelm2-1.6b", {"kv": {"attention.head_count": 0}},  # was a ZeroDivisionError
         r"x\.gguf: stablelm\.attention\.head_count must be a positive int, got 0$"),
        ("stablelm2-1.6b", {"kv": {"embedding_length": "64"}},  # was a TypeError
         r"x\.gguf: stablelm\.embedding_length must be a positive int, got '64'$"),
        ("falcon-7b", {"drop": ("blk.1.attn_qkv.weight",)},
         r"lacks tensor 'blk\.1\.attn_qkv\.weight' that a falcon GGUF of this metadata has \(1 "
         r"missing; is the file complete"),
        ("stablelm2-1.6b", {"drop": ("blk.2.attn_k.bias",)},
         r"lacks tensor 'blk\.2\.attn_k\.bias' .*\(1 missing"),
        ("stablelm2-12b", {"extra_tensors": Q_NORM},
         r"this stablelm GGUF uses per-head QK LayerNorm \(blk.N.attn_q_norm.weight"),
        ("falcon-7b", {"kv": {"attention.head_count_kv": 4}},
         r"this falcon GGUF uses more than one kv head \(falcon.attention.head_count_kv > 1"),
        ("falcon-7b", {"extra_tensors": NORM_2},
         r"this falcon GGUF uses a second norm per layer \(blk.N.attn_norm_2"),
        ("stablelm2-1.6b", {"kv": {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}},
         r"this stablelm GGUF uses RoPE scaling"),
        ("falcon-7b", {"kv": {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}},
         r"this falcon GGUF uses RoPE scaling"),
    ],
)  # fmt: skip
def test_bad_files_are_a_clear_error(tmp_path, kind, extra, message):
    path = tiny_gguf(tmp_path / "x.gguf", KINDS[kind], **extra)
    with pytest.raises(ValueError, match=message):
        load(path)
