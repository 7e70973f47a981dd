"""The GGUF families GPT-2, StarCoder2 and BLOOM against transformers' own GGUF loader.

For each architecture a tiny random GGUF is written here with the `gguf` package as llama.cpp's
`convert_hf_to_gguf.py` lays one out: its tensor names and `<arch>.*` keys, LayerNorm gains and
biases, GPT-2's and BLOOM's fused `attn_qkv` as rows Q | K | V (the converter's transpose of
GPT-2's Conv1D, its reordering of BLOOM's per-head query_key_value), GPT-2's `position_embd`,
BLOOM's `token_embd_norm`, `output.weight` a copy of the embeddings for both; twice: float32,
and with every matrix Q8_0. `qkv.load` and `AutoModelForCausalLM.from_pretrained(folder,
gguf_file=name)` read the same file; their logits agree within REL_TOL of the logits' scale and
10 greedy tokens agree, with and without the KV cache. Then the checks that prove the
comparison can fail, one per peculiarity, refused files, and the tokenizers.

What transformers reads, and the sizes chosen for it: GPT-2's position table is n_positions =
1024 rows whatever the file says (so the file says 1024, GPT-2's own n_ctx); BLOOM has 6 heads
(not a power of two: ALiBi's interleaved extra slopes); StarCoder2 has GQA (4 query, 2 kv
heads). transformers' StarCoder2 reader ignores `rope.freq_base` (it keeps 10⁴, llama.cpp reads
the file's): the parity files say 10⁴, and a file with another base is checked against
Starcoder2ForCausalLM built with it. Its GGUF tokenizer splits every byte-level vocabulary
with GPT-2's regex, where llama.cpp (and qkv) follow `tokenizer.ggml.pre`: StarCoder2's digits
one by one, BLOOM's own split; for those the oracle is a tokenizer.json written as the model
ships it, loaded by transformers' PreTrainedTokenizerFast.
"""

import json
import os

import numpy as np
import pytest
import torch

