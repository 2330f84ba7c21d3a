"""harness.run.fetch against the real huggingface_hub client and a fake hub on 127.0.0.1.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import, so each fetch runs in
a fresh subprocess whose environment points at this test's fake hub and its own HF_HOME, exactly
as the runner gets them from the user's shell. That keeps tests independent (pytest-xdist safe) and
leaves the pytest process's huggingface_hub untouched.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fakehub import FakeHub, FakeRepo

from harness.run.fetch import FetchError, fetch_model, select_files
from harness.schema import ModelSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
GOOD_TOKEN = "hf_granted_0123456789abcdef"
OTHER_TOKEN = "hf_valid_but_not_granted_987"

TINY = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
    "generation_config.json": b"{}",
    "tokenizer.json": b'{"model": {}}',
    "tokenizer_config.json": b"{}",
    "chat_template.jinja": b"{{ messages }}",
    "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(4096),
    "README.md": b"# tiny",
    ".gitattributes": b"*.safetensors filter=lfs",
    "original/consolidated.00.pth": bytes(2048),
    "original/params.json": b"{}",
}
TINY_SELECTED = sorted(
    [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "model.safetensors",
    ]
)

# Runs fetch_model once per call description and prints one JSON result per line.
_CHILD = r"""
import json, sys, time
import harness.run.fetch
from harness.run.fetch import FetchError, OfflineMissing, fetch_model
from harness.schema import ModelSpec
for call in json.loads(sys.argv[1]):
    harness.run.fetch.PROGRESS_INTERVAL_S = call.get("interval", harness.run.fetch.PROGRESS_INTERVAL_S)
    lines = []
    started = time.monotonic()
    result = {}
    try:
        spec = ModelSpec(name="m", **call["spec"])
        info = fetch_model(spec, progress=lines.append, **call.get("kwargs", {}))
        result["info"] = info.model_dump()
    except FetchError as exc:
        result["error"] = {"type": "FetchError", "failure_class": exc.failure_class, "message": exc.message}
    except OfflineMissing as exc:
        result["error"] = {"type": "OfflineMissing", "message": exc.message}
    result["elapsed"] = time.monotonic() - started
    result["progress"] = lines
    print(json.dumps(result), flush=True)
"""


def fetch(env: dict[str, str], *calls: dict[str, Any]) -> list[dict[str, Any]]:
    """Run fetch_model in a fresh interpreter with `env`; one result dict per call."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(list(calls))],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for result in results:
        result["stderr"] = proc.stderr
    return results


def call(source: str, *, interval: float | None = None, **kwargs: Any) -> dict[str, Any]:
    spec = {"source": source}
    if "revision" in kwargs:
        spec["revision"] = kwargs.pop("revision")
    described: dict[str, Any] = {"spec": spec, "kwargs": kwargs}
    if interval is not None:
        described["interval"] = interval
    return described


@pytest.fixture
def hub():
    repos = {
        "org/tiny": TINY,
        "org/gated": FakeRepo(files=dict(TINY), gated=True, granted=frozenset({GOOD_TOKEN})),
    }
    with FakeHub(repos, tokens=frozenset({OTHER_TOKEN})) as running:
        yield running


@pytest.fixture
def env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return {
        **base,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "PYTHONPATH": str(REPO_ROOT),
    }


def snapshot(env: dict[str, str], repo: FakeRepo) -> Path:
    return Path(env["HF_HOME"]) / "hub" / "models--org--tiny" / "snapshots" / repo.sha


# --------------------------------------------------------------------------- selection rule
def test_select_files_keeps_what_vllm_reads():
    assert select_files(TINY) == TINY_SELECTED
    mistral = [
        "consolidated.safetensors",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "params.json",
        "tekken.json",
    ]
    assert select_files(mistral) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "params.json",
        "tekken.json",
    ]
    assert select_files(["consolidated.safetensors", "params.json"]) == [
        "consolidated.safetensors",
        "params.json",
    ]
    legacy = [
        "pytorch_model.bin",
        "config.json",
        "vocab.txt",
        "tf_model.h5",
        "flax_model.msgpack",
        "onnx/model.onnx",
    ]
    assert select_files(legacy) == ["config.json", "pytorch_model.bin", "vocab.txt"]
    both = ["model.safetensors", "pytorch_model.bin", "tokenizer.model", "qwen.tiktoken"]
    assert select_files(both) == ["model.safetensors", "qwen.tiktoken", "tokenizer.model"]
    remote = ["modeling_x.py", "config.json", "model.safetensors"]
    assert select_files(remote) == ["config.json", "model.safetensors"]
    assert select_files(remote, trust_remote_code=True) == [
        "config.json",
        "model.safetensors",
        "modeling_x.py",
    ]


