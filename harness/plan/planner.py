"""The planner: model facts x engine args x device -> per-GPU memory breakdown, KV capacity,
verdict, and the cheapest fix when the cell does not fit.

GPU budget (vLLM V1 gpu_worker): KV = total x gpu_memory_utilization - weights - peak activation
- non-torch memory (- CUDA graph memory from the versions that estimate it before sizing the
cache), or `kv_cache_memory_bytes` when set. CPU budget: VLLM_CPU_KVCACHE_SPACE GiB (or
`kv_cache_memory_bytes`), nothing subtracted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from harness.plan import calibration as cal
from harness.plan.kv import KV_DTYPE_BYTES, capacity, default_block_size, fits_one_request, kv_layout, \
    largest_max_model_len
from harness.plan.model import ModelFacts
from harness.plan.weights import DTYPE_BYTES, GIB, WeightEstimate, padded_vocab, runtime_dtype, weights_from_config

MAX_TP = 8  # largest TP a fix proposes: one node
MAX_UTILIZATION = 0.95  # vLLM refuses to start when free memory < utilization x total; keep headroom
MIN_USEFUL_LEN = 1024  # a max_model_len fix shorter than this (or than asked) is no fix


class Plan(BaseModel):
    """One cell's prediction. Memory values are GiB per GPU; tokens as vLLM reports them."""

    platform: Literal["cuda", "cpu"]
    vllm_version: str | None = None
    total_memory_gib: float | None = None
    gpu_memory_utilization: float | None = None
    budget_gib: float | None = None  # what vLLM may use: total x utilization (GPU), KV space (CPU)
    weights_gib: float | None = None
    activation_gib: float | None = None
    non_torch_gib: float | None = None
    cuda_graph_gib: float | None = None
    kv_cache_gib: float | None = None
    kv_cache_tokens: int | None = None
    num_blocks: int | None = None
    block_size: int | None = None
    kv_bytes_per_token: float | None = None
    max_model_len: int | None = None
    max_concurrency: float | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    fits: bool | None = None
    failure_class: str | None = None  # the class vLLM would fail with, from the fixed vocabulary
    reason: str = ""
    suggestion: str | None = None
    fix: dict[str, Any] | None = None  # engine-arg changes of the cheapest fix
    fix_env: dict[str, str] | None = None  # env changes of that fix (CPU KV space)
    fixes: list[dict[str, Any]] = Field(default_factory=list)  # every single change that fits
    valid_tp: list[int] = Field(default_factory=list)
    exact: bool = False  # tokens are vLLM's own arithmetic (CPU budget, uniform layers)
    weights_source: str | None = None
    calibration: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


def _gib(x: float) -> float:
    return round(x / GIB, 4)


def tp_valid(facts: ModelFacts, tp: int) -> bool:
    """Whether vLLM accepts this TP: heads divide evenly, KV heads divide or are divided
    (replication), the padded vocabulary splits evenly, MoE experts' intermediate splits evenly."""
    return (tp >= 1 and facts.heads % tp == 0
            and (facts.mla or facts.kv_heads % tp == 0 or tp % facts.kv_heads == 0)
            and padded_vocab(facts.vocab) % tp == 0
            and not (facts.experts and facts.moe_intermediate % tp))


def valid_tp_sizes(facts: ModelFacts, limit: int = MAX_TP) -> list[int]:
    return [tp for tp in range(1, limit + 1) if tp_valid(facts, tp)]


def scheduler_defaults(platform: str, total_gib: float | None, gpu_name: str, world: int) -> tuple[int, int]:
    """vLLM's `vllm serve` defaults for (max_num_seqs, max_num_batched_tokens): engine/arg_utils.py."""
    if platform == "cpu":
        return 128 * world, 2048 * world
    total = total_gib or 0.0
    if total >= 160:
        return 1024, 16384
    if total >= 70 and "a100" not in gpu_name.lower():
        return 1024, 8192
    return 256, 2048


def _int(args: dict, key: str, default: int) -> int:
    value = args.get(key)
    return default if value in (None, "", "auto") else int(value)


