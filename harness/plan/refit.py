"""Self-calibration: fit the calibration table's constants from measured runs, report
predicted-vs-measured errors, and raise drift alarms.

Samples come from cell records (results/*/*/record.json: `.facts` measured, `.plan` predicted)
or from observation files (plan_data/observations/*.json: public measurements, each with its source).
Three fits per vLLM version range (versions.range_specs): the activation model's factors
(dense sampler/forward branches, then the MoE workspace factor), the non-torch constants (TP 1
level, TP 2 step, growth per TP doubling, TP 1 pipeline stage) with the CUDA graph mean, and
per family the weight-layout factor.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.plan import calibration as cal
from harness.plan.devices import gpu_memory_gib
from harness.plan.engine_args import scheduler_defaults
from harness.plan.model import ModelFacts, model_facts
from harness.plan.planner import Plan, plan_model
from harness.plan.sources import resolve
from harness.plan.versions import range_of, range_specs
from harness.plan.weights import DTYPE_BYTES, GIB, runtime_dtype, weights_from_config
from harness.schema import CellRecord, EngineFacts

DRIFT_CONSTANT = 0.20  # a refit moving a range's constant by more than this raises an alarm
DRIFT_MIN_GIB = 0.1  # a GiB constant must also move by this much (0.005 -> 0.1 is noise, not drift)
DRIFT_KV = 0.05  # KV GiB prediction error above this raises an alarm
FITTED = cal.FITTED


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
    plan: Plan | dict[str, Any] | None = None  # the prediction stored next to the measurement
    origin: str = ""  # where the numbers are stated: a log's URL, a record's path
    dataset: str = ""  # the observation file (its `source` names the publication) or "results"

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
        out.append(
            Sample(
                label=rec.cell_id,
                model=rec.cell.model.source,
                gpu=rec.cell.gpu,
                args=dict(rec.cell.config.args),
                env=dict(rec.cell.config.env),
                facts=f,
                total_gib=f.total_gpu_memory_gib,
                vllm_version=f.vllm_version or rec.engine_version,
                plan=rec.plan,
                origin=str(path),
                dataset="results",
            )
        )
    return out


def samples_from_observations(path: Path) -> list[Sample]:
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for row in data["observations"]:
        out.append(
            Sample(
                label=row["label"],
                model=row["model"],
                gpu=row["gpu"],
                args=row.get("args", {}),
                env=row.get("env", {}),
                facts=EngineFacts.model_validate(row["measured"]),
                total_gib=row.get("total_gib"),
                vllm_version=row.get("vllm_version"),
                config=row.get("config"),
                origin=row.get("source") or f"{path.name}:{row['label']}",
                dataset=path.name,
            )
        )
    return out


def plan_sample(s: Sample, table: list[dict] | None, *, fixes: bool = False) -> Plan:
    total = s.total_gib if s.total_gib is not None else (None if s.platform == "cpu" else gpu_memory_gib(s.gpu))
    return plan_model(
        s.model_facts(),
        s.args,
        platform=s.platform,
        total_gib=total,
        env=s.env,
        gpu_name=s.gpu,
        vllm_version=s.vllm_version,
        table=table,
        search_fixes=fixes,
    )


# --------------------------------------------------------------------------- fitting
def _tp(s: Sample) -> int:
    return int(s.args.get("tensor_parallel_size") or 1)


def _pp(s: Sample) -> int:
    return int(s.args.get("pipeline_parallel_size") or 1)


def _features(s: Sample, facts: ModelFacts) -> cal.ActivationFeatures:
    tp, pp = _tp(s), _pp(s)
    seqs, tokens = scheduler_defaults(s.platform, s.total_gib, s.gpu, tp * pp)
    return cal.activation_features(
        facts,
        tp=tp,
        pp=pp,
        max_num_seqs=int(s.args.get("max_num_seqs") or seqs),
        batched_tokens=int(s.args.get("max_num_batched_tokens") or tokens),
        dtype_bytes=DTYPE_BYTES.get(runtime_dtype(facts, s.args.get("dtype")), 2),
    )


def _least_squares(pts: list[tuple[cal.ActivationFeatures, float]], prior: cal.Constants) -> dict[str, float]:
    """activation = k * sampler + c * hidden; two unknowns need two distinct points, with one
    c keeps its prior. A negative coefficient is fitted noise, not physics: fall back to k only."""
    if len({(f.sampler, f.hidden) for f, _ in pts}) >= 2:
        sxx = sum(f.sampler**2 for f, _ in pts)
        syy = sum(f.hidden**2 for f, _ in pts)
        sxy = sum(f.sampler * f.hidden for f, _ in pts)
        sxa = sum(f.sampler * a for f, a in pts)
        sya = sum(f.hidden * a for f, a in pts)
        det = sxx * syy - sxy**2
        if det > 0:
            k, c = (sxa * syy - sya * sxy) / det, (sya * sxx - sxa * sxy) / det
            if k > 0 and c >= 0:
                return {"sampler_factor": round(k, 4), "hidden_bytes": round(c, 4)}
    k = statistics.fmean((a - prior.hidden_bytes * f.hidden) / f.sampler for f, a in pts)
    return {"sampler_factor": round(k, 4)}


def _fit_dense(points: list[tuple[cal.ActivationFeatures, float]], prior: cal.Constants) -> dict[str, float]:
    """Fit the sampler branch on the points it explains, then forward_factor (mean ratio) on the
    points whose forward pass outweighs it (and on pipeline stages that do not sample); two
    rounds settle the split."""
    out: dict[str, float] = {}
    forward_factor = prior.forward_factor
    sampling = [(f, a) for f, a in points if f.samples]
    sampler_pts = list(sampling)
    for _ in range(2):
        if not sampler_pts:
            break
        out = _least_squares(sampler_pts, prior)
        c = cal.Constants({**prior.values, **out}, ())
        sampler_pts = [
            (f, a)
            for f, a in sampling
            if c.sampler_factor * f.sampler + c.hidden_bytes * f.hidden >= forward_factor * f.forward
        ]
    forward_pts = [(f, a) for f, a in points if (f, a) not in sampler_pts]
    if forward_pts:
        out["forward_factor"] = round(statistics.fmean(a / f.forward for f, a in forward_pts), 4)
    return out


def fit_activation(group: list[tuple[Sample, ModelFacts]], prior: cal.Constants) -> dict[str, Any]:
    """One range's activation factors: the dense peak from dense models, then moe_factor as the
    MoE runs' excess over that peak per byte of fused-MoE workspace."""
    points = [
        (_features(s, mf), s.facts.activation_peak_gib * GIB, bool(mf.experts))
        for s, mf in group
        if s.facts.activation_peak_gib is not None
    ]
    dense = [(f, a) for f, a, moe in points if not moe]
    out: dict[str, Any] = _fit_dense(dense, prior) if dense else {}
    c = cal.Constants({**prior.values, **out}, ())
    moe = [(f, a) for f, a, is_moe in points if is_moe and f.moe > 0]
    if moe:
        out["moe_factor"] = round(max(0.0, statistics.fmean((a - cal.dense_peak(f, c)) / f.moe for f, a in moe)), 4)
    if out:
        out["n"] = len(points)
    return out


