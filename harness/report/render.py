"""Rendering: aggregated results -> Markdown pages (jinja2 templates), SVG plots, exports.

Layout under reports/:
  README.md                  index: runs, devices, vLLM versions, links, metric definitions
  matrix.md                  model x device matrix across all hosts
  insights.md                key insights computed from the latest results
  devices/<device>.md (+ devices/<device>/*.svg)   compatibility table per device
  runs/<run-id>.md (+ runs/<run-id>/*.svg)         seed-002 summary + one section per cell
  data/cells.{csv,json[,parquet]}, data/history.{csv,json[,parquet]}   exports
Output depends only on the records (ordering is stable, no clock is read), so committed
reports change only when results do.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from harness import store
from harness.report import insights, plots
from harness.report.aggregate import Results, Run, RunCell, is_missing, level_value, probe_levels
from harness.schema import FAILURE_CLASSES, slug

TEMPLATES = Path(__file__).parent / "templates"
GIB = 1024**3
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|CREDENTIAL", re.I)
RUN_STATUS = {"ok": "SUCCESS", "failed": "FAILED", "skipped": "SKIPPED"}
MANIFEST_STATUS = {"not_on_host": "NOT ON HOST"}


# --------------------------------------------------------------------------- template filters
def num(value: Any, digits: int = 2, missing: str = "N/A") -> str:
    if is_missing(value) or not isinstance(value, (int, float)):
        return missing
    return f"{value:.{digits}f}"


def integer(value: Any, missing: str = "N/A") -> str:
    if is_missing(value) or not isinstance(value, (int, float)):
        return missing
    return f"{int(value):,}"


def percent(value: Any, missing: str = "—") -> str:
    if is_missing(value) or not isinstance(value, (int, float)):
        return missing
    return f"{value * 100:.0f}%"


def cell(value: Any) -> str:
    """Text safe inside a GFM table cell: no pipe ends the cell, no newline ends the row."""
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ").strip()


def code(value: Any) -> str:
    text = cell(value).replace("`", "'")
    return f"`{text}`" if text else ""


def outcome_badge(outcome: str | None) -> str:
    return {"ok": "✅ ok", "failed": "❌ failed", "skipped": "⏭️ skipped"}.get(outcome or "", "—")


def validation_badge(passed: Any) -> str:
    return {True: "✅ passed", False: "❌ wrong answer"}.get(passed, "—") if isinstance(passed, bool) else "—"


def cli_flag(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if value is True:
        return flag
    if isinstance(value, (dict, list)):
        return f"{flag} '{json.dumps(value, sort_keys=True)}'"
    return f"{flag} {value}"


def env_value(name: str, value: str) -> str:
    # the runner redacts upstream; this keeps a token-looking variable out even if one slips by
    return "***" if SECRET_NAME.search(name) else value


def value_with_unit(value: Any, unit: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return cell(value if value is not None else "N/A")
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"
    return f"{text} {unit}".strip()


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML; table text goes through `cell`
    )
    env.filters.update(num=num, int=integer, pct=percent, cell=cell, code=code, outcome=outcome_badge,
                       validation=validation_badge, flag=cli_flag, stat=level_value, value=value_with_unit, env_value=env_value, gib=lambda b: num(b / GIB)
                       if isinstance(b, (int, float)) else "N/A")
    env.globals.update(failure_classes=FAILURE_CLASSES)
    return env


# --------------------------------------------------------------------------- helpers
def rel(target: Path, page_dir: Path) -> str:
    return Path(os.path.relpath(target.resolve(), page_dir.resolve())).as_posix()


def device_slug(device: str) -> str:
    return slug(device).lower()


def anchor(cell_id: str) -> str:
    return "cell-" + slug(cell_id).lower().replace(".", "-")


def model_link(row: dict[str, Any]) -> str:
    if row.get("model_local"):
        return f"**{cell(row['model'])}**"
    return f"[**{cell(row['model'])}**](https://huggingface.co/{row['model_source']})"


def records_of(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [] if df.empty else df.to_dict("records")


def _clean(folder: Path, patterns: tuple[str, ...]) -> None:
    """Remove what an earlier rendering wrote here, so a dropped cell leaves no stale plot."""
    for pattern in patterns:
        for path in folder.glob(pattern):
            if path.is_file():
                path.unlink()
    for sub in sorted((p for p in folder.glob("*") if p.is_dir()), reverse=True):
        if not any(sub.iterdir()):
            sub.rmdir()


class Renderer:
    """Writes every page of one report tree; `written` lists the files, in writing order."""

    def __init__(self, results: Results, reports_dir: Path):
        self.results = results
        self.reports_dir = Path(reports_dir)
        self.env = environment()
        self.written: list[Path] = []

    def _write(self, path: Path, template: str, **context: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.env.get_template(template).render(**context)
        path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
        self.written.append(path)
        return path

    def _plot(self, path: Path | None) -> Path | None:
        if path is not None:
            self.written.append(path)
        return path

    def log_link(self, row: dict[str, Any] | None, page_dir: Path) -> str | None:
        if not row or not row.get("engine_log_path"):
            return None
        return rel(Path(row["engine_log_path"]), page_dir)

    def record_link(self, row: dict[str, Any] | None, page_dir: Path) -> str | None:
        """The published copy of the record when there is one (it resolves on GitHub too)."""
        if not row:
            return None
        published = store.record_path(self.reports_dir / "data" / "runs", row["run_id"], row["cell_id"])
        return rel(published if published.exists() else Path(row["record_path"]), page_dir)

    # ----------------------------------------------------------------------- per device
    def devices(self) -> list[dict[str, Any]]:
        latest = self.results.latest
        out = []
        for device, group in (latest.groupby("device", sort=True) if not latest.empty else []):
            memory = pd.to_numeric(group["device_memory_gib"], errors="coerce").dropna()
            counts = group["outcome"].value_counts()
            out.append({
                "name": device,
                "slug": device_slug(device),
                "memory_gib": float(memory.max()) if not memory.empty else None,
                "hosts": sorted(set(group["host"])),
                "versions": sorted({str(v) for v in group["engine_version"] if v}),
                "cells": len(group),
                "ok": int(counts.get("ok", 0)),
                "failed": int(counts.get("failed", 0)),
                "skipped": int(counts.get("skipped", 0)),
                "rows": records_of(group),
            })
        return out

    def device_page(self, device: dict[str, Any]) -> Path:
        page = self.reports_dir / "devices" / f"{device['slug']}.md"
        assets = page.parent / device["slug"]
        rows = device["rows"]
        memory = self._plot(plots.memory_breakdown(rows, assets / "memory.svg", f"Memory per GPU on {device['name']}"))
        load = self._plot(plots.load_times(rows, assets / "load_time.svg", f"Load time per model on {device['name']}"))
        for row in rows:
            row["run_link"] = f"../runs/{row['run_id']}.md#{anchor(row['cell_id'])}"
            row["model_link"] = model_link(row)
        failures = {fc: [r for r in rows if r["failure_class"] == fc and r["failure_class"] != "gated_or_auth"]
                    for fc in FAILURE_CLASSES}
        return self._write(
            page, "device.md.j2", device=device, rows=rows,
            failures={fc: cells for fc, cells in failures.items() if cells},
            skipped=[r for r in rows if r["outcome"] == "skipped"],
            gated=[r for r in rows if r["failure_class"] == "gated_or_auth"],
            memory_plot=rel(memory, page.parent) if memory else None,
            load_plot=rel(load, page.parent) if load else None,
        )

    # ----------------------------------------------------------------------- per run
    def run_view(self, run: Run, page_dir: Path) -> list[dict[str, Any]]:
        models = [c.row["model"] for c in run.cells if c.row]
        views = []
        for number, rc in enumerate(run.cells, 1):
            views.append(self._cell_view(number, rc, page_dir, models))
        return views

    def _cell_view(self, number: int, rc: RunCell, page_dir: Path, models: list[str]) -> dict[str, Any]:
        row = dict(rc.row) if rc.row else None
        parts = rc.cell_id.split("__")
        name = row["model"] if row else parts[0]
        config = row["config"] if row else (parts[2] if len(parts) > 2 else "")
        # seed 002 names a model's cells by config only when the run holds that model twice
        label = f"{name} ({config})" if models.count(name) > 1 else name
        status = RUN_STATUS.get(row["outcome"], row["outcome"].upper()) if row else MANIFEST_STATUS.get(
            rc.status, rc.status.upper())
        return {
            "number": number, "cell_id": rc.cell_id, "anchor": anchor(rc.cell_id), "label": label,
            "status": status, "manifest_status": rc.status, "reason": rc.reason, "row": row, "record": rc.record,
            "log_link": self.log_link(row, page_dir),
            "record_link": self.record_link(row, page_dir),
            "levels": probe_levels(rc.record) if rc.record else [],
            "has_memory": bool(rc.record and (rc.record.plan or any(
                not is_missing(row[p]) for p, _ in plots.MEMORY_PARTS))),
        }

    def run_page(self, run: Run) -> Path:
        page = self.reports_dir / "runs" / f"{run.run_id}.md"
        assets = page.parent / run.run_id
        _clean(assets, ("*.svg",))
        cells = self.run_view(run, page.parent)
        rows = [c["row"] for c in cells if c["row"]]
        memory_plots = []
        for device in sorted({r["device"] for r in rows}):
            on_device = [r for r in rows if r["device"] == device]
            path = self._plot(plots.memory_breakdown(on_device, assets / f"memory-{device_slug(device)}.svg",
                                                     f"Memory per GPU on {device}"))
            if path:
                memory_plots.append({"device": device, "link": rel(path, page.parent)})
        for view in cells:
            path = None
            if view["levels"]:
                path = self._plot(plots.probe_curves(view["levels"], assets / f"probes-{view['anchor']}.svg",
                                                     f"{view['label']} on {view['row']['device']}"))
            view["probe_plot"] = rel(path, page.parent) if path else None
        manifest = run.manifest
        host = manifest.host if manifest else (cells[0]["record"].host if cells and cells[0]["record"] else None)
        return self._write(
            page, "run.md.j2", run=run, manifest=manifest, host=host, cells=cells, memory_plots=memory_plots,
            versions=sorted({str(r["engine_version"]) for r in rows if r["engine_version"]}),
            devices=sorted({r["device"] for r in rows}),
            memory=sorted({r["device_memory_gib"] for r in rows if isinstance(r["device_memory_gib"], (int, float))}),
        )

    # ----------------------------------------------------------------------- cross-run pages
    def matrix_page(self, devices: list[dict[str, Any]]) -> Path:
        latest = self.results.latest
        models = sorted(set(latest["model"]), key=str.lower) if not latest.empty else []
        grid = {}
        for model in models:
            for device in devices:
                cells = latest[(latest["model"] == model) & (latest["device"] == device["name"])]
                grid[(model, device["name"])] = _matrix_cell(cells)
        return self._write(self.reports_dir / "matrix.md", "matrix.md.j2", models=models, devices=devices, grid=grid)

    def insights_page(self) -> Path:
        facts = insights.compute(self.results.latest)
        return self._write(self.reports_dir / "insights.md", "insights.md.j2", insights=facts)

    def index_page(self, devices: list[dict[str, Any]], exports: list[Path]) -> Path:
        runs = []
        for run in reversed(self.results.runs):  # newest first: what users look for
            rows = [c.row for c in run.cells if c.row]
            statuses = [c.row["outcome"] if c.row else c.status for c in run.cells]
            host = run.manifest.host.hostname if run.manifest else (rows[0]["host"] if rows else "?")
            runs.append({
                "run_id": run.run_id, "host": host,
                "started_at": run.manifest.started_at if run.manifest else min((r["started_at"] for r in rows), default=""),
                "finished_at": run.manifest.finished_at if run.manifest else None,
                "interrupted": run.interrupted,
                "devices": sorted({r["device"] for r in rows}),
                "versions": sorted({str(r["engine_version"]) for r in rows if r["engine_version"]}),
                "counts": {k: statuses.count(k) for k in ("ok", "failed", "skipped", "not_on_host")},
                "page": f"runs/{run.run_id}.md", "has_page": (self.reports_dir / "runs" / f"{run.run_id}.md").exists(),
            })
        return self._write(self.reports_dir / "README.md", "index.md.j2", runs=runs, devices=devices,
                           problems=self.results.problems,
                           exports=[rel(p, self.reports_dir) for p in exports],
                           versions=sorted({v for d in devices for v in d["versions"]}))

    def exports(self) -> list[Path]:
        data = self.reports_dir / "data"
        _clean(data, ("cells.*", "history.*"))
        data.mkdir(parents=True, exist_ok=True)
        out = []
        for name, df in (("cells", self.results.latest), ("history", self.results.history)):
            if df.empty:
                continue
            out.append(data / f"{name}.csv")
            df.to_csv(out[-1], index=False, lineterminator="\n")
            out.append(data / f"{name}.json")
            out[-1].write_text(json.dumps(_jsonable(df), indent=1, sort_keys=True) + "\n", encoding="utf-8")
            try:
                out.append(data / f"{name}.parquet")
                df.convert_dtypes().to_parquet(out[-1], index=False)
            except ImportError:  # pyarrow (or fastparquet) is optional
                out.pop()
        self.written.extend(out)
        return out


def _jsonable(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in df.to_dict("records")]


def _matrix_cell(cells: pd.DataFrame) -> str:
    """One matrix entry: ✅ when a config worked (n of m), else the failure classes seen."""
    if cells.empty:
        return "—"
    ok = int((cells["outcome"] == "ok").sum())
    total = len(cells)
    if ok:
        return f"✅ {ok}/{total}"
    classes = sorted({str(f) for f in cells["failure_class"] if f})
    if classes:
        return "❌ " + ", ".join(f"`{c}`" for c in classes)
    return "⏭️ skipped"


def render_all(results: Results, reports_dir: Path, runs: list[str] | None) -> list[Path]:
    renderer = Renderer(results, reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    devices = renderer.devices()
    # Pages are only ever added or rewritten: published history (reports/data/runs) holds every
    # run, so a page whose run is not in this machine's results/ is rebuilt, never deleted.
    for device in devices:
        _clean(reports_dir / "devices" / device["slug"], ("*.svg",))
        renderer.device_page(device)
    wanted = None if runs is None else set(runs)
    for run in results.runs:
        if wanted is None or run.run_id in wanted:
            renderer.run_page(run)
    renderer.matrix_page(devices)
    renderer.insights_page()
    renderer.index_page(devices, renderer.exports())
    return sorted(set(renderer.written))
