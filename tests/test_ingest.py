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
