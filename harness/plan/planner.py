"""The planner: model facts x engine args x device -> per-GPU memory breakdown, KV capacity,
verdict, and the cheapest fix when the cell does not fit.

GPU budget (vLLM V1 gpu_worker): KV = total x gpu_memory_utilization - weights - peak activation
- non-torch memory (- CUDA graph memory from the versions that estimate it before sizing the
cache), or `kv_cache_memory_bytes` when set. CPU budget: VLLM_CPU_KVCACHE_SPACE GiB (or
`kv_cache_memory_bytes`), nothing subtracted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.plan import calibration as cal
from harness.plan.engine_args import EngineArgs, check_total_gib, scheduler_defaults
from harness.plan.engine_args import resolve as resolve_args
from harness.plan.kv import capacity, fits_one_request, kv_layout, largest_max_model_len
from harness.plan.model import ModelFacts
from harness.plan.weights import GIB, WeightEstimate, padded_vocab, weights_from_config, weights_from_tensors
from harness.schema import PlanPrediction

__all__ = ["Plan", "gpu_budget", "cpu_budget", "plan_model", "scheduler_defaults", "tp_valid", "valid_tp_sizes"]

MAX_TP = 8  # largest TP a fix proposes: one node
MAX_UTILIZATION = 0.95  # vLLM refuses to start when free memory < utilization x total; keep headroom
MIN_USEFUL_LEN = 1024  # a max_model_len fix shorter than this (or than asked) is no fix


# The prediction's shape is part of the record contract, so it lives with the records.
Plan = PlanPrediction


def _gib(x: float) -> float:
    return round(x / GIB, 4)


def tp_valid(facts: ModelFacts, tp: int) -> bool:
    """Whether vLLM accepts this TP: heads divide evenly, KV heads divide or are divided
    (replication), the padded vocabulary splits evenly, MoE experts' intermediate splits evenly."""
    return (
        tp >= 1
        and facts.heads % tp == 0
        and (facts.mla or facts.kv_heads % tp == 0 or tp % facts.kv_heads == 0)
        and padded_vocab(facts.vocab) % tp == 0
        and not (facts.experts and facts.moe_intermediate % tp)
    )


def valid_tp_sizes(facts: ModelFacts, limit: int = MAX_TP) -> list[int]:
    return [tp for tp in range(1, limit + 1) if tp_valid(facts, tp)]


@dataclass(frozen=True)
class Budget:
    """What the KV cache gets on the rank vLLM logs, and on the tightest rank (PP: the last stage)."""

    kv_bytes: int
    kv_bytes_min: int


def _stage_gpu(
    facts: ModelFacts, ea: EngineArgs, weights_b: float, c: cal.Constants, measured: dict[str, float], *, samples: bool
) -> tuple[float, float, float, float]:
    """(weights, activation, non-torch, CUDA graph) bytes of one pipeline stage's GPU."""
    feat = cal.activation_features(
        facts,
        tp=ea.tp,
        max_num_seqs=ea.max_num_seqs,
        batched_tokens=ea.batched_tokens,
        dtype_bytes=ea.dtype_bytes,
        pp=1 if samples else ea.pp,
    )
    act = measured.get("activation_peak_gib", cal.activation_bytes(feat, c) / GIB) * GIB
    non_torch = measured.get("non_torch_gib", cal.non_torch_gib(c, tp=ea.tp, pp=ea.pp)) * GIB
    graph = 0.0 if ea.enforce_eager else measured.get("cuda_graph_gib", c.cuda_graph_gib) * GIB
    return weights_b, act, non_torch, graph


