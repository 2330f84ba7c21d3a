"""A minimal streaming OpenAI-compatible server with fixed timing, for calibration and tests.

It answers `/v1/completions` and `/v1/chat/completions` with `max_tokens` (or
`max_completion_tokens`) content chunks, the first after `ttft` seconds and the rest `itl`
apart on an absolute schedule (no drift), plus `/v1/models`, `/health` and a `/metrics` page
with vLLM-style counters. With `ttft_step` the first chunk comes `ttft_step` later for every
request already in flight when a request arrives: a server of known capacity at a TTFT
objective (closed loop at concurrency c: TTFT = ttft + ttft_step x (c - 1)). Faults for
tests: usage in its own chunk, inside the last content chunk, or absent; non-streaming JSON
answers; an error event after N chunks; a connection cut after N chunks; a server that goes
silent; an HTTP error status on every path.

Raw asyncio streams and pre-built byte strings keep its per-chunk cost low: with zero delays
it is the "infinitely fast server" the client ceiling is measured against
(`python -m harness.probes.stub` runs it in its own process and prints its port).
Never used to report server performance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

UsageMode = Literal["final", "in_last_chunk", "none"]


@dataclass
class StubConfig:
    ttft: float = 0.0  # seconds from request to first content chunk
    ttft_step: float = 0.0  # extra TTFT per other request in flight when this one arrives
    itl: float = 0.0  # seconds between content chunks
    usage: UsageMode = "final"
    stream: bool = True  # False: always answer with one JSON body, like a non-streaming server
    error_after: int | None = None  # send an SSE error event after this many chunks
    cut_after: int | None = None  # close the connection after this many chunks
    hang: bool = False  # read the request, then never answer
    status: int = 200  # a non-200 answers every path with an error body
    prompt_tokens: int | None = None  # reported prompt_tokens; default: whitespace words
    token_text: str = " tok"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunked-transfer frame."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class StubServer:
    """Serve on 127.0.0.1; `start()` in a running loop, or `run_in_thread()` from sync code."""

    def __init__(self, config: StubConfig | None = None, port: int = 0) -> None:
        self.config = config or StubConfig()
        self.port = port
        self.requests = 0  # completions requests received (tests assert on it)
        self.max_in_flight = 0
        self._in_flight = 0
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server:
            self._server.close()
            # Idle keep-alive connections would make wait_closed() wait forever (3.12+).
            if hasattr(self._server, "close_clients"):
                self._server.close_clients()
            await self._server.wait_closed()

    def run_in_thread(self) -> StubServer:
        """Start on a private event loop in a daemon thread; returns once listening."""
        ready = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self.start())
            ready.set()
            self._loop.run_forever()
            # Cancel handlers still running (a hanging request, idle keep-alives) so none is
            # left to be collected after the loop is gone.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

        self._thread = threading.Thread(target=main, daemon=True, name="stub-server")
        self._thread.start()
        ready.wait(10)
        return self

    def stop_thread(self) -> None:
        if self._loop and self._thread:
            asyncio.run_coroutine_threadsafe(self.close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> StubServer:
        return self.run_in_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop_thread()

    # ------------------------------------------------------------------ HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, headers = self._parse_head(head)
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                if not await self._route(method, path, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        return method, path.split("?", 1)[0], headers

    @staticmethod
    def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, ctype: bytes = b"application/json") -> None:
        reason = _REASONS.get(status, "Error").encode()
        writer.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (status, reason, ctype, len(body), body)
        )

    async def _route(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False closes the connection."""
        if self.config.status != 200 and not self.config.hang:
            self._respond(
                writer, self.config.status, b'{"error":{"message":"stub error","code":%d}}' % self.config.status
            )
            await writer.drain()
            return True
        if path in ("/v1/completions", "/v1/chat/completions") and method == "POST":
            self.requests += 1
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            try:
                return await self._generate(path, json.loads(body or b"{}"), writer)
            finally:
                self._in_flight -= 1
        if path == "/v1/models":
            self._respond(
                writer,
                200,
                b'{"object":"list","data":[{"id":"stub","object":"model","owned_by":"stub","max_model_len":4096}]}',
            )
        elif path in ("/health", "/ping"):
            self._respond(writer, 200, b"")
        elif path == "/metrics":
            self._respond(writer, 200, self._metrics().encode(), b"text/plain; version=0.0.4")
        else:
            self._respond(writer, 404, b'{"error":{"message":"not found","code":404}}')
        await writer.drain()
        return True

    def _metrics(self) -> str:
        return (
            "# TYPE vllm:num_preemptions counter\nvllm:num_preemptions_total"
            '{engine="0",model_name="stub"} 0.0\n'
            "# TYPE vllm:request_success counter\nvllm:request_success_total"
            f'{{engine="0",finished_reason="length",model_name="stub"}} {self.requests}.0\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc"
            f'{{engine="0",model_name="stub"}} {min(1.0, self._in_flight / 64)}\n'
        )

    async def _generate(self, path: str, req: dict, writer: asyncio.StreamWriter) -> bool:
        cfg = self.config
        start = time.perf_counter()
        # Counted at arrival; _route has already counted this request itself.
        ttft = cfg.ttft + cfg.ttft_step * (self._in_flight - 1)
        if cfg.hang:
            await asyncio.sleep(3600)
        chat = path.endswith("chat/completions")
        n = int(req.get("max_completion_tokens") or req.get("max_tokens") or 16)
        model = str(req.get("model", "stub"))
        prompt = req.get("prompt") if not chat else " ".join(str(m.get("content", "")) for m in req.get("messages", []))
        p_tok = cfg.prompt_tokens if cfg.prompt_tokens is not None else len(str(prompt).split())
        usage = {"prompt_tokens": p_tok, "completion_tokens": n, "total_tokens": p_tok + n}
        if not cfg.stream or not req.get("stream"):
            await self._sleep_until(start + ttft + cfg.itl * max(0, n - 1))
            text = cfg.token_text * n
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                if chat
                else {"index": 0, "text": text, "finish_reason": "length"}
            )
            out: dict[str, object] = {
                "id": "x",
                "object": "chat.completion" if chat else "text_completion",
                "model": model,
                "choices": [choice],
            }
            if cfg.usage != "none":
                out["usage"] = usage
            self._respond(writer, 200, json.dumps(out).encode())
            await writer.drain()
            return True

        obj = b"chat.completion.chunk" if chat else b"text_completion"
        head = b'data: {"id":"x","object":"%s","created":0,"model":%s,"choices":[' % (obj, json.dumps(model).encode())
        tok = json.dumps(cfg.token_text).encode()
        piece = (
            b'{"index":0,"delta":{"content":%s},"finish_reason":null}]' % tok
            if chat
            else b'{"index":0,"text":%s,"finish_reason":null}]' % tok
        )
        content = _chunk(head + piece + b"}\n\n")
        usage_json = json.dumps(usage).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(n):
            if cfg.cut_after is not None and i == cfg.cut_after:
                await writer.drain()
                return False
            if cfg.error_after is not None and i == cfg.error_after:
                writer.write(
                    _chunk(
                        b'data: {"error":{"message":"stub failure mid-stream",'
                        b'"type":"InternalServerError","code":500}}\n\n'
                    )
                )
                writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
                await writer.drain()
                return True
            await self._sleep_until(start + ttft + cfg.itl * i)
            if i == n - 1 and cfg.usage == "in_last_chunk":
                writer.write(
                    _chunk(
                        head
                        + piece.replace(b'"finish_reason":null', b'"finish_reason":"length"')
                        + b',"usage":%s}\n\n' % usage_json
                    )
                )
            else:
                writer.write(content)
            # With zero delays, skipping drain lets chunks coalesce like a fast real server.
            if cfg.itl or ttft:
                await writer.drain()
        if cfg.usage == "final":
            writer.write(_chunk(head + b'],"usage":%s}\n\n' % usage_json))
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        return True

    @staticmethod
    async def _sleep_until(deadline: float) -> None:
        delay = deadline - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)