def plan_model(facts: ModelFacts, args: dict[str, Any], *, platform: str, total_gib: float | None,
               env: dict[str, str] | None = None, gpu_name: str = "", vllm_version: str | None = None,
               weights: WeightEstimate | None = None, table: list[dict] | None = None,
               measured: dict[str, float] | None = None, search_fixes: bool = True) -> Plan:
    """Plan one model under one engine config. `measured` (weights_gib, activation_peak_gib,
    non_torch_gib, cuda_graph_gib from a real run) replaces the matching estimates."""
    env = env or {}
    measured = {k: v for k, v in (measured or {}).items() if v is not None}
    tp = _int(args, "tensor_parallel_size", 1)
    pp = _int(args, "pipeline_parallel_size", 1)
    eager = bool(args.get("enforce_eager", False))
    dtype = runtime_dtype(facts, args.get("dtype"))
    db = DTYPE_BYTES.get(dtype, 2)
    kv_dtype = str(args.get("kv_cache_dtype") or "auto")
    kv_bytes = KV_DTYPE_BYTES.get(kv_dtype) or db
    block = _int(args, "block_size", default_block_size(facts, platform))
    max_len = _int(args, "max_model_len", facts.max_position)
    seqs_default, tokens_default = scheduler_defaults(platform, total_gib, gpu_name, tp * pp)
    max_seqs = _int(args, "max_num_seqs", seqs_default)
    batched = _int(args, "max_num_batched_tokens", tokens_default)
    if args.get("enable_chunked_prefill") is False and "max_num_batched_tokens" not in args:
        batched = max(batched, max_len)
    util = float(args.get("gpu_memory_utilization") or 0.9)
    plan = Plan(platform="cpu" if platform == "cpu" else "cuda", vllm_version=vllm_version,
                total_memory_gib=total_gib, max_model_len=max_len, tensor_parallel_size=tp,
                pipeline_parallel_size=pp, block_size=block, valid_tp=valid_tp_sizes(facts))

    if not tp_valid(facts, tp):
        plan.fits, plan.failure_class = False, "tp_exceeds_gpus"
        plan.reason = (f"tensor_parallel_size={tp} does not divide the model ({facts.heads} heads, "
                       f"{facts.kv_heads} KV heads, vocab {facts.vocab}); valid: {plan.valid_tp}")
        smaller = [t for t in plan.valid_tp if t <= tp]
        if smaller:
            plan.fix = {"tensor_parallel_size": max(smaller)}
            plan.suggestion = f"tensor_parallel_size={max(smaller)}"
        return plan

    weights = weights or weights_from_config(facts, dtype=dtype, tp=tp, pp=pp,
                                             runtime_quant=args.get("quantization"))
    plan.weights_source = weights.source
    layout = kv_layout(facts, tp=tp, pp=pp, kv_dtype_bytes=kv_bytes, block_size=block)
    plan.kv_bytes_per_token = layout.bytes_per_token

    if platform == "cpu":
        plan.weights_gib = _gib(weights.per_gpu_bytes)
        space = env.get("VLLM_CPU_KVCACHE_SPACE")
        if space not in (None, ""):
            budget = int(space) * GIB  # an integer number of GiB (vllm/envs.py parses int)
        elif args.get("kv_cache_memory_bytes") is not None:
            budget = int(args["kv_cache_memory_bytes"])
        else:
            plan.reason = ("VLLM_CPU_KVCACHE_SPACE and kv_cache_memory_bytes unset: vLLM sizes the CPU "
                           "cache from free RAM at startup, which a plan cannot know")
            return plan
        plan.budget_gib = plan.kv_cache_gib = _gib(budget)
        return _verdict(plan, facts, layout, budget, args, env, platform, total_gib, gpu_name,
                        vllm_version, table, batched, search_fixes)

    if total_gib is None:
        plan.weights_gib = _gib(weights.per_gpu_bytes)
        plan.reason = "GPU memory unknown: give --gpu-memory-gib, or a GPU selector the table knows"
        return plan

    c = cal.constants_for(table if table is not None else cal.load_table(), family=facts.family,
                          vllm_version=vllm_version, platform="cuda", tp=tp, enforce_eager=eager)
    plan.calibration = list(c.rows)
    weights_b = measured["weights_gib"] * GIB if "weights_gib" in measured else \
        weights.per_gpu_bytes * c.weights_factor
    feat = cal.activation_features(facts, tp=tp, max_num_seqs=max_seqs, batched_tokens=batched,
                                   dtype_bytes=db)
    act_b = measured.get("activation_peak_gib", cal.activation_bytes(feat, c) / GIB) * GIB
    non_torch_b = measured.get("non_torch_gib", c.non_torch_gib) * GIB
    graph_b = 0.0 if eager else measured.get("cuda_graph_gib", c.cuda_graph_gib) * GIB
    plan.weights_gib, plan.activation_gib = _gib(weights_b), _gib(act_b)
    plan.non_torch_gib, plan.cuda_graph_gib = _gib(non_torch_b), _gib(graph_b)
    plan.gpu_memory_utilization = util
    plan.budget_gib = round(total_gib * util, 4)
    if weights_b > total_gib * GIB:
        plan.fits, plan.failure_class = False, "oom_weight_load"
        plan.reason = f"weights {plan.weights_gib:.2f} GiB per GPU exceed the GPU's {total_gib:.2f} GiB"
        if search_fixes:
            _search_fixes(plan, facts, args, env, platform, total_gib, gpu_name, vllm_version, table)
        return plan
    if args.get("kv_cache_memory_bytes") is not None:
        kv_b = int(args["kv_cache_memory_bytes"])
        plan.notes.append("kv_cache_memory_bytes set: KV size is fixed, utilization ignored")
    else:
        kv_b = int(total_gib * util * GIB - weights_b - act_b - non_torch_b
                   - (graph_b if c.cuda_graph_in_budget else 0.0))
    plan.kv_cache_gib = _gib(kv_b)
    return _verdict(plan, facts, layout, kv_b, args, env, platform, total_gib, gpu_name,
                    vllm_version, table, batched, search_fixes)


