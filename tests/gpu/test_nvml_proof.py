"""The real-GPU proof (check_nvml.py) under pytest: the proof itself is marked `gpu` and skipped
where there is no GPU or no CUDA build of torch (`pytest -m gpu -s tests/gpu` prints the report
of figures). Its comparison helpers are checked here on recorded boxes, so the proof a GPU
session runs is not code first run on the day."""

from __future__ import annotations

import os
import sys

import pytest
from check_nvml import Report, Skip, compare_inventory, prove, steps_seen
from fixtures.nvml.fake import FakePynvml

from harness.devices import Nvml, host_devices


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
    return [{"index": str(i), "name": d["name"], "memory.total": str(d["memory"]["total"] // 2**20),
             "driver_version": fake.box["driver_version"], "pci.bus_id": d["pci_bus_id"].upper(), "uuid": d["uuid"]}
            for i, d in enumerate(fake.devices)]


def test_inventory_comparison_agrees_and_names_each_difference():
    devices = host_devices(Nvml.open(FakePynvml("mixed_l4_l40s")))
    smi = smi_rows("mixed_l4_l40s")
    assert compare_inventory(devices, smi) == []
    smi[1]["uuid"], smi[0]["memory.total"] = "GPU-other", "1024"
    problems = compare_inventory(devices, smi)
    assert len(problems) == 2 and problems[0].startswith("GPU 0 memory: harness") and "GPU 1 uuid" in problems[1]
    assert compare_inventory(devices, smi[:1]) == [f"NVML lists {len(smi)} GPUs, nvidia-smi 1"]


def test_steps_seen_counts_plateaus_not_noise():
    climb = [0.5, 0.5, 0.51, 1.5, 1.5, 1.49, 2.5, 2.5, 4.5, 4.5, None, 4.5]  # the last rise spans two steps
    assert steps_seen(climb, 1.0) == 4
    assert steps_seen([0.5, 0.6, 0.7, 0.8], 1.0) == 0


def test_report_prints_the_figures_for_the_readme():
    text = Report(gpu_name="NVIDIA H200", gpus=1, driver="570.1", cuda="12.8", allocated_gib=8, steps=8,
                  steps_seen=8, samples=300, duration_s=15.0, rate_hz=19.9, peak_gib=8.52, process_gib=8.5,
                  hygiene_reason="GPU 0 (NVIDIA H200) held by pid 7 (python, 8.5 GiB)", cvd={0: "ok"}).text()
    assert "| NVIDIA H200 | 19.9 Hz | 8.52 GiB vs 8 GiB |" in text and "result: all checks passed" in text
