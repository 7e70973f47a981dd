"""nn.varlen.unpadded: packing a padded batch to its real tokens and back."""

import pytest
import torch

from qkv.nn.varlen import one_run_per_row, unpadded


def test_packs_real_tokens_in_order_and_scatters_back():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    keep = torch.tensor([[True, True, False, False], [False, True, False, True]])
    seen = {}

    def fn(h, segments):
        seen["h"], seen["segments"] = h.clone(), segments
        return h * 10

    y = unpadded(x, keep, fn)
    assert seen["segments"] == [2, 2]
    assert torch.equal(seen["h"][0], x[keep])  # row by row, order kept
    assert torch.equal(y[keep], x[keep] * 10)
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep]))


def test_output_width_and_edge_cases():
    x = torch.randn(2, 3, 4)
    keep = torch.tensor([[True, False, True], [False, False, False]])
    y = unpadded(x, keep, lambda h, s: h.sum(-1, keepdim=True).expand(-1, -1, 7))
    assert y.shape == (2, 3, 7) and y[1].abs().sum() == 0
    none = unpadded(x, torch.zeros(2, 3, dtype=torch.bool), lambda h, s: pytest.fail("called"))
    assert torch.equal(none, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"must match x's \(B, S\) = \(2, 3\)"):
        unpadded(x, torch.ones(3, 2, dtype=torch.bool), lambda h, s: h)


def test_one_run_per_row():
    t, f = True, False
    assert one_run_per_row(torch.tensor([[t, t, f], [f, t, t], [f, f, f], [t, t, t]]))
    assert not one_run_per_row(torch.tensor([[t, f, t], [t, t, t]]))
