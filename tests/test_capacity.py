"""Capacity search against stub servers of known capacity, its boundaries, its budget, the
rate variant, and `probe:` specs checked when the matrix is loaded.

The stub's TTFT is `ttft + ttft_step x (requests already in flight)`, so at concurrency c it is
at most ttft + ttft_step x (c - 1): the largest c within a TTFT objective follows from the
formula. The stub runs in its own process so its clock is not disturbed by the client's GIL.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from harness.errors import InputError
from harness.matrix import load_matrix
from harness.probes.capacity import CapacityResult, CapacitySearch
from harness.probes.load import RequestResult, run_profile, summarize
from harness.probes.profiles import CHAT_SLO, ProbeProfile, check_spec, resolve
from harness.probes.stub import StubConfig, StubProcess
from harness.run.cell import probe_profile

pytestmark = pytest.mark.timing


def capacity_profile(slo: dict, **kw) -> ProbeProfile:
    # requests=1: each level runs rounds x concurrency requests. One round: on a loaded 2-core
    # box a process wakes up late now and then, and the boundary levels here are 15-20 ms
    # from the target; fewer requests at the worst TTFT give a late wake-up fewer chances.
    base = dict(
        mode="capacity", slo=slo, requests=1, rounds=1, input_tokens=4, output_tokens=4, warmup_requests=2, budget_s=120
    )
    return ProbeProfile(**{**base, **kw})


def search(url: str, profile: ProbeProfile) -> dict:
    return run_profile(url, "stub", None, profile, measure_ceiling=False)


def steps(cap: dict) -> list[tuple[str, int, bool]]:
    return [(t["phase"], t["concurrency"], t["passed"]) for t in cap["trace"]]


def why(cap: dict) -> str:
    """The trace with measured values, for assertion messages (a late wake-up shows here)."""
    return "; ".join(f"{t['phase']} {t['concurrency'] or t['request_rate']}: {t['reason']}" for t in cap["trace"])


# --------------------------------------------------------------------------- known capacity
@pytest.mark.parametrize(
    "ttft,step,target,capacity,trace",
    [
        # 100 ms + 100 ms per request in flight, p99 <= 650 ms: 100 + 100 (c - 1) <= 650 -> c = 6.
        # 50 ms on each side of the target: a late wake-up on a loaded CI box stays inside it.
        (
            0.1,
            0.1,
            650,
            6,
            [
                ("grow", 1, True),
                ("grow", 2, True),
                ("grow", 4, True),
                ("grow", 8, False),
                ("bisect", 6, True),
                ("bisect", 7, False),
                ("confirm", 6, True),
            ],
        ),
        # 100 ms + 100 ms, p99 <= 850 ms: c = 8, a power of two: bisection only rules out 9..15.
        (
            0.1,
            0.1,
            850,
            8,
            [
                ("grow", 1, True),
                ("grow", 2, True),
                ("grow", 4, True),
                ("grow", 8, True),
                ("grow", 16, False),
                ("bisect", 12, False),
                ("bisect", 10, False),
                ("bisect", 9, False),
                ("confirm", 8, True),
            ],
        ),
    ],
)
def test_search_finds_the_formula_capacity_in_the_fewest_levels(ttft, step, target, capacity, trace):
    with StubProcess(StubConfig(ttft=ttft, ttft_step=step, itl=0.002)) as url:
        res = search(url, capacity_profile({"ttft_p99": target}))
    cap = res["capacity"]
    assert cap["concurrency"] == capacity, why(cap)
    assert steps(cap) == trace
    assert cap["confirmed"] and cap["limited_by"] == "slo"
    assert cap["failed_level"]["concurrency"] == capacity + 1
    assert cap["slo"] == {"ttft_p99_ms": float(target)}
    # Every measured level is kept in full, in trace order, with at least rounds x c requests.
    assert [lv["concurrency"] for lv in res["levels"]] == [c for _, c, _ in trace]
    assert all(lv["requests"] == lv["completed"] == lv["concurrency"] for lv in res["levels"])
    for t, lv in zip(cap["trace"], res["levels"]):
        assert t["observed"]["ttft_p99_ms"] == lv["ttft_ms"]["p99"]
        assert t["output_throughput"] == lv["output_throughput"] > 0
        assert t["tokens_per_s_per_user"] == pytest.approx(1000 / lv["tpot_ms"]["median"])
        assert lv["search_phase"] == t["phase"]
    # At capacity every request met the objective: goodput is the request throughput.
    at = [t for t in cap["trace"] if t["concurrency"] == capacity]
    assert cap["goodput_rps"] == min(t["goodput_rps"] for t in at)
    assert cap["goodput_rps"] == pytest.approx(min(t["request_throughput"] for t in at))
    assert res["stop_reason"] == cap["stop_reason"]
    # What a record stores reads back as the typed result (through JSON, as from record.json).
    assert CapacityResult.model_validate(json.loads(json.dumps(cap))).concurrency == capacity


def test_capacity_one():
    # 200 ms + 200 ms: concurrency 1 gives 200 ms, 2 gives 400 ms, p99 <= 300 ms.
    with StubProcess(StubConfig(ttft=0.2, ttft_step=0.2)) as url:
        cap = search(url, capacity_profile({"ttft_p99": 300}))["capacity"]
    assert cap["concurrency"] == 1, why(cap)
    assert steps(cap) == [("grow", 1, True), ("grow", 2, False), ("confirm", 1, True)]


def test_capacity_equals_the_kv_cap():
    # The formula allows 8 (100 + 40 x 7 <= 400); a KV cap of 5.7 ends the search at 5.
    with StubProcess(StubConfig(ttft=0.1, ttft_step=0.04)) as url:
        res = search(url, capacity_profile({"ttft_p99": 400}, rounds=2).capped(5.7))
    cap = res["capacity"]
    assert cap["concurrency"] == 5 and cap["ceiling"] == 5, why(cap)
    assert steps(cap) == [
        ("grow", 1, True),
        ("grow", 2, True),
        ("grow", 4, True),
        ("grow", 5, True),
        ("confirm", 5, True),
    ]
    assert cap["limited_by"] == "cap" and cap["failed_level"] is None and cap["confirmed"]
    assert [lv["requests"] for lv in res["levels"]] == [2, 4, 8, 10, 10]  # rounds x c


def test_objectives_never_met_is_capacity_zero_with_the_failed_level():
    with StubProcess(StubConfig(ttft=0.1)) as url:
        res = search(url, capacity_profile({"ttft_p99": 50, "tpot_p99": 100}))
    cap = res["capacity"]
    assert cap["concurrency"] == 0 and not cap["confirmed"]
    assert steps(cap) == [("grow", 1, False)]
    assert cap["failed_level"]["concurrency"] == 1
    assert cap["failed_level"]["reason"].startswith("ttft_p99_ms 1")  # ~100 ms > 50
    assert cap["goodput_rps"] is None and cap["output_throughput"] is None
    assert cap["stop_reason"].startswith("capacity 0")


def test_failed_requests_fail_a_level():
    with StubProcess(StubConfig(status=503)) as url:
        res = search(url, capacity_profile({"ttft_p99": 1000}, warmup_requests=0))
    cap = res["capacity"]
    assert cap["concurrency"] == 0
    assert "requests failed: HTTP 503" in cap["failed_level"]["reason"]
    assert res["levels"][0]["completed"] == 0 and res["levels"][0]["failed"] == 1  # stopped at once


def test_the_search_ends_within_its_budget():
    # Objectives that always hold: only the budget stops the growth (levels take 0.2 s, 0.4 s...).
    budget = 2.5
    with StubProcess(StubConfig(ttft=0.1, ttft_step=0.1)) as url:
        t0 = time.perf_counter()
        res = search(url, capacity_profile({"e2el_p99": 1e6}, budget_s=budget))
        wall = time.perf_counter() - t0
    cap = res["capacity"]
    assert cap["limited_by"] == "budget" and not cap["confirmed"]
    assert all(t["complete"] for t in cap["trace"][:-1])  # only the last level can be cut ...
    assert cap["trace"][-1]["passed"] == cap["trace"][-1]["complete"]  # ... and is then unjudged
    assert cap["concurrency"] == max(t["concurrency"] for t in cap["trace"] if t["passed"])
    # In-flight requests of the cut level finish: one E2EL (~1 s here) past the budget at most.
    assert wall < budget + 2.0 and "lower bound" in cap["stop_reason"]


# --------------------------------------------------------------------------- rate variant
def test_rate_search_finds_a_sustainable_rate_the_same_way():
    # Poisson arrivals: in flight ~ rate x E2EL, so TTFT rises with the rate; no exact answer,
    # but the strategy (doubling, bisection, a rate that held twice) is checkable.
    profile = capacity_profile(
        {"ttft_p99": 320}, search="rate", start_rate=8.0, requests=16, rounds=2, rate_precision=0.25, budget_s=90
    )
    with StubProcess(StubConfig(ttft=0.1, ttft_step=0.04)) as url:
        res = search(url, profile)
    cap = res["capacity"]
    trace = cap["trace"]
    rates = [t["request_rate"] for t in trace]
    grow = [t for t in trace if t["phase"] == "grow"]
    assert [t["request_rate"] for t in grow] == [8.0 * 2**i for i in range(len(grow))]
    assert all(t["passed"] for t in grow[:-1]) and not grow[-1]["passed"]
    assert cap["concurrency"] is None and cap["limited_by"] == "slo" and cap["confirmed"]
    rate = cap["request_rate"]
    assert rate >= 8.0 and sum(t["passed"] for t in trace if t["request_rate"] == rate) >= 2
    assert trace[-1]["phase"] == "confirm" and trace[-1]["request_rate"] == rate
    bad = cap["failed_level"]["request_rate"]
    assert bad > rate and bad - rate <= 0.25 * rate
    assert all(lv["request_rate"] == r for lv, r in zip(res["levels"], rates))
    assert all(lv["requests"] >= max(16, 2 * lv["request_rate"]) for lv in res["levels"])


# --------------------------------------------------------------------------- a flaky boundary
def _scripted(ttft_of) -> tuple[list, object]:
    """A level runner whose TTFTs come from `ttft_of(concurrency, times measured)`: the one
    case a real server cannot give on demand, a level that holds once and then misses."""
    seen: dict[int, int] = {}
    calls: list[int] = []

    async def run(lp: ProbeProfile, level: float, index: int) -> dict:
        c = int(level)
        seen[c] = seen.get(c, 0) + 1
        calls.append(c)
        n = lp.requests_for(c)
        ttft = ttft_of(c, seen[c])
        results = [RequestResult(ok=True, ttft=ttft, latency=ttft + 0.03, output_tokens=4) for _ in range(n)]
        lv = summarize(results, duration=1.0, goodput=lp.goodput)
        lv.update(concurrency=c, stop_reason="completed")
        return lv

    return calls, run


def test_a_capacity_that_misses_on_its_second_measurement_is_not_reported():
    # Capacity 6 on first sight, but 6 misses when measured again: the answer is 5.
    def ttft(c, times):
        return 0.1 + 0.04 * (c - 1) + (0.05 if c == 6 and times == 2 else 0.0)

    calls, runner = _scripted(ttft)
    profile = capacity_profile({"ttft_p99": 320})
    cap = asyncio.run(CapacitySearch(profile, runner, time.perf_counter()).run())
    assert calls == [1, 2, 4, 8, 6, 7, 6, 5, 5]
    assert [t.phase for t in cap.trace] == ["grow"] * 4 + ["bisect", "bisect", "confirm", "bisect", "confirm"]
    assert cap.concurrency == 5 and cap.confirmed and cap.failed_level.concurrency == 6


# --------------------------------------------------------------------------- profiles, matrix
@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("bogus", "unknown profile 'bogus'"),
        ({"mode": "capacity"}, "needs slo"),
        ({"mode": "capacity", "slo": {"ttft_p97": 10}}, "unknown objective 'ttft_p97'"),
        ({"mode": "capacity", "slo": {"ttft_p99_ms": 0}}, "must be > 0"),
        ({"mode": "capacity", "slo": {"tpot_p99": 10}, "output_tokens": 1}, "output_tokens >= 2"),
        ({"slo": {"ttft_p99": 10}}, "slo is for mode 'capacity'"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"goodput": {"ttft": -5}}, "must be > 0"),
    ],
)
def test_bad_probe_specs(spec, fragment):
    assert fragment in check_spec(spec)
    with pytest.raises(InputError, match="probe: "):
        probe_profile(spec, None)


def test_named_profiles_and_the_kv_cap():
    chat = resolve("capacity", 29.6)
    assert chat.mode == "capacity" and chat.slo == CHAT_SLO and chat.max_concurrency == 29
    assert resolve({"mode": "capacity", "slo": {"ttft_median": 5}}, None).slo == {"ttft_p50_ms": 5.0}
    assert resolve("none", 4) is None and resolve("quick", 2).levels() == [1, 2]
    assert check_spec("capacity") is None


MATRIX = """\
models: [{model: m/one}]
gpus: [cpu, H100]
configs:
  - {name: small}
  - name: big
    probe: {probe}
