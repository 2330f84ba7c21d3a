"""Aggregation: every record of the run log (results/ and its published copy) -> pandas tables.

`history` has one row per stored record; `latest` keeps the newest record per cell key (the key
covers model+revision, device, config, engine version and how the cell is measured, so each vLLM
version keeps its own row). Runs come from `harness.store.read_runs`, in manifest order, so reused
and not-on-host cells keep their place. Files the run log could not read are kept as `problems`.
Rows hold plain values only (numbers, strings, None); templates and exports read them as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.schema import CellRecord, ProbeResult, RunManifest
from harness.store import Problem, read_runs

GIB = 1024**3


@dataclass
class RunCell:
    """One cell of a run as the run page shows it: a record, or a manifest line without one."""

    cell_id: str
    status: str  # manifest status: ran | reused | not_on_host
    row: dict[str, Any] | None = None
    record: CellRecord | None = None
    reason: str | None = None


@dataclass
class Run:
    run_id: str
    manifest: RunManifest | None
    cells: list[RunCell] = field(default_factory=list)
    interrupted: bool = False  # killed before it finished: its manifest has no finish time
    published: bool = False  # read from the published copy (no engine logs on this machine)


@dataclass
class Results:
    """Everything the reports are built from."""

    roots: list[Path]  # results/ first, then the published copy
    history: pd.DataFrame
    latest: pd.DataFrame
    runs: list[Run]
    problems: list[Problem] = field(default_factory=list)  # files the run log could not read


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def _arg(record: CellRecord, name: str) -> Any:
    return record.cell.config.args.get(name)


def device_of(record: CellRecord) -> tuple[str, float | None]:
    """Display name and total memory (GiB) of the device a cell ran on. The CPU is "cpu", with
    the memory its engine log states it may use; a GPU is the host's device the cell was given
    (NVML's figures for a run, the log's or the caller's for an ingested log)."""
    if record.cell.gpu.lower() == "cpu":
        return "cpu", record.facts.total_gpu_memory_gib if record.facts else None
    gpus = [d for d in record.host.devices if d.kind == "gpu"]
    chosen = [d for d in gpus if d.index in record.device_ids] or gpus
    if chosen:
        return chosen[0].name, chosen[0].memory_total_gib
    return record.cell.gpu, None  # a cell skipped on a host without that GPU


def engine_version(record: CellRecord) -> str | None:
    """The vLLM release the producer recorded, else the one the engine's log states (a
    hand-made venv whose version the harness could not read)."""
    return _first(record.engine_version, record.facts.vllm_version if record.facts else None)


def level_value(level: dict[str, Any], metric: str, stat: str = "median") -> float | None:
    value = level.get(metric)
    if isinstance(value, dict):
        value = value.get(stat)
    return float(value) if isinstance(value, (int, float)) else None


def probe_levels(record: CellRecord) -> list[dict[str, Any]]:
    """Probe levels sorted by concurrency (the probe may store them in any order)."""
    levels = [lv.model_dump() for lv in record.probes.levels] if record.probes else []
    return sorted(levels, key=lambda lv: lv.get("concurrency") or 0)


def workload(probes: ProbeResult | None) -> str | None:
    """The probe's workload in words: prompt and output tokens, requests per level, concurrency."""
    if not probes:
        return None
    profile = probes.profile or probes.client or {}
    levels = [lv.model_dump() for lv in probes.levels]
    parts = []
    if profile.get("input_tokens") and profile.get("output_tokens"):
        parts.append(f"{profile['input_tokens']:,} prompt + {profile['output_tokens']:,} output tokens")
    requests = profile.get("requests") or max((lv.get("requests") or 0 for lv in levels), default=0)
    if requests:
        parts.append(
            f"≥{requests:,} requests per level" if profile.get("requests") else f"≤{requests:,} requests per level"
        )
    conc = sorted({lv["concurrency"] for lv in levels if isinstance(lv.get("concurrency"), int)})
    if conc:
        parts.append("concurrency " + ", ".join(map(str, conc)))
    return "; ".join(parts) or None


def _probe_summary(record: CellRecord) -> dict[str, Any]:
    levels = probe_levels(record)
    best = max(levels, key=lambda lv: lv.get("output_throughput") or 0.0, default=None)
    first = levels[0] if levels else None  # lowest concurrency: the latency a lone user sees
    capacity = (record.probes.capacity if record.probes else None) or {}
    return {
        "workload": workload(record.probes),
        "best_output_tok_s": level_value(best, "output_throughput") if best else None,
        "best_output_concurrency": best.get("concurrency") if best else None,
        "ttft_ms": level_value(first, "ttft_ms") if first else None,
        "tpot_ms": level_value(first, "tpot_ms") if first else None,
        "itl_ms": level_value(first, "itl_ms") if first else None,
        "e2el_ms": level_value(first, "e2el_ms") if first else None,
        # one chunk per answer: no gap between tokens to time, so TPOT/ITL are not measurements
        "single_chunk": first is not None and _single_chunk(first),
        "latency_concurrency": first.get("concurrency") if first else None,
        "capacity_users": capacity.get("concurrency"),
        "capacity_slo": slo_text(capacity.get("slo")),
        "capacity_limited_by": capacity.get("limited_by"),
        "capacity_output_tok_s": capacity.get("output_throughput"),
        "capacity_tok_s_per_user": capacity.get("tokens_per_s_per_user"),
        "capacity_goodput_rps": capacity.get("goodput_rps"),
    }


def capacity_trace(record: CellRecord) -> list[dict[str, Any]]:
    """Every measured level of a capacity search: the frontier plot's points."""
    trace = ((record.probes.capacity if record.probes else None) or {}).get("trace") or []
    return [t for t in trace if isinstance(t, dict)]


def _single_chunk(level: dict[str, Any]) -> bool:
    # No request got a token after its first chunk (TPOT is timed from the first chunk to the
    # last token), so no gap between tokens was there to time: ITL is empty too. The probe
    # writes None; older probes wrote 0.0, which no real TPOT is.
    return level_value(level, "tpot_ms") in (None, 0.0)


def slo_text(slo: Any) -> str | None:
    """Objectives as the header states them: `ttft_p99_ms: 2000` -> "TTFT p99 ≤ 2,000 ms"."""
    if not slo:  # no capacity search (a search always has objectives: probes.profiles)
        return None
    parts = []
    for name, target in sorted(slo.items()):
        metric, _, stat = str(name).removesuffix("_ms").partition("_")
        parts.append(f"{metric.upper()} {stat} ≤ {target:,g} ms")
    return ", ".join(parts)


def _full_kv_gib(facts: Any) -> float | None:
    """vLLM's second `--kv-cache-memory` figure ("to fully utilize gpu memory") differs from the
    first by free memory at startup minus the requested share (both subtract the same non-KV
    use and buffer), so it follows from the line's own GiB figures to within their rounding.
    Only the log's own figures, which are what the engine used; a cut excerpt may lack them."""
    if facts is None or facts.kv_cache_memory_recommendation_bytes is None:
        return None
    free, total, util = facts.free_memory_gib_at_startup, facts.total_gpu_memory_gib, facts.gpu_memory_utilization
    if None in (free, total, util):
        return None
    return facts.kv_cache_memory_recommendation_bytes / GIB + free - util * total


def record_row(path: Path, record: CellRecord) -> dict[str, Any]:
    """The flat view of one record: what tables, insights, diffs and exports use."""
    facts = record.facts
    metrics = record.metrics
    plan, telemetry = record.plan, record.telemetry
    device, device_memory = device_of(record)
    log = (path.parent / record.engine_log) if record.engine_log else None
    log = log if log is not None and log.exists() else None  # a published record has no log here
    fact = (lambda name: getattr(facts, name)) if facts else (lambda name: None)
    tp = _first(_arg(record, "tensor_parallel_size"), 1)
    util = _first(_arg(record, "gpu_memory_utilization"), fact("gpu_memory_utilization"))
    return {
        "run_id": record.run_id,
        "cell_id": record.cell_id,
        "key": record.key,
        "record_path": str(path.absolute()),
        "engine_log_path": str(log.absolute()) if log else None,
        "model": record.cell.model.name,
        "model_source": record.cell.model.source,
        "model_local": record.cell.model.is_local,
        "config": record.cell.config.name,
        "engine": record.cell.engine.name,
        "engine_version": engine_version(record),
        "gpu": record.cell.gpu,
        "device": device,
        "device_memory_gib": device_memory,
        "host": record.host.hostname,
        "ingested": record.cell.engine.python == "ingested",
        "log_source": record.log_source,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "outcome": record.outcome,
        # the producer's judgement (the runner's or ingest's, each from the log's class): a cell
        # that answered is no failure, whatever else its log shows
        "failure_class": record.failure_class,
        "failure_detail": record.failure_detail,
        "remedy": record.remedy,
        "skip_reason": record.skip_reason,
        "validation_passed": record.validation.passed if record.validation else None,
        "tp": int(tp),
        "pp": int(_first(_arg(record, "pipeline_parallel_size"), 1)),
        # the log's "Maximum concurrency for N tokens per request" states it when the args do not
        "max_model_len": _first(_arg(record, "max_model_len"), fact("max_concurrency_tokens_per_request")),
        "gpu_memory_utilization": util,
        "checkpoint_gib": record.fetch.bytes / GIB if record.fetch and record.fetch.bytes else None,
        "spawn_to_ready_s": record.timings.spawn_to_ready_s,
        "load_s": fact("load_seconds"),
        "init_s": fact("init_engine_seconds"),
        "total_s": record.timings.total_s,
        "weights_gib": fact("weights_gib"),
        "activation_gib": fact("activation_peak_gib"),
        "non_torch_gib": fact("non_torch_gib"),
        "cuda_graph_gib": fact("cuda_graph_gib"),
        "kv_cache_gib": fact("kv_cache_gib"),
        "kv_cache_tokens": _first(fact("kv_cache_tokens"), metrics.kv_cache_size_tokens if metrics else None),
        "num_gpu_blocks": _first(fact("num_gpu_blocks"), metrics.num_gpu_blocks if metrics else None),
        "max_concurrency": _first(fact("max_concurrency"), metrics.kv_cache_max_concurrency if metrics else None),
        "kv_cache_memory_recommendation_bytes": fact("kv_cache_memory_recommendation_bytes"),
        "kv_cache_memory_full_gib": _full_kv_gib(facts),
        "estimated_max_model_len": fact("estimated_max_model_len"),
        "free_memory_gib_at_startup": fact("free_memory_gib_at_startup"),
        "plan_fits": plan.fits if plan else None,
        "plan_kv_cache_tokens": plan.kv_cache_tokens if plan else None,
        # The sampler's independent figures (harness.run.telemetry), beside vLLM's own claims.
        "peak_rss_gib": (telemetry.process or {}).get("rss_peak_gib") if telemetry else None,
        "gpu_peak_memory_gib": telemetry.gpu_memory_used_peak_gib if telemetry else None,
        "energy_j": telemetry.energy_j if telemetry else None,
        **_probe_summary(record),
    }


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    # object dtype keeps ints as ints and None as None (not NaN): templates, exports and
    # diffs then see "missing" one way and token counts stay integers
    return pd.DataFrame(rows, dtype=object)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    order = df.assign(_m=df["model"].str.lower(), _e=df["engine_version"].fillna(""))
    # a sort on several columns is always stable in pandas (lexsort): equal rows keep their order
    order = order.sort_values(["device", "_m", "config", "_e", "started_at", "run_id"])
    return order.drop(columns=["_m", "_e"]).reset_index(drop=True)


def latest_per_key(history: pd.DataFrame) -> pd.DataFrame:
    """Newest record per cell key, by start time (run id breaks ties: it is sortable)."""
    if history.empty:
        return history
    newest = history.sort_values(["started_at", "run_id"]).groupby("key").tail(1)
    return _sorted(newest)


def load(roots: Path | list[Path]) -> Results:
    """Read the run log once: history and latest tables, and every run in manifest order.
    `roots`: results/ first, then the published copy (a run in both is read from results/)."""
    roots = [Path(r) for r in ([roots] if isinstance(roots, (str, Path)) else roots)]
    log = read_runs(roots)
    rows: dict[Path, dict[str, Any]] = {}
    runs = []
    for logged in log.runs:
        cells = []
        for cell in logged.cells:
            row = None
            if cell.record is not None and cell.path is not None:
                if cell.path not in rows:  # a reused cell shares its original's row
                    rows[cell.path] = record_row(cell.path, cell.record)
                row = rows[cell.path]
            cells.append(RunCell(cell.cell_id, cell.status, row, cell.record, cell.reason))
        runs.append(Run(logged.run_id, logged.manifest, cells, logged.interrupted, logged.published))
    history = _sorted(_frame(list(rows.values()))) if rows else pd.DataFrame()
    return Results(roots=roots, history=history, latest=latest_per_key(history), runs=runs, problems=log.problems)


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
