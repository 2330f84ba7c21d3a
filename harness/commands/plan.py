"""`python -m harness plan`: predict memory fit without starting an engine.

Two forms: one model/config (`--config CONFIG_JSON` or `--model SOURCE`, flags as in
docs/plan.md), or every cell of a matrix (`--matrix matrix.yaml`) as a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from harness.errors import InputError
from harness.plan import Plan, model_facts, plan_cell, plan_model
from harness.plan.devices import gpu_memory_gib, host_gpu_gib, lookup_gpu, unknown_gpu_message
from harness.plan.engine_args import ArgError, check_total_gib
from harness.plan.engine_args import resolve as resolve_args
from harness.plan.sources import resolve
from harness.plan.versions import parse as parse_version
from harness.plan.weights import weights_from_total


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to plan (one of)")
    src.add_argument("--matrix", help="plan every cell of this matrix file (table output)")
    src.add_argument("--config", help="a model's config.json")
    src.add_argument("--model", help="HF repo id (offline catalog / HF cache) or local model directory")
    p.add_argument("--safetensors-bytes", type=float, help="checkpoint size in bytes (overrides the shapes)")
    p.add_argument("--params", type=float, help="parameter count (overrides the shapes)")
    p.add_argument(
        "--gpu",
        default="",
        help="GPU selector (H100, B200, MI300X, RTX PRO 6000, cpu, ...): this "
        "host's NVML total when it has that GPU, else the GPU table (docs/plan.md)",
    )
    p.add_argument("--gpu-memory-gib", type=float, help="total memory per GPU as vLLM reports it (overrides --gpu)")
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--pipeline-parallel-size", type=int)
    p.add_argument("--kv-cache-dtype")
    p.add_argument("--dtype")
    p.add_argument("--quantization")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--enforce-eager", action="store_true", default=None)
    p.add_argument("--cpu-kvcache-space", type=int, help="CPU engine: VLLM_CPU_KVCACHE_SPACE in GiB")
    p.add_argument("--vllm-version", help="the engine version the prediction is for (default: newest behaviour)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


ARG_FLAGS = (
    "gpu_memory_utilization",
    "max_model_len",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "kv_cache_dtype",
    "dtype",
    "quantization",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enforce_eager",
)


def _flag(arg: str) -> str:
    """The command-line flag of an engine arg the planner refused."""
    return {"VLLM_CPU_KVCACHE_SPACE": "--cpu-kvcache-space"}.get(arg, "--" + arg.replace("_", "-"))


def _positive_number(flag: str, value: float | None) -> float | None:
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise InputError(f"{flag}: must be a positive finite number, got {value!r}")
    return value


def _check_common(args: argparse.Namespace) -> None:
    """Values every form of the verb shares: GPU memory, the version, a GPU name the table knows."""
    try:
        check_total_gib(args.gpu_memory_gib)
    except ArgError as exc:
        raise InputError(f"--gpu-memory-gib: {str(exc).split(': ', 1)[1]}") from exc
    if args.vllm_version is not None:
        try:
            parse_version(args.vllm_version)
        except ValueError as exc:
            raise InputError(f"--vllm-version: {exc} (expected e.g. 0.19.0)") from exc
    if args.cpu_kvcache_space is not None and args.cpu_kvcache_space < 0:
        raise InputError(f"--cpu-kvcache-space: must be >= 0 GiB, got {args.cpu_kvcache_space}")


def _load_config(path: str) -> dict:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not text at all (UnicodeDecodeError)
        raise InputError(
            f"--config {path}: not a readable JSON file ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        ) from exc
    return config


def _single(args: argparse.Namespace) -> Plan:
    _check_common(args)
    _positive_number("--safetensors-bytes", args.safetensors_bytes)
    _positive_number("--params", args.params)
    if args.config:
        config, tensors, origin = _load_config(args.config), {}, f"config from {args.config}"
    else:
        try:
            source = resolve(args.model)
        except (LookupError, OSError, ValueError) as exc:
            raise InputError(f"--model {args.model}: {exc}") from exc
        config, tensors = source.config, source.tensors
        origin = f"config from {source.origin} ({source.path})"
    try:
        facts = model_facts(config)
    except ValueError as exc:
        raise InputError(f"{args.config or args.model}: {exc}") from exc
    engine = {k: getattr(args, k) for k in ARG_FLAGS if getattr(args, k) is not None}
    platform = "cpu" if args.gpu.lower() == "cpu" or args.cpu_kvcache_space is not None else "cuda"
    total = args.gpu_memory_gib
    if total is None and platform == "cuda":
        if not args.gpu:
            raise InputError("give --gpu-memory-gib G, or a --gpu selector the GPU table knows")
        total = gpu_memory_gib(args.gpu)
        if total is None:
            raise InputError(unknown_gpu_message(args.gpu))
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.cpu_kvcache_space)} if args.cpu_kvcache_space is not None else {}
    try:
        ea = resolve_args(facts, engine, platform=platform, total_gib=total, env=env, gpu_name=args.gpu)
        weights = None
        if args.safetensors_bytes:
            weights = weights_from_total(facts, args.safetensors_bytes, dtype=ea.dtype, tp=ea.tp, pp=ea.pp)
        elif args.params:
            weights = weights_from_total(facts, args.params * ea.dtype_bytes, dtype=ea.dtype, tp=ea.tp, pp=ea.pp)
        plan = plan_model(
            facts,
            engine,
            platform=platform,
            total_gib=total,
            env=env,
            gpu_name=args.gpu,
            vllm_version=args.vllm_version,
            weights=weights,
            tensors=tensors,
        )
    except ArgError as exc:
        raise InputError(f"{_flag(exc.arg)}: {str(exc).split(': ', 1)[1]}") from exc
    plan.notes.append(origin)
    row = lookup_gpu(args.gpu) if args.gpu_memory_gib is None and platform == "cuda" else None
    if row is not None and not row.get("verified", True) and host_gpu_gib(args.gpu) is None:
        plan.notes.append(
            f"{row['name']} memory {row['memory_gib']} GiB is an estimate: give --gpu-memory-gib for the exact total"
        )
    return plan


def _verdict(plan: Plan) -> str:
    return {True: "fits", False: f"FAILS ({plan.failure_class})", None: "unknown"}[plan.fits]


def _matrix(args: argparse.Namespace) -> int:
    _check_common(args)
    try:
        from harness.matrix import load_matrix
    except ImportError as exc:
        raise InputError(f"--matrix needs harness.matrix: {exc}") from exc
    try:
        matrix = load_matrix(Path(args.matrix))
    except (OSError, ValueError) as exc:
        raise InputError(f"--matrix {args.matrix}: {exc}") from exc
    rows = []
    for cell in matrix.cells:
        plan = plan_cell(cell, args.gpu_memory_gib, vllm_version=args.vllm_version)
        rows.append((cell.cell_id, plan))
    if args.json:
        print(json.dumps([{"cell_id": cid, **plan.model_dump()} for cid, plan in rows], indent=2))
        return 0
    head = ("cell", "KV tokens", "concurrency", "verdict", "fix")
    table = [head] + [
        (
            cid,
            "-" if p.kv_cache_tokens is None else f"{p.kv_cache_tokens:,}",
            "-" if p.max_concurrency is None else f"{p.max_concurrency:.2f}x",
            _verdict(p),
            p.suggestion or ("" if p.fits else p.reason),
        )
        for cid, p in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        print("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    return 0


def main(args: argparse.Namespace) -> int:
    if args.matrix:
        return _matrix(args)
    if not (args.config or args.model):
        raise InputError("give --config CONFIG_JSON or --model SOURCE (one model), or --matrix FILE")
    plan = _single(args)
    if args.json:
        print(plan.model_dump_json(indent=2))
        return 0
    print(f"verdict: {_verdict(plan)} - {plan.reason}")
    for key in (
        "weights_gib",
        "activation_gib",
        "non_torch_gib",
        "cuda_graph_gib",
        "kv_cache_gib",
        "kv_cache_tokens",
        "max_concurrency",
    ):
        value = getattr(plan, key)
        if value is not None:
            print(f"  {key:16} {value}")
    if plan.suggestion:
        print(f"suggestion: {plan.suggestion}")
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