def _verdict(plan: Plan, facts: ModelFacts, layout, kv_b: int, args, env, platform, total_gib, gpu_name,
             vllm_version, table, batched: int, search_fixes: bool) -> Plan:
    cap = capacity(layout, kv_b, plan.max_model_len, batched_tokens=batched, vllm_version=vllm_version)
    plan.num_blocks, plan.kv_cache_tokens = cap.num_blocks, cap.tokens
    plan.max_concurrency = round(cap.max_concurrency, 4)
    plan.exact = layout.exact and platform == "cpu"
    if not layout.exact:
        plan.notes.append("hybrid layer schedule: capacity approximated")
    if kv_b <= 0:
        plan.fits, plan.failure_class = False, "kv_cache_insufficient"
        plan.reason = (f"no memory left for the KV cache ({plan.kv_cache_gib:.2f} GiB after weights, "
                       f"activation and non-torch memory)")
    elif not fits_one_request(layout, kv_b, plan.max_model_len, batched_tokens=batched,
                              vllm_version=vllm_version):
        plan.fits, plan.failure_class = False, "max_model_len_exceeds_kv"
        plan.reason = (f"max_model_len {plan.max_model_len} needs more KV cache than the "
                       f"{plan.kv_cache_gib:.2f} GiB available ({cap.tokens} tokens)")
    else:
        plan.fits = True
        plan.reason = (f"{cap.tokens} KV tokens in {plan.kv_cache_gib:.2f} GiB: "
                       f"{cap.max_concurrency:.2f}x requests of {plan.max_model_len} tokens")
        return plan
    if search_fixes:
        _search_fixes(plan, facts, args, env, platform, total_gib, gpu_name, vllm_version, table,
                      layout=layout, kv_b=kv_b, batched=batched)
    return plan


def _search_fixes(plan: Plan, facts, args, env, platform, total_gib, gpu_name, vllm_version, table,
                  layout=None, kv_b: int = 0, batched: int = 0) -> None:
    """Single changes that make the cell fit, cheapest first: shorter max_model_len, higher
    utilization (CPU: more KV space), more TP, fp8 KV cache. The first becomes the suggestion."""

    def fits_with(changes: dict, env_changes: dict | None = None) -> bool:
        trial = plan_model(facts, {**args, **changes}, platform=platform, total_gib=total_gib,
                           env={**env, **(env_changes or {})}, gpu_name=gpu_name, vllm_version=vllm_version,
                           table=table, search_fixes=False)
        return bool(trial.fits)

    fixes: list[dict[str, Any]] = []
    if layout is not None and kv_b > 0:
        longest = largest_max_model_len(layout, kv_b, plan.max_model_len, batched_tokens=batched,
                                        vllm_version=vllm_version)
        if longest >= min(MIN_USEFUL_LEN, plan.max_model_len):
            fixes.append({"args": {"max_model_len": longest}})
    if platform == "cpu":
        space = int(env.get("VLLM_CPU_KVCACHE_SPACE") or 0)
        for gib in range(space + 1, space + 65):
            if fits_with({}, {"VLLM_CPU_KVCACHE_SPACE": str(gib)}):
                fixes.append({"env": {"VLLM_CPU_KVCACHE_SPACE": str(gib)}})
                break
    elif args.get("kv_cache_memory_bytes") is None:
        util = float(args.get("gpu_memory_utilization") or 0.9)
        steps = range(round(util * 100) + 1, round(MAX_UTILIZATION * 100) + 1)
        found = next((s / 100 for s in steps if fits_with({"gpu_memory_utilization": s / 100})), None)
        if found is not None:
            fixes.append({"args": {"gpu_memory_utilization": found}})
    if platform != "cpu":
        tp = plan.tensor_parallel_size
        bigger = next((t for t in plan.valid_tp if t > tp and fits_with({"tensor_parallel_size": t})), None)
        if bigger is not None:
            fixes.append({"args": {"tensor_parallel_size": bigger}})
    if not str(args.get("kv_cache_dtype") or "auto").startswith("fp8") and fits_with({"kv_cache_dtype": "fp8"}):
        fixes.append({"args": {"kv_cache_dtype": "fp8"}})
    plan.fixes = fixes
    if fixes:
        best = fixes[0]
        plan.fix, plan.fix_env = best.get("args"), best.get("env")
        plan.suggestion = ", ".join(f"{k}={v}" for k, v in {**best.get("args", {}), **best.get("env", {})}.items())
    else:
        plan.suggestion = None
        plan.notes.append(f"no single change up to TP={MAX_TP} / utilization {MAX_UTILIZATION} makes it fit")
