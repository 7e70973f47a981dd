"""A user's own checkpoint that does not fit: each error is one line in the file's own words
(its full tensor keys, its files, config.json's keys), and the CLI prints it with exit 2 and
no traceback. The folders are tiny random transformers checkpoints (`test_families.build`)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkv
from qkv.cli import main
from qkv.models import gguf as qgguf
from tests.models.test_families import build, word_tokenizer
from tests.models.test_smollm2 import tiny_gguf

pytest.importorskip("transformers", reason="transformers writes the checkpoints")
os.environ["HF_HUB_OFFLINE"] = "1"


def _edit(folder, fn):
    w = load_file(folder / "model.safetensors")
    fn(w)
    save_file(w, folder / "model.safetensors", metadata={"format": "pt"})


def _one_line_error(folder, capsys) -> str:
    """`qkv explain --model folder`'s stderr, checked to be one error line with exit 2."""
    capsys.readouterr()  # what building the checkpoint wrote
    rc = main(["explain", "the dog ran", "--model", str(folder), "--index", "-1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.startswith("qkv explain: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def llama(tmp_path):
    build("llama", tmp_path)
    return tmp_path


def test_a_missing_tensor_is_named_by_the_files_own_key_in_one_line(llama, capsys):
    _edit(llama, lambda w: w.pop("model.layers.0.mlp.up_proj.weight"))
    want = (
        rf"^{re.escape(str(llama))}: the checkpoint lacks tensor "
        r"'model\.layers\.0\.mlp\.up_proj\.weight' that a llama checkpoint of this config\.json "
        r"has \(1 missing; is the file complete, and is config\.json the one saved with it\?\)$"
    )
    with pytest.raises(ValueError, match=want):
        qkv.load(llama)
    assert re.search(want[1:-1], _one_line_error(llama, capsys))


def test_an_unexpected_tensor_is_named_by_the_files_own_key(llama):
    _edit(llama, lambda w: w.__setitem__("model.layers.0.self_attn.foo.weight", torch.ones(4)))
    with pytest.raises(
        ValueError,
        match=r"^[^\n]*: the checkpoint holds 1 tensor a llama checkpoint of this config\.json "
        r"does not have: 'model\.layers\.0\.self_attn\.foo\.weight' \([^\n]*\)$",
    ):
        qkv.load(llama)


def test_several_missing_list_the_first_few_and_the_count(llama):
    gone = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qkvo"]

    def fn(w):
        for k in gone:
            w.pop(k)
        w["extra.weight"] = torch.ones(1)

    _edit(llama, fn)
    with pytest.raises(ValueError) as e:
        qkv.load(llama)
    msg = str(e.value)
    listed = re.search(
        r"lacks 8 tensors that a llama checkpoint of this config\.json has \(8 missing: "
        r"((?:'[^']+', ){5})…; it also holds 1 tensor a llama checkpoint of this "
        r"config\.json does not have: 'extra\.weight'; is the file complete",
        msg,
    )
    assert listed and "\n" not in msg, msg
    named = re.findall(r"'([^']+)'", listed[1])
    assert len(set(named)) == 5 and set(named) <= set(gone), named


def test_the_output_head_is_named_outside_the_base_models_prefix(llama):
    """lm_head sits beside `model.` in a *ForCausalLM file: 'lm_head.weight', not
    'model.lm_head.weight'."""
    _edit(llama, lambda w: w.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"lacks tensor 'lm_head\.weight' that a llama"):
        qkv.load(llama)


def test_a_file_without_the_prefix_is_named_without_it(llama):
    def fn(w):
        for k in list(w):
            if k.startswith("model."):
                w[k.removeprefix("model.")] = w.pop(k)
        w.pop("norm.weight")

    _edit(llama, fn)
    with pytest.raises(ValueError, match=r"lacks tensor 'norm\.weight' that a llama"):
        qkv.load(llama)


def test_gpt2_keys_keep_their_transformer_prefix(tmp_path):
    build("gpt2", tmp_path)
    _edit(tmp_path, lambda w: w.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(
        ValueError, match=r"lacks tensor 'transformer\.h\.1\.mlp\.c_fc\.weight' that a gpt2 "
    ):
        qkv.load(tmp_path)


def test_a_shape_mismatch_names_the_files_own_key(llama):
    _edit(llama, lambda w: w.__setitem__("model.layers.1.self_attn.k_proj.weight", torch.ones(3)))
    with pytest.raises(
        ValueError, match=r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \(3,\)"
    ):
        qkv.load(llama)


def test_token_ids_past_config_vocab_size_name_tokenizer_json_at_encode_time(tmp_path, capsys):
    """word_tokenizer's ids run to 18; config.json says 10. Texts of ids < 10 still work."""
    build("llama", tmp_path, changes={"vocab_size": 10})
    word_tokenizer().save(str(tmp_path / "tokenizer.json"))
    model = qkv.load(tmp_path)
    assert model.tokenizer.encode("the dog chased").ids == [2, 3, 4]  # below 10: fine
    assert len(list(model.generate("the dog", max_new_tokens=2))) > 0
    want = (
        rf"{re.escape(str(tmp_path / 'tokenizer.json'))}: the text's token ids reach 18 but "
        rf"{re.escape(str(tmp_path / 'config.json'))}'s vocab_size is 10: the tokenizer does not "
        r"belong to this checkpoint's embeddings"
    )
    with pytest.raises(ValueError, match=want):
        "".join(model.generate("the dog ran far", max_new_tokens=2))
    with pytest.raises(ValueError, match=want):
        qkv.explain("the dog ran far", -1, model=model)
    capsys.readouterr()
    for argv in (
        ["generate", "--model", str(tmp_path), "the dog ran far"],
        ["explain", "the dog ran far", "--model", str(tmp_path), "--index", "-1"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and re.search(want, err), err


def _as_pickles(folder, n_shards: int) -> list[str]:
    """model.safetensors replaced by PyTorch pickle files as older transformers wrote them:
    pytorch_model.bin, or n_shards shards with their pytorch_model.bin.index.json."""
    w = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    if n_shards == 1:
        torch.save(w, folder / "pytorch_model.bin")
        return ["pytorch_model.bin"]
    keys, names, weight_map = sorted(w), [], {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: w[k] for k in keys[i::n_shards]}
        torch.save(part, folder / name)
        weight_map |= dict.fromkeys(part, name)
        names.append(name)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return names


def test_pickle_bin_weights_are_refused_with_the_conversion_that_works(tmp_path, capsys):
    d = tmp_path / "ck"
    build("llama", d)
    word_tokenizer().save(str(d / "tokenizer.json"))  # the lens reads it before the weights
    _as_pickles(d, 1)
    err = _one_line_error(d, capsys)
    assert re.search(
        r"holds PyTorch pickle weights \(pytorch_model\.bin\) but no model\.safetensors: qkv "
        r"does not read pickle files, as loading one can run code; convert them once",
        err,
    ), err
    command = re.search(r'python -c "(.*)"$', err.strip())[1]
    assert "AutoModelForCausalLM" in command and str(d) in command
    # the command it gives works: it writes model.safetensors, which then loads
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", command], check=True, env=env, capture_output=True)
    assert qkv.load(d).config.n_layers == 2


def test_sharded_pickle_bin_weights_are_listed(llama, capsys):
    word_tokenizer().save(str(llama / "tokenizer.json"))
    names = _as_pickles(llama, 4)
    err = _one_line_error(llama, capsys)
    said = ", ".join([*names[:3], "…"])
    assert f"holds PyTorch pickle weights ({said}) but no model.safetensors" in err, err
    with pytest.raises(FileNotFoundError, match="does not read pickle files"):
        qkv.load(llama)


def test_config_without_model_type_nor_architectures(llama, capsys):
    cfg = json.loads((llama / "config.json").read_text(encoding="utf-8"))
    del cfg["model_type"], cfg["architectures"]
    (llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=rf"^{re.escape(str(llama / 'config.json'))} has no model_type \(nor architectures\): "
        r"add the model_type it was saved with, one of \[.*'llama'",
    ):
        qkv.load(llama)
    _one_line_error(llama, capsys)


def test_a_truncated_gguf_of_ones_own_says_get_it_again(tmp_path):
    whole = tmp_path / "whole.gguf"
    tiny_gguf(whole)
    data = whole.read_bytes()
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(data[:-40])  # the last tensor cut short
    with pytest.raises(ValueError, match=r"truncated or corrupted: tensor") as e:
        qgguf.read_gguf(mine, cache_dir=False)
    assert "reinstall" not in str(e.value)
    assert str(e.value).endswith(
        "the file is incomplete (an interrupted download or copy?): get it again"
    )
    shipped = tmp_path / "lib" / "site-packages" / "llm_somemodel" / "model.gguf"
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(data[:-40])
    with pytest.raises(
        ValueError, match=r"installed package llm_somemodel, so reinstall it: pip install "
    ):
        qgguf.read_gguf(shipped, cache_dir=False)


def test_an_index_that_points_a_tensor_at_the_wrong_shard(tmp_path):
    build("llama", tmp_path, max_shard_size="40KB")
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text(encoding="utf-8"))
    wm = index["weight_map"]
    key = "model.layers.1.mlp.up_proj.weight"
    home = wm[key]
    other = next(s for s in sorted(set(wm.values())) if s != home)
    moved = sorted(k for k, s in wm.items() if s == home)  # the home shard drops off the index
    for k in moved:
        wm[k] = other
    path.write_text(json.dumps(index))
    one = (
        rf"'{re.escape(moved[0])}' → {re.escape(other)} \({re.escape(home)}, which the index "
        r"does not list, holds it\)"
    )
    said = (
        rf"maps tensor '{re.escape(key)}' to {re.escape(other)}, but that shard lacks it "
        rf"\({re.escape(home)}, which the index does not list, holds it\)"
        if len(moved) == 1
        else rf"maps {len(moved)} tensors to shards that lack them: {one}"
    )
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {said}.*; is the index"):
        qkv.load(tmp_path)
