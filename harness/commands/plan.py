"""`python -m harness plan`: predict memory fit without starting an engine.

Two forms: one model/config (`--config CONFIG_JSON` or `--model SOURCE`, flags as in
design.md "Plan"), or every cell of a matrix (`--matrix matrix.yaml`) as a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.errors import InputError
from harness.plan import Plan, model_facts, plan_cell, plan_model
from harness.plan.devices import gpu_memory_gib
from harness.plan.sources import resolve
from harness.plan.weights import DTYPE_BYTES, runtime_dtype, weights_from_tensors, weights_from_total


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to plan (one of)")
    src.add_argument("--matrix", help="plan every cell of this matrix file (table output)")
    src.add_argument("--config", help="a model's config.json")
    src.add_argument("--model", help="HF repo id (offline catalog / HF cache) or local model directory")
    p.add_argument("--safetensors-bytes", type=float, help="checkpoint size in bytes (overrides the shapes)")
    p.add_argument("--params", type=float, help="parameter count (overrides the shapes)")
    p.add_argument("--gpu", default="", help="GPU selector for the memory table (H100, A100-40GB, cpu, ...)")
    p.add_argument("--gpu-memory-gib", type=float, help="total memory per GPU as vLLM reports it")
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


ARG_FLAGS = ("gpu_memory_utilization", "max_model_len", "tensor_parallel_size", "pipeline_parallel_size",
             "kv_cache_dtype", "dtype", "quantization", "max_num_seqs", "max_num_batched_tokens", "enforce_eager")


def _single(args: argparse.Namespace) -> Plan:
    if args.config:
        try:
            config = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"--config {args.config}: {exc}") from exc
        tensors: dict = {}
        origin = f"config from {args.config}"
    else:
        try:
            source = resolve(args.model)
        except LookupError as exc:
            raise InputError(f"--model: {exc}") from exc
        config, tensors = source.config, source.tensors
        origin = f"config from {source.origin} ({source.path})"
    try:
        facts = model_facts(config)
    except ValueError as exc:
        raise InputError(f"config: {exc}") from exc
    engine = {k: getattr(args, k) for k in ARG_FLAGS if getattr(args, k) is not None}
    platform = "cpu" if args.gpu.lower() == "cpu" or args.cpu_kvcache_space is not None else "cuda"
    total = args.gpu_memory_gib if args.gpu_memory_gib is not None else gpu_memory_gib(args.gpu) if args.gpu else None
    if platform == "cuda" and total is None:
        raise InputError("give --gpu-memory-gib G, or a --gpu selector the GPU table knows")
    dtype = runtime_dtype(facts, engine.get("dtype"))
    tp, pp = engine.get("tensor_parallel_size", 1), engine.get("pipeline_parallel_size", 1)
    weights = None
    if args.safetensors_bytes:
        weights = weights_from_total(facts, args.safetensors_bytes, dtype=dtype, tp=tp, pp=pp)
    elif args.params:
        weights = weights_from_total(facts, args.params * DTYPE_BYTES.get(dtype, 2), dtype=dtype, tp=tp, pp=pp)
    elif tensors:
        weights = weights_from_tensors(facts, tensors, dtype=dtype, tp=tp, pp=pp,
                                       runtime_quant=engine.get("quantization"))
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.cpu_kvcache_space)} if args.cpu_kvcache_space is not None else {}
    plan = plan_model(facts, engine, platform=platform, total_gib=total, env=env, gpu_name=args.gpu,
                      vllm_version=args.vllm_version, weights=weights)
    plan.notes.append(origin)
    return plan


def _verdict(plan: Plan) -> str:
    return {True: "fits", False: f"FAILS ({plan.failure_class})", None: "unknown"}[plan.fits]


def _matrix(args: argparse.Namespace) -> int:
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
    table = [head] + [(cid, "-" if p.kv_cache_tokens is None else f"{p.kv_cache_tokens:,}",
                       "-" if p.max_concurrency is None else f"{p.max_concurrency:.2f}x", _verdict(p),
                       p.suggestion or ("" if p.fits else p.reason)) for cid, p in rows]
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
    for key in ("weights_gib", "activation_gib", "non_torch_gib", "cuda_graph_gib", "kv_cache_gib",
                "kv_cache_tokens", "max_concurrency"):
        value = getattr(plan, key)
        if value is not None:
            print(f"  {key:16} {value}")
    if plan.suggestion:
        print(f"suggestion: {plan.suggestion}")
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
