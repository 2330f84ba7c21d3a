"""Memory planner: predict, before loading, whether a cell fits, and how to make it fit.

Pure Python (no vllm, no torch): reads config.json and safetensors headers itself.
Modules: model (config -> facts), engine_args (the effective engine args, checked), weights,
kv (vLLM's block arithmetic), calibration (constants per vLLM version range, activation and
non-torch models), planner (GPU and CPU budgets, verdict, fixes), sources (config lookup),
devices (GPU memory: NVML, then the table), refit (the three fits behind `calibrate`), versions
(version ranges). The contract is docs/plan.md.

API for the runner: `plan_cell(cell, device_memory_gib, vllm_version=...)` and
`autofit_args(cell, facts, plan)`.
"""

from __future__ import annotations

from typing import Any, Literal

from harness.plan.devices import gpu_memory_gib, host_gpu_gib, lookup_gpu
from harness.plan.engine_args import ArgError, EngineArgs
from harness.plan.model import ModelFacts, model_facts
from harness.plan.planner import Plan, plan_model, valid_tp_sizes
from harness.plan.sources import resolve
from harness.schema import Cell, EngineFacts

__all__ = [
    "ArgError",
    "EngineArgs",
    "Plan",
    "ModelFacts",
    "autofit_args",
    "facts_for_cell",
    "model_facts",
    "plan_cell",
    "plan_model",
    "valid_tp_sizes",
]

AUTOFIT_CLASSES = ("max_model_len_exceeds_kv", "kv_cache_insufficient")


def _platform(cell: Cell) -> Literal["cpu", "cuda"]:
    return "cpu" if cell.gpu.strip().lower() == "cpu" else "cuda"


def facts_for_cell(cell: Cell) -> tuple[ModelFacts, Any]:
    """(facts, source) for the cell's model; raises LookupError/ValueError when unknowable offline."""
    source = resolve(cell.model.source, cell.model.revision)
    return model_facts(source.config), source


def plan_cell(
    cell: Cell,
    device_memory_gib: float | None,
    *,
    vllm_version: str | None = None,
    measured: dict[str, float] | None = None,
) -> Plan:
    """Plan one matrix cell. `device_memory_gib` None: this host's NVML total for `cell.gpu`, else
    the GPU table's. Never raises for a model or an argument it cannot plan: returns fits=None
    with the reason (a config that is not a JSON object, a shape of zero, tensor_parallel_size 0...)."""
    platform = _platform(cell)
    # The table names no CPU (nor does NVML), so a CPU cell gets None: its budget is
    # VLLM_CPU_KVCACHE_SPACE from the cell's env.
    total = device_memory_gib if device_memory_gib is not None else gpu_memory_gib(cell.gpu)
    try:
        facts, source = facts_for_cell(cell)
        plan = plan_model(
            facts,
            cell.config.args,
            platform=platform,
            total_gib=total,
            env=cell.config.env,
            gpu_name=cell.gpu,
            vllm_version=vllm_version,
            tensors=source.tensors,
            measured=measured,
        )
    except (LookupError, ValueError, OSError) as exc:
        return Plan(
            platform=platform,
            vllm_version=vllm_version,
            total_memory_gib=total,
            fits=None,
            reason=f"cannot plan: {exc}",
        )
    plan.notes.append(f"config from {source.origin}")
    if device_memory_gib is None:  # the table's figure unless NVML had this GPU: say when it is a guess
        row = lookup_gpu(cell.gpu)
        if row is not None and not row["verified"] and host_gpu_gib(cell.gpu) is None:
            plan.notes.append(f"{row['name']} memory {row['memory_gib']} GiB is an estimate ({row['source']})")
    return plan


def autofit_args(
    cell: Cell, facts: EngineFacts, plan: Plan | dict | None, engine_version: str | None = None
) -> dict[str, Any] | None:
    """Engine-arg changes for one retry of a cell that failed for lack of KV cache, or None.

    Preference: vLLM's own estimate of the longest max_model_len (it saw the real memory);
    else re-plan with the run's measured weights/activation/non-torch memory and take the
    planner's cheapest fix; else the fix the pre-run plan proposed. The re-plan takes the
    version the log states, else the install's (`engine_version`): a log without a version
    line would otherwise be planned as the newest vLLM."""
    if facts.failure_class not in AUTOFIT_CLASSES:
        return None
    if facts.estimated_max_model_len:
        return {"max_model_len": int(facts.estimated_max_model_len)}
    measured = {
        k: v
        for k, v in {
            "weights_gib": facts.weights_gib,
            "activation_peak_gib": facts.activation_peak_gib,
            "non_torch_gib": facts.non_torch_gib,
            "cuda_graph_gib": facts.cuda_graph_gib,
        }.items()
        if v is not None
    }
    if measured:
        replanned = plan_cell(
            cell, facts.total_gpu_memory_gib, vllm_version=facts.vllm_version or engine_version, measured=measured
        )
        if replanned.fix:
            return dict(replanned.fix)
    if isinstance(plan, dict):
        plan = Plan.model_validate(plan)
    return dict(plan.fix) if plan is not None and plan.fix else None
