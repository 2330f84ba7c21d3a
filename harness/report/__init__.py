"""Reports: result records -> Markdown pages, SVG plots and data exports under reports/.

`render_reports` is the one entry point: the runner calls it at the end of every run and the
`report` verb calls it on demand. Aggregation (pandas) lives in `aggregate`, computed insights
in `insights`, plots in `plots`, and the pages in `render` with one jinja2 template per page kind.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import InputError


def render_reports(results_dir: Path, reports_dir: Path, runs: list[str] | None = None) -> list[Path]:
    """Rebuild reports/ from results/: index, matrix, insights, device pages and exports always;
    run pages for `runs` (every run when None). Returns the files written, sorted."""
    # imported here: pandas and matplotlib cost a second, and `harness --help` should not pay it
    from harness.report.aggregate import load
    from harness.report.render import render_all

    results = load(Path(results_dir))
    if runs is not None:
        known = {run.run_id for run in results.runs}
        missing = [r for r in runs if r not in known]
        if missing:
            raise InputError(f"no run {', '.join(missing)} under {results_dir} (runs are its sub-folders)")
    return render_all(results, Path(reports_dir), runs)
