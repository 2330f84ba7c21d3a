"""The engine process shell on plain Python process trees (no vLLM): stop takes the whole tree,
a stopped (SIGSTOP) tree too, and stale pid files are acted on only for the harness's own."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from harness.engine.process import EngineProcess, engine_api_key, reap_stale
from harness.run.packing import lock_devices

# A parent that starts a child which ignores SIGTERM, then both sleep: the worst polite case.
TREE = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('child up', flush=True); time.sleep(600)"])
print("parent up", flush=True)
time.sleep(600)
"""
# An engine whose processes all end on SIGTERM: reaping it takes no grace period.
POLITE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; print('child up', flush=True); time.sleep(600)"])
print("parent up", flush=True)
time.sleep(600)
"""
# An engine that takes a moment to shut down on SIGTERM, with a worker in its group and a child of
# that worker that moved to a session of its own (out of reach of a signal to the group).
GRANDCHILD = "import time; print('grandchild up', flush=True); time.sleep(600)"
WORKER = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}], start_new_session=True); time.sleep(600)"
LINGERING = f"""
import pathlib, signal, subprocess, sys, time
def bye(*_):
    time.sleep(0.3)
    pathlib.Path(sys.argv[1]).write_text("shut down")
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
subprocess.Popen([sys.executable, "-c", {WORKER!r}])
print("parent up", flush=True)
time.sleep(600)
"""


def start_engine(tmp_path, script, args=(), owner=None, procs=1, lines=2, redact=lambda s: s, log="engine.log"):
    """Start `script` as an engine (its pid file under tmp_path/.engines); wait until `procs`
    processes below its first one run and it printed `lines` lines."""
    out = []
    proc = EngineProcess(
        [sys.executable, "-c", script, *args],
        env={"PATH": "/usr/bin:/bin"},
        log_path=tmp_path / log,
        pids_dir=tmp_path / ".engines",
        redact=redact,
        on_line=out.append,
        owner=owner,
    )
    proc.start()
    deadline = time.monotonic() + 20
    while len(psutil.Process(proc.pid).children(recursive=True)) < procs and time.monotonic() < deadline:
        time.sleep(0.05)
    while len(out) < lines and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, out


def start_tree(tmp_path, secret="s3cret-key"):
    return start_engine(tmp_path, TREE, ["--api-key", secret], redact=lambda s: s.replace(secret, "***"))


def tree_pids(pid):
    root = psutil.Process(pid)
    return [root.pid] + [c.pid for c in root.children(recursive=True)]


def running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_all(pids):
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


def test_engine_api_keys_always_parse_as_a_flag_value():
    # vLLM's server parses its flags with argparse: a key starting with "-" once failed a cell
    # with "argument --api-key: expected one argument".
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--api-key")
    parser.add_argument("--port")
    keys = {engine_api_key() for _ in range(2000)}
    assert len(keys) == 2000
    for key in keys:
        assert parser.parse_args(["--api-key", key, "--port", "1"]).api_key == key


def test_stop_kills_whole_tree_and_removes_pid_file(tmp_path):
    proc, lines = start_tree(tmp_path)
    pids = tree_pids(proc.pid)
    assert len(pids) == 2 and (tmp_path / ".engines" / f"{proc.pid}.json").exists()
    took = proc.stop(grace=1.0)
    assert took < 12
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert not (tmp_path / ".engines" / f"{proc.pid}.json").exists()
    assert sorted(lines) == ["child up\n", "parent up\n"]


def test_stop_handles_a_stopped_tree(tmp_path):
    proc, _ = start_tree(tmp_path)
    pids = tree_pids(proc.pid)
    os.killpg(proc.pid, signal.SIGSTOP)
    proc.stop(grace=1.0)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_reap_stale_stops_a_left_behind_group(tmp_path):
    # Simulate a killed harness: the tree runs on, only its pid file tells about it.
    proc, _ = start_tree(tmp_path)
    pids = tree_pids(proc.pid)
    proc.proc.send_signal(signal.SIGKILL)  # the root dies; its child lives on in the group
    proc.proc.wait()
    assert psutil.pid_exists(pids[1])
    assert reap_stale(tmp_path / ".engines") == [proc.pid]
    time.sleep(0.2)
    assert not psutil.pid_exists(pids[1]) or psutil.Process(pids[1]).status() == psutil.STATUS_ZOMBIE
    assert not list((tmp_path / ".engines").glob("*.json"))


@pytest.mark.parametrize(
    "recorded", [lambda _: 1.0, lambda started: started + 0.5], ids=["long-ago", "half-a-second-off"]
)
def test_unrelated_process_is_never_reaped(tmp_path, recorded):
    """A pid file naming a live process the harness did not start (start time differs, even by
    half a second: its pid was reused) is ignored."""
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        pids = tmp_path / ".engines"
        pids.mkdir()
        created = recorded(psutil.Process(other.pid).create_time())
        (pids / f"{other.pid}.json").write_text(json.dumps({"pid": other.pid, "create_time": created}))
        assert reap_stale(pids) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_left_behind_engine_is_stopped_whole_after_its_shutdown_time(tmp_path):
    """The harness died but the engine's first process runs on (the pid file's start time is its
    own): the engine gets SIGTERM and time to shut down, then every process of its tree goes, the
    one that left the group too; a process the engine did not start is left alone."""
    marker = tmp_path / "shut-down"
    bystander = subprocess.Popen(["sleep", "30"])  # the harness's own child, not the engine's
    proc, _ = start_engine(tmp_path, LINGERING, [str(marker)], procs=2, lines=2)
    pids = tree_pids(proc.pid)
    try:
        assert len(pids) == 3
        assert reap_stale(tmp_path / ".engines") == [proc.pid]
        assert marker.read_text() == "shut down"
        assert not [p for p in pids if running(p)]
        assert bystander.poll() is None
        assert not list((tmp_path / ".engines").glob("*.json"))
    finally:
        kill_all(pids)
        bystander.kill()
        bystander.wait()
        proc.proc.wait()
        proc.guard.release()


def _killed_engine(tmp_path, lock_dir, key, log):
    """An engine of a run that was killed while holding the lock `key`: its first process is gone
    (parent-death signal), a worker lives on, its pid file names the run's lock."""
    with lock_devices([key], "killed-run", lock_dir=lock_dir) as lock:
        proc, _ = start_engine(
            tmp_path, POLITE, owner={"run_id": "killed-run", "locks": [str(p) for p in lock.paths]}, log=log
        )
        pids = tree_pids(proc.pid)
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait()
    proc.guard.release()
    return proc, pids


