"""One cell from fetch to record: the cell runner.

Per cell: fetch the model -> plan -> spawn the engine (127.0.0.1, free port, random API key, its
own GPUs, DEBUG log) -> wait for /health and /v1/models -> read /metrics -> validate "What is
2+2?" -> probe -> stop the whole process group -> parse the log -> write the record. A startup
failure, crash or hang ends that cell with its outcome recorded. Which cells run where and when is
the scheduler's (`harness.run.scheduler`); the local scheduler and the Ray task both run cells
through this class, writing to a `RecordSink` and showing progress on a `View`.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from harness import store
from harness.engine.metrics import scrape_cache_config
from harness.engine.process import (
    DISK_FULL_ERRNOS,
    PIDS_DIR,
    EngineExited,
    EngineProcess,
    ReadyTimeout,
    engine_api_key,
    free_port,
    server_command,
    server_env,
)
from harness.errors import DiskFull, InputError
from harness.host.devices import Nvml
from harness.host.fingerprint import Host
from harness.host.hygiene import wait_for_clean_gpus
from harness.matrix import Matrix
from harness.parse import parse_log_file
from harness.plan import autofit_args, plan_cell
from harness.probes import profiles
from harness.probes.load import run_profile
from harness.probes.profiles import ProbeProfile
from harness.probes.validation import settings as validation_settings
from harness.probes.validation import validate
from harness.redact import Redactor, secret_env_values
from harness.run.fetch import FetchError, OfflineMissing, fetch_model, model_fingerprint
from harness.run.telemetry import Sampler
from harness.schema import (
    Cell,
    CellRecord,
    Device,
    EngineFacts,
    Outcome,
    ProbeResult,
    TelemetrySummary,
    Timings,
    cell_key,
)

# Substrings of engine log lines that move a cell from "starting" to the next phase.
_PHASES = (
    ("Loading weights", "loading"),
    ("Starting to load model", "loading"),
    ("Capturing CUDA graph", "capturing graphs"),
    ("Application startup complete", "ready"),
)


@dataclass
class RunOptions:
    results_dir: Path = Path("results")
    force: bool = False
    plan: bool = True
    offline: bool | None = None
    stop_grace_s: float = 15.0
    gpu_wait_s: float = 120.0  # how long a cell waits for its GPUs to be free of foreign processes
    progress: str = "auto"


class View(Protocol):
    """Where a cell's progress goes: the console's progress table, or a Ray task's board."""

    def phase(self, cell_id: str, phase: str) -> None: ...

    def add(self, cell_id: str, phase: str, outcome: str = "", detail: str = "") -> None: ...

    def done(self, record: CellRecord) -> None: ...


class RecordSink(Protocol):
    """Where a cell's files and record go: the run log (`harness.store.RunWriter`)."""

    def cell_dir(self, cell_id: str) -> Path: ...

    def ran(self, record: CellRecord) -> Path: ...

    def reused(self, cell_id: str, key: str, outcome: Outcome, path: Path) -> None: ...


class Recorded(Protocol):
    """The records a rerun may reuse, by key (a dict locally; on a Ray node, the driver's keys)."""

    def get(self, key: str, default: None = None) -> tuple[Path, CellRecord] | None: ...


class _Quiet:
    def phase(self, cell_id: str, phase: str) -> None:
        pass

    def add(self, cell_id: str, phase: str, outcome: str = "", detail: str = "") -> None:
        pass

    def done(self, record: CellRecord) -> None:
        pass