from qkv.models import gguf as qgguf
from qkv.models import llama
from qkv.nn import KVCache
from tests.models.test_gguf_families import (
    BPE_MERGES,
    BPE_SPECIAL,
    BPE_TOKENS,
    N_GREEDY,
    QWEN_TEXTS,
    REL_TOL,
    Arch,
    _permute_as_llama,
    add_tensor,
    assert_breaks_parity,
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

os.environ["HF_HUB_OFFLINE"] = "1"

N_IDS = 23
ARCHS = {
    "gpt2": Arch("gpt2", 64, 4, 4, 16, 256, 2, tied=False, spm=False),
    "starcoder2": Arch("starcoder2", 64, 4, 2, 16, 96, 2, tied=True, spm=False),
    "bloom": Arch("bloom", 96, 6, 6, 16, 384, 2, tied=False, spm=False),
}
N_CTX = {"gpt2": 1024, "starcoder2": 64, "bloom": 96}  # bloom: the converter writes n_embed
PRE = {"gpt2": "gpt-2", "starcoder2": "starcoder", "bloom": "bloom"}  # tokenizer.ggml.pre
# two merges across GPT-2's split of "don't" ("don" + "'t"), "n '" first: a split that keeps
# the word whole (BLOOM's) tokenizes it differently
MERGES = [*BPE_MERGES, "n '", "' t"]
TOKENS = [*BPE_TOKENS, "n'", "'t"]
EOT = TOKENS.index("<|endoftext|>")


def shapes(a: Arch) -> dict[str, tuple[int, ...]]:
    """Tensor name → PyTorch (out, in) shape, llama.cpp's names for the architecture."""
    hd, kd, V = a.H * a.D, a.K * a.D, len(TOKENS)
    out = {"token_embd.weight": (V, a.M), "output_norm.weight": (a.M,), "output_norm.bias": (a.M,)}
    if a.name == "gpt2":
        out["position_embd.weight"] = (N_CTX["gpt2"], a.M)
    if a.name == "bloom":
        out |= {"token_embd_norm.weight": (a.M,), "token_embd_norm.bias": (a.M,)}
    for i in range(a.L):
        b = f"blk.{i}."
        for n in ("attn_norm", "ffn_norm"):
            out |= {b + n + ".weight": (a.M,), b + n + ".bias": (a.M,)}
        out |= {b + "attn_output.weight": (a.M, hd), b + "attn_output.bias": (a.M,),
                b + "ffn_up.weight": (a.F, a.M), b + "ffn_up.bias": (a.F,),
                b + "ffn_down.weight": (a.M, a.F), b + "ffn_down.bias": (a.M,)}  # fmt: skip
        if a.name == "starcoder2":
            for n, rows in (("attn_q", hd), ("attn_k", kd), ("attn_v", kd)):
                out |= {b + n + ".weight": (rows, a.M), b + n + ".bias": (rows,)}
        else:
            out |= {b + "attn_qkv.weight": (hd + 2 * kd, a.M), b + "attn_qkv.bias": (hd + 2 * kd,)}
    return out


def tiny_gguf(path, a: Arch, *, quant=None, seed=0, drop=(), rope_base=10000.0):
    """A random GGUF of architecture `a` as llama.cpp's converter writes one; every matrix
    stored as `quant` (e.g. "Q8_0") if given. `drop`: metadata keys (after `<arch>.`) and
    tensor names left out. GPT-2's and BLOOM's output.weight is the embeddings' copy."""
    w = gguf.GGUFWriter(str(path), a.name)
    arch = a.name
    keys = {"block_count": a.L, "context_length": N_CTX[arch], "embedding_length": a.M,
            "feed_forward_length": a.F, "attention.head_count": a.H}  # fmt: skip
    if arch != "gpt2":  # the GPT-2 converter writes no kv head count
        keys["attention.head_count_kv"] = a.K
    for key, val in keys.items():
        if key not in drop:
            w.add_uint32(f"{arch}.{key}", val)
    if "attention.layer_norm_epsilon" not in drop:
        w.add_float32(f"{arch}.attention.layer_norm_epsilon", 1e-5)
    if arch == "starcoder2":
        w.add_float32(f"{arch}.rope.freq_base", rope_base)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE[arch])
    w.add_token_list(TOKENS)
    w.add_token_merges(MERGES)
    w.add_token_types([1 if t not in BPE_SPECIAL else 3 for t in TOKENS])
    w.add_bos_token_id(EOT)
    w.add_eos_token_id(EOT)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in shapes(a).items():
        if len(shape) == 1:  # LayerNorm gains around 1, biases around 0
            base = 1.0 if name.endswith(".weight") else 0.0
            tensors[name] = (base + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    if arch in ("gpt2", "bloom"):  # the converter duplicates the embeddings as the output
        tensors["output.weight"] = tensors["token_embd.weight"]
    for name, t in tensors.items():
        if name in drop:
            continue
        add_tensor(w, name, t, quant)
    finish(w)
    return path


VARIANTS = [(name, q) for name in ARCHS for q in (None, "Q8_0")]


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{n}-{q or 'f32'}" for n, q in VARIANTS])
def tiny(request, tmp_path_factory):
    name, quant = request.param
    a = ARCHS[name]
    folder = tmp_path_factory.mktemp(f"{name}-{quant}")
    path = tiny_gguf(folder / "tiny.gguf", a, quant=quant)
    model = load_cached(path, folder)
    return a, path, model, reference(path)


# --------------------------------------------------------------------------------------------
# parity


def test_config_reads_the_metadata(tiny):
    a, _, model, ref = tiny
    c = model.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.d_head, c.d_model, c.d_ff) == (
        a.L, a.H, a.K, a.D, a.M, a.F)  # fmt: skip
    assert (c.norm, c.gated, c.max_positions) == ("layer", False, N_CTX[a.name])
    assert c.norm_eps == pytest.approx(1e-5)  # a float32 key
    assert c.attn_bias and c.out_bias and c.mlp_bias and c.norm_bias
    assert c.tie_embeddings == a.tied and c.vocab_size == ref.config.vocab_size == len(TOKENS)
    assert c.positions == {"gpt2": "learned", "starcoder2": "rope", "bloom": "alibi"}[a.name]
    assert c.embed_norm == (a.name == "bloom")
    acts = {"gpt2": "gelu_tanh", "starcoder2": "gelu_tanh", "bloom": "gelu_tanh_bloom"}
    assert c.act == acts[a.name]
    assert c.windows is None and c.rope_scaling is None
    assert (c.bos_id, c.eos_id) == (EOT, EOT)


