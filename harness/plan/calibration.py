"""The calibration table: what the planner cannot derive from shapes alone (peak activation,
non-torch memory, CUDA graph memory, weight-layout overheads), stored in plan_data/calibration.json.

Two kinds of rows:

* hand-kept rows (a `source` that does not start with "fit"): facts about vLLM, matched on
  family / vLLM version spec / platform / tp / enforce_eager and merged least specific first;
* fitted rows (written by `calibrate`): one per vLLM version range (versions.range_specs) and
  constant group, optionally per family. A range that has no fitted value for a constant borrows
  it from the range reached across the fewest boundaries that change that constant (then the
  nearest, older first), and the plan says so.

Activation is modelled, not tabulated, so one row covers every model. vLLM's profile run peaks
either in the dummy sampler pass (logits for max_num_seqs rows of the vocabulary in fp32, plus
the prefill hidden states still alive) or in the dummy forward pass (the MLP's intermediate
activations for max_num_batched_tokens tokens); a MoE layer adds the fused-MoE workspace, which
stays allocated across the two passes:

    activation = activation_scale * max(sampler_factor * seqs * vocab * 4 + hidden_bytes * tokens * hidden,
                                        forward_factor * tokens * (3 * intermediate/TP + 4 * hidden) * dtype)
                 + moe_factor * tokens * top_k * (3 * moe_intermediate/TP + hidden) * dtype

With pipeline parallelism the first stage (the rank vLLM logs) does not sample: only the forward
branch counts there. Non-torch memory per GPU depends on TP and PP (non_torch_gib below).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from harness.plan.model import ModelFacts
from harness.plan.versions import crossings, in_range, range_of, range_specs

GIB = 1 << 30
FITTED = "fit"  # rows whose source starts with this are owned (replaced) by calibrate
KEYS = ("family", "vllm", "platform", "tp", "enforce_eager")
CONSTANTS = (
    "sampler_factor",
    "hidden_bytes",
    "forward_factor",
    "moe_factor",
    "activation_scale",
    "non_torch_gib",
    "non_torch_tp_gib",
    "non_torch_tp_step_gib",
    "non_torch_pp_gib",
    "cuda_graph_gib",
    "cuda_graph_in_budget",
    "weights_factor",
)
# Physical defaults used where no row says otherwise: one fp32 logits tensor, one bf16 hidden state.
DEFAULTS: dict[str, Any] = {
    "sampler_factor": 1.0,
    "hidden_bytes": 2.0,
    "forward_factor": 1.0,
    "moe_factor": 1.0,
    "activation_scale": 1.0,
    "non_torch_gib": 0.0,
    "non_torch_tp_gib": 0.0,
    "non_torch_tp_step_gib": 0.0,
    "non_torch_pp_gib": 0.0,
    "cuda_graph_gib": 0.0,
    "cuda_graph_in_budget": False,
    "weights_factor": 1.0,
}
GROUPS = {
    "sampler_factor": "activation",
    "hidden_bytes": "activation",
    "forward_factor": "activation",
    "moe_factor": "activation",
    "activation_scale": "activation",
    "non_torch_gib": "non_torch",
    "non_torch_tp_gib": "non_torch",
    "non_torch_tp_step_gib": "non_torch",
    "non_torch_pp_gib": "non_torch",
    "cuda_graph_gib": "cuda_graph",
    "cuda_graph_in_budget": "cuda_graph",
    "weights_factor": "weights",
}
MOE_CHUNK_TOKENS = 32768  # fused MoE processes at most this many tokens per call (VLLM_FUSED_MOE_CHUNK_SIZE)


def default_table_path() -> Path:
    return Path(str(resources.files("harness.plan_data").joinpath("calibration.json")))


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict, ...]:
    return tuple(json.loads(Path(path).read_text(encoding="utf-8"))["rows"])


def load_table(path: Path | None = None) -> list[dict]:
    return list(_load(str(path or default_table_path())))


def is_fitted(row: dict) -> bool:
    return str(row.get("source", "")).startswith(FITTED)


def _tp_matches(spec: Any, tp: int) -> bool:
    spec = str(spec)
    if spec == "*":
        return True
    if spec.startswith(">"):
        return tp > int(spec[1:])
    return tp == int(spec)


def _matches(row: dict, *, family: str, platform: str, tp: int, enforce_eager: bool) -> bool:
    return (
        row.get("family", "*") in ("*", family)
        and row.get("platform", "*") in ("*", platform)
        and _tp_matches(row.get("tp", "*"), tp)
        and row.get("enforce_eager", "*") in ("*", enforce_eager)
    )


def specificity(row: dict) -> int:
    return sum(1 for k in KEYS if row.get(k, "*") != "*")


def row_id(row: dict) -> str:
    return "/".join(f"{k}={row.get(k, '*')}" for k in KEYS)


@dataclass(frozen=True)
class Constants:
    values: dict[str, Any]
    rows: tuple[str, ...]  # ids of the rows that contributed, least specific first
    borrowed: tuple[str, ...] = ()  # "constant from range X" where the version's own range had none

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def constants_for(
    table: list[dict],
    *,
    family: str,
    vllm_version: str | None,
    platform: str = "cuda",
    tp: int = 1,
    enforce_eager: bool = False,
) -> Constants:
    match: dict[str, Any] = {"family": family, "platform": platform, "tp": tp, "enforce_eager": enforce_eager}
    values = dict(DEFAULTS)
    used: list[dict] = []
    hand = [
        r
        for r in table
        if not is_fitted(r)
        and _matches(r, **match)
        and (
            r.get("vllm", "*") == "*"
            or (vllm_version is not None and in_range(vllm_version, r["vllm"]))
            or (vllm_version is None and in_range(_newest_probe(), r["vllm"]))
        )
    ]
    for row in sorted(hand, key=specificity):  # stable: later rows of equal specificity win
        values.update({k: row[k] for k in CONSTANTS if k in row})
        used.append(row)
    fitted = [r for r in table if is_fitted(r) and _matches(r, **match)]
    specs = range_specs()
    own = specs.index(range_of(vllm_version))
    borrowed = []
    for key in CONSTANTS:
        # nearest range across the fewest boundaries that change this constant; older wins ties
        order = sorted(range(len(specs)), key=lambda i: (crossings(i, own, GROUPS[key]), abs(i - own), i > own))
        for i in order:
            rows = sorted((r for r in fitted if r.get("vllm") == specs[i] and key in r), key=specificity)
            if rows:
                values[key] = rows[-1][key]
                if rows[-1] not in used:
                    used.append(rows[-1])
                if i != own:
                    borrowed.append(f"{key} from vLLM {specs[i]}")
                break
    return Constants(values, tuple(row_id(r) for r in used), tuple(borrowed))


def _newest_probe() -> str:
    """A version inside the newest range: an unknown version means the newest behaviour."""
    return range_specs()[-1].lstrip(">=")


# --------------------------------------------------------------------------- activation model
@dataclass(frozen=True)
class ActivationFeatures:
    """The byte counts the activation model scales; calibrate fits its factors against them."""

    sampler: float  # max_num_seqs * vocab * 4 (one fp32 logits tensor)
    hidden: float  # max_num_batched_tokens * hidden
    forward: float  # tokens * (3 * intermediate/TP + 4 * hidden) * dtype bytes (MoE: shared experts only)
    moe: float = 0.0  # fused-MoE workspace: tokens * top_k * (3 * moe_intermediate/TP + hidden) * dtype bytes
    samples: bool = True  # False on a pipeline stage that does not run the sampler


def activation_features(
    facts: ModelFacts, *, tp: int, max_num_seqs: int, batched_tokens: int, dtype_bytes: int, pp: int = 1
) -> ActivationFeatures:
    # In a MoE layer the experts' intermediate activations are the fused-MoE workspace (counted
    # below); the forward branch keeps only the shared experts' MLP.
    inter = facts.shared_intermediate if facts.experts else facts.intermediate
    moe = 0.0
    # MXFP4 experts run through triton_kernels' matmul_ogs, which allocates no fused-MoE caches.
    if facts.experts and not (facts.quant is not None and facts.quant.method == "mxfp4"):
        moe = (
            min(batched_tokens, MOE_CHUNK_TOKENS)
            * facts.experts_per_token
            * (3 * facts.moe_intermediate / tp + facts.hidden)
            * float(dtype_bytes)
        )
    return ActivationFeatures(
        sampler=max_num_seqs * facts.vocab * 4.0,
        hidden=float(batched_tokens * facts.hidden),
        forward=batched_tokens * (3 * inter / tp + 4 * facts.hidden) * float(dtype_bytes),
        moe=moe,
        samples=pp == 1,
    )


def dense_peak(feat: ActivationFeatures, c: Constants) -> float:
    """The profile's peak before the MoE workspace and the family scale: sampler or forward pass."""
    forward = c.forward_factor * feat.forward
    if not feat.samples:
        return forward
    return max(c.sampler_factor * feat.sampler + c.hidden_bytes * feat.hidden, forward)


def activation_bytes(feat: ActivationFeatures, c: Constants) -> float:
    return c.activation_scale * dense_peak(feat, c) + c.moe_factor * feat.moe


# --------------------------------------------------------------------------- non-torch model
def non_torch_gib(c: Constants, *, tp: int, pp: int) -> float:
    """Per-GPU memory outside torch's allocator (CUDA context, cuBLAS workspaces, NCCL and custom
    all-reduce buffers): flat at TP 1, a step up at TP 2 (communicator buffers), a little more per
    doubling beyond; a TP 1 pipeline stage holds only the P2P buffers."""
    if tp > 1:
        return c.non_torch_gib + c.non_torch_tp_gib + c.non_torch_tp_step_gib * math.log2(tp / 2)
    if pp > 1:
        return c.non_torch_pp_gib
    return c.non_torch_gib
