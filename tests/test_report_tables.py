"""Report number formats, evidence lines and table pruning."""

from __future__ import annotations

from harness.report.tables import evidence, gib, prune, seconds, tokens


def test_one_precision_per_unit():
    assert (gib(65.9651), seconds(31.68), tokens(527968.0)) == ("65.97", "31.7", "527,968")
    assert gib(None) == seconds(float("nan")) == tokens(None) == "—"


def test_evidence_is_the_message_not_the_raise_line():
    detail = (
        '  File "/vllm/config.py", line 12, in check\n    raise ValueError(\n'
        "[rank0]: (EngineCore pid=1) ValueError: Model architectures ['A'] failed"
    )
    assert evidence(detail) == "ValueError: Model architectures ['A'] failed"
    archs = ", ".join(f"'Arch{i}ForCausalLM'" for i in range(200))
    line = evidence(f"ValueError: not supported. Supported architectures: [{archs}]")
    assert "… 197 more]" in line and len(line) <= 160


def test_prune_drops_all_missing_columns_only():
    text = "intro\n| A | B | C |\n|---|--:|---|\n| x | — | 1 |\n| y | N/A | — |\nafter"
    assert prune(text) == "intro\n| A | C |\n|---|---|\n| x | 1 |\n| y | — |\nafter"
    escaped = "| A | B |\n|---|---|\n| a \\| b | — |"
    assert prune(escaped) == "| A |\n|---|\n| a \\| b |"
