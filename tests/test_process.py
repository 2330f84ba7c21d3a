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

import psutil

from harness.engine.process import EngineProcess, engine_api_key, reap_stale

# A parent that starts a child which ignores SIGTERM, then both sleep: the worst polite case.
TREE = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('child up', flush=True); time.sleep(600)"])
print("parent up", flush=True)
time.sleep(600)
"""


def start_tree(tmp_path, secret="s3cret-key"):
    lines = []
    proc = EngineProcess(
        [sys.executable, "-c", TREE, "--api-key", secret],
        env={"PATH": "/usr/bin:/bin"},
        log_path=tmp_path / "engine.log",
        pids_dir=tmp_path / ".engines",
        redact=lambda s: s.replace(secret, "***"),
        on_line=lines.append,
    )
    proc.start()
    deadline = time.monotonic() + 20
    while len(psutil.Process(proc.pid).children(recursive=True)) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    while len(lines) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, lines


def tree_pids(pid):
    root = psutil.Process(pid)
    return [root.pid] + [c.pid for c in root.children(recursive=True)]


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


def test_unrelated_process_is_never_reaped(tmp_path):
    """A pid file naming a live process the harness did not start (start time differs) is ignored."""
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        pids = tmp_path / ".engines"
        pids.mkdir()
        (pids / f"{other.pid}.json").write_text(json.dumps({"pid": other.pid, "create_time": 1.0}))
        assert reap_stale(pids) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


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
