"""What a probe runs: the workload (prompt and output lengths, endpoint) and its levels.

A `ProbeProfile` is a concurrency ladder (each level keeps N requests in flight), a
request-rate list (seeded Poisson arrivals), or a capacity search (`mode: capacity`: the
largest concurrency, or with `search: rate` the largest Poisson rate, at which every
objective in `slo` holds; see `harness.probes.capacity`). `levels(cap)` drops the ladder
steps above the cell's KV-derived max concurrency and probes the cap itself instead, so the
ladder ends at the limit the engine reported; the same cap bounds a capacity search.
`quick()` is a short ladder (~20 s per cell on the CPU engine with a tiny model);
`chat_capacity()` is the `probe: capacity` search at chat-serving objectives.

`resolve(spec, cap)` turns a matrix's `probe:` value into a profile; `check_spec` validates
one before anything starts.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.probes import slo as slo_mod

# MLPerf Inference's server-scenario latency constraints for Llama 3.1 8B (p99 TTFT 2 s,
# p99 TPOT 100 ms; mlcommons/inference_policies inference_rules.adoc, loadgen mlperf.conf),
# which anchor TPOT at roughly reading speed.
CHAT_SLO = {"ttft_p99_ms": 2000.0, "tpot_p99_ms": 100.0}
# Without a KV-derived cap a concurrency search stops here.
SEARCH_CEILING = 1024


class ProbeProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "ladder"
    mode: Literal["concurrency", "rate", "capacity"] = "concurrency"
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16, 64, 256])
    request_rates: list[float] = Field(default_factory=list)  # req/s, mode "rate"
    # Cap on in-flight requests (KV-derived): ladder, rate list and concurrency search.
    max_concurrency: int | None = Field(None, ge=1)
    requests: int = Field(32, ge=1)  # per level, at least ...
    rounds: int = Field(2, ge=1)  # ... and at least rounds x concurrency, so every slot cycles
    input_tokens: int = Field(32, ge=1)
    output_tokens: int = Field(16, ge=1)
    endpoint: Literal["completions", "chat"] = "completions"
    # vLLM's `ignore_eos` makes every request produce exactly output_tokens; other servers
    # may reject unknown fields, hence the switch.
    ignore_eos: bool = True
    warmup_requests: int = Field(2, ge=0)  # once, before the first level; excluded from metrics
    seed: int = 0
    max_level_seconds: float = Field(120.0, gt=0)  # stop issuing new requests in a level after this
    max_error_fraction: float = Field(0.1, ge=0, le=1)  # stop a level once more of its requests failed
    # Stop the ladder when a level adds less than this fraction of output throughput.
    min_throughput_gain: float = Field(0.05, ge=0)
    goodput: dict[str, float] | None = None  # SLOs in ms, keys ttft/tpot/e2el
    scrape_metrics: bool = True
    metrics_poll_seconds: float = Field(0.5, gt=0)  # KV-usage sampling during a level
    # ---- mode "capacity"
    slo: dict[str, float] | None = None  # objectives, e.g. {ttft_p99_ms: 2000}; see probes.slo
    search: Literal["concurrency", "rate"] = "concurrency"
    budget_s: float = Field(1800.0, gt=0)  # the whole search, warm-up and levels
    start_rate: float = Field(1.0, gt=0)  # req/s, first level of a rate search
    max_rate: float = Field(1000.0, gt=0)  # req/s, a rate search's ceiling
    rate_precision: float = Field(0.1, gt=0)  # stop bisecting rates when hi - lo <= this x lo

    @field_validator("slo", mode="before")
    @classmethod
    def _slo(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"slo must be a mapping of objectives to ms, got {value!r}")
        return slo_mod.normalize(value)

    @model_validator(mode="after")
    def _check(self) -> ProbeProfile:
        if self.mode == "rate" and not self.request_rates:
            raise ValueError("mode 'rate' needs request_rates")
        if self.mode == "concurrency" and not self.concurrency:
            raise ValueError("mode 'concurrency' needs at least one concurrency level")
        if any(c < 1 for c in self.concurrency) or any(not r > 0 for r in self.request_rates):
            raise ValueError("concurrency levels must be >= 1 and rates > 0")
        bad = set(self.goodput or {}) - {"ttft", "tpot", "e2el"}
        if bad:
            raise ValueError(f"goodput keys must be ttft/tpot/e2el, not {sorted(bad)}")
        for key, value in (self.goodput or {}).items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"goodput {key}: target must be > 0 ms, got {value!r}")
        if self.mode == "capacity":
            if not self.slo:
                raise ValueError("mode 'capacity' needs slo, e.g. {ttft_p99_ms: 2000, tpot_p99_ms: 100}")
            if self.goodput:
                raise ValueError("mode 'capacity' scores goodput against slo; drop goodput")
            if self.output_tokens < 2 and any(k.startswith("tpot") for k in self.slo):
                raise ValueError("a TPOT objective needs output_tokens >= 2")
            if self.start_rate > self.max_rate:
                raise ValueError("start_rate must not exceed max_rate")
        elif self.slo:
            raise ValueError("slo is for mode 'capacity'; fixed levels take goodput")
        return self

    @classmethod
    def quick(cls, max_concurrency: float | None = None) -> ProbeProfile:
        """Matrix default: concurrency 1 and 4, 8 requests each, 32 in / 16 out tokens."""
        return cls(
            name="quick", concurrency=[1, 4], requests=8, rounds=2, max_level_seconds=20.0, warmup_requests=2
        ).capped(max_concurrency)

    @classmethod
    def chat_capacity(cls, max_concurrency: float | None = None) -> ProbeProfile:
        """`probe: capacity`: the largest concurrency within CHAT_SLO, for a chat turn of
        1000 prompt and 200 output tokens; 100 requests per level at least, so p99 is a
        percentile and not the maximum; 15 minutes per cell at most."""
        return cls(
            name="capacity",
            mode="capacity",
            slo=CHAT_SLO,
            input_tokens=1000,
            output_tokens=200,
            requests=100,
            rounds=2,
            warmup_requests=4,
            max_level_seconds=300.0,
            budget_s=900.0,
        ).capped(max_concurrency)

    def capped(self, max_concurrency: float | None) -> ProbeProfile:
        """A copy whose levels stop at `max_concurrency` (vLLM's float is floored, min 1)."""
        if max_concurrency is None:
            return self
        cap = max(1, math.floor(max_concurrency))
        if self.max_concurrency is not None:
            cap = min(cap, self.max_concurrency)
        return self.model_copy(update={"max_concurrency": cap})

    def levels(self) -> list[int] | list[float]:
        """Concurrencies (or request rates) to run, in order."""
        if self.mode == "rate":
            return list(self.request_rates)
        cap = self.max_concurrency
        levels = sorted({c for c in self.concurrency if cap is None or c <= cap})
        if cap is not None and any(c > cap for c in self.concurrency) and cap not in levels:
            levels.append(cap)  # the ladder was cut: probe the limit itself
        return levels

    def requests_for(self, concurrency: int) -> int:
        return max(self.requests, self.rounds * concurrency)


def resolve(spec: str | dict[str, Any] | None, max_concurrency: float | None) -> ProbeProfile | None:
    """A matrix's `probe:` value ("quick", "capacity", "none"/"off", or a mapping of
    ProbeProfile fields), capped by the cell's KV-derived max concurrency. ValueError (a
    pydantic ValidationError for a bad mapping) when the spec is wrong."""
    if spec is None or spec in ("none", "off"):
        return None
    if spec == "quick":
        return ProbeProfile.quick(max_concurrency)
    if spec == "capacity":
        return ProbeProfile.chat_capacity(max_concurrency)
    if isinstance(spec, dict):
        return ProbeProfile.model_validate(spec).capped(max_concurrency)
    raise ValueError(f"unknown profile {spec!r}; use quick, capacity, none or a mapping of probe settings")


def check_spec(spec: Any) -> str | None:
    """What is wrong with a `probe:` value, in one line ("field: problem"), or None."""
    try:
        resolve(spec, None)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        return f"{where}: {msg}" if where else msg
    except ValueError as exc:
        return str(exc)
    return None
