"""Telemetry sampler: a real process tree for the CPU engine, recorded NVML boxes for GPUs."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
import time

import psutil
import pynvml
import pytest
from fixtures.nvml.fake import FakePynvml

from harness.host.devices import Nvml
from harness.run.telemetry import Sampler

GIB = 2**30

# A parent that starts two children; each holds ~80 MiB of touched memory. One child spins,
# so the tree's CPU% must show it. The parent prints once both children are up.
TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    child = "import sys, time; b = bytearray(80 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
    spin = child + "t = time.time()\\nwhile time.time() - t < 60: pass"
    idle = child + "time.sleep(60)"
    kids = [subprocess.Popen([sys.executable, "-c", c]) for c in (spin, idle)]
    print("up", flush=True)
    time.sleep(60)
    """
)


@pytest.fixture
def process_tree():
    root = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    try:
        assert root.stdout.readline().strip() == "up"
        yield root
    finally:
        for child in psutil.Process(root.pid).children(recursive=True):
            child.kill()
        root.kill()
        root.wait()


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_cpu_engine_tree_rss_cpu_and_series(process_tree, tmp_path):
    sampler = Sampler(process_tree.pid, [])
    sampler.start()
    # Ready once both children hold their memory (80 MiB each, plus the interpreters).
    assert wait_for(lambda: (sampler.rows[-1].get("rss_gib") or 0) > 0.17)
    sampler.mark_ready()
    time.sleep(1.0)
    summary = sampler.stop()
    series = sampler.write_series(tmp_path / "telemetry.csv")

    proc = summary["process"]
    assert proc["processes_max"] == 3
    assert proc["rss_peak_gib"] > 0.17  # two 80 MiB children: the whole tree is summed
    assert proc["rss_at_ready_gib"] > 0.17
    assert proc["cpu_max_pct"] > 10  # the spinning child; idle, the tree shows ~0
    assert summary["rate_hz"] >= 9.5  # >= 10 Hz asked; a little slack for a loaded CI box
    assert "gpus" not in summary

    rows = list(csv.DictReader(series.open()))
    assert len(rows) == summary["samples"]
    assert {"t_s", "event", "rss_gib", "cpu_pct", "procs"} <= set(rows[0])
    assert [r["event"] for r in rows if r["event"]] == ["start", "ready", "stop"]
    assert max(float(r["rss_gib"]) for r in rows if r["rss_gib"]) == pytest.approx(proc["rss_peak_gib"], abs=1e-3)


