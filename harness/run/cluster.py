"""The matrix across a Ray cluster: each cell is a Ray task on a node that has its GPU type.

The driver (`python -m harness run --ray-address ADDRESS`) asks for every cell `num_gpus` =
TP x PP plus the custom resource `gpu_<selector>` (`gpu_H100`, `gpu_cpu`, ...) that nodes declare
with `ray start --resources`, so a cell lands on a node with the right devices. The task runs the
same cell runner as a local run (`CellRunner.run`) in a scratch results folder and returns
the records, engine logs and telemetry; the driver stores them under its own results/ with
`harness.store`, exactly where a local run puts them. Cells no live node can take are listed as
"no node with this device" instead of waiting forever.

Resume: the key of a cell needs the node's vLLM version and the fetched model revision, so it is
computed on the node, by the runner's own code; the driver hands the keys it has records for, and
a matching cell returns before any engine starts (then listed as reused, as locally).

A node lost mid-cell (raylet or machine gone, worker killed) gets the cell tried once more on
another node; a second loss is recorded as failed with the reason. The engine dies with the
task's worker: its first process by the parent-death signal (`harness.engine.process`), the rest by a
watchdog process per task (`guard_engines`), so a lost node or driver leaves no engine behind.

Ray is an optional extra (`pip install '.[ray]'`): it is imported only when a cluster is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from harness import store
from harness.engine.process import PIDS_DIR, reap_stale
from harness.errors import InputError
from harness.host.fingerprint import Host, discover_host
from harness.host.selectors import RESOURCE_PREFIX, resource_name
from harness.matrix import Matrix, MatrixFile
from harness.redact import Redactor
from harness.run.cell import CellRunner, RunOptions, reusable
from harness.run.progress import Progress
from harness.run.scheduler import run_writer, terminate_as_interrupt
from harness.schema import Cell, CellRecord, Device, HostFingerprint, ManifestEntry, RunManifest, cell_key

NO_NODE = "no node with this device"
NODE_RETRIES = 1  # a cell lost with its node is tried this many more times, then recorded failed
SCRATCH_PREFIX = "vllm-harness-cell-"  # a task's results folder on its node


def ray_module():
    """`import ray`, or the one-line error that says how to get it."""
    try:
        import ray  # noqa: PLC0415 - optional extra, needed only with --ray-address
    except ImportError:
        raise InputError("--ray-address needs Ray: pip install '.[ray]'") from None
    return ray


def devices_needed(cell: Cell) -> int:
    """Units of the device resource a cell takes: TP x PP GPUs, or the whole CPU of a node."""
    return 1 if cell.gpu.lower() == "cpu" else cell.config.gpus_needed


def placement_problem(cell: Cell, offered: list[dict[str, float]], prefix: str = RESOURCE_PREFIX) -> str | None:
    """Why no live node (its Ray resources in `offered`) can take the cell, or None. Ray would
    keep such a task pending forever, so these cells are listed as not placed instead."""
    name, need = resource_name(cell.gpu, prefix), devices_needed(cell)
    if not any(res.get(name, 0) > 0 for res in offered):
        return NO_NODE
    gpus_too = cell.gpu.lower() != "cpu"
    if not any(res.get(name, 0) >= need and (not gpus_too or res.get("GPU", 0) >= need) for res in offered):
        return f"no node with {need} x {cell.gpu} (tensor x pipeline parallel)"
    return None


def task_resources(cell: Cell, prefix: str = RESOURCE_PREFIX) -> dict[str, Any]:
    """The Ray options a cell's task asks for: its device type's resource with the same name that
    `placement_problem` checked, and that many GPUs (none for a CPU cell)."""
    need = devices_needed(cell)
    return {"num_gpus": 0 if cell.gpu.lower() == "cpu" else need, "resources": {resource_name(cell.gpu, prefix): need}}


def node_label(node_id: str) -> str:
    return f"{socket.gethostname()}/{node_id[:8]}"


# --------------------------------------------------------------------------- on the node
class _AlreadyRecorded(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


class _DriverRecords:
    """Stands in for the runner's `recorded` mapping on a node: the driver holds the records, the
    node only learns whether its freshly computed key is among them. A hit ends the cell right
    there — after the fetch, before planning or any engine — and the driver lists it as reused."""

    def __init__(self, keys: list[str]):
        self._keys = set(keys)

    def get(self, key: str, default=None):
        if key in self._keys:
            raise _AlreadyRecorded(key)
        return default


class _BoardView:
    """The runner's progress view on a node: every phase goes to the driver's board."""

    def __init__(self, post):
        self.post = post

    def phase(self, cell_id: str, phase: str) -> None:
        self.post(cell_id, "phase", phase)

    def add(self, cell_id: str, phase: str, outcome: str = "", detail: str = "") -> None:
        self.post(cell_id, "phase", f"{phase} {outcome}".strip())

    def done(self, record: CellRecord) -> None:
        self.post(record.cell_id, "phase", f"recorded {record.outcome}")


def _assigned_devices(host: Host, cell: Cell, gpu_ids: list) -> tuple[list[Device] | None, str | None]:
    """The cell's devices on this node: of the GPUs of its type, the ones Ray gave this task."""
    devices, why_not = host.eligible(cell)
    if devices is None or cell.gpu.lower() == "cpu":
        return devices, why_not
    given = {int(i) for i in gpu_ids}
    mine = [d for d in devices if d.index in given]
    if len(mine) < cell.config.gpus_needed:
        return None, (
            f"Ray gave this task GPUs {sorted(given)}, {len(mine)} of them {cell.gpu}; declare "
            f"{resource_name(cell.gpu)} only on nodes whose GPUs are all {cell.gpu}"
        )
    return mine[: cell.config.gpus_needed], None


