"""diff: a planted regression in every tracked metric is flagged; identical runs give nothing."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.cli import main as cli_main
from harness.diff import METRICS, diff_runs
from harness.report.aggregate import load
from harness.schema import CellRecord
from tests import reportdata as rd

RUN_A, RUN_B = "20251010T000000Z-cpuhost", "20251011T000000Z-cpuhost"


def _level(metric: str, stat: str, factor: float) -> Callable[[CellRecord], None]:
    def plant(record: CellRecord) -> None:
        for level in record.probes["levels"]:
            if stat:
                level[metric][stat] *= factor
            else:
                level[metric] *= factor
    return plant


def _set(attr: str, name: str, value) -> Callable[[CellRecord], None]:
    return lambda record: setattr(getattr(record, attr), name, value)


# how to make each tracked metric worse on the first CPU cell (tiny-llama)
PLANT: dict[str, Callable[[CellRecord], None]] = {
    "kv_cache_tokens": _set("facts", "kv_cache_tokens", 1024),
    "max_concurrency": _set("facts", "max_concurrency", 1.0),
    "spawn_to_ready_s": _set("timings", "spawn_to_ready_s", 90.0),
    "load_s": _set("facts", "load_seconds", 20.0),
    "output_throughput": _level("output_throughput", "", 0.5),
    "ttft_median_ms": _level("ttft_ms", "median", 2.0),
    "ttft_p99_ms": _level("ttft_ms", "p99", 2.0),
    "tpot_median_ms": _level("tpot_ms", "median", 2.0),
    "itl_median_ms": _level("itl_ms", "median", 2.0),
    "itl_p99_ms": _level("itl_ms", "p99", 2.0),
    "e2el_median_ms": _level("e2el_ms", "median", 2.0),
    "failed_requests": lambda r: r.probes["levels"][0].update(failed=3),
    "status": lambda r: (setattr(r, "outcome", "failed"), setattr(r, "failure_class", "timeout")),
    "validation": _set("validation", "passed", False),
}


def runs(tmp_path: Path, plant: Callable[[CellRecord], None] | None = None, *, reverse: bool = False,
         not_on_host: bool = False):
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
    if not_on_host:
        rd.write_run(tmp_path, before)
        rd.write_run(tmp_path, after[1:], not_on_host=(after[0].cell_id,))
    else:
        rd.write_run(tmp_path, before)
        rd.write_run(tmp_path, after)
    by_id = {run.run_id: run for run in load(tmp_path).runs}
    return diff_runs(by_id[RUN_A], by_id[RUN_B])


def test_every_tracked_metric_has_a_planted_regression():
    assert {m.name for m in METRICS} | {"status", "validation"} == set(PLANT)


def test_identical_runs_have_no_changes(tmp_path):
    diff = runs(tmp_path)
    assert diff.changes == [] and diff.compared == 6


@pytest.mark.parametrize("metric", sorted(PLANT))
def test_planted_regression_is_flagged(tmp_path, metric):
    diff = runs(tmp_path, PLANT[metric])
    flagged = {(c.cell_id, c.metric) for c in diff.regressions}
    assert ("tiny-llama__cpu__default__vllm-cpu", metric) in flagged
    assert {cell for cell, _ in flagged} == {"tiny-llama__cpu__default__vllm-cpu"}
    assert not diff.improvements


@pytest.mark.parametrize("metric", sorted(PLANT))
def test_the_reverse_move_is_an_improvement(tmp_path, metric):
    diff = runs(tmp_path, PLANT[metric], reverse=True)
    assert metric in {c.metric for c in diff.improvements}
    assert not diff.regressions


def test_moves_within_thresholds_are_ignored(tmp_path):
    def small(record: CellRecord) -> None:
        record.timings.spawn_to_ready_s += 3.0  # 13 %, under 20 % and the 5 s floor
        _level("ttft_ms", "median", 1.05)(record)
    assert runs(tmp_path, small).changes == []


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
    runs(results, PLANT["ttft_median_ms"])
    md = tmp_path / "diff.md"
    assert cli_main(["diff", RUN_A, RUN_B, "--results", str(results), "--json", "--markdown", str(md)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert {c["metric"] for c in out["regressions"]} == {"ttft_median_ms"}
    assert out["thresholds"][0]["metric"] == "kv_cache_tokens"
    text = md.read_text()
    assert "## Regressions" in text and "| ttft_median_ms | 1 |" in text and "## Thresholds" in text
    assert cli_main(["diff", RUN_A, RUN_A, "--results", str(results)]) == 0
    assert "0** regressions" in capsys.readouterr().out
    assert cli_main(["diff", RUN_A, "nope", "--results", str(results)]) == 2
