"""Reports: the seed-002 golden table, GFM validity, links, units, determinism, exports, CLI."""

from __future__ import annotations

import filecmp
import json
import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from harness.cli import main as cli_main
from harness.errors import InputError
from harness.report import render_reports
from harness.report.aggregate import load
from harness import store
from tests import reportdata as rd

GFM = MarkdownIt("commonmark", {"html": True}).enable("table")
# headers of numeric columns that are counts or identities, so carry no unit
UNITLESS = {"TP", "TP Size", "TP needed", "Max Model Len", "Concurrency", "At concurrency", "Requests", "Failed",
            "ok", "failed", "skipped", "Cells", "Cells ok", "Cells failed", "Cells skipped", "not on host"}


def tables(markdown: str) -> list[list[list[str]]]:
    """Every GFM table as rows of cell texts (header first), as GitHub would parse them."""
    out, rows, row, inline = [], None, None, False
    for tok in GFM.parse(markdown):
        if tok.type == "table_open":
            rows = []
        elif tok.type == "table_close":
            out.append(rows)
        elif tok.type == "tr_open":
            row = []
        elif tok.type == "tr_close":
            rows.append(row)
        elif tok.type == "inline" and rows is not None and row is not None and inline:
            text = "".join(c.content for c in tok.children if c.type in ("text", "code_inline"))
            row.append(text.strip())
        if tok.type in ("th_open", "td_open"):
            inline = True
        elif tok.type in ("th_close", "td_close"):
            inline = False
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("tree")
    rd.populate(base / "results")
    render_reports(base / "results", base / "reports")
    return base


def pages(tree: Path) -> list[Path]:
    return sorted((tree / "reports").rglob("*.md"))


def run_page(tree: Path, run_id: str) -> str:
    return (tree / "reports" / "runs" / f"{run_id}.md").read_text()


def test_golden_seed002_summary_table(tree):
    golden = tables(rd.SEED002_SUMMARY)[0]
    text = run_page(tree, rd.H100_RUN)
    summary = text.split("## Summary Table", 1)[1]
    rendered = tables(summary)[0]
    assert rendered[0] == golden[0]
    assert len(rendered) == len(golden)
    for got, want in zip(rendered[1:], golden[1:]):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            if re.fullmatch(r"-?\d+(\.\d+)?", w):
                assert float(g) == float(w), (got, want)
            else:
                assert g == w, (got, want)


def test_every_table_is_valid_gfm(tree):
    for page in pages(tree):
        text = page.read_text()
        pipe_lines = [ln for ln in text.splitlines() if ln.startswith("|") and not re.fullmatch(r"[|:\- ]+", ln)]
        parsed = tables(text)
        assert sum(len(t) for t in parsed) == len(pipe_lines), f"{page}: a table line is not in a GFM table"
        for table in parsed:
            widths = {len(r) for r in table}
            assert len(widths) == 1, f"{page}: ragged table {table[0]}"


def test_numeric_columns_carry_units(tree):
    number = re.compile(r"-?[\d,]+(\.\d+)?( @ \d+)?%?")
    for page in pages(tree):
        for table in tables(page.read_text()):
            header, body = table[0], table[1:]
            for col, name in enumerate(header):
                values = [r[col] for r in body if r[col] not in ("", "N/A", "—")]
                if not values or not all(number.fullmatch(v) for v in values) or name in UNITLESS:
                    continue
                if name == "Value":  # key/value table: the unit is in each row's label
                    assert all("(" in r[0] for r in body), f"{page}: {body}"
                else:
                    assert "(" in name or "util" in name.lower() or "rate" in name.lower(), f"{page}: {name!r}"


def test_relative_links_and_anchors_resolve(tree):
    link = re.compile(r"\]\(([^)\s]+)\)")
    for page in pages(tree):
        text = page.read_text()
        for target in link.findall(text):
            if target.startswith("http"):
                continue
            path, _, frag = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page}: broken link {target}"
            if frag and dest.suffix == ".md":
                assert f'<a id="{frag}"></a>' in dest.read_text() or frag == "metric-definitions", target


def test_rendering_is_deterministic(tree):
    # a sibling of reports/, so relative links into results/ read the same
    render_reports(tree / "results", tree / "again")
    cmp = filecmp.dircmp(tree / "reports", tree / "again")

    def same(c: filecmp.dircmp) -> None:
        assert not c.left_only and not c.right_only
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors, mismatch
        for sub in c.subdirs.values():
            same(sub)

    same(cmp)
    svg = next((tree / "reports").rglob("*.svg")).read_text()
    assert "<dc:date>" not in svg


def test_device_pages(tree):
    cpu = (tree / "reports" / "devices" / "cpu.md").read_text()
    assert "# Compatibility on cpu" in cpu
    failures = cpu.split("## Incompatible cells by failure class", 1)[1].split("## Gated models")[0]
    assert "### `unsupported_architecture` (1 cell)" in failures and "BertForMaskedLM" in failures
    assert "### `validation_failed` (1 cell)" in failures
    assert "gated_or_auth" not in failures  # has its own section
    gated = cpu.split("## Gated models", 1)[1]
    assert "Llama-3.2-1B" in gated and "HF_TOKEN" in gated
    assert "## Skipped cells" in cpu and "predicted not to fit" in cpu
    h100 = (tree / "reports" / "devices" / "nvidia-h100-80gb-hbm3.md").read_text()
    row = next(r for r in tables(h100)[0] if r[0] == "Qwen3-0.6B")
    assert row[11] == "527,968" and row[3] == "✅ ok" and row[13] == "✅ passed"
    assert "![Memory breakdown" in h100 and "![Load time" in h100


