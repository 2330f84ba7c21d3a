"""The engine's process shell: spawn it isolated, stream its log, wait for ready, stop it all.

An engine runs in its own session (process group), with the parent-death signal set so it dies
with a killed harness, and a pid file under `results/.engines/` so that any engine a killed
harness left behind is found and stopped on the next start — by pid and start time, never by
name, so a process the harness did not start is never touched.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from harness.engine.info import cli_flags
from harness.schema import Cell

PIDS_DIR = ".engines"
_PR_SET_PDEATHSIG = 1


class EngineExited(Exception):
    """The engine process ended before it became ready (or while serving)."""

    def __init__(self, returncode: int | None):
        super().__init__(f"engine exited with code {returncode}")
        self.returncode = returncode


class ReadyTimeout(Exception):
    """The engine did not answer /health and /v1/models within the ready timeout."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def engine_api_key() -> str:
    """A fresh random key for one engine's `--api-key`. Hex, because a URL-safe token starts
    with "-" one time in 64 and vLLM's argument parser then takes it for a flag."""
    return secrets.token_hex(24)


def server_command(cell: Cell, model_dir: str, port: int, api_key: str,
                   actions: dict[str, dict[str, Any]]) -> list[str]:
    """The OpenAI-compatible server's command line for a cell: bound to 127.0.0.1, the cell's
    engine args spelled the way the installed vLLM's own parser wants them."""
    cmd = [cell.engine.python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", cell.model.name, "--host", "127.0.0.1", "--port", str(port),
           "--api-key", api_key, *cli_flags(cell.config.args, actions)]
    if cell.model.trust_remote_code and "trust_remote_code" not in cell.config.args:
        cmd.append("--trust-remote-code")
    return cmd


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGKILL it when the harness dies. Linux ties this
    # to the *thread* that forked, so engines are started from threads that outlive them.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class EngineProcess:
    """One engine server process group, its log file and its pid file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path, pids_dir: Path,
                 redact: Callable[[str], str], on_line: Callable[[str], None] | None = None):
        self.cmd, self.env, self.log_path, self.pids_dir = cmd, env, log_path, pids_dir
        self.redact, self.on_line = redact, on_line
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._known: dict[int, float] = {}  # pid -> create_time of every process seen in the tree
        self.pid_file: Path | None = None

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
        )
        self._remember_tree()
        self.pid_file = self.pids_dir / f"{self.proc.pid}.json"
        self.pids_dir.mkdir(parents=True, exist_ok=True)
        created = self._known.get(self.proc.pid)
        self.pid_file.write_text(json.dumps({"pid": self.proc.pid, "create_time": created, "log": str(self.log_path)}))
        self._reader = threading.Thread(target=self._pump, name="engine-log", daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        with open(self.log_path, "w", encoding="utf-8", errors="replace") as log:
            for raw in self.proc.stdout:
                line = self.redact(raw.decode("utf-8", errors="replace"))
                log.write(line)
                log.flush()
                if self.on_line:
                    self.on_line(line)

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def exit_code_within(self, seconds: float) -> int | None:
        """The exit code if the engine ends within `seconds` (a crash being torn down), else None."""
        assert self.proc
        try:
            return self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None

    def _remember_tree(self) -> None:
        try:
            root = psutil.Process(self.pid)
            for p in [root, *root.children(recursive=True)]:
                self._known.setdefault(p.pid, p.create_time())
        except psutil.Error:
            pass

    # ------------------------------------------------------------------ ready
    def wait_ready(self, base_url: str, api_key: str, timeout: float, poll_s: float = 0.2) -> float:
        """Block until /health and /v1/models answer; returns seconds since spawn."""
        assert self.proc
        started = time.monotonic()
        headers = {"Authorization": f"Bearer {api_key}"}
        health_ok = False
        while True:
            self._remember_tree()
            if self.proc.poll() is not None:
                raise EngineExited(self.proc.returncode)
            if time.monotonic() - started > timeout:
                raise ReadyTimeout(f"not ready after {timeout:.0f} s")
            path = "/v1/models" if health_ok else "/health"
            try:
                req = urllib.request.Request(base_url + path, headers=headers)
                with urllib.request.urlopen(req, timeout=min(5.0, timeout)) as resp:
                    if resp.status == 200:
                        if health_ok:
                            return time.monotonic() - started
                        health_ok = True
                        continue
            except (urllib.error.URLError, OSError, TimeoutError):
                pass
            time.sleep(poll_s)

    # ------------------------------------------------------------------ stop
    def stop(self, grace: float = 15.0) -> float:
        """SIGTERM the group, wait `grace`, SIGKILL what is left; returns seconds taken.

        Returns only when every process ever seen in the engine's tree is gone."""
        if not self.proc:
            return 0.0
        started = time.monotonic()
        self._remember_tree()
        if self.proc.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            _signal_group(self.pid, signal.SIGCONT)  # a stopped (hung) engine must run to exit
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        _kill_all(self.pid, self._known, deadline=started + grace)
        self.proc.wait()
        if self._reader:
            self._reader.join(timeout=5)
        if self.pid_file:
            self.pid_file.unlink(missing_ok=True)
        return time.monotonic() - started


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(known: dict[int, float]) -> list[psutil.Process]:
    out = []
    for pid, created in known.items():
        try:
            p = psutil.Process(pid)
            if created is None or abs(p.create_time() - created) < 0.01:
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
        except psutil.Error:
            continue
    return out


def _kill_all(pgid: int, known: dict[int, float], deadline: float) -> None:
    """Wait for the tree to go until `deadline`, then SIGKILL the group and every straggler."""
    while _alive(known) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    for p in _alive(known):
        try:
            p.kill()
        except psutil.Error:
            pass
    end = time.monotonic() + 10
    while _alive(known) and time.monotonic() < end:
        time.sleep(0.05)


def _group_members(pgid: int) -> dict[int, float]:
    members = {}
    for p in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(p.pid) == pgid:
                members[p.pid] = p.info["create_time"]
        except (ProcessLookupError, PermissionError):
            continue
    return members


def reap_stale(pids_dir: Path) -> list[int]:
    """Stop engines a killed harness left running, found by their pid files. Returns their pids.

    The pid file holds the engine's pid (also its process-group id) and start time. If that pid
    now belongs to another process (start time differs), nothing is touched. If it is gone, the
    group id cannot have been reused while members remain, so those members are the engine's."""
    stopped = []
    for pid_file in sorted(pids_dir.glob("*.json")):
        try:
            info = json.loads(pid_file.read_text())
            pid, created = int(info["pid"]), info.get("create_time")
            created = None if created is None else float(created)  # a damaged start time: not ours
        except (OSError, ValueError, KeyError, TypeError):
            pid_file.unlink(missing_ok=True)
            continue
        try:
            reused = created is None or abs(psutil.Process(pid).create_time() - created) >= 0.01
        except psutil.NoSuchProcess:
            reused = False
        if not reused:
            known = _group_members(pid)
            try:
                known.update({c.pid: c.create_time() for c in psutil.Process(pid).children(recursive=True)})
            except psutil.Error:
                pass
            if known:
                _signal_group(pid, signal.SIGTERM)
                _signal_group(pid, signal.SIGCONT)
                _kill_all(pid, known, deadline=time.monotonic() + 10)
                stopped.append(pid)
        pid_file.unlink(missing_ok=True)
    return stopped
