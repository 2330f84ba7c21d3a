"""`doctor`: check this box for the matrix before it runs; exit 1 when a check fails.

Prints one table (check, status, what was seen, remedy), then each failure and warning as one
line, so a CI log or a terminal shows the cause without the table's wrapping. `--json` prints
the rows instead; `--markdown FILE` appends the table to FILE (the job summary in CI).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

from harness.errors import InputError
from harness.redact import Redactor

STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--matrix", default="matrix.yaml", help="matrix file (default: matrix.yaml)")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument(
        "--fast", action="store_true", help="host, GPUs and engines only: no token or gated-access checks, no planning"
    )
    parser.add_argument("--results", default="results", help="results folder the run writes (default: results)")
    parser.add_argument(
        "--disk-reserve-gib",
        type=float,
        default=2.0,
        help="free space to keep besides the models' files: logs, records, caches (default: 2)",
    )
    parser.add_argument("--markdown", metavar="FILE", help="also append the table as Markdown to FILE")


def main(args: argparse.Namespace) -> int:
    if args.disk_reserve_gib < 0:
        raise InputError(f"--disk-reserve-gib: must be 0 or more, got {args.disk_reserve_gib:g}")
    from harness.doctor import diagnose, exit_code  # noqa: PLC0415 - heavy (hub client, planner): only when used
    from harness.matrix import load_matrix  # noqa: PLC0415

    matrix = load_matrix(args.matrix)
    rows = diagnose(matrix, results=Path(args.results), reserve_gib=args.disk_reserve_gib, fast=args.fast)
    # Belt and braces: no token reaches the terminal, a CI log or the job summary, whatever a library said.
    redactor = Redactor(env=os.environ)
    data = [redactor.redact_obj(r.model_dump()) for r in rows]
    code = exit_code(rows)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as fh:
            fh.write(markdown(data))
    if args.json:
        print(
            json.dumps(
                {"checks": data, "counts": dict(Counter(d["status"] for d in data)), "exit_code": code}, indent=2
            )
        )
        return code
    _table(data)
    return code


def _table(data: list[dict]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="harness doctor", show_lines=False)
    for col in ("area", "check", "status", "seen", "remedy"):
        table.add_column(col, overflow="fold")
    for d in data:
        table.add_row(d["area"], d["name"], f"[{STYLE[d['status']]}]{d['status']}[/]", d["seen"], d["remedy"])
    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((160, 24)).columns, 160)
    Console(width=width, highlight=False).print(table)
    counts = Counter(d["status"] for d in data)
    print(f"doctor: {counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail")
    for d in data:
        if d["status"] != "ok":
            fix = f" -> {d['remedy']}" if d["remedy"] else ""
            print(f"{d['status'].upper()} {d['area']}/{d['name']}: {d['seen']}{fix}")


def markdown(data: list[dict]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    icon = {"ok": "ok", "warn": "⚠️ warn", "fail": "❌ fail"}
    lines = ["## harness doctor", "", "| area | check | status | seen | remedy |", "|---|---|---|---|---|"]
    lines += [
        f"| {d['area']} | {cell(d['name'])} | {icon[d['status']]} | {cell(d['seen'])} | {cell(d['remedy'])} |"
        for d in data
    ]
    return "\n".join(lines) + "\n\n"
