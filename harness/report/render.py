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
from harness.report import insights, plots, sections, tables, versions
from harness.report.aggregate import Results, Run, RunCell, capacity_trace, is_missing, level_value, probe_levels
from harness.report.tables import MISSING
from harness.schema import FAILURE_CLASSES, slug

TEMPLATES = Path(__file__).parent / "templates"
GIB = 1024**3
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|CREDENTIAL", re.I)


# --------------------------------------------------------------------------- template filters
def num(value: Any, digits: int = 2, missing: str = MISSING) -> str:
    return tables.fixed(value, digits, missing)


def integer(value: Any, missing: str = MISSING) -> str:
    return tables.tokens(value, missing)


def percent(value: Any, missing: str = MISSING) -> str:
    if is_missing(value) or not isinstance(value, (int, float)):
        return missing
    return f"{value * 100:.0f}%"


cell = tables.cell


def code(value: Any) -> str:
    text = cell(value).replace("`", "'")
    return f"`{text}`" if text else ""


OUTCOME_BADGES = {"ok": "✅ ok", "failed": "❌ failed", "skipped": "⏭️ skipped", "inconclusive": "❔ inconclusive"}


def outcome_badge(outcome: str | None) -> str:
    return OUTCOME_BADGES.get(outcome or "", MISSING)


def validation_badge(passed: Any) -> str:
    return {True: "✅ passed", False: "❌ wrong answer"}.get(passed, MISSING) if isinstance(passed, bool) else MISSING


