"""Hardening of the process shell on plain Python process trees (no vLLM): the guard kills the
whole tree, setsid escapees included, when its owner is SIGKILLed; the log pump drains a pipe
it cannot write; reaping leaves a live run's engines alone; the probe stub dies with its owner."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import psutil
from conftest import ROOT, wait_for

from harness.engine.process import EngineProcess, Guard, reap_stale
from harness.run.packing import lock_devices
from harness.run.telemetry import Sampler

# The engine stand-in: a parent, a child in its process group that ignores SIGTERM (an EngineCore
# that does not listen), and a grandchild that left the group with setsid (what vLLM's data-parallel
# supervisor does), so the group kill alone cannot reach it.
TREE = """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(600)"])
print("parent up", flush=True)
time.sleep(600)
"""

# A harness stand-in that starts the tree (or the probe stub) and reports the pids it sees.
OWNER = """
import sys, time, psutil
from pathlib import Path
from harness.engine.process import EngineProcess
tmp = Path(sys.argv[1])
proc = EngineProcess([sys.executable, "-c", sys.argv[2]], env={"PATH": "/usr/bin:/bin"}, log_path=tmp / "engine.log",
                     pids_dir=tmp / ".engines", redact=str)
proc.start()
while len(psutil.Process(proc.pid).children(recursive=True)) < 2:
    time.sleep(0.05)
proc._remember_tree()
print(" ".join(map(str, proc._known)), proc.guard.proc.pid, flush=True)
time.sleep(600)
"""

STUB_OWNER = """
import time
from harness.probes.stub import StubProcess
with StubProcess() as url:
    print(url, flush=True)
    time.sleep(600)
"""


def owner_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            continue
    return out


def test_guard_kills_the_whole_tree_when_its_owner_is_sigkilled(tmp_path):
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path), TREE], stdout=subprocess.PIPE, text=True, env=owner_env()
    )
    *tree, guard = map(int, owner.stdout.readline().split())
    assert len(tree) == 3 and alive([guard]) == [guard]
    # one of them leaves the engine's session
    wait_for(lambda: len({os.getsid(p) for p in tree}) == 2, 10, "the setsid child in its own session")
    owner.kill()
    owner.wait()
    killed_at = time.monotonic()
    wait_for(lambda: not alive(tree + [guard]), 5, "the engine tree and its guard gone")
    assert time.monotonic() - killed_at < 5


def test_guard_released_kills_nothing():
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        guard = Guard(other.pid)
        guard.watch([other.pid])
        guard.release()
        assert guard.proc.poll() == 0  # the guard has exited ...
        assert other.poll() is None  # ... and left the group alone
    finally:
        other.kill()
        other.wait()


def test_probe_stub_dies_with_its_owner():
    owner = subprocess.Popen([sys.executable, "-c", STUB_OWNER], stdout=subprocess.PIPE, text=True, env=owner_env())
    assert owner.stdout.readline().startswith("http://127.0.0.1:")
    stub = [c.pid for c in psutil.Process(owner.pid).children() if "harness.probes.stub" in c.cmdline()]
    assert len(stub) == 1
    owner.kill()
    owner.wait()
    wait_for(lambda: not alive(stub), 5, "the probe stub gone")


def test_log_pump_drains_a_pipe_it_cannot_write(tmp_path):
    # /dev/full fails every write with ENOSPC, like a full disk. 2 MB is far beyond the 64 KiB pipe
    # buffer: an engine whose log stopped being read would block on its next print.
    log = tmp_path / "engine.log"
    log.symlink_to("/dev/full")
    lines = []
    code = "import sys\nfor i in range(20000): print('x' * 100, i)\nprint('last line')"
    proc = EngineProcess(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin"},
        log_path=log,
        pids_dir=tmp_path / ".engines",
        redact=str,
        on_line=lines.append,
    )
    proc.start()
    assert proc.exit_code_within(30) == 0
    proc.stop()
    assert proc.log_error is not None and proc.log_error.errno == errno.ENOSPC
    assert len(lines) == 20001 and lines[-1] == "last line\n"  # every line still seen by the runner


def test_telemetry_series_on_a_full_disk_leaves_no_tmp(tmp_path):
    sampler = Sampler(None)
    sampler.start()
    sampler.stop()
    (tmp_path / "telemetry.csv.tmp").symlink_to("/dev/full")
    try:
        sampler.write_series(tmp_path / "telemetry.csv")
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    else:
        raise AssertionError("the write did not fail")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- lock before reap
def start_owned_tree(tmp_path, locks: list[str]) -> EngineProcess:
    proc = EngineProcess(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"],
        env={"PATH": "/usr/bin:/bin"},
        log_path=tmp_path / "engine.log",
        pids_dir=tmp_path / ".engines",
        redact=str,
        owner={"run_id": "r1", "locks": locks},
    )
    proc.start()
    return proc


HOLDER = (
    "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
    "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)"
)


def test_reap_leaves_an_engine_whose_run_holds_its_lock(tmp_path):
    lock = tmp_path / "gpu0.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    proc = None
    try:
        assert holder.stdout.readline() == "locked\n"
        proc = start_owned_tree(tmp_path, [str(lock)])
        assert json.loads(proc.pid_file.read_text())["locks"] == [str(lock)]
        assert reap_stale(tmp_path / ".engines") == []  # its run is alive: not stale
        assert proc.poll() is None and proc.pid_file.exists()
        holder.kill()
        holder.wait()
        assert reap_stale(tmp_path / ".engines") == [proc.pid]  # the run is gone: reaped
        assert proc.exit_code_within(10) is not None
    finally:
        holder.kill()
        holder.wait()
        if proc:
            proc.stop(grace=1)


def test_reap_by_the_run_that_took_over_the_lock(tmp_path, monkeypatch):
    """The new run holds the device lock itself: the engine's own run cannot hold it any more."""
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    with lock_devices(["cpu"], "r0") as first:
        proc = start_owned_tree(tmp_path, [str(p) for p in first.paths])
    try:
        with lock_devices(["cpu"], "r2") as mine:
            fd = os.open(mine.paths[0], os.O_RDONLY)
            try:  # the lock is taken (by this run), yet the engine is reaped
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    raise AssertionError("the lock is free")
                except BlockingIOError:
                    pass
            finally:
                os.close(fd)
            assert reap_stale(tmp_path / ".engines", held_locks=mine.paths) == [proc.pid]
    finally:
        proc.stop(grace=1)


def test_guard_is_gone_after_a_normal_stop(tmp_path):
    proc = start_owned_tree(tmp_path, [])
    guard = proc.guard.proc
    proc.stop(grace=1)
    assert guard.poll() == 0
    assert proc.proc.returncode == -signal.SIGTERM
