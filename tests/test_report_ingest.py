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
    for name in ("cpu_0_32_harness_tiny_chat_ready", "cpu_0_32_harness_unsupported_arch",
                 "cpu_0_32_harness_maxlen_4m"):
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
    # The feasibility frontier: what worked (512) and vLLM's own estimate from the failed cell.
    assert "| tiny-chat | cpu | 512 | 4096.00 | — | 2,097,024 |" in (reports / "insights.md").read_text()
    for needle in ("unsupported_architecture", "max_model_len_exceeds_kv", "2,097,024", "TinyHarnessUnknownForCausalLM"):
        assert needle in text, needle
