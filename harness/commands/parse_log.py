"""`parse-log FILE [--json]`: engine log -> facts (memory breakdown, timings, failure, remedy)."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.parse import parse_log_file
from harness.schema import EngineFacts
from harness.validate import text_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=text_file, help="a vLLM engine log (any version, any prefix)")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON (the keys of docs/parse-log.md)")


def main(args: argparse.Namespace) -> int:
    path: Path = args.file
    facts = parse_log_file(path)
    print(facts.model_dump_json(indent=2) if args.json else summary(facts))
    return 0


def _gib(value: float | None) -> str:
    return "?" if value is None else f"{value:g} GiB"


def summary(facts: EngineFacts) -> str:
    """Human summary: what a user reads first, only the lines the log gave numbers for."""
    f = facts
    head = f"outcome: {f.outcome}"
    if f.failure_class:
        head += f" ({f.failure_class}{', while serving' if f.outcome == 'ready' else ''})"
    elif f.outcome == "inconclusive":
        head += " (the log ends before the engine was ready or failed: cut short?)"
    lines = [head]
    ident = [
        f"vLLM {f.vllm_version}" if f.vllm_version else None,
        f.platform,
        f.gpu_name,
        f"TP {f.tp_size}" if f.tp_size else None,
        f"PP {f.pp_size}" if f.pp_size and f.pp_size > 1 else None,
    ]
    if any(ident):
        lines.append("engine:  " + ", ".join(x for x in ident if x))
    if f.total_gpu_memory_gib is not None or f.gpu_memory_utilization is not None:
        budget = ""
        if f.total_gpu_memory_gib is not None and f.gpu_memory_utilization is not None:
            budget = f" -> budget {f.total_gpu_memory_gib * f.gpu_memory_utilization:.2f} GiB"
        free = (
            f", free at start {_gib(f.free_memory_gib_at_startup)}" if f.free_memory_gib_at_startup is not None else ""
        )
        lines.append(
            f"memory:  total {_gib(f.total_gpu_memory_gib)} x util {f.gpu_memory_utilization or '?'}{budget}{free}"
        )
    parts = [
        ("weights", f.weights_gib),
        ("activation peak", f.activation_peak_gib),
        ("non-torch", f.non_torch_gib),
        ("CUDA graphs", f.cuda_graph_gib),
        ("KV cache", f.kv_cache_gib),
    ]
    shown = [f"{name} {_gib(v)}" for name, v in parts if v is not None]
    if shown:
        lines.append("usage:   " + ", ".join(shown))
    kv = []
    if f.kv_cache_tokens is not None:
        kv.append(f"{f.kv_cache_tokens:,} tokens")
    if f.num_gpu_blocks is not None:
        kv.append(f"{f.num_gpu_blocks:,} blocks")
    if f.max_concurrency is not None:
        per = (
            f" at {f.max_concurrency_tokens_per_request:,} tokens/request"
            if f.max_concurrency_tokens_per_request
            else ""
        )
        kv.append(f"max concurrency {f.max_concurrency:g}x{per}")
    if kv:
        lines.append("KV:      " + ", ".join(kv))
    times = [
        ("load", f.load_seconds),
        ("weights", f.weights_load_seconds),
        ("torch.compile", f.torch_compile_seconds),
        ("graphs", f.cuda_graph_seconds),
        ("init engine", f.init_engine_seconds),
    ]
    shown = [f"{name} {v:g} s" for name, v in times if v is not None]
    if shown:
        lines.append("time:    " + ", ".join(shown))
    if f.kv_cache_memory_recommendation_bytes is not None:
        lines.append(
            f"hint:    --kv-cache-memory-bytes {f.kv_cache_memory_recommendation_bytes} fits the requested memory"
        )
    if f.per_rank:
        lines.append(f"ranks:   {len(f.per_rank)} ranks reported their own values (see --json per_rank)")
    if f.failure_evidence:
        lines.append(f"evidence: {f.failure_evidence}")
    if f.remedy:
        lines.append(f"remedy:  {f.remedy}")
    return "\n".join(lines)
