"""Capacity search against the real vLLM CPU engine serving the tiny chat model.

The engine runs with `max_num_seqs` 2: a request beyond two in flight waits in vLLM's queue
until a running one has produced all of its 400 tokens. The objective is 1.5 times the median
end-to-end latency of requests two at a time, measured just before each search, so it follows
the box's speed (CI runs other tests beside this one). A lone request is well inside it and a
queued one (a pair's wait, then its own run) well outside; two at a time sit near it, since on 2
shared cores the API server is starved while the engine decodes and one stream of a pair can
reach the client late (p99 1.7-1.8 x the median was seen). So capacity is 1 or 2, and the two
searches agree within one. Time to first token is no boundary at all here: a token can reach
the client seconds late even at concurrency 1.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import urllib.request

import pytest
from conftest import ENGINE_PYTHON, TINY, wait_for

from harness.engine.process import free_port
from harness.probes.load import run_profile
from harness.probes.profiles import ProbeProfile

pytestmark = pytest.mark.engine
if not ENGINE_PYTHON.exists():
    pytest.skip("the engine venv is missing: run `make install`", allow_module_level=True)

MAX_NUM_SEQS = 2
BUDGET_S = 150.0


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                str(ENGINE_PYTHON),
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(TINY / "tiny-chat"),
                "--served-model-name",
                "tiny",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--max-model-len",
                "512",
                "--dtype",
                "bfloat16",
                "--enforce-eager",
                "--max-num-seqs",
                str(MAX_NUM_SEQS),
                # Seeded prompts repeat across the two searches: measure prefill, not cache hits.
                "--no-enable-prefix-caching",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, f"engine exited with {proc.returncode}: see {log}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(ready, 600, "engine ready")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _pair_latency_ms(engine: str, tokenizer: str) -> float:
    """Median end-to-end latency of requests two at a time: the engine's slots full, none queued."""
    pair = run_profile(
        engine,
        "tiny",
        None,
        ProbeProfile(concurrency=[MAX_NUM_SEQS], requests=4, input_tokens=32, output_tokens=400, warmup_requests=1),
        tokenizer_dir=tokenizer,
        measure_ceiling=False,
        request_timeout=60,
    )
    return pair["levels"][0]["e2el_ms"]["median"]


def test_capacity_search_on_the_cpu_engine_is_bounded_and_repeatable(engine):
    tokenizer = str(TINY / "tiny-chat")
    caps: list[int] = []

    def agree() -> bool:  # two searches within one user of each other
        return any(abs(a - b) <= 1 for a, b in itertools.combinations(caps, 2))

    # Two searches, and a third only when they disagree: the other xdist worker's load can move
    # one search's latencies between its baseline and its levels (CI once saw 3, then 1).
    while len(caps) < 2 or (len(caps) == 2 and not agree()):
        # Measured just before each search, so both see the box as it is then (CI runs other
        # tests beside this one). A queued request waits a whole pair's time: 1.5 x splits them.
        profile = ProbeProfile(
            mode="capacity",
            slo={"e2el_p99_ms": 1.5 * _pair_latency_ms(engine, tokenizer)},
            input_tokens=32,
            output_tokens=400,
            requests=4,
            warmup_requests=MAX_NUM_SEQS,
            max_level_seconds=60,
            budget_s=BUDGET_S,
        )
        res = run_profile(
            engine, "tiny", None, profile, tokenizer_dir=tokenizer, measure_ceiling=False, request_timeout=60
        )
        cap = res["capacity"]
        trace = "; ".join(f"{t['phase']} {t['concurrency']}: {t['reason']}" for t in cap["trace"])
        # Within its budget; a level in flight when the budget ends finishes its requests.
        assert cap["duration_s"] <= BUDGET_S + 60, trace
        assert cap["limited_by"] == "slo" and cap["confirmed"], trace
        # The engine's own numbers for each level: every request ran, 400 tokens each.
        for lv in res["levels"]:
            assert lv["total_output_tokens"] == 400 * lv["completed"]
            assert lv["server_metrics"]["deltas"]["request_success"] == lv["completed"]
        caps.append(cap["concurrency"])
        print(f"capacity {cap['concurrency']} in {cap['duration_s']:.1f} s ({cap['levels_measured']} levels): {trace}")
    assert agree(), caps
    assert min(caps) >= 1 and max(caps) <= MAX_NUM_SEQS + 1, caps
