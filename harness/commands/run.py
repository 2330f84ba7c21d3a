"""`run`: run the matrix cells selected for this host, then render the reports."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.engine import provision
from harness.errors import InputError
from harness.host.fingerprint import discover_host
from harness.matrix import check_engine_args, load_matrix, select
from harness.report import render_reports
from harness.run.cell import RunOptions
from harness.run.cluster import ClusterRun, ray_module
from harness.run.scheduler import Scheduler, check_placements
from harness.schema import RunManifest
from harness.validate import out_folder, text_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--matrix", default="matrix.yaml", type=text_file, help="matrix file (default: matrix.yaml)")
    parser.add_argument("--only", metavar="PATTERN", help="run only cells whose id matches (glob or substring)")
    parser.add_argument("--force", action="store_true", help="rerun cells already recorded with the same key")
    parser.add_argument("--json", action="store_true", help="print each finished record as one JSON line")
    parser.add_argument("--no-plan", action="store_true", help="start cells even when predicted not to fit")
    parser.add_argument(
        "--offline", action="store_true", default=None, help="use only the local HF cache (also when HF_HUB_OFFLINE=1)"
    )
    parser.add_argument("--results", default="results", type=out_folder, help="results folder (default: results)")
    parser.add_argument("--reports", default="reports", type=out_folder, help="reports folder (default: reports)")
    parser.add_argument("--no-report", action="store_true", help="do not render reports at the end")
    parser.add_argument("--progress", choices=["auto", "live", "plain", "quiet"], default="auto")
    parser.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="run each cell as a task on this Ray cluster (head host:port, or 'auto'; "
        "default: the matrix's ray.address); needs pip install '.[ray]'",
    )


def main(args: argparse.Namespace) -> int:
    execute(args)
    return 0


def execute(args: argparse.Namespace) -> RunManifest:
    """Run the matrix and render its reports; the run's manifest (also for `nightly`)."""
    matrix = load_matrix(args.matrix)
    ray_address = args.ray_address or matrix.spec.ray.address
    if ray_address:
        ray_module()  # a missing Ray is one line, before the slow engine inspection
    cells = select(matrix.cells, args.only)
    provision.ensure(c.engine for c in matrix.cells)  # engines named by vLLM release: built once, here
    if not cells:
        raise InputError(
            f"--only {args.only!r}: no cell of {args.matrix} matches (cell ids look like "
            f"{matrix.cells[0].cell_id if matrix.cells else 'model__gpu__config__engine'})"
        )
    host = discover_host(matrix)
    check_engine_args(matrix, host.arg_actions)
    if not ray_address:  # on a cluster, cells go to nodes with enough GPUs or are listed as not placed
        check_placements(matrix, host)
    options = RunOptions(
        results_dir=Path(args.results),
        force=args.force,
        plan=not args.no_plan,
        offline=args.offline,
        progress="quiet" if args.json else args.progress,
    )

    def emit(record) -> None:
        sys.stdout.write(record.model_dump_json() + "\n")
        sys.stdout.flush()

    runner: ClusterRun | Scheduler
    if ray_address:
        ray = matrix.spec.ray
        runner = ClusterRun(
            matrix,
            host,
            options,
            address=ray_address,
            resource_prefix=ray.resource_prefix,
            node_retries=ray.node_retries,
        )
    else:
        runner = Scheduler(matrix, host, options)
    manifest = runner.run(cells, emit=emit if args.json else None)
    if not args.no_report:
        render_reports(
            Path(args.results),
            Path(args.reports),
            runs=[manifest.run_id],
            warn=lambda line: print(line, file=sys.stderr),
        )
    return manifest