def gpu_budget(
    plan: Plan,
    facts: ModelFacts,
    ea: EngineArgs,
    weights: WeightEstimate,
    *,
    total_gib: float,
    vllm_version: str | None,
    table: list[dict] | None,
    measured: dict[str, float],
) -> Budget | None:
    """vLLM V1 gpu_worker: KV = total x utilization - weights - peak activation - non-torch memory
    (- the CUDA graph estimate from the versions that subtract it), or kv_cache_memory_bytes.
    Fills the plan's breakdown (first stage: the rank vLLM logs); None when the weights alone
    exceed the GPU (the verdict is already set)."""
    c = cal.constants_for(
        table if table is not None else cal.load_table(),
        family=facts.family,
        vllm_version=vllm_version,
        platform="cuda",
        tp=ea.tp,
        enforce_eager=ea.enforce_eager,
    )
    plan.calibration = list(c.rows)
    if c.borrowed:
        plan.notes.append(
            "constants borrowed from other vLLM ranges (none fitted for this one): " + "; ".join(c.borrowed)
        )

    def stage_weights(raw: float) -> float:
        return measured["weights_gib"] * GIB if "weights_gib" in measured else raw * c.weights_factor

    first = _stage_gpu(facts, ea, stage_weights(weights.first_bytes), c, measured, samples=ea.pp == 1)
    last = first if ea.pp == 1 else _stage_gpu(facts, ea, stage_weights(weights.last_bytes), c, measured, samples=True)
    weights_b, act_b, non_torch_b, graph_b = first
    plan.weights_gib, plan.activation_gib = _gib(weights_b), _gib(act_b)
    plan.non_torch_gib, plan.cuda_graph_gib = _gib(non_torch_b), _gib(graph_b)
    plan.gpu_memory_utilization = ea.utilization
    plan.budget_gib = round(total_gib * ea.utilization, 4)
    heaviest = max(first[0], last[0])
    if heaviest > total_gib * GIB:
        plan.fits, plan.failure_class = False, "oom_weight_load"
        plan.reason = f"weights {heaviest / GIB:.2f} GiB per GPU exceed the GPU's {total_gib:.2f} GiB"
        return None
    if ea.kv_cache_memory_bytes is not None:
        plan.notes.append("kv_cache_memory_bytes set: KV size is fixed, utilization ignored")
        return Budget(ea.kv_cache_memory_bytes, ea.kv_cache_memory_bytes)

    def kv(stage: tuple[float, float, float, float]) -> int:
        w, a, n, g = stage
        return int(total_gib * ea.utilization * GIB - w - a - n - (g if c.cuda_graph_in_budget else 0.0))

    return Budget(kv(first), min(kv(first), kv(last)))


def cpu_budget(plan: Plan, ea: EngineArgs, weights: WeightEstimate) -> int | None:
    """The CPU engine's KV cache is VLLM_CPU_KVCACHE_SPACE GiB (or kv_cache_memory_bytes), nothing
    subtracted; None when neither is set (vLLM sizes it from free RAM at startup)."""
    plan.weights_gib = _gib(weights.per_gpu_bytes)
    if ea.cpu_kv_space_gib is not None:
        budget = ea.cpu_kv_space_gib * GIB
    elif ea.kv_cache_memory_bytes is not None:
        budget = ea.kv_cache_memory_bytes
    else:
        plan.reason = (
            "VLLM_CPU_KVCACHE_SPACE and kv_cache_memory_bytes unset: vLLM sizes the CPU "
            "cache from free RAM at startup, which a plan cannot know"
        )
        return None
    plan.budget_gib = plan.kv_cache_gib = _gib(budget)
    return budget


@dataclass(frozen=True)
class _Context:
    """Everything a re-plan for a candidate fix needs, so the fix search threads one value."""

    facts: ModelFacts
    args: dict[str, Any]
    env: dict[str, str]
    platform: str
    total_gib: float | None
    gpu_name: str
    vllm_version: str | None
    table: list[dict] | None
    tensors: dict[str, dict] | None
    measured: dict[str, float]


