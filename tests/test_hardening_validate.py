"""Bad input to any verb is one located line and exit code 2, never a traceback (property tests
drive `harness.cli.main` with generated bad values); the validation helpers on their own."""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.cli import _Parser, main
from harness.validate import choice_of, finite_float, folder, int_in, positive_int, text_file

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_names = itertools.count()


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("bad-input")
    (base / "empty.log").write_bytes(b"")
    (base / "folder").mkdir()
    (base / "file.txt").write_text("a text file\n")
    (base / "results").mkdir()
    logs = base / "not-logs"
    logs.mkdir()
    (logs / "random.log").write_bytes(bytes(range(256)) * 4)
    (logs / "prose.txt").write_text("Dear diary, nothing about engines here.\n" * 20)
    return base


def bad_file(place: Path, kind: str, data: bytes) -> str:
    """A path that is not a usable text file: missing, empty, a folder, or binary bytes."""
    if kind == "missing":
        return str(place / f"missing-{next(_names)}.log")
    if kind == "empty":
        return str(place / "empty.log")
    if kind == "folder":
        return str(place / "folder")
    path = place / f"binary-{next(_names)}.log"
    path.write_bytes(b"\0" + data)  # a NUL byte: binary whatever follows
    return str(path)


FILE_KINDS = st.sampled_from(["missing", "empty", "folder", "binary"])
NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)


def verb_cases(place: Path, kind: str, data: bytes, name: str) -> list[list[str]]:
    """Every verb (this branch's) with one bad value each."""
    bad = bad_file(place, kind, data)
    existing_file = str(place / "file.txt")
    missing_folder = str(place / f"missing-{name}")
    return [
        ["parse-log", bad],
        ["run", "--matrix", bad],
        ["run", "--matrix", str(ROOT / "matrix.yaml"), "--results", existing_file],
        ["run", "--matrix", str(ROOT / "matrix.yaml"), "--reports", existing_file],
        ["run", "--matrix", str(ROOT / "matrix.yaml"), "--progress", f"x{name}"],
        [
            "run",
            "--matrix",
            str(ROOT / "matrix.yaml"),
            "--only",
            f"zz-nomatch-{name}*",
            "--results",
            str(place / f"res-run-{name}"),
        ],
        ["ingest", missing_folder],
        ["ingest", existing_file],
        ["ingest", str(place / "not-logs"), "--results", str(place / f"res-{name}")],
        ["ingest", str(place / "folder"), "--results", existing_file],
        ["report", "--results", missing_folder],
        ["report", "--results", existing_file],
        ["report", "--results", str(place / "results"), "--reports", existing_file],
        ["diff", "a", "b", "--results", missing_folder],
        ["diff", f"run-{name}", "b", "--results", str(place / "results")],
        ["diff", "a", "b", "--results", str(place / "results"), "--markdown", str(place / "folder")],
        ["calibrate", "--table", bad],
        ["calibrate", "--observations", bad],
        ["calibrate", "--results", existing_file],
        ["build-models", "--only", f"x{name}"],
        ["build-models", "--check", "--out", existing_file],
        ["plan", "--config", bad, "--gpu", "H100", "--max-model-len", "4096"],
        ["plan", "--model", "Qwen/Qwen3-0.6B", "--gpu", "H100", "--max-model-len", "0"],
        ["plan", "--model", "Qwen/Qwen3-0.6B", "--gpu", "H100", "--gpu-memory-utilization", "nan"],
        ["plan", "--model", "Qwen/Qwen3-0.6B", "--gpu", f"GPU-{name}-9000"],
        ["probe", "--url", "http://127.0.0.1:1", "--model", "m", "--max-concurrency", "0"],
        ["probe", "--url", "http://127.0.0.1:1", "--model", "m", "--tokenizer", missing_folder],
        ["probe", "--url", "http://127.0.0.1:1", "--model", "m", "--capacity"],
        ["nightly", "--matrix", bad, "--out", str(place / f"out-{name}")],
        [
            "bisect",
            "--model",
            "m",
            "--config",
            "c",
            "--good",
            "0.32.0",
            "--bad",
            "0.31.0",
            "--versions",
            "0.31.0,0.32.0",
            "--matrix",
            bad,
        ],
        ["doctor", "--matrix", bad],
    ]


@SETTINGS
@given(kind=FILE_KINDS, data=st.binary(max_size=64), name=NAME)
def test_every_verb_rejects_bad_input_in_one_line(place, capsys, kind, data, name):
    for argv in verb_cases(place, kind, data, name):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert "Traceback" not in err, (argv, err)
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith("error: "), (argv, err)
        # one line; ingest also names each file it skipped, one line each
        assert len(lines) == 1 or argv[0] == "ingest", (argv, err)
    assert not list(place.glob("res-*")), "a refused ingest wrote a results folder"


def test_ingest_skips_what_is_not_an_engine_log(place, tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    for path in (place / "not-logs").iterdir():
        (logs / path.name).write_bytes(path.read_bytes())
    fixture = ROOT / "tests" / "fixtures" / "logs" / "cpu_0_32_tiny_llama_ready.log"
    (logs / "engine.log").write_bytes(fixture.read_bytes())
    assert main(["ingest", str(logs), "--results", str(tmp_path / "results")]) == 0
    out, err = capsys.readouterr()
    assert "skipped random.log: binary data" in err and "skipped prose.txt: not a vLLM engine log" in err
    records = list((tmp_path / "results").glob("*/*/record.json"))
    assert len(records) == 1 and "1 records in" in out  # only the engine log made a record


# --------------------------------------------------------------------------- the helpers
def parse_one(type_, value: str) -> tuple[int | None, object]:
    parser = _Parser(prog="t")
    parser.add_argument("--x", type=type_)
    try:
        return None, parser.parse_args(["--x", value]).x
    except SystemExit as exc:
        return exc.code, None


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)))
def test_finite_float_in_range(value):
    text = str(value)
    code, parsed = parse_one(finite_float(min=0, max=1, min_open=True), text)
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    good = math.isfinite(number) and 0 < number <= 1
    assert (code is None) == good and (not good or parsed == number)
    if not good:
        assert code == 2


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.integers(min_value=-(10**6), max_value=10**6).map(str), st.text(max_size=6)))
def test_positive_int(text):
    code, parsed = parse_one(positive_int, text)
    try:
        good = int(text.strip()) >= 1
    except ValueError:
        good = False
    assert (code is None) == good


def test_helper_messages(tmp_path):
    with pytest.raises(argparse.ArgumentTypeError, match="not a finite number"):
        finite_float()("nan")
    with pytest.raises(argparse.ArgumentTypeError, match="must be <= 80"):
        finite_float(max=80)("1e308")
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1"):
        int_in(min=1)("0")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown dtype 'float7'; known: auto, bfloat16"):
        choice_of(["auto", "bfloat16"], "dtype")("float7")
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder, not a file"):
        text_file(str(tmp_path))
    (tmp_path / "f").write_text("x\n")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file, not a folder"):
        folder(str(tmp_path / "f"))
    assert text_file(str(tmp_path / "f")) == tmp_path / "f"
    assert finite_float(min=0)("0") == 0.0 and positive_int("3") == 3
