"""Latency/throughput probes against OpenAI-compatible servers (`vllm bench serve` metrics).

`run_profile` / `arun_profile` run a `ProbeProfile` (a ladder, a rate list, or a capacity
search at service-level objectives, `harness.probes.capacity`) and return the probe JSON of
docs/probe.md; `measure_client_ceiling` calibrates this client against the zero-delay stub.
Names resolve lazily so `python -m harness.probes.stub` does not import the stub module twice.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ProbeProfile": "harness.probes.profiles",
    "arun_profile": "harness.probes.load",
    "run_profile": "harness.probes.load",
    "measure_client_ceiling": "harness.probes.load",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness.probes' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
