"""Memory planner: predict, before loading, whether a cell fits, and how to make it fit.

Pure Python (no vllm, no torch): reads config.json and safetensors headers itself.
Modules: model (config -> facts), weights, kv (vLLM's block arithmetic), calibration (table of
measured constants), planner (assembly, verdict, fixes), sources (offline config lookup),
devices (GPU memory per selector), refit (calibration from records), versions.

API for the runner: `plan_cell(cell, device_memory_gib, vllm_version=...)` and
`autofit_args(cell, facts, plan)`.
"""

from __future__ import annotations

from typing import Any

from harness.plan.devices import gpu_memory_gib
from harness.plan.model import ModelFacts, model_facts
from harness.plan.planner import Plan, plan_model, valid_tp_sizes
from harness.plan.sources import resolve
from harness.plan.weights import runtime_dtype, weights_from_tensors
from harness.schema import Cell, EngineFacts

__all__ = ["Plan", "ModelFacts", "autofit_args", "facts_for_cell", "model_facts", "plan_cell", "plan_model",
           "valid_tp_sizes"]

AUTOFIT_CLASSES = ("max_model_len_exceeds_kv", "kv_cache_insufficient")


def _platform(cell: Cell) -> str:
    return "cpu" if cell.gpu.strip().lower() == "cpu" else "cuda"


def facts_for_cell(cell: Cell) -> tuple[ModelFacts, Any]:
    """(facts, source) for the cell's model; raises LookupError/ValueError when unknowable offline."""
    source = resolve(cell.model.source, cell.model.revision)
    return model_facts(source.config), source


def plan_cell(cell: Cell, device_memory_gib: float | None, *, vllm_version: str | None = None,
              table: list[dict] | None = None, measured: dict[str, float] | None = None) -> Plan:
    """Plan one matrix cell. `device_memory_gib` None: the GPU table's value for `cell.gpu`.
    Never raises for a model it cannot see: returns fits=None with the reason."""
    platform = _platform(cell)
    total = device_memory_gib if device_memory_gib is not None else (
        None if platform == "cpu" else gpu_memory_gib(cell.gpu))
    try:
        facts, source = facts_for_cell(cell)
    except (LookupError, ValueError, OSError) as exc:
        return Plan(platform=platform, vllm_version=vllm_version, total_memory_gib=total, fits=None,
                    reason=f"cannot plan: {exc}")
    args = cell.config.args
    tp = int(args.get("tensor_parallel_size") or 1)
    pp = int(args.get("pipeline_parallel_size") or 1)
    weights = None
    if source.tensors:
        weights = weights_from_tensors(facts, source.tensors, dtype=runtime_dtype(facts, args.get("dtype")),
                                       tp=tp, pp=pp, runtime_quant=args.get("quantization"))
    plan = plan_model(facts, args, platform=platform, total_gib=total, env=cell.config.env, gpu_name=cell.gpu,
                      vllm_version=vllm_version, weights=weights, table=table, measured=measured)
    plan.notes.append(f"config from {source.origin}")
    return plan


def autofit_args(cell: Cell, facts: EngineFacts, plan: Plan | dict | None) -> dict[str, Any] | None:
    """Engine-arg changes for one retry of a cell that failed for lack of KV cache, or None.

    Preference: vLLM's own estimate of the longest max_model_len (it saw the real memory);
    else re-plan with the run's measured weights/activation/non-torch memory and take the
    planner's cheapest fix; else the fix the pre-run plan proposed."""
    if facts.failure_class not in AUTOFIT_CLASSES:
        return None
    if facts.estimated_max_model_len:
        return {"max_model_len": int(facts.estimated_max_model_len)}
    measured = {"weights_gib": facts.weights_gib, "activation_peak_gib": facts.activation_peak_gib,
                "non_torch_gib": facts.non_torch_gib, "cuda_graph_gib": facts.cuda_graph_gib}
    if any(v is not None for v in measured.values()):
        replanned = plan_cell(cell, facts.total_gpu_memory_gib, vllm_version=facts.vllm_version, measured=measured)
        if replanned.fix:
            return dict(replanned.fix)
    if isinstance(plan, dict):
        plan = Plan.model_validate(plan)
    return dict(plan.fix) if plan is not None and plan.fix else None
