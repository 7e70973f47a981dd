"""`qkv explain`, `qkv heads`, `qkv models`: thin shells over the lens (tiny models stand in for
the real ones here; tests/lens covers the real models)."""

from __future__ import annotations

import json
import os
import re

import pytest

import qkv.models
from qkv.cli import main
from qkv.lens import DATA_PATH, from_json
from qkv.models.families import FAMILIES
from qkv.models.gguf_families import GGUF_FAMILIES
from tests.lens.conftest import SENTENCE, TinyModel

from .pipes import close_stdout


@pytest.fixture(scope="module")
def tiny_models():
    return {"tiny-causal": TinyModel(causal=True), "tiny-bidir": TinyModel(causal=False, seed=1)}


@pytest.fixture
def loads(monkeypatch, tiny_models):
    """Route qkv.load to the tiny models and count the loads."""
    calls = []

    def load(name):
        calls.append(name)
        return tiny_models[name]

    monkeypatch.setattr(qkv.models, "load", load)
    return calls


def test_models_lists_the_bundled_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for info in qkv.models.available():
        assert info.name in out and info.install in out
    assert "(default)" in out
    # an 80-column terminal: every line fits but the install commands (kept whole, to copy)
    long = [ln for ln in out.splitlines() if len(ln) > 80 and "pip install" not in ln]
    assert long == []
    words = set(out.replace(",", " ").replace(";", " ").split())
    assert set(FAMILIES) | set(GGUF_FAMILIES) <= words  # every family named, none split


def test_explain_prints_and_writes_every_view(loads, tmp_path, capsys):
    paths = {k: tmp_path / f"r.{k}" for k in ("json", "html", "png")}
    argv = [
        "explain",
        SENTENCE,
        "--token",
        "it",
        "--model",
        "tiny-causal",
        "--key",
        "dog",
        "--top",
        "3",
    ]
    for k, p in paths.items():
        argv += [f"--{k}", str(p)]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert (
        "query it (token 6)" in out.out and "Heads that send 'it (6)' most to 'dog (1)'" in out.out
    )
    r = from_json(paths["json"])
    assert r.query.text == "it" and r.top == 3 and r.key.text == "dog"
    assert paths["html"].read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert loads == ["tiny-causal"]


