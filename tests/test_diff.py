"""diff: a planted regression in every tracked metric is flagged; identical runs give nothing;
timing metrics are judged against the cell's history, never on one sample."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.cli import main as cli_main
from harness.diff import HISTORY_RUNS, MAD_K, METRICS, MIN_HISTORY, Band, Change, band_of, describe, diff_runs
from harness.report.aggregate import load
from harness.schema import CellRecord, RunManifest
from harness.store import RunWriter
from tests import reportdata as rd

RUN_A, RUN_B = "20251010T000000Z-cpuhost", "20251011T000000Z-cpuhost"


def _level(metric: str, stat: str, factor: float) -> Callable[[CellRecord], None]:
    def plant(record: CellRecord) -> None:
        for level in record.probes.levels:
            if stat:
                stats = getattr(level, metric)
                setattr(stats, stat, getattr(stats, stat) * factor)
            else:
                setattr(level, metric, getattr(level, metric) * factor)

    return plant


def _set(attr: str, name: str, value) -> Callable[[CellRecord], None]:
    return lambda record: setattr(getattr(record, attr), name, value)


# how to make each tracked metric worse on the first CPU cell (tiny-llama)
PLANT: dict[str, Callable[[CellRecord], None]] = {
    "kv_cache_tokens": _set("facts", "kv_cache_tokens", 1024),
    "num_gpu_blocks": _set("facts", "num_gpu_blocks", 64),
    "max_concurrency": _set("facts", "max_concurrency", 1.0),
    "spawn_to_ready_s": _set("timings", "spawn_to_ready_s", 90.0),
    "load_s": _set("facts", "load_seconds", 40.0),
    "output_throughput": _level("output_throughput", "", 0.5),
    "ttft_median_ms": _level("ttft_ms", "median", 2.0),
    "ttft_p99_ms": _level("ttft_ms", "p99", 2.0),
    "tpot_median_ms": _level("tpot_ms", "median", 2.0),
    "itl_median_ms": _level("itl_ms", "median", 2.0),
    "itl_p99_ms": _level("itl_ms", "p99", 2.0),
    "e2el_median_ms": _level("e2el_ms", "median", 2.0),
    "failed_requests": lambda r: setattr(r.probes.levels[0], "failed", 3),
    "status": lambda r: (setattr(r, "outcome", "failed"), setattr(r, "failure_class", "timeout")),
    "validation": _set("validation", "passed", False),
}


# Deterministic facts the CPU cells do not have: planted on the H100 seed run instead.
MEMORY_PLANT = {
    "weights_gib": ("weights_gib", 0.5),
    "activation_gib": ("activation_peak_gib", 1.0),
    "non_torch_gib": ("non_torch_gib", 0.2),
    "cuda_graph_gib": ("cuda_graph_gib", 0.3),
    "kv_cache_gib": ("kv_cache_gib", -2.0),
}
NOISY = {m.name for m in METRICS if m.noisy and m.name in PLANT}
HISTORY = MIN_HISTORY - 1  # earlier runs that, with run A, make a noise band


def runs(
    tmp_path: Path,
    plant: Callable[[CellRecord], None] | None = None,
    *,
    reverse: bool = False,
    not_on_host: bool = False,
    history: int = 0,
):
    before = rd.cpu_records(RUN_A)
    after = [copy.deepcopy(r) for r in rd.cpu_records(RUN_B, "2025-10-11T00:00:00+00:00")]
    if plant:
        plant(after[0])
    if reverse:
        before, after = after, before
        for r in before:
            r.run_id = RUN_A
        for r in after:
            r.run_id = RUN_B
    for i in range(history):  # earlier runs of the same cells, identical to run A
        rd.write_run(
            tmp_path,
            [
                r.model_copy(
                    update={
                        "run_id": f"2025100{i + 1}T000000Z-cpuhost",
                        "started_at": f"2025-10-0{i + 1}T00:00:00+00:00",
                    },
                    deep=True,
                )
                for r in before
            ],
        )
    if not_on_host:
        rd.write_run(tmp_path, before)
        rd.write_run(tmp_path, after[1:], not_on_host=(after[0].cell_id,))
    else:
        rd.write_run(tmp_path, before)
        rd.write_run(tmp_path, after)
    loaded = load(tmp_path).runs
    by_id = {run.run_id: run for run in loaded}
    return diff_runs(by_id[RUN_A], by_id[RUN_B], loaded)


def test_every_tracked_metric_has_a_planted_regression():
    assert {m.name for m in METRICS} | {"status", "validation"} == set(PLANT) | set(MEMORY_PLANT) | {"capacity"}


def test_identical_runs_have_no_changes(tmp_path):
    diff = runs(tmp_path)
    assert diff.changes == [] and diff.compared == 6


@pytest.mark.parametrize("metric", sorted(PLANT))
def test_planted_regression_is_flagged(tmp_path, metric):
    diff = runs(tmp_path, PLANT[metric], history=HISTORY if metric in NOISY else 0)
    flagged = {(c.cell_id, c.metric) for c in diff.regressions}
    assert ("tiny-llama__cpu__default__vllm-cpu", metric) in flagged
    assert {cell for cell, _ in flagged} == {"tiny-llama__cpu__default__vllm-cpu"}
    assert not diff.improvements
    verdicts = {v.cell_id: v.verdict for v in diff.cells}
    assert verdicts["tiny-llama__cpu__default__vllm-cpu"] == "regressed"
    assert set(verdicts.values()) - {"regressed"} <= {"unchanged"}
    if metric in NOISY:  # a flagged timing states its band, which run B is outside of
        change = next(c for c in diff.regressions if c.metric == metric)
        assert change.band is not None and change.band.samples == MIN_HISTORY
        assert not change.band.low <= change.after <= change.band.high


@pytest.mark.parametrize("metric", sorted(PLANT))
def test_the_reverse_move_is_an_improvement(tmp_path, metric):
    diff = runs(tmp_path, PLANT[metric], reverse=True, history=HISTORY if metric in NOISY else 0)
    assert metric in {c.metric for c in diff.improvements}
    assert not diff.regressions


@pytest.mark.parametrize("metric", sorted(NOISY))
def test_a_timing_move_without_history_is_shown_not_counted(tmp_path, metric):
    diff = runs(tmp_path, PLANT[metric])
    assert not diff.regressions
    shown = [c for c in diff.info if c.metric == metric]
    assert shown and all("not judged" in c.note and c.band is None for c in shown)


@pytest.mark.parametrize("metric", sorted(MEMORY_PLANT))
def test_memory_breakdown_is_compared_tightly(tmp_path, metric):
    field, delta = MEMORY_PLANT[metric]
    rd.write_run(tmp_path, rd.seed002_records())
    after = rd.seed002_records()
    for record in after:
        record.run_id = "20991001T000000Z-h100host"
    target = next(r for r in after if getattr(r.facts, field) is not None)
    setattr(target.facts, field, getattr(target.facts, field) + delta)
    rd.write_run(tmp_path, after)
    loaded = load(tmp_path).runs
    diff = diff_runs(loaded[0], loaded[1], loaded)
    assert [(c.cell_id, c.metric) for c in diff.regressions] == [(target.cell_id, metric)]
    assert diff.regressions[0].band is None  # tight: no history needed


def test_moves_within_the_band_are_ignored(tmp_path):
    def small(record: CellRecord) -> None:
        record.timings.spawn_to_ready_s += 0.5  # under the 2 s floor
        _level("ttft_ms", "median", 1.03)(record)  # under the 5 % minimum band
        record.facts.kv_cache_tokens += 164  # 0.25 %: within the rounding of vLLM's log

    assert runs(tmp_path, small, history=HISTORY).changes == []
    # without history a timing is shown only beyond 25 %
    assert runs(tmp_path / "b", _level("ttft_ms", "median", 1.1)).changes == []
    # a small rise of a higher-is-better fact is an improvement
    (up,) = runs(tmp_path / "c", _set("facts", "max_concurrency", 32.5)).changes
    assert (up.metric, up.kind, up.before, up.after) == ("max_concurrency", "improvement", 32.0, 32.5)


def test_the_band_is_the_widest_of_spread_minimum_and_floor(tmp_path):
    """Band = median ± max(3 × MAD·1.4826, the metric's minimum relative half-width, its floor)."""
    # floor: load 0.8 s, steady history: ± the 1 s floor, not 10 % of 0.8 s
    (load,) = runs(tmp_path / "a", PLANT["load_s"], history=HISTORY).changes
    assert (load.band.low, load.band.high) == pytest.approx((-0.2, 1.8))
    # minimum: spawn → ready 22.5 s, steady: ± 10 % (2.25 s) beats the 2 s floor
    (spawn,) = runs(tmp_path / "b", PLANT["spawn_to_ready_s"], history=HISTORY).changes
    assert (spawn.band.low, spawn.band.high) == pytest.approx((20.25, 24.75))
    # spread: throughput at 0.9, 1.1 and 1 x (run A): MAD 0.1 x, so ± 3 × 1.4826 × 0.1 x
    for i, factor in enumerate((0.9, 1.1)):
        records = rd.cpu_records(f"2025100{i + 1}T000000Z-cpuhost", f"2025-10-0{i + 1}T00:00:00+00:00")
        _level("output_throughput", "", factor)(records[0])
        rd.write_run(tmp_path / "c", records)
    changes = runs(tmp_path / "c", _level("output_throughput", "", 0.5)).regressions
    assert [c.concurrency for c in changes] == [1, 4]
    for c in changes:
        half = 3 * 1.4826 * 0.1 * c.before
        assert (c.band.low, c.band.high) == pytest.approx((c.before - half, c.before + half))


def test_history_is_the_cells_runs_up_to_a_whatever_order_they_are_asked_in(tmp_path):
    """Four runs of a cell: `diff 2 3` is judged by runs 1 and 2 only (run 4 came later: too little
    history), `diff 4 1` (backwards) by runs 2 to 4, run B left out."""
    ids = [f"2025100{i}T000000Z-cpuhost" for i in (1, 2, 3, 4)]
    for i, run_id in enumerate(ids):
        records = rd.cpu_records(run_id, f"2025-10-0{i + 1}T00:00:00+00:00")
        if i in (0, 2):
            _level("output_throughput", "", 0.5)(records[0])
        rd.write_run(tmp_path, records)
    loaded = load(tmp_path).runs
    by_id = {r.run_id: r for r in loaded}
    forward = diff_runs(by_id[ids[1]], by_id[ids[2]], loaded).changes
    assert {(c.kind, c.note) for c in forward} == {("info", "not judged: 2 of 3 runs of history for a noise band")}
    backward = diff_runs(by_id[ids[3]], by_id[ids[0]], loaded).regressions
    assert [(c.metric, c.band.samples) for c in backward] == [("output_throughput", 3)] * 2


def test_the_band_comes_from_the_spread_of_history(tmp_path):
    """With noisy history, a move that a fixed threshold would flag stays inside the band."""
    spreads = (0.7, 1.3)  # two earlier runs at ±30 % throughput around run A
    for i, factor in enumerate(spreads):
        records = rd.cpu_records(f"2025100{i + 1}T000000Z-cpuhost", f"2025-10-0{i + 1}T00:00:00+00:00")
        _level("output_throughput", "", factor)(records[0])
        rd.write_run(tmp_path, records)
    diff = runs(tmp_path, _level("output_throughput", "", 0.8))  # -20 %: inside a ±30 % spread
    assert not diff.regressions
    diff = runs(tmp_path / "x", _level("output_throughput", "", 0.8), history=HISTORY)  # steady history
    assert "output_throughput" in {c.metric for c in diff.regressions}


def test_missing_cell_is_a_regression_not_on_host_is_not(tmp_path):
    def drop(record: CellRecord) -> None:
        record.cell_id = "renamed"

    diff = runs(tmp_path / "a", drop)
    assert ("tiny-llama__cpu__default__vllm-cpu", "cell") in {(c.cell_id, c.metric) for c in diff.regressions}
    assert ("renamed", "cell") in {(c.cell_id, c.metric) for c in diff.info}
    diff = runs(tmp_path / "b", not_on_host=True)
    assert not diff.regressions and [c.after for c in diff.info] == ["not_on_host"]


def test_cli_exit_codes_json_and_markdown(tmp_path, capsys):
    results = tmp_path / "results"
    runs(results, PLANT["ttft_median_ms"], history=HISTORY)
    md = tmp_path / "diff.md"
    reports = ["--reports", str(tmp_path / "reports")]
    assert cli_main(["diff", RUN_A, RUN_B, "--results", str(results), "--json", "--markdown", str(md), *reports]) == 1
    out = json.loads(capsys.readouterr().out)
    assert {c["metric"] for c in out["regressions"]} == {"ttft_median_ms"}
    assert out["metrics"][0]["metric"] == "kv_cache_tokens"
    assert [c["verdict"] for c in out["cells"]].count("regressed") == 1
    text = md.read_text()
    assert "## Regressions" in text and "| ttft_median_ms | 1 |" in text and "## How changes are judged" in text
    # one summary line per cell comes first, with the sign of B against A
    assert "tiny-llama__cpu__default__vllm-cpu: regressed — ttft_median_ms @1:" in text and "(+100.0 %)" in text
    # a run folder works as well as its id
    assert cli_main(["diff", str(results / RUN_A), str(results / RUN_B), *reports]) == 1
    capsys.readouterr()
    assert cli_main(["diff", RUN_A, RUN_A, "--results", str(results), *reports]) == 0
    assert "0** regressions" in capsys.readouterr().out
    assert cli_main(["diff", RUN_A, "nope", "--results", str(results), *reports]) == 2


def test_a_capacity_drop_is_a_regression_beyond_its_band(tmp_path):
    """Users served within the SLO: a drop beyond the cell's history band fails the gate."""

    def with_capacity(users: int) -> Callable[[CellRecord], None]:
        def plant(record: CellRecord) -> None:
            record.probes.capacity = {"concurrency": users, "slo": {"ttft_p99_ms": 2000}}

        return plant

    def run_with(folder: Path, run_id: str, day: int, users: int) -> None:
        records = rd.cpu_records(run_id, f"2025-10-{day:02d}T00:00:00+00:00")
        with_capacity(users)(records[0])
        rd.write_run(folder, records)

    for day, users in ((1, 16), (2, 16), (3, 17)):
        run_with(tmp_path, f"202510{day:02d}T000000Z-cpuhost", day, users)
    run_with(tmp_path, "20251004T000000Z-cpuhost", 4, 8)
    runs = load(tmp_path).runs
    diff = diff_runs(runs[2], runs[3], runs)
    [change] = [c for c in diff.regressions if c.metric == "capacity"]
    assert (change.before, change.after, change.band.samples) == (17, 8, 3)
    run_with(tmp_path / "b", "20251001T000000Z-cpuhost", 1, 16)
    run_with(tmp_path / "b", "20251002T000000Z-cpuhost", 2, 16)
    run_with(tmp_path / "b", "20251003T000000Z-cpuhost", 3, 16)
    run_with(tmp_path / "b", "20251004T000000Z-cpuhost", 4, 15)  # within the 10 % minimum band
    runs = load(tmp_path / "b").runs
    assert not diff_runs(runs[2], runs[3], runs).regressions


def test_each_cells_line_states_both_values_the_sign_and_the_band(tmp_path):
    """What the gate prints per cell (CLI, markdown, PR comment): every value readable as a plain
    number in its unit ("9,045 ms", never "9.04e+03"), B against A, and the band a timing left."""

    def worse(record: CellRecord) -> None:
        for metric in ("kv_cache_tokens", "failed_requests", "validation", "spawn_to_ready_s"):
            PLANT[metric](record)
        _level("e2el_ms", "median", 9.0)(record)

    lines = [describe(c) for c in runs(tmp_path, worse, history=HISTORY).changes]
    assert lines == [
        "validation: True → False",
        "kv_cache_tokens: 65,536 tokens → 1,024 tokens (-98.4 %)",
        "failed_requests @1: 0 requests → 3 requests",
        "spawn_to_ready_s: 22.5 s → 90 s (+300.0 %), band 20.25..24.75 from 3 runs",
        "e2el_median_ms @1: 848 ms → 7,634 ms (+800.0 %), band 805.8..890.7 from 3 runs",
        "e2el_median_ms @4: 1,005 ms → 9,045 ms (+800.0 %), band 954.8..1,055 from 3 runs",
    ]
    # without history a timing is shown, not judged, and says why; a failed cell names its class
    (shown,) = [describe(c) for c in runs(tmp_path / "b", PLANT["spawn_to_ready_s"]).changes]
    assert shown == "spawn_to_ready_s: 22.5 s → 90 s (+300.0 %); not judged: 1 of 3 runs of history for a noise band"
    (verdict,) = [v for v in runs(tmp_path / "c", PLANT["status"]).cells if v.changes]
    assert verdict.summary == "tiny-llama__cpu__default__vllm-cpu: regressed — status: ok → failed (timeout)"
    dropped = runs(tmp_path / "d", lambda r: setattr(r, "cell_id", "renamed")).cells
    assert [v.summary for v in dropped if v.changes] == [
        "tiny-llama__cpu__default__vllm-cpu: missing — cell: present → missing (run B has no record for this cell)",
        "renamed: new — cell: absent → ok (new in run B)",
    ]


@pytest.mark.parametrize("metric", sorted(MEMORY_PLANT))
def test_memory_moves_read_in_gib_with_two_decimals(tmp_path, metric):
    field, delta = MEMORY_PLANT[metric]
    rd.write_run(tmp_path, rd.seed002_records())
    after = rd.seed002_records()
    for record in after:
        record.run_id = "20991001T000000Z-h100host"
    target = next(r for r in after if getattr(r.facts, field) is not None)
    before = getattr(target.facts, field)
    setattr(target.facts, field, before + delta)
    rd.write_run(tmp_path, after)
    loaded = load(tmp_path).runs
    (change,) = diff_runs(loaded[0], loaded[1], loaded).changes
    pct = 100 * delta / before
    assert describe(change) == f"{metric}: {before:.2f} GiB → {before + delta:.2f} GiB ({pct:+.1f} %)"


def test_the_json_holds_every_change_as_the_gate_judged_it(tmp_path, capsys):
    """`diff --json` is what a CI job reads: each change, band included, comes back whole, and the
    rules it states are the ones the changes were judged by."""
    results = tmp_path / "results"

    def worse(record: CellRecord) -> None:
        for metric in ("kv_cache_tokens", "ttft_median_ms", "validation", "failed_requests"):
            PLANT[metric](record)
        record.run_id = RUN_B

    diff = runs(results, worse, history=HISTORY)
    better = runs(tmp_path / "better", worse, reverse=True, history=HISTORY)
    unjudged = runs(tmp_path / "new", PLANT["ttft_median_ms"])  # no history: shown as info
    reports = ["--reports", str(tmp_path / "reports")]
    assert cli_main(["diff", RUN_A, RUN_B, "--results", str(results), "--json", *reports]) == 1
    out = json.loads(capsys.readouterr().out)

    def change(c: dict) -> Change:
        return Change(**{**c, "band": Band(**c["band"]) if c["band"] else None})

    assert [change(c) for c in out["regressions"]] == diff.regressions and len(diff.regressions) == 5
    assert {c["cell_id"] for c in out["regressions"]} == {"tiny-llama__cpu__default__vllm-cpu"}
    assert [c["change_pct"] for c in out["regressions"] if c["metric"] == "kv_cache_tokens"] == [-98.4]  # 1 decimal
    assert out["improvements"] == out["info"] == []
    for folder, other, kind in ((tmp_path / "better", better, "improvements"), (tmp_path / "new", unjudged, "info")):
        assert cli_main(["diff", RUN_A, RUN_B, "--results", str(folder), "--json", *reports]) == 0
        assert [change(c) for c in json.loads(capsys.readouterr().out)[kind]] == getattr(other, kind)
        assert getattr(other, kind) and {c.cell_id for c in getattr(other, kind)} == {
            "tiny-llama__cpu__default__vllm-cpu"
        }
    assert (out["run_a"], out["run_b"], out["compared_cells"]) == (RUN_A, RUN_B, 6)
    assert out["cells"] == [{"cell_id": v.cell_id, "verdict": v.verdict, "summary": v.summary} for v in diff.cells]
    assert out["rules"] == {"min_history": MIN_HISTORY, "mad_k": MAD_K, "history_runs": HISTORY_RUNS}
    rules = {m["metric"]: m for m in out["metrics"]}
    assert list(rules) == [m.name for m in METRICS]
    for c in diff.regressions + better.improvements:
        if c.metric == "validation":
            continue
        rule = rules[c.metric]
        # a regression moves against the better direction, an improvement with it
        if c.change_pct is not None:  # None: from zero
            assert (c.change_pct > 0) == ((rule["better"] == "higher") == (c.kind == "improvement")), c
        assert (c.band is not None) == (rule["judged"] == "history band"), c
        assert (c.concurrency is not None) == rule["per_concurrency_level"], c
        assert c.unit == rule["unit"]
        if c.band:  # the band is never narrower than the rule's minimum
            assert c.band.high - c.band.low >= 2 * max(rule["floor"], rule["relative"] * abs(c.before)) - 1e-9
        else:
            assert abs(c.after - c.before) > max(rule["floor"], rule["relative"] * abs(c.before))
    assert {"higher", "lower"} == {r["better"] for r in rules.values()}
    assert {"history band", "tight"} == {r["judged"] for r in rules.values()}


@pytest.mark.parametrize(
    "before, after, line, kind",
    [
        (
            ("failed", "timeout", None),
            ("failed", "oom_weight_load", None),
            "changed — failure_class: timeout → oom_weight_load",
            "info",
        ),
        (
            ("failed", "timeout", None),
            ("skipped", None, "GPU busy"),
            "changed — status: failed → skipped (GPU busy)",
            "info",
        ),
        (("skipped", None, "GPU busy"), ("ok", None, None), "improved — status: skipped → ok", "improvement"),
        (
            ("ok", None, None),
            ("skipped", None, "GPU busy"),
            "regressed — status: ok → skipped (GPU busy)",
            "regression",
        ),
    ],
)
def test_a_change_of_outcome_is_judged_by_where_it_went(tmp_path, before, after, line, kind):
    """Leaving ok regresses, reaching ok improves; between two other outcomes, or a failure that
    changed its class, it is information. The note says why run B ended as it did."""
    a, b = rd.cpu_records(RUN_A), rd.cpu_records(RUN_B, "2025-10-11T00:00:00+00:00")
    for record, (outcome, failure_class, skip_reason) in ((a[0], before), (b[0], after)):
        record.outcome, record.failure_class, record.skip_reason = outcome, failure_class, skip_reason
    rd.write_run(tmp_path, a)
    rd.write_run(tmp_path, b)
    loaded = load(tmp_path).runs
    (verdict,) = [v for v in diff_runs(loaded[0], loaded[1], loaded).cells if v.changes]
    assert verdict.summary == "tiny-llama__cpu__default__vllm-cpu: " + line
    assert [(c.cell_id, c.kind) for c in verdict.changes] == [(verdict.cell_id, kind)]


@pytest.mark.parametrize(
    "part, name, before, after, shown",
    [
        ("facts", "num_gpu_blocks", 10, 11, True),  # one block is a move where 0.5 % of the count is less
        ("facts", "num_gpu_blocks", 200, 201, False),  # ... and within the log's rounding where it is not
        ("timings", "spawn_to_ready_s", 4.0, 6.0, True),  # no history: a move of the 2 s floor is shown
        ("timings", "spawn_to_ready_s", 22.5, 28.125, False),  # no history: exactly 25 % is not beyond it
    ],
)
def test_a_move_must_pass_both_the_floor_and_the_relative_threshold(tmp_path, part, name, before, after, shown):
    a, b = rd.cpu_records(RUN_A), rd.cpu_records(RUN_B, "2025-10-11T00:00:00+00:00")
    setattr(getattr(a[0], part), name, before)
    setattr(getattr(b[0], part), name, after)
    rd.write_run(tmp_path, a)
    rd.write_run(tmp_path, b)
    loaded = load(tmp_path).runs
    changes = diff_runs(loaded[0], loaded[1], loaded).changes
    assert [(c.metric, c.before, c.after) for c in changes] == ([(name, before, after)] if shown else [])


def _write(tmp_path: Path, run_id: str, day: int, plant: Callable[[CellRecord], None] | None = None) -> None:
    records = rd.cpu_records(run_id, f"2025-10-{day:02d}T00:00:00+00:00")
    if plant:
        plant(records[0])
    rd.write_run(tmp_path, records)


def _diff(tmp_path: Path):
    loaded = load(tmp_path).runs
    by_id = {run.run_id: run for run in loaded}
    return diff_runs(by_id[RUN_A], by_id[RUN_B], loaded)


def test_the_side_of_the_band_gives_the_direction_not_run_a(tmp_path):
    """A slow night in run A: B is faster than A but still slower than the history (and its
    throughput higher than A's but below the band): both are regressions."""

    def slow(ttft: float, tput: float) -> Callable[[CellRecord], None]:
        return lambda r: (_level("ttft_ms", "median", ttft)(r), _level("output_throughput", "", tput)(r))

    for i in range(HISTORY):
        _write(tmp_path, f"2025100{i + 1}T000000Z-cpuhost", i + 1)
    _write(tmp_path, RUN_A, 10, slow(1.5, 0.6))
    _write(tmp_path, RUN_B, 11, slow(1.3, 0.7))
    changes = {(c.metric, c.concurrency): c for c in _diff(tmp_path).changes}
    levels = [lv.concurrency for lv in rd.cpu_records(RUN_A)[0].probes.levels]
    assert set(changes) == {(m, conc) for m in ("ttft_median_ms", "output_throughput") for conc in levels}
    for (metric, _), c in changes.items():
        assert c.kind == "regression", c
        if metric == "ttft_median_ms":
            assert c.after < c.before and c.after > c.band.high
        else:
            assert c.after > c.before and c.after < c.band.low


@pytest.mark.parametrize("edge", ["low", "high"])
def test_the_band_edges_are_inside_it(tmp_path, edge):
    """History steady at x: B exactly on the band's edge is no change; the next float past it
    is one, at its own probe level, in the direction of its side."""
    metric = next(m for m in METRICS if m.name == "ttft_median_ms")
    bands = {lv.concurrency: band_of(metric, [lv.ttft_ms.median] * 3) for lv in rd.cpu_records(RUN_A)[0].probes.levels}

    def to(beyond: bool) -> Callable[[CellRecord], None]:
        def plant(record: CellRecord) -> None:
            for lv in record.probes.levels:
                value = getattr(bands[lv.concurrency], edge)
                lv.ttft_ms.median = (
                    math.nextafter(value, math.inf if edge == "high" else -math.inf) if beyond else value
                )

        return plant

    for folder, beyond in (("on", False), ("past", True)):
        for i in range(HISTORY):
            _write(tmp_path / folder, f"2025100{i + 1}T000000Z-cpuhost", i + 1)
        _write(tmp_path / folder, RUN_A, 10)
        _write(tmp_path / folder, RUN_B, 11, to(beyond))
    assert _diff(tmp_path / "on").changes == []
    past = _diff(tmp_path / "past").changes
    kind = "regression" if edge == "high" else "improvement"
    assert sorted((c.metric, c.concurrency, c.kind) for c in past) == [
        ("ttft_median_ms", c, kind) for c in sorted(bands)
    ]


def test_a_level_missing_from_a_run_of_history_narrows_only_that_levels_history(tmp_path):
    def only_lowest(record: CellRecord) -> None:
        record.probes.levels = [min(record.probes.levels, key=lambda lv: lv.concurrency)]

    _write(tmp_path, "20251001T000000Z-cpuhost", 1, only_lowest)
    _write(tmp_path, "20251002T000000Z-cpuhost", 2)
    _write(tmp_path, RUN_A, 10)
    _write(tmp_path, RUN_B, 11, _level("ttft_ms", "median", 2.0))
    levels = sorted(lv.concurrency for lv in rd.cpu_records(RUN_A)[0].probes.levels)
    kinds = {c.concurrency: (c.kind, c.band.samples if c.band else None) for c in _diff(tmp_path).changes}
    assert kinds == {levels[0]: ("regression", 3), levels[1]: ("info", None)}


def test_a_tight_per_level_change_names_its_level(tmp_path):
    record = rd.cpu_records(RUN_A)[0]
    (change,) = runs(tmp_path, PLANT["failed_requests"]).regressions
    assert (change.metric, change.concurrency) == ("failed_requests", record.probes.levels[0].concurrency)


def test_a_cell_not_attempted_in_a_is_passed_over_and_one_not_attempted_in_b_is_information(tmp_path):
    """Run A lists a cell its host could not attempt before the cells it ran: those are still
    all compared. A cell run B could not attempt is one line of information with B's reason."""
    before = rd.cpu_records(RUN_A)
    first = before[0]
    writer = RunWriter(
        tmp_path,
        RunManifest(
            run_id=RUN_A, matrix_path="m.yaml", matrix_sha256="0" * 64, started_at=first.started_at, host=first.host
        ),
    )
    writer.not_on_host("Qwen3-0.6B__H100__default__vllm", "no H100 on this host")
    for record in before:
        writer.ran(record)
    writer.finish()
    after = rd.cpu_records(RUN_B, "2025-10-11T00:00:00+00:00")
    rd.write_run(tmp_path, after[1:], not_on_host=(first.cell_id,))
    diff = _diff(tmp_path)
    assert diff.compared == len(before) - 1
    verdicts = {v.cell_id: v for v in diff.cells}
    assert set(verdicts) == {r.cell_id for r in before}
    assert verdicts[first.cell_id].verdict == "not attempted"
    assert verdicts[first.cell_id].changes == [
        Change(first.cell_id, "info", "cell", "present", "not_on_host", note="no H100 on this host")
    ]


def test_a_band_reads_without_exponents():
    assert str(Band(9876.5, 12345.6, 4)) == "9,876..12,346 from 4 runs"
    assert str(Band(0.12345, 20.25, 3)) == "0.1235..20.25 from 3 runs"
    assert str(Band(1000.0, 1500.0, 5)) == "1,000..1,500 from 5 runs"  # whole numbers from 1,000 on


def test_levels_are_compared_in_order_and_only_where_both_runs_probed(tmp_path):
    """A ladder of many levels reads lowest concurrency first; a level run B did not reach (the
    ladder stopped early) is not compared."""
    ladder = (64, 2, 32, 1, 16, 8, 4)

    def levels(keep: tuple[int, ...], factor: float = 1.0) -> Callable[[CellRecord], None]:
        def plant(record: CellRecord) -> None:
            base = record.probes.levels[0]
            record.probes.levels = [base.model_copy(update={"concurrency": c}, deep=True) for c in keep]
            _level("ttft_ms", "median", factor)(record)

        return plant

    _write(tmp_path, RUN_A, 10, levels(ladder))
    _write(tmp_path, RUN_B, 11, levels(ladder[:-1], 2.0))
    changes = _diff(tmp_path).changes
    assert [c.concurrency for c in changes] == sorted(ladder[:-1])
    assert {c.metric for c in changes} == {"ttft_median_ms"}


def test_counts_stay_whole_numbers_in_a_change(tmp_path):
    (change,) = runs(tmp_path, PLANT["kv_cache_tokens"]).regressions
    assert (type(change.before), type(change.after)) == (int, int)
    assert describe(change).startswith("kv_cache_tokens: 65,536 tokens → 1,024 tokens")
