"""One truth from run to report to gate, on the real vLLM CPU engine with no fixture in between:
what `harness run` wrote is what `report` shows and what `diff` compares.

Four real runs of one small matrix (tiny-chat that works, and an architecture vLLM lacks): three
unchanged, then one where the same config gives the KV cache half the memory. Unchanged pairs
must pass the gate (exit 0); the halved KV cache must fail it (exit 1) and be named.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import store
from tests.conftest import ENGINE_PYTHON, TINY, run_harness

pytestmark = pytest.mark.engine

CHAT = "tiny-chat__cpu__cpu__venv"
UNSUPPORTED = "tiny-unsupported__cpu__cpu__venv"


def matrix(tmp: Path, kv_gib: int) -> Path:
    path = tmp / f"matrix-kv{kv_gib}.yaml"
    path.write_text(
        "\n".join(
            [
                f"engines: [{{name: venv, python: {ENGINE_PYTHON}}}]",
                "models:",
                f"  - model: {TINY / 'tiny-chat'}",
                f"  - model: {TINY / 'tiny-unsupported'}",
                "gpus: [cpu, H100]",
                "configs:",
                "  - name: cpu",
                "    args: {max_model_len: 512, dtype: bfloat16, enforce_eager: true}",
                f"    env: {{VLLM_CPU_KVCACHE_SPACE: {kv_gib}}}",
                "timeouts: {ready_s: 300, request_s: 60}",
                "probe: {name: tiny, concurrency: [1, 2], requests: 4, rounds: 1, warmup_requests: 1}",
            ]
        )
        + "\n"
    )
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("truth")
    results, reports = tmp / "results", tmp / "reports"
    ids = []
    for kv in (2, 2, 2, 1):
        proc, _ = run_harness(
            [
                "run",
                "--matrix",
                str(matrix(tmp, kv)),
                "--results",
                str(results),
                "--reports",
                str(reports),
                "--force",
                "--progress",
                "plain",
            ],
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        ids.append(store.read_runs([results]).runs[-1].run_id)
    assert len(set(ids)) == 4
    return {"results": results, "reports": reports, "ids": ids, "tmp": tmp}


def _records(results: Path, run_id: str) -> dict:
    run = next(r for r in store.read_runs([results]).runs if r.run_id == run_id)
    return {c.cell_id: c.record for c in run.cells if c.record}


def test_the_run_page_shows_what_the_runner_wrote(runs):
    results, reports, first = runs["results"], runs["reports"], runs["ids"][0]
    recs = _records(results, first)
    assert recs[CHAT].outcome == "ok" and recs[UNSUPPORTED].failure_class == "unsupported_architecture"
    page = (reports / "runs" / f"{first}.md").read_text()
    assert "no record on this host" not in page
    kv = recs[CHAT].metrics.kv_cache_size_tokens
    assert kv and f"{kv:,}" in page
    assert "unsupported_architecture" in page and "passed" in page
    # the index counts the run's real outcomes and names its device and vLLM version
    index = (reports / "README.md").read_text()
    row = next(line for line in index.splitlines() if line.startswith(f"| [{first}]"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "cpu" and cells[5] == recs[CHAT].engine_version
    assert cells[6:10] == ["1", "1", "0", "2"]  # ok, failed, skipped, not on host (2 models x H100)
    # the device page links each cell to a run page section that exists
    device = (reports / "devices" / "cpu.md").read_text()
    assert f"../runs/{first}.md#" in device or any(f"../runs/{i}.md#" in device for i in runs["ids"])


def test_every_run_is_published_with_its_records(runs):
    published = runs["reports"] / "data" / "runs"
    log = store.read_runs([published])
    assert [r.run_id for r in log.runs] == runs["ids"] and log.problems == []
    for run in log.runs:
        assert {c.cell_id for c in run.cells if c.record} == {CHAT, UNSUPPORTED}
    # a fresh clone has no results/: the reports rebuild from the published runs alone, deleting nothing
    before = {p.relative_to(runs["reports"]) for p in runs["reports"].rglob("*.md")}
    empty = runs["tmp"] / "fresh-results"
    empty.mkdir()
    proc, _ = run_harness(["report", "--results", str(empty), "--reports", str(runs["reports"])])
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = {p.relative_to(runs["reports"]) for p in runs["reports"].rglob("*.md")}
    assert before <= after
    page = (runs["reports"] / "runs" / f"{runs['ids'][0]}.md").read_text()
    assert "no record on this host" not in page


@pytest.mark.parametrize("pair", [(0, 1), (1, 2), (0, 2)])
def test_unchanged_runs_pass_the_gate(runs, pair):
    a, b = (runs["ids"][i] for i in pair)
    proc, _ = run_harness(
        ["diff", a, b, "--results", str(runs["results"]), "--reports", str(runs["reports"]), "--json"]
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = json.loads(proc.stdout)
    assert out["compared_cells"] == 2 and out["regressions"] == []
    assert {c["cell_id"] for c in out["cells"]} >= {CHAT, UNSUPPORTED}


def test_half_the_kv_cache_fails_the_gate_and_is_named(runs):
    a, b = runs["ids"][2], runs["ids"][3]
    before, after = _records(runs["results"], a)[CHAT], _records(runs["results"], b)[CHAT]
    proc, _ = run_harness(["diff", a, b, "--results", str(runs["results"]), "--reports", str(runs["reports"])])
    assert proc.returncode == 1, proc.stdout[-3000:]
    tokens_a, tokens_b = before.metrics.kv_cache_size_tokens, after.metrics.kv_cache_size_tokens
    assert tokens_b * 2 == tokens_a
    assert f"{CHAT}: regressed — kv_cache_tokens: {tokens_a:,} tokens → {tokens_b:,} tokens (-50.0 %)" in proc.stdout
    assert "compared" in proc.stdout and f"{UNSUPPORTED}: unchanged" in proc.stdout
