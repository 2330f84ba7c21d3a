"""Real-GPU proof of the harness's NVML paths: inventory, telemetry, hygiene, CUDA_VISIBLE_DEVICES.

Everywhere else these paths run on recorded fakes (tests/fixtures/nvml). Here they meet a real
driver. Needs only the NVIDIA driver, nvidia-ml-py and a CUDA build of torch (no vLLM):

1. the inventory (`harness.host.devices.host_devices`) against `nvidia-smi --query-gpu`;
2. a stand-in "engine", a torch process that allocates a known amount in steps and holds it,
   sampled by the harness's telemetry (`harness.run.telemetry.Sampler`) at >= 10 Hz: the peak it saw
   must cover the allocation (plus the CUDA context, within a bound);
3. while the stand-in holds its memory, hygiene (`harness.host.hygiene.check_gpus`) must name its pid
   as a foreign holder and refuse the GPU;
4. for every GPU, `CUDA_VISIBLE_DEVICES=<NVML index>` (how the runner hands GPUs to an engine)
   must show torch that same board (UUIDs compared).

    python tests/gpu/check_nvml.py [--gib 8] [--steps 8] [--python PY] [--json]

prints a short report of figures (GPU name, sample rate reached, peak vs allocated) to paste into
the README; exit 0 when every check passed or there is no GPU (says "skipped"), 1 when one failed.
tests/gpu/test_nvml_proof.py runs the same proof under pytest (marker `gpu`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from harness.host.devices import GIB, Nvml, host_devices  # noqa: E402
from harness.host.hygiene import check_gpus  # noqa: E402
from harness.run.telemetry import Sampler  # noqa: E402
from harness.schema import Device  # noqa: E402

SAMPLE_INTERVAL_S = 0.05  # asks for 20 Hz; the proof requires >= 10 Hz reached
MIN_RATE_HZ = 10.0
CONTEXT_ALLOWANCE_GIB = 2.0  # CUDA context + torch allocator rounding on top of the allocation
SMI_FIELDS = ("index", "name", "memory.total", "driver_version", "pci.bus_id", "uuid")

# Runs in the torch interpreter: reports the board it sees as cuda:0, allocates GIB in STEPS
# (one JSON line per step), then holds the memory until stdin closes.
STANDIN = r"""
import json, sys, time
import torch
gib, steps, pause = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
dev = torch.device("cuda", 0)
props = torch.cuda.get_device_properties(dev)
print(json.dumps({"event": "device", "uuid": str(getattr(props, "uuid", "")), "name": props.name}), flush=True)
time.sleep(pause)  # the context alone first: the harness marks this level before the steps
blocks, step = [], int(gib * 2**30 / steps) if steps else 0
for i in range(steps):
    blocks.append(torch.ones(step, dtype=torch.uint8, device=dev))
    torch.cuda.synchronize()
    print(json.dumps({"event": "step", "i": i + 1, "allocated": torch.cuda.memory_allocated(dev)}), flush=True)
    time.sleep(pause)
print(json.dumps({"event": "held", "allocated": torch.cuda.memory_allocated(dev)}), flush=True)
sys.stdin.readline()
"""


class Skip(Exception):
    """No GPU, or no CUDA torch: nothing to prove on this host."""


@dataclass
class Report:
    gpu_name: str = ""
    gpu_index: int = 0
    gpus: int = 0
    driver: str | None = None
    cuda: str | None = None
    inventory_mismatches: list[str] = field(default_factory=list)
    allocated_gib: float = 0.0
    steps: int = 0
    steps_seen: int = 0
    samples: int = 0
    duration_s: float = 0.0
    rate_hz: float | None = None
    peak_gib: float | None = None  # GPU memory used at the peak minus at the start (driver's view)
    process_gib: float | None = None  # NVML's per-process figure for the stand-in
    standin_pid: int = 0
    hygiene_reason: str | None = None
    cvd: dict[int, str] = field(default_factory=dict)  # NVML index -> "ok" or what torch saw instead
    failures: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [
            f"NVML proof on {self.gpu_name} (GPU {self.gpu_index} of {self.gpus}), driver {self.driver}, "
            f"CUDA {self.cuda}",
            "inventory vs nvidia-smi: "
            + (
                "; ".join(self.inventory_mismatches)
                or f"{self.gpus} GPUs, name, memory, driver, PCI bus and UUID all match"
            ),
            f"telemetry: {self.rate_hz} Hz reached ({self.samples} samples in {self.duration_s:.1f} s); "
            f"peak {_g(self.peak_gib)} GiB above the start for {self.allocated_gib:g} GiB allocated in "
            f"{self.steps} steps ({self.steps_seen} steps seen); NVML per-process {_g(self.process_gib)} GiB",
            f"hygiene: {self.hygiene_reason}",
            "CUDA_VISIBLE_DEVICES: " + ", ".join(f"{i} -> {v}" for i, v in sorted(self.cvd.items())),
            "result: " + ("all checks passed" if not self.failures else "FAILED: " + "; ".join(self.failures)),
            "README row: | GPU | sample rate | peak seen vs allocated |",
            f"           | {self.gpu_name} | {self.rate_hz} Hz | {_g(self.peak_gib)} GiB vs {self.allocated_gib:g} GiB |",
        ]
        return "\n".join(lines)


def _g(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


# --------------------------------------------------------------------------- inventory
def nvidia_smi() -> list[dict[str, str]] | None:
    """nvidia-smi's own inventory; None where it is not installed."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except FileNotFoundError:
        return None
    return [dict(zip(SMI_FIELDS, (v.strip() for v in row))) for row in csv.reader(io.StringIO(out)) if row]


