"""Prometheus text parsing and the vLLM metric helpers (old and new metric names)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.engine import metrics as vllm_metrics

V1_TEXT = r"""
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_cpu_blocks="None",num_gpu_blocks="27714",kv_cache_size_tokens="443424"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="m"} 3.0
vllm:num_preemptions_created{engine="0",model_name="m"} 1.7e9
vllm:num_preemptions_total{engine="1",model_name="m"} 2.0
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 160.0
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 320.0
# TYPE vllm:request_success counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 5.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 7.0
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 12.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 12.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.6
"""

V0_TEXT = """
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.125
# TYPE vllm:gpu_prefix_cache_hits counter
vllm:gpu_prefix_cache_hits_total{model_name="m"} 4
vllm:num_preemptions_total{model_name="m"} 1
process_start_time_seconds 1.7e9 1700000000000
"""


def test_parse_groups_suffixed_samples_into_declared_family():
    fams = vllm_metrics.parse(V1_TEXT)
    hist = fams["vllm:time_to_first_token_seconds"]
    assert hist.type == "histogram"
    assert {s.name for s in hist.samples} == {
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:time_to_first_token_seconds_count",
        "vllm:time_to_first_token_seconds_sum",
    }
    inf = [s for s in hist.samples if s.labels.get("le") == "+Inf"]
    assert inf[0].value == 12.0
    assert fams["vllm:kv_cache_usage_perc"].help.startswith("KV-cache usage")


def test_cache_config_info_labels():
    labels = vllm_metrics.cache_config_info(vllm_metrics.parse(V1_TEXT))
    assert labels["num_gpu_blocks"] == "27714"
    assert labels["block_size"] == "16"
    assert labels["num_cpu_blocks"] == "None"
    assert vllm_metrics.cache_config_info(vllm_metrics.parse(V0_TEXT)) is None


def test_snapshot_v1_sums_counters_and_takes_gauge_peak():
    snap = vllm_metrics.engine_snapshot(V1_TEXT)
    assert snap["num_preemptions"] == 5.0  # _created is not part of the counter
    assert snap["kv_cache_usage"] == 0.5
    assert snap["prefix_cache_hits"] == 160.0
    assert snap["prefix_cache_queries"] == 320.0
    assert snap["request_success"] == 12.0
    assert snap["generation_tokens"] is None


def test_snapshot_accepts_pre_0_12_names_and_untyped_samples():
    snap = vllm_metrics.engine_snapshot(V0_TEXT)
    assert snap["kv_cache_usage"] == 0.125
    assert snap["prefix_cache_hits"] == 4.0
    assert snap["num_preemptions"] == 1.0


def test_counter_deltas():
    before = vllm_metrics.engine_snapshot(V1_TEXT)
    after = vllm_metrics.engine_snapshot(V1_TEXT.replace("} 3.0", "} 10.0"))
    deltas = vllm_metrics.counter_deltas(before, after)
    assert deltas["num_preemptions"] == 7.0
    assert deltas["prefix_cache_hits"] == 0.0
    assert deltas["generation_tokens"] is None


def _ttft(count: float, total_s: float, engine: str = "0", name: str = "vllm:time_to_first_token_seconds") -> str:
    return (
        f'{name}_count{{engine="{engine}",model_name="m"}} {count}\n'
        f'{name}_sum{{engine="{engine}",model_name="m"}} {total_s}\n'
    )


def test_latency_means_are_the_servers_own_mean_over_the_interval():
    # Two engines (data parallel): sums and counts add up before dividing.
    before = vllm_metrics.engine_snapshot(_ttft(12, 0.6) + _ttft(3, 0.3, engine="1"))
    after = vllm_metrics.engine_snapshot(_ttft(20, 1.0) + _ttft(7, 0.9, engine="1"))
    means = vllm_metrics.latency_means(before, after)
    assert means["ttft"] == pytest.approx(1000 * (0.4 + 0.6) / (8 + 4))
    assert means["tpot"] is None and means["requests"] is None
    # Nothing observed in between: no mean rather than 0/0.
    assert vllm_metrics.latency_means(after, after)["ttft"] is None


def test_latency_means_read_the_pre_0_11_itl_name():
    old = "vllm:time_per_output_token_seconds"
    means = vllm_metrics.latency_means(
        vllm_metrics.engine_snapshot(_ttft(10, 0.1, name=old)), vllm_metrics.engine_snapshot(_ttft(110, 2.1, name=old))
    )
    assert means["itl"] == pytest.approx(20.0)


def test_special_values_and_timestamps():
    fams = vllm_metrics.parse('a NaN\nb{x="1"} -Inf 123\n')
    assert math.isnan(fams["a"].samples[0].value)
    assert fams["b"].samples[0].value == -math.inf


@pytest.mark.parametrize("line", ['m{x="1} 1', "m one", "m{x=1} 2"])
def test_malformed_lines_raise_with_line_number(line):
    with pytest.raises(ValueError, match="line 2"):
        vllm_metrics.parse("ok 1\n" + line + "\n")


_label_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,8}", fullmatch=True)
_label_values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@given(st.dictionaries(_label_names, _label_values, max_size=5), st.floats(allow_nan=False, allow_infinity=False))
def test_label_round_trip(labels, value):
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    text = f"# TYPE vllm:x gauge\nvllm:x{{{body}}} {value!r}\n"
    (sample,) = vllm_metrics.parse(text)["vllm:x"].samples
    assert sample.labels == labels
    assert sample.value == value
