"""Prometheus text exposition → samples, plus the vLLM metrics the harness reads.

`parse()` turns a `/metrics` body into samples grouped by metric family; `engine_snapshot()`
picks the vLLM gauges and counters the probes track (KV usage, preemptions, prefix cache,
token and request counters, and the latency histograms whose sums and counts
`latency_means()` turns into the server's own mean TTFT/TPOT/ITL/E2EL), accepting both the
V1 names and their pre-0.12 aliases (vLLM renamed the cache-config gauges at 0.12);
`cache_config_info()` returns the labels of `vllm:cache_config_info`. Pure functions, no I/O.
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from harness.schema import MetricsFacts

# metric name, optional {labels}, value; an optional timestamp after the value is ignored.
_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?\s*$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
# Suffixes a histogram/summary/counter sample may carry beyond its family name.
_SUFFIXES = ("_total", "_created", "_bucket", "_sum", "_count", "_info", "_gsum", "_gcount")


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Family:
    name: str
    type: str = "untyped"
    help: str = ""
    samples: list[Sample] = field(default_factory=list)


def _unescape(text: str) -> str:
    return re.sub(r'\\[\\"n]', lambda m: _ESCAPES[m.group(0)], text)


def _parse_value(text: str) -> float:
    # Go/Prometheus spellings of the special values.
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    return special[text] if text in special else float(text)


def _parse_labels(body: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        m = _LABEL_RE.match(body, pos)
        if not m:
            raise ValueError(f"bad label set: {{{body}}}")
        labels[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return labels


def parse(text: str) -> dict[str, Family]:
    """Families keyed by name. A sample joins the family its `# TYPE` line declared (so
    `x_total`, `x_bucket` belong to `x`); undeclared samples form their own family.
    Malformed lines raise ValueError naming the line."""
    families: dict[str, Family] = {}
    # Only "\n" ends a line: splitlines() would also split label values at U+0085 etc.
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("TYPE", "HELP"):
                fam = families.setdefault(parts[2], Family(parts[2]))
                rest = parts[3] if len(parts) > 3 else ""
                if parts[1] == "TYPE":
                    fam.type = rest.strip()
                else:
                    fam.help = rest
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            raise ValueError(f"line {lineno}: not a Prometheus sample: {raw!r}")
        name, label_text, value_text = m.groups()
        try:
            labels = _parse_labels(label_text[1:-1]) if label_text else {}
            value = _parse_value(value_text)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"line {lineno}: {exc}: {raw!r}") from None
        families.setdefault(_family_of(name, families), Family(name)).samples.append(Sample(name, labels, value))
    return families


def _family_of(sample_name: str, families: dict[str, Family]) -> str:
    if sample_name in families:
        return sample_name
    for suffix in _SUFFIXES:
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in families:
            return sample_name[: -len(suffix)]
    return sample_name


def samples(families: dict[str, Family], name: str) -> list[Sample]:
    """Samples whose exact name is `name`, wherever they were grouped."""
    fam = families.get(_family_of(name, families))
    return [s for s in fam.samples if s.name == name] if fam else []


def total(families: dict[str, Family], *names: str) -> float | None:
    """Sum over label sets (engines, finish reasons) of the first name that is present.
    Several names let a caller list a metric's spellings across vLLM releases."""
    for name in names:
        found = samples(families, name)
        if found:
            return sum(s.value for s in found)
    return None


def peak(families: dict[str, Family], *names: str) -> float | None:
    """Maximum over label sets of the first name present (a gauge per engine)."""
    for name in names:
        found = samples(families, name)
        if found:
            return max(s.value for s in found)
    return None


def cache_config_info(families: dict[str, Family]) -> dict[str, str] | None:
    """Labels of `vllm:cache_config_info` (engine 0's when several engines report)."""
    found = samples(families, "vllm:cache_config_info")
    if not found:
        return None
    found.sort(key=lambda s: s.labels.get("engine", ""))
    return dict(found[0].labels)