def test_explain_json_to_stdout_is_pure_json(loads, capsys):
    assert (
        main(
            [
                "explain",
                SENTENCE,
                "--index",
                "7",
                "--model",
                "tiny-bidir",
                "--layer",
                "1",
                "--json",
                "-",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "qkv.explain/1" and doc["query"]["text"] == "it"
    assert [lay["layer"] for lay in doc["layers"]] == [1]


def test_explain_reads_a_file(loads, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(SENTENCE)
    assert (
        main(
            [
                "explain",
                "--file",
                str(f),
                "--token",
                "excited",
                "--model",
                "tiny-causal",
                "--layer",
                "0",
                "--head",
                "2",
            ]
        )
        == 0
    )
    assert "layer 0 head 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--token", "cat"], "'cat' is not in the text. Its tokens are: 0:'The' 1:'dog'"),
        (["--token", "cat"], "Pass one of these words, or its position (--index)."),
        (["--token", "it", "--key", "cat"], "or its position (--key-index)."),
        (
            ["--token", "it", "--layer", "9"],
            "--layer 9 out of range: there are 3 layers in tiny-causal; valid 0..2, or -3..-1",
        ),
        (
            ["--token", "it", "--head", "-9"],
            "--head -9 out of range: there are 4 heads in tiny-causal; valid 0..3, or -4..-1 counting from the end",
        ),
        (["--index", "10"], "--index 10 out of range: there are 10 tokens in the text"),
        (["--token", "it", "--top", "-1"], "--top must be an int ≥ 0"),
        (["--token", "it", "--occurrence", "0"], "--occurrence counts from 1"),
        (
            ["--token", "it", "--key", "the", "--key-occurrence", "2"],
            "key 'the' occurs 1 time(s) (tokens [3]); --key-occurrence must be in [1, 1]",
        ),
        (["--token", "it", "--key", "dog", "--key-index", "1"], "not both"),
        (["--token", "it", "--index", "3"], "exactly one"),
        ([], "exactly one"),
    ],
)
def test_explain_bad_input_exits_2_with_a_message(loads, capsys, argv, message):
    assert main(["explain", SENTENCE, "--model", "tiny-causal", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv explain: error:") and message in err


def test_unwritable_output_fails_before_running_and_writes_nothing(loads, tmp_path, capsys):
    rc = main(
        [
            "explain",
            SENTENCE,
            "--token",
            "it",
            "--model",
            "tiny-causal",
            "--json",
            str(tmp_path / "ok.json"),
            "--html",
            str(tmp_path / "missing" / "r.html"),
        ]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert loads == [] and os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_the_system_refuses_fails_before_running_and_names_its_flag(
    loads, tmp_path, capsys
):
    """/proc passes the permission bits but refuses new files: nothing runs, nothing is written
    (not even the other, writable output), and the error names the flag."""
    ok = tmp_path / "ok.json"
    argv = ["explain", SENTENCE, "--token", "it", "--model", "tiny-causal", "--json", str(ok)]
    assert main([*argv, "--png", "/proc/qkv-x.png"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "error: --png: cannot write '/proc/qkv-x.png'" in out.err
    assert loads == [] and os.listdir(tmp_path) == []


def test_a_file_that_is_not_utf8_names_the_flag_and_the_byte(loads, tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("The café was closed.".encode("latin-1"))
    assert main(["explain", "--file", str(f), "--token", "was", "--model", "tiny-causal"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qkv explain: error: --file {str(f)!r} is not UTF-8 text")
    assert "byte 0xe9 at offset 7" in err and len(err.strip().splitlines()) == 1
    assert main(["explain", "--file", str(tmp_path / "none.txt"), "--index", "0"]) == 2
    assert "error: --file: no text file at" in capsys.readouterr().err
    (tmp_path / "zeros.bin").write_bytes(b"PK\x03\x04" + bytes(300))  # valid UTF-8, yet binary
    assert main(["explain", "--file", str(tmp_path / "zeros.bin"), "--index", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: --file" in err and "is binary (a NUL byte at offset 4)" in err
    assert loads == []


def test_empty_text(loads, capsys):
    assert main(["explain", "", "--token", "it", "--model", "tiny-causal"]) == 2
    assert "text is empty" in capsys.readouterr().err


def test_heads_ranks_heads_on_a_user_file(loads, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(DATA_PATH.read_text(encoding="utf-8").splitlines()[:4]) + "\n")
    assert main(["heads", "--model", "tiny-causal", "--data", str(data), "--top", "3"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the terminal's line wrapping
    assert "4 sentences" in out and "Best heads at the deciding word" in out
    assert "is causal" in out and "every head scores 50.0%" in out
    assert main(["heads", "--model", "tiny-bidir", "--data", str(data)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Best heads at the pronoun" in out and "is causal" not in out
    assert main(["heads", "--model", "tiny-bidir", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "no data file" in capsys.readouterr().err


def test_errors_name_cli_flags_not_python_arguments(loads, capsys):
    long = "word " * 600  # over the tiny model's 512 tokens
    assert main(["explain", long, "--token", "word", "--model", "tiny-causal"]) == 2
    err = capsys.readouterr().err
    assert "pass --truncate" in err and "truncate=True" not in err
    assert main(["explain", long, "--index", "3", "--model", "tiny-causal", "--truncate"]) == 0
    assert "only its first 512 tokens" in " ".join(capsys.readouterr().out.split())
    assert main(["train", "recall", "--steps", "0", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--steps must be a positive int, got 0" in err and "TrainConfig" not in err


def test_cli_message_rewrites_python_names():
    from qkv.cli import _flags, build_parser, cli_message

    flags = _flags(build_parser())
    said = cli_message(
        "with max_new_tokens=64 that exceeds; lower max_new_tokens, or pass truncate=True. "
        "TinyConfig: d_model=32 is not divisible; key 'dog' (token 3) is fine",
        flags,
        {"token index": "--index"},
    )
    assert said == (
        "with --max-new-tokens 64 that exceeds; lower --max-new-tokens, or pass --truncate. "
        "--d-model 32 is not divisible; key 'dog' (token 3) is fine"
    )


def test_cli_message_turns_a_switch_set_false_into_leaving_out_its_flag():
    """`chat=False` is not `--chat False` (no such value exists): the flag is left out."""
    from qkv.cli import _flags, build_parser, cli_message

    flags = _flags(build_parser())
    said = cli_message("gemma3 has no chat template; call generate with chat=False", flags, {})
    assert said == "gemma3 has no chat template; call generate without --chat"


def test_every_command_says_what_it_does_and_every_option_its_default():
    """`qkv CMD --help` opens with a description; an option with a default says it, and so do
    the options whose absence means something (--top-k: every token; --eval-every: 100)."""
    import argparse

    from qkv.cli import build_parser

    unset_but_meaningful = {"--top-k", "--seed", "--eval-every", "--time-limit", "--seq-len"}
    missing = []

    def walk(p: argparse.ArgumentParser, name: str) -> None:
        if not p.description:
            missing.append(f"{name}: no description")
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for n, sp in a.choices.items():
                    walk(sp, f"{name} {n}")
            elif a.option_strings and a.dest != "help":
                says = "default" in (a.help or "")
                if a.default not in (None, False) and not says:
                    missing.append(f"{name} {a.option_strings[-1]}: default {a.default!r} unsaid")
                if a.option_strings[-1] in unset_but_meaningful and not says:
                    missing.append(f"{name} {a.option_strings[-1]}: what unset means is unsaid")

    for name, p in next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices.items():
        walk(p, f"qkv {name}")
    assert missing == []


def test_demo_prints_every_number_it_uses(capsys):
    """Each printed score is q·k/√d from printed numbers (the query vector was not shown), the
    weights are their softmax, and the output is Σ weight·v."""
    import math

    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    vec = r"\(([-\d.]+), ([-\d.]+)\)"
    q = tuple(map(float, re.search(rf"q of 'it' = {vec}", out).groups()))
    rows = re.findall(rf"^  (\w+) +{vec} +([-\d.]+) +([\d.]+) +{vec}$", out, re.M)
    assert [r[0] for r in rows] == ["dog", "ball", "it"]
    scores = [(q[0] * float(r[1]) + q[1] * float(r[2])) / math.sqrt(2) for r in rows]
    assert [f"{x:.3f}" for x in scores] == [r[3] for r in rows]
    z = [math.exp(x) for x in scores]
    assert [f"{x / sum(z):.3f}" for x in z] == [r[4] for r in rows]


def test_head_minus_one_is_the_last_head_in_every_layer(loads, capsys):
    argv = ["explain", SENTENCE, "--token", "it", "--model", "tiny-causal", "--head", "-1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(f"layer {n} head 3 " in out for n in range(3)) and "head 2 " not in out


def test_top_1_tables_match_top_0(loads, capsys):
    """The per-layer and focused-heads tables are the same whatever --top keeps per head."""

    def tables(top: str) -> str:
        argv = ["explain", SENTENCE, "--token", "it", "--model", "tiny-bidir", "--top", top]
        assert main([*argv, "--no-rollout"]) == 0
        out = capsys.readouterr().out
        return out[out.index("Per layer") :]

    assert tables("1") == tables("0")


def test_a_closed_pipe_exits_141_without_a_traceback():
    """`qkv models | head -c 5`: the reader goes away before we write."""
    import subprocess
    import sys

    p = subprocess.Popen(
        [sys.executable, "-m", "qkv", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    p.stdout.close()  # nobody reads: the first write (or the exit flush) meets EPIPE
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""


def test_rich_output_into_a_closed_pipe_exits_141(loads, monkeypatch, capsys):
    """rich's own handler would exit 1; the CLI's console hands the broken pipe to main."""
    close_stdout(monkeypatch)
    from qkv import cli

    assert cli.main(["explain", SENTENCE, "--token", "it", "--model", "tiny-causal"]) == 141


def test_files_are_written_even_when_stdout_is_closed(loads, monkeypatch, tmp_path, capsys):
    """`qkv explain ... --png r.png | head -1`: the reader leaving early does not cost the file."""
    close_stdout(monkeypatch)
    from qkv import cli

    argv = ["explain", SENTENCE, "--token", "it", "--model", "tiny-causal"]
    paths = [tmp_path / "r.json", tmp_path / "r.html", tmp_path / "r.png"]
    argv += [
        a for f, p in zip(("--json", "--html", "--png"), paths, strict=True) for a in (f, str(p))
    ]
    assert cli.main(argv) == 141
    assert all(p.is_file() for p in paths) and sorted(os.listdir(tmp_path)) == [
        "r.html",
        "r.json",
        "r.png",
    ]


@pytest.mark.parametrize("where", ["start-up", "model load"])
def test_ctrl_c_exits_130_quietly(loads, monkeypatch, capsys, where):
    from qkv import cli

    def interrupt(*_a, **_k):
        raise KeyboardInterrupt

    if where == "start-up":
        monkeypatch.setattr(cli, "build_parser", interrupt)
    else:
        monkeypatch.setattr(qkv.models, "load", interrupt)
    assert cli.main(["explain", SENTENCE, "--token", "it", "--model", "tiny-causal"]) == 130
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_an_ascii_locale_gets_escapes_and_reads_utf8_arguments():
    """Under LC_ALL=C with UTF-8 mode and locale coercion off, stdout is ASCII: characters it
    cannot show come out escaped (exit 0, not a UnicodeEncodeError), and a UTF-8 argument,
    which Python then holds as lone surrogates, reaches the tokenizer as the text typed."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}

    def utf8_argv(args):  # bytes, as a UTF-8 terminal passes them, whatever this process's locale
        return [os.fsencode(sys.executable), b"-m", b"qkv", *(a.encode("utf-8") for a in args)]

    def run(*args):
        res = subprocess.run(utf8_argv(args), capture_output=True, env=env, timeout=300)
        return res.returncode, res.stdout.decode("ascii"), res.stderr.decode("ascii")

    rc, out, err = run("models")
    assert rc == 0 and err == "" and "\\u03b8=1e5" in out  # RoPE θ, escaped
    argv = ("explain", "Le café était fermé.", "--token", "fermé", "--model", "minilm")
    rc, out, err = run(*argv)
    assert rc == 0, err
    utf8 = subprocess.run(
        utf8_argv(argv), capture_output=True, timeout=300,
        env={**os.environ, "PYTHONUTF8": "1"},
    ).stdout.decode("utf-8")  # fmt: skip
    query = re.compile(r"query (\S+) \(token (\d+)\)")
    escaped = utf8.encode("ascii", "backslashreplace").decode("ascii")
    assert query.search(out).groups() == query.search(escaped).groups()  # the same token chosen
    assert "caf\\xe9 \\xe9tait ferm\\xe9." in out


_EXPLAIN_LONG = ["-m", "qkv", "explain", " ".join([SENTENCE] * 40), "--token", "it"]


@pytest.fixture(scope="module")
def seconds_to_output() -> float:
    """Seconds from the start of `python -m qkv explain LONG` to its result's first byte, with
    no signal: the better of two runs, after one that warms the file cache."""
    import subprocess
    import sys
    import time

    def once() -> float:
        t = time.perf_counter()
        p = subprocess.Popen([sys.executable, *_EXPLAIN_LONG], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)  # fmt: skip
        assert p.stdout.read(1), "the command printed nothing"
        took = time.perf_counter() - t
        p.communicate(timeout=120)
        return took

    once()
    return min(once(), once())


@pytest.mark.parametrize("fraction", [0.1, 0.45, 0.75])
def test_ctrl_c_during_start_up_exits_130_quietly(fraction, seconds_to_output):
    """SIGINT while the command still imports torch, loads the model or runs: exit 130, no
    traceback. `import qkv` in a program keeps Python's KeyboardInterrupt."""
    import signal
    import subprocess
    import sys
    import time

    # The interrupt lands at a fraction of the time this machine takes to print the result:
    # while torch is imported, the model is loaded, the lookup runs. A fixed delay could land
    # after the work on a fast machine, in the interpreter's own teardown, where Python has
    # given SIGINT back to the OS and the process dies of the signal itself.
    delay = fraction * seconds_to_output

    def interrupted(argv, wait_for=None):
        # SIGINT at its default in the child, as at a terminal: a run started in the background
        # (`&`, nohup) passes SIGINT on ignored, and Python then never raises KeyboardInterrupt
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
        if wait_for is not None:
            assert p.stdout.readline().decode().strip() == wait_for
        else:
            time.sleep(delay)
        p.send_signal(signal.SIGINT)
        return p.wait(timeout=120), p.stderr.read().decode()

    rc, err = interrupted([sys.executable, *_EXPLAIN_LONG])
    # a slow moment can still push the work past the interrupt, into that teardown: the
    # process then dies of SIGINT, silently, which a shell reports as 130 as well
    assert rc == 130 or (rc == -signal.SIGINT and err == ""), (rc, delay, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    # a program that imported qkv keeps Python's KeyboardInterrupt (interrupted once the import
    # is done: a third-party import may swallow a KeyboardInterrupt raised inside it)
    prog = "import qkv, time; print('imported', flush=True); time.sleep(60)"
    rc, err = interrupted([sys.executable, "-c", prog], wait_for="imported")
    assert rc != 0 and "KeyboardInterrupt" in err, err[-2000:]


@pytest.mark.parametrize(("flag", "magic"), [("--html", b"<!DOCTYPE html>"), ("--png", b"\x89PNG")])
def test_html_and_png_to_stdout(loads, capfdbinary, flag, magic, monkeypatch):
    """'-' means stdout for --html and --png as for --json (before: a file named '-')."""
    monkeypatch.setattr("sys.stdout.isatty", lambda: False, raising=False)
    argv = ["explain", SENTENCE, "--token", "it", "--model", "tiny-causal", "--layer", "0"]
    assert main([*argv, "--head", "1", flag, "-"]) == 0
    out = capfdbinary.readouterr().out
    assert out.startswith(magic) and not os.path.exists("-")
    if flag == "--html":
        assert b"qkv-data" in out and b"\xe2\x94\x8f" not in out  # the page only, no table


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--html", "-", "--json", "-"], r"--json and --html both ask for stdout"),
        (["--html", "{d}/a.png", "--png", "{d}/./a.png"], r"--html and --png name the same file"),
        (["--png", "{d}/a.jpg"], r"--png writes PNG data: name the file \*\.png"),
    ],
)
def test_outputs_that_collide_are_refused_before_running(loads, tmp_path, capsys, extra, message):
    argv = ["explain", SENTENCE, "--token", "it", "--model", "tiny-causal"]
    assert main([*argv, *(a.format(d=tmp_path) for a in extra)]) == 2
    assert re.search(message, capsys.readouterr().err) and loads == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "The dog \udcff it", "--token", "it"],
         r"the text argument is not UTF-8 text \(byte 0xff at offset 8\).*--file PATH"),
        (["generate", "\udcffhi"], r"the prompt argument is not UTF-8 text \(byte 0xff at offset 0\)"),
        (["compare", "a \udcc3", "a b", "--token", "a"],
         r"TEXT_A is not UTF-8 text \(byte 0xc3 at offset 2\); type it in a UTF-8 terminal$"),
        (["export", "x\udcfe", "--out", "x.npz"], r"not UTF-8 text \(byte 0xfe at offset 1\)"),
        (["explain", "--token", "it"], r"pass the text as an argument or with --file PATH$"),
    ],
)  # fmt: skip
def test_an_argument_that_is_not_utf8_names_the_byte(loads, capsys, argv, message):
    """Bytes a terminal sent that are not UTF-8 reach Python as lone surrogates; the tokenizer
    said only "TextInputSequence must be str". (And a missing text is not "not both".)"""
    assert main([*argv, "--model", "tiny-causal"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(message, err) and err.count("\n") == 0 and loads == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", SENTENCE, "--index", "6", "--occurrence", "2"],
         r"--occurrence picks among repeats of --token WORD"),
        (["explain", SENTENCE, "--token", "it", "--key-occurrence", "2"],
         r"--key-occurrence picks among repeats of --key WORD"),
        (["explain", SENTENCE, "--token", "it", "--key-index", "1", "--key-occurrence", "2"],
         r"--key-occurrence picks among repeats of --key WORD"),
        (["compare", SENTENCE, SENTENCE + " too", "--index", "6", "--occurrence", "2"],
         r"--occurrence picks among repeats of --token WORD"),
        (["generate", "hi", "--top-k", "5"], r"--top-k shape sampling, but --temperature 0"),
        (["generate", "hi", "--top-k", "5", "--seed", "3"], r"--top-k and --seed shape sampling"),
    ],
)  # fmt: skip
def test_flags_that_would_be_ignored_are_refused(loads, capsys, argv, message):
    """Before, each of these ran and ignored a flag (exit 0): --occurrence with --index, a key
    occurrence with no --key word, --top-k or --seed on a greedy run."""
    assert main([*argv, "--model", "tiny-causal"]) == 2
    assert re.search(message, capsys.readouterr().err) and loads == []


def test_cli_message_says_left_out_not_none_and_names_model():
    from qkv.cli import _flags, build_parser, cli_message

    flags = _flags(build_parser())
    assert cli_message("top_k must be a positive int or None, got 0", flags, {}) == (
        "--top-k must be a positive int or left out, got 0"
    )
    said = cli_message("unknown model 'gpt5': choose one of ['smollm2']", flags, {})
    assert said == "--model 'gpt5' is not a bundled model: choose one of ['smollm2']"


def test_train_refuses_a_bad_shape_before_printing_its_header(capsys):
    assert main(["train", "recall", "--heads", "3"]) == 2
    captured = capsys.readouterr()
    assert "is not divisible by --heads 3" in captured.err and "training on" not in captured.err
    assert main(["experiment", "projections", "--variants", "foo"]) == 2
    captured = capsys.readouterr()
    assert "--variants: unknown ['foo']" in captured.err and "projections:" not in captured.err


def test_a_checkpoint_without_tokenizer_json_gets_advice_a_cli_user_can_follow(tmp_path, capsys):
    """The library's error also says how to read attention from token ids in Python
    (qkv.nn.capture); the CLI reads text only, so it says just what to add."""
    from tests.models.test_families import build

    build("llama", tmp_path)
    capsys.readouterr()  # transformers' progress bar while saving
    assert main(["explain", "the dog ran", "--token", "dog", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"qkv explain: error: {tmp_path.name} has no tokenizer (its folder has no "
        "tokenizer.json), and the lens reads text; put the checkpoint's tokenizer.json beside "
        "its config.json"
    )
