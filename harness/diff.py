"""Run-to-run comparison: the regression gate between run A (before) and run B (after).

Pure: takes aggregated runs (`harness.report.aggregate.Run`) and returns a `Diff`; reading the run
log and printing belong to `harness.commands.diff`. Cells are matched by cell id (model, device
selector, config, engine install), so a vLLM upgrade compares like with like.

Two kinds of metric, judged differently:

- **Deterministic facts** (status, validation, KV cache tokens and blocks, max concurrency, and the
  memory breakdown: weights, activation, non-torch, CUDA graph, KV GiB) do not move between two
  runs of the same cell unless something changed, so they are compared tightly: any move beyond
  the rounding of vLLM's log (the larger of a relative and an absolute tolerance) counts.
- **Timings and throughput** (spawn → ready, load, and per probe level: output tokens/s, TTFT,
  TPOT, ITL, E2EL) drift with the machine (±10-15 % between runs on a shared VM). They are judged
  against the cell's own history, in the style of pyperf and asv: the runs of the same cell key
  (same host, same measurement) up to run A give a noise band, median ± max(3 × MAD·1.4826, the
  metric's minimum relative band); run B's value is flagged only outside it, and the change states
  both values and the band. With fewer than `MIN_HISTORY` runs the band is unknown: a large move
  is shown as information, never as a regression.

Signs are always run B relative to run A: `change_pct` = (B − A) / |A| × 100.
A cell run B did not attempt (its host lacks the device) is information, not a regression.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from harness.report.aggregate import Run, RunCell, level_value, probe_levels

NOT_ATTEMPTED = {"not_on_host"}
MIN_HISTORY = 3  # runs of a cell (run A included) before its noise band is trusted
MAD_K = 3.0  # band half-width in robust standard deviations
HISTORY_RUNS = 10  # the newest runs of a cell that make its band

Kind = Literal["regression", "improvement", "info"]


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    higher_is_better: bool
    relative: float  # deterministic: tolerance; noisy: the band's minimum half-width, of the centre
    floor: float  # absolute move, in `unit`, below which nothing is reported
    noisy: bool  # judged against the cell's history (True) or tightly (False)
    per_level: bool  # compared at each probe concurrency level present in both runs
    source: str  # the report row's column, or (per level) the probe level's metric
    stat: str = "median"  # of a per-level metric that the probe stores as a distribution

    def get(self, data: dict[str, Any]) -> Any:
        """The value in a report row, or (per level) in one probe level."""
        # Read when called, not bound at import: a mutation tool can then switch this code.
        return level_value(data, self.source, self.stat) if self.per_level else data.get(self.source)


METRICS: tuple[Metric, ...] = (
    # deterministic: vLLM prints GiB with 2 decimals, hence the 0.02 GiB floor
    Metric("kv_cache_tokens", "tokens", True, 0.005, 1, False, False, "kv_cache_tokens"),
    Metric("num_gpu_blocks", "blocks", True, 0.005, 1, False, False, "num_gpu_blocks"),
    Metric("max_concurrency", "×", True, 0.005, 0.01, False, False, "max_concurrency"),
    Metric("weights_gib", "GiB", False, 0.01, 0.02, False, False, "weights_gib"),
    Metric("activation_gib", "GiB", False, 0.01, 0.02, False, False, "activation_gib"),
    Metric("non_torch_gib", "GiB", False, 0.01, 0.02, False, False, "non_torch_gib"),
    Metric("cuda_graph_gib", "GiB", False, 0.01, 0.02, False, False, "cuda_graph_gib"),
    Metric("kv_cache_gib", "GiB", True, 0.01, 0.02, False, False, "kv_cache_gib"),
    Metric("failed_requests", "requests", False, 0.0, 1.0, False, True, "failed"),
    # noisy: judged against the cell's own history
    Metric("spawn_to_ready_s", "s", False, 0.10, 2.0, True, False, "spawn_to_ready_s"),
    Metric("load_s", "s", False, 0.10, 1.0, True, False, "load_s"),
    Metric("output_throughput", "tok/s", True, 0.05, 1.0, True, True, "output_throughput"),
    Metric("ttft_median_ms", "ms", False, 0.05, 2.0, True, True, "ttft_ms"),
    Metric("ttft_p99_ms", "ms", False, 0.10, 5.0, True, True, "ttft_ms", "p99"),
    Metric("tpot_median_ms", "ms", False, 0.05, 0.5, True, True, "tpot_ms"),
    Metric("itl_median_ms", "ms", False, 0.05, 0.5, True, True, "itl_ms"),
    Metric("itl_p99_ms", "ms", False, 0.10, 2.0, True, True, "itl_ms", "p99"),
    Metric("e2el_median_ms", "ms", False, 0.05, 5.0, True, True, "e2el_ms"),
    # users served within the SLO (a capacity search): measured under load, so judged by history
    Metric("capacity", "users", True, 0.10, 1.0, True, False, "capacity_users"),
)
# A noisy metric with too little history is shown (as info) only beyond this relative move.
UNJUDGED_SHOWN_BEYOND = 0.25


@dataclass(frozen=True)
class Band:
    """The noise band of a metric from the cell's history: centre ± half."""

    low: float
    high: float
    samples: int

    def __str__(self) -> str:
        # 4 digits, whole numbers from 1,000 up ("12,345", never "1.234e+04")
        low, high = (f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}" for v in (self.low, self.high))
        return f"{low}..{high} from {self.samples} runs"