probe: {top}
"""


def _matrix(tmp_path: Path, top: str, probe: str) -> Path:
    path = tmp_path / "matrix.yaml"
    path.write_text(MATRIX.replace("{top}", top).replace("{probe}", probe))
    return path


def test_probe_specs_are_checked_when_the_matrix_loads(tmp_path):
    with pytest.raises(InputError) as exc:
        load_matrix(_matrix(tmp_path, "bogus", "quick"))
    assert str(exc.value).startswith(f"{tmp_path / 'matrix.yaml'}:7:8: probe: unknown profile 'bogus'")
    with pytest.raises(InputError) as exc:
        load_matrix(_matrix(tmp_path, "quick", "{mode: capacity, slo: {ttft_p99: -5}}"))
    assert ":6:12: configs[1].probe: slo: objective 'ttft_p99': target must be > 0" in str(exc.value)


def test_a_config_probe_overrides_the_matrix_probe(tmp_path):
    m = load_matrix(_matrix(tmp_path, "quick", "capacity"))
    by_config = {c.config.name: c.config.probe for c in m.cells}
    assert by_config == {"small": None, "big": "capacity"}


def test_the_default_matrix_probes_capacity():
    m = load_matrix(Path(__file__).resolve().parents[1] / "matrix.yaml")
    tiny = next(c for c in m.cells if c.model.name == "tiny-chat" and c.config.name == "cpu")
    gpu = next(c for c in m.cells if c.gpu != "cpu")
    cpu_profile = probe_profile(tiny.config.probe or m.spec.probe, 4096.0)
    gpu_profile = probe_profile(gpu.config.probe or m.spec.probe, 29.0)
    assert cpu_profile.mode == gpu_profile.mode == "capacity"
    assert gpu_profile.slo == CHAT_SLO and gpu_profile.max_concurrency == 29
    assert cpu_profile.budget_s <= 120  # a short run on the CPU box