def guard_engines(worker_pid: int, scratch: str) -> None:
    """Watchdog, in its own process: once the task's worker dies without cleaning up (node lost,
    driver killed, task cancelled), stop the engines listed in its scratch folder and delete it.

    The parent-death signal kills only the engine's first process; vLLM's own children (the
    engine core) outlive it. Locally the next run reaps them from the pid files; a lost task has
    no next run on that node, so this guard does it. It ends when the scratch folder goes."""
    folder = Path(scratch)
    try:
        worker = psutil.Process(worker_pid)
    except psutil.NoSuchProcess:
        worker = None
    while folder.exists():
        if worker is not None:
            try:
                worker.wait(timeout=0.5)
            except psutil.TimeoutExpired:
                continue
        reap_stale(folder / PIDS_DIR)
        shutil.rmtree(folder, ignore_errors=True)


_GUARD = "import sys; from harness.run.cluster import guard_engines; guard_engines(int(sys.argv[1]), sys.argv[2])"
# Starts its arguments as a detached process and exits: the guard becomes nobody's child, because
# Ray kills a dying worker's own children (RAY_kill_child_processes_on_worker_exit) — guard included.
_DETACH = (
    "import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True, "
    "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"
)


def _start_guard(scratch: Path) -> None:
    subprocess.run(
        [sys.executable, "-c", _DETACH, sys.executable, "-c", _GUARD, str(os.getpid()), str(scratch)],
        check=True,
        timeout=60,
    )


def run_cell_on_node(request: dict[str, Any], board) -> dict[str, Any]:
    """The Ray task: one cell on this node, in a scratch results folder; returns what to store."""
    ray = ray_module()
    cell = Cell.model_validate_json(request["cell"])
    node = node_label(ray.get_runtime_context().get_node_id())

    def post(cell_id: str, kind: str, payload: Any) -> None:
        board.post.remote(cell.cell_id, request["attempt"], cell_id, kind, payload)

    post(cell.cell_id, "node", node)
    text = request["matrix_text"]
    matrix = Matrix(
        path=Path(request["matrix_path"]), spec=MatrixFile.model_validate(yaml.safe_load(text)), cells=[cell], text=text
    )
    host = discover_host(matrix)
    post(cell.cell_id, "host", host.fingerprint.model_dump(mode="json"))
    devices, why_not = _assigned_devices(host, cell, ray.get_gpu_ids())
    if devices is None:
        return {"node": node, "not_placed": why_not}
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX) as tmp:
        _start_guard(Path(tmp))
        options = RunOptions(results_dir=Path(tmp), progress="quiet", **request["options"])
        # The node writes into a scratch run log; the driver stores what it sends back.
        scratch = store.RunWriter(
            Path(tmp),
            RunManifest(
                run_id=request["run_id"],
                matrix_path=str(matrix.path),
                matrix_sha256="",
                started_at=store.utcnow(),
                host=host.fingerprint,
            ),
        )
        runner = CellRunner(matrix, host, options, scratch, request["run_id"], view=_BoardView(post))
        try:
            final = runner.run(cell, devices, _DriverRecords(request["reusable"]))
        except _AlreadyRecorded as hit:
            return {"node": node, "reused": hit.key}
        folder = store.run_dir(Path(tmp), request["run_id"])
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != store.MANIFEST
        }
        return {
            "node": node,
            "final": final.cell_id,
            "files": files,
            "entries": [e.model_dump(mode="json") for e in scratch.manifest.cells],
        }


