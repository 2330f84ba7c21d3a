"""The runner on a (recorded) 8-GPU box: cells packed onto disjoint GPUs at the same time, a busy
GPU turned into a clear skip. The engine is the scripted stand-in (tests/standin): this machine
has no GPU, and these are timing facts the real CPU engine cannot give."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from fixtures.nvml.fake import FakePynvml

from harness import store
from harness.errors import InputError
from harness.host.devices import Nvml, host_devices
from harness.host.fingerprint import Host
from harness.matrix import load_matrix
from harness.run.cell import RunOptions
from harness.run.packing import expected_seconds
from harness.run.scheduler import Scheduler, check_placements
from harness.schema import EngineVersions, HostFingerprint

STANDIN = Path(__file__).parent / "standin"


def make_matrix(tmp: Path, trace: Path, start_s: float) -> Path:
    for name in ("m1", "m2", "m3"):
        folder = tmp / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    env = f"{{PYTHONPATH: {STANDIN}, STANDIN_TRACE: {trace}, STANDIN_START_S: {start_s}}}"
    text = f"""
engines: [{{name: standin, python: {sys.executable}}}]
models: [{{model: ./m1}}, {{model: ./m2}}, {{model: ./m3}}]
gpus: [H100]
configs:
  - {{name: tp1, args: {{}}, env: {env}}}
  - {{name: tp2, args: {{tensor_parallel_size: 2}}, env: {env}}}
  - {{name: tp4, args: {{tensor_parallel_size: 4}}, env: {env}}}
