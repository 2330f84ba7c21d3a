"""Device inventory and gpu selectors against recorded NVML boxes (tests/fixtures/nvml)."""

from __future__ import annotations

import pynvml
import pytest
from fixtures.nvml.fake import BOXES, FakePynvml

from harness.host.devices import Nvml, cpu_info, host_devices
from harness.host.selectors import match_selector
from harness.schema import Device, HostFingerprint

GPU_BOXES = [b for b in BOXES if b != "no_driver"]


def devices_of(box: str) -> list[Device]:
    nvml = Nvml.open(FakePynvml(box))
    assert nvml is not None
    return host_devices(nvml)


@pytest.mark.parametrize("box", GPU_BOXES)
def test_every_box_lists_its_gpus_then_the_cpu(box):
    fake = FakePynvml(box)
    devices = host_devices(Nvml.open(fake))
    gpus = [d for d in devices if d.kind == "gpu"]
    assert [d.index for d in gpus] == list(range(len(fake.devices)))
    assert devices[-1].kind == "cpu" and devices[-1].memory_total_gib > 0
    for d, raw in zip(gpus, fake.devices):
        assert d.name == raw["name"]
        assert d.memory_total_gib == pytest.approx(raw["memory"]["total"] / 2**30, abs=0.01)
        assert d.memory_free_gib == pytest.approx(raw["memory"]["free"] / 2**30, abs=0.01)
        assert d.pci_bus_id == raw["pci_bus_id"]  # bytes from the struct, decoded
        assert d.uuid.startswith("GPU-")
        assert d.compute_capability == "{}.{}".format(*raw["compute_capability"])
    # The inventory must round-trip through the host fingerprint record.
    fp = HostFingerprint(hostname="h", os="linux", python="3.11", harness_version="0", devices=devices)
    again = HostFingerprint.model_validate_json(fp.model_dump_json())
    assert again.devices[0].model_dump() == devices[0].model_dump()


