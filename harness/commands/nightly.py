"""`nightly`: the nightly job's own steps in one verb, so CI and a test run the same code.

1. run the matrix (as `harness run`, reports rendered and the run published into reports/data/runs);
2. pick the baseline: `--baseline RUN`, else the newest published run from the same host (else from
   any host) that is not this run;
3. diff the new run against it with the cell history of every published run (`harness diff`);
4. write `OUT/diff.md` (the pull request body) and `OUT/outputs.env` (`run_id`, `baseline`,
   `regressions`, for the workflow's later steps);
5. exit 1 when the diff found regressions, 0 otherwise (2 on bad input, as every verb).

The workflow keeps only what needs GitHub: the pull request and the artifact upload.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from harness.commands import run as run_verb
from harness.commands.diff import render_markdown
from harness.diff import diff_runs
from harness.errors import InputError
from harness.report import published_root
from harness.report.aggregate import Run, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run_verb.add_arguments(parser)
    parser.add_argument(
        "--baseline", metavar="RUN", help="run to diff against (default: the newest published run of this host)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("nightly"),
        help="folder for diff.md (the PR body) and outputs.env (default: nightly)",
    )


def pick_baseline(runs: list[Run], new: Run, wanted: str | None) -> Run | None:
    if wanted:
        found = next((r for r in runs if r.run_id == Path(wanted).name), None)
        if found is None:
            raise InputError(f"--baseline {wanted}: no such run in results/ or the published runs")
        return found
    earlier = [r for r in runs if r.published and r.run_id < new.run_id and r.manifest and not r.interrupted]
    host = new.manifest.host.hostname if new.manifest else None
    same_host = [r for r in earlier if r.manifest and r.manifest.host.hostname == host]
    candidates = same_host or earlier
    return candidates[-1] if candidates else None


def main(args: argparse.Namespace) -> int:
    if args.no_report:
        raise InputError("nightly publishes the run: drop --no-report")
    args.out.mkdir(parents=True, exist_ok=True)
    published = published_root(Path(args.reports))
    before = {r.run_id for r in load([published]).runs}  # what was published before tonight
    manifest = run_verb.execute(args)
    results = load([Path(args.results), published])
    runs = [replace(r, published=r.run_id in before) for r in results.runs]
    new = next(r for r in runs if r.run_id == manifest.run_id)
    baseline = pick_baseline(runs, new, args.baseline)
    if baseline is None:
        body, regressions = f"# Nightly {new.run_id}\n\nNo earlier published run: nothing to diff.\n", False
    else:
        diff = diff_runs(baseline, new, runs)
        body, regressions = render_markdown(diff), bool(diff.regressions)
    (args.out / "diff.md").write_text(body, encoding="utf-8")
    (args.out / "outputs.env").write_text(
        f"run_id={new.run_id}\nbaseline={baseline.run_id if baseline else ''}\n"
        f"regressions={'true' if regressions else 'false'}\n",
        encoding="utf-8",
    )
    print(body)
    return 1 if regressions else 0
