"""Benchmark: stream a ~100 MB synthetic engine log through parse_log_file and print the time
and peak memory (`python -m tests.bench.bench_parse [MB]`). Not a timed test: a figure to read.

The log is a real start-up (fixtures) followed by the lines that fill long-running logs: stats
lines, uvicorn access lines, DEBUG chatter, with the failure at the very end.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

from harness.parse import parse_log_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "logs"
FILLER = [
    "(APIServer pid=2310) INFO 10-03 10:20:01 [loggers.py:123] Engine 000: Avg prompt throughput: 1234.5 tokens/s, Avg generation throughput: 456.7 tokens/s, Running: 12 reqs, Waiting: 0 reqs, GPU KV cache usage: 3.2%, Prefix cache hit rate: 45.1%\n",
    'INFO:     127.0.0.1:40678 - "POST /v1/chat/completions HTTP/1.1" 200 OK\n',
    "(EngineCore_DP0 pid=2451) DEBUG 10-03 10:20:01 [v1/engine/core.py:800] EngineCore loop active.\n",
    "\x1b[1;36m(APIServer pid=2310)\x1b[0;0m INFO 10-03 10:20:02 [logger.py:43] Received request chatcmpl-8f2a: prompt: 'Summarise the following text in three sentences', params: SamplingParams(n=1, temperature=0.7, max_tokens=256)\n",
]


def build(path: Path, megabytes: int) -> int:
    head = (FIXTURES / "v0_11_debug_full_breakdown.log").read_text(encoding="utf-8")
    tail = (FIXTURES / "v0_11_omni_no_cache_blocks.log").read_text(encoding="utf-8")
    block = "".join(FILLER) * 256
    target = megabytes * 1024 * 1024
    with open(path, "w", encoding="utf-8") as out:
        out.write(head)
        written = len(head)
        while written < target:
            out.write(block)
            written += len(block)
        out.write(tail)
    return path.stat().st_size


def main(argv: list[str]) -> int:
    megabytes = int(argv[0]) if argv else 100
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "engine.log"
        size = build(path, megabytes)
        # peak RSS, not tracemalloc: tracing would double the time it measures
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        facts = parse_log_file(path)
        elapsed = time.perf_counter() - start
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert facts.failure_class == "kv_cache_insufficient" and facts.weights_gib == 14.9889
    print(
        f"parse_log_file: {size / 1e6:.0f} MB in {elapsed:.2f} s ({size / 1e6 / elapsed:.0f} MB/s), "
        f"peak RSS {rss_after / 1024:.0f} MB (grew {(rss_after - rss_before) / 1024:.1f} MB while parsing)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
