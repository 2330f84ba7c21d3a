"""The run log: the one owner of the layout of results/ (and of its published copy, reports/data/runs/).

A run is a folder `<root>/<run-id>/` holding `manifest.json` and one folder per cell with its
`record.json` (plus `engine.log` and `telemetry.csv` where the runner wrote them). Writers (the
local runner, the Ray runner, `ingest`) go through `RunWriter`; readers (`report`, `diff`,
resume, `calibrate`, `bisect`) go through `read_runs` / `recorded_keys`. Nothing else builds
these paths. Every write is atomic (temp file in the same folder, fsync, rename), so a harness
killed at any moment leaves the old file or the new one, never half of one.

Reading is versioned: a manifest or record from a newer schema, or one that is damaged, becomes a
`Problem` (path and reason) that the caller shows; nothing is skipped in silence. Manifests of
schema 1 named a cell's record by its folder (`<run>/<cell>`) where schema 2 names the file
(`<run>/<cell>/record.json`); both read.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from harness.redact import Redactor, redact_obj
from harness.schema import SCHEMA_VERSION, CellRecord, ManifestEntry, Outcome, RunManifest

M = TypeVar("M", CellRecord, RunManifest)

RECORD = "record.json"
MANIFEST = "manifest.json"
ENGINE_LOG = "engine.log"
TELEMETRY = "telemetry.csv"
PUBLISHED = Path("reports") / "data" / "runs"  # the committed copy: manifests and records only


@dataclass(frozen=True)
class Problem:
    """A file that could not be read, and why; shown as a warning line and counted in reports."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_run_id(now: datetime | None = None) -> str:
    """Sortable and unique enough across hosts: UTC time + short hostname."""
    now = now or datetime.now(UTC)
    host = socket.gethostname().split(".")[0] or "host"
    return f"{now:%Y%m%dT%H%M%SZ}-{host}"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- paths
def run_dir(root: Path, run_id: str) -> Path:
    return Path(root) / run_id


def cell_dir(root: Path, run_id: str, cell_id: str) -> Path:
    return Path(root) / run_id / cell_id


def record_path(root: Path, run_id: str, cell_id: str) -> Path:
    return cell_dir(root, run_id, cell_id) / RECORD


def record_ref(run_id: str, cell_id: str) -> str:
    """How a manifest names a record: its path relative to the results root, POSIX style."""
    return f"{run_id}/{cell_id}/{RECORD}"


def resolve_ref(root: Path, ref: str) -> Path:
    """A manifest's record reference -> the record file; schema-1 manifests named the folder."""
    path = Path(root) / ref
    return path if path.name == RECORD else path / RECORD


def find_run(roots: Iterable[Path], name: str) -> Path | None:
    """A run given as an id or as a path to its folder (`results/<run-id>/` works)."""
    given = Path(name)
    if (given / MANIFEST).is_file() or given.is_dir() and any(given.glob(f"*/{RECORD}")):
        return given
    for root in roots:
        folder = run_dir(root, given.name)
        if folder.is_dir():
            return folder
    return None


# --------------------------------------------------------------------------- reading
def _check_version(data: object) -> str | None:
    if not isinstance(data, dict):
        return "not a JSON object"
    version = data.get("schema_version", 1)
    if not isinstance(version, int):
        return f"schema_version {version!r} is not a number"
    if version > SCHEMA_VERSION:
        return (
            f"written by a newer harness (schema {version}, this one reads up to {SCHEMA_VERSION}); "
            "upgrade the harness to read it"
        )
    return None


