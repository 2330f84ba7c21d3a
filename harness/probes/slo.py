"""Service-level objectives: their names, how they are parsed, and whether a level meets them.

An objective is `<metric>_<stat>_ms: target`, e.g. `ttft_p99_ms: 2000`: the level's statistic
of that latency (the probe's `vllm bench serve` definitions) must not exceed the target.
Metrics are the ones `vllm bench serve --goodput` scores per request (ttft, tpot, e2el); stats
are mean, p50 (= median), p90, p95, p99. The `_ms` suffix may be left out (`ttft_p99=2000` on
the command line).

Goodput counts requests whose own latencies are within the targets; with several objectives
on one metric the strictest target is the per-request threshold.
"""

from __future__ import annotations

import math
from typing import Any

METRICS = ("ttft", "tpot", "e2el")
STATS = {"mean": "mean", "p50": "median", "median": "median", "p90": "p90", "p95": "p95", "p99": "p99"}
HELP = "objectives are <ttft|tpot|e2el>_<mean|p50|p90|p95|p99>[_ms], in milliseconds"


def objective_name(name: str) -> str:
    """Canonical `metric_stat_ms` for a user's spelling; ValueError names the allowed ones."""
    parts = name.strip().lower().removesuffix("_ms").split("_")
    if len(parts) != 2 or parts[0] not in METRICS or parts[1] not in STATS:
        raise ValueError(f"unknown objective {name!r}; {HELP}")
    stat = "p50" if parts[1] == "median" else parts[1]
    return f"{parts[0]}_{stat}_ms"


def normalize(objectives: dict[str, Any]) -> dict[str, float]:
    """Canonical names and finite positive targets, or ValueError saying which is wrong."""
    if not objectives:
        raise ValueError(f"no objectives given; {HELP}")
    out: dict[str, float] = {}
    for name, target in objectives.items():
        key = objective_name(str(name))
        if isinstance(target, bool) or not isinstance(target, int | float):
            raise ValueError(f"objective {name!r}: target must be a number of ms, got {target!r}")
        if not math.isfinite(target) or target <= 0:
            raise ValueError(f"objective {name!r}: target must be > 0 ms, got {target!r}")
        if key in out:
            raise ValueError(f"objective {name!r} is given twice")
        out[key] = float(target)
    return out


def parse_cli(text: str) -> dict[str, float]:
    """`ttft_p99=2000,tpot_p99=100` -> canonical objectives; ValueError on any bad item."""
    items: dict[str, Any] = {}
    for item in text.replace(",", " ").split():
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad objective {item!r}; use e.g. ttft_p99=2000")
        try:
            items[name] = float(value)
        except ValueError:
            raise ValueError(f"objective {name!r}: target must be a number of ms, got {value!r}") from None
    return normalize(items)


def per_request_thresholds(slo: dict[str, float]) -> dict[str, float]:
    """{metric: ms} for goodput: the strictest target per metric."""
    out: dict[str, float] = {}
    for key, target in slo.items():
        metric = key.split("_")[0]
        out[metric] = min(target, out.get(metric, math.inf))
    return out


def observe(level: dict[str, Any], slo: dict[str, float]) -> dict[str, float | None]:
    """Each objective's measured value at a level (None when the level could not measure it)."""
    out = {}
    for key in slo:
        metric, stat, _ = key.split("_")
        out[key] = (level.get(f"{metric}_ms") or {}).get(STATS[stat])
    return out


def misses(observed: dict[str, float | None], slo: dict[str, float]) -> list[str]:
    """Human-readable objectives not met, e.g. `ttft_p99_ms 340.2 > 320`."""
    out = []
    for key, target in slo.items():
        value = observed.get(key)
        if value is None:
            out.append(f"{key} not measured")
        elif value > target:
            out.append(f"{key} {value:.1f} > {target:g}")
    return out
