"""Version comparison: how each model x device x config moved from one vLLM release to the next.

Pure: reads the aggregated `latest` table (`harness.report.aggregate`, one row per cell key, and
the key holds the engine version) and returns plain rows for the templates. A group that ran
under more than one version gets one table, a row per version oldest first; every value that
moved from the previous version beyond its noise band (`NOISE`, the same rule as `harness diff`)
carries the move's size. `largest_changes` ranks those moves across groups for the insights page.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pandas as pd
from packaging.version import InvalidVersion, Version

from harness.diff import METRICS, Metric, compare_value


def _metric(column: str, unit: str, higher_is_better: bool, relative: float, floor: float) -> Metric:
    return Metric(column, unit, higher_is_better, relative, floor, False, False, column)


# One row per release, no history per release: each move is judged by the gate's threshold alone.
_DIFF = {m.name: replace(m, noisy=False) for m in METRICS}
# (column, header, unit, noise band): the diff thresholds where `harness diff` has one; memory
# moves under 5 % (and under 0.01 GiB) are noise, like the KV cache's.
COLUMNS: tuple[tuple[str, str, Metric], ...] = (
    ("spawn_to_ready_s", "Spawn→ready (s)", _DIFF["spawn_to_ready_s"]),
    ("load_s", "Load (s)", _DIFF["load_s"]),
    ("weights_gib", "Weights (GiB)", _metric("weights_gib", "GiB", False, 0.05, 0.01)),
    ("activation_gib", "Activation (GiB)", _metric("activation_gib", "GiB", False, 0.05, 0.01)),
    ("non_torch_gib", "Non-torch (GiB)", _metric("non_torch_gib", "GiB", False, 0.05, 0.01)),
    ("cuda_graph_gib", "CUDA graph (GiB)", _metric("cuda_graph_gib", "GiB", False, 0.05, 0.01)),
    ("kv_cache_gib", "KV cache (GiB)", _metric("kv_cache_gib", "GiB", True, 0.05, 0.01)),
    ("kv_cache_tokens", "KV cache (tokens)", _DIFF["kv_cache_tokens"]),
    ("max_concurrency", "Max concurrency (×)", _DIFF["max_concurrency"]),
    (
        "best_output_tok_s",
        "Best output (tok/s)",
        _metric(
            "best_output_tok_s", "tok/s", True, _DIFF["output_throughput"].relative, _DIFF["output_throughput"].floor
        ),
    ),
)
GROUP = ("model", "device", "config")


def _version_key(text: Any) -> tuple:
    try:
        return (0, Version(str(text)))
    except InvalidVersion:
        return (1, str(text))


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and value != value else value


def comparisons(latest: pd.DataFrame) -> list[dict[str, Any]]:
    """One entry per model x device x config run under more than one vLLM version:
    {model, device, config, rows: [{version, outcome, failure_class, run_id, cell_id,
    status_change, values: {column: {value, change_pct, kind}}}]}."""
    if latest.empty:
        return []
    known = latest[latest["engine_version"].notna()]
    out = []
    for (model, device, config), group in known.groupby(list(GROUP), sort=True):
        # one row per version: the newest record when two hosts or revisions ran the same one
        newest = group.sort_values(["started_at", "run_id"], kind="stable").groupby("engine_version").tail(1)
        if len(newest) < 2:
            continue
        records = sorted(newest.to_dict("records"), key=lambda r: _version_key(r["engine_version"]))
        rows: list[dict[str, Any]] = []
        previous: dict[str, Any] | None = None
        for row in records:
            values = {}
            for column, _, metric in COLUMNS:
                value = _plain(row.get(column))
                change = (
                    compare_value(metric, row["cell_id"], previous.get(column), value) if previous is not None else None
                )
                values[column] = {
                    "value": value,
                    "change_pct": change.change_pct if change else None,
                    "kind": change.kind if change else None,
                }
            flipped = previous is not None and previous["outcome"] != row["outcome"]
            rows.append(
                {
                    "version": str(row["engine_version"]),
                    "outcome": row["outcome"],
                    "failure_class": row.get("failure_class"),
                    "run_id": row["run_id"],
                    "cell_id": row["cell_id"],
                    "status_change": f"{previous['outcome']} → {row['outcome']}"
                    if previous is not None and flipped
                    else None,
                    "values": values,
                }
            )
            previous = row
        out.append({"model": model, "device": device, "config": config, "rows": rows})
    return out


def largest_changes(latest: pd.DataFrame, limit: int = 10) -> list[dict[str, Any]]:
    """Version-to-version moves beyond the noise band, status flips first, then by size."""
    moves = []
    headers = {column: header for column, header, _ in COLUMNS}
    for group in comparisons(latest):
        for before, after in zip(group["rows"], group["rows"][1:]):
            base = {
                "model": group["model"],
                "device": group["device"],
                "config": group["config"],
                "from": before["version"],
                "to": after["version"],
            }
            if after["status_change"]:
                moves.append(
                    {
                        **base,
                        "metric": "status",
                        "before": before["outcome"],
                        "after": after["outcome"],
                        "change_pct": None,
                        "kind": "regression" if before["outcome"] == "ok" else "improvement",
                    }
                )
            for column, cell in after["values"].items():
                if cell["kind"]:
                    moves.append(
                        {
                            **base,
                            "metric": headers[column],
                            "before": before["values"][column]["value"],
                            "after": cell["value"],
                            "change_pct": cell["change_pct"],
                            "kind": cell["kind"],
                        }
                    )
    moves.sort(key=lambda m: (m["metric"] != "status", -abs(m["change_pct"] or 0.0)))
    return moves[:limit]