# --------------------------------------------------------------------------- hub downloads
def test_download_resolves_sha_then_second_run_is_a_cache_hit(hub: FakeHub, env: dict[str, str]):
    repo = hub.repos["org/tiny"]
    (first,) = fetch(env, call("org/tiny"))
    info = first["info"]
    assert info["source"] == "hub"
    assert info["revision_sha"] == repo.sha
    assert info["bytes"] == sum(len(TINY[n]) for n in TINY_SELECTED)
    assert info["seconds"] > 0
    path = Path(info["path"])
    assert path == snapshot(env, repo)
    assert sorted(p.name for p in path.iterdir()) == TINY_SELECTED
    assert (path / "model.safetensors").read_bytes() == TINY["model.safetensors"]
    # The branch -> sha mapping is cached for later offline runs.
    assert (path.parents[1] / "refs" / "main").read_text() == repo.sha
    assert any(line.startswith(f"downloading org/tiny@{repo.sha[:7]}") for line in first["progress"])
    assert first["progress"][-1].startswith(f"downloaded org/tiny@{repo.sha[:7]}: 6 files")
    assert first["stderr"] == ""  # huggingface_hub's own progress bars stay quiet
    # Weights come from the "CDN" origin and never get the hub's Authorization header.
    cdn = [r for r in hub.file_downloads() if r.path.startswith("/cdn/")]
    assert len(cdn) == 1 and "authorization" not in cdn[0].headers

    hub.clear_log()
    (second,) = fetch(env, call("org/tiny"))
    assert second["info"]["source"] == "cache"
    assert second["info"]["revision_sha"] == repo.sha
    assert second["info"]["path"] == info["path"]
    assert second["info"]["bytes"] == info["bytes"]
    assert hub.file_downloads() == []
    assert not any(r.method == "HEAD" for r in hub.requests)
    assert second["progress"] == [f"org/tiny@{repo.sha[:7]} in cache: 6 files, 0.0 MB"]


def test_slow_download_reports_progress_while_it_runs(env: dict[str, str]):
    # Bigger than huggingface_hub's 10 MB write chunk, so a partial file exists during the pause.
    weights = bytes(24_000_000)
    with FakeHub({"org/slow": {"config.json": b"{}", "model.safetensors": weights}}, body_pause_s=1.5) as slow:
        (result,) = fetch({**env, "HF_ENDPOINT": slow.url}, call("org/slow", interval=0.2))
    label = f"org/slow@{slow.repos['org/slow'].sha[:7]}"
    lines = result["progress"]
    assert lines[0] == f"downloading {label}: 2 files, 24 MB (model: 2 files, 24 MB)"
    assert lines[-1].startswith(f"downloaded {label}: 2 files, 24 MB in ")
    during = [re.fullmatch(rf"downloading {label}: (\d)/2 files, ([\d.]+) MB / 24 MB", line) for line in lines[1:-1]]
    assert during and all(during)
    # The weights' first half is on disk while the hub pauses: in-flight bytes are counted.
    assert any(0 < float(m[2]) < 24 for m in during)
    assert result["info"]["bytes"] == len(weights) + 2


def test_revision_by_sha_and_unknown_revision(hub: FakeHub, env: dict[str, str]):
    sha = hub.repos["org/tiny"].sha
    pinned, unknown = fetch(env, call("org/tiny", revision=sha), call("org/tiny", revision="no-such-branch"))
    assert pinned["info"]["revision_sha"] == sha and pinned["info"]["source"] == "hub"
    assert unknown["error"]["failure_class"] == "model_not_found"
    assert "no-such-branch" in unknown["error"]["message"]


def test_missing_repo_fails_fast_with_model_not_found(hub: FakeHub, env: dict[str, str]):
    anonymous, authenticated = fetch(env, call("org/missing"), call("org/missing", token=OTHER_TOKEN))
    for result in (anonymous, authenticated):
        assert result["error"]["failure_class"] == "model_not_found"
        assert "org/missing was not found" in result["error"]["message"]
        assert result["elapsed"] < 5
    assert "set HF_TOKEN" in anonymous["error"]["message"]
    assert hub.file_downloads() == []


def test_gated_repo_without_token_fails_fast_without_downloading(hub: FakeHub, env: dict[str, str]):
    (result,) = fetch(env, call("org/gated"))
    assert result["error"]["failure_class"] == "gated_or_auth"
    assert (
        result["error"]["message"] == f"org/gated is gated: accept the licence at {hub.url}/org/gated and set HF_TOKEN"
    )
    assert result["elapsed"] < 5
    assert hub.file_downloads() == []


