"""GPU memory per matrix selector ("H100", "nvidia-h100-x1", "RTX PRO 6000"), as vLLM will see it.

On a host with NVML the device's own total wins (total minus what the driver reserves, which is
what torch and vLLM report); plan_data/gpus.json is the fallback for planning a GPU the host
does not have. An unknown selector gets the closest known names.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache
from importlib import resources
from typing import Any

from harness.host.selectors import names

GIB = 1 << 30


@lru_cache(maxsize=1)
def gpu_table() -> list[dict]:
    text = resources.files("harness.plan_data").joinpath("gpus.json").read_text(encoding="utf-8")
    return json.loads(text)["gpus"]


def lookup_gpu(selector: str) -> dict | None:
    """The table row whose longest alias occurs in the selector as a whole word, else None."""
    best: tuple[int, dict] | None = None
    for row in gpu_table():
        for alias in [row["name"].lower(), *row["aliases"]]:
            if names(selector, alias) and (best is None or len(alias) > best[0]):
                best = (len(alias), row)
    return best[1] if best else None


def closest_names(selector: str, n: int = 3) -> list[str]:
    """Known GPU names nearest to an unknown selector (by name or alias), best first."""
    names = {row["name"]: row["name"] for row in gpu_table()}
    names.update({alias: row["name"] for row in gpu_table() for alias in row["aliases"]})
    hits = difflib.get_close_matches(selector.lower(), [k.lower() for k in names], n=n * 3, cutoff=0.3)
    lowered = {k.lower(): v for k, v in names.items()}
    out: list[str] = []
    for hit in hits:
        if lowered[hit] not in out:
            out.append(lowered[hit])
    return out[:n]


def unknown_gpu_message(selector: str) -> str:
    near = closest_names(selector)
    hint = f"closest known: {', '.join(near)}; " if near else ""
    return f"unknown GPU {selector!r}: {hint}or give --gpu-memory-gib G (the total vLLM reports)"


def _nvml_total_gib(lib: Any, handle: Any) -> float:
    """NVML's v2 memory info separates what the driver reserves; torch's total excludes it."""
    v2 = getattr(lib, "nvmlMemory_v2", None)
    if v2 is not None:
        try:
            info = lib.nvmlDeviceGetMemoryInfo(handle, version=v2)
            return round((int(info.total) - int(getattr(info, "reserved", 0))) / GIB, 2)
        except Exception:  # noqa: BLE001 - old drivers refuse v2; v1 below
            pass
    return round(int(lib.nvmlDeviceGetMemoryInfo(handle).total) / GIB, 2)


@lru_cache(maxsize=1)
def host_gpus() -> tuple[tuple[str, float], ...]:
    """(name, total GiB) of this host's GPUs via NVML; empty without a driver or pynvml."""
    from harness.host.devices import Nvml  # noqa: PLC0415 - the one NVML wrapper; only needed here

    nvml = Nvml.open()
    if nvml is None:
        return ()
    try:
        return tuple((nvml.name(i), _nvml_total_gib(nvml.lib, nvml.handle(i))) for i in range(nvml.device_count()))
    except Exception:  # noqa: BLE001 - a broken NVML must not stop a plan: the table still answers
        return ()
    finally:
        nvml.close()


def host_gpu_gib(selector: str) -> float | None:
    """This host's total for a GPU matching the selector (same table row, or the name contains it)."""
    row = lookup_gpu(selector)
    for name, gib in host_gpus():
        if (row is not None and lookup_gpu(name) is row) or selector.lower() in name.lower():
            return gib
    return None


def gpu_memory_gib(selector: str) -> float | None:
    """NVML's total on this host, else the table's; None for a selector neither knows."""
    host = host_gpu_gib(selector) if selector else None
    if host is not None:
        return host
    row = lookup_gpu(selector)
    return float(row["memory_gib"]) if row else None
