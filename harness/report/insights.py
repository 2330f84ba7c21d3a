"""Key insights computed from the latest result per cell key (never written by hand).

Each function takes the `latest` table and returns plain rows for the insights template:
largest model that fits per device, smallest working GPU-memory utilization per model, the
tensor-parallel size a model needs, the fastest config per model, configs ranked by users
served within objectives per GPU, architectures a vLLM version rejects, memory ranges and
success rates.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

# vLLM: "Model architectures ['BertForMaskedLM'] are not supported for now."
ARCH_RE = re.compile(r"architectures?\W+\[?'?\"?([A-Za-z0-9_]+(?:For[A-Za-z0-9_]+|Model))")


def _ok(latest: pd.DataFrame) -> pd.DataFrame:
    return latest[latest["outcome"] == "ok"]


def _numeric(df: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(df[column], errors="coerce")


def largest_fitting(latest: pd.DataFrame) -> list[dict[str, Any]]:
    """Per device: the working cell with the most weight memory per GPU, on one GPU and overall."""
    out = []
    ok = _ok(latest).assign(_w=lambda d: _numeric(d, "weights_gib").fillna(_numeric(d, "checkpoint_gib")))
    ok = ok[ok["_w"].notna()]
    for device, group in ok.groupby("device", sort=True):
        single = group[(group["tp"] * group["pp"]) == 1]
        overall = group.loc[group["_w"].idxmax()]
        out.append(
            {
                "device": device,
                "single": single.loc[single["_w"].idxmax()].to_dict() if not single.empty else None,
                "overall": overall.to_dict(),
            }
        )
    return out


def min_utilization(latest: pd.DataFrame) -> list[dict[str, Any]]:
    """Per model and device: the lowest --gpu-memory-utilization among working cells."""
    ok = _ok(latest).assign(_u=lambda d: _numeric(d, "gpu_memory_utilization"))
    ok = ok[ok["_u"].notna()]
    rows = []
    for (model, device), group in ok.groupby(["model", "device"], sort=True):
        best = group.sort_values(["_u", "config"], kind="stable").iloc[0]
        failed_lower = latest[
            (latest["model"] == model)
            & (latest["device"] == device)
            & (latest["outcome"] == "failed")
            & (_numeric(latest, "gpu_memory_utilization") < best["_u"])
        ]
        rows.append({**best.to_dict(), "failed_below": sorted(set(failed_lower["gpu_memory_utilization"]))})
    return rows


# failures that more GPUs could fix; an auth, validation or architecture failure says nothing
# about the tensor-parallel size a model needs
MEMORY_CLASSES = {"kv_cache_insufficient", "max_model_len_exceeds_kv", "oom_weight_load", "oom_other"}


def tp_needed(latest: pd.DataFrame) -> list[dict[str, Any]]:
    """Per model and device: the smallest TP that worked, or the TPs tried when none did and
    the failures were for memory (other failures do not tell)."""
    rows = []
    for (model, device), group in latest.groupby(["model", "device"], sort=True):
        ok = group[group["outcome"] == "ok"]
        if ok.empty and not MEMORY_CLASSES & set(group["failure_class"].dropna()):
            continue
        tried = sorted({int(t) for t in group["tp"]})
        rows.append(
            {
                "model": model,
                "device": device,
                "tp": int(ok["tp"].min()) if not ok.empty else None,
                "tried": tried,
                "failures": sorted({str(f) for f in group["failure_class"] if f}),
            }
        )
    return rows


def best_throughput(latest: pd.DataFrame) -> list[dict[str, Any]]:
    """Per model and device: the config with the highest output tokens/s at any concurrency."""
    ok = _ok(latest).assign(_t=lambda d: _numeric(d, "best_output_tok_s"))
    ok = ok[ok["_t"].notna()]
    return [group.loc[group["_t"].idxmax()].to_dict() for _, group in ok.groupby(["model", "device"], sort=True)]


def architecture(detail: Any, fallback: str) -> str:
    match = ARCH_RE.search(detail or "")
    return match.group(1) if match else fallback


def unsupported(latest: pd.DataFrame) -> list[dict[str, Any]]:
    """Architectures each vLLM version rejected, with the model that showed it."""
    bad = latest[latest["failure_class"] == "unsupported_architecture"]
    rows = [
        {**row, "architecture": architecture(row["failure_detail"], "unknown (see the log)")}
        for row in bad.to_dict("records")
    ]
    return sorted(rows, key=lambda r: (str(r["engine_version"]), r["architecture"], r["model"]))


def memory_ranges(latest: pd.DataFrame) -> list[dict[str, Any]]:
    """Per device: min and max of the engine's overheads over working cells (seed 002's pattern)."""
    rows = []
    for device, group in _ok(latest).groupby("device", sort=True):
        entry: dict[str, Any] = {"device": device}
        for column in ("activation_gib", "non_torch_gib", "cuda_graph_gib"):
            values = _numeric(group, column).dropna()
            entry[column] = (float(values.min()), float(values.max())) if not values.empty else None
        entry["any"] = any(entry[c] for c in ("activation_gib", "non_torch_gib", "cuda_graph_gib"))
        rows.append(entry)
    return rows


def capacity_per_gpu(latest: pd.DataFrame) -> list[dict[str, Any]]:
    """Configs ranked by users served within their objectives per GPU (capacity searches only),
    per model and device."""
    found = latest[latest["capacity_users"].notna()] if "capacity_users" in latest else latest.iloc[0:0]
    rows = []
    for row in found.to_dict("records"):
        gpus = int(row["tp"]) * int(row["pp"])
        rows.append({**row, "gpus": gpus, "users_per_gpu": row["capacity_users"] / gpus})
    return sorted(rows, key=lambda r: (r["model"].lower(), r["device"], -r["users_per_gpu"], r["config"]))


def success_rates(latest: pd.DataFrame) -> list[dict[str, Any]]:
    """ok / (ok + failed) per device and vLLM version, then overall; skipped and inconclusive
    cells are counted apart (neither attempted to the end nor failed)."""

    def rate(group: pd.DataFrame, device: str, version: str) -> dict[str, Any]:
        counts = group["outcome"].value_counts()
        ok, failed, skipped, inconclusive = (int(counts.get(k, 0)) for k in ("ok", "failed", "skipped", "inconclusive"))
        return {
            "device": device,
            "engine_version": version,
            "ok": ok,
            "failed": failed,
            "skipped": skipped,
            "inconclusive": inconclusive,
            "rate": ok / (ok + failed) if ok + failed else None,
        }

    keyed = latest.assign(_v=latest["engine_version"].fillna("unknown"))
    rows = [rate(group, device, version) for (device, version), group in keyed.groupby(["device", "_v"], sort=True)]
    if len(rows) > 1:
        rows.append(rate(latest, "all devices", "all"))
    return rows


def frontier(latest: pd.DataFrame) -> list[dict[str, Any]]:
    """Per model and device, the feasibility frontier the matrix (and autofit retries) found: the
    longest max_model_len that worked and its KV concurrency, the smallest working utilization,
    and vLLM's own estimate of the longest max_model_len where a cell failed for lack of KV."""
    rows = []
    for (model, device), group in latest.groupby(["model", "device"], sort=True):
        ok = group[group["outcome"] == "ok"].assign(
            _l=lambda d: _numeric(d, "max_model_len"), _u=lambda d: _numeric(d, "gpu_memory_utilization")
        )
        estimates = _numeric(group, "estimated_max_model_len").dropna()
        longest = ok[ok["_l"].notna()]
        best = longest.loc[longest["_l"].idxmax()] if not longest.empty else None
        if best is None and estimates.empty:
            continue
        rows.append(
            {
                "model": model,
                "device": device,
                "max_model_len": int(best["_l"]) if best is not None else None,
                "max_concurrency": best["max_concurrency"] if best is not None else None,
                "min_utilization": ok["_u"].min() if ok["_u"].notna().any() else None,
                "vllm_estimate": int(estimates.max()) if not estimates.empty else None,
            }
        )
    return rows


def compute(latest: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    if latest.empty:
        return {}
    return {
        "largest": largest_fitting(latest),
        "min_utilization": min_utilization(latest),
        "tp_needed": tp_needed(latest),
        "frontier": frontier(latest),
        "best_throughput": best_throughput(latest),
        "unsupported": unsupported(latest),
        "memory_ranges": memory_ranges(latest),
        "capacity": capacity_per_gpu(latest),
        "success": success_rates(latest),
    }
