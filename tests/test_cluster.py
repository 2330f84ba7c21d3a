"""The matrix on a real local Ray cluster (`run --ray-address`): same records and outcomes as a
local run of the real vLLM CPU engine, resume across a killed driver, a node lost mid-cell
(retried once, then failed with the reason), cells no node can take, and never an orphaned engine.

Nodes are `ray start` processes of this test on this one machine, declaring the logical resource
`gpu_cpu: 1` (one CPU cell at a time each); the test stops only those, by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import ENGINE_PYTHON, ROOT, TINY, TreeWatcher, harness_cmd, harness_env, run_harness, wait_for
from raycluster import LocalCluster

from harness.host.selectors import resource_name
from harness.run.cluster import NO_NODE, SCRATCH_PREFIX, placement_problem
from harness.schema import Cell, EngineConfig, EngineInstall, ModelSpec
from harness.store import iter_records, read_runs

needs_ray = pytest.mark.skipif(
    not (ENGINE_PYTHON.parent / "ray").exists(), reason="no Ray in the engine venv: pip install '.[ray]'"
)
CHAT, UNSUPPORTED = "tiny-chat__cpu__cpu__venv", "tiny-unsupported__cpu__cpu__venv"
CELLS = {CHAT, UNSUPPORTED}


def matrix_file(tmp: Path, models: tuple[str, ...] = ("tiny-chat", "tiny-unsupported"), gpus: str = "[cpu]") -> Path:
    """The `cpu` config of matrix.yaml on the tiny models, without probes."""
    lines = [f"engines: [{{name: venv, python: {ENGINE_PYTHON}}}]", "models:"]
    lines += [f"  - model: {TINY / m}" for m in models]
    lines += [
        f"gpus: {gpus}",
        "configs:",
        "  - {name: cpu, args: {max_model_len: 512, dtype: bfloat16, enforce_eager: true}, "
        "env: {VLLM_CPU_KVCACHE_SPACE: 1}}",
        "timeouts: {ready_s: 300, request_s: 60}",
        "probe: none",
    ]
    path = tmp / "matrix.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def records(results: Path) -> dict:
    return {r.cell_id: r for _, r in iter_records(results)}


def latest_manifest(results: Path):
    return read_runs([results]).runs[-1].manifest


# --------------------------------------------------------------------------- without a cluster
def test_flag_without_ray_is_one_line(tmp_path):
    shadow = tmp_path / "noray" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    proc = subprocess.run(
        harness_cmd("run", "--matrix", str(matrix_file(tmp_path)), "--ray-address", "auto"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env=harness_env(PYTHONPATH=str(shadow.parent)),
    )
    assert proc.returncode == 2
    assert proc.stderr == "error: --ray-address needs Ray: pip install '.[ray]'\n"


@needs_ray
def test_unreachable_head_is_one_line(tmp_path):
    proc = subprocess.run(
        harness_cmd(
            "run",
            "--matrix",
            str(matrix_file(tmp_path)),
            "--no-report",
            "--results",
            str(tmp_path / "results"),
            "--ray-address",
            "127.0.0.1:1",
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=harness_env(),
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --ray-address 127.0.0.1:1: no Ray head answers there")
    assert proc.stderr.count("\n") == 1


def test_placement_needs_a_node_with_the_device_type():
    def cell(gpu: str, tp: int = 1) -> Cell:
        return Cell(
            model=ModelSpec(name="m", source="/m"),
            gpu=gpu,
            engine=EngineInstall(name="e", python="p"),
            config=EngineConfig(name="c", args={"tensor_parallel_size": tp}),
        )

    nodes = [{"CPU": 16, "GPU": 8, "gpu_H100": 8}, {"CPU": 8, "GPU": 2, "gpu_RTX-4090": 2}, {"gpu_cpu": 1}]
    assert resource_name("RTX 4090") == "gpu_RTX-4090" and resource_name("cpu") == "gpu_cpu"
    assert placement_problem(cell("H100", tp=8), nodes) is None
    assert placement_problem(cell("cpu", tp=4), nodes) is None  # a CPU cell takes one node's CPU
    assert placement_problem(cell("A100-80GB"), nodes) == NO_NODE
    assert placement_problem(cell("RTX 4090", tp=4), nodes) == "no node with 4 x RTX 4090 (tensor x pipeline parallel)"
    assert placement_problem(cell("H100"), [{"gpu_H100": 1}]) is not None  # the type, but no GPU to give


# --------------------------------------------------------------------------- on a local cluster
class EngineWatcher(TreeWatcher):
    """Every process of every vLLM engine seen below the cluster's nodes (engine = the
    api_server a cell task starts, with all its children), kept even after its node is gone."""

    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster
        super().__init__(root_pid=os.getpid(), every=0.1)

    def snapshot(self) -> None:
        for node in list(self.cluster.nodes):
            self.engines_on(node)
        # An engine whose node died is no longer below any node: follow it by pid.
        for proc in self.alive():
            try:
                for p in proc.children(recursive=True):
                    self.seen.setdefault(p.pid, p.create_time())
            except psutil.Error:
                continue

    def engines_on(self, node) -> list[psutil.Process]:
        """The node's engines now, each remembered with all its children: a test that kills the
        node right after finding its engine must not depend on the polling thread having seen it."""
        out = []
        for proc in node.processes():
            try:
                if "vllm.entrypoints.openai.api_server" in " ".join(proc.cmdline()):
                    for p in [proc, *proc.children(recursive=True)]:
                        self.seen.setdefault(p.pid, p.create_time())
                    out.append(proc)
            except psutil.Error:
                continue
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head and one more node, each taking one CPU cell at a time."""
    local = LocalCluster(tmp_path_factory.mktemp("ray"))
    try:
        local.start_head({"gpu_cpu": 1})
        local.add_node({"gpu_cpu": 1})
        local.wait_alive(2)
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the same matrix run locally (no Ray)."""
    tmp = tmp_path_factory.mktemp("local")
    proc, _ = run_harness(
        [
            "run",
            "--matrix",
            str(matrix_file(tmp, gpus="[cpu, H100]")),
            "--results",
            str(tmp / "results"),
            "--no-report",
            "--progress",
            "plain",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "results"


def start_driver(matrix: Path, results: Path, address: str) -> subprocess.Popen:
    return subprocess.Popen(
        harness_cmd(
            "run",
            "--matrix",
            str(matrix),
            "--results",
            str(results),
            "--no-report",
            "--progress",
            "plain",
            "--ray-address",
            address,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=harness_env(),
        cwd=ROOT,
    )


def shape(rec) -> dict:
    """What a record holds (which fields, which timings, which files), not the measured values."""
    dump = rec.model_dump()
    return {
        "fields": sorted(k for k, v in dump.items() if v not in (None, [], {})),
        "timings": sorted(k for k, v in dump["timings"].items() if v is not None),
        "validation": rec.validation.model_dump(exclude={"seconds"}) if rec.validation else None,
    }


@pytest.mark.engine
@needs_ray
def test_cluster_run_equals_local_run_across_a_driver_restart(cluster, local_run, tmp_path):
    matrix, results = matrix_file(tmp_path, gpus="[cpu, H100]"), tmp_path / "results"
    watcher, scratch = EngineWatcher(cluster), scratch_folders()
    started = time.monotonic()
    # Both cells start at once, one per node; kill the driver once the fast-failing cell is
    # recorded and the other is still loading its engine.
    driver = start_driver(matrix, results, cluster.address)
    wait_for(lambda: UNSUPPORTED in records(results) or driver.poll() is not None, 300, "first record")
    assert CHAT not in records(results) and watcher.alive(), "tiny-chat finished before the driver could be killed"
    driver.kill()
    _, err1 = driver.communicate(timeout=30)
    assert watcher.wait_gone(30) == [], "an engine outlived its killed driver"
    wait_for(lambda: not scratch_folders() - scratch, 30, "the killed task's scratch folder deleted")
    killed_at = time.monotonic() - started

    proc, _ = run_harness(
        [
            "run",
            "--matrix",
            str(matrix),
            "--results",
            str(results),
            "--no-report",
            "--progress",
            "plain",
            "--ray-address",
            cluster.address,
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    watcher.stop()
    assert watcher.wait_gone(15) == []
    recs = records(results)
    assert set(recs) == CELLS
    first_run = recs[UNSUPPORTED].run_id
    manifest = latest_manifest(results)
    status = {e.cell_id: (e.status, e.reason) for e in manifest.cells}
    assert status[UNSUPPORTED] == ("reused", None) and status[CHAT] == ("ran", None)
    assert status["tiny-chat__H100__cpu__venv"] == ("not_on_host", NO_NODE)
    assert recs[CHAT].run_id == manifest.run_id != first_run

    # Same outcomes, keys and record shapes as the local run; engine log and telemetry stored.
    for cell_id in CELLS:
        ray_rec, loc = recs[cell_id], records(local_run)[cell_id]
        assert (ray_rec.outcome, ray_rec.failure_class, ray_rec.key) == (loc.outcome, loc.failure_class, loc.key)
        assert shape(ray_rec) == shape(loc), cell_id
        folder = results / ray_rec.run_id / cell_id
        assert sorted(p.name for p in folder.iterdir()) == ["engine.log", "record.json", "telemetry.csv"]
        assert (folder / "engine.log").stat().st_size > 0
    assert recs[CHAT].outcome == "ok" and recs[UNSUPPORTED].failure_class == "unsupported_architecture"

    # Progress names the node of each cell; the two cells ran on the two nodes at once.
    nodes = {line.split(" → ")[1].split(":")[0] for line in err1.splitlines() if " → " in line}
    assert len(nodes) == 2, err1[-2000:]
    assert f"{CHAT} → " in proc.stderr and "no node with this device" in proc.stderr

    # A third run reuses both and starts no engine.
    before = sorted(results.rglob("record.json"))
    again, _ = run_harness(
        [
            "run",
            "--matrix",
            str(matrix),
            "--results",
            str(results),
            "--no-report",
            "--ray-address",
            cluster.address,
            "--json",
        ]
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(results.rglob("record.json")) == before
    assert {e.cell_id: e.status for e in latest_manifest(results).cells if e.cell_id in CELLS} == {
        CHAT: "reused",
        UNSUPPORTED: "reused",
    }
    assert sorted(line.split('"cell_id":"')[1].split('"')[0] for line in again.stdout.splitlines()) == sorted(CELLS)

    # The cluster's output goes through report and diff like a local run's.
    reports = tmp_path / "reports"
    proc, _ = run_harness(["report", "--results", str(results), "--reports", str(reports)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = (reports / "runs" / f"{manifest.run_id}.md").read_text()
    kv = f"{recs[CHAT].metrics.kv_cache_size_tokens:,}"
    assert kv in page and "unsupported_architecture" in page and "no record on this host" not in page
    local = read_runs([local_run]).runs[-1].folder
    for args, code in (([str(local), str(results / manifest.run_id)], 0), ([str(local), str(results / first_run)], 1)):
        proc, _ = run_harness(["diff", *args, "--reports", str(reports)])
        assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the killed first cluster run has no tiny-chat record: the gate names the missing cell
    assert f"{CHAT}: missing" in proc.stdout
    print(f"driver killed at {killed_at:.0f} s; whole test {time.monotonic() - started:.0f} s", file=sys.stderr)


def scratch_folders() -> set[Path]:
    """Cell scratch folders on this machine (Ray workers' temp dir is this process's)."""
    return set(Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"))


@pytest.mark.engine
@needs_ray
@pytest.mark.parametrize("second_loss", [False, True], ids=["lost-once", "lost-twice"])
def test_node_lost_mid_cell_gets_one_retry(tmp_path, second_loss):
    """The head takes no cells here, so the cell lands on node 1; its raylet is killed while the
    engine loads and the retry lands on node 2 (started meanwhile), which either finishes the cell
    or is lost as well."""
    local = LocalCluster(tmp_path)
    try:
        local.start_head({})
        first = local.add_node({"gpu_cpu": 1})
        local.wait_alive(2)
        watcher, scratch = EngineWatcher(local), scratch_folders()
        results = tmp_path / "results"
        driver = start_driver(matrix_file(tmp_path, models=("tiny-chat",)), results, local.address)
        wait_for(lambda: watcher.engines_on(first), 240, "engine on node 1")
        first.raylet().send_signal(signal.SIGKILL)
        second = local.add_node({"gpu_cpu": 1})
        wait_for(lambda: watcher.engines_on(second), 240, "the retry's engine on node 2")
        if second_loss:
            second.raylet().send_signal(signal.SIGKILL)
        _, err = driver.communicate(timeout=300)
        watcher.stop()
        assert driver.returncode == 0, err[-3000:]
        assert watcher.seen and watcher.wait_gone(30) == [], "an engine outlived its node or cell"
        wait_for(lambda: not scratch_folders() - scratch, 30, "the lost tasks' scratch folders deleted")
        assert "retrying: node" in err
        rec, entry = records(results)[CHAT], latest_manifest(results).cells[0]
        if second_loss:
            assert rec.outcome == "failed" and rec.failure_class == "other"
            assert rec.failure_detail.count("lost (") == 2 and rec.failure_detail.endswith("mid-cell")
            assert (entry.status, entry.outcome) == ("ran", "failed")
        else:
            assert rec.outcome == "ok" and rec.validation.passed
            assert (entry.status, entry.outcome) == ("ran", "ok")
            assert entry.reason.startswith("node ") and entry.reason.endswith("lost (NodeDiedError); retried")
    finally:
        local.stop()
