"""Where a model's config.json and safetensors headers come from, in this order:

1. a local model directory;
2. the Hugging Face cache (a snapshot the runner or vLLM downloaded);
3. the Hub, when online: config.json (kept in the HF cache) and every shard's header through
   `HfApi.get_safetensors_metadata` (HTTP range requests: kilobytes, never the weights). The
   headers are kept under the harness cache by commit, so a later offline plan finds them;
4. the offline catalog in plan_data/catalog (config only: weights from the shapes).

A Hub error (gated, missing, no network) falls through to the catalog and is named in the
LookupError when nothing else has the model. HF_HUB_OFFLINE=1 skips step 3.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, NotASafetensorsRepoError

from harness.cache import cache_dir
from harness.plan.weights import checkpoint_tensors


@dataclass
class ModelSource:
    config: dict[str, Any]
    origin: str  # "local", "hf-cache", "hub", "catalog"
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


def _headers_path(sha: str) -> Path:
    return cache_dir() / "safetensors-headers" / f"{sha}.json"


def _from_dir(folder: Path, origin: str) -> ModelSource:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    try:
        tensors = checkpoint_tensors(folder)
    except (OSError, ValueError):  # blobs not downloaded, or a truncated file: shapes from config
        tensors = {}
    if not tensors and origin == "hf-cache" and _headers_path(folder.name).is_file():
        tensors = json.loads(_headers_path(folder.name).read_text(encoding="utf-8"))  # an earlier online plan
    return ModelSource(config, origin, str(folder), tensors)


@functools.cache
def _hub_unreachable() -> str | None:
    """One quick request per process: with no network huggingface_hub retries each call for ~20 s."""
    try:
        httpx2.head(constants.ENDPOINT, timeout=5)
    except httpx2.HTTPError as exc:
        return f"{constants.ENDPOINT} unreachable: {exc}"
    return None


def _from_hub(repo_id: str, revision: str | None) -> ModelSource:
    """config.json and the safetensors headers of every shard, at one commit of the repo."""
    api = HfApi()
    config_file = Path(api.hf_hub_download(repo_id, "config.json", revision=revision))
    sha = config_file.parent.name  # the snapshot folder is named by the commit it resolved to
    config = json.loads(config_file.read_text(encoding="utf-8"))
    try:
        meta = api.get_safetensors_metadata(repo_id, revision=sha)
    except NotASafetensorsRepoError:  # .bin-only checkpoints: weights from the shapes
        return ModelSource(config, "hub", f"{constants.ENDPOINT}/{repo_id}@{sha}")
    tensors = {
        name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
        for shard in meta.files_metadata.values()
        for name, t in shard.tensors.items()
    }
    cached = _headers_path(sha)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(tensors), encoding="utf-8")
    tmp.replace(cached)
    return ModelSource(config, "hub", f"{constants.ENDPOINT}/{repo_id}@{sha}", tensors)


def resolve(source: str, revision: str | None = None) -> ModelSource:
    """Raises LookupError naming what was tried when no source has the model's config."""
    if source.startswith(("/", ".")) or Path(source).is_dir():
        folder = Path(source)
        if not (folder / "config.json").is_file():
            raise LookupError(f"{folder}/config.json not found")
        return _from_dir(folder, "local")
    snapshot = _cached_snapshot(source, revision)
    cached = _from_dir(snapshot, "hf-cache") if snapshot is not None else None
    if cached is not None and cached.tensors:
        return cached
    hub_error = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else _hub_unreachable()
    if hub_error is None:
        try:
            return _from_hub(source, revision)
        except (HfHubHTTPError, LocalEntryNotFoundError, httpx2.HTTPError, OSError, ValueError) as exc:
            hub_error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    if cached is not None:
        return cached
    path = catalog_path(source)
    if path.is_file():
        return ModelSource(json.loads(path.read_text(encoding="utf-8")), "catalog", str(path))
    raise LookupError(
        f"no config for {source!r}: not a local dir, not in the HF cache ({_hf_hub_cache()}), "
        f"not in the offline catalog, and the Hub gave nothing ({hub_error})"
    )
