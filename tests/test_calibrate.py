"""`calibrate` verb: refit from records, predicted-vs-measured errors, drift alarms, table output."""

from __future__ import annotations

import json
from pathlib import Path

from harness.cli import main
from harness.plan import calibration as cal
from harness.plan import refit
from harness.schema import Cell, CellRecord, EngineConfig, EngineFacts, EngineInstall, HostFingerprint, ModelSpec
from tests.reportdata import write_run

OBS = Path(__file__).resolve().parents[1] / "harness" / "plan_data" / "observations"
PUBLIC = ("llmd_h100_vllm011.json", "llmd_h100_vllm019.json", "llmd_h100_version_sweep.json")


def test_shipped_table_is_the_fit_of_the_public_runs():
    """The table is reproducible data: refitting the public runs over the hand-kept rows gives it back."""
    table = cal.load_table()
    samples = [s for name in PUBLIC for s in refit.samples_from_observations(OBS / name)]
    hand = [r for r in table if not cal.is_fitted(r)]
    assert refit.fit(samples, hand) == table


def test_refit_keeps_ranges_without_samples():
    table = cal.load_table()
    sweep = refit.samples_from_observations(OBS / "llmd_h100_version_sweep.json")
    only_017 = [s for s in sweep if s.vllm_version == "0.17.0"]
    new = refit.fit(only_017, table)
    assert [r for r in new if r.get("vllm") != ">=0.17,<0.18"] == [r for r in table if r.get("vllm") != ">=0.17,<0.18"]


def _record(tmp: Path, version: str, activation: float, kv: float, name: str = "r") -> None:
    cell = Cell(
        model=ModelSpec(name="llama8b", source="meta-llama/Llama-3.1-8B-Instruct"),
        gpu="H100",
        config=EngineConfig(name="c", args={"max_model_len": 16000, "gpu_memory_utilization": 0.9}),
        engine=EngineInstall(name="e", python="python"),
    )
    facts = EngineFacts(
        vllm_version=version,
        outcome="ready",
        weights_gib=14.99,
        activation_peak_gib=activation,
        non_torch_gib=0.13,
        cuda_graph_gib=0.1,
        kv_cache_gib=kv,
        total_gpu_memory_gib=79.18,
    )
    rec = CellRecord(
        run_id=f"run-{name}",
        cell_id="llama8b__H100__c__e",
        key="k",
        cell=cell,
        host=HostFingerprint(hostname="h", os="linux", python="3.11", harness_version="0"),
        started_at="2025-01-01T00:00:00",
        outcome="ok",
        facts=facts,
        plan={"platform": "cuda", "kv_cache_gib": 51.0, "weights_gib": 14.99},
    )
    write_run(tmp, [rec])


def test_calibrate_drift_alarm_on_new_version(tmp_path, capsys):
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"rows": cal.load_table()}))
    _record(tmp_path / "results", "0.12.0", activation=9.5, kv=46.64)  # sampler factor roughly doubled
    code = main(["calibrate", "--results", str(tmp_path / "results"), "--table", str(table), "--write"])
    out = capsys.readouterr().out
    assert code == 1 and "ALARM drift in vLLM range <0.17: sampler_factor" in out
    rows = json.loads(table.read_text())["rows"]
    assert any(r.get("vllm") == "<0.17" and r.get("sampler_factor", 0) > 15 for r in rows)


def test_calibrate_kv_alarm_and_clean_run(tmp_path, capsys):
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"rows": cal.load_table()}))
    _record(tmp_path / "ok", "0.11.0", activation=4.76, kv=51.38)
    assert main(["calibrate", "--results", str(tmp_path / "ok"), "--table", str(table)]) == 0
    assert "stored predictions: KV GiB mean abs error" in capsys.readouterr().out
    _record(tmp_path / "bad", "0.11.0", activation=4.76, kv=40.0)  # 28% off what the model predicts
    assert main(["calibrate", "--results", str(tmp_path / "bad"), "--table", str(table), "--json"]) == 1
    assert any("KV error" in a for a in json.loads(capsys.readouterr().out)["alarms"])
