"""`probe`: latency/throughput probe against any OpenAI-compatible server (a cell's or remote).

Builds a `ProbeProfile` from the flags, runs it with `harness.probes.load`, and prints either
the design's probe JSON (`--json`) or a table of medians per level. `--capacity --slo ...`
searches for the largest concurrency (or Poisson rate) within the objectives instead
(docs/probe.md). A server that cannot be probed (no answer, HTTP errors, not JSON, the model
not served, every warm-up request failing) is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from harness.errors import InputError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _goodput(text: str) -> dict[str, float]:
    """`ttft:500 tpot:50` (ms), the `vllm bench serve --goodput` syntax."""
    out = {}
    for item in text.replace(",", " ").split():
        key, sep, value = item.partition(":")
        try:
            out[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad goodput item {item!r}; use e.g. ttft:500") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"bad goodput item {item!r}; use e.g. ttft:500") from None
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name as the server serves it")
    p.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default: $OPENAI_API_KEY)"
    )
    p.add_argument("--concurrency", type=_int_list, help="ladder, e.g. 1,4,16 (default 1,4,16,64,256)")
    p.add_argument(
        "--request-rate", type=_float_list, help="Poisson request rates (req/s) instead of a concurrency ladder"
    )
    p.add_argument("--max-concurrency", type=int, help="cap on in-flight requests (KV limit)")
    p.add_argument("--requests", type=int, help="requests per level (at least rounds x concurrency)")
    p.add_argument("--rounds", type=int, help="each level runs at least rounds x concurrency requests (default 2)")
    p.add_argument("--input-tokens", type=int, help="prompt length in tokens (default 32)")
    p.add_argument("--output-tokens", type=int, help="output length in tokens (default 16)")
    p.add_argument("--endpoint", choices=["completions", "chat"], help="default completions")
    p.add_argument("--tokenizer", help="directory with tokenizer.json for exact prompt lengths")
    p.add_argument("--goodput", type=_goodput, help='SLOs in ms, e.g. "ttft:500 tpot:50"')
    p.add_argument(
        "--capacity",
        nargs="?",
        const="concurrency",
        choices=["concurrency", "rate"],
        help="search the largest concurrency (or, with `rate`, Poisson request rate) "
        "at which every --slo objective holds",
    )
    p.add_argument(
        "--slo",
        help="objectives in ms for --capacity, e.g. ttft_p99=2000,tpot_p99=100 "
        "(<ttft|tpot|e2el>_<mean|p50|p90|p95|p99>)",
    )
    p.add_argument("--budget", type=float, help="--capacity: time budget of the search, seconds (default 1800)")
    p.add_argument("--start-rate", type=float, help="--capacity rate: first rate, req/s (default 1)")
    p.add_argument("--max-rate", type=float, help="--capacity rate: ceiling, req/s (default 1000)")
    p.add_argument(
        "--no-ignore-eos", action="store_true", help="do not send vLLM's ignore_eos (for servers that reject it)"
    )
    p.add_argument("--quick", action="store_true", help="the matrix's quick profile")
    p.add_argument("--seed", type=int, help="prompt and arrival seed (default 0)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--max-level-seconds", type=float, help="stop issuing requests after this")
    p.add_argument(
        "--no-ceiling", action="store_true", help="skip measuring this client's own ceiling (no client_bound flags)"
    )
    p.add_argument("--json", action="store_true", help="print the probe JSON")


def build_profile(args: argparse.Namespace):
    from harness.probes import slo
    from harness.probes.profiles import ProbeProfile

    base = ProbeProfile.quick() if args.quick else ProbeProfile()
    update = {
        "concurrency": args.concurrency,
        "requests": args.requests,
        "rounds": args.rounds,
        "input_tokens": args.input_tokens,
        "output_tokens": args.output_tokens,
        "endpoint": args.endpoint,
        "goodput": args.goodput,
        "seed": args.seed,
        "max_level_seconds": args.max_level_seconds,
        "max_concurrency": args.max_concurrency,
    }
    fields = {k: v for k, v in update.items() if v is not None}
    if args.capacity:
        if args.request_rate or args.concurrency:
            raise InputError("probe: --capacity chooses its own levels; drop --concurrency/--request-rate")
        if not args.slo:
            raise InputError("probe: --capacity needs --slo, e.g. --slo ttft_p99=2000,tpot_p99=100")
        try:
            objectives = slo.parse_cli(args.slo)
        except ValueError as exc:
            raise InputError(f"probe: --slo: {exc}") from None
        fields.update(mode="capacity", name="capacity", search=args.capacity, slo=objectives)
        extra = {"budget_s": args.budget, "start_rate": args.start_rate, "max_rate": args.max_rate}
        fields.update({k: v for k, v in extra.items() if v is not None})
    elif args.slo or args.budget or args.start_rate or args.max_rate:
        raise InputError("probe: --slo, --budget, --start-rate and --max-rate go with --capacity")
    if args.request_rate:
        fields.update(mode="rate", request_rates=args.request_rate, name="rate")
    if args.no_ignore_eos:
        fields["ignore_eos"] = False
    try:
        # Re-validate: model_copy alone would skip the checks.
        return ProbeProfile.model_validate({**base.model_dump(), **fields})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "--" + "-".join(str(x) for x in first["loc"]).replace("_", "-") if first["loc"] else "profile"
        raise InputError(f"probe: {where}: {first['msg'].removeprefix('Value error, ')}") from None


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(result: dict, out=None) -> None:
    out = out or sys.stdout
    rate_mode = result["profile"]["mode"] == "rate"
    head = (
        "rate" if rate_mode else "conc",
        "done",
        "fail",
        "req/s",
        "out tok/s",
        "TTFT p50",
        "TPOT p50",
        "ITL p50",
        "E2EL p50",
        "TTFT p99",
        "stop",
    )
    rows = [head]
    for lv in result["levels"]:
        rows.append(
            (
                _fmt(lv.get("request_rate"), 2) if rate_mode else str(lv["concurrency"]),
                str(lv["completed"]),
                str(lv["failed"]),
                _fmt(lv["request_throughput"], 2),
                _fmt(lv["output_throughput"]),
                _fmt(lv["ttft_ms"]["median"]),
                _fmt(lv["tpot_ms"]["median"]),
                _fmt(lv["itl_ms"]["median"]),
                _fmt(lv["e2el_ms"]["median"]),
                _fmt(lv["ttft_ms"]["p99"]),
                lv["stop_reason"] + (" [client-bound]" if lv.get("client_bound") else ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.rjust(w) if i < len(head) - 1 else c for i, (c, w) in enumerate(zip(r, widths))), file=out)
    ceiling = result["client"].get("ceiling")
    if ceiling:
        print(
            f"client ceiling: {ceiling['request_rate']:.0f} req/s, "
            f"{ceiling['output_token_rate']:.0f} tok/s (zero-delay stub, concurrency "
            f"{ceiling['concurrency']})",
            file=out,
        )
    print(f"ms columns are medians; metric definitions: vllm bench serve. stop: {result['stop_reason']}", file=out)


def print_capacity(result: dict, out=None) -> None:
    out = out or sys.stdout
    cap = result["capacity"]
    rate = cap["search"] == "rate"
    head = (
        "step",
        "phase",
        "rate" if rate else "conc",
        "pass",
        "req/s",
        "goodput",
        "out tok/s",
        "tok/s/user",
        *cap["slo"],
        "why",
    )
    rows = [head]
    for t in cap["trace"]:
        rows.append(
            (
                str(t["step"]),
                t["phase"],
                _fmt(t["request_rate"], 2) if rate else str(t["concurrency"]),
                "yes" if t["passed"] else "no",
                _fmt(t["request_throughput"], 2),
                _fmt(t["goodput_rps"], 2),
                _fmt(t["output_throughput"]),
                _fmt(t["tokens_per_s_per_user"]),
                *(_fmt(t["observed"].get(k)) for k in cap["slo"]),
                t["reason"] if not t["passed"] else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.rjust(w) if i < len(head) - 1 else c for i, (c, w) in enumerate(zip(r, widths))), file=out)
    slo_text = ", ".join(f"{k} <= {v:g}" for k, v in cap["slo"].items())
    value = f"{cap['request_rate']:g} req/s" if rate else f"{cap['concurrency']} concurrent requests"
    print(
        f"capacity: {value} within {slo_text}"
        + ("" if cap["confirmed"] else " (not confirmed)")
        + (
            f"; goodput {cap['goodput_rps']:.2f} req/s, {cap['output_throughput']:.1f} output "
            f"tok/s, {_fmt(cap['tokens_per_s_per_user'])} tok/s per user"
            if cap["goodput_rps"] is not None
            else ""
        ),
        file=out,
    )
    print(f"{cap['levels_measured']} levels in {cap['duration_s']:.1f} s; {cap['stop_reason']}", file=out)


def _check_flags(args: argparse.Namespace) -> None:
    if not args.url.startswith(("http://", "https://")):
        raise InputError(f"probe: --url must start with http:// or https://, got {args.url!r}")
    for flag in ("timeout", "budget", "max_level_seconds", "start_rate", "max_rate"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"probe: --{flag.replace('_', '-')} must be a number > 0, got {value!r}")
    if args.tokenizer and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        raise InputError(
            f"probe: --tokenizer: no tokenizer.json in {args.tokenizer!r}; give the "
            "model's folder, or leave the flag out (the server's usage counts tokens)"
        )


def main(args: argparse.Namespace) -> int:
    from harness.probes.load import run_profile, server_problem

    _check_flags(args)
    profile = build_profile(args)
    problem = server_problem(args.url, args.model, args.api_key, timeout=min(args.timeout, 30))
    if problem:
        raise InputError(f"probe: server not usable: {problem}")
    result = run_profile(
        args.url,
        args.model,
        args.api_key,
        profile,
        tokenizer_dir=args.tokenizer,
        request_timeout=args.timeout,
        measure_ceiling=not args.no_ceiling,
    )
    if result["stop_reason"].startswith("warmup_failed"):
        reason = result["stop_reason"].removeprefix("warmup_failed: ")
        raise InputError(f"probe: server not usable: every warm-up request failed: {reason}")
    if args.json:
        print(json.dumps(result, indent=2))
    elif "capacity" in result:
        print_capacity(result)
    else:
        print_table(result)
    if "capacity" in result:
        return 0  # capacity 0 is an answer, not an error
    # Exit 1 when nothing completed: the server did not serve the probe.
    return 0 if any(lv["completed"] for lv in result["levels"]) else 1
