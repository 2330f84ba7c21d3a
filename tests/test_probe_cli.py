"""`python -m harness probe`: flags, the design's JSON shape, bad input."""

import json

import pytest

from harness.cli import main
from harness.probes.stub import StubConfig, StubServer

LEVEL_KEYS = {"concurrency", "requests", "completed", "failed", "ttft_ms", "tpot_ms", "itl_ms",
              "e2el_ms", "request_throughput", "output_throughput", "total_token_throughput"}


def test_probe_json_has_the_design_shape(capsys):
    with StubServer(StubConfig(prompt_tokens=4)) as stub:
        rc = main(["probe", "--url", stub.url + "/v1", "--model", "stub", "--concurrency", "1,2",
                   "--requests", "4", "--input-tokens", "4", "--output-tokens", "3",
                   "--goodput", "ttft:500 tpot:50", "--no-ceiling", "--json"])
        assert stub.requests == 4 + 4 + 2  # two levels and the default warm-up
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 2]
    for lv in out["levels"]:
        assert LEVEL_KEYS <= set(lv)
        assert set(lv["ttft_ms"]) >= {"mean", "median", "p90", "p99"}
        assert lv["total_output_tokens"] == 12 and lv["request_goodput"] > 0
    assert out["profile"]["output_tokens"] == 3 and "client" in out


def test_probe_table_and_exit_code_when_nothing_completes(capsys):
    with StubServer(StubConfig(status=500)) as stub:
        rc = main(["probe", "--url", stub.url, "--model", "stub", "--concurrency", "1",
                   "--requests", "2", "--no-ceiling"])
    assert rc == 1
    assert "warmup_failed: HTTP 500" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["--url", "localhost:8000", "--model", "m"],
    ["--url", "http://127.0.0.1:1", "--model", "m", "--concurrency", "0"],
    ["--url", "http://127.0.0.1:1", "--model", "m", "--goodput", "ttft=5"],
    ["--url", "http://127.0.0.1:1", "--model", "m", "--concurrency", "a,b"],
])
def test_bad_input_exits_2(argv, capsys):
    try:
        rc = main(["probe", *argv])
    except SystemExit as exc:  # argparse rejects malformed values itself
        rc = exc.code
    assert rc == 2
    assert "error" in capsys.readouterr().err
