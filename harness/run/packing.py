"""Packing matrix cells onto a box's GPUs, and the lock that keeps two matrix runs apart.

A cell needs TP x PP GPUs. `next_assignments` is the scheduling policy the runner calls at the
start and each time a cell finishes: it hands out disjoint GPU sets to as many waiting cells as
fit, longest first (recorded durations), preferring GPUs in one NVLink island, then one NUMA
node, so independent cells run side by side and no GPU idles while a cell it could run waits.

`simulate` replays the same policy over known durations to compute the makespan; it is pure, so
tests can try many box shapes. `lock_devices` is the run-level file lock.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import os
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import InputError
from harness.schema import CellRecord, Device


@dataclass(frozen=True)
class Slot:
    """One GPU as the packer sees it; topology hints are None where NVML could not tell."""

    index: int
    numa_node: int | None = None
    island: int | None = None


@dataclass(frozen=True)
class Job:
    """A cell to place. `eligible`: GPU indices its selector matches; `est_s`: expected seconds
    (from earlier records), None when unknown."""

    id: str
    gpus_needed: int
    eligible: frozenset[int]
    est_s: float | None = None


def expected_seconds(records: Iterable[CellRecord]) -> dict[str, float]:
    """Each cell's expected duration from its newest record with timings: spawn -> ready plus
    validation and probes (what dominates a cell; fetch and stop are short or cached)."""
    newest: dict[str, tuple[str, float]] = {}
    for record in records:
        t = record.timings
        if t.spawn_to_ready_s is None:
            continue
        seconds = t.spawn_to_ready_s + (t.validation_s or 0.0) + (t.probes_s or 0.0)
        if record.cell_id not in newest or record.started_at > newest[record.cell_id][0]:
            newest[record.cell_id] = (record.started_at, seconds)
    return {cell_id: seconds for cell_id, (_, seconds) in newest.items()}


def slots_from_devices(devices: Iterable[Device]) -> list[Slot]:
    """GPU devices of the inventory (harness.host.devices) -> slots with their topology hints."""
    return [Slot(d.index, d.numa_node, d.nvlink_island) for d in devices if d.kind == "gpu"]


# --------------------------------------------------------------------------- GPU choice
def choose_gpus(candidates: Sequence[Slot], n: int) -> tuple[int, ...] | None:
    """n GPUs out of the candidates, None if fewer. Prefers one NVLink island, then one NUMA
    node; among groups that fit, the smallest (best fit), so big groups stay whole for big cells."""
    if n <= 0 or len(candidates) < n:
        return None
    # A GPU without NVLink is an island of its own: 1-GPU cells go there before splitting one.
    by_island = _groups(candidates, lambda s: ("solo", s.index) if s.island is None else ("nvl", s.island))
    group = _best_fit(by_island, n)
    if group is None:
        group = list(candidates)
    by_numa = _groups(group, lambda s: s.numa_node if s.numa_node is not None else -1)
    within = _best_fit(by_numa, n) or sorted(group, key=lambda s: (s.numa_node or 0, s.index))
    return tuple(sorted(s.index for s in sorted(within, key=lambda s: s.index)[:n]))


def _groups(slots: Iterable[Slot], key: Callable[[Slot], Hashable]) -> dict[Hashable, list[Slot]]:
    out: dict[Hashable, list[Slot]] = {}
    for s in slots:
        out.setdefault(key(s), []).append(s)
    return out


def _best_fit(groups: dict, n: int) -> list[Slot] | None:
    fitting = [g for g in groups.values() if len(g) >= n]
    return min(fitting, key=lambda g: (len(g), min(s.index for s in g))) if fitting else None


# --------------------------------------------------------------------------- policy
def unrunnable(jobs: Iterable[Job], slots: Sequence[Slot]) -> list[Job]:
    """Jobs this box can never run: more GPUs needed than its selector matches here."""
    present = {s.index for s in slots}
    return [j for j in jobs if j.gpus_needed > len(j.eligible & present) or j.gpus_needed < 1]


def priority(job: Job) -> tuple:
    """Longest first (LPT: a long cell started late sets the makespan), then most GPUs (the
    hardest to fit later); without recorded durations this is most-GPUs first."""
    return (-(job.est_s or 0.0), -job.gpus_needed, job.id)


def next_assignments(
    pending: Sequence[Job], slots: Sequence[Slot], busy: Iterable[int] = ()
) -> list[tuple[Job, tuple[int, ...]]]:
    """Cells to start now and their GPUs: disjoint from each other and from `busy` GPUs.

    Every pending cell that fits starts, in priority order; a cell that does not fit yet lets
    the ones behind it use the free GPUs (backfilling). A short 8-GPU cell may so wait until
    the box drains; simulations over mixed-TP matrices showed reserving GPUs for it (EASY
    backfilling) lengthened the makespan instead, so nothing is held back.
    """
    free = {s.index for s in slots} - set(busy)
    by_index = {s.index: s for s in slots}
    started: list[tuple[Job, tuple[int, ...]]] = []
    for job in sorted(pending, key=priority):
        pick = choose_gpus([by_index[g] for g in sorted(free & job.eligible)], job.gpus_needed)
        if pick is not None:
            started.append((job, pick))
            free -= set(pick)
    return started


# --------------------------------------------------------------------------- simulation
@dataclass(frozen=True)
class Placement:
    job_id: str
    gpus: tuple[int, ...]
    start: float
    end: float


@dataclass
class Schedule:
    placements: list[Placement] = field(default_factory=list)
    unrunnable: list[str] = field(default_factory=list)

    @property
    def makespan(self) -> float:
        return max((p.end for p in self.placements), default=0.0)


def lower_bound(jobs: Iterable[Job], n_gpus: int, durations: dict[str, float]) -> float:
    """No schedule beats max(total GPU-seconds / GPUs, longest cell)."""
    jobs = list(jobs)
    if not jobs:
        return 0.0
    area = sum(j.gpus_needed * durations[j.id] for j in jobs)
    return max(area / n_gpus, max(durations[j.id] for j in jobs))


def simulate(
    jobs: Sequence[Job],
    slots: Sequence[Slot],
    durations: dict[str, float] | None = None,
    busy_until: dict[int, float] | None = None,
) -> Schedule:
    """Replay `next_assignments` over cells that take `durations[id]` seconds (default: their
    estimates), as the runner would; returns every placement. `busy_until`: GPUs another job
    holds at the start, and until when."""
    actual = durations or {j.id: j.est_s or 0.0 for j in jobs}
    bad = unrunnable(jobs, slots)
    schedule = Schedule(unrunnable=[j.id for j in bad])
    pending = [j for j in jobs if j not in bad]
    busy: dict[int, str] = {}  # GPU -> what holds it
    ends: list[tuple[float, int, str, tuple[int, ...]]] = []  # heap: (end, tie-break, id, GPUs)
    for seq, (gpu, until) in enumerate((busy_until or {}).items()):
        busy[gpu] = f"busy:{gpu}"
        heapq.heappush(ends, (until, -1 - seq, busy[gpu], (gpu,)))
    now, seq = 0.0, 0
    while pending or ends:
        for job, gpus in next_assignments(pending, slots, busy):
            pending.remove(job)
            end = now + actual[job.id]
            busy.update(dict.fromkeys(gpus, job.id))
            heapq.heappush(ends, (end, seq, job.id, gpus))
            seq += 1
            schedule.placements.append(Placement(job.id, gpus, now, end))
        if not ends:
            raise RuntimeError(f"no cell can start on a free box: {[j.id for j in pending]}")
        now = ends[0][0]
        while ends and ends[0][0] <= now:
            for gpu in heapq.heappop(ends)[3]:
                del busy[gpu]
    return schedule


# --------------------------------------------------------------------------- run-level lock
class DevicesLocked(InputError):
    """Another matrix run holds some of the devices this run needs."""


def default_lock_dir() -> Path:
    # /tmp is per machine, like the GPUs: runs from different checkouts must see each other.
    return Path(os.environ.get("HARNESS_LOCK_DIR") or Path(tempfile.gettempdir()) / "vllm-harness-locks")


def device_lock_keys(devices: Iterable[Device]) -> list[str]:
    """Lock names: GPU UUIDs (stable whatever CUDA_VISIBLE_DEVICES says), "cpu" for the CPU."""
    return [(d.uuid or f"gpu{d.index}") if d.kind == "gpu" else "cpu" for d in devices]


class RunLock:
    """Held flock()s, one per device; the kernel drops them if the run dies, so none go stale."""

    def __init__(self, fds: list[int], paths: list[Path]):
        self.fds, self.paths = fds, paths

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)  # closing the descriptor releases its flock
        self.fds = []

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_devices(keys: Iterable[str], run_id: str, lock_dir: Path | None = None, wait_s: float = 0.0) -> RunLock:
    """Lock every device key for this run, or none: raises DevicesLocked naming the run and pid
    that hold one, after retrying for up to `wait_s` seconds."""
    lock_dir = lock_dir or default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    paths = [lock_dir / f"{_safe(k)}.lock" for k in sorted(set(keys))]
    while True:
        held: list[int] = []
        for path in paths:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                for h in held:
                    os.close(h)
                if time.monotonic() >= deadline:
                    raise DevicesLocked(
                        f"{path.stem} is in use by matrix run {holder.get('run_id', '?')} "
                        f"(pid {holder.get('pid', '?')}, since {holder.get('since', '?')}); wait for it, "
                        f"or give this run other GPUs with CUDA_VISIBLE_DEVICES"
                    ) from None
                break
            held.append(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"run_id": run_id, "pid": os.getpid(), "since": _now()}).encode(), 0)
        else:
            return RunLock(held, paths)
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}  # the holder is between truncate and write: the message says "?"


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
