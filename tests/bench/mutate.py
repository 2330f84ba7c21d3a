"""Benchmark-style mutation score of the seams (`make mutate`, or `python -m tests.bench.mutate
[SEAM ...]`): mutmut mutates the functions where one stage's output is another's input, runs the
fast non-engine tests named in pyproject's [tool.mutmut] against each mutant, and this prints the
share killed per seam, the time taken, and the mutants marked equivalent (`# pragma: no mutate`
with a reason on the line). Not a test and not part of CI: a figure to read, one seam at a time
so the 2 shared cores are never flooded.

`--again` checks only what is not yet killed (after a test was added for a survivor, or code
changed: mutmut resets the results of every function whose code changed); without it every
mutant of the seam is checked.

A mutant counts as killed when a test failed or timed out on it; "no tests" (no selected test
reaches the function) counts as survived, since nothing would catch that bug either.

Equivalent mutants (no behaviour can tell them apart) are either whole lines marked
`# pragma: no mutate - reason` in the source, or single mutants listed in mutate_equivalents.txt
beside this file: `mutant-name | text of the mutated line | reason`. A listed mutant counts only
while its mutated code still contains that text, so a renumbered mutant is never excused.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EQUIVALENTS = Path(__file__).with_name("mutate_equivalents.txt")

# seam -> (source file, mutant-name patterns). A pattern names the functions that are the seam;
# the rest of a module (for example the Ray task body, the engine's start-up loop) is left to the
# engine tests.
SEAMS: dict[str, tuple[str, list[str]]] = {
    "store": ("harness/store.py", ["harness.store.*"]),
    "identity": ("harness/schema.py", ["harness.schema.x_cell_key__mutmut_*"]),
    "aggregate": ("harness/report/aggregate.py", ["harness.report.aggregate.*"]),
    "diff": ("harness/diff.py", ["harness.diff.*"]),
    "engine-flags": ("harness/engine/info.py", ["harness.engine.info.x_cli_flags__mutmut_*"]),
    "selectors": ("harness/host/selectors.py", ["harness.host.selectors.*"]),
    "placement": (
        "harness/run/cluster.py",
        ["harness.run.cluster.x_placement_problem__mutmut_*", "harness.run.cluster.x_devices_needed__mutmut_*"],
    ),
    "parse-to-record": (
        "harness/run/cell.py",
        ["harness.run.cell.x__judge__mutmut_*", "harness.run.cell.x__generated_tokens__mutmut_*"],
    ),
    "plan-to-record": ("harness/plan/__init__.py", ["harness.plan.x_plan_cell__mutmut_*"]),
    "resume": ("harness/run/cell.py", ["harness.run.cell.xǁCellRunnerǁkey__mutmut_*"]),
    "reaping": ("harness/engine/process.py", ["harness.engine.process.x_reap_stale__mutmut_*"]),
}
KILLED = {1, 3, 36, 37, 24, -24, 152, 255}  # test failure, pytest internal error, timeouts, type check
SPINNER = re.compile("[\u2800-\u28ff]")  # mutmut's progress spinner
PRAGMA = re.compile(r"#\s*pragma:\s*no mutate\W*(.*)$")


def run_seam(name: str, timeout_s: int, only: list[str] | None = None) -> float:
    """mutmut over the seam's mutants (or only the named ones); returns the seconds it took."""
    patterns = only or SEAMS[name][1]
    start = time.monotonic()
    # its own process group: a seam stopped at its time limit takes mutmut's workers with it
    proc = subprocess.Popen(
        [sys.executable, "-m", "mutmut", "run", *patterns],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        print(f"{name}: stopped after {timeout_s} s; the score counts what was checked", file=sys.stderr)
        return time.monotonic() - start
    if proc.returncode != 0:  # e.g. the clean test run failed: show why, without the spinner
        lines = [ln for ln in out.replace("\r", "\n").splitlines() if ln.strip() and not SPINNER.search(ln)]
        print("\n".join(lines[-30:]), file=sys.stderr)
    return time.monotonic() - start


def listed_equivalents(path: str) -> dict[str, str]:
    """mutate_equivalents.txt entries for one source file whose mutant still has the listed text."""
    mutated = ROOT / "mutants" / path
    bodies = {}
    if mutated.exists():
        text = mutated.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name:
                bodies[node.name] = "\n".join(lines[node.lineno - 1 : node.end_lineno])
    module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    out = {}
    for line in EQUIVALENTS.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, snippet, reason = (part.strip() for part in line.split("|", 2))
        if name.startswith(module + ".") and snippet in bodies.get(name[len(module) + 1 :], ""):
            out[name] = reason
    return out


def results(name: str) -> dict[str, int | None]:
    """The seam's mutants and their last exit codes (None: not checked since its code changed)."""
    path, patterns = SEAMS[name]
    meta = ROOT / "mutants" / (path + ".meta")
    codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    return {k: v for k, v in codes.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def not_killed(name: str) -> list[str]:
    """Mutants to check again: never checked, or survived and not excused as equivalent."""
    mine = results(name)
    excused = listed_equivalents(SEAMS[name][0])
    return sorted(k for k, v in mine.items() if v not in KILLED and not (v is not None and k in excused))


def run_again(name: str, timeout_s: int) -> float:
    """Check only what is not yet killed: the survivors, then any mutant the first pass left
    unchecked (mutmut resets the mutants of a function whose code changed). A kill stands while
    its function is unchanged, since tests are only ever added to kill a survivor."""
    took = 0.0
    for _ in range(2):
        todo = not_killed(name)
        if not todo or took >= timeout_s:
            break
        took += run_seam(name, int(timeout_s - took), todo)
    return took


def score(name: str) -> tuple[Counter, list[str], dict[str, str]]:
    path, _ = SEAMS[name]
    mine = results(name)
    excused = {k: r for k, r in listed_equivalents(path).items() if k in mine and mine[k] not in KILLED}
    counts = Counter(
        "killed" if v in KILLED else "not checked" if v is None else "equivalent" if k in excused else "survived"
        for k, v in mine.items()
    )
    survivors = sorted(k for k, v in mine.items() if v is not None and v not in KILLED and k not in excused)
    return counts, survivors, excused


def equivalents(path: str) -> list[str]:
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    return [
        f"{path}:{i}: {m.group(1).strip() or '(no reason given)'}"
        for i, line in enumerate(lines, 1)
        if (m := PRAGMA.search(line))
    ]


def main(argv: list[str]) -> int:
    again = "--again" in argv
    names = [a for a in argv if a != "--again"] or list(SEAMS)
    unknown = [n for n in names if n not in SEAMS]
    if unknown:
        print(f"error: unknown seam(s) {unknown}; known: {', '.join(SEAMS)}", file=sys.stderr)
        return 2
    timeout_s = int(os.environ.get("MUTATE_SEAM_TIMEOUT_S", "1800"))
    rows, total = [], 0.0
    for name in names:
        earlier = again and (ROOT / "mutants" / (SEAMS[name][0] + ".meta")).exists()
        took = run_again(name, timeout_s) if earlier else run_seam(name, timeout_s)
        total += took
        counts, survivors, excused = score(name)
        checked = counts["killed"] + counts["survived"]
        pct = 100.0 * counts["killed"] / checked if checked else 0.0
        rows.append((name, counts, pct, took))
        print(
            f"{name:16} {counts['killed']:4d}/{checked:<4d} killed  {pct:5.1f} %  ({took:5.0f} s)"
            + (f"  +{counts['equivalent']} equivalent" if counts["equivalent"] else "")
            + (f"  {counts['not checked']} not checked" if counts["not checked"] else ""),
            flush=True,
        )
        for s in survivors:
            print(f"    survived: {s}   (mutmut show {s})")
        for s, reason in sorted(excused.items()):
            print(f"    equivalent: {s}: {reason}")
    print(f"\ntotal {total / 60:.1f} min")
    print("\nequivalent mutants (marked `# pragma: no mutate`):")
    for path in sorted({SEAMS[n][0] for n in names}):
        for line in equivalents(path):
            print("   ", line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