def test_gated_repo_with_granted_token(hub: FakeHub, env: dict[str, str]):
    (result,) = fetch(env, call("org/gated", token=GOOD_TOKEN))
    assert result["info"]["source"] == "hub"
    assert result["info"]["revision_sha"] == hub.repos["org/gated"].sha
    heads = [r for r in hub.requests if r.method == "HEAD" and "/resolve/" in r.path]
    assert heads and all(r.headers.get("authorization") == f"Bearer {GOOD_TOKEN}" for r in heads)
    assert GOOD_TOKEN not in json.dumps(result)


def test_hf_token_environment_is_honoured_and_never_shown(hub: FakeHub, env: dict[str, str], tmp_path: Path):
    (ok,) = fetch({**env, "HF_TOKEN": GOOD_TOKEN}, call("org/gated"))
    # An explicit token wins over HF_TOKEN (fresh cache: a cached gated model is served as is).
    fresh = {**env, "HF_TOKEN": GOOD_TOKEN, "HF_HOME": str(tmp_path / "other-home")}
    (denied,) = fetch(fresh, call("org/gated", token=OTHER_TOKEN))
    assert ok["info"]["source"] == "hub"
    assert denied["error"]["failure_class"] == "gated_or_auth"
    assert "token in use has no access" in denied["error"]["message"]
    assert GOOD_TOKEN not in json.dumps([ok, denied]) and OTHER_TOKEN not in json.dumps([ok, denied])


def test_invalid_token_is_an_auth_failure(hub: FakeHub, env: dict[str, str]):
    (result,) = fetch(env, call("org/tiny", token="hf_revoked_token_value"))
    assert result["error"]["failure_class"] == "gated_or_auth"
    assert "rejected the token" in result["error"]["message"]
    assert "hf_revoked_token_value" not in json.dumps(result)
    assert result["elapsed"] < 5


# --------------------------------------------------------------------------- offline and unreachable
def test_offline_uses_only_the_cache(hub: FakeHub, env: dict[str, str]):
    sha = hub.repos["org/tiny"].sha
    fetch(env, call("org/tiny"))
    hub.clear_log()
    offline_env = {**env, "HF_HUB_OFFLINE": "1"}
    cached, pinned, absent = fetch(offline_env, call("org/tiny"), call("org/tiny", revision=sha), call("org/gated"))
    for result in (cached, pinned):
        assert result["info"]["source"] == "cache"
        assert result["info"]["revision_sha"] == sha
        assert result["info"]["bytes"] == sum(len(TINY[n]) for n in TINY_SELECTED)
    assert absent["error"]["type"] == "OfflineMissing"
    assert "org/gated@main is not in the HF cache" in absent["error"]["message"]
    assert hub.requests == []


def test_offline_flag_overrides_environment_and_incomplete_snapshot_is_missing(hub: FakeHub, env: dict[str, str]):
    (first,) = fetch(env, call("org/tiny"))
    (Path(first["info"]["path"]) / "tokenizer.json").unlink()
    hub.clear_log()
    (result,) = fetch(env, call("org/tiny", offline=True))
    assert result["error"]["type"] == "OfflineMissing"
    assert hub.requests == []


def test_unreachable_hub_falls_back_to_a_complete_cache(hub: FakeHub, env: dict[str, str]):
    fetch(env, call("org/tiny"))
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{sock.getsockname()[1]}"}
        cached, absent = fetch(dead, call("org/tiny"), call("org/other"))
    assert cached["info"]["source"] == "cache"
    assert cached["info"]["revision_sha"] == hub.repos["org/tiny"].sha
    assert absent["error"]["failure_class"] == "other"
    assert "cannot reach" in absent["error"]["message"]
    assert cached["elapsed"] < 5 and absent["elapsed"] < 5


# --------------------------------------------------------------------------- local directories
def test_local_directory_is_used_in_place(tmp_path: Path):
    for name, content in TINY.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    info = fetch_model(ModelSpec(name="local", source=str(tmp_path)))
    assert info.source == "local" and info.path == str(tmp_path) and info.revision_sha is None
    assert info.bytes == sum(len(TINY[n]) for n in TINY_SELECTED)

    with pytest.raises(FetchError) as missing:
        fetch_model(ModelSpec(name="gone", source=str(tmp_path / "gone")))
    assert missing.value.failure_class == "model_not_found"