class Board:
    """Mailbox (a Ray actor on the driver's node) for progress events of the running cells."""

    def __init__(self):
        self.events: list[tuple] = []

    def post(self, *event) -> None:
        self.events.append(event)

    def drain(self) -> list[tuple]:
        out, self.events = self.events, []
        return out


# --------------------------------------------------------------------------- on the driver
def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A head that does not answer is one line now; ray.init would retry it for many minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # "auto" and client URLs: ray.init finds or refuses them by itself, quickly
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise InputError(
            f"--ray-address {address}: no Ray head answers there ({exc.strerror or exc}); "
            "start one with `ray start --head` or fix the address"
        ) from None


@dataclass
class _Attempt:
    cell: Cell
    number: int = 0
    node: str | None = None
    host: HostFingerprint | None = None
    lost: list[str] = field(default_factory=list)  # why earlier attempts ended: "node X lost (Error)"


@dataclass
class ClusterRun:
    """The scheduler's run over a Ray cluster: same records, same manifest, same resume."""

    matrix: Matrix
    host: Host  # the driver's: engine args were checked with it, the manifest names it
    options: RunOptions
    address: str
    run_id: str = field(default_factory=store.new_run_id)
    resource_prefix: str = RESOURCE_PREFIX
    node_retries: int = NODE_RETRIES

    def __post_init__(self) -> None:
        self.log = run_writer(self.matrix, self.host, self.options, self.run_id)
        self.run_id = self.log.run_id  # another run may have started in the same second
        self.redactor = Redactor(env=os.environ)

    @property
    def manifest(self) -> RunManifest:
        return self.log.manifest

    def run(self, cells: list[Cell], emit=None) -> RunManifest:
        ray = ray_module()
        _check_reachable(self.address)
        try:
            ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(
                f"--ray-address {self.address}: cannot join the Ray cluster: {str(exc).splitlines()[0]}"
            ) from None
        try:
            with (
                terminate_as_interrupt(),
                Progress(
                    [c.cell_id for c in cells], mode=self.options.progress, title="vLLM matrix on Ray", show_nodes=True
                ) as view,
            ):
                self.view = view
                self._run(ray, cells, emit)
                self.log.finish()
                view.summary()
        finally:
            ray.shutdown()
        return self.manifest

    def _run(self, ray, cells: list[Cell], emit) -> None:
        results = self.options.results_dir
        # key -> (newest record path, record); skipped records are rerun.
        recorded = {} if self.options.force else store.recorded_keys(results)
        keys = sorted(k for k, (_, record) in recorded.items() if reusable(record))
        # The board lives with the driver, so losing any other node never loses progress events.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

        here = ray.get_runtime_context().get_node_id()
        board = (
            ray.remote(Board)
            .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))
            .remote()
        )
        task = ray.remote(run_cell_on_node)
        offered = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        options = {
            "plan": self.options.plan,
            "offline": self.options.offline,
            "stop_grace_s": self.options.stop_grace_s,
            "gpu_wait_s": self.options.gpu_wait_s,
        }
        attempts: dict[str, _Attempt] = {}
        pending: dict[Any, str] = {}  # object ref -> cell id

        def submit(attempt: _Attempt) -> None:
            cell = attempt.cell
            request = {
                "cell": cell.model_dump_json(),
                "matrix_text": self.matrix.text,
                "matrix_path": str(self.matrix.path),
                "run_id": self.run_id,
                "options": options,
                "reusable": keys,
                "attempt": attempt.number,
            }
            ref = task.options(
                num_cpus=1,
                **task_resources(cell, self.resource_prefix),
                max_retries=0,  # node losses are retried here, once, with the reason kept
                name=f"cell:{cell.cell_id}",
            ).remote(request, board)
            pending[ref] = cell.cell_id

        for cell in cells:
            why_not = placement_problem(cell, offered, self.resource_prefix)
            if why_not:
                self.log.not_on_host(cell.cell_id, why_not)
                self.view.add(cell.cell_id, "no node", detail=why_not)
                continue
            attempts[cell.cell_id] = _Attempt(cell)
            submit(attempts[cell.cell_id])
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                self._show(ray.get(board.drain.remote()), attempts)
                for ref in ready:
                    attempt = attempts.pop(pending.pop(ref))
                    record: CellRecord | None
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:  # the runner itself raised on the node
                        cause = exc.cause if exc.cause is not None else exc
                        record = self._failed(
                            attempt,
                            f"harness error on {attempt.node or 'a node'}: {type(cause).__name__}: {cause}",
                            "a bug or a broken install on that node; read the message",
                        )
                    except ray.exceptions.RayError as exc:  # node, raylet or worker gone
                        attempt.lost.append(f"node {attempt.node or '?'} lost ({type(exc).__name__})")
                        if attempt.number < self.node_retries:
                            attempt.number += 1
                            attempt.node = attempt.host = None
                            attempts[attempt.cell.cell_id] = attempt
                            self.view.phase(attempt.cell.cell_id, f"retrying: {attempt.lost[-1]}")
                            submit(attempt)
                            continue
                        record = self._failed(
                            attempt,
                            "; then ".join(attempt.lost) + " mid-cell",
                            "check those nodes (OOM killer, preemption, raylet logs); "
                            "the next run tries the cell again",
                        )
                    else:
                        record = self._store(attempt, result, recorded)
                    if record is not None and emit:
                        emit(record)
        except BaseException:
            # Interrupted or broken: kill the running cells' workers; their engines die with them.
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    def _show(self, events: list[tuple], attempts: dict[str, _Attempt]) -> None:
        """Board events -> progress; events of a finished cell or an abandoned attempt are late."""
        for task_cell, number, cell_id, kind, payload in events:
            attempt = attempts.get(task_cell)
            if attempt is None or attempt.number != number:
                continue
            if kind == "node":
                attempt.node = payload
                self.view.nodes[task_cell] = payload
                self.view.phase(task_cell, "scheduled")
            elif kind == "host":
                attempt.host = HostFingerprint.model_validate(payload)
            else:
                if cell_id != task_cell:  # an autofit retry of the task's cell, on the same node
                    self.view.nodes[cell_id] = attempt.node or "?"
                self.view.phase(cell_id, payload)

    def _store(self, attempt: _Attempt, result: dict[str, Any], recorded: dict) -> CellRecord | None:
        cell = attempt.cell
        self.view.nodes[cell.cell_id] = result["node"]
        if "not_placed" in result:
            reason = f"{result['node']}: {result['not_placed']}"
            self.log.not_on_host(cell.cell_id, reason)
            self.view.add(cell.cell_id, "not on its node", detail=reason)
            return None
        if "reused" in result:
            path, old = recorded[result["reused"]]
            self.log.reused(cell.cell_id, old.key, old.outcome, path)
            self.view.add(cell.cell_id, "reused", outcome=old.outcome, detail=f"recorded in {old.run_id}")
            return old
        # Logs and series first, records last: a record never names a file not yet written.
        files = sorted(result["files"].items(), key=lambda item: Path(item[0]).name == store.RECORD)
        records = []
        for rel, data in files:
            if Path(rel).name == store.RECORD:
                records.append(CellRecord.model_validate_json(data))
            self.log.store_file(rel, data)
        for entry in result["entries"]:
            if attempt.lost:  # the manifest keeps why this cell ran more than once
                entry = {**entry, "reason": "; then ".join(attempt.lost) + "; retried"}
            self.log.enter(ManifestEntry.model_validate(entry))
        for record in sorted(records, key=lambda r: r.started_at):
            self.view.nodes[record.cell_id] = result["node"]
            self.view.done(record)
        return next(r for r in records if r.cell_id == result["final"])

    def _failed(self, attempt: _Attempt, detail: str, remedy: str) -> CellRecord:
        """The record of a cell that no node finished. Its key has no model revision (none was
        established), so it never matches a real cell's key: the next run tries it again."""
        cell = attempt.cell
        host = attempt.host or self.host.fingerprint
        engine = host.engines.get(cell.engine.name)
        version = engine.vllm if engine else None
        now = store.utcnow()
        rec = CellRecord(
            run_id=self.run_id,
            cell_id=cell.cell_id,
            key=cell_key(cell, version),
            cell=cell,
            host=host,
            started_at=now,
            finished_at=now,
            outcome="failed",
            failure_class="other",
            failure_detail=self.redactor.redact(detail),
            remedy=remedy,
            engine_version=version,
        )
        self.log.ran(rec)
        self.view.done(rec)
        return rec
