"""Reports: result records -> Markdown pages, SVG plots and data exports under reports/.

`render_reports` is the one entry point: the runner calls it at the end of every run and the
`report` verb calls it on demand. Aggregation (pandas) lives in `aggregate`, computed insights
in `insights`, plots in `plots`, and the pages in `render` with one jinja2 template per page kind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness.errors import InputError


def published_root(reports_dir: Path) -> Path:
    """The committed copy of every run's manifest and records: the reports' own database."""
    return Path(reports_dir) / "data" / "runs"


def render_reports(
    results_dir: Path, reports_dir: Path, runs: list[str] | None = None, warn: Callable[[str], None] | None = None
) -> list[Path]:
    """Publish the runs of results/ into reports/data/runs, then rebuild the pages from both:
    index, matrix, insights, device pages and exports always; run pages for `runs` (every run
    when None). Pages of runs that are only published are rebuilt, never deleted. Files the run
    log cannot read go to `warn`, one line each (and are counted on the index page). Returns the
    files written, sorted."""
    # imported here: pandas and matplotlib cost a second, and `harness --help` should not pay it
    from harness.report.aggregate import load
    from harness.report.render import render_all
    from harness.store import publish, read_runs

    published = published_root(reports_dir)
    written = publish(read_runs([Path(results_dir)]), published)
    results = load([Path(results_dir), published])
    for problem in results.problems:
        if warn is not None:
            warn(f"warning: skipped {problem}")
    if runs is not None:
        runs = [Path(r).name for r in runs]  # `results/<run-id>/` works as well as the bare id
        known = {run.run_id for run in results.runs}
        missing = [r for r in runs if r not in known]
        if missing:
            raise InputError(f"no run {', '.join(missing)} under {results_dir} or {published}")
    return sorted(set(written) | set(render_all(results, Path(reports_dir), runs)))
