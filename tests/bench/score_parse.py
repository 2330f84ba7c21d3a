"""Score parse-log on the hand-checked log corpus: share of stated fields, outcomes and failure
classes it gets right (`python -m tests.bench.score_parse [-v]`). A figure to read, not a test.

Each `<name>.expected.json` states some keys; every stated key is one check:
  outcome        -> the outcome score        failure_class -> the class score (null included)
  everything else (numbers, version, platform, model, engine_args, evidence and remedy
  substrings) -> the field score.
Sets: the tuning corpus (tests/fixtures/logs), each held-back part (tests/fixtures/logs/heldout*,
kept out of the rules while they were written) and all together.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.parse import scan_file

LOGS = Path(__file__).resolve().parents[1] / "fixtures" / "logs"


@dataclass
class Score:
    fields: list[int] = field(default_factory=lambda: [0, 0])  # right, stated
    outcomes: list[int] = field(default_factory=lambda: [0, 0])
    classes: list[int] = field(default_factory=lambda: [0, 0])
    misses: list[str] = field(default_factory=list)

    def add(self, other: Score) -> None:
        for mine, theirs in (
            (self.fields, other.fields),
            (self.outcomes, other.outcomes),
            (self.classes, other.classes),
        ):
            mine[0] += theirs[0]
            mine[1] += theirs[1]
        self.misses += other.misses

    def line(self, name: str, logs: int) -> str:
        def pct(pair: list[int]) -> str:
            return f"{100 * pair[0] / pair[1]:.1f} % ({pair[0]}/{pair[1]})" if pair[1] else "n/a"

        return (
            f"{name:<12} {logs:>3} logs  fields {pct(self.fields):<20} outcomes {pct(self.outcomes):<18} "
            f"classes {pct(self.classes)}"
        )


def _check(score: Score, bucket: list[int], ok: bool, what: str) -> None:
    bucket[1] += 1
    if ok:
        bucket[0] += 1
    else:
        score.misses.append(what)


def score_case(expected_path: Path) -> Score:
    data = json.loads(expected_path.read_text(encoding="utf-8"))
    log = expected_path.with_name(expected_path.name.replace(".expected.json", ".log"))
    facts, config = scan_file(log)
    got = facts.model_dump()
    name = log.stem
    score = Score()
    for key, want in data["expected"].items():
        if key == "outcome":
            _check(score, score.outcomes, got["outcome"] == want, f"{name}: outcome {got['outcome']!r} != {want!r}")
        elif key == "failure_class":
            _check(
                score,
                score.classes,
                got["failure_class"] == want,
                f"{name}: class {got['failure_class']!r} != {want!r}",
            )
        elif key == "remedy_contains":
            for text in want:
                _check(
                    score,
                    score.fields,
                    text in (facts.remedy or ""),
                    f"{name}: remedy lacks {text!r}: {facts.remedy!r}",
                )
        elif key == "failure_evidence":
            _check(
                score,
                score.fields,
                want in (facts.failure_evidence or ""),
                f"{name}: evidence lacks {want!r}: {facts.failure_evidence!r}",
            )
        elif key == "model":
            _check(score, score.fields, config.model == want, f"{name}: model {config.model!r} != {want!r}")
        elif key == "engine_args":
            _check(score, score.fields, config.engine_args() == want, f"{name}: engine_args {config.engine_args()!r}")
        else:
            _check(score, score.fields, got.get(key) == want, f"{name}: {key} {got.get(key)!r} != {want!r}")
    return score


def score_dir(directory: Path) -> tuple[Score, int]:
    total = Score()
    cases = sorted(directory.glob("*.expected.json"))
    for case in cases:
        total.add(score_case(case))
    return total, len(cases)


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    whole = Score()
    rows = [("tuning", LOGS)] + [(d.name, d) for d in sorted(LOGS.glob("heldout*")) if d.is_dir()]
    total = 0
    for name, directory in rows:
        score, n = score_dir(directory)
        print(score.line(name, n))
        whole.add(score)
        total += n
    print(whole.line("whole", total))
    if verbose:
        for miss in whole.misses:
            print("  miss:", miss)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
