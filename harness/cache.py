"""The harness's own cache folder (`$XDG_CACHE_HOME/vllm-harness`, else `~/.cache/vllm-harness`):
engine argument tables, safetensors headers read from the Hub, provisioned engine installs.
Nothing in it is a result: deleting it only costs time."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vllm-harness"