timeouts: {{ready_s: 60, request_s: 10}}
probe: none
"""
    path = tmp / "matrix.yaml"
    path.write_text(text)
    return path


def fake_run(tmp: Path, fake: FakePynvml, start_s: float = 1.5, timeouts: str | None = None) -> tuple[Scheduler, Path]:
    trace = tmp / "trace.jsonl"
    path = make_matrix(tmp, trace, start_s)
    if timeouts:
        path.write_text(path.read_text().replace("timeouts: {ready_s: 60, request_s: 10}", f"timeouts: {timeouts}"))
    matrix = load_matrix(path)
    nvml = Nvml.open(fake)
    devices = host_devices(nvml)
    engine = EngineVersions(python=sys.executable, distribution="vllm", vllm="0.0.0-standin", platform="cuda")
    host = Host(
        devices=devices,
        engines={"standin": engine},
        arg_actions={"standin": {}},
        fingerprint=HostFingerprint(hostname="box", os="linux", python="3", devices=devices, harness_version="test"),
    )
    run = Scheduler(matrix, host, RunOptions(results_dir=tmp / "results", plan=False, progress="quiet", gpu_wait_s=0.5))
    run.nvml = nvml
    return run, trace


def test_cells_share_the_box_on_disjoint_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    run, trace = fake_run(tmp_path, FakePynvml("h100x8_nvswitch"))
    manifest = run.run(run.matrix.cells)
    assert {e.outcome for e in manifest.cells} == {"ok"} and len(manifest.cells) == 9
    spans = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(spans) == 9
    need = {"tp1": 1, "tp2": 2, "tp4": 4}
    for rec_path in (tmp_path / "results").glob("*/*/record.json"):
        rec = json.loads(rec_path.read_text())
        assert len(rec["device_ids"]) == need[rec["cell"]["config"]["name"]]
    # No GPU is ever given to two engines at once; and engines did run side by side.
    overlapping = 0
    for i, a in enumerate(spans):
        for b in spans[i + 1 :]:
            if a["start"] < b["end"] and b["start"] < a["end"]:
                overlapping += 1
                assert not set(a["cvd"].split(",")) & set(b["cvd"].split(",")), (a, b)
    assert overlapping >= 3
    serial = sum(s["end"] - s["start"] for s in spans)
    wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
    assert wall < serial / 2


def test_foreign_process_on_the_gpus_is_a_clear_skip(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    fake = FakePynvml("h100x8_nvswitch")
    for gpu in range(8):
        fake.add_process(gpu, pid=4242, used=30 * 2**30, name="python3")
        fake.set_memory_used(gpu, 31 * 2**30)
    run, trace = fake_run(tmp_path, fake)
    cells = [c for c in run.matrix.cells if c.config.name == "tp1"][:1]
    manifest = run.run(cells)
    assert [e.outcome for e in manifest.cells] == ["skipped"]
    rec = json.loads(next((tmp_path / "results").glob("*/*/record.json")).read_text())
    assert "pid 4242 (python3" in rec["skip_reason"] and rec["failure_class"] is None
    assert not trace.exists()  # no engine was started


def test_tp_larger_than_the_hosts_gpus_is_a_located_matrix_error(tmp_path):
    run, _ = fake_run(tmp_path, FakePynvml("rtx4090x2_pcie"))
    text = run.matrix.path.read_text().replace("gpus: [H100]", "gpus: [RTX 4090]")
    run.matrix.path.write_text(text)
    matrix = load_matrix(run.matrix.path)
    with pytest.raises(InputError) as info:
        check_placements(matrix, run.host)
    msg = str(info.value)
    assert "matrix.yaml:8:" in msg and "needs 4 GPUs" in msg and "has 2 RTX 4090" in msg


def test_cell_timeout_stops_a_cell_that_runs_too_long(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.setenv("STANDIN_ANSWER_S", "60")  # the engine never answers the validation in time
    run, trace = fake_run(
        tmp_path, FakePynvml("h100x8_nvswitch"), start_s=0.5, timeouts="{ready_s: 60, request_s: 120, cell_s: 6}"
    )
    cells = [c for c in run.matrix.cells if c.config.name == "tp1"][:1]
    started = time.monotonic()
    manifest = run.run(cells)
    assert time.monotonic() - started < 6 + 20
    rec = json.loads(next((tmp_path / "results").glob("*/*/record.json")).read_text())
    assert [e.outcome for e in manifest.cells] == ["failed"]
    assert rec["failure_class"] == "timeout" and "timeouts.cell_s (6 s) during validation" in rec["failure_detail"]


def test_recorded_durations_put_the_longest_cells_first(tmp_path, monkeypatch):
    """What the runner wrote sets each job's expected duration: on two GPUs, a second run starts
    the two cells whose records say they took longest before the short one (matrix order would
    start m1 and m2 and leave m3 for last)."""
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    run, trace = fake_run(tmp_path, FakePynvml("rtx4090x2_pcie"))
    run.matrix.path.write_text(run.matrix.path.read_text().replace("gpus: [H100]", "gpus: [RTX 4090]"))
    matrix = load_matrix(run.matrix.path)
    cells = [
        next(c for c in matrix.cells if c.config.name == "tp1" and c.model.name == name) for name in ("m1", "m2", "m3")
    ]
    first = Scheduler(matrix, run.host, run.options)
    first.nvml = run.nvml
    first.run(cells)
    for path, record in store.read_runs([tmp_path / "results"]).records():  # as if m2 and m3 were slow
        if record.cell.model.name != "m1":
            record.timings.spawn_to_ready_s = 400.0 if record.cell.model.name == "m2" else 500.0
            store.atomic_write_text(path, record.model_dump_json())
    expected = expected_seconds(r for _, r in store.read_runs([tmp_path / "results"]).records())
    assert expected[cells[2].cell_id] > expected[cells[1].cell_id] > expected[cells[0].cell_id]
    trace.unlink()
    again = Scheduler(
        matrix,
        run.host,
        RunOptions(results_dir=tmp_path / "results", plan=False, progress="quiet", force=True, gpu_wait_s=0.5),
    )
    again.nvml = run.nvml
    again.run(cells)
    spans = sorted((json.loads(line) for line in trace.read_text().splitlines()), key=lambda s: s["start"])
    assert spans[-1]["model"] == "m1", spans
