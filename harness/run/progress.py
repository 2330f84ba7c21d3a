"""Progress of a matrix run: a live rich table on a terminal, plain lines elsewhere, or nothing
(`--json`, where stdout carries records).

One line per cell: phase (fetching, planning, starting, loading, ready, validating, probing,
stopping, done), elapsed seconds, outcome; a summary table at the end.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table

from harness.schema import CellRecord

NOT_ON_HOST = "not on this host"


@dataclass
class _Line:
    cell_id: str
    phase: str = "waiting"
    started: float | None = None
    ended: float | None = None
    outcome: str = ""
    detail: str = ""

    def elapsed(self) -> str:
        if self.started is None:
            return ""
        return f"{(self.ended or time.monotonic()) - self.started:.1f} s"


@dataclass
class Progress:
    cell_ids: list[str]
    mode: str = "auto"  # "live" | "plain" | "quiet" | "auto"
    title: str = "vLLM matrix"
    show_nodes: bool = False  # a node column: which cluster node runs each cell (Ray runs)
    nodes: dict[str, str] = field(default_factory=dict)
    _absent: dict[str, int] = field(default_factory=dict)  # not-on-host reason -> cells
    _lines: dict[str, _Line] = field(default_factory=dict)
    _live: Live | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._lines = {c: _Line(c) for c in self.cell_ids}
        self.console = Console(stderr=True)
        if not self.console.is_terminal:  # CI logs and pipes: no 80-column squeeze of cell ids
            self.console = Console(stderr=True, width=160)
        if self.mode == "auto":
            self.mode = "live" if self.console.is_terminal else "plain"

    def __enter__(self) -> Progress:
        if self.mode == "live":
            self._live = Live(self._table(), console=self.console, refresh_per_second=4, get_renderable=self._table)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live:
            self._live.__exit__(None, None, None)
            self._live = None

    def add(self, cell_id: str, phase: str, outcome: str = "", detail: str = "") -> None:
        """A cell that is not run (reused) is shown with its reason; cells not on this host are
        counted by reason instead (a GPU matrix on a CPU box would otherwise bury the rest)."""
        if phase == NOT_ON_HOST:
            with self._lock:
                self._lines.pop(cell_id, None)
                self._absent[detail] = self._absent.get(detail, 0) + 1
            return
        self._lines[cell_id] = _Line(cell_id, phase=phase, outcome=outcome, detail=detail)
        if self.mode == "plain":
            self._print(self._lines[cell_id])

    def phase(self, cell_id: str, phase: str) -> None:
        with self._lock:
            line = self._lines.setdefault(cell_id, _Line(cell_id))
            if line.started is None:
                line.started = time.monotonic()
            if line.phase == phase:
                return
            line.phase = phase
        if self.mode == "plain":
            self._print(line)

    def done(self, record: CellRecord) -> None:
        with self._lock:
            line = self._lines.setdefault(record.cell_id, _Line(record.cell_id))
            line.phase, line.ended = "done", time.monotonic()
            line.outcome = record.outcome
            line.detail = (
                record.failure_class
                or record.skip_reason
                or ("validation passed" if record.validation and record.validation.passed else "")
            )
        if self.mode == "plain":
            self._print(line)

    def _print(self, line: _Line) -> None:
        tail = f" {line.outcome}" if line.outcome else ""
        tail += f" ({line.detail})" if line.detail else ""
        node = f" → {self.nodes[line.cell_id]}" if line.cell_id in self.nodes else ""
        print(f"[{line.elapsed():>8}] {line.cell_id}{node}: {line.phase}{tail}", file=sys.stderr, flush=True)

    def _table(self) -> Table:
        table = Table(title=self.title, expand=False)
        columns = ["cell", *(["node"] if self.show_nodes else []), "phase", "elapsed", "outcome", "detail"]
        for col in columns:
            table.add_column(col)
        colours = {"ok": "green", "failed": "red", "skipped": "yellow"}
        for line in self._lines.values():
            style = colours.get(line.outcome, "")
            node = [self.nodes.get(line.cell_id, "")] if self.show_nodes else []
            table.add_row(
                line.cell_id,
                *node,
                line.phase,
                line.elapsed(),
                f"[{style}]{line.outcome}[/]" if style else line.outcome,
                line.detail,
            )
        return table

    def summary(self) -> None:
        if self.mode != "quiet":
            self.console.print(self._table())
            for reason, count in sorted(self._absent.items()):
                self.console.print(f"{count} cell{'s' * (count != 1)} not on this host: {reason}")
