"""Declarative conversion: per-head reshapes against the nn.Linear math, strict reports."""

import pytest
import torch

from qkv.models.convert import Rule, convert, heads_bias, heads_in, heads_out
from qkv.nn import MultiHeadAttention


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(MultiHeadAttention(12, 3, d_head=4) for _ in range(2))


def linear_checkpoint(seed=0):
    g = torch.Generator().manual_seed(seed)
    ck = {}
    for i in range(2):
        for n in ("q", "k", "v"):
            ck[f"l.{i}.{n}.weight"] = torch.randn(12, 12, generator=g, dtype=torch.float64)
            ck[f"l.{i}.{n}.bias"] = torch.randn(12, generator=g, dtype=torch.float64)
        ck[f"l.{i}.o.weight"] = torch.randn(12, 12, generator=g, dtype=torch.float64)
        ck[f"l.{i}.o.bias"] = torch.randn(12, generator=g, dtype=torch.float64)
    return ck


RULES = [
    Rule("layers.{}.W_Q", "l.{}.q.weight", heads_in(3, 4)),
    Rule("layers.{}.W_K", "l.{}.k.weight", heads_in(3, 4)),
    Rule("layers.{}.W_V", "l.{}.v.weight", heads_in(3, 4)),
    Rule("layers.{}.b_Q", "l.{}.q.bias", heads_bias(3, 4)),
    Rule("layers.{}.b_K", "l.{}.k.bias", heads_bias(3, 4)),
    Rule("layers.{}.b_V", "l.{}.v.bias", heads_bias(3, 4)),
    Rule("layers.{}.W_O", "l.{}.o.weight", heads_out(3, 4)),
    Rule("layers.{}.b_O", "l.{}.o.bias"),
]


def test_per_head_layout_reproduces_linear_attention():
    ck = linear_checkpoint()
    m = Two().double()
    report = convert(ck, RULES, m, n_layers=2)
    assert len(report.loaded) == 16 and not report.missing and not report.unexpected
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    lin = {
        n: torch.nn.functional.linear(x, ck[f"l.1.{n}.weight"], ck[f"l.1.{n}.bias"]) for n in "qkv"
    }
    q, k, v = (lin[n].view(2, 5, 3, 4).transpose(1, 2) for n in "qkv")  # (b h i d)
    z = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    want = torch.nn.functional.linear(
        z.transpose(1, 2).reshape(2, 5, 12), ck["l.1.o.weight"], ck["l.1.o.bias"]
    )
    torch.testing.assert_close(m.layers[1](x), want)


def test_strict_report_and_nothing_half_loaded():
    ck = linear_checkpoint()
    m = Two().double()
    bad = dict(ck)
    del bad["l.1.v.bias"]
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError,
        match=r"lacks tensor 'l\.1\.v\.bias' that the model has \(1 missing; it also holds 1 "
        r"tensor the model does not have: 'extra\.weight'; ",
    ):
        convert(bad, RULES, m, n_layers=2)
    assert convert(
        ck | {"extra.weight": torch.zeros(1)}, RULES, m, n_layers=2, ignore=["extra.*"]
    ).ignored == ["extra.weight"]
    m2 = Two().double()
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    bad = dict(ck)
    bad["l.1.o.bias"] = torch.zeros(13, dtype=torch.float64)  # the last tensor is wrong
    with pytest.raises(
        ValueError, match=r"'l\.1\.o\.bias' has shape \(13,\) but 'layers\.1\.b_O' expects \(12,\)"
    ):
        convert(bad, RULES, m2, n_layers=2)
    for k, v in m2.state_dict().items():
        torch.testing.assert_close(v, before[k])  # untouched
    with pytest.raises(ValueError, match=r"no rule fills"):
        convert(ck, RULES[:-1], Two().double(), n_layers=2)
