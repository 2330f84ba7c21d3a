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
from matplotlib.patches import Patch  # noqa: E402

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
    """Stacked bars, one per cell (per GPU when TP > 1), against the device's total memory and
    the share `--gpu-memory-utilization` grants; failed cells are hatched and labelled with
    their class; each segment of 1 GiB or more carries its value."""
    rows = [
        r
        for r in rows
        if r.get("outcome") in ("failed", "inconclusive")
        or any(isinstance(r.get(k), (int, float)) for k, _ in MEMORY_PARTS)
    ]
    if not any(isinstance(r.get(k), (int, float)) for r in rows for k, _ in MEMORY_PARTS):
        return None
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(9, 2.2 + 0.5 * len(rows)), layout="constrained")
        ax = fig.add_subplot()
        labels = [f"{r['model']} ({r['config']})" for r in rows]
        y = list(range(len(rows)))
        failed = [r.get("outcome") != "ok" for r in rows]
        left = [0.0] * len(rows)
        totals = sorted(
            {float(r["device_memory_gib"]) for r in rows if isinstance(r.get("device_memory_gib"), (int, float))}
        )
        scale = max([*totals, *(sum(_num(r.get(k)) for k, _ in MEMORY_PARTS) for r in rows)])
        for (key, _name), color in zip(MEMORY_PARTS, COLORS):
            widths = [_num(r.get(key)) for r in rows]
            bars = ax.barh(y, widths, left=left, color=color, height=0.6, edgecolor="white", linewidth=0.5)
            for bar, width, bad in zip(bars, widths, failed):
                if bad:
                    bar.set_hatch("///")
                if width >= 0.04 * scale:  # narrower segments would not hold their label
                    ax.text(
                        bar.get_x() + width / 2,
                        bar.get_y() + bar.get_height() / 2,
                        f"{width:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if color != COLORS[6] else "black",
                    )
            left = [a + b for a, b in zip(left, widths)]
        for i, (total, bad) in enumerate(zip(left, failed)):
            note = f"{total:.2f} GiB" if total else "no memory figures"
            if bad:
                note += f"  ✗ {rows[i].get('failure_class') or rows[i].get('outcome')}"
            # right of every bar and line, so no label crosses the total or the budget line
            ax.text(scale * 1.02, i, note, va="center", fontsize=8, color="#b00000" if bad else "#333333")
        for total in totals:
            ax.axvline(total, color="#333333", linestyle="--", linewidth=1.2, label=f"Device total {total:.2f} GiB")
        budgets = sorted(
            {
                float(r["gpu_memory_utilization"]) * float(r["device_memory_gib"])
                for r in rows
                if isinstance(r.get("gpu_memory_utilization"), (int, float))
                and isinstance(r.get("device_memory_gib"), (int, float))
            }
        )
        for budget in budgets:
            ax.axvline(
                budget, color="#CC0000", linestyle=":", linewidth=1.5, label=f"Utilization budget {budget:.2f} GiB"
            )
        ax.set_xlim(0, scale * 1.45)
        ax.set_yticks(y, [("✗ " if bad else "") + label for label, bad in zip(labels, failed)])
        ax.invert_yaxis()  # first cell on top, as in the table
        ax.set_xlabel("Memory per GPU (GiB); hatched: the cell failed")
        ax.set_title(title)
        # legend patches of their own: a hatched (failed) first bar must not stand for its part
        parts = [Patch(facecolor=color, label=name) for (_, name), color in zip(MEMORY_PARTS, COLORS)]
        fig.legend(handles=parts + ax.get_legend_handles_labels()[0], loc="outside lower center", ncol=3, frameon=False)
        return _save(fig, path)


