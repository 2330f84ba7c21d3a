"""The pipeline's import rules (docs/architecture.md), checked on the source: each package imports
only the stages before it, and the harness process never imports vllm."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# unit -> the units it may import (a unit is a top-level module or package of harness/)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "redact": set(),
    "cache": set(),
    "schema": set(),
    "validate": {"errors"},
    "store": {"schema", "redact"},
    "matrix": {"schema", "errors", "probes", "engine"},  # probe profiles checked by their owner; releases resolved
    "engine": {"schema", "errors", "cache"},
    "host": {"schema", "errors", "engine", "matrix"},
    "parse": {"schema"},
    "plan": {"schema", "errors", "host", "cache"},
    "probes": {"schema", "errors", "engine"},
    "run": {
        "schema",
        "errors",
        "store",
        "matrix",
        "engine",
        "host",
        "parse",
        "plan",
        "probes",
        "redact",
        "diff",
        "report",
    },
    "ingest": {"schema", "errors", "parse", "redact", "store", "validate"},
    # ingest: only the public-log example builder; diff: the version table judges moves by the gate's rules
    "report": {"schema", "errors", "store", "ingest", "diff"},
    "diff": {"schema", "report"},
    "doctor": {"schema", "errors", "cache", "engine", "host", "matrix", "plan", "redact", "run"},
    "tinymodels": {"schema", "engine", "probes"},
    "cli": {"errors"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return None if parts[0] != "harness" else (parts[1] if len(parts) > 1 else "__init__")


def imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / "harness").rglob("*.py"):
        unit = _unit(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" if node.module == "harness" else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.split(".")[0] == "vllm" and path.name != "introspect.py":
                    found.setdefault(unit, set()).add("vllm")
                target = _unit(name)
                if target and target not in (unit, "__version__", "__init__"):
                    found.setdefault(unit, set()).add(target)
    return found


def test_each_stage_imports_only_what_comes_before_it():
    bad = {
        unit: sorted(targets - ALLOWED.get(unit, set()))
        for unit, targets in imports().items()
        if unit != "commands" and targets - ALLOWED.get(unit, set())
    }
    assert bad == {}, f"imports against docs/architecture.md: {bad}"


def test_the_harness_never_imports_vllm():
    assert not any("vllm" in targets for targets in imports().values())
