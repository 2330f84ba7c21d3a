"""GPU hygiene: foreign holders and short memory become a clear skip reason, never a kill."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys

import psutil
import pynvml
import pytest
from fixtures.nvml.fake import FakePynvml

import harness.host.hygiene
from harness.host.devices import Nvml
from harness.host.hygiene import check_gpus, wait_for_clean_gpus

GIB = 2**30


class FakeClock:
    """Time that moves only when the code under test sleeps; `on_sleep` plays the world."""

    def __init__(self, on_sleep=None):
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep:
            self.on_sleep(self.now)


def wait(fake: FakePynvml, gpus, clock: FakeClock, **kw):
    return wait_for_clean_gpus(gpus, nvml=Nvml.open(fake), clock=clock, sleep=clock.sleep, **kw)


def test_clean_gpus_pass_at_once():
    clock = FakeClock()
    result = wait(FakePynvml("h100x8_nvswitch"), [0, 1, 2], clock)
    assert result.ok and result.reason is None and clock.sleeps == []


def test_foreign_holder_becomes_a_skip_naming_pid_and_name_after_the_bound():
    clock = FakeClock()
    result = wait(FakePynvml("h100x8_nvswitch"), [2, 3], clock, timeout_s=120, poll_s=5)
    assert not result.ok
    assert clock.now == pytest.approx(120)  # waited the whole bound, polling every 5 s
    assert len(clock.sleeps) == 24
    assert result.reason.startswith("GPU busy after waiting 120 s: GPU 3 (NVIDIA H100 80GB HBM3)")
    assert "pid 4242 (python3, 30.0 GiB)" in result.reason
    assert "free 48.6 of 79.6 GiB, the engine needs 71.7 GiB (gpu_memory_utilization 0.9)" in result.reason
    assert "GPU 2" not in result.reason
    assert [(h.gpu, h.pid, h.name) for h in result.holders] == [(3, 4242, "python3")]


def test_a_holder_that_leaves_during_the_wait_lets_the_cell_run():
    fake = FakePynvml("h100x8_nvswitch")

    def world(now):
        if now >= 10:  # the previous engine finished releasing its memory
            fake.remove_processes(3)
            fake.set_memory_used(3, 531 * 2**20)

    clock = FakeClock(world)
    result = wait(fake, [3], clock, timeout_s=120, poll_s=2)
    assert result.ok and result.waited_s == pytest.approx(10)


def test_foreign_process_blocks_even_when_memory_would_fit():
    result = check_gpus(Nvml.open(FakePynvml("h100x8_nvswitch")), [3], gpu_memory_utilization=0.5)
    assert not result.ok
    assert result.reason == "GPU 3 (NVIDIA H100 80GB HBM3) held by pid 4242 (python3, 30.0 GiB)"


def test_display_server_alone_does_not_block():
    result = check_gpus(Nvml.open(FakePynvml("rtx4090x2_pcie")), [0, 1])
    assert result.ok
    assert [(h.pid, h.kind) for h in result.holders] == [(1500, "graphics")]


def test_display_server_is_named_when_memory_is_short():
    fake = FakePynvml("rtx4090x2_pcie")
    fake.set_memory_used(0, 6 * GIB)
    result = check_gpus(Nvml.open(fake), [0])
    assert not result.ok
    assert "held by pid 1500 (Xorg); free 18.0 of 24.0 GiB, the engine needs 21.6 GiB" in result.reason


def test_memory_used_with_no_visible_process_points_at_another_container():
    fake = FakePynvml("a100x4_nvlink")
    fake.set_memory_used(1, 40 * GIB)
    result = check_gpus(Nvml.open(fake), [0, 1])
    assert not result.ok
    assert result.reason == (
        "GPU 1 (NVIDIA A100-SXM4-80GB): free 40.0 of 80.0 GiB, the engine needs 72.0 GiB "
        "(gpu_memory_utilization 0.9); no process visible, the holder may be in another container"
    )


def test_lower_utilization_fits_beside_leftover_memory():
    fake = FakePynvml("a100x4_nvlink")
    fake.set_memory_used(1, 40 * GIB)
    assert check_gpus(Nvml.open(fake), [1], gpu_memory_utilization=0.45).ok


def test_real_foreign_process_is_named_and_left_alive():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        fake = FakePynvml("mixed_l4_l40s")
        fake.add_process(1, child.pid, 2 * GIB)  # NVML does not know its name: psutil does
        clock = FakeClock()
        result = wait(fake, [1], clock, timeout_s=6, poll_s=2)
        assert not result.ok
        name = psutil.Process(child.pid).name()
        assert f"pid {child.pid} ({name}, 2.0 GiB)" in result.reason
        assert child.poll() is None  # still running: hygiene never kills
    finally:
        child.kill()
        child.wait()


def test_pid_invisible_to_this_namespace_is_still_reported():
    fake = FakePynvml("a100x4_nvlink")
    fake.add_process(0, 2**22 + 12345, 10 * GIB)  # above pid_max: no such process here
    result = check_gpus(Nvml.open(fake), [0])
    assert f"pid {2**22 + 12345} (name unknown: pid not visible here" in result.reason


def test_nvml_error_on_a_gpu_is_a_reason_not_a_crash():
    fake = FakePynvml("a100x4_nvlink")
    fake.devices[2]["memory"] = {"error": "GpuIsLost"}
    result = check_gpus(Nvml.open(fake), [2])
    assert not result.ok and result.reason == "GPU 2: NVML error GpuIsLost"


def test_without_nvml_the_check_fails_clearly(monkeypatch):
    def fail():
        raise pynvml.NVMLError_DriverNotLoaded()

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    result = wait_for_clean_gpus([0], timeout_s=0)
    assert not result.ok and "NVML unavailable" in result.reason


def test_hygiene_has_no_way_to_kill_anything():
    tree = ast.parse(inspect.getsource(harness.host.hygiene))
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
    forbidden = {"kill", "killpg", "terminate", "send_signal", "signal", "system", "Popen", "run"}
    assert not (names | imports) & forbidden
