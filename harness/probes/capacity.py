"""Capacity search: the largest load at which every service-level objective still holds.

Concurrency search (`search: concurrency`): levels 1, 2, 4, ... (capped at the KV-derived
max concurrency, or `SEARCH_CEILING` without one) until a level misses an objective; then
bisection between the last good and the first bad level down to a step of one; then the last
good level is measured again. If it misses the second time it counts as bad and the search
goes on below it, so the reported capacity held on both of its measurements. The rate search
(`search: rate`) does the same on Poisson request rates from `start_rate`, doubling up to
`max_rate`, bisecting until the gap is within `rate_precision` of the good rate. Arrivals are
open-loop there (no in-flight cap): requests the engine cannot take wait in its queue and
show up in TTFT, as they would for users.

A level passes when every request completed (a failure stops it at once), it ran all of its
requests (max(requests, rounds x concurrency); for rates max(requests, rounds x rate)), and
each objective's statistic is within its target. The whole search, warm-up included, has a
time budget (`budget_s`): each level may only use what is left, and a level the budget cuts
ends the search with the best level so far, marked unconfirmed.

The result (`CapacityResult`) has the capacity, goodput, output throughput and tokens/s per
user (1000 / median TPOT) at that level, and a trace of every level measured; the full
metrics of each level are the probe JSON's `levels`, in the same order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from harness.probes import slo as slo_mod
from harness.probes.profiles import SEARCH_CEILING, ProbeProfile

MIN_LEVEL_SECONDS = 1.0  # a level started with less budget left than this is not started
Phase = Literal["grow", "bisect", "confirm"]
# Runs one level: (level profile, concurrency or rate, level index) -> the probe's level dict.
LevelRunner = Callable[[ProbeProfile, float, int], Awaitable[dict[str, Any]]]


class LevelVerdict(BaseModel):
    """One measured level of the search, with what the report's frontier needs."""

    step: int  # position in the search; also the index into the probe JSON's `levels`
    phase: Phase
    concurrency: int | None = None  # concurrency search
    request_rate: float | None = None  # rate search (req/s offered)
    passed: bool
    complete: bool = True  # False: the search's time budget cut this level; not judged
    reason: str  # "all objectives met", or which objective missed and by how much
    observed: dict[str, float | None]  # each objective's measured value, ms
    requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float
    goodput_rps: float | None  # requests/s meeting every objective (per request)
    output_throughput: float  # output tokens/s over the level
    tpot_median_ms: float | None
    tokens_per_s_per_user: float | None  # 1000 / median TPOT
    client_bound: bool | None = None


class CapacityResult(BaseModel):
    """The search's answer; `concurrency` (or `request_rate`) is the capacity, 0 when even
    the first level missed an objective (then `failed_level` is that level)."""

    search: Literal["concurrency", "rate"]
    slo: dict[str, float]
    concurrency: int | None  # capacity of a concurrency search
    request_rate: float | None  # largest sustainable rate of a rate search
    goodput_rps: float | None
    output_throughput: float | None
    tokens_per_s_per_user: float | None
    confirmed: bool  # the capacity level met every objective on both of its measurements
    limited_by: Literal["slo", "cap", "budget"]
    ceiling: float  # the largest level the search could try: KV cap (or SEARCH_CEILING) / max_rate
    failed_level: LevelVerdict | None  # the smallest level that missed (None: none did)
    levels_measured: int
    duration_s: float
    budget_s: float
    stop_reason: str
    trace: list[LevelVerdict]


@dataclass(frozen=True)
class _Ladder:
    """Levels the search may try: doubling from `first` up to `ceiling`, then bisection."""

    first: float
    ceiling: float
    integer: bool
    precision: float  # rates: stop when hi - lo <= precision x lo

    def up(self, x: float) -> float | None:
        return None if x >= self.ceiling else min(x * 2, self.ceiling)

    def mid(self, lo: float, hi: float) -> float | None:
        if self.integer:
            return (lo + hi) // 2 if hi - lo > 1 else None
        return round((lo + hi) / 2, 4) if hi - lo > self.precision * lo else None


