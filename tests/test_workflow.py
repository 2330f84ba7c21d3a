"""The nightly workflow, linted structurally (actionlint does not install here): it loads, runs on
the self-hosted gpu runner, pins every action, documents every secret, its shell parses, its
step references resolve, and the diff step turns `harness diff`'s exit code into the verdict."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "nightly-matrix.yml"
EXPR = re.compile(r"\$\{\{(.*?)\}\}", re.S)


@pytest.fixture(scope="module")
def text() -> str:
    return WORKFLOW.read_text()


@pytest.fixture(scope="module")
def wf(text) -> dict:
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def steps(wf) -> list[dict]:
    return wf["jobs"]["matrix"]["steps"]


def step(steps, step_id):
    return next(s for s in steps if s.get("id") == step_id)


def test_triggers_and_runner(wf):
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "schedule" in on and on["schedule"][0]["cron"]
    assert "workflow_dispatch" in on
    runs_on = wf["jobs"]["matrix"]["runs-on"]
    assert {"self-hosted", "gpu"} <= set(runs_on if isinstance(runs_on, list) else [runs_on])
    assert wf["permissions"] == {"contents": "write", "pull-requests": "write"}
    assert wf["concurrency"]["cancel-in-progress"] is False


def test_every_action_is_pinned_to_a_commit(text, steps):
    uses = [s["uses"] for s in steps if "uses" in s]
    assert uses, "the workflow uses no actions?"
    for u in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u), f"not pinned to a SHA: {u}"
    for line in text.splitlines():
        if "uses:" in line:
            assert re.search(r"# v\d+\.\d+\.\d+$", line), f"pin without a version comment: {line}"


def test_every_secret_and_variable_is_documented(text):
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    secrets = set(re.findall(r"secrets\.(\w+)", text))
    variables = set(re.findall(r"vars\.(\w+)", text))
    assert "HF_TOKEN" in secrets
    for name in secrets | variables:
        assert re.search(rf"\b{name}\b", header), f"{name} is used but not documented in the header"


def test_readme_documents_the_nightly_job(text):
    readme = (ROOT / "README.md").read_text()
    assert "nightly-matrix.yml" in readme
    for name in set(re.findall(r"secrets\.(\w+)", text)) - {"GITHUB_TOKEN"}:
        assert name in readme, f"README does not mention the secret {name}"
    assert "VLLM_VERSION" in readme and "self-hosted" in readme


def test_the_job_does_what_the_issue_asks(steps):
    scripts = "\n".join(s.get("run", "") for s in steps)
    assert "make nightly" in scripts
    assert "gh pr create" in scripts and "git add reports/" in scripts
    uploads = [s for s in steps if "upload-artifact" in s.get("uses", "")]
    assert uploads and all(s["if"].startswith("always()") for s in uploads)
    fail = steps[-1]
    assert fail["if"] == "steps.run.outputs.regressions == 'true'" and "exit 1" in fail["run"]


def test_step_references_resolve_to_earlier_steps(steps):
    seen: set[str] = set()
    for s in steps:
        blob = yaml.safe_dump(s)
        for ref in re.findall(r"steps\.([\w-]+)\.", blob):
            assert ref in seen, f"step {s.get('name')!r} refers to steps.{ref} before it is defined"
        if "id" in s:
            seen.add(s["id"])


def shell(script: str) -> str:
    """A run script with its ${{ }} expressions replaced by a plain word, as bash will see it."""
    return EXPR.sub("EXPR", script)


def test_every_run_script_parses_with_bash_n(steps, tmp_path):
    for s in steps:
        if "run" in s:
            path = tmp_path / "step.sh"
            path.write_text(shell(s["run"]))
            res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            assert res.returncode == 0, f"{s['name']}: {res.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt install shellcheck)")
def test_every_run_script_passes_shellcheck(steps):
    for s in steps:
        if "run" in s:
            res = subprocess.run(
                ["shellcheck", "-s", "bash", "-"], input=shell(s["run"]), capture_output=True, text=True
            )
            assert res.returncode == 0, f"{s['name']}: {res.stdout}"


@pytest.mark.parametrize(("rc", "ok", "regressions"), [(0, True, "false"), (1, True, "true"), (2, False, None)])
def test_run_step_maps_exit_codes(steps, tmp_path, rc, ok, regressions):
    """The step runs `make nightly` and passes its outputs on; exit 1 (regressions) is not a
    failed step (the PR still opens), anything else is."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    outputs = "" if regressions is None else f"run_id=20250102T020000Z-box\nbaseline=x\nregressions={regressions}\n"
    write = (
        f"mkdir -p nightly; printf '# diff\\n' > nightly/diff.md; printf '{outputs}' > nightly/outputs.env; "
        if regressions is not None
        else ""
    )
    (bin_dir / "make").write_text(f"#!/bin/sh\n{write}exit {rc}\n")
    (bin_dir / "make").chmod(0o755)
    out, summary = tmp_path / "out", tmp_path / "summary"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "GITHUB_OUTPUT": str(out),
        "GITHUB_STEP_SUMMARY": str(summary),
        "MATRIX": "matrix.yaml",
        "VLLM_VERSION": "",
    }
    res = subprocess.run(
        ["bash", "-c", shell(step(steps, "run")["run"])], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert (res.returncode == 0) is ok, res.stderr
    if regressions is None:
        assert not out.exists() and "failed before it could diff" in res.stderr
    else:
        assert f"regressions={regressions}" in out.read_text() and "run_id=20250102T020000Z-box" in out.read_text()
        assert summary.read_text() == "# diff\n"
