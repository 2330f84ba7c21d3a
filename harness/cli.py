"""Command line: `python -m harness <verb>` (also the `vllm-harness` console script).

Each verb lives in `harness/commands/<verb>.py`, exposing `add_arguments(parser)` and
`main(args) -> int`; verbs are imported only when used so `--help` and the light verbs
stay fast on a laptop without vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from harness import __version__
from harness.errors import InputError

VERBS: dict[str, str] = {
    "run": "run the matrix cells selected for this host (what `make matrix` calls)",
    "plan": "predict memory fit of cells, or of one model/config, without an engine",
    "probe": "latency/throughput probe against any OpenAI-compatible server",
    "parse-log": "engine log -> facts (memory breakdown, timings, failure class, remedy)",
    "ingest": "a folder of existing engine logs -> result records",
    "report": "result records -> Markdown reports (+ plots) under reports/",
    "diff": "regressions between two runs; exit code 1 when any",
    "nightly": "the nightly job: run the matrix, publish, diff against the last published run",
    "bisect": "first vLLM release between two where a cell's metric changed; exit 1 when none",
    "calibrate": "refit the planner's calibration table from all records",
    "build-models": "build the tiny models the CPU matrix uses",
    "doctor": "check this box for the matrix (GPUs, engines, disk, hub, fit); exit 1 when a check fails",
}


def _module(verb: str):
    return importlib.import_module(f"harness.commands.{verb.replace('-', '_')}")


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one located line (not argparse's usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(verbs: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m harness", description="vLLM compatibility-testing and benchmarking harness")
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, help_text in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verbs is None or verb in verbs:
            _module(verb).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = [a for a in argv if a in VERBS][:1]
    parser = build_parser(chosen)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad argument (one line, code 2)
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return int(_module(args.verb).main(args) or 0)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
