"""Generation shared by every decoder (`models.generate.Generation`), on the trained-model kind
that has no reference library: the tiny decoder. Oracle: a greedy loop written here, argmax over
the model's own full uncached forward at every step (no cache, no `Generation` code)."""

from __future__ import annotations

import pytest
import torch

from qkv.cli import main
from qkv.models import generate
from qkv.models.tiny import TinyConfig, TinyTransformer, save_checkpoint

VOCAB = ("_", "?", *(f"k{i}" for i in range(7)), *(f"v{i}" for i in range(7)))
ARCHS = {
    "learned": {},
    "rope+mlp+gqa": {"positions": "rope", "d_mlp": 48, "n_heads": 4, "n_kv_heads": 2},
    "tied_qk+bias": {"projections": "tied_qk", "bias": True, "n_layers": 3},
}


def make(seed: int = 0, max_positions: int = 24, **arch) -> TinyTransformer:
    torch.manual_seed(seed)
    config = TinyConfig(vocab=VOCAB, max_positions=max_positions, d_model=40, **arch)
    return TinyTransformer(config).eval()


def greedy_oracle(model: TinyTransformer, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens: each the argmax of a fresh forward over everything so far."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            if len(seq) > model.config.max_positions:
                break
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def prompt_ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(len(VOCAB), (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_the_oracle_cached_and_uncached(arch):
    model = make(**ARCHS[arch])
    prompt = prompt_ids(5)
    want = greedy_oracle(model, prompt, 12)
    assert len(want) == 12 and len(set(want)) > 1  # a real continuation, not one repeated token
    assert list(model.generate_ids(prompt, 12)) == want
    assert list(model.generate_ids(prompt, 12, use_cache=False)) == want


def test_text_layer_yields_the_oracle_symbols():
    model = make()
    prompt = prompt_ids(6, seed=2)
    text = " ".join(VOCAB[i] for i in prompt)
    want = [VOCAB[i] for i in greedy_oracle(model, prompt, 5)]
    pieces = list(model.generate(text, 5))
    assert pieces == [want[0], *(" " + t for t in want[1:])]
    assert next(iter(model.generate(text))) == want[0]  # default: one token, as an iterator
    assert model.generate(text, 5, stream=None) == " ".join(want)
    seen = []
    assert model.generate(text, 5, stream=seen.append) == "".join(seen) == " ".join(want)


def test_generation_stops_when_the_context_is_full():
    model = make(max_positions=10)
    prompt = prompt_ids(7)
    got = list(model.generate_ids(prompt, 50))
    assert len(got) == 10 - 7 + 1  # the last token is predicted from a full context
    assert got == greedy_oracle(model, prompt, 50)
    text = " ".join(VOCAB[i] for i in prompt_ids(12))
    with pytest.raises(ValueError, match=r"prompt is 12 tokens, beyond tiny's context of 10"):
        model.generate(text, 3)
    kept = prompt_ids(12)[-10:]
    assert (
        model.generate(text, 3, stream=None, truncate=True)
        == VOCAB[greedy_oracle(model, kept, 1)[0]]
    )


def test_sampling_is_seeded_and_respects_top_k():
    model = make()
    prompt = prompt_ids(4)
    a = list(model.generate_ids(prompt, 15, temperature=1.5, seed=3))
    assert a == list(model.generate_ids(prompt, 15, temperature=1.5, seed=3))
    assert a == list(model.generate_ids(prompt, 15, temperature=1.5, seed=3, use_cache=False))
    assert a != list(model.generate_ids(prompt, 15, temperature=1.5, seed=4))
    assert a != greedy_oracle(model, prompt, 15)  # temperature > 0 does sample
    greedy = greedy_oracle(model, prompt, 15)
    assert list(model.generate_ids(prompt, 15, temperature=1.5, top_k=1, seed=0)) == greedy
    # top_k=2: every sampled token is one of the two likeliest after the sequence so far
    seq = list(prompt)
    for t in model.generate_ids(prompt, 15, temperature=3.0, top_k=2, seed=5):
        with torch.no_grad():
            top2 = model(torch.tensor([seq]))[0, -1].topk(2).indices.tolist()
        assert t in top2
        seq.append(t)


def test_bad_arguments_name_the_fix():
    model = make()
    with pytest.raises(ValueError, match="without a chat template"):
        model.generate("k1 v2", 2, chat=True)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        model.generate("k1 v2", 0)
    with pytest.raises(ValueError, match="temperature must be a finite number ≥ 0"):
        model.generate("k1 v2", 2, temperature=-1.0)
    with pytest.raises(ValueError, match="unknown token 'x9'"):
        model.generate("k1 x9", 2)
    with pytest.raises(TypeError, match="stream must be a callable, True or None"):
        model.generate("k1 v2", 2, stream="yes")


def test_the_oracle_check_can_fail():
    """A cache that forgets its past (every step sees only the newest token) changes the
    tokens, and the comparison with the oracle notices."""
    model = make(**ARCHS["rope+mlp+gqa"])
    prompt = prompt_ids(5)
    forgetful = [prompt[-1]]
    with torch.no_grad():
        for _ in range(12):
            forgetful.append(int(model(torch.tensor([forgetful[-1:]]))[0, -1].argmax()))
    assert forgetful[1:] != greedy_oracle(model, prompt, 12)


def test_cli_generates_from_a_tiny_checkpoint(tmp_path, capsys):
    model = make(max_positions=12)
    save_checkpoint(model, tmp_path / "ckpt")
    prompt = prompt_ids(8)
    text = " ".join(VOCAB[i] for i in prompt)
    args = ["generate", text, "--model", str(tmp_path / "ckpt")]
    assert main([*args, "--max-new-tokens", "3"]) == 0
    want = [VOCAB[i] for i in greedy_oracle(model, prompt, 64)]
    assert capsys.readouterr().out == " ".join(want[:3]) + "\n"
    assert main(args) == 0  # --max-new-tokens 64: stops when the 12-token context is full
    assert capsys.readouterr().out == " ".join(want) + "\n" and len(want) == 12 - 8 + 1
    assert main([*args, "--temperature", "0.9", "--top-k", "3", "--seed", "1"]) == 0
    sampled = capsys.readouterr().out
    assert main([*args, "--temperature", "0.9", "--top-k", "3", "--seed", "1"]) == 0
    assert capsys.readouterr().out == sampled and sampled.strip().split(" ")[0] in VOCAB


def test_cached_steps_run_on_one_thread_and_the_callers_count_is_kept(monkeypatch):
    """After the prompt, each cached one-token step runs with PyTorch on one thread
    (`step_threads`); the prompt's step and the consumer between tokens see the caller's count,
    restored also when two generators interleave and when one is closed early."""
    model = make()
    seen: list[int] = []
    hidden = model.hidden

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return hidden(*args, **kwargs)

    model.hidden = spy
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a, b = model.generate_ids(prompt_ids(5), 6), model.generate_ids(prompt_ids(4), 6)
        between = []
        for _ in range(3):
            next(a)
            next(b)
            between.append(torch.get_num_threads())
        a.close()
        between.append(torch.get_num_threads())
        list(b)
        assert between == [2, 2, 2, 2] and torch.get_num_threads() == 2
        assert seen[:2] == [2, 2] and seen[2:] == [1] * 7, seen  # two prompts, then 3 + 4 steps
        seen.clear()
        list(model.generate_ids(prompt_ids(5), 3, use_cache=False))  # whole sequences: all threads
        assert seen == [2, 2, 2]
        seen.clear()
        monkeypatch.setattr(generate, "STEP_THREADS", None)  # the opt-out keeps the caller's
        list(model.generate_ids(prompt_ids(5), 3))
        assert seen == [2, 2, 2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True])
def test_temperature_must_be_a_finite_number(value):
    """NaN made softmax NaN and torch.multinomial raised its own RuntimeError; inf sampled
    uniformly, as if the model were not there."""
    model = make()
    for call in (lambda: model.generate("k1 v2", 3, temperature=value),
                 lambda: model.generate_ids([1, 2], 3, temperature=value)):  # fmt: skip
        with pytest.raises(
            ValueError,
            match=rf"^temperature must be a finite number ≥ 0 \(0 = greedy\), got {value!r}$",
        ):
            call()
    with pytest.raises(TypeError, match=r"^seed must be an int or None, got str 'x'$"):
        model.generate_ids([1, 2], 3, temperature=1.0, seed="x")


def test_a_tiny_temperature_samples_the_argmax():
    """1e-300 turned every scaled float32 logit into ±inf (NaN probabilities); shifted by the
    largest logit in float64 first, it is the greedy token, as the limit T → 0 is."""
    model = make()
    prompt = prompt_ids(5)
    greedy = greedy_oracle(model, prompt, 6)
    assert list(model.generate_ids(prompt, 6, temperature=1e-300, seed=0)) == greedy


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        ("abc", TypeError, r"^ids must be a sequence of ints \(token ids\), got str; to continue "
                           r"text, call generate\(prompt\)$"),
        (5, TypeError, r"^ids must be a sequence of ints \(token ids\), got int$"),
        ([1, 2.7], TypeError, r"^ids must be a sequence of ints \(token ids\), got float 2\.7 "
                              r"at ids\[1\]$"),
        (torch.tensor([[1, 2]]), ValueError, r"^ids must be one sequence \(1-D\) of token ids, "
                                             r"got a tensor of shape \(1, 2\); pass ids\[0\]$"),
    ],
)  # fmt: skip
def test_ids_must_be_token_ids(ids, error, message):
    with pytest.raises(error, match=message):
        make().generate_ids(ids, 3)


