"""Model fetch before the engine starts: resolve, download and time a model's files.

The runner calls `fetch_model` before spawning vLLM so that spawn->ready measures loading, not
downloading, and a slow download never trips the ready timeout. For a hub repo the revision is
resolved to a commit SHA, then the files vLLM needs are downloaded with huggingface_hub into the
shared HF cache (HF_HOME / HF_HUB_CACHE), where the engine finds them again. A gated, private or
missing repo fails within one round trip to the hub, as `FetchError` with its failure class;
offline (HF_HUB_OFFLINE=1) only the cache is used and a model missing there is `OfflineMissing`.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is
first imported; this module relies on that configuration rather than re-reading the environment,
so set them in the environment of the process (the engine it spawns inherits the same values).

File selection (`select_files`), mirroring what vLLM reads from a model directory:
- only files at the repo root: vLLM and transformers read config, tokenizer and weights from
  there, so `original/` (Meta's consolidated .pth copy), `onnx/`, `openvino/`, etc. are skipped;
- weights: root `*.safetensors`, leaving out Mistral-format `consolidated*.safetensors` duplicates
  when HF-format shards exist; else `*.bin`; else `*.pt` (vLLM's `load_format=auto` order);
- config, tokenizer, generation config, chat templates: `*.json`, `*.jinja`, `*.model`,
  `*.tiktoken`, `*.txt`; plus `*.py` when the model needs trust_remote_code.
"""

from __future__ import annotations

