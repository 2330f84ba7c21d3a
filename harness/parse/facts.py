"""Logical log lines -> the numeric and descriptive facts of EngineFacts (one pass).

Each rule is (trigger substring, regex, handler). A line runs a rule's regex only when its
trigger is in the line, so the common line (request logs, stats) costs a few substring tests.
Several wordings state the same fact (e.g. weights: "Model loading took", the DEBUG profiling
summary, the --kv-cache-memory line); each source has a priority and the most direct one wins.
Facts a worker states for itself (weights, memory breakdown) are kept per process/rank.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.parse.lines import LogLine

GIB = 1024**3

# Facts each TP/PP worker states for itself: kept per rank, headline = rank 0 / first printed.
RANK_KEYS = frozenset(
    {
        "weights_gib",
        "load_seconds",
        "weights_load_seconds",
        "activation_peak_gib",
        "non_torch_gib",
        "cuda_graph_gib",
        "cuda_graph_seconds",
        "kv_cache_gib",
        "total_gpu_memory_gib",
        "free_memory_gib_at_startup",
        "kv_cache_memory_recommendation_bytes",
    }
)

_NUM = r"(-?(?:\d[\d,]{0,24}(?:\.\d{1,12})?|\.\d{1,12}))"  # 14.99, -0.42, 1,048,576, .5 (bounded: no quadratic backtracking)


def num(text: str) -> float:
    return float(text.replace(",", ""))


def whole(text: str) -> int:
    return int(text.replace(",", ""))


def _size_gib(value: str, unit: str) -> float:
    """A torch-style size ("3.50 GiB", "512.00 MiB") in GiB."""
    scale = {"G": 1.0, "M": 1 / 1024, "K": 1 / 1024**2, "T": 1024.0}.get(unit[:1].upper(), 1.0)
    return round(num(value) * scale, 4)


@dataclass
class Ranks:
    """Per-process facts, in the order processes first spoke."""

    values: dict[str, dict[str, tuple[int, Any]]] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    def put(self, line: LogLine, key: str, value: Any, prio: int) -> None:
        rid = line.pid or line.proc or "main"
        slot = self.values.get(rid)
        if slot is None:
            slot = self.values[rid] = {}
            self.names[rid] = line.proc or "main"
        old = slot.get(key)
        if old is None or prio < old[0]:
            slot[key] = (prio, value)

    def ordered(self) -> list[str]:
        order = list(self.values)
        return sorted(order, key=lambda rid: (_rank_number(self.names[rid]), order.index(rid)))


_RANK_NO = re.compile(r"(?:TP|rank=|rank )(\d+)")
_PP_NO = re.compile(r"PP(\d+)")


def _rank_number(name: str) -> float:
    """Sort key: rank 0 first. Unnumbered workers (Ray, V0 VllmWorkerProcess) follow the
    driver; the driver/engine/main process counts as rank 0."""
    tp = _RANK_NO.search(name)
    pp = _PP_NO.search(name)
    if tp or pp:
        return (int(pp.group(1)) if pp else 0) * 1000 + (int(tp.group(1)) if tp else 0)
    if "Ray" in name or "WorkerProcess" in name:
        return 10**6
    return 0


@dataclass
class Facts:
    """Accumulates facts; `result()` gives the EngineFacts keys (rank keys resolved)."""

    glob: dict[str, tuple[int, Any]] = field(default_factory=dict)
    ranks: Ranks = field(default_factory=Ranks)
    ready: bool = False
    loading_done: bool = False  # weights finished loading (an OOM after this is not a load OOM)
    loading_started: bool = False
    compute_capability: str | None = None
    repo: str | None = None  # the Hub repo an auth/not-found error names (for the remedy)

    def put(self, line: LogLine, key: str, value: Any, prio: int = 0) -> None:
        if key in RANK_KEYS:
            self.ranks.put(line, key, value, prio)
            return
        old = self.glob.get(key)
        if old is None or prio < old[0]:
            self.glob[key] = (prio, value)

    def get(self, key: str) -> Any:
        if key in RANK_KEYS:
            for rid in self.ranks.ordered():
                if key in self.ranks.values[rid]:
                    return self.ranks.values[rid][key][1]
            return None
        hit = self.glob.get(key)
        return hit[1] if hit else None

    def result(self) -> dict[str, Any]:
        out = {key: value for key, (_, value) in self.glob.items()}
        for key in RANK_KEYS:
            value = self.get(key)
            if value is not None:
                out[key] = value
        out["per_rank"] = self.per_rank()
        return out

    def per_rank(self) -> list[dict[str, Any]]:
        """Every rank's own values, when two or more ranks stated the same fact."""
        rids = [rid for rid in self.ranks.ordered() if self.ranks.values[rid]]
        if len(rids) < 2:
            return []
        keys = [set(self.ranks.values[rid]) for rid in rids]
        if not any(a & b for i, a in enumerate(keys) for b in keys[i + 1 :]):
            return []
        rows = []
        for rid in rids:
            row: dict[str, Any] = {"rank": self.ranks.names[rid]}
            if rid != self.ranks.names[rid] and rid != "main":
                row["pid"] = int(rid) if rid.isdigit() else rid
            row.update({k: v for k, (_, v) in sorted(self.ranks.values[rid].items())})
            rows.append(row)
        return rows


