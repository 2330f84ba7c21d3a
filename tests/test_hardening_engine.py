"""Crash safety on the real vLLM CPU engine: the harness SIGKILLed at every phase leaves no
process behind; a second run during the first touches nothing of it; a timeout is retried,
not reused; the engine's API key is in no process's argv."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import ENGINE_PYTHON, ROOT, TreeWatcher, harness_cmd, harness_env, wait_for
from fakehub import FakeHub
from test_run_engine import records_by_cell, small_matrix
from test_run_hub import hub_matrix, tiny_chat_files

from harness.store import read_runs

pytestmark = pytest.mark.engine

if not ENGINE_PYTHON.exists():
    pytest.skip("the engine venv is missing: run `make install`", allow_module_level=True)

CELL = "tiny-chat__cpu__cpu__venv"
# Eager mode: no torch.compile, so each engine is up in seconds rather than a minute.
CPU_CONFIG = "  - {name: cpu, args: {max_model_len: 256, enforce_eager: true}, env: {VLLM_CPU_KVCACHE_SPACE: 1}}"


class Harness:
    """`harness run` in the background, its plain progress lines collected as they come."""

    def __init__(self, matrix: Path, results: Path, *extra: str, **env: str):
        self.proc = subprocess.Popen(
            harness_cmd(
                "run", "--matrix", str(matrix), "--results", str(results), "--no-report", "--progress", "plain", *extra
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=harness_env(**env),
            cwd=ROOT,
        )
        self.watcher = TreeWatcher(self.proc.pid, every=0.05)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def wait_phase(self, phase: str, timeout: float = 300) -> None:
        wait_for(
            lambda: (
                any(line.rstrip().endswith(f": {phase}") for line in list(self.lines)) or self.proc.poll() is not None
            ),
            timeout,
            f"phase {phase!r}",
            every=0.02,
        )
        assert self.proc.poll() is None, f"the run ended before {phase!r}: {''.join(self.lines)[-2000:]}"

    def wait(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        self.watcher.stop()
        return code


def run_folders(results: Path) -> set[str]:
    return (
        {p.name for p in results.iterdir() if p.is_dir() and not p.name.startswith(".")} if results.exists() else set()
    )


# --------------------------------------------------------------------------- SIGKILL at each phase
PHASES = ["fetching", "loading", "ready", "validating", "probing", "stopping"]


@pytest.mark.parametrize("phase", PHASES)
def test_harness_sigkilled_leaves_no_process(tmp_path, phase):
    results = tmp_path / "results"
    if phase == "fetching":  # a hub model whose download crawls
        with FakeHub({"org/tiny-chat": tiny_chat_files()}, body_pause_s=30) as hub:
            run = Harness(
                hub_matrix(tmp_path, ["org/tiny-chat"]),
                results,
                HF_ENDPOINT=hub.url,
                HF_HOME=str(tmp_path / "hf"),
                HF_HUB_OFFLINE="0",
            )
            _kill_at(run, phase)
        return
    matrix = small_matrix(tmp_path, configs=CPU_CONFIG)
    if phase == "probing":
        matrix.write_text(matrix.read_text().replace("probe: none", "probe: quick"))
    run = Harness(matrix, results)
    _kill_at(run, phase)
    # The room a cell sets aside for its record has no name: the kill freed it with the process.
    assert list(results.rglob(".reserve")) == []
    if phase in ("loading", "probing"):  # the engine's own processes (EngineCore) were up and are gone too
        cmdlines = [" ".join(c) for c in run.watcher.cmdlines.values()]
        assert any("spawn_main" in c or "EngineCore" in c for c in cmdlines), cmdlines


def _kill_at(run: Harness, phase: str) -> None:
    run.wait_phase(phase)
    if phase == "loading":
        time.sleep(2)  # well into the load: EngineCore and its worker exist
    if phase == "probing":  # the client ceiling's stub server runs in its own process
        wait_for(
            lambda: any("harness.probes.stub" in c for c in run.watcher.cmdlines.values()),
            60,
            "the probe stub",
            every=0.05,
        )
    run.proc.kill()
    killed = time.monotonic()
    run.wait(30)
    left = run.watcher.wait_gone(5)
    assert left == [], [(p.pid, run.watcher.cmdlines.get(p.pid)) for p in left]
    assert time.monotonic() - killed < 6


# --------------------------------------------------------------------------- two runs, timeouts, key
@pytest.fixture(scope="module")
def timeout_then_rerun(tmp_path_factory):
    """Run 1 times out (ready_s 1). Run 2, with ready_s 300, is started; while its engine loads,
    run 3 starts on the same results and device. Run 2 must end `ok` and be a real rerun."""
    tmp = tmp_path_factory.mktemp("two-runs")
    results = tmp / "results"
    matrix = small_matrix(tmp, configs=CPU_CONFIG, timeouts="{ready_s: 1, request_s: 30}")
    first = Harness(matrix, results)
    out = {"first_code": first.wait(300), "first": records_by_cell(results)}
    matrix.write_text(matrix.read_text().replace("ready_s: 1,", "ready_s: 300,"))
    second = Harness(matrix, results)
    second.wait_phase("loading")
    wait_for(lambda: second.watcher.engines(), 60, "the engine process", every=0.05)
    time.sleep(2)  # well into the load: EngineCore and its worker exist
    engine = second.watcher.engines()[0]
    out["environ"] = Path(f"/proc/{engine}/environ").read_bytes()
    out["cmdlines"] = {
        pid: Path(f"/proc/{pid}/cmdline").read_bytes()
        for pid in list(second.watcher.seen)
        if Path(f"/proc/{pid}/cmdline").exists()
    }
    folders = run_folders(results)
    # Run 2's server is held still (SIGSTOP) while run 3 starts: a tiny eager engine could
    # otherwise be up, checked and gone before run 3 reaches the lock on a loaded box. Its
    # readiness wait (ready_s 300) only sees a server that is slow to answer.
    servers = second.watcher.engines()
    for pid in servers:
        os.kill(pid, signal.SIGSTOP)
    try:
        third = subprocess.run(
            harness_cmd(
                "run",
                "--matrix",
                str(matrix),
                "--results",
                str(results),
                "--no-report",
                "--progress",
                "plain",
                "--force",
            ),
            capture_output=True,
            text=True,
            env=harness_env(),
            cwd=ROOT,
            timeout=300,
        )
    finally:
        for pid in servers:
            os.kill(pid, signal.SIGCONT)
    out.update(third=third, folders_before=folders, folders_after=run_folders(results))
    out["second_code"] = second.wait(600)
    out["second_lines"] = second.lines
    out["records"] = records_by_cell(results)
    out["manifest"] = read_runs([results]).runs[-1].manifest
    out["left"] = second.watcher.wait_gone(10)
    return out


def test_a_timeout_is_retried_not_reused(timeout_then_rerun):
    t = timeout_then_rerun
    assert t["first_code"] == 0
    timed_out = t["first"][CELL]
    assert timed_out.outcome == "failed" and timed_out.failure_class == "timeout"
    rec = t["records"][CELL]
    assert t["second_code"] == 0, "".join(t["second_lines"])[-2000:]
    assert rec.outcome == "ok" and rec.run_id != timed_out.run_id
    assert {e.cell_id: e.status for e in t["manifest"].cells} == {CELL: "ran"}


def test_a_second_run_leaves_the_first_alone(timeout_then_rerun):
    t = timeout_then_rerun
    third = t["third"]
    assert third.returncode == 2  # refused by the device lock: run 2 was still running then
    errors = [line for line in third.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "in use by matrix run" in errors[0], third.stderr
    assert "Traceback" not in third.stderr
    assert t["folders_after"] == t["folders_before"]  # the refused run left no run folder
    rec = t["records"][CELL]  # the running run's engine was not killed: its cell ends ok
    assert rec.outcome == "ok" and rec.failure_class is None and rec.engine_exit_code != -9
    assert t["left"] == []


def test_the_api_key_is_in_no_argv(timeout_then_rerun):
    t = timeout_then_rerun
    env = dict(item.split(b"=", 1) for item in t["environ"].split(b"\0") if b"=" in item)
    key = env[b"VLLM_API_KEY"]
    assert len(key) == 48
    assert len(t["cmdlines"]) >= 2
    for pid, cmdline in t["cmdlines"].items():
        assert key not in cmdline and b"--api-key" not in cmdline, pid
