"""`diff RUN_A RUN_B`: the regression gate from run A to run B; exit 1 on any regression.

Runs are given by id or by folder, and are read from the run log: results/ and the published copy
under reports/data/runs (so the nightly job can diff against a run published from another
checkout). Prints Markdown (or JSON with --json) to stdout; --markdown FILE also writes the
Markdown there, for a CI job to attach. How changes are judged is documented in `harness.diff`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness.diff import HISTORY_RUNS, MAD_K, METRICS, MIN_HISTORY, UNJUDGED_SHOWN_BEYOND, Diff, diff_runs
from harness.errors import InputError
from harness.report import published_root
from harness.report.aggregate import Run, load
from harness.report.render import environment
from harness.validate import out_file, out_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A", help="the baseline run: its id, or its folder")
    parser.add_argument("run_b", metavar="RUN_B", help="the run to check against it: its id, or its folder")
    parser.add_argument("--results", type=out_folder, default="results", help="results folder (default: results)")
    parser.add_argument(
        "--reports",
        type=Path,
        default=Path("reports"),
        help="reports folder whose data/runs holds the published runs (default: reports)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--markdown", type=out_file, metavar="FILE", help="also write the Markdown report to FILE")


def _run(runs: dict[str, Run], name: str, where: str) -> Run:
    run_id = Path(name).name  # `results/<run-id>/` works as well as the bare id
    if run_id not in runs:
        known = ", ".join(sorted(runs)[-5:]) or "none"
        raise InputError(f"no run {name!r} under {where} (latest runs: {known})")
    return runs[run_id]


def render_markdown(diff: Diff) -> str:
    return (
        environment()
        .get_template("diff.md.j2")
        .render(
            diff=diff,
            metrics=METRICS,
            unjudged=UNJUDGED_SHOWN_BEYOND,
            rules={"min_history": MIN_HISTORY, "mad_k": MAD_K, "history_runs": HISTORY_RUNS},
        )
    )


def main(args: argparse.Namespace) -> int:
    roots = [args.results]
    for name in (args.run_a, args.run_b):  # a run folder given by path is read where it lies
        folder = Path(name)
        if folder.is_dir() and folder.parent not in roots:
            roots.append(folder.parent)
    roots.append(published_root(args.reports))
    results = load(roots)
    for problem in results.problems:
        print(f"warning: skipped {problem}", file=sys.stderr)
    runs = {run.run_id: run for run in results.runs}
    where = " or ".join(str(r) for r in roots)
    diff = diff_runs(_run(runs, args.run_a, where), _run(runs, args.run_b, where), results.runs)
    markdown = render_markdown(diff)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown, encoding="utf-8")
    print(
        json.dumps(diff.to_json(), indent=2, default=str) if args.json else markdown, end="" if not args.json else "\n"
    )
    return 1 if diff.regressions else 0