def test_run_page_sections(tree):
    text = run_page(tree, rd.CPU_RUN)
    assert "| NOT ON HOST |" in text and "no H100 on this host" in text
    assert "#### Probe results" in text and "probes-cell-tiny-llama" in text
    assert "| Peak RSS of the engine's processes (GiB, sampled) | 2.10 |" in text  # the sampler's figure
    gpu = run_page(tree, rd.H100_RUN)
    assert "`--kv-cache-memory=53414341735` (49.75 GiB)" in gpu
    assert "[Engine log](../../results/" in gpu


def test_index_matrix_and_insights(tree):
    index = (tree / "reports" / "README.md").read_text()
    assert "## Metric definitions" in index and "TPOT" in index
    runs = tables(index.split("## Runs", 1)[1])[0]
    assert [r[0] for r in runs[1:]] == [rd.CPU_RUN_2, rd.CPU_RUN, rd.H100_RUN]
    matrix = tables((tree / "reports" / "matrix.md").read_text())[0]
    llama70 = next(r for r in matrix if r[0] == "Llama-3.3-70B-FP8")
    assert llama70[1:] == ["✅ 1/2", "—"]
    insights = (tree / "reports" / "insights.md").read_text()
    largest = tables(insights)[0]
    assert largest[1][:5] == ["NVIDIA H100 80GB HBM3", "Llama-3.1-8B (default)", "14.99", "Llama-3.3-70B-FP8 (TP=2)",
                              "33.88"]
    assert "`BertForMaskedLM`" in insights
    success = tables(insights.split("## Success rate", 1)[1])[0]
    assert success[-1] == ["all devices", "all", "6", "5", "1", "55%"]


def test_exports(tree):
    latest = load(tree / "results").latest
    data = json.loads((tree / "reports" / "data" / "cells.json").read_text())
    assert len(data) == len(latest) == 12
    qwen = next(r for r in data if r["model"] == "Qwen3-0.6B")
    assert qwen["kv_cache_tokens"] == 527968 and qwen["cuda_graph_gib"] == 0.10
    csv = (tree / "reports" / "data" / "history.csv").read_text().splitlines()
    assert len(csv) == 1 + 18 and csv[0].startswith("run_id,cell_id,key")


def test_latest_is_per_key_and_history_keeps_all(tree):
    results = load(tree / "results")
    llama = results.latest[results.latest["model"] == "tiny-llama"]
    assert list(llama["run_id"]) == [rd.CPU_RUN_2]
    assert len(results.history[results.history["model"] == "tiny-llama"]) == 2


def test_records_without_manifest_like_ingest(tmp_path):
    for record in rd.cpu_records("20250101T000000Z-ingest"):
        path = store.record_path(tmp_path / "results", record.run_id, record.cell_id)
        store.atomic_write_text(path, record.model_dump_json())
    written = render_reports(tmp_path / "results", tmp_path / "reports")
    text = (tmp_path / "reports" / "runs" / "20250101T000000Z-ingest.md").read_text()
    assert text.count("<a id=") == 6 and tmp_path / "reports" / "README.md" in written


def test_secret_env_values_stay_out(tmp_path):
    record = rd.cpu_records()[0]
    record.cell.config.env = {"HF_TOKEN": "hf_supersecretvalue", "VLLM_CPU_KVCACHE_SPACE": "4"}
    rd.write_run(tmp_path / "results", [record])
    render_reports(tmp_path / "results", tmp_path / "reports")
    texts = [p.read_text() for p in (tmp_path / "reports").rglob("*") if p.is_file()]
    assert not any("hf_supersecretvalue" in t for t in texts)
    assert any("VLLM_CPU_KVCACHE_SPACE=4" in t for t in texts)


def test_empty_results_and_unknown_run(tmp_path):
    (tmp_path / "results").mkdir()
    render_reports(tmp_path / "results", tmp_path / "reports")
    assert "No result records yet" in (tmp_path / "reports" / "README.md").read_text()
    with pytest.raises(InputError, match="no run nope"):
        render_reports(tmp_path / "results", tmp_path / "reports", ["nope"])


def test_run_subset_and_published_history(tmp_path):
    rd.populate(tmp_path / "results")
    render_reports(tmp_path / "results", tmp_path / "reports", [rd.CPU_RUN])
    assert [p.stem for p in (tmp_path / "reports" / "runs").glob("*.md")] == [rd.CPU_RUN]
    # every run was published: a fresh clone (no results/) rebuilds all pages and deletes none
    published = tmp_path / "reports" / "data" / "runs"
    assert sorted(p.name for p in published.iterdir()) == sorted([rd.H100_RUN, rd.CPU_RUN, rd.CPU_RUN_2])
    (tmp_path / "reports" / "runs" / "other-host.md").write_text("a page published elsewhere")
    (tmp_path / "fresh").mkdir()
    render_reports(tmp_path / "fresh", tmp_path / "reports")
    pages = {p.stem for p in (tmp_path / "reports" / "runs").glob("*.md")}
    assert pages == {rd.H100_RUN, rd.CPU_RUN, rd.CPU_RUN_2, "other-host"}
    cpu = (tmp_path / "reports" / "devices" / "cpu.md").read_text()
    assert "tiny-llama" in cpu


def test_report_cli(tmp_path, capsys):
    rd.populate(tmp_path / "results")
    assert cli_main(["report", "--results", str(tmp_path / "results"), "--reports", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "matrix.md").exists()
    assert cli_main(["report", "--results", str(tmp_path / "missing"), "--reports", str(tmp_path / "r")]) == 2
    assert "no such folder" in capsys.readouterr().err
