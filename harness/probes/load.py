"""Load generator and metrics for OpenAI-compatible servers, with `vllm bench serve` semantics.

One asyncio client (one aiohttp session, unlimited connector) streams completions or chat
requests and timestamps every read with `time.perf_counter`. Definitions follow
`vllm/benchmarks/serve.py`: TTFT = first chunk carrying choices; ITL = every gap between such
chunks, pooled; E2EL = time of the last such chunk; TPOT = (E2EL − TTFT)/(output tokens − 1);
throughputs over the level's wall time; failed requests contribute no tokens. A profile in
mode "capacity" runs a `CapacitySearch` over these levels instead of a fixed list.

Speed matters more than elegance here (a client that saturates first reports itself): per
chunk the loop does a byte split and one compiled-regex search, and parses JSON only for
events that carry a non-null `usage` or an `error`. Usage is taken from whichever event
carries it, including a content chunk (vLLM's own client misses that case).

The client measures its own ceiling against the zero-delay stub in a separate process
(`measure_client_ceiling`); a level that comes within 50% of it is flagged `client_bound`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import statistics
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from harness import __version__
from harness.engine import metrics as vllm_metrics
from harness.probes.capacity import CapacitySearch
from harness.probes.profiles import ProbeProfile
from harness.probes.prompts import PromptFactory
from harness.probes.stub import StubProcess

# A content chunk: `"choices": [ {` — an empty choices list is a usage-only chunk.
_CONTENT_RE = re.compile(rb'"choices"\s*:\s*\[\s*\{')
_USAGE_RE = re.compile(rb'"usage"\s*:\s*\{')
CLIENT_BOUND_FRACTION = 0.5


@dataclass(slots=True)
class RequestResult:
    ok: bool = False
    error: str | None = None
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0  # E2EL: last content chunk − start
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    token_source: str = "usage"  # usage | tokenizer | chunks
    streamed: bool = True


@dataclass
class Workload:
    """Pre-serialised request bodies (JSON is built before the clock starts)."""

    url: str
    headers: dict[str, str]
    bodies: list[bytes]
    prompt_tokens: list[int | None]
    timeout: aiohttp.ClientTimeout
    prompts: PromptFactory


# --------------------------------------------------------------------------- one request
async def send(session: aiohttp.ClientSession, wl: Workload, i: int) -> RequestResult:
    """Send request i of the workload and time it; never raises."""
    r = RequestResult(prompt_tokens=wl.prompt_tokens[i])
    st = time.perf_counter()
    r.start = st
    try:
        async with session.post(wl.url, data=wl.bodies[i], headers=wl.headers, timeout=wl.timeout) as resp:
            if resp.status != 200:
                body = (await resp.read())[:300].decode("utf-8", "replace")
                r.error = f"HTTP {resp.status}: {body}"
                return r
            if resp.content_type != "text/event-stream":
                await _read_whole(resp, r, wl, st)
            else:
                await _read_stream(resp, r, wl, st)
    except TimeoutError:
        r.error = f"timeout after {wl.timeout.total}s"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        r.error = f"{type(exc).__name__}: {exc}"
    return r


async def _read_stream(resp: aiohttp.ClientResponse, r: RequestResult, wl: Workload, st: float) -> None:
    first = True
    last = st
    itl = r.itl
    usage = None
    contents: list[bytes] = []  # kept by reference; decoded only when usage is missing
    buf = b""
    async for data in resp.content.iter_any():
        now = time.perf_counter()
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        buf += data
        if b"\n\n" not in buf:
            continue
        events = buf.split(b"\n\n")
        buf = events.pop()
        for ev in events:
            if not ev.startswith(b"data:"):
                continue  # SSE comments (pings) and blank keep-alives
            payload = ev[5:].lstrip()
            is_content = _CONTENT_RE.search(payload) is not None
            if is_content:
                if first:
                    r.ttft = now - st
                    first = False
                else:
                    itl.append(now - last)
                last = now
                contents.append(payload)
            if b'"usage"' in payload and _USAGE_RE.search(payload):
                usage = json.loads(payload).get("usage") or usage
            elif not is_content and b'"error"' in payload:
                obj = json.loads(payload)
                if "error" in obj:
                    err = obj["error"]
                    r.error = "stream error: " + str(err.get("message", err) if isinstance(err, dict) else err)[:300]
                    return
    if first:
        r.error = "no content chunk received"
        return
    r.latency = last - st
    r.ok = True
    _count_tokens(r, usage, wl, lambda: "".join(_chunk_text(p) for p in contents), len(contents))


async def _read_whole(resp: aiohttp.ClientResponse, r: RequestResult, wl: Workload, st: float) -> None:
    """A server that ignored `stream`: one JSON body; TTFT = E2EL, no ITL."""
    obj = json.loads(await resp.read())
    r.ttft = r.latency = time.perf_counter() - st
    r.streamed = False
    if "error" in obj and "choices" not in obj:
        r.error = f"error body: {str(obj['error'])[:300]}"
        return
    choice = (obj.get("choices") or [{}])[0]
    text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
    r.ok = True
    _count_tokens(r, obj.get("usage"), wl, lambda: text, None)


def _chunk_text(payload: bytes) -> str:
    choice = json.loads(payload)["choices"][0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def _count_tokens(r: RequestResult, usage: dict | None, wl: Workload, text, chunks) -> None:
    """Output tokens from usage; else re-tokenised text; else one per streamed chunk."""
    if usage and usage.get("completion_tokens") is not None:
        r.output_tokens = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            r.prompt_tokens = int(usage["prompt_tokens"])
        return
    counted = wl.prompts.count_output(text())
    if counted is not None:
        r.output_tokens, r.token_source = counted, "tokenizer"
    elif chunks is not None:
        r.output_tokens, r.token_source = chunks, "chunks"
    else:  # non-streamed, no usage, no tokenizer: whitespace words are the best guess
        r.output_tokens, r.token_source = len(text().split()), "words"


# --------------------------------------------------------------------------- metrics
def _percentile(sorted_xs: list[float], q: float) -> float:
    """numpy.percentile's default (linear) interpolation, as vllm bench serve uses."""
    pos = (len(sorted_xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def stats_ms(xs: list[float]) -> dict[str, float | None]:
    """mean/median/std/p90/p95/p99 in ms of values in seconds; None for an empty list."""
    if not xs:
        return {"mean": None, "median": None, "std": None, "p90": None, "p95": None, "p99": None}
    s = sorted(xs)
    return {
        "mean": statistics.fmean(s) * 1000,
        "median": statistics.median(s) * 1000,
        "std": statistics.pstdev(s) * 1000,
        "p90": _percentile(s, 90) * 1000,
        "p95": _percentile(s, 95) * 1000,
        "p99": _percentile(s, 99) * 1000,
    }


def summarize(results: list[RequestResult], duration: float, goodput: dict[str, float] | None = None) -> dict[str, Any]:
    """Level metrics from request results, as `calculate_metrics` in vllm bench serve."""
    done = [r for r in results if r.ok]
    streamed = [r for r in done if r.streamed]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in streamed if r.output_tokens > 1]
    itls = [gap for r in streamed for gap in r.itl]
    out_tokens = sum(r.output_tokens for r in done)
    in_known = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    in_tokens = sum(in_known) if len(in_known) == len(done) else None
    dur = max(duration, 1e-9)
    level: dict[str, Any] = {
        "requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "ttft_ms": stats_ms([r.ttft for r in done]),
        "tpot_ms": stats_ms(tpots),
        "itl_ms": stats_ms(itls),
        "e2el_ms": stats_ms([r.latency for r in done]),
        "request_throughput": len(done) / dur,
        "output_throughput": out_tokens / dur,
        "total_token_throughput": (in_tokens + out_tokens) / dur if in_tokens is not None else None,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "chunk_rate": sum(len(r.itl) + 1 for r in streamed) / dur,
        "token_count_source": dict(Counter(r.token_source for r in done)),
        "non_streaming_responses": len(done) - len(streamed),
        "errors": dict(Counter(r.error for r in results if not r.ok).most_common(5)),
    }
    if goodput:
        level["request_goodput"] = sum(_meets_slo(r, goodput) for r in done) / dur
        level["goodput_slo_ms"] = goodput
    return level


def _meets_slo(r: RequestResult, slo_ms: dict[str, float]) -> bool:
    # vllm bench serve scores TPOT as 0 for single-token outputs.
    tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
    values = {"ttft": r.ttft, "tpot": tpot, "e2el": r.latency}
    return all(values[k] * 1000 <= v for k, v in slo_ms.items())


# --------------------------------------------------------------------------- levels
class _LevelRun:
    """Shared state of one level: which request is next, failures, why it stopped."""

    def __init__(self, n: int, profile: ProbeProfile) -> None:
        self.n = n
        self.next = 0
        self.results: list[RequestResult] = []
        self.failed = 0
        self.max_failed = profile.max_error_fraction * n
        self.deadline = time.perf_counter() + profile.max_level_seconds
        self.stop_reason: str | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    def take(self) -> int | None:
        if self.stop_reason is not None or self.next >= self.n:
            return None
        if time.perf_counter() > self.deadline:
            self.stop_reason = "time_budget: max_level_seconds reached"
            return None
        self.next += 1
        return self.next - 1

    async def issue(self, session: aiohttp.ClientSession, wl: Workload, i: int) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        r = await send(session, wl, i)
        self.in_flight -= 1
        self.results.append(r)
        if not r.ok:
            self.failed += 1
            if self.failed > self.max_failed and self.stop_reason is None:
                self.stop_reason = f"errors: {self.failed} failed, last: {r.error}"


async def _concurrency_level(session, wl: Workload, run: _LevelRun, concurrency: int) -> None:
    # c workers pulling from one counter: cheaper than n tasks behind a semaphore.
    async def worker() -> None:
        while (i := run.take()) is not None:
            await run.issue(session, wl, i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _rate_level(session, wl: Workload, run: _LevelRun, rate: float, seed: int, cap: int | None) -> None:
    rng = random.Random(seed)
    sem = asyncio.Semaphore(cap) if cap else None
    tasks = []
    t = time.perf_counter()

    async def one(i: int) -> None:
        if sem is None:
            return await run.issue(session, wl, i)
        async with sem:
            await run.issue(session, wl, i)

    while (i := run.take()) is not None:
        tasks.append(asyncio.create_task(one(i)))
        t += rng.expovariate(rate)  # Poisson arrivals: exponential gaps, seeded
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    await asyncio.gather(*tasks)


# --------------------------------------------------------------------------- /metrics
async def _scrape(
    session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]
) -> dict[str, float | None] | None:
    try:
        async with session.get(f"{base_url}/metrics", headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status != 200:
                return None
            return vllm_metrics.engine_snapshot(await resp.text())
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return None


class _MetricsWatch:
    """Scrapes before/after a level and polls in between for the KV-usage peak."""

    def __init__(self, session, base_url: str, headers: dict[str, str], every: float) -> None:
        self.session, self.base_url, self.headers, self.every = session, base_url, headers, every
        self.before: dict | None = None
        self.peaks: dict[str, float] = {}
        self._task: asyncio.Task | None = None

    def _note(self, snap: dict | None) -> None:
        for key in ("kv_cache_usage", "num_requests_running", "num_requests_waiting"):
            if snap and snap.get(key) is not None:
                self.peaks[key] = max(self.peaks.get(key, 0.0), snap[key])

    async def start(self) -> bool:
        self.before = await _scrape(self.session, self.base_url, self.headers)
        if self.before is None:
            return False
        self._note(self.before)
        self._task = asyncio.create_task(self._poll())
        return True

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            self._note(await _scrape(self.session, self.base_url, self.headers))

    async def finish(self) -> dict[str, Any] | None:
        if self._task:
            self._task.cancel()
        after = await _scrape(self.session, self.base_url, self.headers)
        if self.before is None or after is None:
            return None
        self._note(after)
        return {
            "deltas": vllm_metrics.counter_deltas(self.before, after),
            "kv_cache_usage_peak": self.peaks.get("kv_cache_usage"),
            "num_requests_running_peak": self.peaks.get("num_requests_running"),
            "num_requests_waiting_peak": self.peaks.get("num_requests_waiting"),
            # The server's own means over the level: what the client's figures should match.
            "server_latency_ms": vllm_metrics.latency_means(self.before, after),
        }


# --------------------------------------------------------------------------- profile
def _normalise_base(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def server_problem(base_url: str, model: str, api_key: str | None, timeout: float = 10.0) -> str | None:
    """Why a server cannot be probed (no answer, an HTTP error, not an OpenAI model list,
    the model not served), in one line; None when `/v1/models` lists the model."""
    url = _normalise_base(base_url) + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            body = resp.read(1 << 20)
    except urllib.error.HTTPError as exc:
        hint = " (check --api-key)" if exc.code in (401, 403) else ""
        return f"GET {url} answered HTTP {exc.code}{hint}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"cannot reach {url}: {getattr(exc, 'reason', None) or exc}"
    try:
        data = json.loads(body)
    except ValueError:
        return f"GET {url} did not answer JSON (is this an OpenAI-compatible server?)"
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return f"GET {url} did not answer an OpenAI model list"
    served = [str(m.get("id")) for m in entries if isinstance(m, dict)]
    if model not in served:
        return f"the server does not serve model {model!r} (it serves: {', '.join(served) or 'none'})"
    return None


def build_workload(
    base_url: str,
    model: str,
    api_key: str | None,
    profile: ProbeProfile,
    prompts: PromptFactory,
    n: int,
    seed: int,
    timeout: float,
) -> Workload:
    chat = profile.endpoint == "chat"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    bodies, counts = [], []
    for i in range(n):
        text, count = prompts.make(profile.input_tokens, seed * 1_000_003 + i)
        body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
            body["max_completion_tokens"] = profile.output_tokens
        else:
            body["prompt"] = text
            body["max_tokens"] = profile.output_tokens
        if profile.ignore_eos:
            body["ignore_eos"] = True
        bodies.append(json.dumps(body).encode())
        # The chat template adds tokens the client cannot know; usage fills them in.
        counts.append(None if chat else count)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return Workload(
        url=base_url + path,
        headers=headers,
        bodies=bodies,
        prompt_tokens=counts,
        timeout=aiohttp.ClientTimeout(total=timeout),
        prompts=prompts,
    )


# vLLM's server closes a connection idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s by default);
# aiohttp keeps one for 15 s. A connection idle between the two, reused by the next request
# (a level after a long one), fails as "Server disconnected": drop ours first.
KEEPALIVE_S = 3.0


def new_session() -> aiohttp.ClientSession:
    # limit=0: no connection-pool cap, so the level's concurrency is the only limit.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False, keepalive_timeout=KEEPALIVE_S),
        timeout=aiohttp.ClientTimeout(total=None),
    )


async def run_level(
    session,
    base_url: str,
    model: str,
    api_key: str | None,
    profile: ProbeProfile,
    prompts: PromptFactory,
    level: float,
    index: int,
    request_timeout: float,
) -> dict[str, Any]:
    """Run one level (a concurrency, or a request rate) and return its metrics."""
    rate_mode = profile.mode == "rate"
    concurrency = 0 if rate_mode else int(level)
    n = profile.requests if rate_mode else profile.requests_for(concurrency)
    seed = profile.seed + 7919 * (index + 1)  # distinct prompts per level: no cross-level cache hits
    wl = build_workload(base_url, model, api_key, profile, prompts, n, seed, request_timeout)
    watch = _MetricsWatch(session, base_url, wl.headers, profile.metrics_poll_seconds)
    has_metrics = profile.scrape_metrics and await watch.start()
    run = _LevelRun(n, profile)
    cpu0, t0 = time.process_time(), time.perf_counter()
    if rate_mode:
        await _rate_level(session, wl, run, level, seed, profile.max_concurrency)
    else:
        await _concurrency_level(session, wl, run, concurrency)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    out: dict[str, Any] = {"concurrency": concurrency if not rate_mode else profile.max_concurrency}
    if rate_mode:
        out["request_rate"] = level
    out.update(summarize(run.results, wall, profile.goodput))
    out["stop_reason"] = run.stop_reason or "completed"
    out["max_in_flight"] = run.max_in_flight
    out["client_cpu_util"] = cpu / wall if wall > 0 else None
    out["server_metrics"] = await watch.finish() if has_metrics else None
    return out


def _flag_client_bound(level: dict[str, Any], ceiling: dict[str, Any] | None) -> None:
    """client_load: the larger of request and chunk rate as fractions of the ceiling."""
    if not ceiling or not ceiling.get("request_rate"):
        level["client_load"] = level["client_bound"] = None
        return
    load = max(
        level["request_throughput"] / ceiling["request_rate"],
        level["chunk_rate"] / ceiling["chunk_rate"] if ceiling.get("chunk_rate") else 0,
    )
    level["client_load"] = load
    level["client_bound"] = load >= CLIENT_BOUND_FRACTION


async def arun_profile(
    base_url: str,
    model: str,
    api_key: str | None,
    profile: ProbeProfile,
    *,
    tokenizer_dir: str | None = None,
    request_timeout: float = 60,
    client_ceiling: dict[str, Any] | None = None,
    measure_ceiling: bool = True,
) -> dict[str, Any]:
    """Run a profile's levels against a server; the design's probe JSON plus extras."""
    base_url = _normalise_base(base_url)
    if client_ceiling is None and measure_ceiling:
        client_ceiling = await ameasure_client_ceiling(
            output_tokens=profile.output_tokens, input_tokens=profile.input_tokens
        )
    prompts = PromptFactory(tokenizer_dir)
    started = time.perf_counter()
    levels: list[dict[str, Any]] = []
    stop_reason = "completed"
    warmup: dict[str, Any] | None = None
    capacity: dict[str, Any] | None = None  # mode "capacity": CapacityResult
    async with new_session() as session:
        if profile.warmup_requests:
            wl = build_workload(
                base_url, model, api_key, profile, prompts, profile.warmup_requests, profile.seed, request_timeout
            )
            res = await asyncio.gather(*(send(session, wl, i) for i in range(len(wl.bodies))))
            warmup = {"requests": len(res), "failed": sum(not r.ok for r in res)}
            if all(not r.ok for r in res):
                stop_reason = f"warmup_failed: {res[0].error}"
        # A server that failed every warm-up request would only time out level by level.
        warm = not stop_reason.startswith("warmup")
        if profile.mode == "capacity" and warm:

            async def level_runner(lp: ProbeProfile, level: float, index: int) -> dict[str, Any]:
                result = await run_level(session, base_url, model, api_key, lp, prompts, level, index, request_timeout)
                _flag_client_bound(result, client_ceiling)
                return result

            search = CapacitySearch(profile, level_runner, started)
            capacity = (await search.run()).model_dump()
            levels, stop_reason = search.levels, capacity["stop_reason"]
        to_run = profile.levels() if warm and profile.mode != "capacity" else []
        for index, level in enumerate(to_run):
            result = await run_level(session, base_url, model, api_key, profile, prompts, level, index, request_timeout)
            _flag_client_bound(result, client_ceiling)
            levels.append(result)
            if result["stop_reason"].startswith("errors"):
                stop_reason = f"errors at level {level}"
                break
            if len(levels) > 1 and profile.mode == "concurrency":
                prev = levels[-2]["output_throughput"]
                if prev > 0 and result["output_throughput"] < prev * (1 + profile.min_throughput_gain):
                    stop_reason = (
                        f"saturated: output throughput {result['output_throughput']:.1f}"
                        f" tok/s at concurrency {level} is under "
                        f"{1 + profile.min_throughput_gain:.2f}x the previous level's"
                    )
                    break
    out = {
        "levels": levels,
        "client": {
            "harness_version": __version__,
            "impl": f"asyncio+aiohttp {aiohttp.__version__}",
            "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
            "cpu_count": os.cpu_count(),
            "ceiling": client_ceiling,
            "client_bound_fraction": CLIENT_BOUND_FRACTION,
            "definitions": "vllm bench serve (TTFT, TPOT=(E2EL-TTFT)/(out-1), ITL pooled "
            "chunk gaps, E2EL, throughputs over level wall time)",
        },
        "profile": profile.model_dump(),
        "prompt_tokens_exact": prompts.exact,
        "prompt_note": prompts.note,
        "warmup": warmup,
        "stop_reason": stop_reason,
        "duration_s": time.perf_counter() - started,
    }
    if profile.mode == "capacity":
        out["capacity"] = capacity
    return out


def _run(coro):
    # uvloop, where installed, roughly halves the client's per-chunk overhead.
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_profile(
    base_url: str,
    model: str,
    api_key: str | None,
    profile: ProbeProfile,
    *,
    tokenizer_dir: str | None = None,
    request_timeout: float = 60,
    client_ceiling: dict[str, Any] | None = None,
    measure_ceiling: bool = True,
) -> dict[str, Any]:
    """Synchronous `arun_profile` (its own event loop)."""
    return _run(
        arun_profile(
            base_url,
            model,
            api_key,
            profile,
            tokenizer_dir=tokenizer_dir,
            request_timeout=request_timeout,
            client_ceiling=client_ceiling,
            measure_ceiling=measure_ceiling,
        )
    )


# --------------------------------------------------------------------------- ceiling
_CEILINGS: dict[tuple[int, int, int], dict[str, Any]] = {}


async def ameasure_client_ceiling(
    concurrency: int = 64, output_tokens: int = 16, input_tokens: int = 32, requests: int = 1500, cached: bool = True
) -> dict[str, Any]:
    """This client's max rates against a zero-delay stub in its own process (so client and
    server each get a core). Cached per process and workload shape."""
    key = (concurrency, output_tokens, input_tokens)
    if cached and key in _CEILINGS:
        return _CEILINGS[key]
    profile = ProbeProfile(
        name="ceiling",
        concurrency=[concurrency],
        requests=requests,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        warmup_requests=0,
        scrape_metrics=False,
    )
    prompts = PromptFactory(None)
    with StubProcess() as url:
        async with new_session() as session:
            # A short untimed burst first: connection set-up is not the steady state.
            await run_level(
                session,
                url,
                "stub",
                None,
                profile.model_copy(update={"requests": concurrency * 2}),
                prompts,
                concurrency,
                0,
                30,
            )
            level = await run_level(session, url, "stub", None, profile, prompts, concurrency, 1, 30)
    result = {
        "request_rate": level["request_throughput"],
        "output_token_rate": level["output_throughput"],
        "chunk_rate": level["chunk_rate"],
        "concurrency": concurrency,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "requests": level["completed"],
        "failed": level["failed"],
        "client_cpu_util": level["client_cpu_util"],
        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _CEILINGS[key] = result
    return result


def measure_client_ceiling(
    concurrency: int = 64, output_tokens: int = 16, input_tokens: int = 32, requests: int = 1500, cached: bool = True
) -> dict[str, Any]:
    """Synchronous `ameasure_client_ceiling`."""
    return _run(ameasure_client_ceiling(concurrency, output_tokens, input_tokens, requests, cached))
