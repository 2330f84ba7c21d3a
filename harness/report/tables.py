"""Report tables: number formats (one precision per unit) and GFM tables that carry no noise.

Every page goes through `prune`: a column whose every value is missing is left out. `gfm`
builds a table from rows and writes nothing when there are none (the page then says in one
line why). Numbers
use one precision per unit: GiB to 2 decimals, seconds to 1, milliseconds to 1, tokens as
integers with thousands separators.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MISSING = "—"
GIB = 1024**3


def _number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
    )


def fixed(value: Any, digits: int, missing: str = MISSING) -> str:
    return f"{value:,.{digits}f}" if _number(value) else missing


def gib(value: Any, missing: str = MISSING) -> str:
    return fixed(value, 2, missing)


def seconds(value: Any, missing: str = MISSING) -> str:
    return fixed(value, 1, missing)


def ms(value: Any, missing: str = MISSING) -> str:
    return fixed(value, 1, missing)


def tokens(value: Any, missing: str = MISSING) -> str:
    return f"{int(value):,}" if _number(value) else missing


def cell(value: Any) -> str:
    """Text safe inside a GFM table cell: no pipe ends the cell, no newline ends the row."""
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ").strip()


# A source line quoted in a traceback (`raise ValueError(`) is where the error was raised, not
# what it says; the message is the last "SomethingError: ..." line.
_RAISE = re.compile(r"^\s*(raise\b|File \"|\^+$|~+$)")
_MESSAGE = re.compile(r"\b[A-Za-z_.]*(Error|Exception|Exit)\b:?\s*\S")
_LIST = re.compile(r"\[([^\[\]]{120,})\]")


def _trim_list(match: re.Match[str]) -> str:
    items = [i.strip() for i in match.group(1).split(",")]
    if len(items) <= 4:
        return match.group(0)
    return "[" + ", ".join(items[:3]) + f", … {len(items) - 3} more]"


def evidence(detail: Any, limit: int = 160) -> str | None:
    """One line of evidence: the error message (not the `raise` line), long lists trimmed."""
    if not detail:
        return None
    lines = [ln.strip() for ln in str(detail).splitlines() if ln.strip() and not _RAISE.match(ln)]
    if not lines:
        return None
    messages = [ln[m.start() :] for ln in lines for m in [_MESSAGE.search(ln)] if m]  # log prefixes dropped
    text = _LIST.sub(_trim_list, (messages or lines)[-1])
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[dict[str, Any]], str]
    right: bool = False  # numbers align right


def gfm(columns: Sequence[Column], rows: Sequence[dict[str, Any]]) -> str:
    """A GFM table of `rows`; "" when there are none. (`prune` drops its empty columns.)"""
    if not rows:
        return ""
    head = "| " + " | ".join(col.header for col in columns) + " |"
    rule = "|" + "|".join("--:" if col.right else "---" for col in columns) + "|"
    body = ["| " + " | ".join(col.value(r) for col in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


_PIPE = re.compile(r"(?<!\\)\|")
_RULE = re.compile(r"\|(\s*:?-+:?\s*\|)+")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in _PIPE.split(line.strip())[1:-1]]


def prune(markdown: str) -> str:
    """Every GFM table of a page without its columns whose every value is missing ("", —, N/A)."""
    lines = markdown.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and _RULE.fullmatch(lines[i + 1].strip()):
            end = i + 2
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            rows = [_cells(ln) for ln in [lines[i], *lines[i + 2 : end]]]
            rule = _cells(lines[i + 1])
            width = len(rows[0])
            if all(len(r) == width for r in rows) and len(rule) == width and len(rows) > 1:
                keep = [c for c in range(width) if any(r[c] not in ("", MISSING, "N/A") for r in rows[1:])]
                out.append("| " + " | ".join(rows[0][c] for c in keep) + " |")
                out.append("|" + "|".join(rule[c] for c in keep) + "|")
                out.extend("| " + " | ".join(r[c] for c in keep) + " |" for r in rows[1:])
            else:
                out.extend(lines[i:end])
            i = end
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out)