def _load(path: Path, model: type[M]) -> tuple[M | None, Problem | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return None, Problem(path, f"cannot read: {exc.strerror or exc}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, Problem(path, f"damaged: not valid JSON ({exc})")
    why = _check_version(data)
    if why:
        return None, Problem(path, why)
    try:
        return model.model_validate(data), None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        return None, Problem(path, f"damaged: {loc}: {err['msg']}")


def read_record(path: Path) -> CellRecord:
    """One record; a newer schema or a damaged file raises ValueError naming the path and reason."""
    record, problem = _load(Path(path), CellRecord)
    if record is None:
        raise ValueError(str(problem))
    return record


@dataclass
class LoggedCell:
    """One cell of a run: its manifest entry and, when the run has one, its record."""

    cell_id: str
    status: str  # ran | reused | not_on_host (manifest status)
    record: CellRecord | None = None
    path: Path | None = None  # the record file
    reason: str | None = None


@dataclass
class LoggedRun:
    run_id: str
    folder: Path
    manifest: RunManifest | None
    cells: list[LoggedCell] = field(default_factory=list)
    published: bool = False

    @property
    def interrupted(self) -> bool:
        """The run was killed before it finished (its manifest never got `finished_at`)."""
        return self.manifest is not None and self.manifest.finished_at is None


@dataclass
class RunLog:
    """Every run under one or more roots, newest root entry winning for the same run id."""

    runs: list[LoggedRun]
    problems: list[Problem]

    def run(self, name: str) -> LoggedRun | None:
        wanted = Path(name).name
        return next((r for r in self.runs if r.run_id == wanted), None)

    def records(self) -> list[tuple[Path, CellRecord]]:
        """Each record once (a reused cell points at its original record)."""
        seen: dict[Path, CellRecord] = {}
        for run in self.runs:
            for cell in run.cells:
                if cell.record is not None and cell.path is not None and cell.status != "reused":
                    seen.setdefault(cell.path, cell.record)
        return list(seen.items())


def _read_one_run(root: Path, folder: Path, problems: list[Problem], published: bool) -> LoggedRun:
    manifest = None
    if (folder / MANIFEST).exists():
        manifest, problem = _load(folder / MANIFEST, RunManifest)
        if problem:
            problems.append(problem)
    run = LoggedRun(run_id=folder.name, folder=folder, manifest=manifest, published=published)
    listed: set[str] = set()
    if manifest is not None:
        for entry in manifest.cells:
            listed.add(entry.cell_id)
            cell = LoggedCell(entry.cell_id, entry.status, reason=entry.reason)
            if entry.status != "not_on_host":
                path = resolve_ref(root, entry.record or record_ref(folder.name, entry.cell_id))
                if path.exists():
                    cell.record, problem = _load(path, CellRecord)
                    cell.path = path
                    if problem:
                        problems.append(problem)
                else:
                    problems.append(Problem(path, f"the manifest of run {folder.name} lists it, but it is missing"))
            run.cells.append(cell)
    # Records without a manifest line: a run killed between writing a record and its manifest, or
    # records copied in by hand. They are shown, not dropped.
    for path in sorted(folder.glob(f"*/{RECORD}")):
        if path.parent.name in listed:
            continue
        record, problem = _load(path, CellRecord)
        if record is None:
            problems.append(problem)  # type: ignore[arg-type]  # _load gives one or the other
            continue
        run.cells.append(LoggedCell(record.cell_id, "ran", record, path))
    return run


def read_runs(roots: Iterable[Path]) -> RunLog:
    """Every run under the roots, oldest first. A run id found under several roots is read from
    the first root that has it (pass results/ before the published copy: it has the logs)."""
    runs: dict[str, LoggedRun] = {}
    problems: list[Problem] = []
    for index, root in enumerate(roots):
        root = Path(root)
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if folder.name in runs:
                continue
            if not (folder / MANIFEST).exists() and not any(folder.glob(f"*/{RECORD}")):
                continue  # not a run (e.g. the pid-file folder)
            runs[folder.name] = _read_one_run(root, folder, problems, published=index > 0)
    return RunLog(runs=[runs[k] for k in sorted(runs)], problems=problems)


def newest_by_key(records: Iterable[tuple[Path, CellRecord]]) -> dict[str, tuple[Path, CellRecord]]:
    """Cell key -> (newest record path, record), records given oldest run first."""
    return {record.key: (path, record) for path, record in records}


def recorded_keys(root: Path) -> dict[str, tuple[Path, CellRecord]]:
    """Cell key -> (newest record path, record): what a rerun of the same matrix may reuse."""
    return newest_by_key(read_runs([root]).records())


# --------------------------------------------------------------------------- writing
def claim_run_id(root: Path, run_id: str) -> str:
    """The run's folder, made here so no other run writes into it: a run started in the same
    second as another (same id) gets `<id>-2`, `-3`, ... (still sorted after the first)."""
    for n in range(1, 1000):
        candidate = run_id if n == 1 else f"{run_id}-{n}"
        try:
            run_dir(root, candidate).mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{run_dir(root, run_id)}: 999 runs of this id already")


class RunWriter:
    """Writes one run: records, and the manifest after every change (so a killed run keeps what it
    finished). Thread-safe: cells finish on several threads."""

    def __init__(self, root: Path, manifest: RunManifest):
        self.root = Path(root)
        self._made_root = not self.root.exists()  # removed again by discard_if_empty when left empty
        self.manifest = manifest
        self.manifest.run_id = claim_run_id(self.root, manifest.run_id)
        self._lock = threading.Lock()

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    def cell_dir(self, cell_id: str) -> Path:
        return cell_dir(self.root, self.run_id, cell_id)

    def enter(self, entry: ManifestEntry) -> None:
        """Add or replace a cell's manifest line (the Ray driver relays its nodes' lines)."""
        with self._lock:
            self.manifest.cells = [e for e in self.manifest.cells if e.cell_id != entry.cell_id] + [entry]
            self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_text(run_dir(self.root, self.run_id) / MANIFEST, self.manifest.model_dump_json(indent=2) + "\n")

    def ran(self, record: CellRecord) -> Path:
        """Store a record this run produced and list it in the manifest."""
        path = record_path(self.root, self.run_id, record.cell_id)
        atomic_write_text(path, record.model_dump_json(indent=2) + "\n")
        self.enter(
            ManifestEntry(
                cell_id=record.cell_id,
                key=record.key,
                status="ran",
                outcome=record.outcome,
                record=record_ref(self.run_id, record.cell_id),
            )
        )
        return path

    def store_file(self, rel: str, data: bytes) -> Path:
        """A cell's file made elsewhere (a Ray node's engine log or telemetry), `rel` to the run."""
        path = run_dir(self.root, self.run_id) / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ValueError(f"refusing to write outside the run folder: {rel}")
        atomic_write_text(path, data.decode("utf-8", errors="replace"))
        return path

    def reused(self, cell_id: str, key: str, outcome: Outcome, path: Path) -> None:
        """A cell answered by an earlier run's record (`path`, under the same root)."""
        ref = path.relative_to(self.root).as_posix()
        self.enter(ManifestEntry(cell_id=cell_id, key=key, status="reused", outcome=outcome, record=ref))

    def not_on_host(self, cell_id: str, reason: str | None) -> None:
        self.enter(ManifestEntry(cell_id=cell_id, status="not_on_host", reason=reason))

    def finish(self) -> Path:
        with self._lock:
            self.manifest.finished_at = utcnow()
            self._write_manifest()
        return run_dir(self.root, self.run_id) / MANIFEST

    def discard_if_empty(self) -> None:
        """A run that ran and reused nothing (refused by the device locks, interrupted before its
        first cell, an ingest without a log) leaves no folder."""
        with self._lock:
            if any(e.status != "not_on_host" for e in self.manifest.cells):
                return
            shutil.rmtree(run_dir(self.root, self.run_id), ignore_errors=True)
            if self._made_root and not any(self.root.iterdir()):
                self.root.rmdir()


# --------------------------------------------------------------------------- publishing
def publish(log: RunLog, published_root: Path) -> list[Path]:
    """Copy the manifests and records of runs not yet published into the committed copy.
    Engine logs and telemetry stay where the run was made; published files are never removed."""
    written = []
    redactor = Redactor(env=os.environ)
    for run in log.runs:
        if run.published or run.manifest is None:
            continue
        target = run_dir(published_root, run.run_id)
        for cell in run.cells:
            if cell.record is None or cell.path is None:
                continue
            dest = record_path(published_root, run.run_id, cell.cell_id) if cell.status != "reused" else None
            if dest is not None and not dest.exists():
                # Records are redacted when written; publishing redacts again, so a record written
                # by hand or by an older harness cannot carry a secret into the repository.
                clean = redact_obj(cell.record.model_dump(mode="json"), redactor)
                atomic_write_text(dest, json.dumps(clean, indent=2, ensure_ascii=False) + "\n")
                written.append(dest)
        manifest = target / MANIFEST
        text = run.manifest.model_dump_json(indent=2) + "\n"
        if not manifest.exists() or manifest.read_text(encoding="utf-8") != text:
            atomic_write_text(manifest, text)
            written.append(manifest)
    return written


def iter_records(root: Path) -> list[tuple[Path, CellRecord]]:
    """Every readable record under one root, each once (for calibration and tests)."""
    return read_runs([root]).records()