def compare_inventory(devices: list[Device], smi: list[dict[str, str]]) -> list[str]:
    """What the harness's inventory and nvidia-smi disagree on, one line per difference."""
    gpus = [d for d in devices if d.kind == "gpu"]
    if len(gpus) != len(smi):
        return [f"NVML lists {len(gpus)} GPUs, nvidia-smi {len(smi)}"]
    out = []
    for d, s in zip(gpus, smi):
        theirs_gib = float(s["memory.total"]) / 1024
        pairs = [
            ("index", str(d.index), s["index"]),
            ("name", d.name, s["name"]),
            ("driver", d.driver_version, s["driver_version"]),
            ("uuid", d.uuid, s["uuid"]),
            ("PCI bus", (d.pci_bus_id or "").lower(), s["pci.bus_id"].lower()),
        ]
        out += [
            f"GPU {d.index} {what}: harness {ours!r}, nvidia-smi {theirs!r}"
            for what, ours, theirs in pairs
            if ours != theirs
        ]
        if d.memory_total_gib is None or abs(d.memory_total_gib - theirs_gib) > 0.01:
            out.append(f"GPU {d.index} memory: harness {d.memory_total_gib} GiB, nvidia-smi {theirs_gib:.2f} GiB")
    return out


# --------------------------------------------------------------------------- telemetry
def steps_seen(levels: list[float | None], step_gib: float) -> int:
    """Plateaus the sampler saw while memory climbed: each rise of at least half a step between
    two samples is one. Two steps inside one sample interval count once: that step was missed."""
    seen, last = 0, None
    for v in levels:
        if v is None:
            continue
        if last is not None and v - last >= step_gib / 2:
            seen += 1
        if last is None or v > last:
            last = v
    return seen