def test_a_run_holding_its_locks_reaps_the_engines_of_the_killed_run_before_it(tmp_path):
    """The next run takes the lock the killed run's engine names, then reaps: its own hold on that
    lock must not make the engine look like a live run's."""
    proc, pids = _killed_engine(tmp_path, tmp_path / "locks", "gpu0", "engine.log")
    try:
        with lock_devices(["gpu0"], "next-run", lock_dir=tmp_path / "locks") as lock:
            assert reap_stale(tmp_path / ".engines", held_locks=lock.paths) == [proc.pid]
        assert not [p for p in pids if running(p)]
        assert not list((tmp_path / ".engines").glob("*.json"))
    finally:
        kill_all(pids)


def test_a_live_runs_engines_stay_and_the_stale_ones_beside_them_go(tmp_path):
    """Another run still holds the lock its engine's pid file names: that engine and its pid file
    stay, a copy without a start time too; a damaged pid file and a killed run's engine, read after
    them, are dealt with all the same."""
    engines, locks = tmp_path / ".engines", tmp_path / "locks"
    stale, stale_pids = _killed_engine(tmp_path, locks, "gpu0", "stale.log")
    with lock_devices(["gpu1"], "live-run", lock_dir=locks) as lock:
        live, _ = start_engine(
            tmp_path, POLITE, owner={"run_id": "live-run", "locks": [str(p) for p in lock.paths]}, log="live.log"
        )
        live_pids = tree_pids(live.pid)
        try:
            # renamed so that they are read before the stale engine's `<pid>.json`
            info = json.loads(live.pid_file.read_text())
            live.pid_file = live.pid_file.rename(engines / "0-live.json")
            (engines / "0-live-no-start-time.json").write_text(json.dumps({**info, "create_time": None}))
            (engines / "0-damaged.json").write_text('{"pid": ')  # cut short by a power loss
            assert reap_stale(engines) == [stale.pid]
            assert sorted(p.name for p in engines.glob("*.json")) == ["0-live-no-start-time.json", "0-live.json"]
            assert all(running(p) for p in live_pids)
            assert not [p for p in stale_pids if running(p)]
        finally:
            live.stop(grace=1.0)
            kill_all(stale_pids)


def test_two_runs_reaping_one_folder_at_once_both_finish(tmp_path):
    """Runs on disjoint GPUs start together and reap the same folder: a pid file one of them listed
    may be gone when it gets to it (the other one dropped it), and it must go on."""
    engines = tmp_path / ".engines"
    gone = EngineProcess([sys.executable, "-c", "pass"], {}, tmp_path / "engine.log", engines, redact=str)
    gone.start()
    gone.proc.wait()
    gone.guard.release()
    left = gone.pid_file.read_text()  # what a killed harness leaves of an engine that ended
    for i in range(40):
        (engines / f"{i}.json").write_text(left)
        (engines / f"{i}-damaged.json").write_text('{"pid": ')
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(reap_stale, [engines, engines])) == [[], []]
    assert not list(engines.glob("*.json"))


def test_log_is_redacted(tmp_path):
    proc = EngineProcess(
        [sys.executable, "-c", "import sys; print('key=' + sys.argv[1])", "s3cret-key"],
        env={"PATH": "/usr/bin:/bin"},
        log_path=tmp_path / "engine.log",
        pids_dir=tmp_path / ".engines",
        redact=lambda s: s.replace("s3cret-key", "***"),
    )
    proc.start()
    proc.proc.wait()
    proc.stop()
    assert (tmp_path / "engine.log").read_text() == "key=***\n"
