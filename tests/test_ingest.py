"""`ingest DIR`: one record per log, model/args from the log, secrets redacted; `parse-log`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from harness.cli import main
from harness.store import iter_records, read_runs

FIXTURES = Path(__file__).parent / "fixtures" / "logs"
HF = "hf_PlantedIngestToken0123456789"


def test_ingest_folder(tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(FIXTURES / "cpu_0_32_tiny_llama_ready.log", logs / "tiny.log")
    shutil.copy(FIXTURES / "gated_llama_oserror.log", logs / "gated.txt")
    text = (FIXTURES / "heads_not_divisible_pydantic_64_3.log").read_text()
    (logs / "sub").mkdir()
    (logs / "sub" / "tp3.log").write_text(f"INFO 01-01 00:00:00 [x.py:1] token {HF} --api-key sekrit-9\n" + text)
    results = tmp_path / "results"
    assert main(["ingest", str(logs), "--results", str(results)]) == 0
    records = {rec.cell.config.name: rec for _, rec in iter_records(results)}
    assert set(records) == {"tiny", "gated", "sub-tp3"}
    tiny = records["tiny"]
    assert tiny.cell.model.source == "/tmp/tiny/model"
    assert tiny.cell.config.args == {"max_model_len": 256}
    assert tiny.engine_version == "0.32.0" and tiny.cell.engine.name == "vllm-0.32.0"
    assert tiny.facts.kv_cache_tokens == 524288
    assert records["gated"].outcome == "failed" and records["gated"].failure_class == "gated_or_auth"
    tp3 = records["sub-tp3"]
    assert tp3.cell.config.args["tensor_parallel_size"] == 3
    assert tp3.cell.model.source == "/app/data/deepseek-v4-flash-0731/model"
    assert tp3.host.hostname == "ingested"
    stored = (results / tp3.run_id / tp3.cell_id / "engine.log").read_text()
    assert HF not in stored and "sekrit-9" not in stored
    assert HF not in (results / tp3.run_id / tp3.cell_id / "record.json").read_text()
    runs = read_runs([results]).runs
    assert len(runs) == 1 and len(runs[0].manifest.cells) == 3


def test_ingest_bad_input(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "nope")]) == 2
    assert main(["ingest", str(tmp_path)]) == 2


def test_parse_log_cli(capsys, tmp_path):
    path = FIXTURES / "v0_11_debug_full_breakdown.log"
    assert main(["parse-log", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["weights_gib"] == 14.9889 and data["outcome"] == "ready"
    assert main(["parse-log", str(path)]) == 0
    out = capsys.readouterr().out
    assert "outcome: ready" in out and "443,424 tokens" in out
    assert main(["parse-log", str(tmp_path / "missing.log")]) == 2


def test_ingest_labels_what_the_log_does_not_say(tmp_path, capsys):
    """--gpu names the device of logs that print none; TP comes from the ranks the log shows;
    a sidecar wins over the command line; a cut log is inconclusive; a non-log is skipped."""
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(FIXTURES / "v0_10_2_tp2_worker_prefixes.log", logs / "tp2.log")  # Worker_TP0 and _TP1 lines
    shutil.copy(FIXTURES / "v0_6_3_t4_v0_header_ready.log", logs / "cut.log")  # neither ready nor an error
    shutil.copy(FIXTURES / "v0_11_debug_full_breakdown.log", logs / "ready.log")
    (logs / "ready.json").write_text(
        json.dumps(
            {
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "gpu_memory_gib": 80.0,
                "source": "https://github.com/example/repo/issues/1",
            }
        )
    )
    (logs / "tp2.json").write_text(json.dumps({"gpu_memory_gib": 79.18, "tp": 4}))
    (logs / "notes.txt").write_text("copied from the ticket, see the other files\n")
    results = tmp_path / "results"
    assert main(["ingest", str(logs), "--results", str(results), "--gpu", "H100", "--model", "some-model"]) == 0
    err = capsys.readouterr().err
    assert "skipped notes.txt: not a vLLM engine log" in err
    records = {rec.cell.config.name: rec for _, rec in iter_records(results)}
    assert set(records) == {"tp2", "cut", "ready"}
    tp2 = records["tp2"]
    assert tp2.cell.gpu == "H100" and tp2.host.devices[0].name == "H100"
    assert tp2.cell.config.args["tensor_parallel_size"] == 2  # the ranks seen beat the sidecar's 4
    assert tp2.host.devices[0].memory_total_gib == 79.18
    assert tp2.cell.model.source == "some-model" and tp2.cell.model.name == "some-model"
    cut = records["cut"]
    assert cut.outcome == "inconclusive" and cut.failure_class is None
    assert cut.cell.model.name == "Qwen2.5-0.5B"  # the log names its model: the flag does not override it
    ready = records["ready"]
    assert ready.cell.model.source == "meta-llama/Llama-3.1-8B-Instruct"  # the sidecar wins over --model
    # the log states its memory: the sidecar's 80 does not override it
    assert ready.host.devices[0].memory_total_gib == 79.19 and ready.log_source.endswith("/issues/1")

    from harness.report import render_reports

    reports = tmp_path / "reports"
    render_reports(results, reports)
    device = (reports / "devices" / "h100.md").read_text()
    assert "❔ inconclusive" in device and "**1** inconclusive (not counted as failures)" in device
    assert "[**Llama-3.1-8B-Instruct**](https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct)" in device
    assert "huggingface.co/some-model" not in device  # not a hub id: no link
    assert "| 2/1 |" in device
    insights = (reports / "insights.md").read_text()
    success = {
        ln.split("|")[2].strip(): [c.strip() for c in ln.split("|")[3:8]]
        for ln in insights.split("## Success rate", 1)[1].splitlines()
        if ln.startswith("| H100 |")
    }
    # ok, failed, skipped, inconclusive, rate: the cut log is no failure and leaves the rate alone
    assert success == {"0.6.3.post1": ["0", "0", "0", "1", "—"], "unknown": ["1", "1", "0", "0", "50%"]}


def test_ingest_rejects_a_bad_sidecar_and_tp(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(FIXTURES / "v0_11_debug_full_breakdown.log", logs / "a.log")
    assert main(["ingest", str(logs), "--tp", "0"]) == 2
    (logs / "a.json").write_text('{"gpus": "H100"}')
    assert main(["ingest", str(logs), "--results", str(tmp_path / "r")]) == 2