def probe_curves(levels: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Output tokens/s against median end-to-end latency (each point labelled with its
    concurrency), and TTFT/ITL median and p99 against concurrency, for one cell."""
    levels = [lv for lv in levels if isinstance(lv.get("concurrency"), (int, float))]
    if not levels:
        return None
    conc = [lv["concurrency"] for lv in levels]

    def stat(metric: str, name: str) -> list[float]:
        value = [(lv.get(metric) or {}).get(name) for lv in levels]
        return [float(v) if isinstance(v, (int, float)) and v > 0 else float("nan") for v in value]

    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(10, 3.9), layout="constrained")
        left, right = fig.subplots(1, 2)
        output = [lv.get("output_throughput") or float("nan") for lv in levels]
        e2el = stat("e2el_ms", "median")
        left.plot(e2el, output, "o-", color=COLORS[0], label="Output tokens/s")
        for x, yv, c in zip(e2el, output, conc):
            left.annotate(f"c={c}", (x, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
        left.set_xlabel("Median end-to-end latency (ms)")
        left.set_ylabel("Output throughput (tokens/s)")
        left.set_ylim(bottom=0)
        left.set_xlim(left=0)
        left.legend(frameon=False, loc="lower right")
        for metric, label, color in (("ttft_ms", "TTFT", COLORS[2]), ("itl_ms", "ITL", COLORS[3])):
            right.plot(conc, stat(metric, "median"), "o-", color=color, label=f"{label} median")
            right.plot(conc, stat(metric, "p99"), "^:", color=color, label=f"{label} p99")
        right.set_ylabel("Latency (ms)")
        right.set_ylim(bottom=0)
        right.set_xscale("log", base=2)
        right.set_xticks(conc, [str(c) for c in conc])
        right.minorticks_off()
        right.set_xlabel("Concurrency (requests in flight)")
        right.legend(frameon=False)
        fig.suptitle(title)
        return _save(fig, path)


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (higher is better on both), by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def frontier(points: Sequence[tuple[dict[str, Any], dict[str, Any]]], path: Path, title: str) -> Path | None:
    """Output tokens/s per GPU against tokens/s per user over every measured level of every
    config of one model (capacity-search traces), with the Pareto front drawn."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row, level in points:
        per_user, output = level.get("tokens_per_s_per_user"), level.get("output_throughput")
        if isinstance(per_user, (int, float)) and isinstance(output, (int, float)):
            series.setdefault(f"{row['config']} (TP/PP {row['tp']}/{row['pp']})", []).append(
                (float(per_user), float(output) / (row["tp"] * row["pp"]))
            )
    if not series:
        return None
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(7, 4.2), layout="constrained")
        ax = fig.add_subplot()
        for (name, pts), color in zip(sorted(series.items()), COLORS):
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, label=name, s=24)
        front = pareto([p for pts in series.values() for p in pts])
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="#333333", linewidth=1.2, label="Pareto front")
        ax.set_xlabel("Tokens/s per user (1000 / median TPOT)")
        ax.set_ylabel("Output tokens/s per GPU")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=8)
        return _save(fig, path)


def load_times(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Spawn->ready and vLLM's own model-load time per cell, in seconds."""
    rows = [
        r
        for r in rows
        if isinstance(r.get("spawn_to_ready_s"), (int, float)) or isinstance(r.get("load_s"), (int, float))
    ]
    if not rows:
        return None
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(8, 1.2 + 0.5 * len(rows)))
        ax = fig.add_subplot()
        y = list(range(len(rows)))
        height = 0.38
        ax.barh(
            [i - height / 2 for i in y],
            [_num(r.get("spawn_to_ready_s")) for r in rows],
            height=height,
            color=COLORS[0],
            label="Spawn → ready (harness)",
        )
        ax.barh(
            [i + height / 2 for i in y],
            [_num(r.get("load_s")) for r in rows],
            height=height,
            color=COLORS[1],
            label="Model loading (vLLM log)",
        )
        ax.set_yticks(y, [f"{r['model']} ({r['config']})" for r in rows])
        ax.invert_yaxis()
        ax.set_xlabel("Time (s)")
        ax.set_title(title)
        ax.legend(frameon=False, loc="lower right")
        return _save(fig, path)
