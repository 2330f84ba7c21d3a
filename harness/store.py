"""Result storage: one `record.json` per cell and one `manifest.json` per run, under results/.

Layout: `results/<run-id>/manifest.json` and `results/<run-id>/<cell-id>/{record.json,engine.log}`.
Every write is atomic (temp file in the same folder, fsync, rename), so a harness killed at any
moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ValidationError

from harness.schema import CellRecord, RunManifest

RECORD = "record.json"
MANIFEST = "manifest.json"
ENGINE_LOG = "engine.log"


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id(now: datetime | None = None) -> str:
    """Sortable and unique enough across hosts: UTC time + short hostname."""
    now = now or datetime.now(timezone.utc)
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


def write_json(path: Path, model: BaseModel) -> Path:
    atomic_write_text(path, model.model_dump_json(indent=2) + "\n")
    return path


def cell_dir(results_dir: Path, run_id: str, cell_id: str) -> Path:
    return results_dir / run_id / cell_id


def write_record(results_dir: Path, record: CellRecord) -> Path:
    return write_json(cell_dir(results_dir, record.run_id, record.cell_id) / RECORD, record)


def write_manifest(results_dir: Path, manifest: RunManifest) -> Path:
    return write_json(results_dir / manifest.run_id / MANIFEST, manifest)


def read_record(path: Path) -> CellRecord:
    return CellRecord.model_validate_json(path.read_text(encoding="utf-8"))


def read_manifest(path: Path) -> RunManifest:
    return RunManifest.model_validate_json(path.read_text(encoding="utf-8"))


def iter_records(results_dir: Path) -> Iterator[tuple[Path, CellRecord]]:
    """Every readable record under results/, oldest run first. Unreadable ones are skipped:
    a record from a newer schema or a damaged file must not stop a report."""
    for path in sorted(results_dir.glob(f"*/*/{RECORD}")):
        try:
            yield path, read_record(path)
        except (ValidationError, json.JSONDecodeError, OSError):
            continue


def iter_manifests(results_dir: Path) -> Iterator[tuple[Path, RunManifest]]:
    for path in sorted(results_dir.glob(f"*/{MANIFEST}")):
        try:
            yield path, read_manifest(path)
        except (ValidationError, json.JSONDecodeError, OSError):
            continue


def recorded_keys(results_dir: Path) -> dict[str, Path]:
    """Cell key -> newest record path: what a rerun of the same matrix may skip."""
    return {record.key: path for path, record in iter_records(results_dir)}