def plan_model(
    facts: ModelFacts,
    args: dict[str, Any],
    *,
    platform: str,
    total_gib: float | None,
    env: dict[str, str] | None = None,
    gpu_name: str = "",
    vllm_version: str | None = None,
    weights: WeightEstimate | None = None,
    tensors: dict[str, dict] | None = None,
    table: list[dict] | None = None,
    measured: dict[str, float] | None = None,
    search_fixes: bool = True,
) -> Plan:
    """Plan one model under one engine config. Weights: `weights` when given, else the
    checkpoint's `tensors` (its safetensors headers) when known, else the config's shapes.
    `measured` (weights_gib, activation_peak_gib, non_torch_gib, cuda_graph_gib from a real
    run) replaces the matching estimates.
    Raises ArgError (a ValueError) for an engine argument vLLM would refuse."""
    env = env or {}
    measured = {k: v for k, v in (measured or {}).items() if v is not None}
    total_gib = check_total_gib(total_gib)
    ea = resolve_args(facts, args, platform=platform, total_gib=total_gib, env=env, gpu_name=gpu_name)
    ctx = _Context(facts, args, env, platform, total_gib, gpu_name, vllm_version, table, tensors, measured)
    plan = Plan(
        platform="cpu" if platform == "cpu" else "cuda",
        vllm_version=vllm_version,
        total_memory_gib=total_gib,
        max_model_len=ea.max_model_len,
        tensor_parallel_size=ea.tp,
        pipeline_parallel_size=ea.pp,
        block_size=ea.block_size,
        valid_tp=valid_tp_sizes(facts),
    )

    if not tp_valid(facts, ea.tp):
        plan.fits, plan.failure_class = False, "tp_exceeds_gpus"
        plan.reason = (
            f"tensor_parallel_size={ea.tp} does not divide the model ({facts.heads} heads, "
            f"{facts.kv_heads} KV heads, vocab {facts.vocab}); valid: {plan.valid_tp}"
        )
        smaller = [t for t in plan.valid_tp if t <= ea.tp]
        if smaller:
            plan.fix = {"tensor_parallel_size": max(smaller)}
            plan.suggestion = f"tensor_parallel_size={max(smaller)}"
        return plan
    if ea.max_model_len > facts.max_position and "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in env:
        plan.fits, plan.failure_class = False, "other"
        plan.reason = (
            f"max_model_len {ea.max_model_len} exceeds the model's max_position_embeddings "
            f"{facts.max_position}: vLLM refuses it (VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 overrides)"
        )
        plan.fix = {"max_model_len": facts.max_position}
        plan.suggestion = f"max_model_len={facts.max_position}"
        return plan

    if weights is None and tensors:
        weights = weights_from_tensors(
            facts, tensors, dtype=ea.dtype, tp=ea.tp, pp=ea.pp, runtime_quant=ea.quantization
        )
    weights = weights or weights_from_config(facts, dtype=ea.dtype, tp=ea.tp, pp=ea.pp, runtime_quant=ea.quantization)
    plan.weights_source = weights.source
    layout = kv_layout(facts, tp=ea.tp, pp=ea.pp, kv_dtype_bytes=ea.kv_bytes, block_size=ea.block_size)
    plan.kv_bytes_per_token = layout.bytes_per_token

    if platform == "cpu":
        cpu = cpu_budget(plan, ea, weights)
        if cpu is None:
            return plan
        budget = Budget(cpu, cpu)
    elif total_gib is None:
        plan.weights_gib = _gib(weights.per_gpu_bytes)
        plan.reason = "GPU memory unknown: give --gpu-memory-gib, or a GPU selector the table knows"
        return plan
    else:
        gpu = gpu_budget(
            plan, facts, ea, weights, total_gib=total_gib, vllm_version=vllm_version, table=table, measured=measured
        )
        if gpu is None:
            if search_fixes:
                _search_fixes(plan, ctx, ea, weights)
            return plan
        budget = gpu
        plan.kv_cache_gib = _gib(budget.kv_bytes)
    return _verdict(plan, ctx, ea, weights, layout, budget, search_fixes)


def _verdict(
    plan: Plan, ctx: _Context, ea: EngineArgs, weights: WeightEstimate, layout, budget: Budget, search_fixes: bool
) -> Plan:
    kv_b = budget.kv_bytes_min
    max_len = plan.max_model_len or 0  # resolved from the config before a verdict
    cap = capacity(layout, kv_b, max_len, batched_tokens=ea.batched_tokens, vllm_version=ctx.vllm_version)
    plan.num_blocks, plan.kv_cache_tokens = cap.num_blocks, cap.tokens
    plan.max_concurrency = round(cap.max_concurrency, 4)
    plan.exact = layout.exact and ctx.platform == "cpu"
    if not layout.exact:
        plan.notes.append("hybrid layer schedule: capacity approximated")
    if ea.pp > 1 and budget.kv_bytes_min < budget.kv_bytes:
        plan.notes.append(
            f"pipeline stages differ: the last stage has {_gib(kv_b):.2f} GiB for the KV cache, "
            "and vLLM sizes every stage's cache to the smallest"
        )
    if kv_b <= 0:
        plan.fits, plan.failure_class = False, "kv_cache_insufficient"
        plan.reason = (
            f"no memory left for the KV cache ({_gib(kv_b):.2f} GiB after weights, activation and non-torch memory)"
        )
    elif not fits_one_request(layout, kv_b, max_len, batched_tokens=ea.batched_tokens, vllm_version=ctx.vllm_version):
        plan.fits, plan.failure_class = False, "max_model_len_exceeds_kv"
        plan.reason = (
            f"max_model_len {plan.max_model_len} needs more KV cache than the "
            f"{_gib(kv_b):.2f} GiB available ({cap.tokens} tokens)"
        )
    else:
        plan.fits = True
        plan.reason = (
            f"{cap.tokens} KV tokens in {plan.kv_cache_gib:.2f} GiB: "
            f"{cap.max_concurrency:.2f}x requests of {plan.max_model_len} tokens"
        )
        return plan
    if search_fixes:
        _search_fixes(plan, ctx, ea, weights, layout=layout, kv_b=kv_b)
    return plan


