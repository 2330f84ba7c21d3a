"""The real-GPU proof (check_nvml.py) under pytest: the proof itself is marked `gpu` and skipped
where there is no GPU or no CUDA build of torch (`pytest -m gpu -s tests/gpu` prints the report
of figures).

So that the proof a GPU session runs is not code first run on the day, the same proof also runs
here against a simulated driver: a recorded NVML box whose memory and process list follow a
CPU-only stand-in (it writes what it "holds" to a file the fake driver reads). Telemetry,
hygiene and the inventory comparison are the real harness code; only NVML, nvidia-smi and torch
are played.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import check_nvml
import pytest
from check_nvml import Report, Skip, compare_inventory, prove, steps_seen
from fixtures.nvml.fake import FakePynvml

from harness.host.devices import Nvml, host_devices


@pytest.mark.gpu
def test_nvml_paths_on_a_real_gpu():
    try:
        report = prove(os.environ.get("GPU_PROOF_PYTHON", sys.executable))
    except Skip as exc:
        pytest.skip(str(exc))
    print("\n" + report.text())
    assert report.failures == [], report.text()


def smi_rows(box: str) -> list[dict[str, str]]:
    """What nvidia-smi --query-gpu prints for a recorded box (memory in MiB, PCI upper case)."""
    fake = FakePynvml(box)
    return [
        {
            "index": str(i),
            "name": d["name"],
            "memory.total": str(d["memory"]["total"] // 2**20),
            "driver_version": fake.box["driver_version"],
            "pci.bus_id": d["pci_bus_id"].upper(),
            "uuid": d["uuid"],
        }
        for i, d in enumerate(fake.devices)
    ]


def test_inventory_comparison_agrees_and_names_each_difference():
    devices = host_devices(Nvml.open(FakePynvml("mixed_l4_l40s")))
    smi = smi_rows("mixed_l4_l40s")
    assert compare_inventory(devices, smi) == []
    smi[1]["uuid"], smi[0]["memory.total"] = "GPU-other", "1024"
    problems = compare_inventory(devices, smi)
    assert len(problems) == 2 and problems[0].startswith("GPU 0 memory: harness") and "GPU 1 uuid" in problems[1]
    assert compare_inventory(devices, smi[:1]) == [f"NVML lists {len(smi)} GPUs, nvidia-smi 1"]


def test_steps_seen_counts_plateaus_not_noise():
    climb = [0.5, 0.5, 0.51, 1.5, 1.5, 1.49, 2.5, 2.5, None, 3.5, 3.5, 0.5]  # then the stand-in exits
    assert steps_seen(climb, 1.0) == 3
    assert steps_seen([0.5, 2.5, 4.5], 1.0) == 2  # two steps inside one interval each: two missed
    assert steps_seen([0.5, 0.6, 0.7, 0.8], 1.0) == 0


def test_report_prints_the_figures_for_the_readme():
    text = Report(
        gpu_name="NVIDIA H200",
        gpus=1,
        driver="570.1",
        cuda="12.8",
        allocated_gib=8,
        steps=8,
        steps_seen=8,
        samples=300,
        duration_s=15.0,
        rate_hz=19.9,
        peak_gib=8.52,
        process_gib=8.5,
        hygiene_reason="GPU 0 (NVIDIA H200) held by pid 7 (python, 8.5 GiB)",
        cvd={0: "ok"},
    ).text()
    assert "| NVIDIA H200 | 19.9 Hz | 8.52 GiB vs 8 GiB |" in text and "result: all checks passed" in text


# Plays the torch stand-in without a GPU: "holds" a CUDA context, then each step, in a state file.
SIM_STANDIN = r"""
import json, os, sys, time
gib, steps, pause = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
state, gpu = os.environ["SIM_GPU_STATE"], os.environ["CUDA_VISIBLE_DEVICES"]
uuid = json.loads(os.environ["SIM_UUIDS"])[gpu]