@dataclass(frozen=True)
class Change:
    cell_id: str
    kind: Kind
    metric: str
    before: Any
    after: Any
    unit: str = ""
    concurrency: int | None = None
    change_pct: float | None = None
    note: str = ""
    band: Band | None = None  # noisy metrics judged against history
    request_rate: float | None = None  # a rate sweep's level: the requests/s it offered


@dataclass
class CellVerdict:
    """One line per cell: what became of it from run A to run B."""

    cell_id: str
    verdict: Literal["regressed", "improved", "changed", "unchanged", "missing", "new", "not attempted"]
    changes: list[Change] = field(default_factory=list)

    @property
    def summary(self) -> str:
        worst = [c for c in self.changes if c.kind == "regression"] or self.changes
        shown = ", ".join(describe(c) for c in worst[:3]) + (f" (+{len(worst) - 3} more)" if len(worst) > 3 else "")
        return f"{self.cell_id}: {self.verdict}" + (f" — {shown}" if shown else "")


@dataclass
class Diff:
    run_a: str
    run_b: str
    cells: list[CellVerdict]
    compared: int  # cells with a record in both runs

    @property
    def changes(self) -> list[Change]:
        return [c for cell in self.cells for c in cell.changes]

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
        def change(c: Change) -> dict[str, Any]:
            out = asdict(c)
            out["band"] = None if c.band is None else asdict(c.band)
            return out

        return {
            "run_a": self.run_a,
            "run_b": self.run_b,
            "compared_cells": self.compared,
            "cells": [{"cell_id": v.cell_id, "verdict": v.verdict, "summary": v.summary} for v in self.cells],
            "regressions": [change(c) for c in self.regressions],
            "improvements": [change(c) for c in self.improvements],
            "info": [change(c) for c in self.info],
            "rules": {"min_history": MIN_HISTORY, "mad_k": MAD_K, "history_runs": HISTORY_RUNS},
            "metrics": [
                {
                    "metric": m.name,
                    "unit": m.unit,
                    "better": "higher" if m.higher_is_better else "lower",
                    "judged": "history band" if m.noisy else "tight",
                    "relative": m.relative,
                    "floor": m.floor,
                    "per_concurrency_level": m.per_level,
                }
                for m in METRICS
            ],
        }


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    return float(value) if ok else None


def _fmt(value: Any, unit: str) -> str:
    number = _number(value)
    if number is None:
        return str(value)
    # whole numbers from 100 up (counts, ms, tok/s: "1,234", never "1.23e+03"), else 3 digits
    text = f"{number:,.0f}" if abs(number) >= 100 else f"{number:.2f}" if unit == "GiB" else f"{number:.3g}"
    return f"{text} {unit}".strip()