class CapacitySearch:
    """One search against one server; `levels` collects every level's full metrics."""

    def __init__(self, profile: ProbeProfile, run_level: LevelRunner, started: float) -> None:
        assert profile.mode == "capacity" and profile.slo
        self.profile, self.slo, self._run_level = profile, profile.slo, run_level
        self.rate = profile.search == "rate"
        self.started = started
        self.deadline = started + profile.budget_s
        if self.rate:
            self.ladder = _Ladder(profile.start_rate, profile.max_rate, False, profile.rate_precision)
        else:
            self.ladder = _Ladder(1, profile.max_concurrency or SEARCH_CEILING, True, 0.0)
        self.levels: list[dict[str, Any]] = []
        self.trace: list[LevelVerdict] = []
        self.budget_hit = False

    # ------------------------------------------------------------------ one level
    def _required(self, level: float) -> int:
        p = self.profile
        if self.rate:
            return max(p.requests, math.ceil(p.rounds * level))
        return p.requests_for(int(level))

    def _level_profile(self, level: float, remaining: float) -> ProbeProfile:
        p = self.profile
        return p.model_copy(
            update={
                "mode": "rate" if self.rate else "concurrency",
                "requests": self._required(level) if self.rate else p.requests,
                "max_level_seconds": min(p.max_level_seconds, remaining),
                "max_error_fraction": 0.0,  # one failed request fails the level: stop there
                "goodput": slo_mod.per_request_thresholds(self.slo),
                "max_concurrency": None if self.rate else p.max_concurrency,
            }
        )

    async def measure(self, level: float, phase: Phase) -> LevelVerdict | None:
        """Run and judge one level; None when the budget does not allow a complete one."""
        remaining = self.deadline - time.perf_counter()
        if remaining < MIN_LEVEL_SECONDS:
            self.budget_hit = True
            return None
        budget_bound = remaining < self.profile.max_level_seconds
        result = await self._run_level(self._level_profile(level, remaining), level, len(self.levels))
        result["search_phase"] = phase
        verdict = self._judge(result, level, phase)
        self.levels.append(result)
        self.trace.append(verdict)
        if budget_bound and result["stop_reason"].startswith("time_budget"):
            verdict.complete, verdict.passed = False, False
            verdict.reason = "cut by the search's time budget (budget_s)"
            self.budget_hit = True
            return None
        return verdict

    def _judge(self, lv: dict[str, Any], level: float, phase: Phase) -> LevelVerdict:
        required = self._required(level)
        observed = slo_mod.observe(lv, self.slo)
        if lv["failed"]:
            reason = f"{lv['failed']} of {lv['requests']} requests failed: {next(iter(lv['errors']), '?')}"
        elif lv["completed"] < required:
            reason = (
                f"only {lv['completed']} of {required} requests within "
                f"max_level_seconds ({self.profile.max_level_seconds:g} s)"
            )
        else:
            reason = "; ".join(slo_mod.misses(observed, self.slo))
        tpot = lv["tpot_ms"]["median"]
        return LevelVerdict(
            step=len(self.trace),
            phase=phase,
            concurrency=None if self.rate else int(level),
            request_rate=level if self.rate else None,
            passed=not reason,
            reason=reason or "all objectives met",
            observed=observed,
            requests=lv["requests"],
            completed=lv["completed"],
            failed=lv["failed"],
            duration_s=lv["duration_s"],
            request_throughput=lv["request_throughput"],
            goodput_rps=lv.get("request_goodput"),
            output_throughput=lv["output_throughput"],
            tpot_median_ms=tpot,
            tokens_per_s_per_user=1000 / tpot if tpot else None,
            client_bound=lv.get("client_bound"),
        )

    def _value(self, v: LevelVerdict) -> float:
        return float((v.request_rate if self.rate else v.concurrency) or 0)

    # ------------------------------------------------------------------ the search
    async def run(self) -> CapacityResult:
        ladder = self.ladder
        lo: float = 0  # last good level (0: none yet)
        hi: float | None = None  # first bad level (None: none yet)
        x: float | None = ladder.first
        while x is not None:  # grow
            v = await self.measure(x, "grow")
            if v is None:
                break
            if not v.passed:
                hi = x
                break
            lo, x = x, ladder.up(x)
        confirmed = False
        while lo and not self.budget_hit:
            while hi is not None and (m := ladder.mid(lo, hi)) is not None:  # bisect
                v = await self.measure(m, "bisect")
                if v is None:
                    break
                lo, hi = (m, hi) if v.passed else (lo, m)
            if self.budget_hit:
                break
            v = await self.measure(lo, "confirm")
            if v is None:
                break
            if v.passed:
                confirmed = True
                break
            # Missed on its second measurement: bad after all; go on below it.
            hi = lo
            bad = {self._value(t) for t in self.trace if t.complete and not t.passed}
            lo = max(
                (self._value(t) for t in self.trace if t.passed and self._value(t) < hi and self._value(t) not in bad),
                default=0,
            )
        return self._result(lo, hi, confirmed)

    def _result(self, lo: float, hi: float | None, confirmed: bool) -> CapacityResult:
        at = [t for t in self.trace if t.passed and self._value(t) == lo]
        # Two measurements of the capacity level: report the worse one (lower goodput).
        best = min(at, key=lambda t: t.goodput_rps or 0.0) if at else None
        failed = [t for t in self.trace if t.complete and not t.passed and self._value(t) == hi]
        unit = "req/s" if self.rate else "concurrent requests"
        label = "rate" if self.rate else "concurrency"
        if self.budget_hit:
            limited_by = "budget"
            stop = f"time budget ({self.profile.budget_s:g} s) spent: {lo:g} {unit} is a lower bound" + (
                "" if confirmed else ", not confirmed"
            )
        elif hi is None:
            limited_by = "cap"
            stop = f"every objective held up to the ceiling, {self.ladder.ceiling:g} {unit}"
        else:
            limited_by = "slo"
            stop = (
                f"objectives missed at {label} {hi:g} ({failed[-1].reason})"
                if failed
                else f"objectives missed at {label} {hi:g}"
            )
            if not lo:
                stop = f"capacity 0: {stop}"
        return CapacityResult(
            search="rate" if self.rate else "concurrency",
            slo=self.slo,
            concurrency=None if self.rate else int(lo),
            request_rate=lo if self.rate else None,
            goodput_rps=best.goodput_rps if best else None,
            output_throughput=best.output_throughput if best else None,
            tokens_per_s_per_user=best.tokens_per_s_per_user if best else None,
            confirmed=confirmed,
            limited_by=limited_by,
            ceiling=self.ladder.ceiling,
            failed_level=failed[-1] if failed else None,
            levels_measured=len(self.trace),
            duration_s=time.perf_counter() - self.started,
            budget_s=self.profile.budget_s,
            stop_reason=stop,
            trace=self.trace,
        )
