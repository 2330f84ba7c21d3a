"""vLLM version comparison and the range syntax of the calibration table (">=0.10,<0.12")."""

from __future__ import annotations

import re


def parse(version: str) -> tuple[int, ...]:
    """ "0.11.0rc2.dev67+gb5ee1e3" -> (0, 11, 0): release numbers only, pre-release tags dropped."""
    m = re.match(r"v?(\d+(?:\.\d+)*)", version.strip())
    if not m:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(p) for p in m.group(1).split("."))


def _pad(v: tuple[int, ...]) -> tuple[int, ...]:
    return v + (0,) * (3 - len(v))


def at_least(version: str, floor: str) -> bool:
    return _pad(parse(version)) >= _pad(parse(floor))


def in_range(version: str | None, spec: str) -> bool:
    """`spec` is "*" or comma-joined clauses of >=, >, <=, <, == . An unknown version matches "*" only."""
    if spec.strip() in ("", "*"):
        return True
    if version is None:
        return False
    v = _pad(parse(version))
    for clause in spec.split(","):
        m = re.match(r"\s*(>=|<=|==|>|<)\s*(\S+)\s*$", clause)
        if not m:
            raise ValueError(f"bad version clause {clause!r} in {spec!r}")
        op, bound = m.group(1), _pad(parse(m.group(2)))
        ok = {">=": v >= bound, "<=": v <= bound, "==": v == bound, ">": v > bound, "<": v < bound}[op]
        if not ok:
            return False
    return True


def minor(version: str) -> str:
    """ "0.11.2" -> "0.11": the granularity calibrate groups records by."""
    p = _pad(parse(version))
    return f"{p[0]}.{p[1]}"


# Ranges of vLLM releases whose memory profile behaves alike. Each boundary is a change in vLLM
# that moves what the profile counts (docs/plan.md "Version ranges" gives the evidence):
#   0.17  peak activation of the profile run drops (same model and GPU: 5.64 -> 2.23 GiB)
#   0.18  CUDA graph memory profiling lands (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS, off by
#         default); non-torch memory at TP 1 grows from ~0.13 to ~0.25 GiB
#   0.20  that estimate is on by default and subtracted before the KV cache is sized
#   0.26  hybrid (attention + Mamba/linear) models share one KV pool with padded pages
RANGE_BOUNDS = ("0.17", "0.18", "0.20", "0.26")
# What each boundary changes: a range with no fitted value for a constant borrows from the range
# reached across the fewest boundaries that change that constant's group.
BOUND_CHANGES = {"0.17": "activation", "0.18": "non_torch", "0.20": "cuda_graph", "0.26": "hybrid"}


def range_specs() -> list[str]:
    """Every range as a table spec, oldest first: "<0.17", ">=0.17,<0.18", ..., ">=0.26"."""
    specs = [f"<{RANGE_BOUNDS[0]}"]
    specs += [f">={a},<{b}" for a, b in zip(RANGE_BOUNDS, RANGE_BOUNDS[1:])]
    return specs + [f">={RANGE_BOUNDS[-1]}"]


def crossings(a: int, b: int, group: str) -> int:
    """How many boundaries between range indices a and b change `group`."""
    lo, hi = min(a, b), max(a, b)
    return sum(1 for bound in RANGE_BOUNDS[lo:hi] if BOUND_CHANGES[bound] == group)


def range_of(version: str | None) -> str:
    """The range spec a version falls in; None (unknown) means the newest behaviour."""
    if version is None:
        return range_specs()[-1]
    return next(spec for spec in range_specs() if in_range(version, spec))
