"""`python -m harness calibrate`: refit the planner's calibration table from every record
(results/*/*/record.json) and observation file, per vLLM version range (docs/plan.md), print
predicted-vs-measured errors, and raise drift alarms (exit code 1) naming the range whose
constant moved by more than 20% against the stored table, or a KV prediction off by more than 5%.
`--write` saves the refitted table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.errors import InputError
from harness.plan import calibration as cal
from harness.plan import refit
from harness.store import iter_records
from harness.validate import out_folder, text_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results", type=out_folder, help="results folder to read records from")
    p.add_argument(
        "--observations",
        action="append",
        default=[],
        type=text_file,
        help="extra observation JSON files (plan_data/observations format); repeatable",
    )
    p.add_argument("--table", type=text_file, help="calibration table to refit (default: the shipped one)")
    p.add_argument("--write", action="store_true", help="save the refitted table over --table")
    p.add_argument("--json", action="store_true")


def _fmt(err: float | None) -> str:
    return "-" if err is None else f"{err:+.1%}"


def main(args: argparse.Namespace) -> int:
    table_path = Path(args.table) if args.table else cal.default_table_path()
    try:
        old = json.loads(table_path.read_text(encoding="utf-8"))["rows"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"--table {table_path}: {exc}") from exc
    samples = refit.samples_from_records(list(iter_records(Path(args.results))))
    for obs in args.observations:
        try:
            samples += refit.samples_from_observations(Path(obs))
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"--observations {obs}: {exc}") from exc
    usable, skipped = [], []
    for s in samples:
        try:
            s.model_facts()
            usable.append(s)
        except (LookupError, ValueError, OSError) as exc:
            skipped.append(f"{s.label}: {exc}")
    new = refit.fit(usable, old)
    before = [refit.compare(s, s.plan) for s in usable if s.plan]  # what the runs were told
    after = [refit.compare(s, refit.plan_sample(s, new)) for s in usable]
    alarms = refit.drift_alarms(old, new) + refit.kv_alarms(after)
    if args.write:
        doc = json.loads(table_path.read_text(encoding="utf-8"))
        doc["rows"] = new
        table_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if args.json:
        print(
            json.dumps(
                {
                    "samples": len(usable),
                    "skipped": skipped,
                    "rows": new,
                    "stored_plan_errors": [c.__dict__ for c in before],
                    "refit_errors": [c.__dict__ for c in after],
                    "alarms": alarms,
                },
                indent=2,
            )
        )
    else:
        print(f"{len(usable)} measured runs ({len(skipped)} skipped: config not available offline)")
        print(f"{'run':44} {'weights':>8} {'act':>8} {'KV GiB':>8} {'tokens':>8} {'conc':>8}  (refit vs measured)")
        for c in after:
            e = c.errors
            print(
                f"{c.label[:44]:44} {_fmt(e.get('weights_gib')):>8} {_fmt(e.get('activation_gib')):>8} "
                f"{_fmt(e.get('kv_cache_gib')):>8} {_fmt(e.get('kv_cache_tokens')):>8} "
                f"{_fmt(e.get('max_concurrency')):>8}"
            )
        if before:
            kv = [abs(c.errors["kv_cache_gib"]) for c in before if "kv_cache_gib" in c.errors]
            if kv:
                print(f"stored predictions: KV GiB mean abs error {sum(kv) / len(kv):.1%} over {len(kv)} runs")
        for a in alarms:
            print(f"ALARM {a}")
        print(f"table {'written to' if args.write else 'not written (use --write):'} {table_path}")
    return 1 if alarms else 0