@dataclass
class CellRunner:
    """Runs cells of one run: `run(cell, devices, recorded)` returns the cell's record (or the
    reused one); `stop_all()` stops every engine still running when the run is interrupted."""

    matrix: Matrix
    host: Host
    options: RunOptions
    sink: RecordSink
    run_id: str
    view: View = field(default_factory=_Quiet)
    nvml: Nvml | None = None  # an open NVML for hygiene and telemetry; None: each opens its own

    def __post_init__(self) -> None:
        self.pids_dir = self.options.results_dir / PIDS_DIR
        # Values of the configs' `env` named as secrets are masked in logs and records, like the harness's own.
        self.config_secrets = {v for c in self.matrix.cells for v in secret_env_values(c.config.env)}
        self.redactor = Redactor(self.config_secrets, env=os.environ)
        self.probe_spec = self.matrix.spec.probe
        self._engines: set[EngineProcess] = set()
        self.interrupted = False
        self.reserves: dict[str, int] = {}  # cell id -> fd of its reserve (see _reserve)
        self.lock_paths: list[str] = []  # device lock files the scheduler holds; kept in engine pid files

    def key(self, cell: Cell, engine_version: str | None, revision: str | None = None) -> str:
        """The cell's identity: what it is and how it is measured (probe, validation, timeouts)."""
        return cell_key(
            cell,
            engine_version,
            revision,
            probe=self.probe_of(cell),
            validation=validation_settings("reasoning" in cell.model.tags),
            timeouts=self.matrix.spec.timeouts.model_dump(),
        )

    def probe_of(self, cell: Cell) -> str | dict[str, Any] | None:
        """The probe a cell runs: its config's own `probe:`, else the matrix's."""
        return self.probe_spec if cell.config.probe is None else cell.config.probe

    def _release(self, cell_id: str) -> None:
        fd = self.reserves.pop(cell_id, None)
        if fd is not None:
            os.close(fd)

    def stop_all(self) -> None:
        """The run is going down: stop every engine; unfinished cells are not recorded."""
        self.interrupted = True
        for proc in list(self._engines):
            proc.stop(grace=2.0)

    def run(self, cell: Cell, devices: list[Device], recorded: Recorded) -> CellRecord:
        view = self.view
        started, t0 = store.utcnow(), time.monotonic()
        engine = self.host.engines[cell.engine.name]
        rec = CellRecord(
            run_id=self.run_id,
            cell_id=cell.cell_id,
            key="",
            cell=cell,
            host=self.host.fingerprint,
            device_ids=[d.index for d in devices if d.kind == "gpu"],
            started_at=started,
            outcome="skipped",
            engine_version=engine.vllm,
        )
        view.phase(cell.cell_id, "fetching")
        try:
            rec.fetch = fetch_model(
                cell.model, offline=self.options.offline, progress=lambda msg: view.phase(cell.cell_id, msg)
            )
        except OfflineMissing as exc:
            rec.skip_reason = str(exc)
            return self._finish(rec, t0)
        except FetchError as exc:
            rec.key = self.key(cell, engine.vllm)
            # The fetch error's message says what to do (accept the licence, fix the repo id).
            rec.outcome, rec.failure_class = "failed", exc.failure_class  # type: ignore[assignment]
            rec.failure_detail = rec.remedy = str(exc)
            return self._finish(rec, t0)
        model_dir = rec.fetch.path or cell.model.source
        revision = rec.fetch.revision_sha or model_fingerprint(model_dir)
        rec.key = self.key(cell, engine.vllm, revision)
        previous = recorded.get(rec.key)
        if previous is not None:
            path, old = previous
            if reusable(old):
                self.sink.reused(cell.cell_id, rec.key, old.outcome, path)
                view.add(cell.cell_id, "reused", outcome=old.outcome, detail=f"recorded in {old.run_id}")
                return old
        if self.options.plan:
            view.phase(cell.cell_id, "planning")
            memory = next((d.memory_total_gib for d in devices if d.kind == "gpu"), None)
            plan = plan_cell(cell, memory, vllm_version=engine.vllm)
            rec.plan = plan
            if plan.fits is False and cell.config.skip_if_unfit:
                rec.skip_reason = f"predicted not to fit: {plan.reason}" + (
                    f"; fix: {plan.suggestion}" if plan.suggestion else ""
                )
                return self._finish(rec, t0)
        if rec.device_ids:
            view.phase(cell.cell_id, "checking GPUs")
            check = wait_for_clean_gpus(
                rec.device_ids,
                gpu_memory_utilization=cell.config.args.get("gpu_memory_utilization"),
                timeout_s=self.options.gpu_wait_s,
                nvml=self.nvml,
            )
            if not check.ok:
                rec.skip_reason = check.reason
                return self._finish(rec, t0)
        self._serve(rec, cell, model_dir, devices, t0 + self.matrix.spec.timeouts.cell_s)
        rec = self._finish(rec, t0)
        if cell.config.autofit and rec.outcome == "failed" and rec.facts:
            retry = autofit_args(cell, rec.facts, rec.plan, rec.engine_version)
            if retry:
                return self._autofit(cell, rec, retry, model_dir, devices)
        return rec

    def _autofit(
        self, cell: Cell, failed: CellRecord, changes: dict[str, Any], model_dir: str, devices: list[Device]
    ) -> CellRecord:
        """One retry with the fix (vLLM's own max-len estimate or the planner's), as its own cell."""
        config = cell.config.model_copy(
            update={"name": f"{cell.config.name}+autofit", "args": {**cell.config.args, **changes}, "autofit": False}
        )
        retry_cell = cell.model_copy(update={"config": config})
        t0 = time.monotonic()
        rec = failed.model_copy(
            update={
                "cell_id": retry_cell.cell_id,
                "cell": retry_cell,
                "autofit_of": failed.cell_id,
                "key": self.key(retry_cell, failed.engine_version, failed.fetch.revision_sha if failed.fetch else None),
                "started_at": store.utcnow(),
                "outcome": "skipped",
                "failure_class": None,
                "failure_detail": None,
                "remedy": None,
                "facts": None,
                "metrics": None,
                "validation": None,
                "probes": None,
                "telemetry": None,
                "timings": Timings(),
                "engine_exit_code": None,
                "command": [],
            }
        )
        self._serve(rec, retry_cell, model_dir, devices, t0 + self.matrix.spec.timeouts.cell_s)
        return self._finish(rec, t0)

    def _serve(self, rec: CellRecord, cell: Cell, model_dir: str, devices: list[Device], deadline: float) -> None:
        """Start, check and stop the engine; `deadline` (monotonic) is the cell's timeouts.cell_s."""
        view, timeouts = self.view, self.matrix.spec.timeouts
        folder = self.sink.cell_dir(cell.cell_id)
        try:
            self.reserves[cell.cell_id] = _reserve(folder)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            _disk_full(rec, f"no room for the cell's files in {folder}: {exc.strerror}; engine not started")
            return
        port, api_key = free_port(), engine_api_key()
        redactor = Redactor([api_key, *self.config_secrets], env=os.environ)
        cmd = server_command(cell, model_dir, port, self.host.arg_actions[cell.engine.name])
        rec.command = [redactor.redact(part) for part in cmd]
        env = {
            **os.environ,
            "VLLM_LOGGING_LEVEL": "DEBUG",
            "VLLM_LOGGING_COLOR": "0",
            "NO_COLOR": "1",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            **cell.config.env,
            **server_env(api_key),
        }
        if rec.device_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, rec.device_ids))
        log_path = folder / store.ENGINE_LOG
        rec.engine_log = store.ENGINE_LOG

        def on_line(line: str) -> None:
            for needle, phase in _PHASES:
                if needle in line:
                    view.phase(cell.cell_id, phase)

        proc = EngineProcess(
            cmd,
            env,
            log_path,
            self.pids_dir,
            redactor.redact,
            on_line,
            owner={"run_id": self.run_id, "locks": self.lock_paths},
        )
        base = f"http://127.0.0.1:{port}"
        view.phase(cell.cell_id, "starting")
        spawned = time.monotonic()
        proc.start()
        self._engines.add(proc)
        sampler = Sampler(proc.pid, rec.device_ids, nvml=self.nvml)
        sampler.start()
        # The whole cell's bound: past it the engine is stopped, whatever it is doing.
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            proc.stop(self.options.stop_grace_s)

        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
        watchdog.daemon = True
        watchdog.start()
        timings = rec.timings
        stage = "startup"
        series_error: OSError | None = None
        try:
            try:
                timings.spawn_to_ready_s = round(proc.wait_ready(base, api_key, timeouts.ready_s), 3)
            finally:
                timings.startup_s = round(time.monotonic() - spawned, 3)
            sampler.mark_ready()
            view.phase(cell.cell_id, "ready")
            rec.metrics = scrape_cache_config(base, api_key)
            stage = "validation"
            view.phase(cell.cell_id, "validating")
            rec.validation = validate(
                base,
                cell.model.name,
                api_key,
                model_dir=model_dir,
                reasoning="reasoning" in cell.model.tags,
                timeout=timeouts.request_s,
            )
            timings.validation_s = rec.validation.seconds
            profile = probe_profile(self.probe_of(cell), rec.metrics.kv_cache_max_concurrency if rec.metrics else None)
            if profile is not None and rec.validation.passed:
                stage = "probes"
                view.phase(cell.cell_id, "probing")
                probe_t0 = time.monotonic()
                sampler.mark_probes_start()
                rec.probes = ProbeResult.model_validate(
                    run_profile(
                        base,
                        cell.model.name,
                        api_key,
                        profile,
                        tokenizer_dir=model_dir,
                        request_timeout=timeouts.request_s,
                    )
                )
                sampler.mark_probes_end()
                timings.probes_s = round(time.monotonic() - probe_t0, 3)
        except EngineExited as exc:
            rec.outcome, rec.failure_class = "failed", "other"
            rec.failure_detail = f"engine exited with code {exc.returncode} during {stage}"
        except ReadyTimeout as exc:
            rec.outcome, rec.failure_class = "failed", "timeout"
            rec.failure_detail = f"engine alive but not serving: {exc} (timeouts.ready_s)"
            rec.remedy = "raise timeouts.ready_s if the engine was still loading; else read engine.log"
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            code = proc.exit_code_within(2.0)
            rec.outcome = "failed"
            if code is not None:  # the engine died under the request: a crash, not a hang
                rec.failure_class = "other"
                rec.failure_detail = f"engine exited with code {code} during {stage}"
            else:
                rec.failure_class = "timeout"
                rec.failure_detail = f"no answer during {stage} within {timeouts.request_s:.0f} s: {exc}"
                rec.remedy = "raise timeouts.request_s if the engine is just slow; else read engine.log"
        finally:
            watchdog.cancel()
            view.phase(cell.cell_id, "stopping")
            timings.stop_s = round(proc.stop(self.options.stop_grace_s), 3)
            self._engines.discard(proc)
            rec.engine_exit_code = proc.poll()
            rec.telemetry = TelemetrySummary.model_validate(sampler.stop(_generated_tokens(rec.probes)))
            try:
                sampler.write_series(folder / store.TELEMETRY)
                rec.telemetry.series = store.TELEMETRY
            except OSError as exc:
                if exc.errno not in DISK_FULL_ERRNOS:
                    raise
                series_error = exc
        rec.facts = parse_log_file(log_path) if log_path.is_file() else None
        if proc.log_error is not None and proc.log_error.errno in DISK_FULL_ERRNOS:
            _disk_full(rec, f"engine.log cut after {proc.log_bytes} bytes: {proc.log_error.strerror}")
            return
        if series_error is not None:
            _disk_full(rec, f"{store.TELEMETRY} not written: {series_error.strerror}")
            return
        if expired.is_set():
            rec.outcome, rec.failure_class = "failed", "timeout"
            rec.failure_detail = (
                f"the cell ran past timeouts.cell_s ({timeouts.cell_s:g} s) during {stage}; engine stopped"
            )
            rec.remedy = "raise timeouts.cell_s, or probe less (the matrix's probe profile)"
            return
        _judge(rec)

    def _finish(self, rec: CellRecord, t0: float) -> CellRecord:
        if self.interrupted:  # the harness is going down: this cell did not finish, record nothing
            raise KeyboardInterrupt("run interrupted")
        t = rec.timings
        t.total_s = round(time.monotonic() - t0, 3)
        if rec.fetch and rec.fetch.seconds is not None:
            t.fetch_s = rec.fetch.seconds
        accounted = sum(x or 0.0 for x in (t.fetch_s, t.startup_s, t.validation_s, t.probes_s, t.stop_s))
        t.harness_overhead_s = round(max(t.total_s - accounted, 0.0), 3)
        rec.finished_at = store.utcnow()
        rec = CellRecord.model_validate(self.redactor.redact_obj(rec.model_dump(mode="json")))
        try:
            self.sink.ran(rec)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            self._release(rec.cell_id)  # the room set aside for this record
            if rec.failure_class != "disk_full":
                _disk_full(rec, f"record.json not written at first: {exc.strerror}")
            disk_write(lambda: self.sink.ran(rec), f"{rec.cell_id}: record")
        finally:
            self._release(rec.cell_id)
        self.view.done(rec)
        return rec


