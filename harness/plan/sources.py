"""Where a model's config.json (and safetensors headers) come from, without network:
a local model directory, the Hugging Face cache, or the offline catalog in plan_data/catalog."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from harness.plan.weights import checkpoint_tensors


@dataclass
class ModelSource:
    config: dict[str, Any]
    origin: str  # "local", "hf-cache", "catalog"
    path: str | None = None
    tensors: dict[str, dict] = field(default_factory=dict)  # safetensors headers, when readable


def catalog_path(repo_id: str) -> Path:
    return Path(str(resources.files("harness.plan_data").joinpath("catalog", repo_id.replace("/", "__") + ".json")))


def catalog_ids() -> list[str]:
    folder = Path(str(resources.files("harness.plan_data").joinpath("catalog")))
    return sorted(p.stem.replace("__", "/", 1) for p in folder.glob("*.json"))


def _hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return home / "hub"


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    repo = _hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    if revision:
        ref = repo / "refs" / revision
        sha = ref.read_text().strip() if ref.is_file() else revision
        candidates = [snapshots / sha]
    else:
        ref = repo / "refs" / "main"
        candidates = ([snapshots / ref.read_text().strip()] if ref.is_file() else []) + sorted(snapshots.iterdir())
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def _from_dir(folder: Path, origin: str) -> ModelSource:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    try:
        tensors = checkpoint_tensors(folder)
    except (OSError, ValueError):  # blobs not downloaded, or a truncated file: shapes from config
        tensors = {}
    return ModelSource(config, origin, str(folder), tensors)


def resolve(source: str, revision: str | None = None) -> ModelSource:
    """Raises LookupError naming what was tried when the config is nowhere offline."""
    if source.startswith("/") or source.startswith("."):
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise LookupError(f"{folder}/config.json not found")
        return _from_dir(folder, "local")
    snapshot = _cached_snapshot(source, revision)
    if snapshot is not None:
        return _from_dir(snapshot, "hf-cache")
    path = catalog_path(source)
    if path.is_file():
        return ModelSource(json.loads(path.read_text(encoding="utf-8")), "catalog", str(path))
    raise LookupError(f"no config for {source!r}: not a local dir, not in the HF cache ({_hf_hub_cache()}), "
                      f"not in the offline catalog")
