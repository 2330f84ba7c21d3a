"""Gathering the doctor's facts: NVML, the engines' own interpreters, the disk, the hub, the planner.

Everything with a side effect lives here, and only reads: no process is signalled, no model is
downloaded. Each part reuses the module the matrix run itself uses, so the doctor sees what the
run will see: `devices.Nvml` and `hygiene.check_gpus` for GPUs, `engine_info` for engines,
`fetch` for the HF cache and hub file selection, `run.Host.eligible` for placement, `plan_cell`
for fit. huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE when first imported, as
for `run`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx2
import psutil
from huggingface_hub import HfApi, constants, get_token, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled

from harness.doctor.facts import (
    CellState,
    Disk,
    EngineState,
    GpuFacts,
    GpuHolder,
    GpusFacts,
    HostFacts,
    HubFacts,
    ModelState,
)
from harness.engine.info import engine_torch
from harness.errors import InputError
from harness.host.devices import GIB, Nvml, cpu_info, gpu_devices
from harness.host.fingerprint import Host
from harness.host.hygiene import check_gpus
from harness.matrix import Matrix
from harness.plan import plan_cell
from harness.redact import Redactor
from harness.run.fetch import FetchError, OfflineMissing, _classify, fetch_model, select_files
from harness.schema import Device, EngineVersions, ModelSpec

COMMAND_CHARS = 80  # a holder's command line, cut: enough to tell `vllm serve X` from a notebook


# --------------------------------------------------------------------------- GPUs
def gather_gpus(nvml: Nvml | None, gpu_memory_utilization: float | None = None) -> GpusFacts:
    """NVML's view of every GPU; `nvml` None: no driver (or no pynvml) on this host.
    `gpu_memory_utilization`: the least the matrix's GPU cells ask for (None: vLLM's default),
    so a GPU counts as busy only when not even that fits beside what holds it."""
    driver_files = Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None
    if nvml is None:
        return GpusFacts(nvml=False, driver_present=driver_files)
    redactor = Redactor(env=os.environ)
    gpus = []
    for device in gpu_devices(nvml):
        hygiene = check_gpus(nvml, [device.index], gpu_memory_utilization)
        holders = [
            GpuHolder(pid=h.pid, command=_command(h.pid, h.name, redactor), used_gib=h.used_gib, kind=h.kind)
            for h in hygiene.holders
        ]
        gpus.append(
            GpuFacts(
                device=device,
                holders=holders,
                hygiene_ok=hygiene.ok,
                hygiene_reason=hygiene.reason,
                **nvml.memory_health(device.index),
            )
        )
    return GpusFacts(nvml=True, driver_present=True, gpus=gpus, cuda_device_order=os.environ.get("CUDA_DEVICE_ORDER"))


def _command(pid: int, name: str | None, redactor: Redactor) -> str | None:
    """The holder's command line (secrets redacted), else NVML's process name."""
    try:
        argv = psutil.Process(pid).cmdline()
    except (psutil.Error, ValueError):
        argv = []
    text = " ".join(argv) or name
    if not text:
        return None
    text = redactor.redact(text)
    return text if len(text) <= COMMAND_CHARS else text[: COMMAND_CHARS - 1] + "…"


# --------------------------------------------------------------------------- engines
def gather_engines(matrix: Matrix) -> list[EngineState]:
    """Each engine install, probed once in its own interpreter (versions, torch and CUDA)."""
    states: dict[str, EngineState] = {}
    for cell in matrix.cells:
        engine = cell.engine
        if engine.name in states:
            continue
        state = EngineState(name=engine.name, python=engine.python)
        try:
            raw = engine_torch(engine)
        except InputError as exc:  # missing interpreter or a probe that cannot run: a finding here
            state.error = str(exc)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:  # cannot start, hangs, garbles
            state.error = f"engine '{engine.name}' ({engine.python}): probe failed: {type(exc).__name__}: {exc}"
        else:
            state.versions = EngineVersions.model_validate(raw)
            for key in ("torch_error", "torch_cuda", "cuda_available", "cuda_device_count", "cuda_error"):
                setattr(state, key, raw.get(key))
        states[engine.name] = state
    return list(states.values())


# --------------------------------------------------------------------------- placement and fit
def gather_cells(matrix: Matrix, devices: list[Device], engines: list[EngineState], *, plan: bool) -> list[CellState]:
    """Where each cell would run here (the runner's own rule), and the planner's verdict there."""
    working = {e.name: e.versions for e in engines if e.versions is not None and e.versions.vllm}
    host = Host(devices=devices, engines=working, arg_actions={}, fingerprint=None)  # type: ignore[arg-type]
    cells = []
    for cell in matrix.cells:
        state = CellState(cell_id=cell.cell_id, gpu=cell.gpu, on_host=False, skip_if_unfit=cell.config.skip_if_unfit)
        if cell.engine.name not in working:
            state.why_not = f"engine '{cell.engine.name}' failed its check"
            cells.append(state)
            continue
        matched, why_not = host.eligible(cell)
        state.why_not = why_not
        if matched is not None:
            gpus = [d for d in matched if d.kind == "gpu"]
            state.on_host = True
            state.gpus_needed = cell.config.gpus_needed if gpus else 1
            state.gpus_matched = len(gpus) if gpus else 1
            if plan and state.gpus_needed <= state.gpus_matched:
                memory = gpus[0].memory_total_gib if gpus else None
                verdict = plan_cell(cell, memory, vllm_version=working[cell.engine.name].vllm)
                state.fits, state.reason, state.suggestion = verdict.fits, verdict.reason, verdict.suggestion
        cells.append(state)
    return cells


# --------------------------------------------------------------------------- hub and models
def gather_models(specs: list[ModelSpec], *, check_access: bool) -> tuple[HubFacts, list[ModelState]]:
    """The hub, the token and each model: size, what is still to download, access when gated.

    Offline (HF_HUB_OFFLINE=1) only the cache is read, exactly as the runner's fetch reads it.
    `check_access` False (the fast subset) skips whoami and the gated-access checks."""
    token = get_token()
    hub = HubFacts(
        offline=bool(constants.HF_HUB_OFFLINE),
        endpoint=constants.ENDPOINT,
        cache=constants.HF_HUB_CACHE,
        token_source=("HF_TOKEN" if os.environ.get("HF_TOKEN") else "saved login") if token else None,
    )
    api = HfApi(token=token)
    # The token matters only for hub models this host will fetch; an unused hub is not contacted.
    if not hub.offline and token and check_access and any(not s.is_local for s in specs):
        _check_token(api, hub)
        if hub.token_valid is False:
            # The token row says it; read the models anonymously so each is not one more 401.
            api, token = HfApi(token=False), None
    states = []
    for spec in specs:
        state = ModelState(name=spec.name, source=spec.source, local=spec.is_local)
        if spec.is_local or hub.offline or hub.reachable is False:
            _from_disk(spec, state, hub)
        else:
            _from_hub(api, spec, state, hub, token, check_access)
        states.append(state)
    return hub, states


def _check_token(api: HfApi, hub: HubFacts) -> None:
    try:
        who = api.whoami()
    except HfHubHTTPError as exc:
        hub.reachable = True
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            hub.token_valid = False
            hub.token_error = f"401 {exc.response.headers.get('X-Error-Message') or 'invalid token'}"
        else:
            hub.token_error = f"whoami answered {status}"
    except (httpx2.TransportError, OfflineModeIsEnabled) as exc:
        hub.reachable, hub.error = False, type(exc).__name__
    else:
        hub.reachable, hub.token_valid, hub.token_user = True, True, who.get("name")


def _from_disk(spec: ModelSpec, state: ModelState, hub: HubFacts) -> None:
    """A local folder, or a hub model read from the HF cache only (offline, or the hub is down)."""
    try:
        info = fetch_model(spec, offline=True)
    except (OfflineMissing, FetchError) as exc:
        state.error = exc.message
        if not spec.is_local and not hub.offline:
            state.error = (
                f"not in the HF cache ({hub.cache}) and {hub.endpoint} cannot be reached: "
                "fix the network, or download it where the hub is reachable"
            )
        return
    state.size_bytes, state.in_cache = info.bytes, not spec.is_local


def _from_hub(
    api: HfApi, spec: ModelSpec, state: ModelState, hub: HubFacts, token: str | None, check_access: bool
) -> None:
    repo = spec.source
    try:
        info = api.model_info(repo, revision=spec.revision, files_metadata=True)
    except (httpx2.TransportError, OfflineModeIsEnabled) as exc:
        hub.reachable, hub.error = False, type(exc).__name__
        _from_disk(spec, state, hub)
        return
    except Exception as exc:  # the runner's own classification: gated, not found, bad token, ...
        hub.reachable = True
        state.error = _fetch_message(exc, spec, token)
        return
    hub.reachable = True
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    selected = select_files(sizes, trust_remote_code=spec.trust_remote_code)
    state.size_bytes = sum(sizes[n] for n in selected)
    missing = [n for n in selected if not isinstance(try_to_load_from_cache(repo, n, revision=info.sha), str)]
    state.download_bytes = sum(sizes[n] for n in missing)
    state.in_cache = not missing
    state.gated = bool(info.gated)
    state.access = "ok" if not info.gated else "unknown"
    if info.gated and check_access and token:
        try:
            api.auth_check(repo)
            state.access = "ok"
        except GatedRepoError as exc:
            state.access = "denied"
            state.error = _fetch_message(exc, spec, token)
        except HfHubHTTPError as exc:
            state.error = _fetch_message(exc, spec, token)


def _fetch_message(exc: Exception, spec: ModelSpec, token: str | None) -> str:
    # The runner's wording for the same hub answer, so the doctor and a failed cell agree.
    return _classify(exc, spec, token).message


# --------------------------------------------------------------------------- host and disk
def gather_host(cache: str, results: Path, download_bytes: int, reserve_gib: float) -> HostFacts:
    """CPU, RAM, and free space on the filesystems of the HF cache and results/ (one when shared)."""
    cpu = cpu_info()
    disks: dict[int, Disk] = {}
    for role, path, need in (("HF cache", Path(cache), download_bytes), ("results", results, 0)):
        existing = _existing(path)
        dev = existing.stat().st_dev
        usage = shutil.disk_usage(existing)
        disk = disks.setdefault(dev, Disk(roles=[], free_bytes=usage.free, total_bytes=usage.total))
        disk.roles.append(f"{role} ({path})")
        disk.need_bytes += need
    return HostFacts(
        cpu_model=cpu["cpu_model"],
        cpu_count=cpu["cpu_count"],
        ram_gib=cpu["ram_gib"],
        ram_available_gib=round(psutil.virtual_memory().available / GIB, 2),
        disks=list(disks.values()),
        reserve_bytes=int(reserve_gib * GIB),
    )


def _existing(path: Path) -> Path:
    """The folder itself, else its nearest existing parent (results/ may not exist yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
