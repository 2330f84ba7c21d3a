"""`ingest DIR [--gpu NAME] [--model ID] [--tp N]`: a folder of existing engine logs -> one run of
records (the work is in `harness.ingest`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.errors import InputError
from harness.ingest import ingest_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="folder of engine logs (*.log, *.txt, *.out, *.err; searched recursively)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="results folder (default: results)")
    parser.add_argument("--gpu", help="GPU name for logs that do not print one (e.g. H100)")
    parser.add_argument("--model", help="model (hub id or name) for logs that do not state it")
    parser.add_argument("--tp", type=int, help="tensor-parallel size for logs that state neither it nor their ranks")


def main(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (give a folder of engine logs)")
    if args.tp is not None and args.tp < 1:
        raise InputError(f"--tp {args.tp}: the tensor-parallel size is at least 1")
    ingest_folder(folder, args.results, {"gpu": args.gpu, "model": args.model, "tp": args.tp})
    return 0
