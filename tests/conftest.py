"""Shared test helpers: the repo root, running the harness CLI, watching a process tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

# Hermetic by default: nothing in the test process reaches the real Hub (tests that use the fake hub
# pass HF_HUB_OFFLINE=0 to the subprocess they start). Set before anything imports huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "harness" / "tinymodels" / "data"
ENGINE_PYTHON = ROOT / ".venv" / "bin" / "python"


def _published_state() -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in (ROOT / "reports").rglob("*") if p.is_file()}


def pytest_sessionstart(session):
    session.config._published_before = _published_state()


def pytest_sessionfinish(session, exitstatus):
    # The committed reports/ (and its published run log) is the project's product: a test that
    # rendered or published into it instead of a tmp folder fails the session.
    before = getattr(session.config, "_published_before", None)
    if before is not None and _published_state() != before:
        changed = sorted(set(before.items()) ^ set(_published_state().items()))[:5]
        print(f"\nerror: the test session changed the repository's reports/: {changed}", file=sys.stderr)
        session.exitstatus = 1


# Modules whose tests start no engine but take seconds each (subprocesses of the harness or of an
# engine's Python, a fake hub, a browser, stand-in engines, timed stubs): left out of `make test-fast`.
SLOW_MODULES = {
    "test_doctor",
    "test_report_browser",
    "test_plan_hub",
    "test_fetch",
    "test_run_hub",
    "test_cluster",
    "test_run_packing",
    "test_process",
    "test_probe_load",
    "test_probe_prompts",
    "test_capacity",
    "test_tinymodels",
    "test_telemetry",
    "test_hardening_process",
    "test_hardening_disk",
    "test_hardening_validate",
    "test_provision",
    "test_bisect",
    "test_workflow",
    "test_report_ingest",
    "test_seams",
    "test_report_examples",
    "test_report",
    "test_plan",
}


ONE_AT_A_TIME = "engine"  # the xdist group whose tests run on one worker, one after another


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the items
def pytest_collection_modifyitems(items):
    _cheapest_first_under_mutmut(items)
    for item in items:
        # Real engines share 2 cores: keep every engine test on one xdist worker, one at a time.
        # A test whose verdict rides on wall-clock latency joins that lane, so no engine's threads
        # run beside it (CI saw a 170 ms stall at a 20 ms margin when one did).
        if item.get_closest_marker("engine") or item.get_closest_marker("timing"):
            item.add_marker(pytest.mark.xdist_group(ONE_AT_A_TIME))
        if not item.get_closest_marker("engine") and item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session):
    """xdist (`--dist loadgroup`) groups tests by a suffix it writes into their node ids. Where it
    cannot (pytest 9.2 with xdist 3.8), the engines silently share the two cores: stop instead."""
    if not getattr(session.config.option, "loadgroup", False):  # set on xdist workers only
        return
    split = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group")]
    split = [nodeid for nodeid in split if not nodeid.endswith("@" + ONE_AT_A_TIME)]
    if split:
        message = (
            f"--dist loadgroup did not group {len(split)} tests (e.g. {split[0]}): pytest-xdist cannot "
            "group under this pytest; install the pytest that pyproject.toml allows"
        )
        print(f"\nerror: {message}", file=sys.stderr)
        pytest.exit(message, returncode=pytest.ExitCode.USAGE_ERROR)


def _cheapest_first_under_mutmut(items: list) -> None:
    """Under `make mutate` a mutant's tests stop at the first failure: run the quickest module
    first (its tests quickest first), by the times mutmut recorded, so a mutant dies at its
    cheapest test. Modules stay whole: a module-scoped fixture is then set up once."""
    stats = Path("mutmut-stats.json")  # mutmut runs the tests from its mutants/ folder
    if not os.environ.get("MUTANT_UNDER_TEST") or not stats.is_file():
        return
    took = json.loads(stats.read_text()).get("duration_by_test", {})
    cost: dict[str, float] = {}
    for item in items:
        cost[item.module.__name__] = cost.get(item.module.__name__, 0.0) + took.get(item.nodeid, 1.0)
    items.sort(key=lambda item: (cost[item.module.__name__], item.module.__name__, took.get(item.nodeid, 1.0)))


def harness_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness", *args]


# The run-level device locks of this test session: a matrix run elsewhere on the machine (a
# developer's `make matrix`) must not make the suite fail, nor the suite block it.
LOCK_DIR = tempfile.mkdtemp(prefix="harness-test-locks-")


def harness_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "HARNESS_LOCK_DIR": LOCK_DIR, **extra}


class TreeWatcher:
    """Remembers every process ever seen below a root pid (by pid + start time), so a test can
    assert that none of them outlives the run — without looking processes up by name."""

    def __init__(self, root_pid: int, every: float = 0.2):
        self.root_pid, self.every = root_pid, every
        self.seen: dict[int, float] = {}
        self.cmdlines: dict[int, list[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.snapshot()
            time.sleep(self.every)

    def snapshot(self) -> None:
        try:
            root = psutil.Process(self.root_pid)
            children = root.children(recursive=True)
        except psutil.Error:
            return
        for p in children:
            try:
                if p.pid not in self.seen:
                    self.seen[p.pid] = p.create_time()
                # Read again each time: a child seen between fork and exec still shows its
                # parent's argv, and the engine would never be recognised.
                self.cmdlines[p.pid] = p.cmdline() or self.cmdlines.get(p.pid, [])
            except psutil.Error:
                continue

    def engines(self) -> list[int]:
        """Pids of vLLM servers started below the root (other children: version probes, git)."""
        return [pid for pid, cmd in self.cmdlines.items() if "vllm.entrypoints.openai.api_server" in cmd]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def alive(self) -> list[psutil.Process]:
        out = []
        for pid, created in list(self.seen.items()):  # another thread may add to it
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def wait_gone(self, timeout: float = 30) -> list[psutil.Process]:
        end = time.monotonic() + timeout
        while self.alive() and time.monotonic() < end:
            time.sleep(0.2)
        return self.alive()


def run_harness(args: list[str], timeout: float = 900, **env: str) -> tuple[subprocess.CompletedProcess, TreeWatcher]:
    proc = subprocess.Popen(
        harness_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=harness_env(**env), cwd=ROOT
    )
    watcher = TreeWatcher(proc.pid)
    out, err = proc.communicate(timeout=timeout)
    watcher.stop()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), watcher


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    """Poll until `predicate()` is truthy and return its value; fail naming `what` after `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")
