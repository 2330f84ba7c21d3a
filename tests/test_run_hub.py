"""The runner with hub models, against a fake hub on 127.0.0.1 (HF_ENDPOINT) and the real
huggingface_hub client: gated and missing repos fail in seconds without an engine, a model missing
from the cache offline is a skip, and a downloaded snapshot is what the real engine loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ENGINE_PYTHON, TINY, run_harness
from fakehub import FakeHub, FakeRepo

from harness.store import iter_records

TOKEN = "hf_granted_0123456789abcdef"


def hub_matrix(tmp: Path, models: list[str], probe: str = "none") -> Path:
    lines = [f"engines: [{{name: venv, python: {ENGINE_PYTHON}}}]", "models:"]
    lines += [f"  - model: {m}" for m in models]
    lines += [
        "gpus: [cpu]",
        "configs:",
        "  - {name: cpu, args: {max_model_len: 256, enforce_eager: true}, env: {VLLM_CPU_KVCACHE_SPACE: 1}}",
        "timeouts: {ready_s: 600, request_s: 60}",
        f"probe: {probe}",
    ]
    path = tmp / "matrix.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_chat_files() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (TINY / "tiny-chat").iterdir() if p.is_file()}


def records(results: Path) -> dict:
    return {r.model_dump()["cell"]["model"]["source"]: r for _, r in iter_records(results)}


def test_gated_and_missing_fail_fast_without_an_engine(tmp_path):
    repos = {"org/gated": FakeRepo(tiny_chat_files(), gated=True, granted=frozenset({TOKEN}))}
    with FakeHub(repos) as hub:
        proc, watcher = run_harness(
            [
                "run",
                "--matrix",
                str(hub_matrix(tmp_path, ["org/gated", "org/missing"])),
                "--results",
                str(tmp_path / "results"),
                "--no-report",
                "--progress",
                "plain",
            ],
            timeout=300,
            HF_ENDPOINT=hub.url,
            HF_HOME=str(tmp_path / "hf"),
            HF_HUB_OFFLINE="0",
            HF_TOKEN="",
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = records(tmp_path / "results")
    gated, missing = recs["org/gated"], recs["org/missing"]
    assert gated.outcome == "failed" and gated.failure_class == "gated_or_auth"
    assert "HF_TOKEN" in gated.failure_detail
    assert missing.outcome == "failed" and missing.failure_class == "model_not_found"
    for rec in (gated, missing):
        assert rec.timings.total_s < 30 and rec.timings.startup_s is None
    assert not watcher.engines(), "no engine may start for a model that could not be fetched"


def test_offline_and_not_cached_is_a_skip(tmp_path):
    proc, watcher = run_harness(
        [
            "run",
            "--matrix",
            str(hub_matrix(tmp_path, ["org/never-downloaded"])),
            "--results",
            str(tmp_path / "results"),
            "--no-report",
            "--progress",
            "plain",
        ],
        timeout=300,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = records(tmp_path / "results")["org/never-downloaded"]
    assert rec.outcome == "skipped" and "org/never-downloaded" in rec.skip_reason
    assert not watcher.engines()


@pytest.mark.engine
def test_downloaded_snapshot_is_served(tmp_path):
    with FakeHub({"org/tiny-chat": tiny_chat_files()}) as hub:
        proc, watcher = run_harness(
            [
                "run",
                "--matrix",
                str(hub_matrix(tmp_path, ["org/tiny-chat"])),
                "--results",
                str(tmp_path / "results"),
                "--no-report",
                "--progress",
                "plain",
            ],
            timeout=900,
            HF_ENDPOINT=hub.url,
            HF_HOME=str(tmp_path / "hf"),
            HF_HUB_OFFLINE="0",
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = records(tmp_path / "results")["org/tiny-chat"]
    assert rec.outcome == "ok", (rec.failure_class, rec.failure_detail)
    assert rec.fetch.source == "hub" and len(rec.fetch.revision_sha) == 40
    assert rec.fetch.bytes >= (TINY / "tiny-chat" / "model.safetensors").stat().st_size
    assert rec.fetch.path.startswith(str(tmp_path / "hf")) and rec.fetch.revision_sha in rec.fetch.path
    assert rec.command[rec.command.index("--model") + 1] == rec.fetch.path  # the engine loads the snapshot
    assert rec.timings.fetch_s is not None and rec.timings.spawn_to_ready_s > 0
    assert watcher.wait_gone(15) == []
