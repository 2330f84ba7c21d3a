"""The parser never raises and stays bounded: random text, truncated logs, binary noise,
megabyte lines (hypothesis), plus unit checks of prefixes, per-rank values and wraps."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.parse import classify_failure, parse_log, parse_log_file
from harness.parse.lines import MAX_LINE, physical_lines

FIXTURES = Path(__file__).parent / "fixtures" / "logs"
SAMPLE = (FIXTURES / "v0_11_debug_full_breakdown.log").read_text(encoding="utf-8")
FRAGMENTS = [
    line
    for p in sorted(FIXTURES.glob("*.log"))
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines()
][:400]


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
    path.write_text(
        big
        + "\n"
        + "y" * 1_500_000
        + "\nINFO 10-03 10:15:52 [kv_cache_utils.py:1087] GPU KV cache size: 1,048,576 tokens\n"
    )
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
    # CPU seconds, not wall: a neighbour on a loaded box slows the wall clock, never this count;
    # a backtracking regex on these 100k-character lines would take minutes of it.
    start = time.process_time()
    for text in nasty:
        parse_log(text)
    assert time.process_time() - start < 5


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
    text = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nRuntimeError: CUDA error: no kernel image is available for execution on the device'
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


# --------------------------------------------------------------------------- normaliser
from harness.parse.lines import _parse, clean, strip_prefixes  # noqa: E402

CANONICAL = "ValueError: No available memory for the cache blocks."


@pytest.mark.parametrize(
    ("raw", "proc"),
    [
        ("Dez 01 01:35:10 gpu-host vllm[1234]: " + CANONICAL, None),  # journald, German month
        ("окт 22 01:35:10 gpu-host python3[77]: " + CANONICAL, None),  # Russian
        ("12月 22 01:35:10 gpu-host python3[77]: " + CANONICAL, None),  # Japanese
        ("janv. 05 09:00:01 h vllm[9]: " + CANONICAL, None),  # French, abbreviated with a dot
        ("[Error] (Process) " + CANONICAL, None),  # supervisor tags
        ("[Info] " + CANONICAL, None),
        ("2025-04-06T07:55:21.108632509Z " + CANONICAL, None),  # docker --timestamps
        ("  | [2025-03-10T15:07:20Z] " + CANONICAL, None),  # CI log table
        ("vllm-1  | " + CANONICAL, None),  # docker compose
        ("(RayWorkerWrapper pid=13, ip=10.0.0.2) " + CANONICAL, "RayWorkerWrapper"),
        ("2025-08-21T15:04:45Z vllm-1  | (EngineCore_DP0 pid=7) " + CANONICAL, "EngineCore_DP0"),  # stacked
        ("> " + CANONICAL, None),  # Markdown quote
        ("`" + CANONICAL + "`", None),  # inline code around the whole line
        ("\x1b[31m" + CANONICAL + "\x1b[0m", None),
    ],
)
def test_normaliser_cuts_foreign_prefixes(raw, proc):
    line = _parse(clean(raw))
    assert line.msg == CANONICAL and line.proc == proc
    cls, evidence, _ = classify_failure(raw)
    assert cls == "kv_cache_insufficient" and evidence == CANONICAL


@pytest.mark.parametrize(
    "raw",
    [
        "INFO 10-03 10:15:50 [gpu_worker.py:298] Available KV cache memory: 54.13 GiB",  # 0.8+
        "INFO 10-03 10:15:50 gpu_worker.py:298] Available KV cache memory: 54.13 GiB",  # ≤0.7
        "INFO 2025-10-03 10:15:50.123 gpu_worker.py:298] Available KV cache memory: 54.13 GiB",  # wrapper, full date
        "INFO 2025-10-03 10:15:50,123 [gpu_worker.py:298] Available KV cache memory: 54.13 GiB",
        "INFO 2025-10-03 10:15:50,123 default_VLLMDeployment ujj4diu5 gpu_worker.py:298 - Available KV cache memory: 54.13 GiB",
        "Dez 01 01:35:10 gpu-host vllm[1234]: (EngineCore_DP0 pid=1) INFO 10-03 10:15:50 [gpu_worker.py:298] Available KV cache memory: 54.13 GiB",
        "INFO 10-03 10:15:50 [gpu_worker.py:298] Available KV cache memory: **54.13** GiB",  # Markdown emphasis
        "INFO 10-03 10:15:50 [gpu_worker.py:298] Available KV cache memory: *54.13 GiB*",
        "INFO 10-03 10:15:50 [gpu_worker.py:298] Available KV cache memory: __54.13__ GiB",
        "[36m(EngineCore_DP0 pid=1)[0m INFO 10-03 10:15:50 [gpu_worker.py:298] Available KV cache memory: 54.13 GiB",
    ],
)
def test_every_header_form_gives_one_canonical_line(raw):
    line = _parse(clean(raw))
    assert line.has_header and line.level == "INFO"
    assert line.msg == "Available KV cache memory: 54.13 GiB"
    assert parse_log(raw).kv_cache_gib == 54.13


def test_normaliser_keeps_a_redacted_name_of_asterisks():
    raw = "HFValidationError: Repo id must be in the form 'repo_name' or 'namespace/repo_name': '****/models/x'."
    assert "'****/models/x'" in _parse(clean(raw)).msg
    assert _parse(clean("**Error** at **14.99** GiB")).msg == "Error at 14.99 GiB"


def test_normaliser_keeps_backticks_inside_a_message():
    raw = "INFO 10-03 10:15:50 [gpu_worker.py:1] use `--kv-cache-memory=123456` to fit"
    assert _parse(clean(raw)).msg.endswith("`--kv-cache-memory=123456` to fit")
    assert parse_log(raw).kv_cache_memory_recommendation_bytes == 123456


PREFIXES = [
    "Dez 01 01:35:10 gpu-host vllm[1234]: ",
    "2025-04-06T07:55:21.108Z ",
    "vllm-1  | ",
    "[Error] (Process) ",
    "(RayWorkerWrapper pid=13, ip=10.0.0.2) ",
    "(EngineCore_DP0 pid=7) ",
    "> ",
    "  | ",
    "2024-01-02 03:04:05,678 - app - INFO - ",
]
HEADER_LINES = [line for line in FRAGMENTS if _parse(clean(line)).has_header][:200]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PREFIXES), max_size=3), st.sampled_from(HEADER_LINES))
def test_any_prefix_stack_gives_the_same_canonical_line(prefixes, line):
    plain = _parse(clean(line))
    wrapped = _parse(clean("".join(prefixes) + line))
    assert (wrapped.msg, wrapped.level) == (plain.msg, plain.level)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_normaliser_never_raises_and_only_shortens(text):
    cleaned = clean(text)
    stripped, _, _ = strip_prefixes(cleaned)
    assert len(stripped) <= len(cleaned) <= len(text)


def test_normaliser_regexes_stay_linear():
    import time

    nasty = [
        "Dez 01 01:35:10 " + "a" * 200_000,
        "[" + "1;" * 100_000 + "m [0m",
        "*" * 100_000 + "1",
        "__" * 100_000 + "1",
        "**1" * 60_000,
        "INFO 2024-01-01 00:00:00,1 " + "a " * 100_000 + ":1]",
        "(" + "a" * 100_000 + " pid=1)",
        "[Error] (" + "x" * 100_000,
        "> " * 100_000 + "x",
        "2025-04-06T07:55:21" * 10_000,
        "No available shared memory broadcast block found in " + "9" * 100_000,
        "2024-07-01 07:28:04.488 " + "a " * 100_000 + "ERROR",  # a wrapper's level field never found
        "2024-07-01 07:28:04.488 ERROR [" + "x" * 100_000,
        "RESOURCE_EXHAUSTED " * 20_000,
        "RuntimeError('" + "x" * 100_000,
    ]
    start = time.process_time()  # CPU seconds, as above
    for text in nasty:
        parse_log(text)
        parse_log(text + "\n" + text)
    assert time.process_time() - start < 5


def test_a_prefixed_line_is_never_taken_for_a_wrapped_continuation():
    text = (
        "INFO 04-27 10:13:05 llm_engine.py:275] # GPU blocks: 0, # CPU blocks: 256 ..............................\n"
        "2024-04-27 10:13:05 | ERROR | stderr | Traceback (most recent call last):\n"
    )
    facts = parse_log(text)
    assert facts.failure_class == "kv_cache_insufficient"
    assert facts.failure_evidence.endswith("..............................")


SHM = "(EngineCore_DP0 pid=1) INFO 12-09 11:2{}:53 [shm_broadcast.py:466] No available shared memory broadcast block found in 60 seconds."


def test_shared_memory_waits_are_a_hang_only_when_no_ready_line_follows():
    waits = "\n".join(SHM.format(i) for i in range(3))
    assert parse_log(waits).failure_class == "timeout"
    assert parse_log(SHM.format(0)).failure_class is None  # one wait: a slow step, not yet a hang
    slow_compile = waits + "\n(APIServer pid=2) INFO:     Application startup complete."
    assert parse_log(slow_compile).failure_class is None and parse_log(slow_compile).outcome == "ready"
    served = 'INFO:     127.0.0.1:1 - "POST /v1/completions HTTP/1.1" 200 OK'
    hung_while_serving = served + "\n" + waits
    facts = parse_log(hung_while_serving)
    assert (facts.outcome, facts.failure_class) == ("ready", "timeout")
    assert "3 × 60 s" in facts.remedy
    assert parse_log(waits + "\n" + served).failure_class is None  # served after the waits


OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 44.53 GiB of which 263.25 MiB is free."


@pytest.mark.parametrize(
    ("above", "cls", "says"),
    [
        (
            '[rank0]:   File "/x/vllm/worker/model_runner.py", line 1, in load_model',
            "oom_weight_load",
            "weights do not fit",
        ),
        (
            '[rank0]:   File "/x/vllm/executor/gpu_executor.py", line 114, in determine_num_available_blocks',
            "oom_other",
            "profiling forward pass",
        ),
        (
            "INFO 11-22 07:19:26 model_runner.py:1413] Capturing cudagraphs for decoding.",
            "oom_other",
            "CUDA graph capture",
        ),
        (
            '  File "/x/vllm/v1/worker/gpu_model_runner.py", line 3221, in _dummy_sampler_run',
            "oom_other",
            "warming up the sampler",
        ),
        (
            "INFO 11-22 07:19:26 model_runner.py:1067] Loading model weights took 19.9073 GB",
            "oom_other",
            "after the weights loaded",
        ),
        (
            '  File "/x/vllm/model_executor/warmup/deep_gemm_warmup.py", line 262, in _warmup',
            "oom_other",
            "warming up kernels",
        ),
        # a served engine ran out in a step: not a start-up stage
        ('INFO:     127.0.0.1:5 - "POST /v1/completions HTTP/1.1" 200 OK', "oom_other", "while serving"),
        ("", "oom_other", "does not show the stage"),
    ],
)
def test_oom_stage_comes_from_the_lines_above_it(above, cls, says):
    facts = parse_log(above + "\n" + OOM)
    assert facts.failure_class == cls and says in facts.remedy
    assert ("stage not shown" in facts.failure_evidence) == (above == "")


@pytest.mark.parametrize(
    ("need", "have", "says"),
    [(80, 86, "AWQ or GPTQ"), (75, 70, "a GPTQ checkpoint"), (60, 52, "unquantized checkpoint in float16")],
)
def test_a_quantization_the_gpu_cannot_run_names_formats_it_can(need, have, says):
    line = (
        "RuntimeError: ('Quantization scheme is not supported for ', "
        f"'the current GPU. Min capability: {need}. ', 'Current capability: {have}.')"
    )
    facts = parse_log(line)
    assert (facts.outcome, facts.failure_class) == ("failed", "quantization_unsupported")
    assert facts.remedy is not None and says in facts.remedy


def test_v0s_async_engine_dead_error_is_a_wrapper_of_the_error_before_it():
    log = (
        "Traceback (most recent call last):\n"
        '  File "/x/vllm/engine/async_llm_engine.py", line 29, in _raise_exception_on_finish\n'
        "RuntimeError: CUDA error: an illegal memory access was encountered\n"
        "vllm.engine.async_llm_engine.AsyncEngineDeadError: Task finished unexpectedly. This should never "
        "happen! Please open an issue on Github. See stack trace above for the actual cause.\n"
    )
    facts = parse_log(log)
    assert facts.failure_class == "other"
    assert facts.failure_evidence is not None and "illegal memory access" in facts.failure_evidence


def test_the_data_parallel_start_up_handshake_timing_out_is_a_timeout():
    # vLLM's own message runs "send" and "initial" together
    line = "TimeoutError: Timed out waiting for engines to sendinitial message on input socket."
    facts = parse_log(line)
    assert (facts.outcome, facts.failure_class) == ("failed", "timeout")
    assert facts.remedy is not None and "data-parallel handshake" in facts.remedy


def test_a_hard_wrapped_oom_line_keeps_its_allocation():
    # a paste wrapped at a space loses it: "Tried to allocate" ends one line, "666.00 MiB" starts the next
    facts = parse_log(OOM.replace("allocate 1.50 GiB", "allocate1.50 GiB"))
    assert facts.remedy is not None and "a 1.5 GiB allocation failed" in facts.remedy


def test_a_traceback_cut_before_its_exception_is_a_failure_but_a_warning_one_is_not():
    cut = '(APIServer pid=1) Traceback (most recent call last):\n(APIServer pid=1)   File "x.py", line 1, in main'
    facts = parse_log(cut)
    assert (facts.outcome, facts.failure_class) == ("failed", "other")
    assert "ends inside this traceback" in facts.failure_evidence and "keep the full" in facts.remedy
    caught = "(EngineCore pid=1) WARNING 08-19 18:01:05 [import_utils.py:408] Traceback (most recent call last):"
    assert parse_log(caught).failure_class is None
    ray = cut + "\nray.exceptions.RayTaskError(RuntimeError): ray::Worker.init() failed"
    assert parse_log(ray).failure_evidence.startswith("ray.exceptions.RayTaskError(RuntimeError)")


@pytest.mark.parametrize(
    ("log", "outcome", "cls"),
    [
        # vendor runtimes' out-of-memory words (Gaudi, XPU Level Zero, TPU XLA, Ascend)
        (
            "RuntimeError: [Rank:0] FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed for size::1073741824 (1024)MB",
            "failed",
            "oom_other",
        ),
        (
            "RuntimeError: level_zero backend failed with error: 39 (UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY)",
            "failed",
            "oom_other",
        ),
        (
            "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Error allocating device buffer: Attempting to allocate 1.00G.",
            "failed",
            "oom_other",
        ),
        (
            "RuntimeError: NPU out of memory. Tried to allocate 2.00 GiB (NPU 0; 60.97 GiB total capacity)",
            "failed",
            "oom_other",
        ),
        # 0.2-era Ray wording, and more ranks than visible devices under mp
        (
            "ValueError: The number of required GPUs exceeds the total number of available GPUs in the cluster.",
            "failed",
            "tp_exceeds_gpus",
        ),
        ("RuntimeError: CUDA error: invalid device ordinal", "failed", "tp_exceeds_gpus"),
        ("ValueError: No supported config format found in /models/llama", "failed", "model_not_found"),
        ("TimeoutError: Server didn't reply within 10000 ms", "failed", "timeout"),
        # worker/executor wrappers of any version defer to the exception under them
        (
            "ERROR 05-01 10:00:00 multiproc_worker_utils.py:226] Exception in worker VllmWorkerProcess while processing method load_model.\n"
            "Traceback (most recent call last):\nKeyError: 'lm_head.weight'",
            "failed",
            "other",
        ),
        # the server's own start lines in other forms mean the engine was built
        ("INFO:     Uvicorn running on http://0.0.0.0:8000 (Press CTRL+C to quit)", "ready", None),
        (
            "INFO 09-05 10:00:00 launcher.py:19] Available routes are:\nINFO 09-05 10:00:00 launcher.py:27] Route: /v1/models, Methods: GET",
            "ready",
            None,
        ),
        ("Throughput: 12.50 requests/s, 6400.00 tokens/s", "ready", None),
    ],
)
def test_other_versions_and_vendors_wordings(log, outcome, cls):
    facts = parse_log(log)
    assert (facts.outcome, facts.failure_class) == (outcome, cls), facts.failure_evidence
    if cls == "other":
        assert "KeyError: 'lm_head.weight'" in (facts.failure_evidence or "")


@pytest.mark.parametrize(
    ("raw", "msg", "level"),
    [
        # other logging wrappers' level field after a timestamp: cut, and only warnings/errors kept as levels
        (
            "2024-07-01 07:28:04.488 1 kserve ERROR [__main__.py:<module>():254] Failed to start model server: x",
            "Failed to start model server: x",
            "ERROR",
        ),
        (
            '2024-11-18T16:43:45,497 [INFO ] W-9000-model_1.0-stdout MODEL_LOG -   File "/v/x.py", line 1, in f',
            '  File "/v/x.py", line 1, in f',
            None,
        ),
        (
            "(EngineCore pid=7) 2026-07-25 13:42:38,525 - WARNING - autotuner.py:2216 - slow tune",
            "slow tune",
            "WARNING",
        ),
        # without a timestamp in front, a level word is text
        ("ERROR rate is 5 % - see the dashboard", "ERROR rate is 5 % - see the dashboard", None),
    ],
)
def test_normaliser_cuts_other_wrappers_level_fields(raw, msg, level):
    line = _parse(clean(raw))
    assert (line.msg, line.level) == (msg, level)


def test_frames_then_their_exception_are_a_traceback_even_without_its_first_line():
    cut = (
        '(EngineCore_DP0 pid=1)   File "/v/core.py", line 109, in __init__\n'
        "(EngineCore_DP0 pid=1)     self._initialize_kv_caches()\n"
        "(EngineCore_DP0 pid=1) KeyError: 'model.layers.0.mlp'\n"
    )
    facts = parse_log(cut)
    assert (facts.outcome, facts.failure_class) == ("failed", "other")
    assert "KeyError: 'model.layers.0.mlp'" in (facts.failure_evidence or "")


def test_an_engine_that_dies_while_serving_is_ready_with_the_exception_it_logged():
    log = (
        "INFO 12-16 17:54:21 metrics.py:449] Avg prompt throughput: 7.8 tokens/s, Running: 1 reqs\n"
        "CRITICAL 12-16 17:54:23 launcher.py:99] MQLLMEngine is already dead, terminating server process\n"
        "ERROR 12-16 17:54:23 engine.py:135] RuntimeError('CUDA error: an illegal memory access was encountered')\n"
    )
    facts = parse_log(log)
    assert (facts.outcome, facts.failure_class) == ("ready", "other")
    assert "illegal memory access" in (facts.failure_evidence or "")


def test_torch_rank_prefix_is_cut_so_cut_frames_still_count():
    frames = (
        '[rank0]:   File "/v/llm_engine.py", line 349, in __init__\n'
        "[rank0]:     self.model_executor = executor_class(vllm_config=vllm_config, )\n"
    )
    assert (parse_log(frames).outcome, parse_log(frames).failure_class) == ("failed", "other")
    assert _parse(clean("[rank1]:[W1209 11:24:53.7 ProcessGroupNCCL.cpp:1] Warning: x")).msg.startswith("[rank1]:[W")


def test_a_raise_source_line_names_the_error_but_its_message_line_is_the_evidence():
    frame = (
        '  File "/opt/venv/lib/python3.12/site-packages/vllm/v1/core/kv_cache_utils.py", line 480, in check_memory\n'
    )
    raise_line = '    raise ValueError("No available memory for the cache blocks. "\n'
    message = "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization`.\n"
    # an indented source line under a long frame line is its own line, not a terminal wrap
    whole = parse_log("Traceback (most recent call last):\n" + frame + raise_line + message)
    assert whole.failure_class == "kv_cache_insufficient"
    assert whole.failure_evidence.startswith("ValueError: No available memory")
    cut = parse_log(frame + raise_line)  # the excerpt ends at the raise: it still says which error
    assert (cut.outcome, cut.failure_class) == ("failed", "kv_cache_insufficient")


def test_waits_followed_by_a_finished_start_up_step_are_no_hang():
    wait = (
        "(EngineCore pid=1) INFO 04-15 13:42:25 [shm_broadcast.py:681] No available shared memory broadcast "
        "block found in 60 seconds. This typically happens when some processes are hanging.\n"
    )
    done = "(Worker pid=2) INFO 04-15 13:43:42 [monitor.py:76] Initial profiling/warmup run took 107.62 s\n"
    assert parse_log(wait * 2 + done).outcome == "inconclusive"
    hung = parse_log(done + wait * 2)  # the step finished before the waits: still a hang
    assert (hung.outcome, hung.failure_class) == ("failed", "timeout")


@pytest.mark.parametrize(
    ("log", "outcome", "cls"),
    [
        (
            "ERROR 10-26 11:35:32 registry.py:267] Error in inspecting model architecture 'LlamaForCausalLM'",
            "failed",
            "unsupported_architecture",
        ),
        (
            "HFValidationError: Repo id must be in the from 'repo_name' or 'namespace/repo_name': '/app/m'.",
            "failed",
            "model_not_found",
        ),
        (
            'INFO:     127.0.0.1:1 - "POST /v1/chat/completions HTTP/1.1" 500 Internal Server Error\nERROR:    Exception in ASGI application',
            "ready",
            "other",
        ),
    ],
)
def test_round_seven_wordings(log, outcome, cls):
    facts = parse_log(log)
    assert (facts.outcome, facts.failure_class) == (outcome, cls)


@pytest.mark.parametrize(
    ("log", "outcome", "cls"),
    [
        ("huggingface_hub.errors.HFValidationError: Repo ID looks wrong: '/models/x'", "failed", "model_not_found"),
        ("RuntimeError: HIP error: hipErrorOutOfMemory", "failed", "oom_other"),
        ("Prompt: 'Hello, my name is', Generated text: ' Joel, my dad is my friend'", "ready", None),
    ],
)
def test_generalised_before_round_eight(log, outcome, cls):
    facts = parse_log(log)
    assert (facts.outcome, facts.failure_class) == (outcome, cls)


def test_an_http_clients_own_traceback_is_not_an_engine_failure():
    client = (
        "Traceback (most recent call last):\n"
        '  File "/usr/local/lib/python3.11/site-packages/litellm/llms/hosted_vllm/chat.py", line 9, in completion\n'
        '  File "/usr/local/lib/python3.11/site-packages/openai/_base_client.py", line 1610, in _request\n'
        "openai.APIConnectionError: Connection error.\n"
    )
    assert (parse_log(client).outcome, parse_log(client).failure_class) == ("unknown", None)
    # the same client frames under an engine's traceback do not hide the engine's failure
    engine = client.replace(
        "openai.APIConnectionError",
        '  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", line 76, in __init__\nKeyError',
    )
    assert parse_log(engine).failure_class == "other"


_HEAD = "INFO 10-03 10:15:50 [api_server.py:1] vLLM API server version 0.9.0\n"
_FRAMES = (
    'Traceback (most recent call last):\n  File "/usr/lib/python3.12/site-packages/vllm/engine/x.py", line 1, in f\n'
)
_SERVING = 'INFO:     127.0.0.1:1 - "POST /v1/completions HTTP/1.1" 200 OK\n'


@pytest.mark.parametrize(
    ("log", "outcome", "cls"),
    [
        # before ready, any error the engine printed ended its start, in whatever words
        (_HEAD + "ValueError: a wording no rule knows", "failed", "other"),
        (_HEAD + "ERROR 10-03 10:15:51 [core.py:1] something broke in a new way", "failed", "other"),
        (_HEAD + _FRAMES + "AssertionError", "failed", "other"),
        # the exception's type names the class when its words are new
        (_HEAD + _FRAMES + "TimeoutError: no answer in a new wording", "failed", "timeout"),
        (_HEAD + _FRAMES + "torch.OutOfMemoryError: new words", "failed", "oom_other"),
        # while serving: a traceback through vLLM's code is a request-time failure; a bare ERROR line is not
        (_HEAD + _SERVING + _FRAMES + "KeyError: 'x'", "ready", "other"),
        (_HEAD + _SERVING + "ERROR 10-03 10:15:51 [serving.py:1] bad request", "ready", None),
        # the name of vLLM anywhere outside a frame: a vLLM log, cut before ready or error
        ("$ vllm serve org/model --port 8000\nDownloading shards: 50%", "inconclusive", None),
        ("Loading the model in something else\nDone", "unknown", None),
    ],
)
def test_fallbacks_decide_unseen_wordings(log, outcome, cls):
    facts = parse_log(log)
    assert (facts.outcome, facts.failure_class) == (outcome, cls)


@pytest.mark.parametrize(
    "log",
    [
        # ESC written out as text: caret notation (`cat -v`, less) with its ^M, a JSON dump's \u001b, C's \033
        '^[[1;36m(EngineCore_DP0 pid=1)^[[0;0m   File "/w/vllm/worker/x.py", line 1, in f^M',
        '\\u001b[1;36m(EngineCore_DP0 pid=1)\\u001b[0;0m   File "/w/vllm/worker/x.py", line 1, in f',
        '\\033[1;36m(EngineCore_DP0 pid=1)\\033[0m   File "/w/vllm/worker/x.py", line 1, in f',
    ],
)
def test_escapes_written_as_text_are_cut(log):
    facts = parse_log(log)
    assert (facts.outcome, facts.failure_class) == ("failed", "other")
    assert facts.failure_evidence is not None and facts.failure_evidence.startswith('File "/w/vllm')


def test_a_windows_path_is_no_escape():
    from harness.parse.lines import clean

    path = "Using cache directory: D:\\Cache\\x1b_models\\e[1] for vLLM^M^"
    assert clean(path) == path


@pytest.mark.parametrize(
    "line",
    [
        "INFO 2025-08-29 18:04:47,931 serve 519120 -- Application 'default' is ready at http://127.0.0.1:8000/.",
        "INFO 2025-08-29 18:04:47,931 serve 519120 -- Deployed app 'default' successfully.",
    ],
)
def test_a_wrapper_saying_the_app_serves_is_ready(line):
    assert parse_log(line).outcome == "ready"


_SERVING_FRAME = (
    '  File "/opt/venv/lib/python3.12/site-packages/vllm/entrypoints/openai/serving_chat.py", line 574, '
    "in chat_completion_stream_generator"
)


@pytest.mark.parametrize(
    ("log", "outcome", "cls"),
    [
        # a traceback up through the request path happened while serving, even with no ready line shown
        ("Traceback (most recent call last):\n" + _SERVING_FRAME, "ready", "other"),
        # the same frame in a header that prints no seconds
        ("(APIServer pid=1) ERROR 11-03 23:14 [serving_chat.py:1145] " + _SERVING_FRAME, "ready", "other"),
        # the server turning requests away because its engine died; V1's dump of a failed step
        (
            "CRITICAL 02-25 11:11:34 launcher.py:101] MQLLMEngine is already dead, terminating server process",
            "ready",
            "other",
        ),
        (
            "ERROR 09-02 08:04:02 [dump_input.py:69] Dumping input data for V1 LLM engine (v0.10.1.1) with config: x",
            "ready",
            "other",
        ),
        # IPython's frame form opens a traceback too
        (
            "File ~/.local/lib/python3.10/site-packages/vllm/config.py:200, in ModelConfig.__init__(self)",
            "failed",
            "other",
        ),
        # vLLM's own shard-loading bar and process prefixes say whose log it is (cut: inconclusive)
        (
            "Loading safetensors checkpoint shards:  64% Completed | 104/163 [00:50<00:29,  2.02it/s]",
            "inconclusive",
            None,
        ),
        ("[1;36m(VllmWorker rank=0 pid=226) \nsomething", "inconclusive", None),
    ],
)
def test_serving_evidence_and_vllm_identity_from_any_line(log, outcome, cls):
    facts = parse_log(log)
    assert (facts.outcome, facts.failure_class) == (outcome, cls)


def test_a_rejected_token_is_an_auth_failure_whatever_the_error_class():
    log = (
        "huggingface_hub.errors.RepositoryNotFoundError: 401 Client Error. (Request ID: Root=1-x)\n"
        "Repository Not Found for url: https://huggingface.co/org/model/resolve/main/config.json.\n"
        "Invalid username or password.\n"
    )
    facts = parse_log(log)
    assert (facts.outcome, facts.failure_class) == ("failed", "gated_or_auth")
    assert facts.remedy is not None and "rejected the token" in facts.remedy and "org/model" in facts.remedy


def test_a_paste_that_lost_its_newlines_is_cut_at_each_header():
    flat = (
        "INFO 02-10 15:10:15 metrics.py:455] Avg prompt throughput: 492.7 tokens/s, Avg generation throughput: "
        "0.0 tokens/s, Running: 1 reqs, Swapped: 0 reqs, Pending: 0 reqs, GPU KV cache usage: 34.6%. "
        "ERROR 02-10 15:10:20 serving_chat.py:193] Error in preprocessing prompt inputs "
        "ERROR 02-10 15:10:20 serving_chat.py:193] Traceback (most recent call last): "
        'ERROR 02-10 15:10:20 serving_chat.py:193] File "/x/vllm/entrypoints/openai/serving_chat.py", line 177, '
        "in create_chat_completion ERROR 02-10 15:10:20 serving_chat.py:193] ) = await"
    )
    facts = parse_log(flat)
    assert (facts.outcome, facts.failure_class) == ("ready", "other")
    assert facts.failure_evidence is not None and facts.failure_evidence.startswith("Traceback")
    # a long line with one header (a config dump) stays whole
    config = "INFO 10-03 10:15:50 [core.py:75] Initializing a V1 LLM engine (v0.10.2) with config: " + "x=1, " * 200
    assert parse_log(config).vllm_version == "0.10.2"


@pytest.mark.parametrize(
    ("log", "outcome", "cls"),
    [
        # uvicorn's request wrapper alone says the server was serving
        ("ERROR:    Exception in ASGI application\nTraceback (most recent call last):", "ready", "other"),
        # an engine step and an offline LLM.generate call run only after start-up
        ('  File "/x/vllm/v1/engine/core.py", line 754, in _process_engine_step', "ready", "other"),
        ('  File "/x/vllm/v1/engine/core.py", line 1163, in run_busy_loop', "ready", "other"),
        ('  File "/x/vllm/v1/engine/core.py", line 472, in step_with_batch_queue', "ready", "other"),
        # V1's EngineCore.execute_model (0.8-0.10) only its steps call; a worker's execute_model
        # is also the profile run's, so it says nothing
        ('  File "/x/vllm/v1/engine/core.py", line 207, in execute_model', "ready", "other"),
        ('  File "/x/vllm/worker/model_runner.py", line 1346, in execute_model', "failed", "other"),
        ('  File "/x/vllm/entrypoints/llm.py", line 462, in generate', "ready", "other"),
        # IPython/Colab's verbose frames, also as a Markdown link
        ("[/x/vllm/entrypoints/llm.py](https://localhost:8080/#) in __init__(self, model)", "failed", "other"),
        ("/x/vllm/entrypoints/llm.py in __init__(self, model)", "failed", "other"),
        # glog's level letter (Triton) and a command-line tool's own fatal line
        ('E1027 15:54:53.431777 1342 model.py:502] "[vllm] Error generating stream: boom"', "ready", "other"),
        (
            'I1216 02:12:50.904999 179 server.cc:352] "unloading"\nerror: creating server: Internal - failed',
            "failed",
            "other",
        ),
    ],
)
def test_request_path_frames_and_other_tools_formats(log, outcome, cls):
    facts = parse_log(log)
    assert (facts.outcome, facts.failure_class) == (outcome, cls)
