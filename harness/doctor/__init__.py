"""`doctor`: check a box before the matrix runs, one table row per finding.

`diagnose` gathers facts (gather.py: NVML, the engines' interpreters, disk, hub, planner) and
judges them (checks.py, pure). Areas: host, gpus, engines, models, matrix; `fast` keeps host,
gpus and engines (what `make matrix` checks before every run). The table's wording is in
docs/doctor.md.
"""

from __future__ import annotations

from pathlib import Path

from harness.doctor.checks import engine_checks, gpu_checks, host_checks, matrix_checks, model_checks
from harness.doctor.facts import Check
from harness.doctor.gather import gather_cells, gather_engines, gather_gpus, gather_host, gather_models
from harness.host.devices import Nvml, cpu_device
from harness.host.hygiene import DEFAULT_GPU_MEMORY_UTILIZATION
from harness.matrix import Matrix

__all__ = ["Check", "diagnose", "exit_code"]


def diagnose(
    matrix: Matrix, *, results: Path, reserve_gib: float, fast: bool = False, nvml: Nvml | None = None
) -> list[Check]:
    """Every check for this matrix on this host. `nvml`: an open NVML (tests pass a recorded
    box); None opens the real one, and none there means no NVIDIA driver."""
    own = nvml is None
    nvml = Nvml.open() if own else nvml
    asked = [c.config.args.get("gpu_memory_utilization") for c in matrix.cells if c.gpu.lower() != "cpu"]
    try:
        gpus = gather_gpus(nvml, min((a or DEFAULT_GPU_MEMORY_UTILIZATION for a in asked), default=None))
    finally:
        if own and nvml is not None:
            nvml.close()
    engines = gather_engines(matrix)
    devices = [g.device for g in gpus.gpus] + [cpu_device()]
    cells = gather_cells(matrix, devices, engines, plan=not fast)
    here = {c.cell_id for c in cells if c.on_host}
    specs = list({c.model.name: c.model for c in matrix.cells if c.cell_id in here}.values())
    elsewhere = len({c.model.name for c in matrix.cells} - {s.name for s in specs})
    hub, models = gather_models(specs, check_access=not fast)
    host = gather_host(hub.cache, results, sum(m.download_bytes for m in models), reserve_gib)
    rows = host_checks(host) + gpu_checks(gpus) + engine_checks(engines, gpus)
    if not fast:
        broken = sum(e.versions is None or not e.versions.vllm for e in engines)
        rows += model_checks(hub, models, elsewhere)
        rows += matrix_checks(cells, [d.name for d in devices], broken)
    return rows


def exit_code(rows: list[Check]) -> int:
    return 1 if any(r.status == "fail" for r in rows) else 0
