"""The lens records the model's dtype: `ModelSummary.dtype`, JSON `model_config.dtype` (optional
when reading: absent = float32; anything else outside the four names is refused), the terminal
and HTML headers (only when not float32) and a note for the 16-bit dtypes.

Tiny random models cast with `qkv.nn.cast` stand in for real ones (the CLI tests run the real
smollm2 in bf16). Oracle for the dtype: the torch dtype of the model's attention weights."""

from __future__ import annotations

import copy
import io
import json
import re

import numpy as np
import pytest
import torch
from rich.console import Console

import qkv.nn
from qkv.lens import ExplainResult, explain, from_json

from .conftest import SENTENCE, TinyModel

NAMES = ("float32", "bfloat16", "float16", "float64")


@pytest.fixture(scope="module")
def records() -> dict[str, ExplainResult]:
    """One record of 'it' per dtype, each from a tiny causal model cast to it."""
    out = {}
    for name in NAMES:
        m = qkv.nn.cast(TinyModel(causal=True), name)
        attn = m.blocks[0].attn
        assert attn.W_Q.dtype == getattr(torch, name)  # the oracle: what torch says it holds
        out[name] = explain(SENTENCE, "it", model=m, progress=False)
    return out


def words(s: str) -> set[str]:
    return set(re.findall(r"\w+", s))


def header(r: ExplainResult) -> str:
    """The terminal view's first line(s) before the text, unwrapped."""
    buf = io.StringIO()
    r.render(Console(file=buf, width=400, color_system=None, force_terminal=False))
    return buf.getvalue().splitlines()[0]


@pytest.mark.parametrize("name", NAMES)
def test_the_record_holds_the_model_s_dtype_and_keeps_it_through_json(records, name, tmp_path):
    r = records[name]
    assert r.model.dtype == name
    path = tmp_path / "r.json"
    s = r.to_json(path)
    doc = json.loads(s)
    assert doc["model_config"]["dtype"] == name
    back = from_json(path)
    assert back.model.dtype == name and back.to_json() == s


@pytest.mark.parametrize("name", NAMES)
def test_headers_name_the_dtype_unless_float32(records, name):
    r = records[name]
    shown = name != "float32"
    h = header(r)
    assert h.startswith("qkv explain · tiny-causal (")
    assert words(h) & set(NAMES) == ({name} if shown else set()), h
    page = r.to_html()
    sub = page.split('<div class="sub">', 1)[1].split("</div>", 1)[0]
    assert "3 layers × 4 heads" in sub
    assert words(sub) & set(NAMES) == ({name} if shown else set()), sub


@pytest.mark.parametrize("name", NAMES)
def test_a_note_for_16_bit_models_only(records, name):
    says = [n for n in records[name].notes if " runs in " in n]
    if name in ("bfloat16", "float16"):
        assert len(says) == 1 and f"runs in {name}" in says[0] and "float32" in says[0]
    else:
        assert says == []


def test_a_record_without_dtype_reads_as_float32(records):
    doc = json.loads(records["bfloat16"].to_json())
    del doc["model_config"]["dtype"]  # as records written before the field existed
    back = from_json(doc)
    assert back.model.dtype == "float32"
    assert "bfloat16" not in header(back)
    assert json.loads(back.to_json())["model_config"]["dtype"] == "float32"
    # the rest of the record is untouched
    np.testing.assert_array_equal(back.head(1, 2).weight, records["bfloat16"].head(1, 2).weight)


@pytest.mark.parametrize("bad", ["int8", "bf16", "torch.bfloat16", "", None, 16, ["float32"]])
def test_a_bad_dtype_is_refused_naming_the_field_and_the_choices(records, bad):
    doc = copy.deepcopy(json.loads(records["float32"].to_json()))
    doc["model_config"]["dtype"] = bad
    with pytest.raises(ValueError) as e:
        from_json(doc)
    msg = str(e.value)
    assert "model_config.dtype" in msg and repr(bad) in msg
    for name in NAMES:
        assert repr(name) in msg