import glob
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import (
    HfApi,
    constants,
    get_cached_repo_tree,
    get_token,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import tqdm as hf_tqdm

from harness.schema import FetchInfo, ModelSpec

# Seconds between progress lines while files download.
PROGRESS_INTERVAL_S = 5.0

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")  # in vLLM's load_format=auto preference order
_AUX_SUFFIXES = (".json", ".jinja", ".model", ".tiktoken", ".txt")

Progress = Callable[[str], None]


class FetchError(Exception):
    """The model cannot be fetched; `failure_class` is a schema FailureClass, `message` says what to do."""

    def __init__(self, failure_class: str, message: str):
        super().__init__(message)
        self.failure_class = failure_class
        self.message = message


class OfflineMissing(Exception):
    """Offline and the model (or part of it) is not in the HF cache: the runner records a skip."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def select_files(names: Iterable[str], *, trust_remote_code: bool = False) -> list[str]:
    """The repo files vLLM needs, by the rule in the module docstring (paths relative to the root)."""
    root = [n for n in names if "/" not in n]
    weights: list[str] = []
    for suffix in _WEIGHT_SUFFIXES:
        weights = [n for n in root if n.endswith(suffix)]
        if suffix == ".safetensors":
            hf_shards = [n for n in weights if not n.startswith("consolidated")]
            weights = hf_shards or weights
        if weights:
            break
    aux_suffixes = _AUX_SUFFIXES + ((".py",) if trust_remote_code else ())
    aux = [n for n in root if n.endswith(aux_suffixes)]
    return sorted(set(weights) | set(aux))


def fetch_model(
    spec: ModelSpec,
    *,
    offline: bool | None = None,
    token: str | None = None,
    progress: Progress | None = None,
) -> FetchInfo:
    """Make `spec`'s files available locally and say where, at which commit, and what it cost.

    `offline=None` follows HF_HUB_OFFLINE. `token=None` lets huggingface_hub find one (HF_TOKEN,
    then the saved login). `bytes` is what this call downloaded when `source="hub"`, and the size
    of the selected files when they were already there (`"cache"`, `"local"`).
    """
    emit: Progress = progress or (lambda _line: None)
    started = time.monotonic()
    if spec.is_local:
        return _fetch_local(spec, started)
    if offline is None:
        offline = constants.HF_HUB_OFFLINE
    try:
        if offline:
            return _fetch_from_cache(spec, started, emit)
        try:
            return _fetch_from_hub(spec, token, started, emit)
        except (httpx2.TransportError, OfflineModeIsEnabled, HfHubHTTPError) as exc:
            # Hub unreachable or down (5xx): a complete cached copy still lets the cell run.
            if isinstance(exc, HfHubHTTPError) and exc.response.status_code < 500:
                raise
            try:
                return _fetch_from_cache(spec, started, emit)
            except OfflineMissing:
                raise _unreachable(spec, exc) from exc
    except (FetchError, OfflineMissing):
        raise
    except Exception as exc:
        raise _classify(exc, spec, token) from exc


# --------------------------------------------------------------------------- sources
def _fetch_local(spec: ModelSpec, started: float) -> FetchInfo:
    root = Path(spec.source)
    if not root.is_dir():
        raise FetchError("model_not_found", f"local model directory {root} does not exist: fix `source` in the matrix")
    names = [p.name for p in root.iterdir() if p.is_file()]
    selected = select_files(names, trust_remote_code=spec.trust_remote_code)
    return FetchInfo(
        source="local",
        path=str(root),
        bytes=sum((root / n).stat().st_size for n in selected),
        seconds=round(time.monotonic() - started, 3),
    )


def _fetch_from_hub(spec: ModelSpec, token: str | None, started: float, emit: Progress) -> FetchInfo:
    repo = spec.source
    api = HfApi(token=token)
    # resolve_revision also records revision -> sha under refs/, so offline runs find it later.
    revision = api.resolve_revision(repo, revision=spec.revision)
    sha = revision.resolved
    label = f"{repo}@{sha[:7]}"
    # The listing comes from repo info rather than the tree API: that call is not retried, so an
    # unreachable hub falls back to the cache at once instead of after the tree API's back-off.
    siblings = api.model_info(repo, revision=sha, files_metadata=True).siblings or []
    tree = {s.rfilename: s.size or 0 for s in siblings}
    selected = select_files(tree, trust_remote_code=spec.trust_remote_code)
    _require_weights(selected, label, "repo")
    missing = [n for n in selected if not isinstance(try_to_load_from_cache(repo, n, revision=sha), str)]
    total = sum(tree[n] for n in selected)
    to_download = sum(tree[n] for n in missing)
    if missing:
        model = f"model: {len(selected)} files, {_mb(total)}"
        emit(f"downloading {label}: {len(missing)} files, {_mb(to_download)} ({model})")
    else:
        emit(f"{label} in cache: {len(selected)} files, {_mb(total)}")

    def download() -> str:
        # Also run on a cache hit: it returns the snapshot folder (no request per file for a
        # commit SHA already on disk) and checks the snapshot against the hub's file listing.
        return snapshot_download(
            repo,
            revision=revision,
            allow_patterns=[glob.escape(n) for n in selected],
            token=token,
            tqdm_class=_QuietBar,
        )

    path = _with_progress(download, repo, sha, {n: tree[n] for n in missing}, label, emit) if missing else download()
    seconds = round(time.monotonic() - started, 3)
    if missing:
        emit(f"downloaded {label}: {len(missing)} files, {_mb(to_download)} in {seconds:.1f} s")
    return FetchInfo(
        source="hub" if missing else "cache",
        path=path,
        revision_sha=sha,
        bytes=to_download if missing else total,
        seconds=seconds,
    )


def _fetch_from_cache(spec: ModelSpec, started: float, emit: Progress) -> FetchInfo:
    repo = spec.source
    wanted = f"{repo}@{spec.revision or constants.DEFAULT_REVISION}"
    missing_msg = (
        f"{wanted} is not in the HF cache ({constants.HF_HUB_CACHE}) and the hub is not used "
        "(HF_HUB_OFFLINE=1): run once online to download it, or point HF_HOME at a cache that has it"
    )
    try:
        sha = HfApi().resolve_revision(repo, revision=spec.revision, local_files_only=True).resolved
    except RevisionResolutionError as exc:
        raise OfflineMissing(missing_msg) from exc
    try:
        # The file listing an earlier online download cached; without it, trust the snapshot folder.
        listed = [f.path for f in get_cached_repo_tree(repo, revision=sha)]
        patterns = [glob.escape(n) for n in select_files(listed, trust_remote_code=spec.trust_remote_code)]
    except CachedRepoTreeNotFoundError:
        patterns = None
    try:
        path = snapshot_download(repo, revision=sha, allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError as exc:  # IncompleteSnapshotError included
        raise OfflineMissing(f"{missing_msg} ({exc.__class__.__name__})") from exc
    names = [p.name for p in Path(path).iterdir() if p.is_file()]
    selected = select_files(names, trust_remote_code=spec.trust_remote_code)
    label = f"{repo}@{sha[:7]}"
    try:
        _require_weights(selected, label, "cached snapshot")
    except FetchError as exc:
        raise OfflineMissing(exc.message) from exc
    size = sum((Path(path) / n).stat().st_size for n in selected)
    emit(f"{label} in cache (offline): {len(selected)} files, {_mb(size)}")
    return FetchInfo(
        source="cache", path=path, revision_sha=sha, bytes=size, seconds=round(time.monotonic() - started, 3)
    )


# --------------------------------------------------------------------------- helpers
class _QuietBar(hf_tqdm):
    """huggingface_hub's own bars would flood the runner's output; progress goes through `emit`."""

    def __init__(self, *args: object, **kwargs: object):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _with_progress(
    download: Callable[[], str], repo: str, sha: str, pending: dict[str, int], label: str, emit: Progress
) -> str:
    """Run `download` in a worker thread, emitting a progress line every PROGRESS_INTERVAL_S."""
    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "blobs"
    expected = sum(pending.values())
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["path"] = download()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    # Daemon: Ctrl-C during a long download ends the process instead of waiting for the download.
    worker = threading.Thread(target=run, name="fetch-download", daemon=True)
    worker.start()
    worker.join(PROGRESS_INTERVAL_S)
    while worker.is_alive():
        done = [n for n in pending if isinstance(try_to_load_from_cache(repo, n, revision=sha), str)]
        # Files in flight are written to blobs/<etag>.<id>.incomplete, then renamed.
        partial = sum(_size(p) for p in blobs.glob("*.incomplete"))
        got = sum(pending[n] for n in done) + partial
        emit(f"downloading {label}: {len(done)}/{len(pending)} files, {_mb(got)} / {_mb(expected)}")
        worker.join(PROGRESS_INTERVAL_S)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["path"]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # finished and renamed since it was listed
        return 0


def _require_weights(selected: list[str], label: str, where: str) -> None:
    if not any(n.endswith(_WEIGHT_SUFFIXES) for n in selected):
        raise FetchError(
            "other",
            f"{label}: the {where} has no *.safetensors, *.bin or *.pt weights at its root "
            "(GGUF-only or not a transformers model?): pick a repo in HF format",
        )


def _classify(exc: Exception, spec: ModelSpec, token: str | None) -> FetchError:
    repo = spec.source
    page = f"{constants.ENDPOINT}/{repo}"
    has_token = bool(token or get_token())
    if isinstance(exc, GatedRepoError):
        if has_token:
            msg = (
                f"{repo} is gated and the token in use has no access: "
                f"accept the licence at {page} with the token's account"
            )
        else:
            msg = f"{repo} is gated: accept the licence at {page} and set HF_TOKEN"
        return FetchError("gated_or_auth", msg)
    if isinstance(exc, RevisionNotFoundError):
        return FetchError(
            "model_not_found",
            f"revision {spec.revision!r} does not exist in {repo}: fix `revision` in the matrix",
        )
    if isinstance(exc, RepositoryNotFoundError):
        hint = "" if has_token else "; if it is private, set HF_TOKEN to a token with read access"
        return FetchError("model_not_found", f"{repo} was not found on {constants.ENDPOINT}: check the repo id{hint}")
    if isinstance(exc, DisabledRepoError):
        return FetchError("model_not_found", f"{repo} is disabled on {constants.ENDPOINT}: pick another repo")
    if isinstance(exc, HfHubHTTPError) and exc.response.status_code == 401:
        return FetchError(
            "gated_or_auth",
            f"the hub rejected the token (HF_TOKEN or saved login) for {repo}: set a valid token",
        )
    if isinstance(exc, HfHubHTTPError) and exc.response.status_code == 403:
        return FetchError(
            "gated_or_auth",
            f"the token in use may not read {repo}: give it read access (fine-grained token?)",
        )
    if isinstance(exc, RevisionResolutionError):
        return _unreachable(spec, exc)
    return FetchError("other", _redact(f"fetching {repo} failed: {exc.__class__.__name__}: {exc}", token))


def _unreachable(spec: ModelSpec, exc: Exception) -> FetchError:
    return FetchError(
        "other",
        f"cannot reach {constants.ENDPOINT} ({exc.__class__.__name__}) and {spec.source} is not complete "
        "in the HF cache: check the network, or run with HF_HUB_OFFLINE=1 on a cache that has it",
    )


def _redact(text: str, token: str | None) -> str:
    """Belt and braces: no token ever reaches a message, whatever a library put in its error text."""
    for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret:
            text = text.replace(secret, "***")
    return text


def _mb(size: int) -> str:
    return f"{size / 1e6:.0f} MB" if size >= 10e6 else f"{size / 1e6:.1f} MB"


def model_fingerprint(path: str) -> str:
    """Identity of a local model folder: config bytes + every file's name and size."""
    folder = Path(path)
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            digest.update(f"{file.relative_to(folder)}:{file.stat().st_size}\n".encode())
    config = folder / "config.json"
    if config.exists():
        digest.update(config.read_bytes())
    return "local-" + digest.hexdigest()[:16]
