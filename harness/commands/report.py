"""`report [RUN...]`: result records -> Markdown reports, SVG plots and exports under reports/."""

from __future__ import annotations

import argparse

from harness.report import render_reports
from harness.validate import folder, out_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run ids whose run pages to rebuild (default: every run); "
                             "the index, matrix, insights, device pages and exports always cover all runs")
    parser.add_argument("--results", type=folder, default="results", help="results folder (default: results)")
    parser.add_argument("--reports", type=out_folder, default="reports", help="reports folder (default: reports)")


def main(args: argparse.Namespace) -> int:
    written = render_reports(args.results, args.reports, args.runs or None)
    print(f"{len(written)} files written under {args.reports}/ (start at {args.reports / 'README.md'})")
    return 0
