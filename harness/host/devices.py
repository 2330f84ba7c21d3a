"""Host device inventory: GPUs through NVML, the CPU and RAM for the CPU engine.

`Nvml` is the only place in the harness that calls pynvml; telemetry and hygiene use it too.
It turns pynvml's ctypes structs and bytes into plain Python values and its "this board
cannot report that" errors into None, so callers never see NVML exceptions for optional data.
Tests hand `Nvml` a recorded fake of the pynvml module (tests/fixtures/nvml/).

On a host without an NVIDIA driver `host_devices()` returns only the CPU device.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import psutil

from harness.schema import Device

GIB = 1024**3

# NVML errors that mean "this board/driver cannot report this value", not "something broke".
_UNAVAILABLE_ERRORS = ("NotSupported", "NoPermission", "FunctionNotFound", "NotFound", "NoData")


@dataclass(frozen=True)
class GpuProcess:
    """A process NVML sees on a GPU; `used_bytes` is None where the driver hides it.

    `kind` is "compute" for CUDA contexts, "graphics" for display clients such as Xorg that a
    workstation always has and that do not by themselves stop an engine from starting.
    """

    pid: int
    used_bytes: int | None
    kind: str = "compute"


class Nvml:
    """Thin wrapper over the pynvml module (or a recorded fake with the same functions)."""

    def __init__(self, lib: ModuleType | Any):
        self.lib = lib
        self._handles: dict[int, Any] = {}

    @classmethod
    def open(cls, lib: ModuleType | Any | None = None) -> Nvml | None:
        """Initialise NVML; None when there is no driver, no library, or no pynvml."""
        if lib is None:
            try:
                import pynvml  # noqa: PLC0415 - optional at run time, absent on some hosts
            except ImportError:
                return None
            lib = pynvml
        try:
            lib.nvmlInit()
        except lib.NVMLError:
            return None
        return cls(lib)

    def close(self) -> None:
        try:
            self.lib.nvmlShutdown()
        except self.lib.NVMLError:
            pass  # already shut down or the driver went away: nothing left to release

    # ------------------------------------------------------------------ helpers
    def _optional(self, fn, *args):
        """Call an NVML function; None where the board or driver cannot report the value."""
        try:
            return fn(*args)
        except self.lib.NVMLError as exc:
            if type(exc).__name__.removeprefix("NVMLError_") in _UNAVAILABLE_ERRORS:
                return None
            raise

    def handle(self, index: int):
        if index not in self._handles:
            self._handles[index] = self.lib.nvmlDeviceGetHandleByIndex(index)
        return self._handles[index]

    # ------------------------------------------------------------------ system
    def device_count(self) -> int:
        return int(self.lib.nvmlDeviceGetCount())

    def driver_version(self) -> str | None:
        return _text(self._optional(self.lib.nvmlSystemGetDriverVersion))

    def cuda_version(self) -> str | None:
        """CUDA version the driver supports, e.g. 12040 -> "12.4"."""
        fn = getattr(self.lib, "nvmlSystemGetCudaDriverVersion_v2", None) or (self.lib.nvmlSystemGetCudaDriverVersion)
        value = self._optional(fn)
        if value is None:
            return None
        return f"{value // 1000}.{(value % 1000) // 10}"

    def process_name(self, pid: int) -> str | None:
        """NVML's name for a pid, falling back to psutil (NVML fails for pids of other users)."""
        try:
            name = _text(self.lib.nvmlSystemGetProcessName(pid))
            if name:
                return os.path.basename(name)
        except self.lib.NVMLError:
            pass
        try:
            return psutil.Process(pid).name()
        except (psutil.Error, ValueError):
            return None

    # ------------------------------------------------------------------ per device
    def name(self, index: int) -> str:
        return _text(self.lib.nvmlDeviceGetName(self.handle(index))) or f"GPU {index}"

    def uuid(self, index: int) -> str | None:
        return _text(self._optional(self.lib.nvmlDeviceGetUUID, self.handle(index)))

    def memory(self, index: int) -> tuple[int, int, int]:
        """(total, free, used) in bytes."""
        info = self.lib.nvmlDeviceGetMemoryInfo(self.handle(index))
        return int(info.total), int(info.free), int(info.used)

    def compute_capability(self, index: int) -> str | None:
        cc = self._optional(self.lib.nvmlDeviceGetCudaComputeCapability, self.handle(index))
        return None if cc is None else f"{cc[0]}.{cc[1]}"

    def pci_bus_id(self, index: int) -> str | None:
        info = self._optional(self.lib.nvmlDeviceGetPciInfo, self.handle(index))
        return None if info is None else _text(info.busId)

    def numa_node(self, index: int) -> int | None:
        # Older pynvml lacks the function; drivers answer NotSupported (or -1) on 1-socket boxes.
        fn = getattr(self.lib, "nvmlDeviceGetNumaNodeId", None)
        node = None if fn is None else self._optional(fn, self.handle(index))
        return None if node is None or node < 0 else int(node)

    def nvlink_peers(self, index: int) -> list[str]:
        """PCI bus ids at the far end of each active NVLink (another GPU, or an NVSwitch)."""
        peers = []
        for link in range(int(getattr(self.lib, "NVML_NVLINK_MAX_LINKS", 18))):
            try:
                if self.lib.nvmlDeviceGetNvLinkState(self.handle(index), link) != 1:
                    continue
                remote = self.lib.nvmlDeviceGetNvLinkRemotePciInfo(self.handle(index), link)
            except self.lib.NVMLError:
                # PCIe-only cards answer NotSupported for link 0; higher links InvalidArgument.
                break
            bus = _text(remote.busId)
            if bus is not None:
                peers.append(bus)
        return peers

    def utilization_pct(self, index: int) -> float | None:
        rates = self._optional(self.lib.nvmlDeviceGetUtilizationRates, self.handle(index))
        return None if rates is None else float(rates.gpu)

    def power_w(self, index: int) -> float | None:
        mw = self._optional(self.lib.nvmlDeviceGetPowerUsage, self.handle(index))
        return None if mw is None else mw / 1000.0

    def energy_j(self, index: int) -> float | None:
        """Energy counter since the driver loaded (NVML reports millijoules); Volta and newer."""
        mj = self._optional(self.lib.nvmlDeviceGetTotalEnergyConsumption, self.handle(index))
        return None if mj is None else mj / 1000.0

    def temperature_c(self, index: int) -> float | None:
        t = self._optional(self.lib.nvmlDeviceGetTemperature, self.handle(index), self.lib.NVML_TEMPERATURE_GPU)
        return None if t is None else float(t)

    def sm_clock_mhz(self, index: int) -> float | None:
        mhz = self._optional(self.lib.nvmlDeviceGetClockInfo, self.handle(index), self.lib.NVML_CLOCK_SM)
        return None if mhz is None else float(mhz)

    def memory_health(self, index: int) -> dict[str, int | bool | None]:
        """Signs of failing GPU memory, None where the board cannot tell (ECC off, older pynvml):
        uncorrected ECC errors since the driver loaded, retired pages waiting for a reset
        (pre-Ampere), remapped rows waiting for a reset and a failed remapping (Ampere and newer)."""
        h = self.handle(index)

        def call(name: str, *args):
            fn = getattr(self.lib, name, None)
            return None if fn is None else self._optional(fn, h, *args)

        uncorrected = call(
            "nvmlDeviceGetTotalEccErrors",
            getattr(self.lib, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1),
            getattr(self.lib, "NVML_VOLATILE_ECC", 0),
        )
        retired = call("nvmlDeviceGetRetiredPagesPendingStatus")
        rows = call("nvmlDeviceGetRemappedRows")  # (corrected, uncorrected, pending, failure)
        return {
            "ecc_uncorrected": None if uncorrected is None else int(uncorrected),
            "retired_pages_pending": None if retired is None else bool(retired),
            "remap_pending": None if rows is None else bool(rows[2]),
            "remap_failed": None if rows is None else bool(rows[3]),
        }

    def processes(self, index: int) -> list[GpuProcess]:
        """Compute then graphics processes on the GPU, one entry per pid (compute wins)."""
        seen: dict[int, GpuProcess] = {}
        for kind in ("compute", "graphics"):
            fn = getattr(self.lib, f"nvmlDeviceGet{kind.title()}RunningProcesses")
            for p in self._optional(fn, self.handle(index)) or []:
                used = getattr(p, "usedGpuMemory", None)
                used = None if used is None else int(used)
                seen.setdefault(int(p.pid), GpuProcess(int(p.pid), used, kind))
        return list(seen.values())


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return str(value).strip("\x00").strip() or None


