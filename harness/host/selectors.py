"""GPU selectors: the one place where a device name from the matrix (`gpus: [H100, "RTX 4090",
A100-80GB, cpu]`) is matched — against this host's devices, against the planner's GPU table, and
as the Ray resource a node declares for that device type.

A selector matches a name when each of its tokens is a whole token of the name (case-insensitive;
spaces, `_`, `-` and `/` separate tokens), so "L4" does not match "L40S"; a memory token such as
"80GB" may instead match the device's memory size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from harness.schema import Device, slug

GIB = 1024**3
RESOURCE_PREFIX = "gpu_"  # Ray: one custom resource per GPU type a node has, e.g. gpu_H100


_TOKEN_SPLIT = re.compile(r"[\s_\-/]+")
_MEMORY_TOKEN = re.compile(r"^(\d+(?:\.\d+)?)(gb|gib|g)$")


def tokens(text: str) -> list[str]:
    return [t for t in _TOKEN_SPLIT.split(text.lower()) if t]


def _memory_matches(size: float, total_gib: float | None) -> bool:
    """ "80GB" means the marketing size: decimal GB or GiB, and boards report a little less."""
    if total_gib is None:
        return False
    return any(abs(total_gib - nominal) <= 0.06 * nominal for nominal in (size, size * 1e9 / GIB))


def selector_matches(selector: str, device: Device) -> bool:
    """Does one matrix `gpu` selector name this device? Case-insensitive, token-wise."""
    wanted = tokens(selector)
    if not wanted:
        return False
    if wanted == ["cpu"]:
        return device.kind == "cpu"
    if device.kind != "gpu":
        return False
    have = set(tokens(device.name))
    for token in wanted:
        if token in have:
            continue
        mem = _MEMORY_TOKEN.match(token)
        if mem and _memory_matches(float(mem.group(1)), device.memory_total_gib):
            continue
        return False
    return True


def match_selector(selector: str, devices: Iterable[Device]) -> list[Device]:
    """The devices a matrix `gpu` selector names: "cpu", "H100", "RTX 4090", "A100-80GB", "L4".

    Every selector token must be a whole token of the NVML name ("L4" does not match "L40S");
    a memory token such as "80GB" may instead match the board's memory size.
    """
    return [d for d in devices if selector_matches(selector, d)]


def names(selector: str, name: str) -> bool:
    """Does `name` (a GPU table name or alias) occur in the selector as whole tokens, in order?"""
    want, have = tokens(name), tokens(selector)
    return bool(want) and any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))


def resource_name(gpu: str, prefix: str = RESOURCE_PREFIX) -> str:
    """The custom Ray resource a node declares once per device of a type: gpu_H100, gpu_cpu."""
    return prefix + slug(gpu)
