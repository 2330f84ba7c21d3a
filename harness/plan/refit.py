"""Self-calibration: fit the calibration table's constants from measured runs, report
predicted-vs-measured errors, and raise drift alarms.

Samples come from cell records (results/*/*/record.json: `.facts` measured, `.plan` predicted)
or from observation files (plan_data/observations/*.json: public numbers such as seed 002).
Rows fitted: per vLLM minor x TP bucket (non-torch, CUDA graph memory), per vLLM minor (the
activation model's factors), per family x vLLM minor (weights_factor from one run on, since
weight loading is deterministic; activation_scale only from two runs on).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.plan import calibration as cal
from harness.plan.devices import gpu_memory_gib
from harness.plan.model import ModelFacts, model_facts
from harness.plan.planner import Plan, plan_model, scheduler_defaults
from harness.plan.sources import resolve
from harness.plan.versions import minor
from harness.plan.weights import DTYPE_BYTES, GIB, runtime_dtype, weights_from_config
from harness.schema import CellRecord, EngineFacts

DRIFT_CONSTANT = 0.20  # a new vLLM version moving a constant by more than this raises an alarm
DRIFT_KV = 0.05  # KV GiB prediction error above this raises an alarm
FITTED = "fit"  # rows whose source starts with this are owned (replaced) by calibrate


@dataclass
class Sample:
    """One measured engine start, whatever file it came from."""

    label: str
    model: str
    gpu: str
    args: dict[str, Any]
    env: dict[str, str]
    facts: EngineFacts
    total_gib: float | None = None
    vllm_version: str | None = None
    config: dict[str, Any] | None = None  # inline config (observations of local tiny models)
    plan: dict[str, Any] | None = None  # the prediction stored next to the measurement
    origin: str = ""

    @property
    def platform(self) -> str:
        return "cpu" if self.gpu.lower() == "cpu" else "cuda"

    def model_facts(self) -> ModelFacts:
        return model_facts(self.config if self.config is not None else resolve(self.model).config)


def samples_from_records(records: list[tuple[Path, CellRecord]]) -> list[Sample]:
    out = []
    for path, rec in records:
        if rec.facts is None:
            continue
        f = rec.facts
        out.append(Sample(label=rec.cell_id, model=rec.cell.model.source, gpu=rec.cell.gpu,
                          args=dict(rec.cell.config.args), env=dict(rec.cell.config.env), facts=f,
                          total_gib=f.total_gpu_memory_gib, vllm_version=f.vllm_version or rec.engine_version,
                          plan=rec.plan, origin=str(path)))
    return out


def samples_from_observations(path: Path) -> list[Sample]:
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for row in data["observations"]:
        out.append(Sample(label=row["label"], model=row["model"], gpu=row["gpu"], args=row.get("args", {}),
                          env=row.get("env", {}), facts=EngineFacts.model_validate(row["measured"]),
                          total_gib=row.get("total_gib"), vllm_version=row.get("vllm_version"),
                          config=row.get("config"), origin=f"{path.name}:{row['label']}"))
    return out


def plan_sample(s: Sample, table: list[dict] | None, *, fixes: bool = False) -> Plan:
    total = s.total_gib if s.total_gib is not None else (None if s.platform == "cpu" else gpu_memory_gib(s.gpu))
    return plan_model(s.model_facts(), s.args, platform=s.platform, total_gib=total, env=s.env, gpu_name=s.gpu,
                      vllm_version=s.vllm_version, table=table, search_fixes=fixes)


# --------------------------------------------------------------------------- fitting
def _features(s: Sample, facts: ModelFacts) -> cal.ActivationFeatures:
    tp = int(s.args.get("tensor_parallel_size") or 1)
    seqs, tokens = scheduler_defaults(s.platform, s.total_gib, s.gpu, tp)
    return cal.activation_features(facts, tp=tp, max_num_seqs=int(s.args.get("max_num_seqs") or seqs),
                                   batched_tokens=int(s.args.get("max_num_batched_tokens") or tokens),
                                   dtype_bytes=DTYPE_BYTES.get(runtime_dtype(facts, s.args.get("dtype")), 2))


def _least_squares(pts: list[tuple[cal.ActivationFeatures, float]], prior: cal.Constants) -> dict[str, float]:
    """activation = k * sampler + c * hidden; two unknowns need two distinct points, with one
    c keeps its prior. A negative coefficient is fitted noise, not physics: fall back to k only."""
    if len({(f.sampler, f.hidden) for f, _ in pts}) >= 2:
        sxx = sum(f.sampler ** 2 for f, _ in pts)
        syy = sum(f.hidden ** 2 for f, _ in pts)
        sxy = sum(f.sampler * f.hidden for f, _ in pts)
        sxa = sum(f.sampler * a for f, a in pts)
        sya = sum(f.hidden * a for f, a in pts)
        det = sxx * syy - sxy ** 2
        if det > 0:
            k, c = (sxa * syy - sya * sxy) / det, (sya * sxx - sxa * sxy) / det
            if k > 0 and c >= 0:
                return {"sampler_factor": round(k, 4), "hidden_bytes": round(c, 4)}
    k = statistics.fmean((a - prior.hidden_bytes * f.hidden) / f.sampler for f, a in pts)
    return {"sampler_factor": round(k, 4)}


def _fit_activation(points: list[tuple[cal.ActivationFeatures, float]], prior: cal.Constants) -> dict[str, float]:
    """Fit the sampler branch on the points it explains, then forward_factor (mean ratio) on the
    points whose forward pass outweighs the fitted sampler branch; two rounds settle the split."""
    out: dict[str, float] = {}
    forward_factor = prior.forward_factor
    sampler_pts = list(points)
    for _ in range(2):
        if not sampler_pts:
            break
        out = _least_squares(sampler_pts, prior)
        c = cal.Constants({**prior.values, **out}, ())
        sampler_pts = [(f, a) for f, a in points
                       if c.sampler_factor * f.sampler + c.hidden_bytes * f.hidden >= forward_factor * f.forward]
    forward_pts = [(f, a) for f, a in points if (f, a) not in sampler_pts]
    if forward_pts:
        out["forward_factor"] = round(statistics.fmean(a / f.forward for f, a in forward_pts), 4)
    return out


def fit(samples: list[Sample], base: list[dict]) -> list[dict]:
    """A new table: `base` rows not owned by calibrate, plus rows fitted from the GPU samples."""
    kept = [r for r in base if not str(r.get("source", "")).startswith(FITTED)]
    gpu = [s for s in samples if s.platform == "cuda" and s.vllm_version]
    by_minor: dict[str, list[Sample]] = {}
    for s in gpu:
        by_minor.setdefault(minor(s.vllm_version), []).append(s)
    rows: list[dict] = []
    for ver, group in sorted(by_minor.items()):
        vrange = f">={ver},<{ver.split('.')[0]}.{int(ver.split('.')[1]) + 1}"
        prior = cal.constants_for(kept, family="*", vllm_version=group[0].vllm_version)
        prepared = [(s, s.model_facts()) for s in group]
        points = [(_features(s, mf), s.facts.activation_peak_gib * GIB) for s, mf in prepared
                  if s.facts.activation_peak_gib is not None]
        act = _fit_activation(points, prior)
        if act:
            rows.append({"family": "*", "vllm": vrange, "platform": "cuda", **act,
                         "n": len(points), "source": f"{FITTED}: activation over {len(points)} runs"})
        for bucket, members in (("1", [s for s, _ in prepared if int(s.args.get("tensor_parallel_size") or 1) == 1]),
                                (">1", [s for s, _ in prepared if int(s.args.get("tensor_parallel_size") or 1) > 1])):
            nt = [s.facts.non_torch_gib for s in members if s.facts.non_torch_gib is not None]
            cg = [s.facts.cuda_graph_gib for s in members if s.facts.cuda_graph_gib is not None]
            if nt or cg:
                row = {"family": "*", "vllm": vrange, "platform": "cuda", "tp": bucket,
                       "n": max(len(nt), len(cg)), "source": f"{FITTED}: mean over {max(len(nt), len(cg))} runs"}
                if nt:
                    row["non_torch_gib"] = round(statistics.fmean(nt), 4)
                if cg:
                    row["cuda_graph_gib"] = round(statistics.fmean(cg), 4)
                rows.append(row)
        interim = kept + rows
        by_family: dict[str, list[tuple[Sample, ModelFacts]]] = {}
        for s, mf in prepared:
            by_family.setdefault(mf.family, []).append((s, mf))
        for family, members in sorted(by_family.items()):
            row: dict[str, Any] = {"family": family, "vllm": vrange, "platform": "cuda"}
            ratios = []
            for s, mf in members:
                if s.facts.weights_gib is None:
                    continue
                tp = int(s.args.get("tensor_parallel_size") or 1)
                raw = weights_from_config(mf, dtype=runtime_dtype(mf, s.args.get("dtype")), tp=tp,
                                          runtime_quant=s.args.get("quantization")).per_gpu_gib
                ratios.append(s.facts.weights_gib / raw)
            if ratios:
                row["weights_factor"] = round(statistics.fmean(ratios), 4)
            acts = []
            for s, mf in members:
                if s.facts.activation_peak_gib is None:
                    continue
                c = cal.constants_for(interim, family="*", vllm_version=s.vllm_version,
                                      tp=int(s.args.get("tensor_parallel_size") or 1))
                acts.append(s.facts.activation_peak_gib * GIB / cal.activation_bytes(_features(s, mf), c))
            if len(acts) >= 2:
                row["activation_scale"] = round(statistics.fmean(acts), 4)
            if len(row) > 3:
                row.update(n=len(members), source=f"{FITTED}: {len(members)} runs of family {family}")
                rows.append(row)
    return kept + rows


# --------------------------------------------------------------------------- errors and drift
@dataclass
class Comparison:
    label: str
    predicted: dict[str, float | None]
    measured: dict[str, float | None]
    errors: dict[str, float] = field(default_factory=dict)  # relative, signed


FIELDS = (("weights_gib", "weights_gib"), ("activation_gib", "activation_peak_gib"),
          ("kv_cache_gib", "kv_cache_gib"), ("kv_cache_tokens", "kv_cache_tokens"),
          ("max_concurrency", "max_concurrency"))


def compare(s: Sample, plan: Plan | dict) -> Comparison:
    p = plan.model_dump() if isinstance(plan, Plan) else plan
    pred = {k: p.get(k) for k, _ in FIELDS}
    meas = {k: getattr(s.facts, m) for k, m in FIELDS}
    errors = {k: (pred[k] - meas[k]) / abs(meas[k]) for k, _ in FIELDS
              if pred[k] is not None and meas[k] not in (None, 0)}
    return Comparison(s.label, pred, meas, errors)


def drift_alarms(old: list[dict], new: list[dict]) -> list[str]:
    """Constants that moved more than 20% between the newest earlier version's row and a newly
    fitted row of the same family/TP bucket."""
    alarms = []
    fitted = [r for r in new if str(r.get("source", "")).startswith(FITTED) and r not in old]
    for row in fitted:
        peers = [r for r in old if str(r.get("source", "")).startswith(FITTED) and r.get("vllm") != row.get("vllm")
                 and all(r.get(k, "*") == row.get(k, "*") for k in ("family", "platform", "tp"))]
        for peer in peers:
            for key in cal.CONSTANTS:
                a, b = peer.get(key), row.get(key)
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
                        and abs(a) > 1e-9 and abs(b - a) / abs(a) > DRIFT_CONSTANT:
                    alarms.append(f"drift: {key} {a} (vLLM {peer['vllm']}) -> {b} (vLLM {row['vllm']}), "
                                  f"family={row.get('family')} tp={row.get('tp', '*')}")
    return alarms


def kv_alarms(comparisons: list[Comparison]) -> list[str]:
    return [f"KV error {c.errors['kv_cache_gib']:+.1%} on {c.label} (> {DRIFT_KV:.0%})"
            for c in comparisons if abs(c.errors.get("kv_cache_gib", 0.0)) > DRIFT_KV]
