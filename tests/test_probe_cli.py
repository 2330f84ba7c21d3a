"""`python -m harness probe`: flags, the design's JSON shape, capacity, bad input and servers
that cannot be probed (one line, exit 2)."""

import http.server
import json
import subprocess
import threading

import pytest
from conftest import ROOT, harness_cmd, harness_env

from harness.cli import main
from harness.probes.stub import StubConfig, StubProcess, StubServer

LEVEL_KEYS = {
    "concurrency",
    "requests",
    "completed",
    "failed",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2el_ms",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
}


def test_probe_json_has_the_design_shape(capsys):
    with StubServer(StubConfig(prompt_tokens=4)) as stub:
        rc = main(
            [
                "probe",
                "--url",
                stub.url + "/v1",
                "--model",
                "stub",
                "--concurrency",
                "1,2",
                "--requests",
                "4",
                "--input-tokens",
                "4",
                "--output-tokens",
                "3",
                "--goodput",
                "ttft:500 tpot:50",
                "--no-ceiling",
                "--json",
            ]
        )
        assert stub.requests == 4 + 4 + 2  # two levels and the default warm-up
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 2]
    for lv in out["levels"]:
        assert LEVEL_KEYS <= set(lv)
        assert set(lv["ttft_ms"]) >= {"mean", "median", "p90", "p99"}
        assert lv["total_output_tokens"] == 12 and lv["request_goodput"] > 0
    assert out["profile"]["output_tokens"] == 3 and "client" in out


# --------------------------------------------------------------------------- capacity
CAPACITY_KEYS = {"concurrency", "goodput_rps", "output_throughput", "tokens_per_s_per_user", "slo", "trace"}


@pytest.mark.timing
def test_capacity_at_a_ttft_objective_json(capsys):
    # TTFT = 100 ms + 40 ms per request in flight: 100 + 40 (c - 1) <= 320 ms up to c = 6.
    with StubProcess(StubConfig(ttft=0.1, ttft_step=0.04, itl=0.002)) as url:
        rc = main(
            [
                "probe",
                "--url",
                url,
                "--model",
                "stub",
                "--capacity",
                "--slo",
                "ttft_p99=320",
                "--requests",
                "1",
                "--rounds",
                "1",
                "--output-tokens",
                "4",
                "--no-ceiling",
                "--json",
            ]
        )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    cap = out["capacity"]
    assert CAPACITY_KEYS <= set(cap)
    trace = "; ".join(f"{t['concurrency']}: {t['reason']}" for t in cap["trace"])
    assert cap["concurrency"] == 6, trace
    assert cap["slo"] == {"ttft_p99_ms": 320.0}
    assert cap["goodput_rps"] > 0 and cap["output_throughput"] > 0
    assert cap["tokens_per_s_per_user"] > 0
    assert [t["concurrency"] for t in cap["trace"]] == [1, 2, 4, 8, 6, 7, 6]
    assert len(out["levels"]) == len(cap["trace"])
    assert out["profile"]["mode"] == "capacity"


@pytest.mark.timing
def test_capacity_table_and_capacity_zero_is_not_an_error(capsys):
    with StubServer(StubConfig(ttft=0.1)) as stub:
        rc = main(
            [
                "probe",
                "--url",
                stub.url,
                "--model",
                "stub",
                "--capacity",
                "--slo",
                "ttft_p99=50,tpot_p99=100",
                "--requests",
                "2",
                "--output-tokens",
                "3",
                "--no-ceiling",
            ]
        )
    assert rc == 0
    out = capsys.readouterr().out
    assert "capacity: 0 concurrent requests within ttft_p99_ms <= 50, tpot_p99_ms <= 100" in out
    assert "capacity 0: objectives missed at concurrency 1 (ttft_p99_ms" in out


@pytest.mark.timing
def test_rate_capacity_from_the_command_line(capsys):
    with StubServer(StubConfig(ttft=0.05, ttft_step=0.05)) as stub:
        rc = main(
            [
                "probe",
                "--url",
                stub.url,
                "--model",
                "stub",
                "--capacity",
                "rate",
                "--slo",
                "e2el_p90=400",
                "--start-rate",
                "4",
                "--max-rate",
                "8",
                "--requests",
                "8",
                "--output-tokens",
                "2",
                "--no-ceiling",
                "--json",
            ]
        )
    assert rc == 0
    cap = json.loads(capsys.readouterr().out)["capacity"]
    assert cap["search"] == "rate" and cap["concurrency"] is None
    assert cap["trace"][0]["request_rate"] == 4.0
    assert all(t["request_rate"] <= 8.0 for t in cap["trace"])