# Counters the probes diff around a level; each lists its names newest first. Counters are
# exposed with `_total` by prometheus_client; bare names cover exporters that omit it.
COUNTERS: dict[str, tuple[str, ...]] = {
    "num_preemptions": ("vllm:num_preemptions_total", "vllm:num_preemptions"),
    "prefix_cache_hits": (
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_hits",
        "vllm:gpu_prefix_cache_hits_total",
        "vllm:gpu_prefix_cache_hits",
    ),
    "prefix_cache_queries": (
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_queries",
        "vllm:gpu_prefix_cache_queries_total",
        "vllm:gpu_prefix_cache_queries",
    ),
    "prompt_tokens": ("vllm:prompt_tokens_total", "vllm:prompt_tokens"),
    "generation_tokens": ("vllm:generation_tokens_total", "vllm:generation_tokens"),
    "request_success": ("vllm:request_success_total", "vllm:request_success"),
}
GAUGES: dict[str, tuple[str, ...]] = {
    # 0-1 fraction under both names.
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    "num_requests_running": ("vllm:num_requests_running",),
    "num_requests_waiting": ("vllm:num_requests_waiting",),
}

# Per-request latency histograms (seconds), timed by vLLM's front end from the request's
# arrival. Sum/count over an interval is the server's own mean: the reference a client's
# figures are checked against. Before 0.11 the per-token gap histogram had the second name.
HISTOGRAMS: dict[str, tuple[str, ...]] = {
    "ttft": ("vllm:time_to_first_token_seconds",),
    "tpot": ("vllm:request_time_per_output_token_seconds",),
    "itl": ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    "e2el": ("vllm:e2e_request_latency_seconds",),
}


def engine_snapshot(text: str) -> dict[str, float | None]:
    """The tracked vLLM counters (summed over engines), gauges (max over engines) and the
    latency histograms' `<key>_sum` / `<key>_count` (summed over engines)."""
    families = parse(text)
    snap: dict[str, float | None] = {k: total(families, *v) for k, v in COUNTERS.items()}
    snap.update({k: peak(families, *v) for k, v in GAUGES.items()})
    for key, names in HISTOGRAMS.items():
        name = next((n for n in names if samples(families, n + "_count")), None)
        snap[f"{key}_sum"] = total(families, name + "_sum") if name else None
        snap[f"{key}_count"] = total(families, name + "_count") if name else None
    return snap


def latency_means(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, float | None]:
    """The server's own mean TTFT/TPOT/ITL/E2EL in ms between two snapshots, and `requests`
    (E2EL observations); None where a histogram is missing or saw nothing."""
    out: dict[str, float | None] = {}
    for key in HISTOGRAMS:
        seconds, n = _delta(before, after, f"{key}_sum"), _delta(before, after, f"{key}_count")
        out[key] = 1000 * seconds / n if seconds is not None and n is not None and n > 0 else None
    out["requests"] = _delta(before, after, "e2el_count")
    return out


def counter_deltas(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, float | None]:
    """after − before for each counter both snapshots have; None where either lacks it."""
    return {key: _delta(before, after, key) for key in COUNTERS}


def _delta(before: dict[str, float | None], after: dict[str, float | None], key: str) -> float | None:
    a, b = after.get(key), before.get(key)
    return None if a is None or b is None else a - b


def scrape_cache_config(base: str, api_key: str) -> MetricsFacts | None:
    """The engine's KV cache configuration from /metrics once it is ready (`vllm:cache_config_info`)."""
    try:
        req = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {api_key}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError):
        return None
    labels = cache_config_info(parse(text)) or {}

    def num(key: str, cast=int):
        value = labels.get(key)
        try:
            return cast(float(value)) if value not in (None, "None", "") else None
        except ValueError:
            return None

    return MetricsFacts(
        num_gpu_blocks=num("num_gpu_blocks"),
        block_size=num("block_size"),
        kv_cache_size_tokens=num("kv_cache_size_tokens"),
        kv_cache_max_concurrency=num("kv_cache_max_concurrency", float),
        kv_cache_memory_bytes=num("kv_cache_memory_bytes"),
        labels=labels,
    )