# Room set aside in each cell's folder while its engine runs, freed for the record when the disk
# fills up (an engine's DEBUG log can fill it), so a full disk is still a recorded failure. The
# file is unlinked at once and held by its descriptor: closing it frees the room, and so does the
# kernel when the harness is killed, so no crash leaves a reserve behind.
RESERVE = ".reserve"
RESERVE_BYTES = 1 << 20


def _reserve(folder: Path) -> int:
    """An open descriptor of RESERVE_BYTES on the folder's file system, with no name."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / RESERVE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    (folder / RESERVE).unlink()
    try:
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise
            os.write(fd, bytes(RESERVE_BYTES))  # a file system without fallocate
    except OSError:
        os.close(fd)
        raise
    return fd


def _disk_full(rec: CellRecord, what: str) -> None:
    rec.outcome, rec.failure_class, rec.failure_detail = "failed", "disk_full", what
    rec.remedy = (
        "free space on the disk of the results folder (or give --results another one) and rerun; "
        "disk_full cells are run again, not reused"
    )


def disk_write(write, what: str):
    """A results write; a full disk stops the run with one line instead of a traceback."""
    try:
        return write()
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise DiskFull(
                f"{what} not written: {exc.strerror} ({exc.filename or 'results folder'}); "
                "free space and rerun: the cells recorded so far are kept"
            ) from None
        raise


# Failures that depend on the moment, not on the cell (a slow or busy host, a full disk, a token,
# an unexplained crash such as a kill): a rerun tries the cell again. Every other failure class
# is a property of the model, config and engine, so its record is reused like an ok one.
RETRIED_FAILURES = frozenset({"timeout", "disk_full", "other", "gated_or_auth"})
_FOREIGN_GPU_MEMORY = "is less than desired GPU memory utilization"  # vLLM: someone else holds the memory


def reusable(old: CellRecord) -> bool:
    """May a rerun reuse this record instead of running the cell again?"""
    if old.outcome == "ok":
        return True
    if old.outcome != "failed" or old.failure_class in RETRIED_FAILURES:
        return False
    return not (old.failure_class == "oom_other" and _FOREIGN_GPU_MEMORY in (old.failure_detail or ""))


def _judge(rec: CellRecord) -> None:
    """Outcome from what happened and what the log says; the log's class wins when it has one."""
    facts: EngineFacts = rec.facts or EngineFacts()
    if rec.outcome == "failed":
        if facts.failure_class and rec.failure_class in ("other", "timeout"):
            if rec.failure_class == "other" or facts.outcome == "failed":
                rec.failure_class = facts.failure_class
                rec.failure_detail = facts.failure_evidence or rec.failure_detail
                rec.remedy = facts.remedy or rec.remedy
        return
    if rec.validation is None:
        return
    if rec.validation.passed:
        rec.outcome = "ok"
    else:
        rec.outcome, rec.failure_class = "failed", "validation_failed"
        rec.failure_detail = f"asked {rec.validation.prompt!r}, got {rec.validation.answer!r}"
        rec.remedy = (
            "the engine serves but answers wrongly: check the chat template, dtype and "
            "quantization, and that the checkpoint is the instruct model"
        )


def probe_profile(spec: str | dict[str, Any] | None, max_concurrency: float | None) -> ProbeProfile | None:
    """The matrix's `probe:` (see `harness.probes.profiles.resolve`), capped by KV concurrency."""
    problem = profiles.check_spec(spec)  # the matrix was checked at load; a caller's spec may not be
    if problem:
        raise InputError(f"probe: {problem}")
    return profiles.resolve(spec, max_concurrency)


def _generated_tokens(probes: ProbeResult | None) -> int | None:
    if not probes:
        return None
    return sum(level.total_output_tokens or 0 for level in probes.levels) or None
