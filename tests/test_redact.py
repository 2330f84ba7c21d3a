"""Secrets never reach stored logs, records or reports: plant tokens and look for them."""

from __future__ import annotations

from harness.redact import MASK, Redactor, redact_obj

HF = "hf_PlantedToken1234567890abcdef"


def test_hf_token_anywhere():
    r = Redactor()
    assert HF not in r.redact(f"(APIServer pid=1) INFO using token {HF} for download")
    assert HF not in r.redact(f"HF_TOKEN={HF}")


def test_api_key_flag_and_kwarg_and_header():
    r = Redactor()
    out = r.redact("vllm serve m --api-key sekrit-value-1 --port 8000")
    assert "sekrit-value-1" not in out and "--port 8000" in out
    assert "abc123xyz" not in r.redact("Namespace(api_key='abc123xyz', port=8000)")
    assert "sk-live-999" not in r.redact('headers: {"Authorization": "Bearer sk-live-999"}')
    assert "sk-live-999" not in r.redact("Authorization: Bearer sk-live-999")


def test_env_values_and_literal_secrets():
    env = {"HF_TOKEN": "tok-aaaa-bbbb", "MY_API_KEY": "zzzz-1234", "CLIENT_SECRET": "shh-shh-shh", "PATH": "/usr/bin"}
    r = Redactor(secrets=["planted-literal"], env=env)
    text = "a tok-aaaa-bbbb b zzzz-1234 c shh-shh-shh d planted-literal e /usr/bin"
    out = r.redact(text)
    for secret in ("tok-aaaa-bbbb", "zzzz-1234", "shh-shh-shh", "planted-literal"):
        assert secret not in out
    assert "/usr/bin" in out  # PATH is not a secret


def test_ordinary_log_lines_unchanged():
    r = Redactor()
    for line in [
        "INFO 10-03 10:15:52 [kv_cache_utils.py:1087] GPU KV cache size: 443,424 tokens",
        "max_num_batched_tokens=2048, tokenizer='/models/x', api_key=None",
        "non-default args: {'api_key': '***'}",
    ]:
        assert r.redact(line) == line


def test_redact_obj_records_and_argv():
    data = {
        "cell": {"config": {"args": {"api_key": "k-123456", "max_model_len": 4096}}},
        "command": ["vllm", "serve", "m", "--api-key", "k-123456", "--hf-token", HF],
        "note": f"token={HF}",
        "env": {"HF_TOKEN": HF},
    }
    out = redact_obj(data)
    flat = repr(out)
    assert "k-123456" not in flat and HF not in flat
    assert out["cell"]["config"]["args"]["max_model_len"] == 4096
    assert out["command"][:3] == ["vllm", "serve", "m"] and out["command"][4] == MASK


def test_redact_obj_keeps_token_counts():
    """Keys that count tokens are data, not secrets: only keys named as a secret are masked."""
    data = {
        "kv_cache_size_tokens": "524288",
        "cache_hit_alignment_tokens": "16",
        "argv": ["--max-num-batched-tokens", "2048", "--hf-token", "hf_abcdefghijkl"],
        "hf_token": "abcdefgh",
    }
    out = redact_obj(data)
    assert out["kv_cache_size_tokens"] == "524288" and out["cache_hit_alignment_tokens"] == "16"
    assert out["argv"] == ["--max-num-batched-tokens", "2048", "--hf-token", MASK]
    assert out["hf_token"] == MASK
