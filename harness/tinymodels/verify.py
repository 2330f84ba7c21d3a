"""Check the tiny models through a real vLLM CPU OpenAI server, with the harness's own engine
lifecycle (`harness.engine.process`) and its own answer judge (`harness.probes.validation`), so
`build-models --verify` and a real matrix run cannot disagree.

Used by `build-models --verify` and by the engine-marked tests.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.engine.info import engine_arg_actions, engine_versions
from harness.engine.process import (
    PIDS_DIR,
    EngineExited,
    EngineProcess,
    ReadyTimeout,
    engine_api_key,
    free_port,
    server_command,
    server_env,
)
from harness.probes.validation import ask
from harness.schema import Cell, EngineConfig, EngineInstall, ModelSpec
from harness.tinymodels import addition_facts

# The engine settings the CPU matrix uses for tiny models (see data/README.md).
CPU_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
CPU_ARGS = {"dtype": "bfloat16", "max_model_len": 512}


def engine_python() -> str:
    """The interpreter with vLLM: $HARNESS_ENGINE_PYTHON, else this one."""
    return os.environ.get("HARNESS_ENGINE_PYTHON") or sys.executable


@dataclass
class Server:
    url: str
    api_key: str
    model: str  # the served model name
    log_path: Path
    ready_s: float | None = None  # spawn -> /health and /v1/models answer
    failed_s: float | None = None  # spawn -> the engine exited

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@contextmanager
def serve(
    model_dir: Path | str,
    log_path: Path | str,
    args: dict | None = None,
    env: dict | None = None,
    timeout_s: float = 300.0,
    python: str | None = None,
) -> Iterator[Server]:
    """Start vLLM's OpenAI server on `model_dir`; yields once it is ready or has exited.

    `args` are engine args (snake_case, added to CPU_ARGS; value None drops one), `env` is added
    to CPU_ENV (value None unsets a variable). On timeout neither `ready_s` nor `failed_s` is set.
    The engine's whole process tree is stopped on exit.
    """
    engine = EngineInstall(name="verify", python=python or engine_python())
    actions = engine_arg_actions(engine, engine_versions(engine))
    model_dir, log_path = Path(model_dir).absolute(), Path(log_path)
    all_args = {k: v for k, v in {**CPU_ARGS, **(args or {})}.items() if v is not None}
    cell = Cell(
        model=ModelSpec(name=model_dir.name, source=str(model_dir)),
        gpu="cpu",
        config=EngineConfig(name="verify", args=all_args),
        engine=engine,
    )
    port, api_key = free_port(), engine_api_key()
    full_env = {
        k: v for k, v in {**os.environ, **CPU_ENV, **(env or {}), **server_env(api_key)}.items() if v is not None
    }
    proc = EngineProcess(
        server_command(cell, str(model_dir), port, actions),
        full_env,
        log_path,
        log_path.parent / PIDS_DIR,
        redact=lambda line: line.replace(api_key, "***"),
    )
    server = Server(url=f"http://127.0.0.1:{port}", api_key=api_key, model=cell.model.name, log_path=log_path)
    started = time.monotonic()
    proc.start()
    try:
        try:
            server.ready_s = proc.wait_ready(server.url, api_key, timeout_s)
        except EngineExited:
            server.failed_s = time.monotonic() - started
        except ReadyTimeout:
            pass
        yield server
    finally:
        proc.stop()


def chat(server: Server, question: str, max_tokens: int = 8, timeout_s: float = 60.0) -> str:
    return ask(server.url, server.model, server.api_key, question, max_tokens=max_tokens, timeout=timeout_s)


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
