"""Run-to-run comparison: regressions and improvements between two runs (the nightly CI gate).

Pure: takes two aggregated runs (`harness.report.aggregate.Run`) and returns `Change`s; reading
results/ and printing belong to `harness.commands.diff`. Cells are matched by cell id (model,
device selector, config, engine install), so a vLLM upgrade compares like with like.

Tracked, with the thresholds a move must pass to count (relative to run A, and at least the
absolute floor, so noise on tiny values does not flip the gate):

| metric | better | relative | floor |
|---|---|---|---|
| status (ok / failed / skipped) | ok | any flip | |
| validation (passed) | passed | any flip | |
| cell present in run B | present | missing | |
| KV cache tokens, max concurrency | higher | 5 % | 1 token / 0.01 × |
| spawn → ready, vLLM load time | lower | 20 % | 5 s / 2 s |
| output token throughput (per concurrency level) | higher | 10 % | 1 tok/s |
| TTFT median / p99 | lower | 15 % / 25 % | 5 ms / 10 ms |
| TPOT median, ITL median | lower | 10 % | 1 ms |
| ITL p99 | lower | 25 % | 5 ms |
| E2EL median | lower | 15 % | 10 ms |
| failed requests (per level) | lower | any increase | 1 request |

A cell run B did not attempt because its host lacks the device (`not_on_host`) is reported as
information, not as a regression.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from harness.report.aggregate import Run, RunCell, level_value, probe_levels

NOT_ATTEMPTED = {"not_on_host"}


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    higher_is_better: bool
    relative: float  # fraction of run A's value
    floor: float  # absolute move, in `unit`, below which nothing is reported
    per_level: bool  # compared at each probe concurrency level present in both runs
    get: Callable[[dict[str, Any]], Any]  # a row (cell) or a probe level -> value


def _row(column: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: row.get(column)


def _level(metric: str, stat: str = "median") -> Callable[[dict[str, Any]], Any]:
    return lambda level: level_value(level, metric, stat)


METRICS: tuple[Metric, ...] = (
    Metric("kv_cache_tokens", "tokens", True, 0.05, 1, False, _row("kv_cache_tokens")),
    Metric("max_concurrency", "×", True, 0.05, 0.01, False, _row("max_concurrency")),
    Metric("spawn_to_ready_s", "s", False, 0.20, 5.0, False, _row("spawn_to_ready_s")),
    Metric("load_s", "s", False, 0.20, 2.0, False, _row("load_s")),
    Metric("output_throughput", "tok/s", True, 0.10, 1.0, True, lambda lv: level_value(lv, "output_throughput")),
    Metric("ttft_median_ms", "ms", False, 0.15, 5.0, True, _level("ttft_ms")),
    Metric("ttft_p99_ms", "ms", False, 0.25, 10.0, True, _level("ttft_ms", "p99")),
    Metric("tpot_median_ms", "ms", False, 0.10, 1.0, True, _level("tpot_ms")),
    Metric("itl_median_ms", "ms", False, 0.10, 1.0, True, _level("itl_ms")),
    Metric("itl_p99_ms", "ms", False, 0.25, 5.0, True, _level("itl_ms", "p99")),
    Metric("e2el_median_ms", "ms", False, 0.15, 10.0, True, _level("e2el_ms")),
    Metric("failed_requests", "requests", False, 0.0, 1.0, True, lambda lv: level_value(lv, "failed")),
)


@dataclass(frozen=True)
class Change:
    cell_id: str
    kind: str  # "regression" | "improvement" | "info"
    metric: str
    before: Any
    after: Any
    unit: str = ""
    concurrency: int | None = None
    change_pct: float | None = None
    note: str = ""


@dataclass
class Diff:
    run_a: str
    run_b: str
    changes: list[Change]
    compared: int  # cells present in both runs

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.kind == "regression"]

    @property
    def improvements(self) -> list[Change]:
        return [c for c in self.changes if c.kind == "improvement"]

    @property
    def info(self) -> list[Change]:
        return [c for c in self.changes if c.kind == "info"]

    def to_json(self) -> dict[str, Any]:
        return {
            "run_a": self.run_a,
            "run_b": self.run_b,
            "compared_cells": self.compared,
            "regressions": [asdict(c) for c in self.regressions],
            "improvements": [asdict(c) for c in self.improvements],
            "info": [asdict(c) for c in self.info],
            "thresholds": [
                {"metric": m.name, "unit": m.unit, "better": "higher" if m.higher_is_better else "lower",
                 "relative": m.relative, "floor": m.floor, "per_concurrency_level": m.per_level}
                for m in METRICS
            ],
        }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value else None


def compare_value(metric: Metric, cell_id: str, before: Any, after: Any, concurrency: int | None = None) -> Change | None:
    a, b = _number(before), _number(after)
    if a is None or b is None:
        return None  # a metric one run did not measure is not a move
    delta = b - a
    if abs(delta) < metric.floor or abs(delta) <= metric.relative * abs(a):
        return None
    better = delta > 0 if metric.higher_is_better else delta < 0
    return Change(cell_id, "improvement" if better else "regression", metric.name, before, after, metric.unit,
                  concurrency, round(100 * delta / abs(a), 1) if a else None)


def _status(cell_id: str, a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    changes = []
    if a["outcome"] != b["outcome"]:
        kind = "improvement" if b["outcome"] == "ok" else "regression" if a["outcome"] == "ok" else "info"
        changes.append(Change(cell_id, kind, "status", a["outcome"], b["outcome"],
                              note=b["failure_class"] or b["skip_reason"] or ""))
    elif a["outcome"] == "failed" and a["failure_class"] != b["failure_class"]:
        changes.append(Change(cell_id, "info", "failure_class", a["failure_class"], b["failure_class"]))
    va, vb = a["validation_passed"], b["validation_passed"]
    if isinstance(va, bool) and isinstance(vb, bool) and va != vb:
        changes.append(Change(cell_id, "improvement" if vb else "regression", "validation", va, vb))
    return changes


def compare_cell(cell_id: str, a: RunCell, b: RunCell) -> list[Change]:
    assert a.row is not None and b.row is not None
    changes = _status(cell_id, a.row, b.row)
    levels_a = {lv.get("concurrency"): lv for lv in probe_levels(a.record)} if a.record else {}
    levels_b = {lv.get("concurrency"): lv for lv in probe_levels(b.record)} if b.record else {}
    for metric in METRICS:
        if not metric.per_level:
            change = compare_value(metric, cell_id, metric.get(a.row), metric.get(b.row))
            changes.extend([change] if change else [])
            continue
        for conc in sorted(set(levels_a) & set(levels_b), key=lambda c: c or 0):
            change = compare_value(metric, cell_id, metric.get(levels_a[conc]), metric.get(levels_b[conc]), conc)
            changes.extend([change] if change else [])
    return changes


def diff_runs(run_a: Run, run_b: Run) -> Diff:
    """Every change between run A (before) and run B (after), cells in A's order then B's."""
    cells_a = {c.cell_id: c for c in run_a.cells}
    cells_b = {c.cell_id: c for c in run_b.cells}
    changes: list[Change] = []
    compared = 0
    for cell_id, a in cells_a.items():
        b = cells_b.get(cell_id)
        if a.row is None:
            continue  # not attempted in A: nothing to regress from
        if b is None or (b.row is None and b.status not in NOT_ATTEMPTED):
            changes.append(Change(cell_id, "regression", "cell", "present", "missing",
                                  note="run B has no record for this cell"))
        elif b.row is None:
            changes.append(Change(cell_id, "info", "cell", "present", b.status, note=b.reason or ""))
        else:
            compared += 1
            changes.extend(compare_cell(cell_id, a, b))
    for cell_id, b in cells_b.items():
        if cell_id not in cells_a and b.row is not None:
            changes.append(Change(cell_id, "info", "cell", "absent", b.row["outcome"], note="new in run B"))
    return Diff(run_a.run_id, run_b.run_id, changes, compared)
