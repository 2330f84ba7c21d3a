"""Per-cell telemetry: a background sampler from engine spawn to stop.

Samples at >= 10 Hz on its own thread, so the runner's loop (health checks, probes) never
delays it. Per GPU: memory used, utilization, power, the energy counter, temperature, SM clock
(NVML). For the engine's process tree (root pid and all descendants): summed RSS and CPU%
(psutil), which is what the CPU engine is judged by. The summary goes into the cell record's
`telemetry`; `write_series` puts the full time series beside it as CSV.

The GPU peak-memory figure is independent of vLLM: it is what the driver saw, so the report
can set it beside the engine's own memory claims.
"""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from harness.host.devices import GIB, Nvml

GPU_FIELDS = ("mem_used_gib", "util_pct", "power_w", "energy_j", "temp_c", "sm_mhz")


class _ProcessTree:
    """RSS and CPU% of a process and its descendants, keeping psutil objects between samples.

    psutil's cpu_percent() is measured since the previous call on the same object, so each
    process must be sampled through one long-lived object; a new child contributes from its
    second sample on.
    """

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self._procs: dict[int, psutil.Process] = {}

    def sample(self) -> tuple[float, float, int] | None:
        """(rss_gib, cpu_pct, process count); None once the root is gone."""
        try:
            root = self._procs.get(self.root_pid) or psutil.Process(self.root_pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        rss = cpu = 0.0
        alive: dict[int, psutil.Process] = {}
        for proc in tree:
            known = self._procs.get(proc.pid, proc)
            try:
                rss += known.memory_info().rss
                cpu += known.cpu_percent(None)
            except psutil.Error:
                continue  # exited between listing and reading: it no longer uses anything
            alive[proc.pid] = known
        self._procs = alive
        return rss / GIB, cpu, len(alive)


class Sampler:
    """Background sampler for one cell.

    `root_pid`: the engine process (None: GPUs only). `gpu_indices`: NVML indices of the
    cell's GPUs ([] for the CPU engine). `nvml`: an open `Nvml`, or None to open one here when
    GPUs are asked for (without a driver the GPU part stays empty).
    """

    def __init__(
        self,
        root_pid: int | None,
        gpu_indices: Sequence[int] = (),
        nvml: Nvml | None = None,
        interval: float = 0.1,
    ):
        self.interval = interval
        self.gpu_indices = list(gpu_indices)
        self._own_nvml = nvml is None and bool(self.gpu_indices)
        self.nvml = Nvml.open() if self._own_nvml else nvml
        self.tree = _ProcessTree(root_pid) if root_pid is not None else None
        self.rows: list[dict[str, Any]] = []
        self._events: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._errors: list[str] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._t0 = time.monotonic()
        self._sample("start")
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)
        self._thread.start()

    def mark_ready(self) -> None:
        """The engine answered its health check: the memory it holds now is its steady state."""
        self._sample("ready")

    def mark_probes_start(self) -> None:
        self._sample("probes_start")

    def mark_probes_end(self) -> None:
        self._sample("probes_end")

    def stop(self, generated_tokens: int | None = None) -> dict[str, Any]:
        """Stop sampling; summary for the record. `generated_tokens`: output tokens the probes
        produced between mark_probes_start/end, for joules per token."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval + 5)
        self._sample("stop")
        if self._own_nvml and self.nvml is not None:
            self.nvml.close()
        return self.summary(generated_tokens)

    def _loop(self) -> None:
        # Fixed-rate schedule: a slow sample shortens the next wait instead of shifting the grid.
        next_at = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self._sample(None)
            next_at += self.interval
            if next_at < time.monotonic():
                next_at = time.monotonic() + self.interval

    # ------------------------------------------------------------------ sampling
    def _sample(self, event: str | None) -> None:
        row: dict[str, Any] = {"t_s": round(time.monotonic() - self._t0, 4), "event": event or ""}
        if self.tree is not None:
            proc = self.tree.sample()
            row["rss_gib"], row["cpu_pct"], row["procs"] = proc if proc else (None, None, 0)
        if self.nvml is not None:
            for i in self.gpu_indices:
                row.update(self._gpu_row(i))
        with self._lock:
            self.rows.append(row)
            if event:
                self._events.append((event, row["t_s"]))

    def _gpu_row(self, i: int) -> dict[str, Any]:
        nvml = self.nvml
        assert nvml is not None  # GPU rows are sampled only with an open NVML
        values: tuple[float | None, ...]
        try:
            _total, _free, used = nvml.memory(i)
            values = (
                used / GIB,
                nvml.utilization_pct(i),
                nvml.power_w(i),
                nvml.energy_j(i),
                nvml.temperature_c(i),
                nvml.sm_clock_mhz(i),
            )
        except nvml.lib.NVMLError as exc:
            # A lost GPU or a driver hiccup must not kill the sampler: the gap shows in the series.
            msg = f"gpu {i}: {type(exc).__name__}"
            if msg not in self._errors:
                self._errors.append(msg)
            values = (None,) * len(GPU_FIELDS)
        return {f"gpu{i}_{name}": v for name, v in zip(GPU_FIELDS, values)}

    # ------------------------------------------------------------------ results
    def _at(self, event: str) -> dict[str, Any] | None:
        return next((r for r in reversed(self.rows) if r["event"] == event), None)

    def summary(self, generated_tokens: int | None = None) -> dict[str, Any]:
        with self._lock:
            rows = list(self.rows)
        duration = rows[-1]["t_s"] - rows[0]["t_s"] if rows else 0.0
        out: dict[str, Any] = {
            "interval_s": self.interval,
            "samples": len(rows),
            "duration_s": round(duration, 3),
            "rate_hz": round((len(rows) - 1) / duration, 2) if duration > 0 else None,
            "events": {name: t for name, t in self._events},
        }
        if self.tree is not None:
            out["process"] = _process_summary(rows, self._at("ready"))
        if self.gpu_indices:
            out.update(self._gpu_summary(rows, generated_tokens))
        if self._errors:
            out["errors"] = list(self._errors)
        return out

    def _gpu_summary(self, rows: list[dict[str, Any]], generated_tokens: int | None) -> dict[str, Any]:
        if self.nvml is None:
            return {"gpus": {}, "note": "NVML unavailable: no GPU telemetry"}
        ready, p0, p1 = self._at("ready"), self._at("probes_start"), self._at("probes_end")
        window = [r for r in rows if p0 and p1 and p0["t_s"] <= r["t_s"] <= p1["t_s"]]
        gpus: dict[str, Any] = {}
        for i in self.gpu_indices:
            key = f"gpu{i}_"
            col = {f: [r.get(key + f) for r in rows] for f in GPU_FIELDS}
            energy, source = _energy(rows, key)
            probe_energy = _energy(window, key)[0]
            gpus[str(i)] = {
                "memory_used_start_gib": _round(col["mem_used_gib"][0]),
                "memory_used_peak_gib": _round(_max(col["mem_used_gib"])),
                "memory_used_at_ready_gib": _round(ready.get(key + "mem_used_gib")) if ready else None,
                "utilization_mean_pct": _round(_mean(col["util_pct"]), 1),
                "utilization_max_pct": _max(col["util_pct"]),
                "power_mean_w": _round(_mean(col["power_w"]), 1),
                "power_max_w": _round(_max(col["power_w"]), 1),
                "energy_j": _round(energy, 1),
                "energy_source": source,
                "probe_energy_j": _round(probe_energy, 1),
                "temperature_max_c": _max(col["temp_c"]),
                "sm_clock_mean_mhz": _round(_mean(col["sm_mhz"]), 0),
                "sm_clock_max_mhz": _max(col["sm_mhz"]),
            }
        total = _sum_or_none(g["energy_j"] for g in gpus.values())
        probe_total = _sum_or_none(g["probe_energy_j"] for g in gpus.values())
        return {
            "gpus": gpus,
            # Per GPU, like vLLM's own per-rank memory claims it is compared with.
            "gpu_memory_used_peak_gib": _max(g["memory_used_peak_gib"] for g in gpus.values()),
            "energy_j": total,
            "probe_energy_j": probe_total,
            "generated_tokens": generated_tokens,
            "joules_per_token": (
                round(probe_total / generated_tokens, 4) if probe_total is not None and generated_tokens else None
            ),
        }

    def write_series(self, path: str | Path) -> Path:
        """The sampled time series as CSV: one row per sample, `event` marks ready/probes/stop."""
        path = Path(path)
        with self._lock:
            rows = list(self.rows)
        fields: list[str] = []
        for r in rows:
            fields.extend(k for k in r if k not in fields)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        try:
            with tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                for r in rows:
                    writer.writerow({k: _csv(v) for k, v in r.items()})
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half file behind
            raise
        return path


def _process_summary(rows: list[dict[str, Any]], ready: dict[str, Any] | None) -> dict[str, Any]:
    rss = [r.get("rss_gib") for r in rows]
    cpu = [r.get("cpu_pct") for r in rows]
    return {
        "rss_peak_gib": _round(_max(rss)),
        "rss_at_ready_gib": _round(ready.get("rss_gib")) if ready else None,
        "cpu_mean_pct": _round(_mean(cpu), 1),
        "cpu_max_pct": _round(_max(cpu), 1),
        "processes_max": max((r.get("procs") or 0 for r in rows), default=0),
    }


def _energy(rows: list[dict[str, Any]], key: str) -> tuple[float | None, str | None]:
    """Joules over the rows: the NVML counter's difference, else the integral of power."""
    counter = [(r["t_s"], r.get(key + "energy_j")) for r in rows]
    known = [(t, e) for t, e in counter if e is not None]
    if len(known) >= 2:
        return known[-1][1] - known[0][1], "counter"
    power = [(t, p) for t, p in ((r["t_s"], r.get(key + "power_w")) for r in rows) if p is not None]
    if len(power) >= 2:
        # Boards without the counter (pre-Volta, some vGPUs) may still report power.
        return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(power, power[1:])), "power_integral"
    return None, None


def _csv(v: Any) -> Any:
    if v is None:
        return ""
    return round(v, 4) if isinstance(v, float) else v


def _values(xs) -> list[float]:
    return [x for x in xs if x is not None]


def _max(xs) -> float | None:
    v = _values(xs)
    return max(v) if v else None


def _mean(xs) -> float | None:
    v = _values(xs)
    return sum(v) / len(v) if v else None


def _sum_or_none(xs) -> float | None:
    v = list(xs)
    return None if not v or any(x is None for x in v) else round(sum(v), 1)


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)
