"""What `doctor` saw on the box: typed facts that `gather` fills and the pure `checks` judge.

Each record holds plain values only (no NVML handles, no hub clients), so a test can build any
box, broken or not, without hardware.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from harness.schema import Device, EngineVersions

Status = Literal["ok", "warn", "fail"]
Area = Literal["host", "gpus", "engines", "models", "matrix"]


class Check(BaseModel):
    """One row of the doctor's table: what was checked, how it stands, what was seen, the fix."""

    area: Area
    name: str
    status: Status
    seen: str
    remedy: str = ""


class Disk(BaseModel):
    """One filesystem the run writes to: the HF cache, results/, or both when they share it."""

    roles: list[str]  # "HF cache /root/.cache/huggingface/hub", "results results/"
    free_bytes: int
    total_bytes: int
    need_bytes: int = 0  # model files still to download onto this filesystem


class HostFacts(BaseModel):
    cpu_model: str
    cpu_count: int | None
    ram_gib: float
    ram_available_gib: float
    disks: list[Disk] = Field(default_factory=list)
    reserve_bytes: int = 0  # free space to keep besides the models: logs, records, compile caches


class GpuHolder(BaseModel):
    pid: int
    command: str | None  # process name and arguments, secrets redacted
    used_gib: float | None
    kind: str  # "compute" | "graphics"


class GpuFacts(BaseModel):
    device: Device
    holders: list[GpuHolder] = Field(default_factory=list)
    hygiene_ok: bool = True  # harness.host.hygiene would start a cell on it now
    hygiene_reason: str | None = None
    ecc_uncorrected: int | None = None
    retired_pages_pending: bool | None = None
    remap_pending: bool | None = None
    remap_failed: bool | None = None


class GpusFacts(BaseModel):
    nvml: bool  # NVML answered
    driver_present: bool  # NVIDIA device nodes or nvidia-smi exist, whatever NVML said
    cuda_device_order: str | None = None  # the CUDA_DEVICE_ORDER engines inherit
    gpus: list[GpuFacts] = Field(default_factory=list)


class EngineState(BaseModel):
    """One engine install as its own interpreter describes it (harness.engine.info)."""

    name: str
    python: str
    error: str | None = None  # the interpreter is missing or the probe failed
    versions: EngineVersions | None = None
    torch_error: str | None = None
    torch_cuda: str | None = None  # CUDA version torch was built for; None: CPU build
    cuda_available: bool | None = None
    cuda_device_count: int | None = None
    cuda_error: str | None = None


class ModelState(BaseModel):
    name: str
    source: str
    local: bool = False
    gated: bool | None = None
    access: Literal["ok", "denied", "unknown"] = "unknown"
    size_bytes: int | None = None  # the files vLLM reads (harness.run.fetch.select_files)
    download_bytes: int = 0  # of those, not yet in the HF cache
    in_cache: bool | None = None
    error: str | None = None  # one line: why the model cannot be had (gated, not found, offline miss)


class HubFacts(BaseModel):
    offline: bool
    endpoint: str
    cache: str
    reachable: bool | None = None  # None: not tried (offline)
    error: str | None = None
    token_source: str | None = None  # "HF_TOKEN" | "saved login" | None
    token_valid: bool | None = None  # None: not checked
    token_user: str | None = None
    token_error: str | None = None


class CellState(BaseModel):
    cell_id: str
    gpu: str
    on_host: bool
    why_not: str | None = None  # not on this host: which device or engine it lacks
    gpus_needed: int = 1
    gpus_matched: int = 0
    fits: bool | None = None  # the planner's verdict on this host's real memory
    reason: str = ""
    suggestion: str | None = None
    skip_if_unfit: bool = True