def test_ids_may_be_a_tensor_or_an_array():
    import numpy as np

    model = make()
    prompt = prompt_ids(5)
    want = list(model.generate_ids(prompt, 4))
    assert list(model.generate_ids(torch.tensor(prompt), 4)) == want
    assert list(model.generate_ids(np.array(prompt), 4)) == want


# --------------------------------------------------------------------------------------------
# a Decoder with a tokenizer: `Generation.generate` (the tiny model has a generate of its own)


def word_decoder(max_positions: int = 16):
    """A random 1-layer Decoder over a word-level tokenizer; no end token, so that generation
    stops only at max_new_tokens or a full context."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from qkv.models.decoder import Decoder, DecoderConfig
    from qkv.models.tokenizer import Tokenizer

    words = ["the", "dog", "ran", "far", "cat", "sat"]
    tk = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "the"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    config = DecoderConfig(name="wordlm", n_layers=1, n_heads=2, n_kv_heads=1, d_model=16,
                           d_head=8, d_ff=32, vocab_size=len(words), max_positions=max_positions)  # fmt: skip
    torch.manual_seed(0)
    return Decoder(config, Tokenizer(tk, max_length=max_positions, name="wordlm")).eval()


def spy_on_generate_ids(model, monkeypatch) -> list:
    """What `generate` hands generate_ids: (prompt ids, max_new_tokens, tokens it yielded)."""
    calls, real = [], model.generate_ids

    def spy(ids, n, **kw):
        out = list(real(ids, n, **kw))
        calls.append((list(ids), n, len(out)))
        return iter(out)

    monkeypatch.setattr(model, "generate_ids", spy)
    return calls


def test_max_new_tokens_beyond_the_context_is_said_so(monkeypatch):
    """max_new_tokens alone over the context: the error says so with both numbers, and that
    truncating the prompt cannot help; what truncate=True then does is what it says."""
    model = word_decoder(max_positions=16)
    calls = spy_on_generate_ids(model, monkeypatch)
    with pytest.raises(
        ValueError,
        match=r"^max_new_tokens=100 alone exceeds wordlm's context of 16 tokens, leaving no room "
        r"for the prompt \(2 tokens\); lower max_new_tokens to at most 14\. Truncating the "
        r"prompt cannot make room: truncate=True would keep only its last token and stop when "
        r"the context is full \(at most 16 new tokens, not 100\)$",
    ):
        model.generate("the dog", 100)
    model.generate("the dog", 100, truncate=True, stream=None)
    assert calls == [([1], 100, 16)]  # "dog" only; 16 new tokens, not 100
    with pytest.raises(
        ValueError,
        match=r"^max_new_tokens=16 alone fills wordlm's context of 16 tokens, leaving no room for "
        r"the prompt \(1 token\); lower max_new_tokens to at most 15, or pass truncate=True "
        r"\(keeps only the prompt's last token\)$",
    ):
        model.generate("dog", 16)
    model.generate("the dog", 16, truncate=True, stream=None)
    assert calls[1:] == [([1], 16, 16)]  # all 16 asked for: the last is never fed back
    model.generate("the dog", 14, stream=None)  # 2 + 14: the prompt and its answer fit
    assert calls[2:] == [([0, 1], 14, 14)]


def test_a_long_prompt_says_what_truncate_keeps(monkeypatch):
    model = word_decoder(max_positions=16)
    calls = spy_on_generate_ids(model, monkeypatch)
    prompt = " ".join(["the", "dog", "ran", "far"] * 3)  # 12 tokens
    with pytest.raises(
        ValueError,
        match=r"^prompt is 12 tokens; with max_new_tokens=6 that exceeds wordlm's context of 16 "
        r"tokens\. Shorten it, lower max_new_tokens to at most 4, or pass truncate=True \(keeps "
        r"the last 10 prompt tokens\)$",
    ):
        model.generate(prompt, 6)
    model.generate(prompt, 6, truncate=True, stream=None)
    assert calls == [([2, 3, 0, 1, 2, 3, 0, 1, 2, 3], 6, 6)]
