"""Reports rebuilt from logs users already have: `ingest` the fixture logs, render, and check
every page is valid GFM and carries the failure classes and remedies read from the logs."""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.cli import main as cli_main
from harness.report import render_reports
from harness.store import iter_records
from tests.test_report import tables

LOGS = Path(__file__).parent / "fixtures" / "logs"


def test_ingested_logs_make_a_valid_report(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in ("cpu_0_32_harness_tiny_chat_ready", "cpu_0_32_harness_unsupported_arch", "cpu_0_32_harness_maxlen_4m"):
        shutil.copy(LOGS / f"{name}.log", logs / f"{name}.log")
    results, reports = tmp_path / "results", tmp_path / "reports"
    assert cli_main(["ingest", str(logs), "--results", str(results)]) == 0
    records = [r for _, r in iter_records(results)]
    assert len(records) == 3
    written = render_reports(results, reports)
    assert reports / "README.md" in written
    text = ""
    for page in sorted(reports.rglob("*.md")):
        body = page.read_text()
        text += body
        for table in tables(body):
            assert len({len(row) for row in table}) == 1, f"ragged table in {page}"
            assert len(table) > 1, f"header-only table in {page}"
            for i, name in enumerate(table[0]):
                assert any(r[i] not in ("", "—", "N/A") for r in table[1:]), f"{page}: {name!r} is all missing"
    # The feasibility frontier: what worked (512) and vLLM's own estimate from the failed cell
    # (no ingested cell sets a utilization: that column is left out).
    assert "| tiny-chat | cpu | 512 | 4,096.00 | 2,097,024 |" in (reports / "insights.md").read_text()
    for needle in (
        "unsupported_architecture",
        "max_model_len_exceeds_kv",
        "2,097,024",
        "TinyHarnessUnknownForCausalLM",
    ):
        assert needle in text, needle


def test_every_ingested_log_keeps_its_own_cell(tmp_path):
    """N differently named logs are N cells on the device and matrix pages, even where model,
    device, args and version coincide; the same log ingested twice keeps its key."""
    logs = sorted(LOGS.glob("*.log"))
    results, reports = tmp_path / "results", tmp_path / "reports"
    folder = tmp_path / "logs"
    folder.mkdir()
    for path in logs:
        shutil.copy(path, folder / path.name)
    assert cli_main(["ingest", str(folder), "--results", str(results)]) == 0
    records = [r for _, r in iter_records(results)]
    assert len(records) == len(logs) and len({r.key for r in records}) == len(logs)
    render_reports(results, reports)
    from harness.report.aggregate import load

    latest = load([results]).latest
    assert len(latest) == len(logs)
    rows = sum(
        len(table) - 1
        for page in (reports / "devices").glob("*.md")
        for table in tables(page.read_text())
        if table and table[0] and table[0][0] == "Model"
    )
    assert rows >= len(logs)
    # ingesting the same folder again: same keys, so the latest view still has one row per log
    assert cli_main(["ingest", str(folder), "--results", str(results)]) == 0
    assert len(load([results]).latest) == len(logs)