class StubProcess:
    """The stub in a child process (`with StubProcess(cfg) as url:`): its own interpreter,
    so its timing is not disturbed by the client's GIL and each gets a core. It runs in its own
    process group under a guard (`harness.engine.process.Guard`), so it dies with a killed harness."""

    def __init__(self, config: StubConfig | None = None) -> None:
        self.config = config or StubConfig()
        self._proc: subprocess.Popen | None = None
        self._guard: Any = None  # harness.engine.process.Guard, imported only where a stub is started

    def __enter__(self) -> str:
        from harness.engine.process import Guard  # the stub's own process does not need it

        cfg = self.config
        cmd = [
            sys.executable,
            "-m",
            "harness.probes.stub",
            "--ttft",
            str(cfg.ttft),
            "--ttft-step",
            str(cfg.ttft_step),
            "--itl",
            str(cfg.itl),
            "--usage",
            cfg.usage,
            "--status",
            str(cfg.status),
        ]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            self._guard = Guard(self._proc.pid)
            self._guard.watch([self._proc.pid])
        except BaseException:
            self._proc.kill()
            self._proc.wait()
            raise
        assert self._proc.stdout is not None  # stdout=PIPE
        line = self._proc.stdout.readline()
        if not line.startswith("PORT "):
            self.__exit__()
            raise RuntimeError(f"stub did not start: {line!r}")
        return f"http://127.0.0.1:{int(line.split()[1])}"

    def __exit__(self, *exc: object) -> None:
        if self._proc:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout:
                self._proc.stdout.close()
        if self._guard:
            self._guard.release()


def main(argv: list[str] | None = None) -> None:
    """Run a stub in this process until killed; prints `PORT <n>` once listening."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ttft", type=float, default=0.0)
    p.add_argument("--ttft-step", type=float, default=0.0)
    p.add_argument("--itl", type=float, default=0.0)
    p.add_argument("--status", type=int, default=200)
    p.add_argument("--usage", choices=["final", "in_last_chunk", "none"], default="final")
    args = p.parse_args(argv)
    config = StubConfig(ttft=args.ttft, ttft_step=args.ttft_step, itl=args.itl, usage=args.usage, status=args.status)
    server = StubServer(config, args.port)

    async def serve() -> None:
        await server.start()
        print(f"PORT {server.port}", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop  # a faster loop when present keeps the stub further from the limit

        runner: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
