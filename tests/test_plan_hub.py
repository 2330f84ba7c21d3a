"""`plan` of a Hub model that is neither cached nor in the catalog: config.json and the safetensors
headers come from the Hub (the real huggingface_hub client against the fake hub on 127.0.0.1),
by range requests, never the weights; an offline plan afterwards finds the same headers.

huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE at import, so every plan runs in a
subprocess with this test's environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoints import header_only_shard, llama_tensors
from conftest import ROOT, run_harness
from fakehub import FakeHub, FakeRepo

CATALOG = ROOT / "harness" / "plan_data" / "catalog"
LLAMA = json.loads((CATALOG / "meta-llama__Llama-3.1-8B-Instruct.json").read_text())


def sharded_checkpoint(config: dict, shards: int = 2) -> dict[str, bytes]:
    names = list(llama_tensors(config).items())
    files: dict[str, bytes] = {"config.json": json.dumps(config).encode()}
    weight_map = {}
    for k in range(shards):
        part = dict(names[k::shards])
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        files[fname] = header_only_shard(part)
        weight_map |= {n: fname for n in part}
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files


def plan(model: str, env: dict[str, str], *extra: str) -> tuple[dict, str]:
    """The plan's JSON and its notes, one string."""
    proc, _ = run_harness(
        ["plan", "--model", model, "--gpu", "H100", "--max-model-len", "16000", "--json", *extra], timeout=120, **env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    return result, "\n".join(result["notes"])


@pytest.fixture
def checkpoint() -> dict[str, bytes]:
    # Same shapes as Llama-3.1-8B, under a name the catalog does not have.
    return sharded_checkpoint({**LLAMA, "_name_or_path": "org/llama-8b-like"})


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_TOKEN": ""}


def test_hub_headers_give_the_same_weights_as_the_files_and_never_the_weights(tmp_path, checkpoint, env):
    local = tmp_path / "local"
    local.mkdir()
    for name, blob in checkpoint.items():
        (local / name).write_bytes(blob)
    from_files, _ = plan(str(local), env, "--tensor-parallel-size", "2")
    with FakeHub({"org/llama-8b-like": checkpoint}) as hub:
        from_hub, notes = plan(
            "org/llama-8b-like", {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}, "--tensor-parallel-size", "2"
        )
        shard_gets = [r for r in hub.file_downloads() if r.path.endswith(".safetensors") or r.path.startswith("/cdn/")]
    assert "config from hub" in notes
    assert from_hub["weights_gib"] == from_files["weights_gib"]
    assert from_hub["kv_cache_tokens"] == from_files["kv_cache_tokens"]
    # Llama-3.1-8B in bf16 at TP=2: vLLM logs 7.51 GiB per rank; the headers are exact, so within 1%.
    assert from_hub["weights_gib"] == pytest.approx(7.51, rel=0.01)
    assert shard_gets, "the shard headers were read from the hub"
    assert all(r.headers.get("range", "").startswith("bytes=") for r in shard_gets), "only ranges, never whole files"


def test_offline_plan_after_an_online_one_keeps_the_headers(checkpoint, env):
    with FakeHub({"org/llama-8b-like": checkpoint}) as hub:
        online, _ = plan("org/llama-8b-like", {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
    offline, notes = plan("org/llama-8b-like", {**env, "HF_HUB_OFFLINE": "1"})
    assert "config from hf-cache" in notes
    assert offline["weights_gib"] == online["weights_gib"]
    assert offline["kv_cache_tokens"] == online["kv_cache_tokens"]


def test_hub_errors_fall_back_to_the_catalog_or_say_what_was_tried(checkpoint, env):
    gated = FakeRepo(sharded_checkpoint(LLAMA), gated=True, granted=frozenset({"hf_granted_token_0123456789"}))
    with FakeHub({"meta-llama/Llama-3.1-8B-Instruct": gated}) as hub:
        hub_env = {**env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
        result, notes = plan("meta-llama/Llama-3.1-8B-Instruct", hub_env)
        assert "config from catalog" in notes and result["weights_gib"] > 14
        proc, _ = run_harness(["plan", "--model", "org/not-there", "--gpu", "H100"], timeout=120, **hub_env)
    assert proc.returncode == 2
    assert "org/not-there" in proc.stderr and "RepositoryNotFoundError" in proc.stderr, proc.stderr