def _search_fixes(
    plan: Plan, ctx: _Context, ea: EngineArgs, weights: WeightEstimate, layout=None, kv_b: int = 0
) -> None:
    """Single changes that make the cell fit, cheapest first: shorter max_model_len, higher
    utilization (CPU: more KV space), more TP, fp8 KV cache. The first becomes the suggestion."""

    def fits_with(changes: dict, env_changes: dict | None = None) -> bool:
        # What a run measured (autofit's re-plan) and the weights sized here hold for a change
        # that keeps the GPU split (no candidate changes dtype or quantization); a new TP or PP
        # splits the model otherwise, so that trial sizes its weights again and goes back to the
        # estimates.
        same_split = not {"tensor_parallel_size", "pipeline_parallel_size"} & changes.keys()
        trial = plan_model(
            ctx.facts,
            {**ctx.args, **changes},
            platform=ctx.platform,
            total_gib=ctx.total_gib,
            env={**ctx.env, **(env_changes or {})},
            gpu_name=ctx.gpu_name,
            vllm_version=ctx.vllm_version,
            weights=weights if same_split else None,
            tensors=ctx.tensors,
            table=ctx.table,
            measured=ctx.measured if same_split else None,
            search_fixes=False,
        )
        return bool(trial.fits)

    fixes: list[dict[str, Any]] = []
    if layout is not None and kv_b > 0:
        asked = plan.max_model_len or 0
        longest = largest_max_model_len(
            layout, kv_b, asked, batched_tokens=ea.batched_tokens, vllm_version=ctx.vllm_version
        )
        if longest >= min(MIN_USEFUL_LEN, asked):
            fixes.append({"args": {"max_model_len": longest}})
    if ctx.platform == "cpu":
        space = ea.cpu_kv_space_gib or 0
        for gib in range(space + 1, space + 65):
            if fits_with({}, {"VLLM_CPU_KVCACHE_SPACE": str(gib)}):
                fixes.append({"env": {"VLLM_CPU_KVCACHE_SPACE": str(gib)}})
                break
    elif ea.kv_cache_memory_bytes is None:
        steps = range(round(ea.utilization * 100) + 1, round(MAX_UTILIZATION * 100) + 1)
        found = next((s / 100 for s in steps if fits_with({"gpu_memory_utilization": s / 100})), None)
        if found is not None:
            fixes.append({"args": {"gpu_memory_utilization": found}})
    if ctx.platform != "cpu":
        tp = plan.tensor_parallel_size
        bigger = next((t for t in plan.valid_tp if t > tp and fits_with({"tensor_parallel_size": t})), None)
        if bigger is not None:
            fixes.append({"args": {"tensor_parallel_size": bigger}})
    if not ea.kv_cache_dtype.startswith("fp8") and fits_with({"kv_cache_dtype": "fp8"}):
        fixes.append({"args": {"kv_cache_dtype": "fp8"}})
    plan.fixes = fixes
    if fixes:
        best = fixes[0]
        plan.fix, plan.fix_env = best.get("args"), best.get("env")
        plan.suggestion = ", ".join(f"{k}={v}" for k, v in {**best.get("args", {}), **best.get("env", {})}.items())
    else:
        plan.suggestion = None
        plan.notes.append(f"no single change up to TP={MAX_TP} / utilization {MAX_UTILIZATION} makes it fit")