def describe(c: Change) -> str:
    """`metric @N: before → after (+x.x %)`, with the band where history judged it."""
    where = f" @{c.concurrency}" if c.concurrency is not None else ""
    where += f" @{c.request_rate:g} req/s" if c.request_rate is not None else ""
    if c.metric in ("status", "cell"):  # their note says why, in brackets
        return f"{c.metric}: {c.before} → {c.after}" + (f" ({c.note})" if c.note else "")
    pct = f" ({c.change_pct:+.1f} %)" if c.change_pct is not None else ""
    band = f", band {c.band}" if c.band else ""
    note = f"; {c.note}" if c.note else ""
    return f"{c.metric}{where}: {_fmt(c.before, c.unit)} → {_fmt(c.after, c.unit)}{pct}{band}{note}"


def band_of(metric: Metric, history: list[float]) -> Band | None:
    """Noise band from the cell's own history (run A included); None while history is too short."""
    if len(history) < MIN_HISTORY:
        return None
    centre = statistics.median(history)
    mad = statistics.median(abs(v - centre) for v in history) * 1.4826
    half = max(MAD_K * mad, metric.relative * abs(centre), metric.floor)
    return Band(centre - half, centre + half, len(history))


def compare_value(
    metric: Metric,
    cell_id: str,
    before: Any,
    after: Any,
    concurrency: int | None = None,
    history: list[float] | None = None,
    request_rate: float | None = None,
) -> Change | None:
    a, b = _number(before), _number(after)
    if a is None or b is None:
        return None  # a metric one run did not measure is not a move
    delta = b - a
    pct = round(100 * delta / abs(a), 1) if a else None
    if not metric.noisy:
        if abs(delta) < metric.floor or abs(delta) <= metric.relative * abs(a):
            return None
        return Change(
            cell_id,
            "improvement" if (delta > 0) == metric.higher_is_better else "regression",
            metric.name,
            before,
            after,
            metric.unit,
            concurrency,
            pct,
            request_rate=request_rate,
        )
    band = band_of(metric, history or [])
    if band is None:
        if abs(delta) < metric.floor or abs(delta) <= UNJUDGED_SHOWN_BEYOND * abs(a):
            return None
        return Change(
            cell_id,
            "info",
            metric.name,
            before,
            after,
            metric.unit,
            concurrency,
            pct,
            note=f"not judged: {len(history or [])} of {MIN_HISTORY} runs of history for a noise band",
            request_rate=request_rate,
        )
    if band.low <= b <= band.high:
        return None
    # The side of the band B fell on says which way the cell moved: run A may itself lie off
    # the band (a slow night), and B, though better than A, be worse than the history.
    return Change(
        cell_id,
        "improvement" if (b > band.high) == metric.higher_is_better else "regression",
        metric.name,
        before,
        after,
        metric.unit,
        concurrency,
        pct,
        band=band,
        request_rate=request_rate,
    )


