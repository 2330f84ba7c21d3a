"""`plan` verb: one model/config as JSON, flags of design.md "Plan", bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

from harness.cli import main

CATALOG = Path(__file__).resolve().parents[1] / "harness" / "plan_data" / "catalog"


def test_plan_verb_single_json(capsys):
    code = main(["plan", "--model", "RedHatAI/Llama-3.3-70B-Instruct-FP8-dynamic", "--gpu", "H100",
                 "--max-model-len", "16000", "--gpu-memory-utilization", "0.9", "--vllm-version", "0.11.0", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["fits"] is False and plan["suggestion"] == "tensor_parallel_size=2"
    for key in ("weights_gib", "activation_gib", "non_torch_gib", "cuda_graph_gib", "kv_cache_gib",
                "kv_cache_tokens", "max_concurrency", "fits", "reason", "suggestion"):
        assert key in plan


def test_plan_verb_config_and_params(tmp_path, capsys):
    cfg = CATALOG / "Qwen__Qwen3-0.6B.json"
    code = main(["plan", "--config", str(cfg), "--params", "6e8", "--gpu-memory-gib", "24",
                 "--gpu-memory-utilization", "0.5", "--max-model-len", "4096", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["fits"] is True and plan["weights_source"] == "safetensors-bytes"
    assert abs(plan["weights_gib"] - 6e8 * 2 / 2**30) < 0.02


def test_plan_verb_bad_input(capsys):
    assert main(["plan", "--config", "/nonexistent.json", "--gpu-memory-gib", "24"]) == 2
    assert main(["plan", "--model", "Qwen/Qwen3-0.6B"]) == 2  # no GPU memory known
    assert "error:" in capsys.readouterr().err
