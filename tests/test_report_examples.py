"""reports/examples/: the report of real public GPU logs is current, labelled as ingested,
links every log's source, and carries no noise (golden pages: the committed example itself)."""

from __future__ import annotations

import json
from pathlib import Path

from harness.report import examples
from tests.test_report import tables

COMMITTED = Path(__file__).resolve().parents[1] / "reports" / "examples"


def test_examples_are_current_and_labelled(tmp_path):
    out = tmp_path / "examples"
    examples.build(examples.FIXTURES, out)
    # golden: device, matrix and insights pages as committed (run pages also state the build time)
    pages = sorted(p.relative_to(out) for p in out.rglob("*.md") if "runs" not in p.parts and p.name != "README.md")
    assert pages and pages == sorted(
        p.relative_to(COMMITTED) for p in COMMITTED.rglob("*.md") if "runs" not in p.parts and p.name != "README.md"
    )
    for page in pages:
        assert (out / page).read_text() == (COMMITTED / page).read_text(), (
            f"{page}: stale; rebuild with `python -m harness.report.examples` and review the diff"
        )
    text = "".join((out / p).read_text() for p in pages)
    assert "**Ingested:**" in (out / "README.md").read_text()
    for name, _ in examples.LOGS:
        url = examples.source_url(examples.FIXTURES / f"{name}.expected.json")
        assert url.startswith("https://github.com/") and f"({url})" in text, name
    for page in pages:
        for table in tables((out / page).read_text()):
            assert len(table) > 1, f"{page}: header-only table"
            for i, header in enumerate(table[0]):
                assert any(r[i] not in ("", "—", "N/A") for r in table[1:]), f"{page}: {header!r} all missing"
    record = next(out.rglob("*v0_10_2_tp2_worker_prefixes*/record.json"))
    assert json.loads(record.read_text())["cell"]["config"]["args"]["tensor_parallel_size"] == 2  # from its ranks
    assert "https://huggingface.co/unknown" not in text
