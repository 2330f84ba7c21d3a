"""Report plots: SVG files written next to the Markdown page that links them.

Figures are built with the object API (no pyplot state, Agg canvas) and saved with a fixed
hash salt, no date and text kept as text, so the same records give byte-identical SVGs and
committed reports diff cleanly. Figures have an opaque white background: GitHub's dark theme
would make black axis text on a transparent background unreadable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

# Okabe-Ito: distinguishable with colour-vision deficiencies, on white
COLORS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
MEMORY_PARTS = [
    ("weights_gib", "Weights"),
    ("activation_gib", "Peak activation"),
    ("non_torch_gib", "Non-torch"),
    ("cuda_graph_gib", "CUDA graph"),
    ("kv_cache_gib", "KV cache"),
]
RC = {
    "svg.hashsalt": "vllm-harness",
    "svg.fonttype": "none",
    "font.size": 10,
    "figure.facecolor": "white",
    "axes.facecolor": "white",
    "savefig.facecolor": "white",
    "axes.grid": True,
    "grid.color": "#dddddd",
}


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": "vllm-harness"})
    return path


def _num(value: Any) -> float:
    """Missing -> 0; negative -> 0: a stacked bar cannot draw vLLM's negative CUDA-graph or KV
    figures, the page's table shows them as printed."""
    return max(float(value), 0.0) if isinstance(value, (int, float)) else 0.0


def memory_breakdown(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Stacked bars, one per cell (per GPU when TP > 1), against the device's total memory."""
    rows = [r for r in rows if any(isinstance(r.get(k), (int, float)) for k, _ in MEMORY_PARTS)]
    if not rows:
        return None
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(8, 2.0 + 0.45 * len(rows)), layout="constrained")
        ax = fig.add_subplot()
        labels = [f"{r['model']} ({r['config']})" for r in rows]
        y = list(range(len(rows)))
        left = [0.0] * len(rows)
        for (key, name), color in zip(MEMORY_PARTS, COLORS):
            widths = [_num(r.get(key)) for r in rows]
            ax.barh(y, widths, left=left, color=color, label=name, height=0.6)
            left = [a + b for a, b in zip(left, widths)]
        totals = sorted({float(r["device_memory_gib"]) for r in rows if isinstance(r.get("device_memory_gib"), (int, float))})
        for total in totals:
            ax.axvline(total, color="#333333", linestyle="--", linewidth=1.2, label=f"Device total {total:.2f} GiB")
        ax.set_yticks(y, labels)
        ax.invert_yaxis()  # first cell on top, as in the table
        ax.set_xlabel("Memory per GPU (GiB)")
        ax.set_title(title)
        fig.legend(loc="outside lower center", ncol=3, frameon=False)
        return _save(fig, path)


def probe_curves(levels: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Throughput (left) and TTFT/ITL median and p99 (right) against concurrency for one cell."""
    levels = [lv for lv in levels if isinstance(lv.get("concurrency"), (int, float))]
    if not levels:
        return None
    conc = [lv["concurrency"] for lv in levels]

    def stat(metric: str, name: str) -> list[float]:
        return [float((lv.get(metric) or {}).get(name) or float("nan")) for lv in levels]

    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(10, 3.6))
        left, right = fig.subplots(1, 2)
        left.plot(conc, [lv.get("output_throughput") or float("nan") for lv in levels], "o-", color=COLORS[0],
                  label="Output tokens/s")
        left.plot(conc, [lv.get("total_token_throughput") or float("nan") for lv in levels], "s--", color=COLORS[1],
                  label="Total tokens/s")
        left.set_ylabel("Throughput (tokens/s)")
        left.set_ylim(bottom=0)
        for metric, label, color in (("ttft_ms", "TTFT", COLORS[2]), ("itl_ms", "ITL", COLORS[3])):
            right.plot(conc, stat(metric, "median"), "o-", color=color, label=f"{label} median")
            right.plot(conc, stat(metric, "p99"), "^:", color=color, label=f"{label} p99")
        right.set_ylabel("Latency (ms)")
        right.set_ylim(bottom=0)
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(conc, [str(c) for c in conc])
            ax.minorticks_off()
            ax.set_xlabel("Concurrency (requests in flight)")
            ax.legend(frameon=False)
        fig.suptitle(title)
        return _save(fig, path)


def load_times(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Spawn->ready and vLLM's own model-load time per cell, in seconds."""
    rows = [r for r in rows if isinstance(r.get("spawn_to_ready_s"), (int, float)) or isinstance(r.get("load_s"), (int, float))]
    if not rows:
        return None
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(8, 1.2 + 0.5 * len(rows)))
        ax = fig.add_subplot()
        y = list(range(len(rows)))
        height = 0.38
        ax.barh([i - height / 2 for i in y], [_num(r.get("spawn_to_ready_s")) for r in rows], height=height,
                color=COLORS[0], label="Spawn → ready (harness)")
        ax.barh([i + height / 2 for i in y], [_num(r.get("load_s")) for r in rows], height=height,
                color=COLORS[1], label="Model loading (vLLM log)")
        ax.set_yticks(y, [f"{r['model']} ({r['config']})" for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("Time (s)")
        ax.set_title(title)
        ax.legend(frameon=False, loc="lower right")
        return _save(fig, path)
