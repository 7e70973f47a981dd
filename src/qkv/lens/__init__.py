"""L4 — the lens: for any token of any text, what it looked up.

    from qkv.lens import explain
    r = explain("The dog chased the ball because it was excited.", token="excited", model="smollm2")
    r.head(13, 8).keys[:3]          # keys ranked by weight: score, weight, contribution
    r.to_json("it.json"); r.to_html("it.html"); r.to_png("it.png"); print(r)

`explain` runs one forward under `qkv.nn.capture` and recomputes the query's rows exactly from
q, k and the LSE (never N×N); `capture_text` keeps one forward for many queries
(`.explain(token)`, `.rows()`, `export_rows`; `export_text` writes while the model runs). `head_search` ranks heads on pronoun → antecedent pairs.
"""

from .compare import CompareResult, HeadMove, Mover, compare, compare_records
from .explain import DEFAULT_TOP, explain
from .export import Capture, Rows, TopRows, capture_text, export_rows, export_text
from .heads import DATA_PATH, Example, HeadScores, HeadSearch, head_search, load_examples
from .lookup import query_row
from .neuron import NeuronView, neuron
from .record import (
    SCHEMA,
    ExplainResult,
    Head,
    Key,
    Layer,
    LayerKey,
    ModelSummary,
    Query,
    Rollout,
    Token,
    from_json,
)
from .rollout import flow_row, rollout_row

__all__ = [
    "DATA_PATH",
    "DEFAULT_TOP",
    "SCHEMA",
    "Capture",
    "CompareResult",
    "Example",
    "ExplainResult",
    "Head",
    "HeadMove",
    "HeadScores",
    "HeadSearch",
    "Key",
    "Layer",
    "LayerKey",
    "ModelSummary",
    "Mover",
    "NeuronView",
    "Query",
    "Rollout",
    "Rows",
    "Token",
    "TopRows",
    "capture_text",
    "compare",
    "compare_records",
    "explain",
    "export_rows",
    "export_text",
    "flow_row",
    "from_json",
    "head_search",
    "load_examples",
    "neuron",
    "query_row",
    "rollout_row",
]