Handler = Callable[[re.Match[str], LogLine, Facts], None]
RULES: list[tuple[str, re.Pattern[str], Handler]] = []


def rule(trigger: str, pattern: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        RULES.append((trigger, re.compile(pattern), fn))
        return fn

    return register


# --------------------------------------------------------------------------- identity
@rule("LLM engine (v", r"LLM engine \(v(\d+\.\d+[\w.+-]*)\)")
@rule("server version", r"API server version v?(\d+\.\d+[\w.+-]*)")
@rule("  version ", r"█\s+version v?(\d+\.\d+[\w.+-]*)")  # 0.20+ start-up banner
def _version(m, line, f):
    f.put(line, "vllm_version", m.group(1))


@rule("detected platform", r"detected platform (\w+)")
@rule("device_config=", r"device_config=(\w+)")
def _platform(m, line, f):
    f.put(line, "platform", m.group(1).lower(), 1 if m.re.pattern.startswith("device") else 0)


@rule("KV cache size:", r"^(CPU|XPU|TPU|HPU) KV cache size")
def _platform_from_pool(m, line, f):
    f.put(line, "platform", m.group(1).lower(), 2)


@rule("GiB for KV cache on node", r"^(?:Explicitly|Auto) set \(" + _NUM + "/" + _NUM + r"\) GiB")
def _cpu_kv(m, line, f):
    f.put(line, "platform", "cpu", 2)
    f.put(line, "kv_cache_gib", num(m.group(1)), 1)
    f.put(line, "total_gpu_memory_gib", num(m.group(2)), 1)


@rule("VLLM_CPU_KVCACHE_SPACE", r"(?:Using|using) " + _NUM + r" (?:GiB )?(?:for KV cache|by default)")
def _cpu_kv_env(m, line, f):
    f.put(line, "platform", "cpu", 2)
    f.put(line, "kv_cache_gib", num(m.group(1)), 5)


@rule("compute capability", r"Your (?:device '?)?(.+?)'?(?: GPU has| \(with) compute capability (\d+\.\d+)")
def _gpu(m, line, f):
    f.put(line, "gpu_name", m.group(1).strip(), 0)
    f.compute_capability = m.group(2)


@rule("GPU 0: ", r"GPU 0: ([^\n(]{1,120})")  # collect_env / nvidia-smi -L pasted above a log
def _gpu_env(m, line, f):
    name = m.group(1).strip()
    if name:
        f.put(line, "gpu_name", name, 1)


@rule("tensor_parallel_size", r"\btensor_parallel_size'?[=:] ?(\d+)")
def _tp(m, line, f):
    f.put(line, "tp_size", int(m.group(1)))


@rule("pipeline_parallel_size", r"\bpipeline_parallel_size'?[=:] ?(\d+)")
def _pp(m, line, f):
    f.put(line, "pp_size", int(m.group(1)))


# --------------------------------------------------------------------------- weights
@rule(
    "took",
    r"^(?:Model loading|Loading model weights) took " + _NUM + r" GB?(?:iB)?(?: memory)?(?: and " + _NUM + " seconds)?",
)
def _weights(m, line, f):
    f.put(line, "weights_gib", num(m.group(1)), 0)
    if m.group(2):
        f.put(line, "load_seconds", num(m.group(2)), 0)
    f.loading_done = True


@rule("Loading weights took", r"Loading weights took " + _NUM + " seconds")
def _weights_time(m, line, f):
    f.put(line, "weights_load_seconds", num(m.group(1)))
    f.loading_done = True


@rule("to load model", r"Starting to load model")
@rule("checkpoint shards", r"Loading \w+ checkpoint shards")
def _loading(m, line, f):
    f.loading_started = True


# --------------------------------------------------------------------------- profiling
@rule(
    "weights memory:",
    r"torch peak memory increase: "
    + _NUM
    + r" ?GiB;(?: non-torch forward increase memory: "
    + _NUM
    + r" ?GiB;)?.*?weights memory: "
    + _NUM
    + r" ?GiB",
)
def _debug_profile(m, line, f):  # DEBUG MemoryProfilingResult (0.9.1+)
    f.put(line, "activation_peak_gib", num(m.group(1)), 1)
    if m.group(2):
        f.put(line, "non_torch_gib", num(m.group(2)), 1)
    f.put(line, "weights_gib", num(m.group(3)), 2)


@rule(
    "model weights take",
    r"model weights take "
    + _NUM
    + r" ?GiB; non_torch_memory takes "
    + _NUM
    + r" ?GiB; PyTorch activation peak memory takes "
    + _NUM
    + r" ?GiB; the rest of the memory reserved for KV Cache is "
    + _NUM
    + r" ?GiB",
)
def _v0_profile(m, line, f):  # V0 0.6.5+ (three joined lines; the second and third match here)
    f.put(line, "weights_gib", num(m.group(1)), 2)
    f.put(line, "non_torch_gib", num(m.group(2)), 0)
    f.put(line, "activation_peak_gib", num(m.group(3)), 0)
    f.put(line, "kv_cache_gib", num(m.group(4)), 0)


@rule("gpu_memory_utilization (", r"total_gpu_memory \(" + _NUM + r" ?GiB\) x gpu_memory_utilization \(" + _NUM + r"\)")
def _v0_budget(m, line, f):
    f.put(line, "total_gpu_memory_gib", num(m.group(1)), 0)
    f.put(line, "gpu_memory_utilization", num(m.group(2)), 0)


@rule(
    "Memory profiling results:",
    r"total_gpu_memory="
    + _NUM
    + r"GiB.*?non_torch_memory="
    + _NUM
    + r"GiB kv_cache_size="
    + _NUM
    + r"GiB gpu_memory_utilization="
    + _NUM,
)
def _v064_profile(m, line, f):  # 0.6.4 only
    f.put(line, "total_gpu_memory_gib", num(m.group(1)), 0)
    f.put(line, "non_torch_gib", num(m.group(2)), 0)
    f.put(line, "kv_cache_gib", num(m.group(3)), 0)
    f.put(line, "gpu_memory_utilization", num(m.group(4)), 0)


@rule("Available KV cache memory:", r"Available KV cache memory: " + _NUM + r" ?GiB")
def _kv_avail(m, line, f):
    f.put(line, "kv_cache_gib", num(m.group(1)), 0)


@rule("memory for KV Cache as specified", r"Initial free memory " + _NUM + r" ?GiB, reserved " + _NUM + r" ?GiB")
def _kv_bytes_path(m, line, f):
    f.put(line, "free_memory_gib_at_startup", num(m.group(1)), 1)
    f.put(line, "kv_cache_gib", num(m.group(2)), 1)


@rule(
    "Initial free memory:",
    r"Initial free memory: "
    + _NUM
    + r" ?GiB[;,] (?:free memory: [\d.]+ ?GiB, requested GPU memory: |Requested memory: "
    + _NUM
    + r" \(util\), )"
    + _NUM,
)
def _debug_free(m, line, f):
    f.put(line, "free_memory_gib_at_startup", num(m.group(1)), 1)
    if m.group(2):
        f.put(line, "gpu_memory_utilization", num(m.group(2)), 2)


@rule(
    "on startup",
    r"Free memory on device(?: \S+)? \("
    + _NUM
    + "/"
    + _NUM
    + r" GiB\) on startup[. ].*?\("
    + _NUM
    + ", "
    + _NUM
    + r" GiB\)",
)
def _startup_free(m, line, f):  # the --kv-cache-memory line and the "less than desired" error
    f.put(line, "free_memory_gib_at_startup", num(m.group(1)), 0)
    f.put(line, "total_gpu_memory_gib", num(m.group(2)), 1)
    f.put(line, "gpu_memory_utilization", num(m.group(3)), 1)


@rule(
    "on startup is less than desired CPU",
    r"Available memory on node \d+ \("
    + _NUM
    + "/"
    + _NUM
    + r" GiB\) on startup is less than desired CPU memory utilization \("
    + _NUM,
)
def _cpu_startup_free(m, line, f):
    f.put(line, "platform", "cpu", 2)
    f.put(line, "free_memory_gib_at_startup", num(m.group(1)), 0)
    f.put(line, "total_gpu_memory_gib", num(m.group(2)), 1)
    f.put(line, "gpu_memory_utilization", num(m.group(3)), 1)


@rule(
    "GiB for peak activation",
    r"Actual usage is "
    + _NUM
    + r" GiB for (weight|consumed memory)[^,]*, "
    + _NUM
    + r" GiB for peak activation, (?:"
    + _NUM
    + r" GiB for non-torch memory, )?and "
    + _NUM
    + r" GiB for CUDAGraph memory",
)
def _kv_line_usage(m, line, f):
    if m.group(2) == "weight":
        f.put(line, "weights_gib", num(m.group(1)), 3)
    f.put(line, "activation_peak_gib", num(m.group(3)), 2)
    if m.group(4):
        f.put(line, "non_torch_gib", num(m.group(4)), 2)
    f.put(line, "cuda_graph_gib", num(m.group(5)), 2)


@rule("--kv-cache-memory=", r"`--kv-cache-memory=(\d+)`")
def _kv_recommend(m, line, f):
    f.put(line, "kv_cache_memory_recommendation_bytes", int(m.group(1)), 0)


@rule("kv cache memory in use is", r"kv cache memory in use is " + _NUM + r" ?(GiB|bytes)")
def _kv_in_use(m, line, f):
    value = num(m.group(1))
    f.put(line, "kv_cache_gib", value if m.group(2) == "GiB" else round(value / GIB, 2), 2)


@rule("--gpu-memory-utilization=", r"(?:current|from) --gpu-memory-utilization=?(?: from)? ?" + _NUM)
def _cg_util(m, line, f):
    f.put(line, "gpu_memory_utilization", num(m.group(1)), 3)


# --------------------------------------------------------------------------- KV capacity
@rule("KV cache size:", r"KV cache size: " + _NUM + " tokens")
def _kv_tokens(m, line, f):
    f.put(line, "kv_cache_tokens", whole(m.group(1)), 0)


@rule("Maximum concurrency for", r"Maximum concurrency for " + _NUM + r" tokens per request: " + _NUM + "x")
def _concurrency(m, line, f):
    f.put(line, "max_concurrency_tokens_per_request", whole(m.group(1)))
    f.put(line, "max_concurrency", num(m.group(2)))


@rule("blocks: ", r"^# (\w+) blocks: (\d+)")
def _blocks(m, line, f):
    f.put(line, "num_gpu_blocks", int(m.group(2)), 0)
    if m.group(1) == "CPU":  # the CPU backend reports its KV blocks first (0.6 – 0.9)
        f.put(line, "platform", "cpu", 3)


@rule("num_gpu_blocks is:", r"num_gpu_blocks is: (\d+)")
def _blocks_info(m, line, f):
    f.put(line, "num_gpu_blocks", int(m.group(1)), 1)


@rule("num_gpu_blocks_override=", r"with num_gpu_blocks_override=(\d+)")
def _blocks_override(m, line, f):
    f.put(line, "num_gpu_blocks", int(m.group(1)), -1)


# --------------------------------------------------------------------------- timings
@rule("Graph capturing finished", r"Graph capturing finished in " + _NUM + r" secs(?:, took " + _NUM + " GiB)?")
def _graphs(m, line, f):
    f.put(line, "cuda_graph_seconds", num(m.group(1)))
    if m.group(2):
        f.put(line, "cuda_graph_gib", num(m.group(2)), 0)


@rule("CUDA graph pool memory:", r"CUDA graph pool memory: " + _NUM + r" GiB \(actual\)")
def _graph_pool(m, line, f):
    f.put(line, "cuda_graph_gib", num(m.group(1)), 1)


@rule("init engine (profile", r"init engine \(profile, create kv cache, warmup model\) took " + _NUM + " s")
def _init_engine(m, line, f):
    f.put(line, "init_engine_seconds", num(m.group(1)))


@rule(
    "torch.compile ",
    r"^(?:\[[^\]]*\] )?torch\.compile (?:and initial profiling/warmup run together )?(?:takes|took) "
    + _NUM
    + " s in total",
)
def _compile(m, line, f):
    f.put(line, "torch_compile_seconds", num(m.group(1)), 1 if "together" in m.group(0) else 0)


# --------------------------------------------------------------------------- failure numbers
@rule("estimated maximum model length", r"estimated maximum model length is " + _NUM)
def _estimate(m, line, f):
    f.put(line, "estimated_max_model_len", whole(m.group(1)))


@rule(
    "larger than the available KV cache memory",
    r"larger than the available KV cache memory \(" + _NUM + r" GB?(?:iB)?\)",
)
def _kv_avail_err(m, line, f):
    f.put(line, "kv_cache_gib", num(m.group(1)), 4)


@rule("stored in KV cache (", r"stored in KV cache \((\d+)\)")
def _v0_capacity(m, line, f):
    f.put(line, "kv_cache_tokens", int(m.group(1)), 1)


@rule("total capacity", r"GPU \d+ has a total capacity of " + _NUM + r" GiB of which " + _NUM + r" (\w)iB is free")
def _oom_new(m, line, f):
    f.put(line, "total_gpu_memory_gib", num(m.group(1)), 3)


@rule("total capacity", r"\((?:GPU|NPU|XPU) \d+; " + _NUM + r" GiB total capacity")  # torch < 2.3 wording; NPU: Ascend
def _oom_old(m, line, f):
    f.put(line, "total_gpu_memory_gib", num(m.group(1)), 3)


# --------------------------------------------------------------------------- readiness
# Anything only a serving engine prints: the server's start lines, an offline LLM() run's
# progress bars (it never prints a server line), a request the OpenAI layer failed to
# preprocess, and a request told that the running engine died. (Stats, request and HTTP access lines mean the same; `scan` drops them as noise.)
@rule("Application startup complete", r"Application startup complete")
@rule("Uvicorn running on", r"Uvicorn running on")  # uvicorn starts only after the engine is built
@rule("Available routes are", r"^Available routes are")
@rule("Route: /v1/", r"^Route: /v1/")
@rule("Starting vLLM", r"Starting vLLM (?:API )?server")
@rule("init engine (profile", r"init engine \(profile")
@rule("Processed prompts:", r"^Processed prompts: +\d{1,3}%")
@rule("Generated text: ", r"^Prompt: .{0,2000}?, Generated text: ")  # the offline examples' output
@rule("Throughput: ", r"^Throughput: " + _NUM + r" requests/s")  # benchmark_throughput's result
@rule("Adding requests:", r"^Adding requests: +\d{1,3}%")
@rule("Error in preprocessing prompt inputs", r"Error in preprocessing prompt inputs")
@rule("EngineDeadError", r"EngineDeadError")
# the server turning away requests because its engine died, and the per-step input dump V1 writes
# when a scheduled step fails: both happen only after start-up
@rule("is already dead", r"is already dead, terminating server process")
@rule("Dumping input data", r"Dumping input data for V1 LLM engine")
@rule("Exception in ASGI application", r"Exception in ASGI application")  # uvicorn: a request raised
@rule("Error generating stream", r"\[vllm\] Error generating stream")  # Triton's vLLM backend, per request
# a wrapper that serves the engine says so in its words (Ray Serve: the app is ready, or deployed)
@rule("is ready at", r"Application '[^']{1,200}' is ready at")
@rule("Deployed app", r"Deployed app '[^']{1,200}' successfully")  # raised to requests when a running engine dies
def _ready(m, line, f):
    f.ready = True


def feed(line: LogLine, facts: Facts) -> None:
    msg = line.msg
    for trigger, pattern, handler in RULES:
        if trigger in msg:
            m = pattern.search(msg)
            if m:
                handler(m, line, facts)