def test_logits_match_transformers_gguf(tiny):
    a, _, model, ref = tiny
    assert_logits_match(model, ref, ids_for(a, 1, N_IDS))


def test_greedy_tokens_with_and_without_cache(tiny):
    a, _, model, ref = tiny
    assert_greedy_match(ref, model, ids_for(a, 2, 6), N_GREEDY)


def test_incremental_logits_match_transformers(tiny):
    """Four tokens, then one at a time through the KV cache: every position's logits as
    transformers' one-shot run."""
    a, _, model, ref = tiny
    ids = ids_for(a, 3, N_IDS)
    with torch.no_grad():
        cache = KVCache(model.config.n_layers)
        parts = [model(ids[:, :4], cache=cache)]
        parts += [model(ids[:, i : i + 1], cache=cache) for i in range(4, N_IDS)]
        err = rel(torch.cat(parts, 1), ref(ids).logits)
    assert cache.length == N_IDS and err <= REL_TOL, err


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_quantised_fused_qkv_decodes_from_its_blocks(tmp_path, arch):
    """Every matrix Q8_0, the fused attn_qkv (with its bias) included: the one-row step
    multiplies by the blocks, split by rows, and equals transformers one token at a time."""
    from qkv.nn.accelerate import mirrors

    a = ARCHS[arch]
    path = tiny_gguf(tmp_path / "q.gguf", a, quant="Q8_0")
    model = load(path)
    backed = mirrors(model)
    assert {"blocks.0.attn.qkv", "blocks.0.mlp.up", "lm_head"} <= set(backed), sorted(backed)
    ids = ids_for(a, 1, N_IDS)
    with torch.no_grad():
        want = reference(path)(ids).logits
        cache = KVCache(model.config.n_layers)
        steps = torch.cat([model(ids[:, j : j + 1], cache=cache) for j in range(ids.shape[1])], 1)
    assert rel(steps, want) <= REL_TOL  # one row at a time: the blocks
    assert all(m.valid() for m, _ in backed.values())  # the blocks were usable, not retired


def test_starcoder2_rope_base_is_read(tmp_path):
    """rope.freq_base 1000 (transformers' GGUF reader keeps 10⁴): the oracle is
    Starcoder2ForCausalLM with rope_theta 1000, holding the weights transformers read."""
    a = ARCHS["starcoder2"]
    path = tiny_gguf(tmp_path / "base.gguf", a, rope_base=1000.0)
    model = load(path)
    assert model.config.rope_base == 1000.0
    read = reference(path)
    cfg = read.config
    cfg.rope_parameters = {**cfg.rope_parameters, "rope_theta": 1000.0}
    ref = transformers.Starcoder2ForCausalLM(cfg).eval()
    ref.load_state_dict(read.state_dict(), strict=True)
    ids = ids_for(a, 1, N_IDS)
    with torch.no_grad():
        want = ref(ids).logits
        assert rel(model(ids), want) <= REL_TOL
        assert rel(read(ids).logits, want) > 100 * REL_TOL  # the base matters here


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


