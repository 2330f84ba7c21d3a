"""The calibration table: what the planner cannot derive from shapes alone (peak activation,
non-torch memory, CUDA graph memory, weight-layout overheads), as constants per architecture
family x vLLM version range x TP x enforce_eager, stored in plan_data/calibration.json.

Activation is modelled, not tabulated, so one table row covers every model of a family:
vLLM's profile run peaks either in the dummy sampler pass (logits for max_num_seqs rows of the
vocabulary in fp32, plus the prefill hidden states still alive) or in the dummy forward pass
(the MLP's intermediate activations for max_num_batched_tokens tokens):

    activation = max(sampler_factor * max_num_seqs * vocab * 4 + hidden_bytes * tokens * hidden,
                     forward_factor * tokens * (3 * intermediate/TP + 4 * hidden) * dtype_bytes)

Rows merge from least to most specific, so a family row may hold just the constants it changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from harness.plan.model import ModelFacts
from harness.plan.versions import in_range

GIB = 1 << 30
KEYS = ("family", "vllm", "platform", "tp", "enforce_eager")
CONSTANTS = ("sampler_factor", "hidden_bytes", "forward_factor", "activation_scale", "non_torch_gib",
             "cuda_graph_gib", "cuda_graph_in_budget", "weights_factor")
# Physical defaults used where no row says otherwise: one fp32 logits tensor, one bf16 hidden state.
DEFAULTS: dict[str, Any] = {"sampler_factor": 1.0, "hidden_bytes": 2.0, "forward_factor": 1.0,
                            "activation_scale": 1.0, "non_torch_gib": 0.0, "cuda_graph_gib": 0.0,
                            "cuda_graph_in_budget": False, "weights_factor": 1.0}


def default_table_path() -> Path:
    return Path(str(resources.files("harness.plan_data").joinpath("calibration.json")))


@lru_cache(maxsize=4)
def _load(path: str) -> tuple[dict, ...]:
    return tuple(json.loads(Path(path).read_text(encoding="utf-8"))["rows"])


def load_table(path: Path | None = None) -> list[dict]:
    return list(_load(str(path or default_table_path())))


def _tp_matches(spec: Any, tp: int) -> bool:
    spec = str(spec)
    if spec == "*":
        return True
    if spec.startswith(">"):
        return tp > int(spec[1:])
    return tp == int(spec)


def row_matches(row: dict, *, family: str, vllm_version: str | None, platform: str, tp: int,
                enforce_eager: bool) -> bool:
    return (row.get("family", "*") in ("*", family)
            and in_range(vllm_version, row.get("vllm", "*"))
            and row.get("platform", "*") in ("*", platform)
            and _tp_matches(row.get("tp", "*"), tp)
            and row.get("enforce_eager", "*") in ("*", enforce_eager))


def specificity(row: dict) -> int:
    return sum(1 for k in KEYS if row.get(k, "*") != "*")


@dataclass(frozen=True)
class Constants:
    values: dict[str, Any]
    rows: tuple[str, ...]  # ids of the rows that contributed, least specific first

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def row_id(row: dict) -> str:
    return "/".join(f"{k}={row.get(k, '*')}" for k in KEYS)


def constants_for(table: list[dict], *, family: str, vllm_version: str | None, platform: str = "cuda",
                  tp: int = 1, enforce_eager: bool = False) -> Constants:
    matching = [r for r in table if row_matches(r, family=family, vllm_version=vllm_version,
                                                 platform=platform, tp=tp, enforce_eager=enforce_eager)]
    matching.sort(key=specificity)  # stable: later rows of equal specificity win
    values = dict(DEFAULTS)
    for row in matching:
        values.update({k: row[k] for k in CONSTANTS if k in row})
    return Constants(values, tuple(row_id(r) for r in matching))


# --------------------------------------------------------------------------- activation model
@dataclass(frozen=True)
class ActivationFeatures:
    """The byte counts the activation model scales; calibrate fits its factors against them."""

    sampler: float  # max_num_seqs * vocab * 4 (one fp32 logits tensor)
    hidden: float  # max_num_batched_tokens * hidden
    forward: float  # tokens * (3 * intermediate/TP + 4 * hidden) * dtype bytes


def activation_features(facts: ModelFacts, *, tp: int, max_num_seqs: int, batched_tokens: int,
                        dtype_bytes: int) -> ActivationFeatures:
    inter = facts.experts_per_token * facts.moe_intermediate if facts.experts else facts.intermediate
    return ActivationFeatures(
        sampler=max_num_seqs * facts.vocab * 4.0,
        hidden=float(batched_tokens * facts.hidden),
        forward=batched_tokens * (3 * inter / tp + 4 * facts.hidden) * float(dtype_bytes),
    )


def activation_bytes(feat: ActivationFeatures, c: Constants) -> float:
    sampler_peak = c.sampler_factor * feat.sampler + c.hidden_bytes * feat.hidden
    forward_peak = c.forward_factor * feat.forward
    return c.activation_scale * max(sampler_peak, forward_peak)
