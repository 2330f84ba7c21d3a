"""The nightly job's own logic (`harness nightly`), on the real vLLM CPU engine: the first night has
nothing to diff, an unchanged night passes, a night whose KV cache shrank fails the job with the
change named in the pull request body."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import store
from tests.conftest import ENGINE_PYTHON, TINY, run_harness

pytestmark = pytest.mark.engine


def matrix(tmp: Path, kv_gib: int) -> Path:
    path = tmp / f"nightly-kv{kv_gib}.yaml"
    path.write_text(
        "\n".join(
            [
                f"engines: [{{name: venv, python: {ENGINE_PYTHON}}}]",
                "models:",
                f"  - model: {TINY / 'tiny-chat'}",
                "gpus: [cpu]",
                "configs:",
                "  - {name: cpu, args: {max_model_len: 512, dtype: bfloat16, enforce_eager: true}, "
                f"env: {{VLLM_CPU_KVCACHE_SPACE: {kv_gib}}}}}",
                "timeouts: {ready_s: 300, request_s: 60}",
                "probe: none",
            ]
        )
        + "\n"
    )
    return path


def nightly(tmp: Path, kv_gib: int):
    proc, _ = run_harness(
        [
            "nightly",
            "--matrix",
            str(matrix(tmp, kv_gib)),
            "--results",
            str(tmp / "results"),
            "--reports",
            str(tmp / "reports"),
            "--out",
            str(tmp / "nightly"),
            "--force",
            "--progress",
            "plain",
        ]
    )
    outputs = dict(line.split("=", 1) for line in (tmp / "nightly" / "outputs.env").read_text().splitlines())
    return proc, outputs, (tmp / "nightly" / "diff.md").read_text()


def test_nightly_first_unchanged_then_regressed(tmp_path):
    proc, out, body = nightly(tmp_path, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = out["run_id"]
    assert out["baseline"] == "" and out["regressions"] == "false" and "nothing to diff" in body
    published = store.read_runs([tmp_path / "reports" / "data" / "runs"])
    assert [r.run_id for r in published.runs] == [first]

    proc, out, body = nightly(tmp_path, 2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    second = out["run_id"]
    assert out["baseline"] == first and out["regressions"] == "false"
    # unchanged, or changed by a timing shown but not judged (no noise band yet): never regressed
    assert re.search(r"tiny-chat__cpu__cpu__venv: (unchanged|changed)\b", body), body

    proc, out, body = nightly(tmp_path, 1)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out["baseline"] == second and out["regressions"] == "true"
    assert "tiny-chat__cpu__cpu__venv: regressed — kv_cache_tokens" in body and "(-50.0 %)" in body
    assert (tmp_path / "reports" / "runs" / f"{out['run_id']}.md").exists()
