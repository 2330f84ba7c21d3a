"""Which cells run where and when: the scheduler of a local matrix run.

It decides which selected cells this host can run (the rest are listed as not on this host), takes
the device locks, reaps engines a killed run left behind, packs cells onto disjoint GPUs (longest
first, by their recorded durations) and runs each through the cell runner on its own thread. The
manifest and records go through the run log (`harness.store`).
"""

from __future__ import annotations

import hashlib
import signal
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from harness import store
from harness.engine.process import reap_stale
from harness.errors import InputError
from harness.host.devices import Nvml
from harness.host.fingerprint import Host
from harness.host.hygiene import check_gpus
from harness.host.selectors import match_selector
from harness.matrix import Matrix
from harness.run.cell import CellRunner, RunOptions, disk_write
from harness.run.packing import (
    Job,
    Slot,
    device_lock_keys,
    expected_seconds,
    lock_devices,
    next_assignments,
    unrunnable,
)
from harness.run.progress import NOT_ON_HOST, Progress
from harness.schema import Cell, CellRecord, Device, RunManifest


def _slot(device: Device) -> int:
    """Scheduling slot of a device: its GPU index, -1 for the CPU."""
    return -1 if device.kind == "cpu" else device.index


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


def run_writer(matrix: Matrix, host: Host, options: RunOptions, run_id: str) -> store.RunWriter:
    """The run log of a matrix run (local or on Ray): its manifest names the matrix and the host."""
    return store.RunWriter(
        options.results_dir,
        RunManifest(
            run_id=run_id,
            matrix_path=str(matrix.path),
            matrix_sha256=hashlib.sha256(matrix.text.encode()).hexdigest(),
            started_at=store.utcnow(),
            host=host.fingerprint,
        ),
    )


@dataclass
class Scheduler:
    """A local matrix run: `run(cells)` returns the finished manifest."""

    matrix: Matrix
    host: Host
    options: RunOptions
    run_id: str = field(default_factory=store.new_run_id)
    nvml: Nvml | None = None  # an open NVML for hygiene and telemetry; None: each opens its own

    def __post_init__(self) -> None:
        self.log = run_writer(self.matrix, self.host, self.options, self.run_id)
        self.run_id = self.log.run_id  # another run may have started in the same second
        self.cells = CellRunner(self.matrix, self.host, self.options, self.log, self.run_id, nvml=self.nvml)

    @property
    def manifest(self) -> RunManifest:
        return self.log.manifest

    def run(self, cells: list[Cell], emit=None) -> RunManifest:
        """Run the cells: each on its own devices, cells on disjoint GPUs at the same time.

        The device locks come first: a run refused by them writes nothing and touches no engine;
        holding them, it reaps only engines whose own run no longer holds its locks."""
        self.cells.nvml = self.nvml
        placed = [(cell, *self.host.eligible(cell)) for cell in cells]
        used = {_slot(d): d for _, devices, _ in placed for d in devices or ()}
        try:
            with terminate_as_interrupt(), lock_devices(device_lock_keys(used.values()), self.run_id) as lock:
                self.cells.lock_paths = [str(p) for p in lock.paths]
                reap_stale(self.cells.pids_dir, held_locks=lock.paths)
                earlier = store.read_runs([self.options.results_dir]).records()
                recorded = {} if self.options.force else store.newest_by_key(earlier)
                expected = expected_seconds(r for _, r in earlier)  # packing puts the longest cells first
                with Progress([c.cell_id for c in cells], mode=self.options.progress) as view:
                    self.cells.view = view
                    jobs, by_id = [], {}
                    for cell, devices, why_not in placed:
                        if devices is None:
                            disk_write(lambda c=cell.cell_id, w=why_not: self.log.not_on_host(c, w), "the run manifest")
                            view.add(cell.cell_id, NOT_ON_HOST, detail=why_not or "")
                            continue
                        by_id[cell.cell_id] = cell
                        needed = 1 if cell.gpu.lower() == "cpu" else cell.config.gpus_needed
                        jobs.append(
                            Job(
                                id=cell.cell_id,
                                gpus_needed=needed,
                                eligible=frozenset(map(_slot, devices)),
                                est_s=expected.get(cell.cell_id),
                            )
                        )
                    slots = [
                        Slot(-1) if d.kind == "cpu" else Slot(d.index, d.numa_node, d.nvlink_island)
                        for d in used.values()
                    ]
                    # GPUs a foreign process holds right now are kept out of the packing while others
                    # are free; cells that only fit on them come last and meet the hygiene wait/skip.
                    held = self._held_gpus([d.index for d in used.values() if d.kind == "gpu"])
                    clean = [s for s in slots if s.index not in held]
                    placeable = [j for j in jobs if j not in unrunnable(jobs, clean)]
                    self._schedule(placeable, clean, by_id, used, recorded, emit)
                    self._schedule([j for j in jobs if j not in placeable], slots, by_id, used, recorded, emit)
                    disk_write(self.log.finish, "the run manifest")
                    view.summary()
        except BaseException:
            self.log.discard_if_empty()  # refused or stopped before any cell: no run folder
            raise
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

    def _schedule(
        self,
        jobs: list[Job],
        slots: list[Slot],
        by_id: dict[str, Cell],
        used: dict[int, Device],
        recorded: dict[str, tuple[Path, CellRecord]],
        emit,
    ) -> None:
        pending, busy, running = list(jobs), set[int](), dict[Future[CellRecord], tuple[int, ...]]()
        with ThreadPoolExecutor(max_workers=max(1, len(slots)), thread_name_prefix="cell") as pool:
            try:
                while pending or running:
                    for job, picked in next_assignments(pending, slots, busy):
                        pending.remove(job)
                        busy.update(picked)
                        fut = pool.submit(self.cells.run, by_id[job.id], [used[i] for i in picked], recorded)
                        running[fut] = picked
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in done:
                        busy.difference_update(running.pop(fut))
                        record = fut.result()
                        if emit:
                            emit(record)
            except BaseException:
                # Interrupted (Ctrl-C, SIGTERM) or a bug: stop every engine; unfinished cells are not recorded.
                self.cells.stop_all()
                raise