def hold(used):
    with open(state + ".tmp", "w") as fh:
        json.dump({"gpu": int(gpu), "pid": os.getpid(), "used": used}, fh)
    os.replace(state + ".tmp", state)

context = 2**29
hold(context)
print(json.dumps({"event": "device", "uuid": uuid.removeprefix("GPU-"), "name": "sim"}), flush=True)
time.sleep(pause)
for i in range(steps):
    hold(int(context + (i + 1) * gib * 2**30 / steps))
    print(json.dumps({"event": "step", "i": i + 1}), flush=True)
    time.sleep(pause)
print(json.dumps({"event": "held"}), flush=True)
sys.stdin.readline()
os.remove(state)
"""


class SimDriver(FakePynvml):
    """A recorded box whose memory and compute processes include what the stand-in holds."""

    def __init__(self, box: str, state: Path):
        super().__init__(box)
        self.state = state

    def _held(self, handle) -> dict | None:
        try:
            held = json.loads(self.state.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return held if held["gpu"] == handle.index else None

    def nvmlDeviceGetMemoryInfo(self, handle):
        info = super().nvmlDeviceGetMemoryInfo(handle)
        held = self._held(handle)
        if held:
            info.used, info.free = info.used + held["used"], info.free - held["used"]
        return info

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        procs = super().nvmlDeviceGetComputeRunningProcesses(handle)
        held = self._held(handle)
        return procs + [SimpleNamespace(pid=held["pid"], usedGpuMemory=held["used"])] if held else procs


@pytest.fixture
def sim(tmp_path, monkeypatch):
    box = "rtx4090x2_pcie"
    driver = SimDriver(box, tmp_path / "gpu-state.json")
    uuids = {str(i): d["uuid"] for i, d in enumerate(driver.devices)}
    monkeypatch.setenv("SIM_GPU_STATE", str(driver.state))
    monkeypatch.setenv("SIM_UUIDS", json.dumps(uuids))
    monkeypatch.setattr(check_nvml, "STANDIN", SIM_STANDIN)
    monkeypatch.setattr(check_nvml, "nvidia_smi", lambda: smi_rows(box))
    nvml = Nvml.open(driver)
    yield nvml, uuids
    nvml.close()


def test_the_proof_passes_on_a_simulated_driver(sim):
    nvml, _ = sim
    report = check_nvml._prove(nvml, sys.executable, gib=2, steps=4, pause=0.3)
    assert report.failures == [], report.text()
    assert report.rate_hz >= 10 and report.steps_seen == 4
    assert 2 <= report.peak_gib <= 2.6 and report.process_gib == pytest.approx(2.5, abs=0.01)
    assert f"held by pid {report.standin_pid}" in report.hygiene_reason
    assert report.cvd == {0: "ok", 1: "ok"}
    assert report.text().splitlines()[-1].startswith("           | NVIDIA GeForce RTX 4090 | ")


def test_the_proof_fails_on_missed_steps_and_a_wrong_device_mapping(sim, monkeypatch):
    _, uuids = sim
    # CUDA numbering that is not NVML's (CUDA_DEVICE_ORDER=FASTEST_FIRST on a mixed box), and steps
    # faster than the sampler can see.
    monkeypatch.setenv("SIM_UUIDS", json.dumps({"0": uuids["1"], "1": uuids["0"]}))
    nvml, _ = sim
    report = check_nvml._prove(nvml, sys.executable, gib=2, steps=4, pause=0.0)
    assert any(f.startswith("telemetry saw ") for f in report.failures), report.failures
    assert [f for f in report.failures if f.startswith("CUDA_VISIBLE_DEVICES=")] == [
        f"CUDA_VISIBLE_DEVICES=0: torch sees sim {uuids['1'].removeprefix('GPU-')}, NVML index 0 is {uuids['0']}",
        f"CUDA_VISIBLE_DEVICES=1: torch sees sim {uuids['0'].removeprefix('GPU-')}, NVML index 1 is {uuids['1']}",
    ]
