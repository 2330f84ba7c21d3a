"""GPU memory per matrix selector ("H100", "nvidia-h100-x1", "A100-40GB"), from plan_data/gpus.json,
for planning on a machine that does not have the GPU."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def gpu_table() -> list[dict]:
    text = resources.files("harness.plan_data").joinpath("gpus.json").read_text(encoding="utf-8")
    return json.loads(text)["gpus"]


def lookup_gpu(selector: str) -> dict | None:
    """The table row whose longest alias occurs in the selector as a whole word, else None."""
    sel = selector.lower()
    best: tuple[int, dict] | None = None
    for row in gpu_table():
        for alias in [row["name"].lower(), *row["aliases"]]:
            if re.search(rf"(?<![a-z0-9]){re.escape(alias)}(?![a-z0-9])", sel):
                if best is None or len(alias) > best[0]:
                    best = (len(alias), row)
    return best[1] if best else None


def gpu_memory_gib(selector: str) -> float | None:
    row = lookup_gpu(selector)
    return float(row["memory_gib"]) if row else None