def cli_flag(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if value is True:
        return flag
    if isinstance(value, (dict, list)):
        return f"{flag} '{json.dumps(value, sort_keys=True)}'"
    return f"{flag} {value}"


def kv_cache_memory_flag(value: int) -> str:
    """vLLM logs its advice as `--kv-cache-memory=N`, but the option it has (0.10.2 and later,
    the releases that print the advice) is `--kv-cache-memory-bytes`."""
    return f"--kv-cache-memory-bytes {value}"


def env_value(name: str, value: str) -> str:
    # the runner redacts upstream; this keeps a token-looking variable out even if one slips by
    return "***" if SECRET_NAME.search(name) else value


def value_with_unit(value: Any, unit: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return cell(value if value is not None else MISSING)
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
    env.filters.update(
        num=num,
        int=integer,
        pct=percent,
        cell=cell,
        code=code,
        outcome=outcome_badge,
        validation=validation_badge,
        flag=cli_flag,
        stat=level_value,
        value=value_with_unit,
        env_value=env_value,
        secs=tables.seconds,
        ms=tables.ms,
        evidence=tables.evidence,
        gib=lambda b: tables.gib(b / GIB) if isinstance(b, (int, float)) else MISSING,
    )
    env.globals.update(failure_classes=FAILURE_CLASSES, single_chunk_note=sections.SINGLE_CHUNK_NOTE)
    env.filters.update(anchor=anchor)
    return env


# --------------------------------------------------------------------------- helpers
PATH_COLUMNS = ("record_path", "engine_log_path")  # absolute in the rows, relative in data/


def rel(target: Path, page_dir: Path) -> str:
    return Path(os.path.relpath(target.resolve(), page_dir.resolve())).as_posix()


def device_slug(device: str) -> str:
    return slug(device).lower()


def anchor(cell_id: str) -> str:
    return "cell-" + slug(cell_id).lower().replace(".", "-")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def model_link(row: dict[str, Any]) -> str:
    """The model's name, linked to its hub page only when its source is a hub id."""
    source = str(row.get("model_source") or "")
    if row.get("model_local") or not HUB_ID.fullmatch(source):
        return f"**{cell(row['model'])}**"
    return f"[**{cell(row['model'])}**](https://huggingface.co/{source})"


def records_of(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [] if df.empty else df.to_dict("records")


def memory_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows split by device memory size (GiB, to the nearest whole GiB): one table and one plot
    each, so bars of a 24 GiB and an 80 GiB GPU never share an axis."""
    groups: dict[int | None, list[dict[str, Any]]] = {}
    for row in rows:
        memory = row.get("device_memory_gib")
        groups.setdefault(round(memory) if isinstance(memory, (int, float)) else None, []).append(row)
    out = []
    for size in sorted(groups, key=lambda m: (m is None, m or 0)):
        members = groups[size]
        exact = [r["device_memory_gib"] for r in members if isinstance(r.get("device_memory_gib"), (int, float))]
        out.append(
            {
                "memory_gib": max(exact) if exact else None,
                "rows": members,
                "suffix": f"-{size}gib" if size is not None else "-unknown-memory",
            }
        )
    return out


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
        # a capacity search's trace (every measured level) per record: the frontier plots' points
        self.traces = {
            c.row["record_path"]: capacity_trace(c.record)
            for run in results.runs
            for c in run.cells
            if c.row and c.record
        }

    def _write(self, path: Path, template: str, **context: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.env.get_template(template).render(**context)
        text = tables.prune(re.sub(r"\n{3,}", "\n\n", text))  # an omitted section leaves no gap
        path.write_text(text.strip("\n") + "\n", encoding="utf-8")
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

    def _sections(
        self, rows: list[dict[str, Any]], assets: Path, page: Path, name: str, section_link: Any, why_link: Any
    ) -> list[dict[str, Any]]:
        """Per memory size: the memory table, its plot, the throughput table, plus the frontier
        plots; `section_link(row)` is where a row's status points, `why_link(row)` its note."""
        for row in rows:
            row["model_link"] = model_link(row)
            row["status_link"] = f"[{outcome_badge(row['outcome'])}]({section_link(row)})"
            row["why_link"] = why_link(row)
        out = []
        for group in memory_groups(rows):
            members = group["rows"]
            size = f" ({group['memory_gib']:.2f} GiB)" if group["memory_gib"] is not None else ""
            memory = self._plot(
                plots.memory_breakdown(
                    members, assets / f"memory{group['suffix']}.svg", f"Memory per GPU on {name}{size}"
                )
            )
            throughput, workload, notes = sections.throughput_table(members)
            frontiers = []
            for model in sorted({r["model"] for r in members}, key=str.lower):
                points = [(r, t) for r in members if r["model"] == model for t in self.traces.get(r["record_path"], [])]
                path = self._plot(
                    plots.frontier(
                        points,
                        assets / f"frontier-{slug(model).lower()}{group['suffix']}.svg",
                        f"{model} on {name}{size}: throughput vs. interactivity",
                    )
                )
                if path:
                    frontiers.append({"model": model, "link": rel(path, page.parent)})
            out.append(
                {
                    "title": f"{name}{size}",
                    "memory_gib": group["memory_gib"],
                    "rows": members,
                    "memory_table": sections.memory_table(members),
                    "memory_plot": rel(memory, page.parent) if memory else None,
                    "throughput_table": throughput,
                    "workload": workload,
                    "throughput_notes": notes,
                    "frontiers": frontiers,
                }
            )
        return out

    # ----------------------------------------------------------------------- per device
    def devices(self) -> list[dict[str, Any]]:
        latest = self.results.latest
        out = []
        for device, group in latest.groupby("device", sort=True) if not latest.empty else []:
            memory = pd.to_numeric(group["device_memory_gib"], errors="coerce").dropna()
            counts = group["outcome"].value_counts()
            out.append(
                {
                    "name": device,
                    "slug": device_slug(device),
                    "memory_gib": float(memory.max()) if not memory.empty else None,
                    "hosts": sorted(set(group["host"])),
                    "versions": sorted({str(v) for v in group["engine_version"] if v}),
                    "cells": len(group),
                    **{k: int(counts.get(k, 0)) for k in ("ok", "failed", "skipped", "inconclusive")},
                    "rows": records_of(group),
                }
            )
        return out

    def device_page(self, device: dict[str, Any]) -> Path:
        page = self.reports_dir / "devices" / f"{device['slug']}.md"
        rows = device["rows"]
        groups = self._sections(
            rows,
            page.parent / device["slug"],
            page,
            device["name"],
            lambda r: f"../runs/{r['run_id']}.md#{anchor(r['cell_id'])}",
            lambda r: f"#{sections.why_anchor(r)}",
        )
        load = self._plot(
            plots.load_times(
                rows, page.parent / device["slug"] / "load_time.svg", f"Load time per model on {device['name']}"
            )
        )
        for row in rows:
            row["log_link"] = self.log_link(row, page.parent)
            row["run_link"] = f"../runs/{row['run_id']}.md#{anchor(row['cell_id'])}"
        ingested = [r for r in rows if r["ingested"]]
        return self._write(
            page,
            "device.md.j2",
            device=device,
            groups=groups,
            notes=sections.failure_notes(rows),
            memory_notes=sections.MEMORY_NOTES,
            skipped=[r for r in rows if r["outcome"] == "skipped"],
            gated=[r for r in rows if r["failure_class"] == "gated_or_auth"],
            ingested=ingested,
            sources=sorted({r["log_source"] for r in ingested if r["log_source"]}),
            load_plot=rel(load, page.parent) if load else None,
        )

    # ----------------------------------------------------------------------- per run
    def _cell_view(self, rc: RunCell, page_dir: Path, models: list[str]) -> dict[str, Any]:
        row = dict(rc.row) if rc.row else None
        parts = rc.cell_id.split("__")
        name = row["model"] if row else parts[0]
        config = row["config"] if row else (parts[2] if len(parts) > 2 else "")
        # a model's cells are named by config only when the run holds that model twice
        label = f"{name} ({config})" if models.count(name) > 1 else name
        return {
            "cell_id": rc.cell_id,
            "anchor": anchor(rc.cell_id),
            "label": label,
            "gpu": parts[1] if len(parts) > 1 else "?",
            "manifest_status": rc.status,
            "reason": rc.reason,
            "row": row,
            "record": rc.record,
            "log_link": self.log_link(row, page_dir),
            "record_link": self.record_link(row, page_dir),
            "levels": probe_levels(rc.record) if rc.record else [],
            "has_memory": bool(
                rc.record and (rc.record.plan or any(not is_missing((row or {}).get(p)) for p, _ in plots.MEMORY_PARTS))
            ),
        }

    def run_page(self, run: Run) -> Path:
        page = self.reports_dir / "runs" / f"{run.run_id}.md"
        assets = page.parent / run.run_id
        _clean(assets, ("*.svg",))
        models = [c.row["model"] for c in run.cells if c.row]
        views = [self._cell_view(rc, page.parent, models) for rc in run.cells]
        ran = [v for v in views if v["record"] is not None]
        for number, view in enumerate(ran, 1):
            view["number"] = number
        rows = [v["row"] for v in ran]
        devices = []
        for device in sorted({r["device"] for r in rows}):
            on_device = [r for r in rows if r["device"] == device]
            devices.append(
                {
                    "name": device,
                    "groups": self._sections(
                        on_device,
                        assets / device_slug(device),
                        page,
                        device,
                        lambda r: f"#{anchor(r['cell_id'])}",
                        lambda r: f"#{anchor(r['cell_id'])}",
                    ),
                }
            )
        absent: dict[str, dict[str, Any]] = {}
        for view in views:
            if view["record"] is None:
                entry = absent.setdefault(view["gpu"], {"gpu": view["gpu"], "count": 0, "reasons": []})
                entry["count"] += 1
                if view["reason"] and view["reason"] not in entry["reasons"]:
                    entry["reasons"].append(view["reason"])
        for view in ran:
            path = None
            if view["levels"]:
                title = f"{view['label']} on {view['row']['device']}"
                if view["row"]["workload"]:
                    title += f"\n{view['row']['workload']}"
                path = self._plot(plots.probe_curves(view["levels"], assets / f"probes-{view['anchor']}.svg", title))
            view["probe_plot"] = rel(path, page.parent) if path else None
        manifest = run.manifest
        host = manifest.host if manifest else (ran[0]["record"].host if ran else None)
        return self._write(
            page,
            "run.md.j2",
            run=run,
            manifest=manifest,
            host=host,
            cells=ran,
            devices=devices,
            absent=list(absent.values()),
            memory_notes=sections.MEMORY_NOTES,
            versions=sorted({str(r["engine_version"]) for r in rows if r["engine_version"]}),
            kv_flag=kv_cache_memory_flag,
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
        return self._write(
            self.reports_dir / "insights.md",
            "insights.md.j2",
            insights=facts,
            version_changes=versions.largest_changes(self.results.latest),
        )

    def versions_page(self) -> Path:
        return self._write(
            self.reports_dir / "versions.md",
            "versions.md.j2",
            columns=versions.COLUMNS,
            comparisons=versions.comparisons(self.results.latest),
        )

    def index_page(self, devices: list[dict[str, Any]], exports: list[Path]) -> Path:
        runs = []
        for run in reversed(self.results.runs):  # newest first: what users look for
            rows = [c.row for c in run.cells if c.row]
            statuses = [c.row["outcome"] if c.row else c.status for c in run.cells]
            host = run.manifest.host.hostname if run.manifest else (rows[0]["host"] if rows else "?")
            runs.append(
                {
                    "run_id": run.run_id,
                    "host": host,
                    "started_at": run.manifest.started_at
                    if run.manifest
                    else min((r["started_at"] for r in rows), default=""),
                    "finished_at": run.manifest.finished_at if run.manifest else None,
                    "interrupted": run.interrupted,
                    "devices": sorted({r["device"] for r in rows}),
                    "versions": sorted({str(r["engine_version"]) for r in rows if r["engine_version"]}),
                    "counts": {
                        k: statuses.count(k) for k in ("ok", "failed", "skipped", "inconclusive", "not_on_host")
                    },
                    "page": f"runs/{run.run_id}.md",
                    "has_page": (self.reports_dir / "runs" / f"{run.run_id}.md").exists(),
                }
            )
        ingested = [r for r in self.results.runs if r.manifest and r.manifest.matrix_path.startswith("ingested:")]
        return self._write(
            self.reports_dir / "README.md",
            "index.md.j2",
            runs=runs,
            devices=devices,
            ingested=len(ingested),
            problems=self.results.problems,
            exports=[rel(p, self.reports_dir) for p in exports],
            versions=sorted({v for d in devices for v in d["versions"]}),
        )

    def exports(self) -> list[Path]:
        data = self.reports_dir / "data"
        _clean(data, ("cells.*", "history.*"))
        data.mkdir(parents=True, exist_ok=True)
        out = []
        for name, df in (("cells", self.results.latest), ("history", self.results.history)):
            if df.empty:
                continue
            # Files named relative to data/ itself: the same export from any checkout, and the
            # names lead somewhere for a reader of the published copy.
            df = df.assign(**{c: df[c].map(lambda v: rel(Path(v), data) if v else v) for c in PATH_COLUMNS if c in df})
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
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in df.to_dict("records")
    ]


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
    if (cells["outcome"] == "inconclusive").any():
        return "❔ inconclusive"
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
    renderer.versions_page()
    renderer.index_page(devices, renderer.exports())
    return sorted(set(renderer.written))
