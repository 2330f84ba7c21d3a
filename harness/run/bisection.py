"""Bisect: the first vLLM release in a range where one cell's metric changed (pure logic).

`search(versions, observe, differs)` binary-searches releases sorted oldest first: the first is
taken as good, and `observe(version)` (run or reuse the cell under that release) is called on
both ends and then on ⌈log2(n-1)⌉ midpoints at most for n versions; each version once. `differs`
compares an observation with the good one. `comparator` builds it for a metric: `status`,
`validation`, or any metric of `harness.diff` with its threshold (or `--threshold`).
A search assumes one change in the range: a change that reverted inside it is not seen.
Running cells and printing belong to `harness.commands.bisect`. (Not named bisect.py: the engine
probe runs as a script from this folder, and a bisect.py here would shadow the standard library's.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.diff import METRICS, Metric, compare_value, level_key, level_order
from harness.errors import InputError
from harness.report.aggregate import probe_levels
from harness.schema import CellRecord

FLIPS = ("status", "validation")  # metrics that change by flipping, no threshold
METRIC_NAMES = (*FLIPS, *(m.name for m in METRICS))


@dataclass(frozen=True)
class Observation:
    """One cell under one release: its aggregated row (`record_row`), record and where it lies."""

    version: str
    row: dict[str, Any]
    record: CellRecord | None = None
    path: str | None = None  # record path, relative to results/
    reused: bool = False


@dataclass
class Result:
    versions: list[str]
    observed: list[Observation] = field(default_factory=list)  # in the order they were observed
    last_good: Observation | None = None
    first_bad: Observation | None = None
    change: str | None = None  # how first_bad differs from the good end

    @property
    def found(self) -> bool:
        return self.first_bad is not None


Differs = Callable[[Observation, Observation], str | None]


def search(versions: Sequence[str], observe: Callable[[str], Observation], differs: Differs) -> Result:
    """First version whose observation differs from the first one's; None when the last does not."""
    if len(versions) < 2:
        raise ValueError("a bisect needs at least two versions")
    result = Result(list(versions))
    seen: dict[int, Observation] = {}

    def at(i: int) -> Observation:
        if i not in seen:
            seen[i] = observe(versions[i])
            result.observed.append(seen[i])
        return seen[i]

    good, lo, hi = at(0), 0, len(versions) - 1
    if not differs(good, at(hi)):
        return result
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if differs(good, at(mid)):
            hi = mid
        else:
            lo = mid
    result.last_good, result.first_bad = seen[lo], seen[hi]
    result.change = differs(good, seen[hi])
    return result


# --------------------------------------------------------------------------- metrics
def metric(name: str, threshold: float | None = None) -> Metric | None:
    """The diff metric `name` (None for status/validation), its relative threshold overridden."""
    if name in FLIPS:
        if threshold is not None:
            raise InputError(f"--threshold applies to numeric metrics, not to --metric {name}")
        return None
    found = next((m for m in METRICS if m.name == name), None)
    if found is None:
        raise InputError(f"--metric {name}: unknown; choose one of {', '.join(METRIC_NAMES)}")
    # One observation per release, no history: every metric is judged by its threshold alone.
    found = dataclasses.replace(found, noisy=False)
    return dataclasses.replace(found, relative=threshold) if threshold is not None else found


def parse_threshold(text: str | None) -> float | None:
    """`5%` or `0.05` -> 0.05."""
    if text is None:
        return None
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise InputError(f"--threshold {text}: give a fraction (0.05) or a percentage (5%)") from None
    if value < 0:
        raise InputError(f"--threshold {text}: must not be negative")
    return value


def value(name: str, obs: Observation) -> Any:
    """What the evidence shows for a metric: a row value, or {(concurrency, rate): value} for probe
    metrics (`harness.diff.level_key`)."""
    if name == "status":
        return obs.row.get("outcome")
    if name == "validation":
        return obs.row.get("validation_passed")
    m = metric(name)
    assert m is not None
    if m.per_level:
        levels = probe_levels(obs.record) if obs.record else []
        return {level_key(lv): m.get(lv) for lv in levels if m.get(lv) is not None} or None
    return m.get(obs.row)


def show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "missing" if v is None else str(v)


def _why_missing(obs: Observation) -> str:
    row = obs.row
    return f"not measured: outcome {row.get('outcome')}" + (
        f", {row['failure_class']}" if row.get("failure_class") else ""
    )


def comparator(name: str, threshold: float | None = None) -> Differs:
    """differs(good, other) -> a one-line description of the change, or None."""
    m = metric(name, threshold)

    def flips(good: Observation, other: Observation) -> str | None:
        a, b = value(name, good), value(name, other)
        if a == b:
            return None
        note = other.row.get("failure_class") if name == "status" else other.row.get("failure_detail")
        return f"{name} {show(a)} → {show(b)}" + (f" ({note})" if note else "")

    def moves(good: Observation, other: Observation) -> str | None:
        assert m is not None
        a, b = value(name, good), value(name, other)
        if b is None:
            return f"{name} {show(a)} → {_why_missing(other)}"
        pairs = (
            [(k, a[k], b[k]) for k in sorted(set(a) & set(b), key=level_order)]
            if m.per_level
            else [((None, None), a, b)]
        )
        for (conc, rate), before, after in pairs:
            change = compare_value(m, other.version, before, after, conc, request_rate=rate)
            if change is not None:
                at = f" at concurrency {conc}" if conc is not None else ""
                at += f" at {rate:g} req/s" if rate is not None else ""
                pct = f" ({change.change_pct:+.1f} %)" if change.change_pct is not None else ""
                return f"{name}{at} {show(before)} → {show(after)} {m.unit}{pct}".replace("  ", " ")
        return None

    return flips if m is None else moves


def check_good(name: str, good: Observation) -> None:
    """A numeric metric needs a value on the good side to compare against."""
    if name not in FLIPS and value(name, good) is None:
        raise InputError(
            f"--good {good.version}: the cell has no {name} ({_why_missing(good)}); bisect --metric status instead"
        )
