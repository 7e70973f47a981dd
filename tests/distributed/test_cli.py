"""`torchrun -m qkv explain`: the CLI shards the text over torchrun's ranks and prints the same
record as a single-process run (a tiny RoPE checkpoint written here; 2 gloo ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkv.models.tiny import TinyConfig, TinyTransformer, save_checkpoint

from .lens_workers import diff

TEXT = "a b c d e f g h i j k l m n o p a b c d e f g h i j"
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = TinyConfig(vocab=tuple("abcdefghijklmnop"), max_positions=64, positions="rope",
                     n_heads=4, n_kv_heads=2, d_model=32, d_mlp=64, n_layers=2)  # fmt: skip
    return save_checkpoint(TinyTransformer(cfg), tmp_path_factory.mktemp("tiny") / "ck")


ARGS = ["explain", TEXT, "--token", "h", "--occurrence", "-1", "--json", "-"]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_torchrun_explain_equals_one_process(checkpoint):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    model = ["--model", str(checkpoint)]
    one = subprocess.run([sys.executable, "-m", "qkv", *ARGS, *model], capture_output=True,
                         text=True, timeout=180, env=env)  # fmt: skip
    assert one.returncode == 0, one.stderr
    run = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "qkv", *ARGS, *model]
    sharded = subprocess.run(run, capture_output=True, text=True, timeout=180, env=env)
    assert sharded.returncode == 0, sharded.stderr
    got, want = json.loads(sharded.stdout), json.loads(one.stdout)  # rank 0 alone printed
    d, bad = diff(got, want)
    assert bad == [] and d <= 1e-5, (d, bad[:5])
    assert want["layers"], "the record holds no layer: the comparison would be vacuous"


def test_torchrun_explain_refuses_one_process_options(checkpoint):
    env = {**os.environ, "WORLD_SIZE": "2"}
    r = subprocess.run([sys.executable, "-m", "qkv", "explain", TEXT, "--token", "h", "--flow",
                        "--model", str(checkpoint)], capture_output=True, text=True, timeout=120,
                       env=env)  # fmt: skip
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "qkv explain: error: --flow, --rollout and --neuron run on one process: drop torchrun"
    ]
