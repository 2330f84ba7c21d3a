"""matrix.yaml: validation with located one-line errors, expansion, include/exclude, engine args."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.errors import InputError
from harness.matrix import check_engine_args, load_matrix, select

BASE = """\
models:
  - model: Qwen/Qwen2.5-0.5B-Instruct
  - model: ./local-model
    tags: [tiny]
gpus: [cpu, H100]
configs:
  - name: small
    args: {gpu_memory_utilization: 0.5, max_model_len: 4096}
  - name: big
    args: {gpu_memory_utilization: 0.9}
    env: {VLLM_CPU_KVCACHE_SPACE: 1}
"""

ACTIONS = {
    "gpu_memory_utilization": {
        "flags": ["--gpu-memory-utilization"],
        "kind": "value",
        "type": "float",
        "choices": None,
    },
    "max_model_len": {
        "flags": ["--max-model-len"],
        "kind": "value",
        "type": "human_readable_int_or_auto",
        "choices": None,
    },
    "enforce_eager": {
        "flags": ["--enforce-eager", "--no-enforce-eager"],
        "kind": "bool_optional",
        "type": None,
        "choices": None,
    },
    "kv_cache_dtype": {"flags": ["--kv-cache-dtype"], "kind": "value", "type": "str", "choices": ["auto", "fp8"]},
    "tensor_parallel_size": {"flags": ["--tensor-parallel-size"], "kind": "value", "type": "int", "choices": None},
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "matrix.yaml"
    path.write_text(textwrap.dedent(text))
    (tmp_path / "local-model").mkdir(exist_ok=True)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(InputError) as info:
        load_matrix(write(tmp_path, text))
    return str(info.value)


def test_expands_models_gpus_configs(tmp_path):
    m = load_matrix(write(tmp_path, BASE))
    assert len(m.cells) == 2 * 2 * 2
    local = [c for c in m.cells if c.model.name == "local-model"][0]
    assert local.model.is_local and local.model.source == str((tmp_path / "local-model").resolve())
    hub = [c for c in m.cells if c.model.name == "Qwen2.5-0.5B-Instruct"][0]
    assert hub.model.source == "Qwen/Qwen2.5-0.5B-Instruct" and not hub.model.is_local
    big = [c for c in m.cells if c.config.name == "big"][0]
    assert big.config.env == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert len({c.cell_id for c in m.cells}) == len(m.cells)


def test_include_exclude_rules(tmp_path):
    m = load_matrix(
        write(
            tmp_path,
            BASE + "include:\n  - {tag: tiny, gpu: cpu}\n  - {gpu: H100}\n"
            "exclude:\n  - {config: big, model: 'Qwen*'}\n",
        )
    )
    ids = sorted(c.cell_id for c in m.cells)
    assert ids == sorted(
        [
            "local-model__cpu__small__default",
            "local-model__cpu__big__default",
            "local-model__H100__small__default",
            "local-model__H100__big__default",
            "Qwen2.5-0.5B-Instruct__H100__small__default",
        ]
    )
    assert [c.cell_id for c in select(m.cells, "*cpu__big*")] == ["local-model__cpu__big__default"]


def test_yaml_syntax_error_is_located(tmp_path):
    msg = error_of(tmp_path, "models:\n  - model: x/y\n gpus: [cpu\n")
    assert msg.startswith(f"{tmp_path / 'matrix.yaml'}:") and "YAML syntax error" in msg


def test_unknown_top_level_key_suggests(tmp_path):
    msg = error_of(tmp_path, BASE + "timeout: {ready_s: 5}\n")
    assert ":12:1:" in msg and "unknown key 'timeout'" in msg and "did you mean 'timeouts'" in msg


def test_unknown_model_key_suggests(tmp_path):
    msg = error_of(tmp_path, BASE.replace("    tags: [tiny]", "    tag: [tiny]"))
    assert ":4:5:" in msg and "models[1].tag" in msg and "did you mean 'tags'" in msg


def test_utilization_out_of_range(tmp_path):
    msg = error_of(tmp_path, BASE.replace("0.9}", "1.7}"))
    assert ":10:12:" in msg and "gpu_memory_utilization must be in (0, 1], got 1.7" in msg


def test_wrong_type(tmp_path):
    msg = error_of(tmp_path, BASE.replace("gpus: [cpu, H100]", "gpus: cpu"))
    assert ":5:7:" in msg and "gpus" in msg


def test_duplicate_names(tmp_path):
    msg = error_of(tmp_path, BASE.replace("name: big", "name: small"))
    assert ":9:5:" in msg and "duplicate name 'small'" in msg


def test_duplicate_yaml_key(tmp_path):
    msg = error_of(tmp_path, BASE.replace("max_model_len: 4096}", "max_model_len: 4096, max_model_len: 8}"))
    assert "appears twice" in msg


def test_runner_owned_args_refused(tmp_path):
    msg = error_of(tmp_path, BASE.replace("{gpu_memory_utilization: 0.9}", "{port: 8000}"))
    assert "port is set by the harness" in msg


def test_missing_section(tmp_path):
    msg = error_of(tmp_path, "models:\n  - model: a/b\ngpus: [cpu]\n")
    assert "configs: required key is missing" in msg


def test_engine_arg_did_you_mean(tmp_path):
    m = load_matrix(write(tmp_path, BASE.replace("gpu_memory_utilization: 0.9", "gpu_memory_utilisation: 0.9")))
    with pytest.raises(InputError) as info:
        check_engine_args(m, {"default": ACTIONS})
    msg = str(info.value)
    assert ":10:12:" in msg and "unknown engine argument 'gpu_memory_utilisation'" in msg
    assert "did you mean 'gpu_memory_utilization'" in msg


@pytest.mark.parametrize(
    "args, fragment",
    [
        ("{enforce_eager: 1}", "expects true or false"),
        ("{kv_cache_dtype: fp9}", "did you mean 'fp8'"),
        ("{tensor_parallel_size: 1.5}", "positive integer"),
    ],
)
def test_engine_arg_values(tmp_path, args, fragment):
    text = BASE.replace("{gpu_memory_utilization: 0.9}", args)
    try:
        m = load_matrix(write(tmp_path, text))
        check_engine_args(m, {"default": ACTIONS})
    except InputError as exc:
        assert fragment in str(exc)
    else:
        pytest.fail("accepted a bad value")


def test_cli_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, BASE.replace("0.9}", "1.7}"))
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "run", "--matrix", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ") and "matrix.yaml:10:12" in lines[0]


def test_default_matrix_has_the_four_cpu_cells():
    m = load_matrix(Path(__file__).parents[1] / "matrix.yaml")
    cpu = sorted(c.cell_id for c in m.cells if c.gpu == "cpu")
    assert cpu == sorted(
        [
            "tiny-chat__cpu__cpu__venv",
            "tiny-random__cpu__cpu__venv",
            "tiny-unsupported__cpu__cpu__venv",
            "tiny-chat__cpu__cpu-max-len-beyond-kv__venv",
            "tiny-chat__cpu__cpu__v0.31",
        ]
    )
    gpu_models = {c.model.source for c in m.cells if c.gpu != "cpu"}
    assert "meta-llama/Llama-3.1-8B-Instruct" in gpu_models and len(gpu_models) == 8


def test_ray_section(tmp_path):
    m = load_matrix(write(tmp_path, BASE + "ray: {address: 'head:6379', node_retries: 2}\n"))
    assert m.spec.ray.address == "head:6379" and m.spec.ray.node_retries == 2
    assert load_matrix(write(tmp_path, BASE)).spec.ray.address is None
    msg = error_of(tmp_path, BASE + "ray: {adress: auto}\n")
    assert ":12:" in msg and "ray.adress" in msg and "did you mean 'address'" in msg


def test_every_error_is_listed_at_once(tmp_path):
    text = (
        BASE.replace("gpu_memory_utilization: 0.9", "gpu_memory_utilization: 1.5")
        + "timeouts: {ready_s: -1}\nexclude: [{modle: x}]\n"
    )
    message = error_of(tmp_path, text)
    lines = message.splitlines()
    assert lines[0].endswith("2 problems:")  # the schema errors: timeouts and the misspelt key
    assert any("timeouts.ready_s" in line for line in lines) and any("'modle'" in line for line in lines)
    # once the schema holds, every range and duplicate problem comes together too
    text = (
        BASE.replace("gpu_memory_utilization: 0.9", "gpu_memory_utilization: 1.5").replace("name: big", "name: small")
        + "\n"
    )
    lines = error_of(tmp_path, text).splitlines()
    assert lines[0].endswith("2 problems:")
    assert any("duplicate name 'small'" in line for line in lines)
    assert any("gpu_memory_utilization must be in (0, 1]" in line for line in lines)
    for line in lines[1:]:  # each one located
        assert line.strip().startswith(str(tmp_path / "matrix.yaml") + ":")


def test_engine_arg_errors_are_listed_together(tmp_path):
    m = load_matrix(write(tmp_path, BASE.replace("max_model_len: 4096", "max_modle_len: 4096, kv_cache_dtype: fp4")))
    with pytest.raises(InputError) as info:
        check_engine_args(m, {"default": ACTIONS})
    text = str(info.value)
    assert "2 problems" in text and "did you mean 'max_model_len'" in text and "kv_cache_dtype" in text


def test_without_engines_the_projects_own_interpreter_runs_the_cells(tmp_path):
    elsewhere = tmp_path / "other" / "dir"
    elsewhere.mkdir(parents=True)
    m = load_matrix(write(elsewhere, BASE))
    assert {c.engine.python for c in m.cells} == {sys.executable}
