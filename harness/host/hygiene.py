"""GPU hygiene before a cell: its GPUs must hold no foreign compute process and have the free
memory the engine will ask for.

An orphaned engine or someone else's job on a GPU otherwise turns into vLLM's "Free memory on
device ... is less than desired GPU memory utilization" and a chain of confusing failures. Here
it becomes a wait (the holder may be finishing), then a clear skip naming the holder's pid and
name. This module only reads NVML and /proc; it never signals or kills any process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from harness.host.devices import GIB, GpuProcess, Nvml

# vLLM's default when the cell's config does not set gpu_memory_utilization.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True)
class Holder:
    gpu: int
    pid: int
    name: str | None
    used_gib: float | None
    kind: str

    def describe(self) -> str:
        what = self.name or "name unknown: pid not visible here, maybe another container"
        used = f", {self.used_gib:.1f} GiB" if self.used_gib is not None else ""
        return f"pid {self.pid} ({what}{used})"


@dataclass
class GpuCheck:
    """Outcome of a hygiene check. `reason` is the skip reason when not `ok`."""

    ok: bool
    reason: str | None = None
    holders: list[Holder] = field(default_factory=list)
    waited_s: float = 0.0


def check_gpus(nvml: Nvml, gpu_indices: Sequence[int], gpu_memory_utilization: float | None = None) -> GpuCheck:
    """One look at the cell's GPUs: any compute process, or free memory below what vLLM needs
    at startup (gpu_memory_utilization x total), fails the check."""
    util = gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    problems: list[str] = []
    holders: list[Holder] = []
    for i in gpu_indices:
        try:
            name = nvml.name(i)
            total, free, _used = nvml.memory(i)
            procs = nvml.processes(i)
        except nvml.lib.NVMLError as exc:
            problems.append(f"GPU {i}: NVML error {type(exc).__name__.removeprefix('NVMLError_')}")
            continue
        gpu_holders = [_holder(nvml, i, p) for p in procs]
        holders.extend(gpu_holders)
        compute = [h for h in gpu_holders if h.kind == "compute"]
        need = util * total
        short = free < need
        if not compute and not short:
            continue
        # Graphics clients are only worth naming when memory is short: they may be the cause.
        named = compute or gpu_holders
        text = f"GPU {i} ({name})"
        if named:
            text += " held by " + ", ".join(h.describe() for h in named)
        if short:
            text += (
                f"{';' if named else ':'} free {free / GIB:.1f} of {total / GIB:.1f} GiB, "
                f"the engine needs {need / GIB:.1f} GiB (gpu_memory_utilization {util:g})"
            )
            if not named:
                text += "; no process visible, the holder may be in another container"
        problems.append(text)
    return GpuCheck(ok=not problems, reason="; ".join(problems) or None, holders=holders)


def _holder(nvml: Nvml, gpu: int, proc: GpuProcess) -> Holder:
    used = None if proc.used_bytes is None else proc.used_bytes / GIB
    return Holder(gpu=gpu, pid=proc.pid, name=nvml.process_name(proc.pid), used_gib=used, kind=proc.kind)


def wait_for_clean_gpus(
    gpu_indices: Sequence[int],
    *,
    gpu_memory_utilization: float | None = None,
    timeout_s: float = 120.0,
    poll_s: float = 2.0,
    nvml: Nvml | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> GpuCheck:
    """Check, and while the GPUs are not clean poll again up to `timeout_s` (a previous engine
    may still be releasing memory). Not ok: `reason` is the cell's skip reason."""
    own = nvml is None
    if own:
        nvml = Nvml.open()
    if nvml is None:
        return GpuCheck(ok=False, reason="NVML unavailable: cannot check the cell's GPUs (no NVIDIA driver?)")
    try:
        start = clock()
        while True:
            result = check_gpus(nvml, gpu_indices, gpu_memory_utilization)
            result.waited_s = round(clock() - start, 1)
            if result.ok:
                return result
            if result.waited_s >= timeout_s:
                result.reason = f"GPU busy after waiting {result.waited_s:g} s: {result.reason}"
                return result
            sleep(min(poll_s, max(0.0, timeout_s - result.waited_s)))
    finally:
        if own:
            nvml.close()
