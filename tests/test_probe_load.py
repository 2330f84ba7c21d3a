"""The load generator against stubs with known timing and known faults (no vLLM needed)."""

import time

import pytest

from harness.probes.load import RequestResult, run_profile, summarize
from harness.probes.profiles import ProbeProfile
from harness.probes.stub import StubConfig, StubProcess, StubServer

NO_CEILING = {"measure_ceiling": False}


def _profile(**kw) -> ProbeProfile:
    base = dict(concurrency=[2], requests=6, warmup_requests=0, input_tokens=8, output_tokens=16)
    return ProbeProfile(**{**base, **kw})


def _run(url: str, profile: ProbeProfile, **kw) -> dict:
    return run_profile(url, "stub", None, profile, **{**NO_CEILING, **kw})


# --------------------------------------------------------------------------- timing
@pytest.mark.timing
@pytest.mark.parametrize("concurrency", [1, 8])
def test_medians_match_a_server_with_fixed_timing(concurrency):
    ttft, itl, out = 0.3, 0.05, 8
    # The stub runs in its own process so its clock is not disturbed by the client's GIL.
    with StubProcess(StubConfig(ttft=ttft, itl=itl)) as url:
        requests = 10 if concurrency == 1 else 16
        res = _run(
            url, _profile(concurrency=[concurrency], requests=requests, output_tokens=out, warmup_requests=concurrency)
        )
    (lv,) = res["levels"]
    assert lv["completed"] == lv["requests"] and lv["failed"] == 0
    # A 2-core box running an engine beside this wakes the stub or the client late now and then
    # (CI saw TTFT 157.6 ms for 150). Lateness only adds to a time measured from the request, so
    # TTFT and E2EL are held to the set time from below and given 5 % + 3 ms above. The stub keeps
    # each chunk to its own deadline, so a late chunk's next gap is short: ITL and TPOT get 5 %
    # either way. A wrong formula (TPOT over all tokens, not the n - 1 after the first: 81 ms
    # here; seconds for milliseconds) is further off than any of that.
    from_request = {"ttft_ms": ttft, "e2el_ms": ttft + itl * (out - 1)}
    for key, seconds in from_request.items():
        assert seconds * 1000 - 1 <= lv[key]["median"] <= seconds * 1000 * 1.05 + 3, key
    for key in ("tpot_ms", "itl_ms"):
        assert lv[key]["median"] == pytest.approx(itl * 1000, rel=0.05, abs=3), key
    assert lv["total_output_tokens"] == lv["requests"] * out


# --------------------------------------------------------------------------- token counts
@pytest.mark.parametrize(
    "usage,source,input_tokens", [("final", "usage", 54), ("in_last_chunk", "usage", 54), ("none", "chunks", None)]
)
def test_output_tokens_wherever_usage_is_sent(usage, source, input_tokens):
    with StubServer(StubConfig(usage=usage, prompt_tokens=9)) as stub:
        res = _run(stub.url, _profile(output_tokens=5))
    (lv,) = res["levels"]
    assert lv["completed"] == 6
    assert lv["total_output_tokens"] == 30
    assert lv["token_count_source"] == {source: 6}
    # From usage; unknown without usage or a tokenizer (word prompts).
    assert lv["total_input_tokens"] == input_tokens
    assert (lv["total_token_throughput"] is None) == (input_tokens is None)


def test_chat_endpoint():
    with StubServer(StubConfig(usage="in_last_chunk")) as stub:
        res = _run(stub.url, _profile(endpoint="chat", output_tokens=4))
    (lv,) = res["levels"]
    assert (lv["completed"], lv["total_output_tokens"]) == (6, 24)
    assert lv["itl_ms"]["median"] is not None


# --------------------------------------------------------------------------- faults
def test_error_event_mid_stream_fails_the_request_and_stops_the_level():
    with StubServer(StubConfig(error_after=3)) as stub:
        res = _run(stub.url, _profile(concurrency=[1, 2]))
    lv = res["levels"][0]
    assert lv["completed"] == 0 and lv["failed"] >= 1
    assert "stub failure mid-stream" in next(iter(lv["errors"]))
    assert lv["stop_reason"].startswith("errors")
    assert res["stop_reason"].startswith("errors") and len(res["levels"]) == 1


def test_connection_cut_mid_stream_is_an_error_not_a_hang():
    with StubServer(StubConfig(cut_after=2)) as stub:
        res = _run(stub.url, _profile(max_error_fraction=1.0), request_timeout=5)
    (lv,) = res["levels"]
    assert lv["failed"] == 6 and lv["completed"] == 0
    assert lv["output_throughput"] == 0


def test_silent_server_times_out_without_hanging():
    t0 = time.perf_counter()
    with StubServer(StubConfig(hang=True)) as stub:
        res = _run(stub.url, _profile(warmup_requests=1), request_timeout=0.5)
        assert res["levels"] == []
        assert res["stop_reason"].startswith("warmup_failed: timeout")
        res = _run(stub.url, _profile(max_error_fraction=1.0, requests=4), request_timeout=0.3)
    assert res["levels"][0]["failed"] == 4
    assert time.perf_counter() - t0 < 5


