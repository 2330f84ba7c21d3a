"""The parser never raises and stays bounded: random text, truncated logs, binary noise,
megabyte lines (hypothesis), plus unit checks of prefixes, per-rank values and wraps."""

from __future__ import annotations

import io
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.parse import classify_failure, parse_log, parse_log_file
from harness.parse.lines import MAX_LINE, physical_lines

FIXTURES = Path(__file__).parent / "fixtures" / "logs"
SAMPLE = (FIXTURES / "v0_11_debug_full_breakdown.log").read_text(encoding="utf-8")
FRAGMENTS = [line for p in sorted(FIXTURES.glob("*.log")) for line in p.read_text(encoding="utf-8", errors="replace").splitlines()][:400]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_random_text_never_raises(text):
    parse_log(text)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=4096))
def test_binary_noise_never_raises(blob):
    parse_log(blob.decode("utf-8", errors="replace"))
    parse_log(blob.decode("latin-1"))


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=len(SAMPLE)))
def test_truncated_log_never_raises(cut):
    facts = parse_log(SAMPLE[:cut])
    assert facts.outcome in ("ready", "failed", "inconclusive", "unknown")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40), st.randoms(use_true_random=False))
def test_shuffled_real_lines_never_raise(lines, rnd):
    rnd.shuffle(lines)
    text = "\n".join(line[: rnd.randint(0, len(line))] if rnd.random() < 0.3 else line for line in lines)
    parse_log(text)


def test_megabyte_lines_are_cut_not_buffered(tmp_path):
    big = "INFO 10-03 10:15:50 [gpu_worker.py:298] Available KV cache memory: 54.13 GiB " + "x" * 3_000_000
    path = tmp_path / "big.log"
    path.write_text(big + "\n" + "y" * 1_500_000 + "\nINFO 10-03 10:15:52 [kv_cache_utils.py:1087] GPU KV cache size: 1,048,576 tokens\n")
    lines = list(physical_lines(io.StringIO(path.read_text())))
    assert all(len(line) <= MAX_LINE for line in lines)
    facts = parse_log_file(path)
    assert facts.kv_cache_gib == 54.13 and facts.kv_cache_tokens == 1_048_576
    assert parse_log(big).kv_cache_gib == 54.13


def test_pathological_regex_inputs_are_fast():
    import time

    nasty = [
        "Model architectures [" + "'A'," * 20000,
        "(" * 50000 + " pid=1) INFO 10-03 10:15:50 [x.py:1] " + ")" * 50000,
        "Free memory on device (" + "1" * 100000,
        "non-default args: {" + "'a': (" * 5000,
        "torch peak memory increase: 1GiB;" + " weights" * 20000,
    ]
    start = time.perf_counter()
    for text in nasty:
        parse_log(text)
    assert time.perf_counter() - start < 5


def test_process_prefixes_and_per_rank():
    text = "\n".join(
        [
            "(VllmWorker rank=1 pid=12) INFO 05-01 10:00:00 [gpu_model_runner.py:1] Model loading took 7.50 GiB and 3.0 seconds",
            "(VllmWorker rank=0 pid=11) INFO 05-01 10:00:00 [gpu_model_runner.py:1] Model loading took 7.51 GiB and 3.1 seconds",
            "(RayWorkerWrapper pid=13, ip=10.0.0.2) INFO 05-01 10:00:01 [worker.py:1] Available KV cache memory: 20.00 GiB",
            "INFO 05-01 10:00:01 [gpu_worker.py:1] Available KV cache memory: 21.00 GiB",
        ]
    )
    facts = parse_log(text)
    assert facts.weights_gib == 7.51  # rank 0 is the headline even when printed second
    assert facts.kv_cache_gib == 21.0  # the un-prefixed driver is rank 0, the Ray worker is not
    ranks = {row["rank"]: row for row in facts.per_rank}
    assert ranks["VllmWorker rank=1"]["weights_gib"] == 7.5
    assert ranks["VllmWorker rank=0"]["load_seconds"] == 3.1


def test_thousands_separators_and_units():
    facts = parse_log(
        "(EngineCore pid=1) INFO 05-06 22:30:35 [kv_cache_utils.py:1708] GPU KV cache size: 1,048,576 tokens, "
        "Maximum concurrency for 1,024 tokens per request: 1,024.00x\n"
        "(EngineCore pid=1) INFO 05-06 22:30:36 [gpu_model_runner.py:1] Model loading took 0.5 GiB memory and 1.000000 seconds"
    )
    assert facts.kv_cache_tokens == 1_048_576
    assert facts.max_concurrency_tokens_per_request == 1024
    assert facts.max_concurrency == 1024.0
    assert facts.weights_gib == 0.5


def test_readiness_without_failure_and_classify_none():
    assert parse_log("INFO:     Application startup complete.").outcome == "ready"
    assert classify_failure("INFO 01-01 00:00:00 [x.py:1] all good") is None


def test_wrapper_defers_to_root_cause_above():
    text = "\n".join(
        [
            "(EngineCore_DP0 pid=5) ERROR 10-03 10:16:00 [core.py:708] EngineCore failed to start.",
            "(EngineCore_DP0 pid=5) ERROR 10-03 10:16:00 [core.py:708] ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing the engine.",
            "(APIServer pid=4) RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore_DP0': 1}",
        ]
    )
    cls, evidence, remedy = classify_failure(text)
    assert cls == "kv_cache_insufficient"
    assert evidence.startswith("ValueError: No available memory")


def test_unknown_exception_is_other_with_its_line():
    text = "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\nRuntimeError: CUDA error: no kernel image is available for execution on the device"
    cls, evidence, remedy = classify_failure(text)
    assert cls == "other" and "no kernel image" in evidence and "no kernel image" in remedy


def test_remedy_uses_budget_numbers():
    text = "\n".join(
        [
            "INFO 04-06 03:23:47 model_runner.py:1115] Loading model weights took 14.20 GB",
            "INFO 04-06 03:23:49 worker.py:266] the current vLLM instance can use total_gpu_memory (24.00GiB) x gpu_memory_utilization (0.50) = 12.00GiB",
            "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing the engine.",
        ]
    )
    _, _, remedy = classify_failure(text)
    assert "weights take 14.2 GiB of the 12 GiB budget" in remedy
    assert "raise gpu_memory_utilization to at least 0.65" in remedy
