"""The engine's process shell: spawn it isolated, stream its log, wait for ready, stop it all.

An engine runs in its own session (process group) under a `Guard` (harness/engine/guard.py) that kills
the whole group, EngineCore and workers included, if the harness dies first, even by SIGKILL; the
parent-death signal also takes its first process at once. A pid file under `results/.engines/`
names the engine, its start time and the device locks of the run that owns it, so that what a
power loss or a killed guard left behind is found and stopped on the next start: only when its
run no longer holds those locks, and by pid and start time, never by name, so a process the
harness did not start, or a live run's engine, is never touched.

The log pump never stops draining the engine's output: if the log cannot be written (disk full)
it keeps reading and discarding, so the engine never stalls on a full pipe, and `log_error` says
where the log was cut.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from harness.engine import guard
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


def server_command(cell: Cell, model_dir: str, port: int, actions: dict[str, dict[str, Any]]) -> list[str]:
    """The OpenAI-compatible server's command line for a cell: bound to 127.0.0.1, the cell's
    engine args spelled the way the installed vLLM's own parser wants them. The API key is not
    in it: argv is readable by every local user (ps, /proc); pass it as `server_env(key)`."""
    cmd = [
        cell.engine.python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        cell.model.name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *cli_flags(cell.config.args, actions),
    ]
    if cell.model.trust_remote_code and "trust_remote_code" not in cell.config.args:
        cmd.append("--trust-remote-code")
    return cmd


def server_env(api_key: str) -> dict[str, str]:
    """The engine's environment entries for its API key (vLLM reads VLLM_API_KEY)."""
    return {"VLLM_API_KEY": api_key}


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: SIGKILL it when the harness dies. Linux ties this
    # to the *thread* that forked, so engines are started from threads that outlive them.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class Guard:
    """The guard process of one process group (see harness/engine/guard.py): `watch` tells it the
    tree's members, `release` tells it the harness stopped the group itself."""

    SCRIPT = Path(guard.__file__)

    def __init__(self, pgid: int):
        read, self._write = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(self.SCRIPT), str(pgid)],
                stdin=read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(read)
        self._sent: set[int] = set()
        self._lock = threading.Lock()

    def watch(self, pids: Iterable[int]) -> None:
        with self._lock:
            lines = []
            for pid in pids:
                ticks = guard.start_ticks(pid)
                if pid not in self._sent and ticks is not None:
                    self._sent.add(pid)
                    lines.append(f"{pid} {ticks}\n")
            if lines and self._write >= 0:
                self._send("".join(lines).encode())

    def release(self) -> None:
        """The group is stopped: the guard exits without killing anything."""
        with self._lock:
            if self._write < 0:
                return
            self._send(guard.DONE + b"\n")
            os.close(self._write)
            self._write = -1
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def _send(self, data: bytes) -> None:
        try:
            os.write(self._write, data)
        except OSError:
            pass  # the guard is gone (killed by hand): the pid file remains for the next start


class EngineProcess:
    """One engine server process group, its guard, its log file and its pid file.

    `owner`: facts about the run that owns the engine, kept in the pid file; `locks` (the device
    lock files that run holds) tells a later run whether the engine is still someone's."""

    def __init__(
        self,
        cmd: list[str],
        env: dict[str, str],
        log_path: Path,
        pids_dir: Path,
        redact: Callable[[str], str],
        on_line: Callable[[str], None] | None = None,
        owner: dict | None = None,
    ):
        self.cmd, self.env, self.log_path, self.pids_dir = cmd, env, log_path, pids_dir
        self.redact, self.on_line, self.owner = redact, on_line, owner or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.guard: Guard | None = None
        self._reader: threading.Thread | None = None
        self._known: dict[int, float] = {}  # pid -> create_time of every process seen in the tree
        self.pid_file: Path | None = None
        self.log_error: OSError | None = None  # why engine.log stops early (disk full), if it does
        self.log_bytes = 0

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        try:
            self.guard = Guard(self.proc.pid)
        except OSError:
            _signal_group(self.proc.pid, signal.SIGKILL)  # unguarded, it must not run at all
            self.proc.wait()
            raise
        self._remember_tree()
        self._reader = threading.Thread(target=self._pump, name="engine-log", daemon=True)
        self._reader.start()
        self.pid_file = self.pids_dir / f"{self.proc.pid}.json"
        created = self._known.get(self.proc.pid)
        info = {"pid": self.proc.pid, "create_time": created, "log": str(self.log_path), **self.owner}
        try:
            self.pids_dir.mkdir(parents=True, exist_ok=True)
            self.pid_file.write_text(json.dumps(info))
        except OSError:  # disk full: the guard still covers a killed harness
            self.pid_file.unlink(missing_ok=True)
            self.pid_file = None

    def _pump(self) -> None:
        """Copy the engine's output to the log, redacted, until the engine closes it; on a write
        error go on reading (and on calling `on_line`) so the engine never blocks on the pipe."""
        assert self.proc and self.proc.stdout
        log = None
        try:
            log = open(self.log_path, "w", encoding="utf-8", errors="replace")
        except OSError as exc:
            self.log_error = exc
        for raw in self.proc.stdout:
            line = self.redact(raw.decode("utf-8", errors="replace"))
            if log is not None:
                try:
                    log.write(line)
                    log.flush()
                    self.log_bytes += len(raw)
                except OSError as exc:
                    self.log_error = exc
                    _close_quietly(log)
                    log = None
            if self.on_line:
                self.on_line(line)
        if log is not None:
            _close_quietly(log)
        elif self.log_error is not None:
            self._mark_truncated()

    def _mark_truncated(self) -> None:
        # Best effort: on a full disk this line may not fit either; the record says it anyway.
        try:
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(f"\n[harness] engine.log truncated after {self.log_bytes} bytes: {self.log_error}\n")
        except OSError:
            pass

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
        if self.guard:
            self.guard.watch(self._known)

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
        if self.guard:
            self.guard.release()
        if self._reader:
            self._reader.join(timeout=5)
        if self.pid_file:
            self.pid_file.unlink(missing_ok=True)
        return time.monotonic() - started


def _close_quietly(fh) -> None:
    try:
        fh.close()
    except OSError:
        pass  # flushing the rest failed for the same reason the write did


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


def _lock_held(path: str) -> bool:
    """Does some process hold this device lock file (flock) right now?"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock just taken


def _owner_alive(info: dict, held: set[str]) -> bool:
    """The engine's run still holds one of its device locks (not one this process holds now)."""
    locks = [os.path.realpath(p) for p in info.get("locks") or []]
    return any(p not in held and _lock_held(p) for p in locks)


def reap_stale(pids_dir: Path, held_locks: Iterable[Path | str] = ()) -> list[int]:
    """Stop engines a killed harness left running, found by their pid files. Returns their pids.

    Call it holding the device locks (`held_locks`): a pid file whose run still holds one of its
    locks belongs to a live run and is left alone. Otherwise the pid file's pid (also its
    process-group id) and start time decide: if that pid now belongs to another process (start
    time differs), nothing is touched; if it is gone, the group id cannot have been reused while
    members remain, so those members are the engine's."""
    held = {os.path.realpath(p) for p in held_locks}
    stopped = []
    for pid_file in sorted(pids_dir.glob("*.json")):
        try:
            info = json.loads(pid_file.read_text())
            pid, created = int(info["pid"]), info.get("create_time")
            created = None if created is None else float(created)  # a damaged start time: not ours
        except (OSError, ValueError, KeyError, TypeError):
            pid_file.unlink(missing_ok=True)
            continue
        if _owner_alive(info, held):
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