# --------------------------------------------------------------------------- inventory
def cpu_info() -> dict[str, Any]:
    """CPU model, the cores this process may use, and total RAM in GiB."""
    model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass  # not Linux: platform.processor() below
    count: int | None
    try:
        count = len(os.sched_getaffinity(0))  # a cpuset-limited container sees fewer cores
    except AttributeError:
        count = os.cpu_count()
    return {
        "cpu_model": model or platform.processor() or platform.machine() or "unknown CPU",
        "cpu_count": count,
        "ram_gib": round(psutil.virtual_memory().total / GIB, 2),
    }


def cpu_device() -> Device:
    info = cpu_info()
    return Device(
        kind="cpu",
        index=0,
        name=info["cpu_model"],
        memory_total_gib=info["ram_gib"],
        memory_free_gib=round(psutil.virtual_memory().available / GIB, 2),
    )


def gpu_devices(nvml: Nvml) -> list[Device]:
    """One Device per NVML GPU, with its `numa_node` and `nvlink_island`.

    `nvlink_island` numbers the groups of GPUs joined by NVLink, directly or through NVSwitches;
    None for a GPU without active links. Packing prefers placing a TP group inside one island.
    """
    driver, cuda = nvml.driver_version(), nvml.cuda_version()
    devices = []
    for i in range(nvml.device_count()):
        total, free, _used = nvml.memory(i)
        devices.append(
            Device(
                kind="gpu",
                index=i,
                name=nvml.name(i),
                memory_total_gib=round(total / GIB, 2),
                memory_free_gib=round(free / GIB, 2),
                driver_version=driver,
                cuda_version=cuda,
                compute_capability=nvml.compute_capability(i),
                pci_bus_id=nvml.pci_bus_id(i),
                uuid=nvml.uuid(i),
                numa_node=nvml.numa_node(i),
            )
        )
    islands = nvlink_islands({d.index: d.pci_bus_id for d in devices}, nvml)
    for d in devices:
        d.nvlink_island = islands.get(d.index)
    return devices


