"""Table sections shared by the device and run pages.

- `memory_table`: one row per cell with the startup and memory facts a GPU user plans with
  (model, config, vLLM, TP/PP, max_model_len, status, load/init/spawn->ready seconds, the memory
  breakdown, KV tokens, max concurrency and both `--kv-cache-memory` figures). A failed row
  names its class and one line of evidence, and links to its note.
- `throughput_table`: the probes' throughput and latency, with the workload stated, and the
  capacity at the objectives when a capacity search ran.
- `failure_notes`: one note per failed or inconclusive cell (full evidence, remedy, links).
Rows are the aggregate rows plus `model_link`, `status_link` and `why_link` (where a failed
row's note is), set by the page.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from harness.report.tables import GIB, MISSING, Column, cell, evidence, fixed, gfm, gib, ms, seconds, tokens
from harness.schema import slug

SINGLE_CHUNK = "—¹"
SINGLE_CHUNK_NOTE = (
    "¹ Not measurable: every answer arrived in one streamed chunk, so there is no gap between "
    "tokens to time (TPOT and ITL need at least two chunks)."
)


def why_anchor(row: dict[str, Any]) -> str:
    return "why-" + slug(f"{row['cell_id']}-{row['run_id']}").lower().replace(".", "-")


def _pct(value: Any) -> str:
    return f"{value * 100:.0f}%" if isinstance(value, (int, float)) else MISSING


def _requested_flag(row: dict[str, Any]) -> str:
    value = row.get("kv_cache_memory_recommendation_bytes")
    if not isinstance(value, int):
        return MISSING
    # vLLM writes its advice as `--kv-cache-memory=N`; the option it has is --kv-cache-memory-bytes
    return f"`--kv-cache-memory-bytes {value}` ({gib(value / GIB)} GiB)"


def _full(row: dict[str, Any]) -> str:
    value = row.get("kv_cache_memory_full_gib")
    return f"≈{gib(value)}" if isinstance(value, (int, float)) else MISSING


def failure_cell(row: dict[str, Any]) -> str:
    if row["outcome"] == "inconclusive":
        return f"the log ends before the engine was ready or failed ([why]({row['why_link']}))"
    if row["outcome"] != "failed":
        return MISSING
    line = evidence(row.get("failure_detail"), 100)
    text = f"`{row['failure_class'] or 'other'}`" + (f": {cell(line)}" if line else "")
    return f"{text} ([remedy]({row['why_link']}))"


def _num(key: str, fmt: Callable[[Any], str]) -> Callable[[dict[str, Any]], str]:
    return lambda r: fmt(r.get(key))


MEMORY_COLUMNS = [
    Column("Model", lambda r: r["model_link"]),
    Column("Config", lambda r: cell(r["config"])),
    Column("vLLM", lambda r: cell(r["engine_version"]) or MISSING),
    Column("TP/PP", lambda r: f"{r['tp']}/{r['pp']}"),
    Column("max_model_len (tokens)", _num("max_model_len", tokens), right=True),
    Column("Checkpoint (GiB)", _num("checkpoint_gib", gib), right=True),
    Column("GPU util", _num("gpu_memory_utilization", _pct), right=True),
    Column("Status", lambda r: r["status_link"]),
    Column("Load (s)", _num("load_s", seconds), right=True),
    Column("Init (s)", _num("init_s", seconds), right=True),
    Column("Spawn → ready (s)", _num("spawn_to_ready_s", seconds), right=True),
    Column("Weights (GiB)", _num("weights_gib", gib), right=True),
    Column("Activation (GiB)", _num("activation_gib", gib), right=True),
    Column("Non-torch (GiB)", _num("non_torch_gib", gib), right=True),
    Column("CUDA graph (GiB)", _num("cuda_graph_gib", gib), right=True),
    Column("KV cache (GiB)", _num("kv_cache_gib", gib), right=True),
    Column("KV cache (tokens)", _num("kv_cache_tokens", tokens), right=True),
    Column("Max concurrency (× max_model_len)", _num("max_concurrency", lambda v: fixed(v, 2)), right=True),
    Column("KV cache for the requested share", _requested_flag),
    Column("KV cache for full memory (GiB)", _full, right=True),
    Column("Failure", failure_cell),
]

MEMORY_NOTES = (
    "Memory figures are per GPU, as vLLM logs them (GiB = 2³⁰ bytes); negative CUDA graph or KV cache values are "
    "printed as vLLM logged them. Checkpoint is the model's size on disk. Load is vLLM's \"Model loading took\", "
    'init its "init engine" time, spawn → ready the harness\'s own clock. Max concurrency is how many requests of max_model_len tokens the '
    "KV cache holds. The KV cache flags replace `--gpu-memory-utilization` with the KV size vLLM measured for the "
    "requested share; the full-memory figure is vLLM's second suggestion (all free memory), derived from the same "
    "log line to within its 0.01 GiB rounding. — where the log or the run did not give the figure."
)


def memory_table(rows: list[dict[str, Any]]) -> str:
    return gfm(MEMORY_COLUMNS, rows)


def probed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("best_output_tok_s") is not None or r.get("capacity_users") is not None]


def _per_gpu(row: dict[str, Any]) -> str:
    """Only where a cell spans several GPUs: on one it would repeat the best output column."""
    value, gpus = row.get("best_output_tok_s"), row["tp"] * row["pp"]
    return fixed(value / gpus, 1) if isinstance(value, (int, float)) and gpus > 1 else MISSING


def _latency(key: str) -> Callable[[dict[str, Any]], str]:
    def value(row: dict[str, Any]) -> str:
        if key in ("tpot_ms", "itl_ms") and row.get("single_chunk"):
            return SINGLE_CHUNK
        return ms(row.get(key))

    return value


def _capacity(show_slo: bool) -> Callable[[dict[str, Any]], str]:
    def value(row: dict[str, Any]) -> str:
        users = row.get("capacity_users")
        if not isinstance(users, int):
            return MISSING
        text = f"{users:,}"
        if row.get("capacity_limited_by") == "cap":
            text = f"≥{text} (KV cap)"
        elif row.get("capacity_limited_by") == "budget":
            text = f"≥{text} (time budget)"
        if row["tp"] * row["pp"] > 1:
            text += f", {users / (row['tp'] * row['pp']):,.1f} per GPU"
        return text + (f" at {row['capacity_slo']}" if show_slo and row.get("capacity_slo") else "")

    return value


def throughput_table(rows: list[dict[str, Any]]) -> tuple[str, str | None, list[str]]:
    """The table, the workload when every row shares it (stated above the table instead of in
    a column), and its footnotes."""
    rows = probed(rows)
    workloads = {r.get("workload") for r in rows}
    shared = next(iter(workloads)) if len(workloads) == 1 else None
    slos = {r["capacity_slo"] for r in rows if r.get("capacity_slo")}
    header = "Serves N users within SLO" + (f" ({next(iter(slos))})" if len(slos) == 1 else "")
    columns = [
        Column("Model", lambda r: r["model_link"]),
        Column("Config", lambda r: cell(r["config"])),
        Column("vLLM", lambda r: cell(r["engine_version"]) or MISSING),
        Column("TP/PP", lambda r: f"{r['tp']}/{r['pp']}"),
        *([] if shared else [Column("Workload", lambda r: cell(r.get("workload")) or MISSING)]),
        Column("Best output (tok/s)", _num("best_output_tok_s", lambda v: fixed(v, 1)), right=True),
        Column("At concurrency", lambda r: str(r["best_output_concurrency"] or MISSING), right=True),
        Column("Output per GPU (tok/s)", _per_gpu, right=True),
        Column("TTFT median (ms)", _latency("ttft_ms"), right=True),
        Column("TPOT median (ms)", _latency("tpot_ms"), right=True),
        Column("ITL median (ms)", _latency("itl_ms"), right=True),
        Column("E2EL median (ms)", _latency("e2el_ms"), right=True),
        Column(header, _capacity(len(slos) > 1), right=True),
    ]
    notes = [
        "Best output is the highest output token rate over the probed concurrencies; the latencies are "
        "medians at the lowest probed concurrency (what one user sees)."
    ]
    if any(r.get("capacity_users") is not None for r in rows):
        notes.append(
            "Serves N users: the largest concurrency at which every objective held, measured twice "
            "(≥ N: the search stopped at the KV cache's cap or its time budget, not at an objective)."
        )
    if any(r.get("single_chunk") for r in rows):
        notes.append(SINGLE_CHUNK_NOTE)
    return gfm(columns, rows), shared, notes


def failure_notes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the page's "Why it failed" section lists: full evidence and remedy per cell."""
    out = []
    for row in rows:
        if row["outcome"] not in ("failed", "inconclusive"):
            continue
        out.append(
            {
                "anchor": why_anchor(row),
                "row": row,
                "title": f"{row['model']} ({row['config']})",
                "class": row["failure_class"] if row["outcome"] == "failed" else "inconclusive",
                "evidence": evidence(row.get("failure_detail"), 400),
                "remedy": row.get("remedy")
                if row["outcome"] == "failed"
                else "Nothing to fix from this log: it stops before the engine was ready and shows no error. "
                "Run the cell again, or ingest the full log.",
            }
        )
    return out