# --------------------------------------------------------------------------- unusable servers
class _HtmlHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = b"<html><body>not an API</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def html_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends


@pytest.mark.parametrize(
    "kind,fragment",
    [
        ("closed", "Connection refused"),
        ("http500", "answered HTTP 500"),
        ("html", "did not answer JSON"),
        ("wrong_model", "does not serve model 'other' (it serves: stub)"),
        ("failing", "every warm-up request failed: stream error: stub failure mid-stream"),
    ],
)
def test_unusable_server_is_one_line_and_exit_2(kind, fragment, html_server, capsys):
    argv = ["--model", "stub", "--concurrency", "1", "--requests", "2", "--no-ceiling"]
    if kind == "closed":
        rc = main(["probe", "--url", f"http://127.0.0.1:{_closed_port()}", *argv])
    elif kind == "html":
        rc = main(["probe", "--url", html_server, *argv])
    else:
        config = {"http500": StubConfig(status=500), "failing": StubConfig(error_after=0)}.get(kind, StubConfig())
        with StubServer(config) as stub:
            if kind == "wrong_model":
                argv[1] = "other"
            rc = main(["probe", "--url", stub.url, *argv])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: probe: server not usable: ")
    assert fragment in lines[0]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--url", "localhost:8000", "--model", "m"], "--url must start with http"),
        (["--url", "http://127.0.0.1:1", "--model", "m", "--concurrency", "0"], "concurrency levels"),
        (["--url", "http://127.0.0.1:1", "--model", "m", "--max-concurrency", "0"], "--max-concurrency"),
        (
            ["--url", "http://127.0.0.1:1", "--model", "m", "--tokenizer", "/nonexistent"],
            "no tokenizer.json in '/nonexistent'",
        ),
        (["--url", "http://127.0.0.1:1", "--model", "m", "--goodput", "ttft:-5"], "must be > 0"),
        (["--url", "http://127.0.0.1:1", "--model", "m", "--goodput", "ttft:nan"], "must be > 0"),
        (["--url", "http://127.0.0.1:1", "--model", "m", "--timeout", "0"], "--timeout"),
        (["--url", "http://127.0.0.1:1", "--model", "m", "--capacity"], "--capacity needs --slo"),
        (
            ["--url", "http://127.0.0.1:1", "--model", "m", "--capacity", "--slo", "ttft_p97=5"],
            "unknown objective 'ttft_p97'",
        ),
        (
            ["--url", "http://127.0.0.1:1", "--model", "m", "--capacity", "--slo", "latency=5"],
            "unknown objective 'latency'",
        ),
        (["--url", "http://127.0.0.1:1", "--model", "m", "--capacity", "--slo", "ttft_p99=0"], "must be > 0 ms"),
        (["--url", "http://127.0.0.1:1", "--model", "m", "--capacity", "--slo", "ttft_p99=-5"], "must be > 0 ms"),
        (["--url", "http://127.0.0.1:1", "--model", "m", "--capacity", "--slo", "ttft_p99"], "use e.g. ttft_p99=2000"),
        (["--url", "http://127.0.0.1:1", "--model", "m", "--slo", "ttft_p99=5"], "go with --capacity"),
        (
            ["--url", "http://127.0.0.1:1", "--model", "m", "--capacity", "--slo", "ttft_p99=5", "--budget", "-1"],
            "--budget",
        ),
        (
            [
                "--url",
                "http://127.0.0.1:1",
                "--model",
                "m",
                "--capacity",
                "--slo",
                "ttft_p99=5",
                "--concurrency",
                "1,2",
            ],
            "chooses its own levels",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys):
    rc = main(["probe", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: probe: ")
    assert fragment in err[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["--url", "http://127.0.0.1:1", "--model", "m", "--goodput", "ttft=5"],
        ["--url", "http://127.0.0.1:1", "--model", "m", "--concurrency", "a,b"],
        ["--url", "http://127.0.0.1:1", "--model", "m", "--capacity", "bogus", "--slo", "ttft_p99=5"],
    ],
)
def test_malformed_flags_exit_2(argv, capsys):
    assert main(["probe", *argv]) == 2  # argparse rejects malformed values itself: one line, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_no_traceback_from_the_console():
    proc = subprocess.run(
        harness_cmd("probe", "--url", "http://127.0.0.1:1", "--model", "m", "--capacity", "--slo", "ttft_p99=320"),
        capture_output=True,
        text=True,
        timeout=60,
        env=harness_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: probe: server not usable: cannot reach http://127.0.0.1:1/v1/models: [Errno 111] Connection refused"
    ]