def test_h100_box_versions_numa_and_one_nvswitch_island():
    devices = devices_of("h100x8_nvswitch")
    gpus = devices[:-1]
    assert {d.driver_version for d in gpus} == {"550.54.15"}
    assert {d.cuda_version for d in gpus} == {"12.4"}
    assert [d.numa_node for d in gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    # All 8 reach the same NVSwitches: one island.
    assert {d.nvlink_island for d in gpus} == {0}


def test_a100_direct_nvlink_is_one_island_and_numa_unsupported_is_none():
    gpus = devices_of("a100x4_nvlink")[:-1]
    assert {d.nvlink_island for d in gpus} == {0}
    assert all(d.numa_node is None for d in gpus)
    assert gpus[0].cuda_version == "12.2"


def test_pcie_cards_have_no_island():
    gpus = devices_of("rtx4090x2_pcie")[:-1]
    assert [d.nvlink_island for d in gpus] == [None, None]


def test_two_separate_nvlink_pairs_are_two_islands():
    fake = FakePynvml("a100x4_nvlink")
    bus = [d["pci_bus_id"] for d in fake.devices]
    pair = {0: 1, 1: 0, 2: 3, 3: 2}
    for i, d in enumerate(fake.devices):
        d["nvlinks"] = [{"state": 1, "remote_bus_id": bus[pair[i]]}] * 4 + [{"state": 0, "remote_bus_id": bus[pair[i]]}]
    gpus = host_devices(Nvml.open(fake))[:-1]
    islands = [d.nvlink_island for d in gpus]
    assert islands[0] == islands[1] != islands[2] == islands[3]


def test_unsupported_values_are_none_not_errors():
    nvml = Nvml.open(FakePynvml("mixed_l4_l40s"))
    assert nvml.power_w(0) is None and nvml.energy_j(0) is None and nvml.sm_clock_mhz(0) is None
    assert nvml.power_w(1) == pytest.approx(35.012)
    assert nvml.energy_j(1) == pytest.approx(77712.345)
    assert nvml.temperature_c(0) == 45.0


def test_unexpected_nvml_errors_are_not_swallowed():
    fake = FakePynvml("mixed_l4_l40s")
    fake.devices[1]["power_mw"] = {"error": "GpuIsLost"}
    nvml = Nvml.open(fake)
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        nvml.power_w(1)


def test_processes_merge_compute_and_graphics_and_keep_hidden_usage_as_none():
    nvml = Nvml.open(FakePynvml("rtx4090x2_pcie"))
    procs = nvml.processes(0)
    assert [(p.pid, p.used_bytes, p.kind) for p in procs] == [(1500, None, "graphics")]
    assert nvml.process_name(1500) == "Xorg"


@pytest.mark.parametrize("error", ["LibraryNotFound", "DriverNotLoaded"])
def test_no_driver_gives_only_the_cpu_device(monkeypatch, error):
    assert Nvml.open(FakePynvml({"init_error": error})) is None

    def fail():
        raise getattr(pynvml, f"NVMLError_{error}")()

    monkeypatch.setattr(pynvml, "nvmlInit", fail)  # the real module, as on a driverless host
    devices = host_devices()
    assert [d.kind for d in devices] == ["cpu"]
    assert devices[0].name == cpu_info()["cpu_model"]


def test_missing_pynvml_gives_only_the_cpu_device(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import now raises ImportError
    assert Nvml.open() is None
    assert [d.kind for d in host_devices()] == ["cpu"]


def test_nvml_closed_after_own_inventory_only():
    fake = FakePynvml("h100x8_nvswitch")
    nvml = Nvml.open(fake)
    host_devices(nvml)
    assert fake.initialised == 1  # the caller's handle stays open for telemetry


def test_cpu_info_shape():
    info = cpu_info()
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]
    assert info["cpu_count"] >= 1
    assert info["ram_gib"] > 0


# --------------------------------------------------------------------------- selectors
NAMES = {
    "h100": ("NVIDIA H100 80GB HBM3", 79.65),
    "h100nvl": ("NVIDIA H100 NVL", 93.58),
    "a100_80": ("NVIDIA A100-SXM4-80GB", 80.0),
    "a100_40": ("NVIDIA A100-SXM4-40GB", 40.0),
    "a100_pcie40": ("NVIDIA A100-PCIE-40GB", 40.0),
    "4090": ("NVIDIA GeForce RTX 4090", 23.99),
    "l4": ("NVIDIA L4", 22.49),
    "l40s": ("NVIDIA L40S", 44.99),
    "l40": ("NVIDIA L40", 44.99),
    "a6000": ("NVIDIA RTX A6000", 47.99),
}
FLEET = [Device(kind="gpu", index=i, name=n, memory_total_gib=m) for i, (n, m) in enumerate(NAMES.values())]
FLEET.append(Device(kind="cpu", index=0, name="AMD EPYC 9654 96-Core Processor", memory_total_gib=1511.0))
KEY = {d.name: k for k, d in zip(NAMES, FLEET)}


def picked(selector: str) -> set[str]:
    return {KEY.get(d.name, "cpu") for d in match_selector(selector, FLEET)}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("H100", {"h100", "h100nvl"}),
        ("h100", {"h100", "h100nvl"}),
        ("H100 NVL", {"h100nvl"}),
        ("H100-80GB", {"h100"}),  # 80GB matches by memory size: the NVL board has 94 GB
        ("A100", {"a100_80", "a100_40", "a100_pcie40"}),
        ("A100-80GB", {"a100_80"}),
        ("A100 40GB", {"a100_40", "a100_pcie40"}),
        ("A100-SXM4-40GB", {"a100_40"}),
        ("RTX 4090", {"4090"}),
        ("4090", {"4090"}),
        ("L4", {"l4"}),
        ("L40S", {"l40s"}),
        ("L40", {"l40"}),
        ("L40S-48GB", {"l40s"}),  # decimal 48 GB = 44.7 GiB
        ("L4 24GB", {"l4"}),
        ("A6000", {"a6000"}),
        ("cpu", {"cpu"}),
        ("CPU", {"cpu"}),
        ("B200", set()),
        ("", set()),
    ],
)
def test_selector(selector, expected):
    assert picked(selector) == expected


def test_cpu_name_tokens_never_match_a_gpu_selector():
    assert picked("AMD") == set()
    assert picked("EPYC") == set()
