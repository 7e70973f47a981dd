"""The parity checks each family file runs on its own `pair` fixture: (name, transformers
model, qkv model[, folder]). A test_families_*.py file imports them by name, and pytest collects
them there, with that file's `pair`."""

from __future__ import annotations

import torch

from tests.models.test_families import (
    N_GREEDY,
    REL_TOL,
    assert_lens_rows_match,
    greedy_three_ways,
    ids_for,
    padded_error,
)


def test_padded_batch_matches_transformers(pair):
    """Right padding: the real tokens' logits equal transformers' with its attention mask."""
    _, ref, model = pair[:3]
    assert padded_error(ref, model) <= REL_TOL[torch.float32]


def test_lens_rows_match_output_attentions(pair):
    name, ref, model = pair[:3]
    assert_lens_rows_match(ref, model, name)


def test_greedy_tokens_with_and_without_the_cache(pair):
    """20 greedy tokens: transformers' `generate`, ours with the KV cache and without it."""
    _, ref, model = pair[:3]
    ref.generation_config.eos_token_id = None  # no end token: 20 picks, none suppressed
    want, cached, uncached = greedy_three_ways(ref, model, ids_for(5, 7), N_GREEDY)
    assert cached == uncached == want
