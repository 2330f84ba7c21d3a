"""What a probe runs: the workload (prompt and output lengths, endpoint) and its levels.

A `ProbeProfile` is either a concurrency ladder (each level keeps N requests in flight) or a
request-rate list (seeded Poisson arrivals). `levels(cap)` drops the ladder steps above the
cell's KV-derived max concurrency and probes the cap itself instead, so the ladder ends at
the limit the engine reported. `quick()` is the matrix default (~20 s per cell on the CPU
engine with a tiny model).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ProbeProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "ladder"
    mode: Literal["concurrency", "rate"] = "concurrency"
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16, 64, 256])
    request_rates: list[float] = Field(default_factory=list)  # req/s, mode "rate"
    max_concurrency: int | None = None  # cap on in-flight requests (KV-derived), both modes
    requests: int = 32  # per level, at least ...
    rounds: int = 2  # ... and at least rounds x concurrency, so every slot cycles
    input_tokens: int = 32
    output_tokens: int = 16
    endpoint: Literal["completions", "chat"] = "completions"
    # vLLM's `ignore_eos` makes every request produce exactly output_tokens; other servers
    # may reject unknown fields, hence the switch.
    ignore_eos: bool = True
    warmup_requests: int = 2  # once, before the first level; excluded from every metric
    seed: int = 0
    max_level_seconds: float = 120.0  # stop issuing new requests in a level after this
    max_error_fraction: float = 0.1  # stop a level once more of its requests failed
    # Stop the ladder when a level adds less than this fraction of output throughput.
    min_throughput_gain: float = 0.05
    goodput: dict[str, float] | None = None  # SLOs in ms, keys ttft/tpot/e2el
    scrape_metrics: bool = True
    metrics_poll_seconds: float = 0.5  # KV-usage sampling during a level

    @model_validator(mode="after")
    def _check(self) -> ProbeProfile:
        if self.mode == "rate" and not self.request_rates:
            raise ValueError("mode 'rate' needs request_rates")
        if self.mode == "concurrency" and not self.concurrency:
            raise ValueError("mode 'concurrency' needs at least one concurrency level")
        if any(c < 1 for c in self.concurrency) or any(r <= 0 for r in self.request_rates):
            raise ValueError("concurrency levels must be >= 1 and rates > 0")
        if self.input_tokens < 1 or self.output_tokens < 1 or self.requests < 1:
            raise ValueError("input_tokens, output_tokens and requests must be >= 1")
        bad = set(self.goodput or {}) - {"ttft", "tpot", "e2el"}
        if bad:
            raise ValueError(f"goodput keys must be ttft/tpot/e2el, not {sorted(bad)}")
        return self

    @classmethod
    def quick(cls, max_concurrency: float | None = None) -> ProbeProfile:
        """Matrix default: concurrency 1 and 4, 8 requests each, 32 in / 16 out tokens."""
        return cls(name="quick", concurrency=[1, 4], requests=8, rounds=2,
                   max_level_seconds=20.0, warmup_requests=2).capped(max_concurrency)

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
