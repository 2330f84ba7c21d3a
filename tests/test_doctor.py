"""`doctor`: the real command on this box, broken boxes it must fail with one clear line, and the
pure checks on recorded NVML boxes.

The command runs in a subprocess (huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE at
import) against the project's real engine venv, the fake hub for the Hub, and a tmpfs for a full
disk where this box lets us mount one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
import venv
from pathlib import Path

import pytest
import yaml
from conftest import ENGINE_PYTHON, ROOT, TINY, harness_cmd
from fakehub import FakeHub, FakeRepo
from fixtures.nvml.fake import FakePynvml

from harness.doctor.checks import engine_checks, gpu_checks, matrix_checks
from harness.doctor.facts import CellState, EngineState, GpusFacts
from harness.doctor.gather import gather_cells, gather_gpus
from harness.host.devices import Nvml, cpu_info
from harness.matrix import load_matrix
from harness.schema import EngineVersions

GOOD_TOKEN = "hf_granted_0123456789abcdef"
OTHER_TOKEN = "hf_valid_but_not_granted_987"
BAD_TOKEN = "hf_rejected_by_the_hub_4242"
MIB = 1024**2


def repo_files(weights_bytes: int) -> dict[str, bytes]:
    return {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "tokenizer.json": b'{"model": {}}',
        "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(weights_bytes),
        "README.md": b"# tiny",
    }


def write_matrix(tmp: Path, models: list[str], python: Path = ENGINE_PYTHON, **extra) -> Path:
    doc = {
        "engines": [{"name": "venv", "python": str(python)}],
        "models": [{"model": m} for m in models],
        "gpus": ["cpu"],
        "configs": [
            {
                "name": "cpu",
                "args": {"max_model_len": 512, "dtype": "bfloat16", "enforce_eager": True},
                "env": {"VLLM_CPU_KVCACHE_SPACE": 1},
            }
        ],
        **extra,
    }
    path = tmp / f"matrix-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def doctor(matrix: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        harness_cmd("doctor", "--matrix", str(matrix), *args),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def problems(proc: subprocess.CompletedProcess, status: str = "FAIL") -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith(status + " ")]


@pytest.fixture
def hub_env(tmp_path: Path):
    """A fake hub with a public, a gated and a 16 MiB repo; HF_HOME in this test's folder."""
    repos = {
        "org/tiny": repo_files(4096),
        "org/gated": FakeRepo(files=repo_files(4096), gated=True, granted=frozenset({GOOD_TOKEN})),
        "org/big": repo_files(16 * MIB),
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    with FakeHub(repos, tokens=frozenset({OTHER_TOKEN})) as hub:
        yield {
            **base,
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_OFFLINE": "0",
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }


# --------------------------------------------------------------------------- the real command here
def test_doctor_on_this_box_prints_real_values_and_exits_0(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "400"}  # no wrapped cells
    proc = subprocess.run(
        harness_cmd("doctor", "--results", str(tmp_path / "results")),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "harness doctor" in out and problems(proc) == []
    cpu = cpu_info()
    assert cpu["cpu_model"] in out and f"{cpu['cpu_count']} cores usable" in out
    versions = json.loads(
        subprocess.run(
            [str(ENGINE_PYTHON), str(ROOT / "harness" / "engine" / "introspect.py")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.rpartition("@@ENGINE_PROBE@@")[2]
    )
    assert f"{versions['distribution']} {versions['vllm']}" in out  # the engine's own vLLM, read in its venv
    assert f"torch {versions['torch']}" in out
    # The default matrix's GPU cells are counted as elsewhere; the tiny CPU cells are placed.
    assert "4 on this host" in out and "no H100 on this host" in out

    as_json = subprocess.run(
        harness_cmd("doctor", "--json", "--fast", "--results", str(tmp_path / "results")),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    data = json.loads(as_json.stdout)
    assert data["exit_code"] == 0 and "fail" not in data["counts"]
    # The fast subset: host, GPUs, engines only.
    assert {c["area"] for c in data["checks"]} == {"host", "gpus", "engines"}
    disk = next(c for c in data["checks"] if c["name"] == "disk")
    assert "free of" in disk["seen"] and disk["status"] == "ok"


# --------------------------------------------------------------------------- one clear line each
def test_engine_without_vllm_fails_with_one_line(tmp_path):
    bare = tmp_path / "bare-venv"
    venv.create(bare, with_pip=False)  # a real interpreter, without vLLM
    matrix = write_matrix(tmp_path, [str(TINY / "tiny-chat")], python=bare / "bin" / "python")
    proc = doctor(matrix, {**os.environ, "HF_HUB_OFFLINE": "1"}, "--results", str(tmp_path / "r"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (line,) = problems(proc)
    assert line.startswith("FAIL engines/engine venv:") and "has no vLLM installed" in line
    assert str(bare / "bin" / "python") in line and "pip install vllm" in line


def test_rejected_token_fails_with_one_line_and_is_never_printed(tmp_path, hub_env):
    matrix = write_matrix(tmp_path, ["org/tiny", "org/gated"])
    proc = doctor(matrix, {**hub_env, "HF_TOKEN": BAD_TOKEN}, "--results", str(tmp_path / "r"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (line,) = problems(proc)
    assert line.startswith("FAIL models/HF_TOKEN: the hub rejects the HF_TOKEN token: 401"), line
    assert BAD_TOKEN not in proc.stdout + proc.stderr
    # Control: the granted token passes, names its user, and the gated repo is readable with it.
    proc = doctor(matrix, {**hub_env, "HF_TOKEN": GOOD_TOKEN}, "--results", str(tmp_path / "r"), "--json")
    data = json.loads(proc.stdout)
    assert data["exit_code"] == 0, data
    rows = {c["name"]: c for c in data["checks"]}
    assert rows["HF_TOKEN"]["seen"].startswith("HF_TOKEN token valid (user user-")
    assert "gated: the token has access" in rows["model gated"]["seen"]
    assert GOOD_TOKEN not in proc.stdout


def test_gated_model_the_token_may_not_read_fails_with_the_licence_fix(tmp_path, hub_env):
    matrix = write_matrix(tmp_path, ["org/tiny", "org/gated"])
    proc = doctor(matrix, {**hub_env, "HF_TOKEN": OTHER_TOKEN}, "--results", str(tmp_path / "r"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (line,) = problems(proc)
    assert line.startswith("FAIL models/model gated: org/gated is gated and the token in use has no access")
    assert f"accept the licence at {hub_env['HF_ENDPOINT']}/org/gated" in line


def test_model_missing_from_cache_offline_fails_with_one_line(tmp_path, hub_env):
    matrix = write_matrix(tmp_path, ["org/tiny"])
    offline = {**hub_env, "HF_HUB_OFFLINE": "1"}
    proc = doctor(matrix, offline, "--results", str(tmp_path / "r"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (line,) = problems(proc)
    assert line.startswith("FAIL models/model tiny: org/tiny@main is not in the HF cache")
    assert "run once online to download it" in line
    # Control: once the runner's own fetch has put it in the cache, the same check passes.
    fetch = (
        "from harness.run.fetch import fetch_model; from harness.schema import ModelSpec; "
        "fetch_model(ModelSpec(name='tiny', source='org/tiny'))"
    )
    subprocess.run([sys.executable, "-c", fetch], env=hub_env, cwd=ROOT, check=True, timeout=120)
    proc = doctor(matrix, offline, "--results", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stdout
    assert "in the HF cache" in proc.stdout


def test_unreachable_hub_fails_and_names_what_the_cache_lacks(tmp_path, hub_env):
    with socket.socket() as sock:  # a port nobody listens on: connection refused at once
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    proc = doctor(
        write_matrix(tmp_path, ["org/tiny"]),
        {**hub_env, "HF_ENDPOINT": closed, "HF_TOKEN": GOOD_TOKEN},
        "--results",
        str(tmp_path / "r"),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    hub, model = problems(proc)
    assert hub.startswith(f"FAIL models/hub: cannot reach {closed}") and "HF_HUB_OFFLINE=1" in hub
    assert model.startswith("FAIL models/model tiny: not in the HF cache")


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0:
        return False
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )


def test_disk_smaller_than_the_models_fails_with_one_line(tmp_path, hub_env):
    small = tmp_path / "small-fs"
    if not _mount_tmpfs(small, "8m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the reserve test below covers the rule")
    try:
        env = {**hub_env, "HF_HOME": str(small / "hf-home")}
        proc = doctor(
            write_matrix(tmp_path, ["org/big"]), env, "--results", str(tmp_path / "r"), "--disk-reserve-gib", "0"
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        (line,) = problems(proc)
        assert line.startswith(f"FAIL host/disk: HF cache ({small / 'hf-home' / 'hub'}): 8.0 MiB free of 8.0 MiB")
        assert "models to download 16.0 MiB" in line
        # Control: the small model fits on the same filesystem.
        proc = doctor(
            write_matrix(tmp_path, ["org/tiny"]), env, "--results", str(tmp_path / "r"), "--disk-reserve-gib", "0"
        )
        assert proc.returncode == 0, proc.stdout
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_disk_below_the_kept_reserve_fails(tmp_path, hub_env):
    matrix = write_matrix(tmp_path, ["org/tiny"])
    proc = doctor(matrix, hub_env, "--results", str(tmp_path / "r"), "--disk-reserve-gib", "1000000", "--fast")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (line,) = problems(proc)
    assert line.startswith("FAIL host/disk:") and "plus 1000000.0 GiB kept free" in line


def test_bad_input_is_exit_2_with_one_line(tmp_path):
    proc = doctor(tmp_path / "nope.yaml", dict(os.environ))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "cannot read the matrix" in proc.stderr
    proc = doctor(write_matrix(tmp_path, [str(TINY / "tiny-chat")]), dict(os.environ), "--disk-reserve-gib", "-1")
    assert proc.returncode == 2 and "--disk-reserve-gib" in proc.stderr


# --------------------------------------------------------------------------- the nightly job's first step
def test_nightly_doctor_step_stops_the_job_with_the_table_as_summary(tmp_path):
    steps = yaml.safe_load((ROOT / ".github" / "workflows" / "nightly-matrix.yml").read_text())["jobs"]["matrix"][
        "steps"
    ]
    names = [s["name"] for s in steps]
    step = next(s for s in steps if s.get("id") == "doctor")
    assert names.index(step["name"]) < names.index("Run the matrix and diff against the last published run")
    (tmp_path / ".venv").symlink_to(ENGINE_PYTHON.parent.parent)  # the step runs .venv/bin/python
    bare = tmp_path / "bare-venv"
    venv.create(bare, with_pip=False)
    summary = tmp_path / "summary.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "GITHUB_STEP_SUMMARY": str(summary)}
    for python, rc in ((bare / "bin" / "python", 1), (ENGINE_PYTHON, 0)):
        env["MATRIX"] = str(write_matrix(tmp_path, [str(TINY / "tiny-chat")], python=python))
        summary.write_text("")
        res = subprocess.run(
            ["bash", "-c", step["run"]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
        )
        assert res.returncode == rc, res.stdout + res.stderr
        table = summary.read_text()
        if rc:
            assert table.startswith("## harness doctor\n") and "| engines | engine venv | ❌ fail |" in table
        else:
            assert table == ""  # a healthy box leaves the summary to the diff


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_matrix_runs_the_fast_doctor_first_and_goes_on_when_it_fails(tmp_path):
    log = tmp_path / "log"
    py = tmp_path / "py"  # stands in for the venv's python: records its arguments, fails the doctor
    py.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *doctor*) exit 1;; esac\n')
    py.chmod(0o755)
    res = subprocess.run(
        ["make", "-o", "install", "matrix", f"PY={py}", "MATRIX=m.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert log.read_text().splitlines() == [
        "-m harness doctor --fast --matrix m.yaml",
        "-m harness run --matrix m.yaml",
    ]
    assert "doctor found problems (above); running the matrix anyway" in res.stdout


# --------------------------------------------------------------------------- GPUs on recorded boxes
def gpus_of(fake: FakePynvml) -> GpusFacts:
    nvml = Nvml.open(fake)
    assert nvml is not None
    return gather_gpus(nvml)


def test_h100_box_inventory_and_topology_rows():
    rows = gpu_checks(gpus_of(FakePynvml("h100x8_nvswitch")))
    by_name = {r.name: r for r in rows}
    assert by_name["driver"].seen == "driver 550.54.15, CUDA 12.4 supported"
    assert [f"GPU {i}" for i in range(8)] == [r.name for r in rows if r.name.startswith("GPU ")][:8]
    assert by_name["GPU 0"].seen.startswith("NVIDIA H100 80GB HBM3, 79.65 GiB (79.13 free)")
    assert "compute capability 9.0" in by_name["GPU 0"].seen
    assert (
        by_name["topology"].seen == "NVLink island 0: GPUs 0,1,2,3,4,5,6,7. NUMA node 0: GPUs 0,1,2,3; "
        "node 1: GPUs 4,5,6,7"
    )
    # The recorded box has a job on GPU 3: named with its pid; the other 7 GPUs are clean, so a warning.
    held = by_name.pop("GPU 3 processes")
    assert held.status == "warn" and "held by pid 4242 (python3, 30.0 GiB)" in held.seen
    assert all(r.status == "ok" for r in by_name.values())


def test_a_foreign_holder_is_named_by_pid_and_command_and_all_busy_fails():
    fake = FakePynvml("rtx4090x2_pcie")
    fake.add_process(0, os.getpid(), 3 * 1024**3)
    rows = gpu_checks(gpus_of(fake))
    (held,) = [r for r in rows if r.name == "GPU 0 processes"]
    assert held.status == "warn"  # GPU 1 is still clean: the runner packs cells around GPU 0
    assert f"pid {os.getpid()}" in held.seen and f"stop pid {os.getpid()}" in held.remedy
    gathered = gpus_of(fake)
    assert "pytest" in gathered.gpus[0].holders[0].command  # the command line, not just a name
    fake.add_process(1, os.getpid(), 1024**3)
    rows = gpu_checks(gpus_of(fake))
    assert {r.status for r in rows if r.name.endswith("processes")} == {"fail"}


class EccFake(FakePynvml):
    """A box whose GPU 1 reports uncorrected ECC errors and a remapping waiting for a reset."""

    def nvmlDeviceGetTotalEccErrors(self, handle, error_type, counter_type):
        return 3 if handle.index == 1 else 0

    def nvmlDeviceGetRemappedRows(self, handle):
        return (0, 1, handle.index == 1, False)


def test_ecc_errors_and_pending_remaps_warn():
    rows = {r.name: r for r in gpu_checks(gpus_of(EccFake("a100x4_nvlink")))}
    assert rows["GPU 0"].status == "ok"
    assert rows["GPU 1"].status == "warn"
    assert (
        "3 uncorrected ECC errors" in rows["GPU 1"].seen and "remapped rows wait for a GPU reset" in rows["GPU 1"].seen
    )


def test_a_gpu_is_busy_only_when_not_even_the_smallest_ask_fits():
    fake = FakePynvml("h100x8_nvswitch")  # GPU 3: a 30 GiB job, 48.6 of 79.6 GiB free
    assert not gather_gpus(Nvml.open(fake), 0.9).gpus[3].hygiene_ok
    facts = gather_gpus(Nvml.open(fake), 0.5)
    # Still a compute process on it: the runner's hygiene refuses it whatever the memory.
    assert not facts.gpus[3].hygiene_ok and "held by pid 4242" in facts.gpus[3].hygiene_reason
    fake.remove_processes(3)
    assert gather_gpus(Nvml.open(fake), 0.5).gpus[3].hygiene_ok  # 48.6 free >= 0.5 x 79.6
    assert not gather_gpus(Nvml.open(fake), 0.9).gpus[3].hygiene_ok  # memory short, holder unseen


def test_mixed_box_warns_unless_cuda_numbers_gpus_by_pci_bus(monkeypatch):
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    (row,) = [r for r in gpu_checks(gpus_of(FakePynvml("mixed_l4_l40s"))) if r.name == "device order"]
    assert row.status == "warn" and "(NVIDIA L4, NVIDIA L40S)" in row.seen and "PCI_BUS_ID" in row.remedy
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert not [r for r in gpu_checks(gpus_of(FakePynvml("mixed_l4_l40s"))) if r.name == "device order"]
    assert not [r for r in gpu_checks(gpus_of(FakePynvml("h100x8_nvswitch"))) if r.name == "device order"]


def test_no_nvml_is_fine_without_a_driver_and_fails_with_one():
    assert gpu_checks(GpusFacts(nvml=False, driver_present=False))[0].status == "ok"
    (row,) = gpu_checks(GpusFacts(nvml=False, driver_present=True))
    assert row.status == "fail" and "NVML does not answer" in row.seen


# --------------------------------------------------------------------------- engines vs driver
def cuda_engine(torch_cuda: str | None, available: bool = True, error: str | None = None) -> EngineState:
    versions = EngineVersions(
        python="/e/bin/python", distribution="vllm", vllm="0.11.0", torch="2.8.0", platform="cuda"
    )
    return EngineState(
        name="e",
        python="/e/bin/python",
        versions=versions,
        torch_cuda=torch_cuda,
        cuda_available=available,
        cuda_device_count=8 if available else 0,
        cuda_error=error,
    )


@pytest.mark.parametrize(
    ("torch_cuda", "available", "status", "words"),
    [
        ("12.4", True, "ok", "torch.cuda.is_available() True, 8 GPUs"),
        ("12.8", True, "warn", "minor-version compatibility"),
        ("13.0", True, "fail", "the driver supports CUDA 12.4 only"),
        (None, False, "fail", "is a CPU build but vllm 0.11.0 is the CUDA one"),
        (
            "12.4",
            False,
            "fail",
            "torch.cuda.is_available() is False in /e/bin/python: CUDA driver initialization failed",
        ),
    ],
)
def test_torch_cuda_build_against_the_driver(torch_cuda, available, status, words):
    gpus = gpus_of(FakePynvml("h100x8_nvswitch"))  # driver for CUDA 12.4
    error = None if available else "CUDA driver initialization failed"
    (_, row) = engine_checks([cuda_engine(torch_cuda, available, error)], gpus)
    assert row.status == status
    assert words in row.seen + " " + row.remedy


# --------------------------------------------------------------------------- matrix placement and fit
def test_cells_placed_counted_and_unfit_listed_with_the_fix(tmp_path):
    doc = {
        "engines": [{"name": "e", "python": "/e/bin/python"}],
        "models": [{"model": "Qwen/Qwen2.5-7B-Instruct"}],
        "gpus": ["RTX 4090", "H100"],
        "configs": [
            {"name": "half", "args": {"gpu_memory_utilization": 0.5, "max_model_len": 8192}},
            {"name": "tp4", "args": {"tensor_parallel_size": 4, "max_model_len": 8192}},
        ],
    }
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    matrix = load_matrix(path)
    devices = [g.device for g in gpus_of(FakePynvml("rtx4090x2_pcie")).gpus]
    cells = gather_cells(matrix, devices, [cuda_engine("12.4")], plan=True)
    rows = matrix_checks(cells, [d.name for d in devices], broken_engines=0)
    by_name = {r.name: r for r in rows}
    assert by_name["cells"].seen == "4 cells: 2 on this host; not here: 2 × no H100 on this host"
    tp4 = by_name["cell Qwen2.5-7B-Instruct__RTX-4090__tp4__e"]
    assert tp4.status == "fail" and "needs 4 GPUs (tensor x pipeline parallel), this host has 2 RTX 4090" in tp4.seen
    # 7.6B parameters in bf16 (~14 GiB) cannot fit in half of a 24 GiB card: listed with the planner's fix.
    half = by_name["cell Qwen2.5-7B-Instruct__RTX-4090__half__e"]
    assert half.status == "warn" and half.seen.startswith("the planner says it cannot fit")
    assert half.remedy and "gpu_memory_utilization" in half.remedy + half.seen
    assert by_name["fit"].seen.startswith("0 of 1 placed cells fit")


def test_no_cell_on_this_host_fails_unless_a_broken_engine_explains_it():
    away = [CellState(cell_id="m__H100__c__e", gpu="H100", on_host=False, why_not="no H100 on this host")]
    (row, _fit) = matrix_checks(away, ["AMD EPYC"], broken_engines=0)
    assert row.status == "fail" and "add this host's device (AMD EPYC) to `gpus`" in row.remedy
    assert matrix_checks(away, ["AMD EPYC"], broken_engines=1)[0].status == "ok"