def _per_head_qkv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows Q | K | V → BLOOM's own per-head (h, 3, d) order: the converter's reordering
    undone (or never done)."""
    return t.unflatten(0, (3, n_heads, -1)).transpose(0, 1).flatten(0, 2)


def broken(path, monkeypatch, change):
    """The tiny model read with one peculiarity undone: a tensor, the config or the family."""
    contents = qgguf.read_gguf(path, cache_dir=False)
    arch = contents.architecture
    t, n = contents.tensors, contents.metadata[f"{arch}.block_count"]
    H = contents.metadata[f"{arch}.attention.head_count"]
    if change == "no-positions":  # GPT-2 without its position table
        t["position_embd.weight"] = torch.zeros_like(t["position_embd.weight"])
    elif change == "qkv-per-head":  # the fused Q | K | V read in BLOOM's per-head order
        for i in range(n):
            for s in ("weight", "bias"):
                t[f"blk.{i}.attn_qkv.{s}"] = _per_head_qkv(t[f"blk.{i}.attn_qkv.{s}"], H)
    elif change == "o-transposed":  # GPT-2's attn_output as Conv1D's (in, out)
        for i in range(n):
            t[f"blk.{i}.attn_output.weight"] = t[f"blk.{i}.attn_output.weight"].t().contiguous()
    elif change == "no-qk-bias":  # StarCoder2 without its q and k biases
        for i in range(n):
            for s in ("attn_q", "attn_k"):
                t[f"blk.{i}.{s}.bias"] = torch.zeros_like(t[f"blk.{i}.{s}.bias"])
    elif change == "no-norm-bias":  # every LayerNorm without its bias
        for name in t:
            if name.endswith("norm.bias"):
                t[name] = torch.zeros_like(t[name])
    elif change == "no-alibi":  # BLOOM with every slope 0: no positions at all
        import qkv.models.decoder as decoder

        monkeypatch.setattr(decoder, "alibi_slopes", lambda h: torch.zeros(h))
    elif change == "permuted":
        _permute_as_llama(monkeypatch, arch)
    model = llama.from_gguf(contents, cache_dir=False)
    if change == "no-embed-norm":  # BLOOM without the LayerNorm on its embeddings
        model.embed_norm = torch.nn.Identity()
    return model


CHANGES = [
    ("gpt2", "no-positions"), ("gpt2", "qkv-per-head"), ("gpt2", "o-transposed"),
    ("gpt2", "no-norm-bias"),
    ("starcoder2", "no-qk-bias"), ("starcoder2", "permuted"), ("starcoder2", "no-norm-bias"),
    ("bloom", "no-alibi"), ("bloom", "no-embed-norm"), ("bloom", "qkv-per-head"),
    ("bloom", "no-norm-bias"),
]  # fmt: skip


@pytest.mark.parametrize(("arch", "change"), CHANGES)
def test_the_check_can_fail(f32, monkeypatch, arch, change):
    a, path, ref = f32[arch]
    assert_breaks_parity(a, path, ref, lambda: broken(path, monkeypatch, change))


# --------------------------------------------------------------------------------------------
# refused files


@pytest.mark.parametrize(
    ("arch", "drop", "message"),
    [
        ("gpt2", "attention.layer_norm_epsilon",
         r"metadata key 'gpt2.attention.layer_norm_epsilon' is missing"),
        ("bloom", "feed_forward_length", r"metadata key 'bloom.feed_forward_length' is missing"),
        ("starcoder2", "context_length", r"metadata key 'starcoder2.context_length' is missing"),
        ("gpt2", "position_embd.weight", r"lacks tensor 'position_embd\.weight' that a gpt2 GGUF"),
        ("bloom", "token_embd_norm.bias", r"lacks tensor 'token_embd_norm\.bias' that a bloom GGUF"),
        ("bloom", "blk.1.attn_qkv.bias", r"lacks tensor 'blk\.1\.attn_qkv\.bias' .*\(1 missing"),
        ("starcoder2", "blk.0.attn_k.bias", r"lacks tensor 'blk\.0\.attn_k\.bias' .*\(1 missing"),
    ],
)  # fmt: skip
def test_missing_key_or_tensor_is_a_clear_error(tmp_path, arch, drop, message):
    path = tiny_gguf(tmp_path / "x.gguf", ARCHS[arch], drop=(drop,))
    with pytest.raises(ValueError, match=message):
        load(path)


@pytest.mark.parametrize("arch", ["gpt2", "starcoder2"])
def test_rope_scaling_is_refused(tmp_path, arch):
    path = tmp_path / "x.gguf"
    tiny_gguf(path, ARCHS[arch])
    contents = qgguf.read_gguf(path, cache_dir=False)
    contents.metadata[f"{arch}.rope.scaling.type"] = "linear"
    contents.metadata[f"{arch}.rope.scaling.factor"] = 4.0
    with pytest.raises(ValueError, match=rf"this {arch} GGUF uses RoPE scaling"):
        llama.from_gguf(contents, cache_dir=False)


# --------------------------------------------------------------------------------------------
# tokenizers: transformers' GGUF tokenizer, and each model's own tokenizer.json

TEXTS = [*QWEN_TEXTS, "don't stop", "x=12345;y", "Hi, the dog. The cat!", "a|b (c) the…d"]
# where GPT-2's regex, StarCoder's digit split and BLOOM's split tokenize alike
COMMON = ["the dog", "  the  cat ", "thé dog\tcat", "<|im_start|>user\nthe cat<|im_end|>"]
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
TOKENIZER_JSON_PRE = {  # the pre_tokenizer of StarCoder2's and BLOOM's tokenizer.json
    "starcoder2": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {**_BYTE_LEVEL, "use_regex": True}]},
    "bloom": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": " ?[^(\\s|[.,!?…。，、।۔،])]+"},
         "behavior": "Isolated", "invert": False}, {**_BYTE_LEVEL, "use_regex": False}]},
}  # fmt: skip


def shipped_tokenizer(arch: str, folder):
    """The model's tokenizer.json, written plainly (vocabulary, merges, control tokens and the
    model's own pre-tokenizer), read by transformers."""
    added = [{"id": TOKENS.index(t), "content": t, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True} for t in BPE_SPECIAL]  # fmt: skip
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": TOKENIZER_JSON_PRE[arch], "post_processor": None,
        "decoder": {**_BYTE_LEVEL, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(TOKENS)}, "merges": MERGES},
    }  # fmt: skip
    file = folder / "tokenizer.json"
    file.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(file))