def fit_non_torch(group: list[Sample]) -> dict[str, Any]:
    """One range's non-torch constants: the TP 1 level, the step at TP 2, the growth per doubling
    beyond, the TP 1 pipeline-stage level; and the mean CUDA graph memory."""

    def nt(pred) -> list[tuple[Sample, float]]:
        return [(s, s.facts.non_torch_gib) for s in group if s.facts.non_torch_gib is not None and pred(s)]

    out: dict[str, Any] = {}
    tp1 = nt(lambda s: _tp(s) == 1 and _pp(s) == 1)
    if tp1:
        out["non_torch_gib"] = round(statistics.fmean(v for _, v in tp1), 4)
    base = out.get("non_torch_gib")
    tp2 = nt(lambda s: _tp(s) == 2)
    if tp2 and base is not None:
        out["non_torch_tp_gib"] = round(statistics.fmean(v for _, v in tp2) - base, 4)
        wider = nt(lambda s: _tp(s) > 2)
        if wider:
            step = statistics.fmean((v - base - out["non_torch_tp_gib"]) / math.log2(_tp(s) / 2) for s, v in wider)
            out["non_torch_tp_step_gib"] = round(max(0.0, step), 4)
    pp = nt(lambda s: _tp(s) == 1 and _pp(s) > 1)
    if pp:
        out["non_torch_pp_gib"] = round(statistics.fmean(v for _, v in pp), 4)
    graphs = [s.facts.cuda_graph_gib for s in group if s.facts.cuda_graph_gib is not None]
    if graphs:
        out["cuda_graph_gib"] = round(statistics.fmean(graphs), 4)
    if out:
        out["n"] = len({id(s) for s, _ in tp1 + tp2 + pp}) or len(graphs)
    return out


def fit_weights(members: list[tuple[Sample, ModelFacts]]) -> dict[str, Any]:
    """A family's weight-layout factor: measured over config-derived weights (loading is
    deterministic, so one run is enough)."""
    ratios = []
    for s, mf in members:
        if s.facts.weights_gib is None:
            continue
        raw = (
            weights_from_config(
                mf,
                dtype=runtime_dtype(mf, s.args.get("dtype")),
                tp=_tp(s),
                pp=_pp(s),
                runtime_quant=s.args.get("quantization"),
            ).first_bytes
            / GIB
        )
        ratios.append(s.facts.weights_gib / raw)
    return {"weights_factor": round(statistics.fmean(ratios), 4), "n": len(ratios)} if ratios else {}