def _standin(python: str, gpu: int, gib: float, steps: int, pause: float) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}  # as the runner sets it for a cell
    return subprocess.Popen(
        [python, "-c", STANDIN, str(gib), str(steps), str(pause)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _events(proc: subprocess.Popen, until: str, timeout: float) -> list[dict[str, Any]]:
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"stand-in exited: {proc.stderr.read().strip().splitlines()[-1:]}")
        if line.startswith("{"):
            events.append(json.loads(line))
            if events[-1]["event"] == until:
                return events
    raise RuntimeError(f"stand-in gave no '{until}' within {timeout:g} s")


def _clean_gpu(nvml: Nvml, gib: float) -> int:
    for i in range(nvml.device_count()):
        _total, free, _used = nvml.memory(i)
        if not [p for p in nvml.processes(i) if p.kind == "compute"] and free / GIB >= gib + CONTEXT_ALLOWANCE_GIB:
            return i
    raise Skip(f"no GPU without compute processes and {gib + CONTEXT_ALLOWANCE_GIB:g} GiB free")


def _torch_sees_cuda(python: str) -> None:
    probe = subprocess.run(
        [python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True, timeout=300
    )
    if probe.stdout.strip() != "True":
        raise Skip(f"torch in {python} has no usable CUDA ({(probe.stderr.strip().splitlines() or ['?'])[-1]})")


# --------------------------------------------------------------------------- the proof
def prove(python: str = sys.executable, gib: float = 8.0, steps: int = 8, pause: float = 0.5) -> Report:
    nvml = Nvml.open()
    if nvml is None or nvml.device_count() == 0:
        raise Skip("no NVIDIA GPU (NVML unavailable)")
    try:
        _torch_sees_cuda(python)
        return _prove(nvml, python, gib, steps, pause)
    finally:
        nvml.close()


def _prove(nvml: Nvml, python: str, gib: float, steps: int, pause: float) -> Report:
    devices = host_devices(nvml)
    gpus = [d for d in devices if d.kind == "gpu"]
    index = _clean_gpu(nvml, gib)
    rep = Report(
        gpu_name=gpus[index].name,
        gpu_index=index,
        gpus=len(gpus),
        driver=gpus[index].driver_version,
        cuda=gpus[index].cuda_version,
        allocated_gib=gib,
        steps=steps,
    )
    smi = nvidia_smi()
    rep.inventory_mismatches = (
        ["nvidia-smi not found: inventory not compared"] if smi is None else compare_inventory(devices, smi)
    )
    rep.failures += rep.inventory_mismatches

    proc = _standin(python, index, gib, steps, pause)
    sampler = Sampler(proc.pid, [index], nvml, interval=SAMPLE_INTERVAL_S)
    sampler.start()
    rep.standin_pid = proc.pid
    try:
        _events(proc, "device", timeout=300)
        sampler.mark_ready()  # the CUDA context exists: allocation steps are counted from here
        _events(proc, "held", timeout=300)
        time.sleep(pause)  # a few samples of the plateau
        hygiene = check_gpus(nvml, [index])
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        summary = sampler.stop()
    gpu = summary["gpus"][str(index)]
    rep.samples, rep.duration_s, rep.rate_hz = summary["samples"], summary["duration_s"], summary["rate_hz"]
    start, peak = gpu["memory_used_start_gib"], gpu["memory_used_peak_gib"]
    rep.peak_gib = None if start is None or peak is None else round(peak - start, 3)
    ready = next(i for i, r in enumerate(sampler.rows) if r["event"] == "ready")
    rep.steps_seen = steps_seen([r.get(f"gpu{index}_mem_used_gib") for r in sampler.rows[ready:]], gib / steps)
    mine = [h for h in hygiene.holders if h.pid == proc.pid and h.kind == "compute"]
    rep.process_gib = round(mine[0].used_gib, 3) if mine and mine[0].used_gib is not None else None
    rep.hygiene_reason = hygiene.reason

    if (rep.rate_hz or 0) < MIN_RATE_HZ:
        rep.failures.append(f"telemetry reached {rep.rate_hz} Hz, under {MIN_RATE_HZ:g} Hz")
    if rep.peak_gib is None or not gib <= rep.peak_gib <= gib + CONTEXT_ALLOWANCE_GIB:
        rep.failures.append(f"peak {rep.peak_gib} GiB is not within [{gib:g}, {gib + CONTEXT_ALLOWANCE_GIB:g}] GiB")
    if rep.steps_seen < steps:
        rep.failures.append(f"telemetry saw {rep.steps_seen} of {steps} allocation steps")
    if hygiene.ok or not mine:
        others = sorted({h.pid for h in hygiene.holders})
        rep.failures.append(
            f"hygiene {'accepted the GPU' if hygiene.ok else 'refused it'} and named pids {others}, "
            f"not the stand-in's {proc.pid} (a container's pid namespace?)"
        )
    for i, d in enumerate(gpus):
        rep.cvd[i] = _cvd_check(python, i, d)
        if rep.cvd[i] != "ok":
            rep.failures.append(f"CUDA_VISIBLE_DEVICES={i}: {rep.cvd[i]}")
    return rep


def _cvd_check(python: str, index: int, device: Device) -> str:
    """'ok' when CUDA_VISIBLE_DEVICES=<index> shows torch the board NVML calls <index>."""
    proc = _standin(python, index, 0, 0, 0)
    try:
        seen = _events(proc, "device", timeout=120)[-1]
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    theirs = seen["uuid"].removeprefix("GPU-")
    ours = (device.uuid or "").removeprefix("GPU-")
    return (
        "ok"
        if theirs and theirs == ours
        else f"torch sees {seen['name']} {seen['uuid']}, NVML index {index} is {device.uuid}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=8.0, help="GiB the stand-in allocates (default 8)")
    parser.add_argument("--steps", type=int, default=8, help="in this many equal steps (default 8)")
    parser.add_argument(
        "--python",
        default=os.environ.get("GPU_PROOF_PYTHON", sys.executable),
        help="interpreter with a CUDA build of torch (default: this one, or $GPU_PROOF_PYTHON)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        rep = prove(args.python, args.gib, args.steps)
    except Skip as exc:
        print(f"skipped: {exc}")
        return 0
    print(json.dumps(asdict(rep), indent=2) if args.json else rep.text())
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
