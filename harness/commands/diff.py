"""`diff RUN_A RUN_B`: regressions and improvements from run A to run B; exit 1 on any regression.

Prints Markdown (or JSON with --json) to stdout; --markdown FILE also writes the Markdown there,
for a CI job to attach. Thresholds are documented in `harness.diff`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.diff import METRICS, diff_runs
from harness.errors import InputError
from harness.report.aggregate import Run, load
from harness.report.render import environment
from harness.validate import folder, out_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A", help="the baseline run id (a folder under --results)")
    parser.add_argument("run_b", metavar="RUN_B", help="the run to check against it")
    parser.add_argument("--results", type=folder, default="results", help="results folder (default: results)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--markdown", type=out_file, metavar="FILE", help="also write the Markdown report to FILE")


def _run(runs: dict[str, Run], name: str, results: Path) -> Run:
    run_id = Path(name).name  # `results/<run-id>/` works as well as the bare id
    if run_id not in runs:
        known = ", ".join(sorted(runs)[-5:]) or "none"
        raise InputError(f"no run {name!r} under {results} (latest runs: {known})")
    return runs[run_id]


def main(args: argparse.Namespace) -> int:
    runs = {run.run_id: run for run in load(args.results).runs}
    diff = diff_runs(_run(runs, args.run_a, args.results), _run(runs, args.run_b, args.results))
    markdown = environment().get_template("diff.md.j2").render(diff=diff, metrics=METRICS)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown, encoding="utf-8")
    print(json.dumps(diff.to_json(), indent=2, default=str) if args.json else markdown, end="" if not args.json else "\n")
    return 1 if diff.regressions else 0
