"""Check the tiny models through a real vLLM CPU OpenAI server (stdlib only on this side).

Used by `build-models --verify` and by the engine-marked tests. The server runs as a
subprocess in its own session (process group) on 127.0.0.1 and a free port; it is always
killed as a group when the context exits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from harness.tinymodels import addition_facts

# The engine settings the CPU matrix uses for tiny models (see data/README.md).
CPU_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
CPU_ARGS = {"dtype": "bfloat16", "max_model_len": 512}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_python() -> str:
    """The interpreter with vLLM: $HARNESS_ENGINE_PYTHON, else this one."""
    return os.environ.get("HARNESS_ENGINE_PYTHON") or sys.executable


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path
    model: str
    started: float
    ready_s: float | None = None
    failed_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _cli_args(args: dict) -> list[str]:
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:  # None: drop a default
            continue
        else:
            out += [flag, str(value)]
    return out


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM then SIGKILL the server's whole process group (it leads its own session)."""
    if proc.poll() is None or _group_alive(proc.pid):
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(proc.pid):
                time.sleep(0.2)
                proc.poll()
            if not _group_alive(proc.pid):
                break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@contextmanager
def serve(
    model_dir: Path | str,
    log_path: Path | str,
    args: dict | None = None,
    env: dict | None = None,
    timeout_s: float = 300.0,
    python: str | None = None,
    on_spawn: Callable[[subprocess.Popen], None] | None = None,
) -> Iterator[Server]:
    """Start vLLM's OpenAI server on `model_dir`; yields once it is ready or has exited.

    `args` are engine args (snake_case, added to CPU_ARGS; value None drops one), `env` is
    added to CPU_ENV (value None unsets a variable).

    `server.ready_s` (spawn -> /health 200) or `server.failed_s` (spawn -> exit) is set;
    on timeout neither is. The process group is killed on exit.
    """
    port = free_port()
    all_args = {**CPU_ARGS, **(args or {})}
    cmd = [
        python or engine_python(), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
        *_cli_args(all_args),
    ]
    full_env = {**os.environ, **CPU_ENV, **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # env value None: unset it
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_fh:
        started = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
    server = Server(proc=proc, port=port, log_path=log_path, model=str(model_dir), started=started)
    server.extra["cmd"] = cmd
    if on_spawn is not None:
        on_spawn(proc)
    try:
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                server.failed_s = time.monotonic() - started
                break
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        server.ready_s = time.monotonic() - started
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.25)
        yield server
    finally:
        kill_group(proc)


def chat(server: Server, question: str, max_tokens: int = 8, timeout_s: float = 60.0) -> str:
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    req = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        data = json.loads(resp.read())
    return data["choices"][0]["message"]["content"] or ""


def first_number(answer: str, question: str = "2+2") -> str | None:
    """The harness's reading of an answer: first number once echoes of the question are gone."""
    cleaned = answer.replace(question, " ")
    m = re.search(r"-?\d+(?:\.\d+)?", cleaned)
    return m.group(0) if m else None


def check_facts(server: Server) -> tuple[int, list[str]]:
    """Exact answers over the 100 addition facts, and the wrong ones."""
    good, wrong = 0, []
    for q, a in addition_facts():
        got = chat(server, q)
        if got.strip() == a:
            good += 1
        else:
            wrong.append(f"{q} -> {got!r}")
    return good, wrong


_KV_LINE = re.compile(r"(KV cache size|Maximum concurrency|KV cache|kv cache)", re.I)


def kv_lines(log: str) -> list[str]:
    return [line.rstrip("\r") for line in log.splitlines() if _KV_LINE.search(line)]
