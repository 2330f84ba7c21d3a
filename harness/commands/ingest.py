"""`ingest DIR [--gpu NAME] [--model ID] [--tp N]`: a folder of existing engine logs -> one run of
records (the work is in `harness.ingest`). Files that are not engine logs (empty, binary, or without
a line the parser knows) are named, skipped, and make no record."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.ingest import ingest_folder
from harness.validate import folder as folder_arg
from harness.validate import int_in, out_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir", type=folder_arg, help="folder of engine logs (*.log, *.txt, *.out, *.err; searched recursively)"
    )
    parser.add_argument("--results", type=out_folder, default="results", help="results folder (default: results)")
    parser.add_argument("--gpu", help="GPU name for logs that do not print one (e.g. H100)")
    parser.add_argument("--model", help="model (hub id or name) for logs that do not state it")
    parser.add_argument(
        "--tp", type=int_in(min=1), help="tensor-parallel size for logs that state neither it nor their ranks"
    )


def main(args: argparse.Namespace) -> int:
    ingest_folder(Path(args.dir), Path(args.results), {"gpu": args.gpu, "model": args.model, "tp": args.tp})
    return 0
