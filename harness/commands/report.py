"""`report [RUN...]`: result records -> Markdown reports, SVG plots and exports under reports/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.errors import InputError
from harness.report import render_reports
from harness.validate import out_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help="run ids or run folders whose run pages to rebuild (default: every run); "
        "the index, matrix, insights, device pages and exports always cover all runs",
    )
    parser.add_argument("--results", type=Path, default=Path("results"), help="results folder (default: results)")
    parser.add_argument("--reports", type=out_folder, default="reports", help="reports folder (default: reports)")


def main(args: argparse.Namespace) -> int:
    if not args.results.is_dir():
        raise InputError(
            f"--results {args.results}: no such folder (a fresh clone has an empty results/; "
            "the published runs under reports/data/runs are read as well)"
        )
    written = render_reports(
        args.results, args.reports, args.runs or None, warn=lambda line: print(line, file=sys.stderr)
    )
    print(f"{len(written)} files written under {args.reports}/ (start at {args.reports / 'README.md'})")
    return 0
