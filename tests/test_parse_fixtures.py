"""Every fixture under tests/fixtures/logs: <name>.log parsed, checked against the hand-checked
keys of <name>.expected.json (`remedy_contains`: substrings the remedy must hold; `model` and
`engine_args`: what `ingest` reads from the log)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.parse import parse_log, scan_file
from harness.schema import FAILURE_CLASSES

FIXTURES = Path(__file__).parent / "fixtures" / "logs"
# the held-back parts (heldout*/) were scored blind once (tests/bench/score_parse.py); since
# then they guard against regressions like the rest
CASES = sorted(FIXTURES.glob("*.expected.json")) + sorted(FIXTURES.glob("heldout*/*.expected.json"))


def _load(path: Path) -> tuple[Path, dict]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return path.with_name(path.name.replace(".expected.json", ".log")), data


def test_enough_fixtures_cover_every_failure_class():
    assert len(CASES) >= 40
    seen = {_load(p)[1]["expected"].get("failure_class") for p in CASES}
    # the harness's own verdicts, never in a log: a wrong answer, a full disk under results/
    wanted = set(FAILURE_CLASSES) - {"validation_failed", "disk_full"}
    assert wanted <= seen, wanted - seen


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name.removesuffix(".expected.json"))
def test_fixture(case: Path):
    log, data = _load(case)
    assert data.get("source"), "every fixture names its source"
    facts, config = scan_file(log)
    got = facts.model_dump()
    expected = dict(data["expected"])
    for text in expected.pop("remedy_contains", []):
        assert facts.remedy and text in facts.remedy, (text, facts.remedy)
    evidence = expected.pop("failure_evidence", None)
    if evidence:
        assert facts.failure_evidence and evidence in facts.failure_evidence
    if "model" in expected:
        assert config.model == expected.pop("model")
    if "engine_args" in expected:
        assert config.engine_args() == expected.pop("engine_args")
    for key, want in expected.items():
        assert got[key] == want, f"{key}: got {got[key]!r}, want {want!r}"
    if facts.failure_class:
        assert facts.failure_evidence and facts.remedy
    # the in-memory path reads the same facts as the streaming one
    assert parse_log(log.read_text(encoding="utf-8", errors="replace")) == facts
