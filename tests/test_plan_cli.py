"""`plan` verb: one model/config as JSON, flags of docs/plan.md, bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main

CATALOG = Path(__file__).resolve().parents[1] / "harness" / "plan_data" / "catalog"


def test_plan_verb_single_json(capsys):
    code = main(
        [
            "plan",
            "--model",
            "RedHatAI/Llama-3.3-70B-Instruct-FP8-dynamic",
            "--gpu",
            "H100",
            "--max-model-len",
            "16000",
            "--gpu-memory-utilization",
            "0.9",
            "--vllm-version",
            "0.11.0",
            "--json",
        ]
    )
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["fits"] is False and plan["suggestion"] == "tensor_parallel_size=2"
    for key in (
        "weights_gib",
        "activation_gib",
        "non_torch_gib",
        "cuda_graph_gib",
        "kv_cache_gib",
        "kv_cache_tokens",
        "max_concurrency",
        "fits",
        "reason",
        "suggestion",
    ):
        assert key in plan


def test_plan_verb_config_and_params(tmp_path, capsys):
    cfg = CATALOG / "Qwen__Qwen3-0.6B.json"
    code = main(
        [
            "plan",
            "--config",
            str(cfg),
            "--params",
            "6e8",
            "--gpu-memory-gib",
            "24",
            "--gpu-memory-utilization",
            "0.5",
            "--max-model-len",
            "4096",
            "--json",
        ]
    )
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["fits"] is True and plan["weights_source"] == "safetensors-bytes"
    assert abs(plan["weights_gib"] - 6e8 * 2 / 2**30) < 0.02


def test_plan_verb_bad_input(capsys):
    assert main(["plan", "--config", "/nonexistent.json", "--gpu-memory-gib", "24"]) == 2
    assert main(["plan", "--model", "Qwen/Qwen3-0.6B"]) == 2  # no GPU memory known
    assert "error:" in capsys.readouterr().err


BAD_FLAGS = [
    ["--tensor-parallel-size", "0"],
    ["--max-model-len", "0"],
    ["--max-model-len", "-5"],
    ["--gpu-memory-gib", "nan"],
    ["--gpu-memory-gib", "1e308"],
    ["--gpu-memory-gib", "-80"],
    ["--gpu-memory-utilization", "inf"],
    ["--gpu-memory-utilization", "2"],
    ["--gpu-memory-utilization", "-0.5"],
    ["--dtype", "float7"],
    ["--quantization", "nonsense"],
    ["--kv-cache-dtype", "fp7"],
    ["--max-num-seqs", "-3"],
    ["--max-num-batched-tokens", "0"],
    ["--params", "-5"],
    ["--safetensors-bytes", "nan"],
    ["--vllm-version", "banana"],
    ["--cpu-kvcache-space", "-2"],
    ["--gpu", "H300"],
]


@pytest.mark.parametrize("flags", BAD_FLAGS, ids=lambda f: " ".join(f))
def test_plan_bad_values_are_one_located_line(flags, capsys):
    argv = ["plan", "--config", str(CATALOG / "Qwen__Qwen3-0.6B.json")]
    if "--gpu" not in flags and "--gpu-memory-gib" not in flags:
        argv += ["--gpu", "H100"]
    assert main(argv + flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert flags[0] in err, err  # the line names the flag it refuses


def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _config_with(tmp_path: Path, **changes) -> Path:
    cfg = json.loads((CATALOG / "Qwen__Qwen3-0.6B.json").read_text())
    cfg.update(changes)
    return _write(tmp_path / "config.json", json.dumps(cfg))


@pytest.mark.parametrize(
    "make",
    [
        lambda d: _write(d / "array.json", "[1, 2]"),
        lambda d: _write(d / "text.json", "not json"),
        lambda d: _write(d / "binary.json", bytes(range(256)) * 4),
        lambda d: _config_with(d, num_attention_heads=0),
        lambda d: _config_with(d, num_hidden_layers=-3),
        lambda d: _config_with(d, num_key_value_heads=0),
        lambda d: _config_with(d, hidden_size="big"),
        lambda d: _config_with(d, vocab_size=None),
    ],
    ids=["array", "not-json", "binary", "heads-0", "layers-negative", "kv-heads-0", "hidden-string", "no-vocab"],
)
def test_plan_bad_configs_are_one_line(make, tmp_path, capsys):
    path = make(tmp_path)
    assert main(["plan", "--config", str(path), "--gpu", "H100"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and str(path) in err


ISSUE_GPUS = [
    "B200",
    "GB200",
    "H20",
    "L20",
    "MI300X",
    "MI325X",
    "MI355X",
    "RTX 5090",
    "RTX PRO 6000",
    "A10G",
    "L4",
    "L40S",
    "A100-40GB",
    "A100-80GB",
    "V100",
    "H100",
    "H200",
    "nvidia-rtx-pro-6000-x1",
]


@pytest.mark.parametrize("gpu", ISSUE_GPUS)
def test_plan_knows_the_gpus_users_run(gpu, capsys):
    assert main(["plan", "--model", "Qwen/Qwen3-0.6B", "--gpu", gpu, "--max-model-len", "4096", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is True and plan["total_memory_gib"] > 10


def test_unknown_gpu_names_the_closest_and_the_flag(capsys):
    assert main(["plan", "--model", "Qwen/Qwen3-0.6B", "--gpu", "H300"]) == 2
    err = capsys.readouterr().err
    assert "closest known: H100, H200" in err and "--gpu-memory-gib" in err


def test_docs_list_every_gpu_of_the_table():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "plan.md").read_text()
    table = json.loads((CATALOG.parent / "gpus.json").read_text())["gpus"]
    for row in table:
        assert f"| {row['name']}" in doc and f"| {row['memory_gib']} |" in doc, row["name"]