def ours_and_gguf_oracle(tmp_path, arch):
    path = tiny_gguf(tmp_path / "t.gguf", ARCHS[arch])
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    return load(path).tokenizer, theirs


def test_gpt2_tokenizer_matches_transformers_gguf(tmp_path):
    ours, theirs = ours_and_gguf_oracle(tmp_path, "gpt2")
    for text in TEXTS:
        want = theirs(text, add_special_tokens=False).input_ids
        assert ours.encode(text, add_special_tokens=False).ids == want, text


@pytest.mark.parametrize("arch", ["starcoder2", "bloom"])
def test_tokenizer_matches_the_models_own(tmp_path, arch):
    """All texts as the model's tokenizer.json splits them (what llama.cpp's `pre` stands for);
    the texts where the splits coincide as transformers' GGUF tokenizer too (same vocabulary,
    merges and control tokens). The others prove the split is the model's, not GPT-2's."""
    ours, theirs = ours_and_gguf_oracle(tmp_path, arch)
    shipped = shipped_tokenizer(arch, tmp_path)
    differ = []
    for text in TEXTS:
        got = ours.encode(text, add_special_tokens=False).ids
        assert got == shipped(text, add_special_tokens=False).input_ids, text
        gpt2_split = theirs(text, add_special_tokens=False).input_ids
        if text in COMMON:
            assert got == gpt2_split, text
        differ += [text] if got != gpt2_split else []
    assert differ, "no text tells the model's split from GPT-2's"
    assert ("x=12345;y" in differ) == (arch == "starcoder2")
    assert ("don't stop" in differ) == (arch == "bloom")