def fit(samples: list[Sample], base: list[dict]) -> list[dict]:
    """A new table: `base` with the fitted rows of every vLLM version range the GPU samples cover
    replaced by rows fitted from them: one activation row, one non-torch row, one weights row per
    family. Ranges without samples keep their rows."""
    by_range: dict[str, list[Sample]] = {}
    for s in samples:
        if s.platform == "cuda" and s.vllm_version:
            by_range.setdefault(range_of(s.vllm_version), []).append(s)
    kept = [r for r in base if not cal.is_fitted(r) or r.get("vllm") not in by_range]
    rows: list[dict] = []
    for spec in range_specs():
        group = by_range.get(spec)
        if not group:
            continue
        prepared = [(s, s.model_facts()) for s in group]
        head = {"family": "*", "vllm": spec, "platform": "cuda"}
        data = sorted({s.dataset for s in group if s.dataset})
        prior = cal.constants_for(kept, family="*", vllm_version=group[0].vllm_version)
        act = fit_activation(prepared, prior)
        if act:
            rows.append({**head, **act, "source": f"{cal.FITTED}: activation over {act['n']} runs", "data": data})
        nt = fit_non_torch(group)
        if nt:
            rows.append(
                {**head, **nt, "source": f"{cal.FITTED}: non-torch and CUDA graph over {len(group)} runs", "data": data}
            )
        by_family: dict[str, list[tuple[Sample, ModelFacts]]] = {}
        for s, mf in prepared:
            by_family.setdefault(mf.family, []).append((s, mf))
        for family, members in sorted(by_family.items()):
            w = fit_weights(members)
            if w:
                rows.append(
                    {
                        **head,
                        "family": family,
                        **w,
                        "source": f"{cal.FITTED}: weights of {w['n']} runs",
                        "data": sorted({s.dataset for s, _ in members if s.dataset}),
                    }
                )
    order = {spec: i for i, spec in enumerate(range_specs())}
    hand = [r for r in kept if not cal.is_fitted(r)]
    fitted = sorted([r for r in kept if cal.is_fitted(r)] + rows, key=lambda r: order.get(str(r.get("vllm")), -1))
    return hand + fitted


# --------------------------------------------------------------------------- errors and drift
@dataclass
class Comparison:
    label: str
    predicted: dict[str, float | None]
    measured: dict[str, float | None]
    errors: dict[str, float] = field(default_factory=dict)  # relative, signed


FIELDS = (
    ("weights_gib", "weights_gib"),
    ("activation_gib", "activation_peak_gib"),
    ("kv_cache_gib", "kv_cache_gib"),
    ("kv_cache_tokens", "kv_cache_tokens"),
    ("max_concurrency", "max_concurrency"),
)


def compare(s: Sample, plan: Plan | dict) -> Comparison:
    p = plan.model_dump() if isinstance(plan, Plan) else plan
    pred = {k: p.get(k) for k, _ in FIELDS}
    meas = {k: getattr(s.facts, m) for k, m in FIELDS}
    errors = {
        k: (pred[k] - meas[k]) / abs(meas[k]) for k, _ in FIELDS if pred[k] is not None and meas[k] not in (None, 0)
    }
    return Comparison(s.label, pred, meas, errors)


def drift_alarms(old: list[dict], new: list[dict]) -> list[str]:
    """Constants of a vLLM version range that moved more than 20% between the stored table and the
    refit: the records of that range no longer agree with what the planner was told."""
    alarms = []
    stored = {
        (r.get("vllm"), r.get("family", "*"), r.get("platform", "*"), k): r[k]
        for r in old
        if cal.is_fitted(r)
        for k in cal.CONSTANTS
        if k in r
    }
    for row in (r for r in new if cal.is_fitted(r)):
        for key in cal.CONSTANTS:
            a = stored.get((row.get("vllm"), row.get("family", "*"), row.get("platform", "*"), key))
            b = row.get(key)
            if (
                isinstance(a, (int, float))
                and isinstance(b, (int, float))
                and not isinstance(a, bool)
                and abs(a) > 1e-9
                and abs(b - a) / abs(a) > DRIFT_CONSTANT
                and not (key.endswith("_gib") and abs(b - a) < DRIFT_MIN_GIB)
            ):
                alarms.append(f"drift in vLLM range {row['vllm']}: {key} {a} -> {b} (family={row.get('family', '*')})")
    return alarms


def kv_alarms(comparisons: list[Comparison]) -> list[str]:
    return [
        f"KV error {c.errors['kv_cache_gib']:+.1%} on {c.label} (> {DRIFT_KV:.0%})"
        for c in comparisons
        if abs(c.errors.get("kv_cache_gib", 0.0)) > DRIFT_KV
    ]