def test_tree_gone_mid_run_is_not_an_error(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    sampler = Sampler(child.pid, [], interval=0.05)
    sampler.start()
    child.wait()
    time.sleep(0.2)
    summary = sampler.stop()
    assert summary["process"]["rss_peak_gib"] > 0
    assert sampler.rows[-1]["rss_gib"] is None  # after exit: a gap, not a crash
    sampler.write_series(tmp_path / "s.csv")


def play_cell(fake: FakePynvml, sampler: Sampler, gpus: list[int]) -> dict:
    """Spawn -> load to a 20 GiB peak -> settle at 15 GiB (ready) -> probes burn 50 J per GPU."""
    sampler.start()
    for i in gpus:
        fake.set_memory_used(i, 20 * GIB)
    time.sleep(0.15)  # several sampler ticks see the transient peak; no mark is taken here
    for i in gpus:
        fake.set_memory_used(i, 15 * GIB)
    sampler.mark_ready()
    sampler.mark_probes_start()
    for i in gpus:
        fake.add_energy(i, 50_000)
    sampler.mark_probes_end()
    return sampler.stop(generated_tokens=100)


def test_gpu_peak_ready_energy_and_joules_per_token():
    fake = FakePynvml("h100x8_nvswitch")
    sampler = Sampler(None, [0, 1], nvml=Nvml.open(fake), interval=0.02)
    summary = play_cell(fake, sampler, [0, 1])
    g0 = summary["gpus"]["0"]
    assert g0["memory_used_start_gib"] == pytest.approx(531 / 1024, abs=1e-3)
    assert g0["memory_used_peak_gib"] == pytest.approx(20.0)  # seen only by the thread
    assert g0["memory_used_at_ready_gib"] == pytest.approx(15.0)
    assert g0["energy_j"] == pytest.approx(50.0) and g0["energy_source"] == "counter"
    assert g0["probe_energy_j"] == pytest.approx(50.0)
    assert g0["power_max_w"] == pytest.approx(69.9)  # 69875 mW, one decimal
    assert g0["temperature_max_c"] == 31 and g0["sm_clock_max_mhz"] == 345
    assert summary["gpu_memory_used_peak_gib"] == pytest.approx(20.0)
    assert summary["energy_j"] == pytest.approx(100.0)
    assert summary["joules_per_token"] == pytest.approx(1.0)


def test_board_without_power_or_energy_gives_none_not_a_crash(tmp_path):
    fake = FakePynvml("mixed_l4_l40s")  # the L4 (GPU 0) answers NotSupported
    sampler = Sampler(None, [0, 1], nvml=Nvml.open(fake), interval=0.02)
    summary = play_cell(fake, sampler, [0, 1])
    l4, l40s = summary["gpus"]["0"], summary["gpus"]["1"]
    assert l4["power_mean_w"] is None and l4["energy_j"] is None and l4["sm_clock_max_mhz"] is None
    assert l4["memory_used_peak_gib"] == pytest.approx(20.0)
    assert l40s["energy_j"] == pytest.approx(50.0)
    # A total over only some GPUs would understate the cell: no total, no per-token figure.
    assert summary["energy_j"] is None and summary["joules_per_token"] is None
    assert "errors" not in summary
    rows = list(csv.DictReader(sampler.write_series(tmp_path / "s.csv").open()))
    assert all(r["gpu0_power_w"] == "" for r in rows)


def test_energy_falls_back_to_integrated_power():
    fake = FakePynvml("h100x8_nvswitch")
    fake.devices[0]["energy_mj"] = {"error": "NotSupported"}
    fake.devices[0]["power_mw"] = 100_000
    sampler = Sampler(None, [0], nvml=Nvml.open(fake), interval=0.02)
    sampler.start()
    time.sleep(0.5)
    summary = sampler.stop()
    g = summary["gpus"]["0"]
    assert g["energy_source"] == "power_integral"
    assert g["energy_j"] == pytest.approx(100 * summary["duration_s"], rel=0.02)


def test_lost_gpu_mid_run_leaves_a_gap_and_an_error_note():
    fake = FakePynvml("a100x4_nvlink")
    sampler = Sampler(None, [2], nvml=Nvml.open(fake), interval=0.02)
    sampler.start()
    time.sleep(0.1)
    fake.devices[2]["memory"] = {"error": "GpuIsLost"}
    time.sleep(0.1)
    summary = sampler.stop()
    assert summary["errors"] == ["gpu 2: NVMLError_GpuIsLost"]
    assert sampler.rows[-1]["gpu2_mem_used_gib"] is None
    assert summary["gpus"]["2"]["memory_used_peak_gib"] == pytest.approx(4 / 1024, abs=1e-3)


def test_default_rate_is_at_least_10_hz():
    fake = FakePynvml("h100x8_nvswitch")
    sampler = Sampler(None, list(range(8)), nvml=Nvml.open(fake))
    sampler.start()
    time.sleep(1.5)
    summary = sampler.stop()
    assert summary["interval_s"] == 0.1
    assert summary["rate_hz"] >= 9.5
    assert summary["samples"] >= 15


def test_gpu_cell_without_nvml_notes_it(monkeypatch):
    def fail():
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    sampler = Sampler(None, [0], interval=0.02)
    sampler.start()
    summary = sampler.stop()
    assert summary["gpus"] == {} and "NVML unavailable" in summary["note"]