def test_http_error_status():
    with StubServer(StubConfig(status=503)) as stub:
        res = _run(stub.url, _profile())
    assert next(iter(res["levels"][0]["errors"])).startswith("HTTP 503")


@pytest.mark.parametrize("usage,source,tokens", [("final", "usage", 16), ("none", "words", 16)])
def test_non_streaming_server(usage, source, tokens):
    with StubServer(StubConfig(stream=False, usage=usage, itl=0.001)) as stub:
        res = _run(stub.url, _profile())
    (lv,) = res["levels"]
    assert lv["completed"] == 6 and lv["non_streaming_responses"] == 6
    assert lv["ttft_ms"]["median"] == lv["e2el_ms"]["median"]
    assert lv["tpot_ms"]["median"] is None and lv["itl_ms"]["median"] is None
    assert lv["total_output_tokens"] == 6 * tokens
    assert lv["token_count_source"] == {source: 6}


# --------------------------------------------------------------------------- profiles
def test_concurrency_is_held_and_warmup_excluded():
    with StubServer(StubConfig(ttft=0.02, itl=0.002)) as stub:
        res = _run(stub.url, _profile(concurrency=[4], requests=12, warmup_requests=3))
        assert stub.requests == 15
        assert stub.max_in_flight == 4
    (lv,) = res["levels"]
    assert lv["requests"] == 12 and lv["max_in_flight"] == 4
    assert res["warmup"] == {"requests": 3, "failed": 0}
    assert lv["server_metrics"]["deltas"]["request_success"] == 12


def test_rate_mode_respects_the_concurrency_cap():
    profile = _profile(mode="rate", request_rates=[500.0], requests=12, max_concurrency=2)
    with StubServer(StubConfig(ttft=0.02)) as stub:
        res = _run(stub.url, profile)
        assert stub.max_in_flight == 2
    (lv,) = res["levels"]
    assert lv["request_rate"] == 500.0 and lv["concurrency"] == 2 and lv["completed"] == 12


def test_ladder_stops_when_saturated():
    with StubServer() as stub:
        res = _run(stub.url, _profile(concurrency=[1, 2, 4], min_throughput_gain=100.0))
    assert len(res["levels"]) == 2
    assert res["stop_reason"].startswith("saturated")


def test_client_bound_flag_against_a_given_ceiling():
    with StubServer() as stub:
        low = _run(stub.url, _profile(), client_ceiling={"request_rate": 1.0, "chunk_rate": 1.0})
        high = _run(stub.url, _profile(), client_ceiling={"request_rate": 1e9, "chunk_rate": 1e9})
    assert low["levels"][0]["client_bound"] is True
    assert high["levels"][0]["client_bound"] is False


def test_levels_are_capped_by_kv_concurrency():
    assert ProbeProfile().capped(40.7).levels() == [1, 4, 16, 40]
    assert ProbeProfile().capped(16).levels() == [1, 4, 16]
    assert ProbeProfile.quick().levels() == [1, 4]
    assert ProbeProfile.quick(2.5).levels() == [1, 2]
    assert ProbeProfile.quick(0.4).levels() == [1]
    assert ProbeProfile.quick(100).levels() == [1, 4]
    assert ProbeProfile(requests=8, rounds=2).requests_for(16) == 32


@pytest.mark.parametrize("bad", [{"concurrency": [0]}, {"mode": "rate"}, {"goodput": {"itl": 5}}, {"output_tokens": 0}])
def test_profile_validation(bad):
    with pytest.raises(ValueError):
        ProbeProfile(**bad)


# --------------------------------------------------------------------------- metric math
def test_summarize_uses_vllm_bench_definitions():
    a = RequestResult(ok=True, ttft=0.1, latency=0.5, itl=[0.1, 0.1, 0.2], output_tokens=5, prompt_tokens=10)
    b = RequestResult(ok=True, ttft=0.3, latency=0.3, itl=[], output_tokens=1, prompt_tokens=10)
    c = RequestResult(ok=False, error="HTTP 500: x", prompt_tokens=10)
    lv = summarize([a, b, c], duration=2.0, goodput={"ttft": 200})
    assert (lv["completed"], lv["failed"]) == (2, 1)
    assert lv["tpot_ms"]["mean"] == pytest.approx(100.0)  # (0.5-0.1)/(5-1); b has 1 token
    assert lv["itl_ms"]["median"] == pytest.approx(100.0)
    assert lv["itl_ms"]["p90"] == pytest.approx(180.0)  # numpy linear: 0.1 + 0.8*(0.2-0.1)
    assert lv["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert lv["request_throughput"] == 1.0
    assert lv["output_throughput"] == 3.0  # failed requests add no tokens
    assert lv["total_token_throughput"] == 13.0
    assert lv["request_goodput"] == 0.5  # only a meets ttft <= 200 ms
    assert lv["errors"] == {"HTTP 500: x": 1}


def test_client_ceiling_against_the_stub_process():
    from harness.probes.load import measure_client_ceiling

    c = measure_client_ceiling(concurrency=8, requests=200, cached=False)
    assert c["failed"] == 0 and c["requests"] == 200
    assert c["request_rate"] > 50 and c["chunk_rate"] == pytest.approx(16 * c["request_rate"])