def _status(cell_id: str, a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    changes = []
    if a["outcome"] != b["outcome"]:
        kind: Kind = "improvement" if b["outcome"] == "ok" else "regression" if a["outcome"] == "ok" else "info"
        changes.append(
            Change(
                cell_id, kind, "status", a["outcome"], b["outcome"], note=b["failure_class"] or b["skip_reason"] or ""
            )
        )
    elif a["outcome"] == "failed" and a["failure_class"] != b["failure_class"]:
        changes.append(Change(cell_id, "info", "failure_class", a["failure_class"], b["failure_class"]))
    va, vb = a["validation_passed"], b["validation_passed"]
    if isinstance(va, bool) and isinstance(vb, bool) and va != vb:
        changes.append(Change(cell_id, "improvement" if vb else "regression", "validation", va, vb))
    return changes


Level = tuple[int | None, float | None]  # (concurrency, request rate): a probe level's identity


def level_key(level: dict[str, Any]) -> Level:
    """A probe level's identity: its concurrency and, in a rate sweep (every level under one
    concurrency cap), the request rate offered."""
    return level.get("concurrency"), level.get("request_rate")


def level_order(key: Level) -> tuple[int, float]:
    return key[0] or 0, key[1] or 0.0


def _levels(cell: RunCell) -> dict[Level, dict[str, Any]]:
    return {level_key(lv): lv for lv in probe_levels(cell.record)} if cell.record else {}


def _history_values(metric: Metric, history: list[RunCell], level: Level | None) -> list[float]:
    values = []
    for cell in history:
        source = _levels(cell).get(level) if level else cell.row
        value = _number(metric.get(source)) if source else None
        if value is not None:
            values.append(value)
    return values


def compare_cell(cell_id: str, a: RunCell, b: RunCell, history: list[RunCell]) -> list[Change]:
    """Every change of one cell; `history`: the cell's earlier records up to and including A's."""
    assert a.row is not None and b.row is not None
    changes = _status(cell_id, a.row, b.row)
    levels_a, levels_b = _levels(a), _levels(b)
    for metric in METRICS:
        if not metric.per_level:
            change = compare_value(
                metric, cell_id, metric.get(a.row), metric.get(b.row), history=_history_values(metric, history, None)
            )
            changes.extend([change] if change else [])
            continue
        for level in sorted(set(levels_a) & set(levels_b), key=level_order):
            change = compare_value(
                metric,
                cell_id,
                metric.get(levels_a[level]),
                metric.get(levels_b[level]),
                level[0],
                history=_history_values(metric, history, level),
                request_rate=level[1],
            )
            changes.extend([change] if change else [])
    return changes


def cell_history(runs: list[Run], a: RunCell, run_a: str, run_b: str) -> list[RunCell]:
    """The cell's records with A's key (same measurement, same host) in the newest `HISTORY_RUNS`
    runs up to run A, run B left out; each record once (a reused cell repeats its original)."""
    assert a.row is not None
    key, host = a.row["key"], a.row["host"]
    seen, out = set(), []
    for run in runs:
        if run.run_id > run_a or run.run_id == run_b:
            continue
        for cell in run.cells:
            row = cell.row
            if row and row["key"] == key and row["host"] == host and row["record_path"] not in seen:
                seen.add(row["record_path"])
                out.append(cell)
    if a.row["record_path"] not in seen:
        out.append(a)
    return out[-HISTORY_RUNS:]


def _verdict(changes: list[Change]) -> str:
    kinds = {c.kind for c in changes}
    return (
        "regressed"
        if "regression" in kinds
        else "improved"
        if "improvement" in kinds
        else "changed"
        if kinds
        else "unchanged"
    )


def diff_runs(run_a: Run, run_b: Run, history: list[Run] | None = None) -> Diff:
    """Every cell of run A against run B, then cells new in B. `history`: all runs known (oldest
    first), for the noise bands of timing metrics; without it only run A is history."""
    cells_a = {c.cell_id: c for c in run_a.cells}
    cells_b = {c.cell_id: c for c in run_b.cells}
    verdicts: list[CellVerdict] = []
    compared = 0
    for cell_id, a in cells_a.items():
        b = cells_b.get(cell_id)
        if a.row is None:
            continue  # not attempted in A: nothing to regress from
        if b is None or (b.row is None and b.status not in NOT_ATTEMPTED):
            verdicts.append(
                CellVerdict(
                    cell_id,
                    "missing",
                    [
                        Change(
                            cell_id,
                            "regression",
                            "cell",
                            "present",
                            "missing",
                            note="run B has no record for this cell",
                        )
                    ],
                )
            )
        elif b.row is None:
            verdicts.append(
                CellVerdict(
                    cell_id,
                    "not attempted",
                    [Change(cell_id, "info", "cell", "present", b.status, note=b.reason or "")],
                )
            )
        else:
            compared += 1
            past = cell_history(history, a, run_a.run_id, run_b.run_id) if history else [a]
            changes = compare_cell(cell_id, a, b, past)
            verdicts.append(CellVerdict(cell_id, _verdict(changes), changes))  # type: ignore[arg-type]
    for cell_id, b in cells_b.items():
        if cell_id not in cells_a and b.row is not None:
            verdicts.append(
                CellVerdict(
                    cell_id, "new", [Change(cell_id, "info", "cell", "absent", b.row["outcome"], note="new in run B")]
                )
            )
    return Diff(run_a.run_id, run_b.run_id, verdicts, compared)
