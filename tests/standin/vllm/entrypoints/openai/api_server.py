"""A scripted stand-in for vLLM's OpenAI server, for runner tests that need what a real engine on
this GPU-less machine cannot give: many "GPU" cells at once, exact timing. Never used instead of
the real engine where the real one can answer (see tests/test_run_engine.py).

Put `tests/standin` first on PYTHONPATH and run `python -m vllm.entrypoints.openai.api_server`.
It prints vLLM-style startup lines, waits STANDIN_START_S, serves /health, /v1/models, /metrics
and chat/completions answering "4", and appends {cvd, start, end, pid, model} to STANDIN_TRACE at exit.
STANDIN_LOG_BYTES: that many bytes of DEBUG lines while "loading" (a chatty engine, a full disk).
STANDIN_SAY: one more line to print at start (what a leaky engine might log).
STANDIN_REPLAY: a file of a real engine's start-up lines to print instead of the version and KV
cache lines.
STANDIN_EXIT: exit with this code after the start-up lines (a start-up that failed).
STANDIN_CACHE_LABELS: more labels for /metrics' cache_config_info (newer vLLM's KV figures).
"""

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--served-model-name")
parser.add_argument("--host")
parser.add_argument("--port", type=int)
parser.add_argument("--api-key")
args, _ = parser.parse_known_args()
started = time.time()


def trace() -> None:
    path = os.environ.get("STANDIN_TRACE")
    if path:
        with open(path, "a") as fh:
            fh.write(
                json.dumps(
                    {
                        "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
                        "start": started,
                        "end": time.time(),
                        "pid": os.getpid(),
                        "model": args.served_model_name,
                    }
                )
                + "\n"
            )


def on_term(signum, frame):
    trace()
    sys.exit(0)


signal.signal(signal.SIGTERM, on_term)
if not os.environ.get("STANDIN_REPLAY"):  # a replayed log states its own version, or none
    print("INFO 11-22 10:00:00 [api_server.py:1] vLLM API server version 0.0.0-standin", flush=True)
if os.environ.get("STANDIN_SAY"):
    print("INFO 11-22 10:00:00 [api_server.py:2] " + os.environ["STANDIN_SAY"], flush=True)
time.sleep(float(os.environ.get("STANDIN_START_S", "1")))
for i in range(int(os.environ.get("STANDIN_LOG_BYTES", "0")) // 100):
    print(f"DEBUG 11-22 10:00:01 [loader.py:1] loading shard {i:>10} " + "." * 49, flush=False)
sys.stdout.flush()
if os.environ.get("STANDIN_REPLAY"):  # a real engine's start-up lines instead of the two below
    with open(os.environ["STANDIN_REPLAY"], encoding="utf-8") as fh:
        print(fh.read(), flush=True)
else:
    print("INFO 11-22 10:00:01 [kv_cache_utils.py:1] GPU KV cache size: 1,024 tokens", flush=True)
    print("INFO 11-22 10:00:01 [kv_cache_utils.py:2] Maximum concurrency for 256 tokens per request: 4.00x", flush=True)
if os.environ.get("STANDIN_EXIT"):  # an engine that fails its start-up, as the replayed log did
    trace()
    sys.exit(int(os.environ["STANDIN_EXIT"]))


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, body: bytes, ctype="application/json"):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/metrics":
            labels = ",".join(
                filter(None, ['block_size="16",num_gpu_blocks="64"', os.environ.get("STANDIN_CACHE_LABELS")])
            )
            self._send(f'vllm:cache_config_info{{{labels},engine="0"}} 1.0\n'.encode(), "text/plain")
        elif self.path == "/v1/models":
            self._send(json.dumps({"data": [{"id": args.served_model_name}]}).encode())
        else:
            self._send(b"")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hold = float(os.environ.get("STANDIN_ANSWER_S", "0"))
        time.sleep(hold)
        if "chat" in self.path:
            body = {"choices": [{"message": {"role": "assistant", "content": "4"}}]}
        else:
            body = {"choices": [{"text": " 4"}]}
        self._send(json.dumps(body).encode())


print("INFO 11-22 10:00:01 [launcher.py:1] Application startup complete.", flush=True)
ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
