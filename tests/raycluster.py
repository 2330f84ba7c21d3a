"""A real local Ray cluster for tests: a head and extra node processes on this one machine.

Every node is a `ray start --block` child of the test, so all its Ray processes (GCS, raylet,
agents, workers) stay in that child's tree: the test can find a node's raylet by pid, kill it to
lose the node, and stop exactly the processes it started. `ray stop` would stop every Ray
process of the user, other people's included, so it is never used.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
from conftest import ENGINE_PYTHON, harness_env

RAY = ENGINE_PYTHON.parent / "ray"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Node:
    def __init__(self, proc: subprocess.Popen, log: Path):
        self.proc, self.log = proc, log

    def processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def raylet(self, timeout: float = 60) -> psutil.Process:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = [p for p in self.processes() if p.name() == "raylet"]
            if found:
                return found[0]
            time.sleep(0.2)
        raise AssertionError(f"no raylet under node pid {self.proc.pid}: {self.log.read_text()[-2000:]}")


class LocalCluster:
    """`ray start` processes with logical resources, e.g. {"gpu_cpu": 1} for one CPU cell."""

    def __init__(self, tmp: Path):
        # Ray puts unix sockets under the temp dir; their paths must stay under ~107 bytes.
        self.temp_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"rt{os.getpid()}-{free_port()}"
        self.temp_dir.mkdir(parents=True)
        self.logs, self.nodes = tmp, []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = harness_env(RAY_USAGE_STATS_ENABLED="0")

    def _start(self, args: list[str], resources: dict[str, float]) -> Node:
        log = self.logs / f"ray-node{len(self.nodes)}.log"
        cmd = [
            str(RAY),
            "start",
            "--block",
            "--disable-usage-stats",
            "--num-cpus=1",
            f"--resources={json.dumps(resources)}",
            f"--dashboard-agent-listen-port={free_port()}",
            *args,
        ]
        proc = subprocess.Popen(
            cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        node = Node(proc, log)
        self.nodes.append(node)
        return node

    def start_head(self, resources: dict[str, float]) -> Node:
        node = self._start(
            [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                f"--temp-dir={self.temp_dir}",
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-port={free_port()}",
            ],
            resources,
        )
        self._wait(node)
        return node

    def add_node(self, resources: dict[str, float]) -> Node:
        node = self._start([f"--address={self.address}"], resources)
        self._wait(node)
        return node

    def wait_alive(self, count: int, timeout: float = 120) -> None:
        """Until the GCS lists `count` live nodes (a driver checks the nodes' resources at start)."""
        probe = (
            "import ray; ray.init(address=%r, logging_level='error', log_to_driver=False);"
            "print(sum(n['Alive'] for n in ray.nodes()))"
        ) % self.address
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = subprocess.run([str(ENGINE_PYTHON), "-c", probe], capture_output=True, text=True, env=self.env)
            if out.returncode == 0 and int(out.stdout.split()[-1]) >= count:
                return
            time.sleep(0.5)
        raise AssertionError(f"fewer than {count} live Ray nodes after {timeout} s")

    def _wait(self, node: Node, timeout: float = 120) -> None:
        """Until `ray start` says its node runs."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if node.proc.poll() is not None:
                raise AssertionError(f"ray start exited: {node.log.read_text()[-2000:]}")
            if "Ray runtime started" in node.log.read_text(errors="replace"):
                return
            time.sleep(0.3)
        raise AssertionError(f"Ray node not up in {timeout} s: {node.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its node), then SIGKILL what is left of it."""
        tracked = {p.pid: p for node in self.nodes for p in node.processes()}
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
        _, alive = psutil.wait_procs(list(tracked.values()), timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