def nvlink_islands(bus_ids: dict[int, str | None], nvml: Nvml) -> dict[int, int]:
    """GPU index -> island number, by union-find over GPUs and the NVLink endpoints they reach."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    linked = set()
    for index, bus in bus_ids.items():
        me = f"gpu:{index}"
        for peer in nvml.nvlink_peers(index):
            linked.add(index)
            parent[find(me)] = find(f"bus:{_norm_bus(peer)}")
        if bus:
            # A peer reported by bus id is the same node as the GPU that owns that bus id.
            parent[find(f"bus:{_norm_bus(bus)}")] = find(me)
    roots: dict[str, int] = {}
    islands = {}
    for index in sorted(linked):
        islands[index] = roots.setdefault(find(f"gpu:{index}"), len(roots))
    return islands


def _norm_bus(bus: str) -> str:
    # Devices report "00000000:18:00.0"; some NVLink remote infos use a 4-digit domain.
    parts = bus.lower().split(":")
    if len(parts) == 3:
        return f"{int(parts[0], 16):08x}:{parts[1]}:{parts[2]}"
    return bus.lower()


def host_devices(nvml: Nvml | None = None) -> list[Device]:
    """Every GPU NVML reports (none without a driver), then the CPU device, always last."""
    own = nvml is None
    if own:
        nvml = Nvml.open()
    gpus: list[Device] = []
    if nvml is not None:
        try:
            gpus = gpu_devices(nvml)
        finally:
            if own:
                nvml.close()
    return [*gpus, cpu_device()]
