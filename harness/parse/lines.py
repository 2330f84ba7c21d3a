"""Physical log text -> canonical logical vLLM log lines (the parser's first stage).

The normaliser in front of the fact and failure rules. It removes what sits between vLLM's
formatter and us: ANSI colours (also pasted without their ESC byte), CRLF, Markdown from pasted
issues (quote marks, inline-code backticks around a whole line, emphasis around numbers), and
any prefix ahead of vLLM's own `LEVEL date [file:line]` header in every form vLLM printed
(0.2: `INFO 08-29 20:48:52 llm_engine.py:70]`, 0.8+: `[file.py:70]`, full dates with
milliseconds from logging wrappers). Known foreign prefixes are also cut from lines that carry
no vLLM header (tracebacks, bare exceptions): ISO/docker/buildkite timestamps, journald
`Mon DD HH:MM:SS host proc[pid]:` with the month in any locale, docker compose `svc  | `,
supervisor tags `[Error] (Process)`, and vLLM/Ray process prefixes (`(EngineCore_DP0 pid=1)`,
`(RayWorkerWrapper pid=3, ip=…)`), also colour codes written out as text (`^[[1;36m`). 0.32+ JSON
log lines are unpacked, glog lines keep their level, a paste that lost its newlines is cut at
each vLLM header, and lines a terminal hard-wrapped are re-joined. Every regex here is anchored or bounded (no nested unbounded
repeats), so no input makes it backtrack quadratically. Memory is bounded: a physical line
longer than MAX_LINE characters is cut (the rest is skipped, never buffered).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MAX_LINE = 256 * 1024  # the supported-architectures list is ~15 KB; nothing useful is longer
_WRAP_MIN = 70  # terminals narrower than this are not worth guessing about
_MAX_JOINED = 8 * 1024  # a wrapped logical line never grows past this

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# ANSI colour codes whose ESC byte was lost in a paste: `[36m(RayWorkerVllm pid=5) [0m`
_ANSI_LOST = re.compile(r"\[\d{1,3}(?:;\d{1,3}){0,4}m")
# Markdown emphasis around a number or size a user highlighted: **14.99**, *0.90*, __8 GiB__
_EMPHASIS = re.compile(r"(\*{1,2}|__)(-?[\d.,]{1,30}(?: ?[KMGT]i?B)?)\1")
_BOLD = re.compile(r"\*\*([^*\s][^*]{0,500}?)\*\*")
# vLLM's own header, found anywhere in the first part of a line (foreign prefixes precede it):
# `INFO 08-29 20:48:52 llm_engine.py:70]` (≤0.7), `INFO 10-03 10:15:50 [gpu_worker.py:298]` (some
# builds print no seconds: `ERROR 11-03 23:14 [serving_chat.py:1145]`),
# and wrappers that print a full date with milliseconds and extra fields before the file:line.
_HEADER = re.compile(
    r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) ((?:\d{4}-)?\d\d-\d\d[ T]\d\d:\d\d(?::\d\d)?)(?:[.,]\d{1,9})? "
    r"(?:[\w.-]{1,64} ){0,3}?\[?[^\s\]]{1,200}?:\d+(?:\] ?| - )"
)
# Foreign prefixes of a header-less line, cut one after the other (at most _MAX_PREFIXES).
_PREFIX = re.compile(
    r"(?:\[?\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?\]?"  # ISO, docker, CI
    r"|(?:[^\W\d_]{2,10}\.?|\d{1,2}月) {1,2}\d{1,2} \d\d:\d\d:\d\d [\w.-]{1,64} [\w./@-]{1,64}\[\d{1,10}\]:"  # journald
    r"|[\w.-]{1,64} {1,8}\|(?= )"  # docker compose service
    r"|\|(?= )|>+"  # CI log table column, Markdown quote
    r"|\[(?:Error|Info|Warning|Warn|Debug|Critical|Fatal|ERROR|INFO|WARNING|DEBUG)\](?: \([^()]{1,40}\))?"  # supervisor tags
    r"|\((\w[^()]{0,80}?) pid=(\d+)(?:, ip=[^()]{1,60})?\)"  # vLLM/Ray process prefix
    r"|\[rank\d{1,5}\]:(?!\[)"  # torch's per-rank stderr prefix (not its `[rank0]:[W…]` warnings)
    # a colour code whose ESC was lost, or written out as text by a pager or a dump (`^[[1;36m`,
    # `\x1b[`, `\033[`, `\u001b[`), left alone by a progress bar's CR that parted it from its reset
    # (the text form may have lost its `[…m` to the ESC-less cleanup already)
    r"|(?:\^\[|\\(?:x1[bB]|033|u001[bB]|e))(?:\[\d{1,3}(?:;\d{1,3}){0,4}m)?|\[\d{1,3}(?:;\d{1,3}){0,4}m"
    r") ?"
)
_MAX_PREFIXES = 6
# After a timestamp, other logging wrappers' own level field (KServe `1 kserve ERROR [f.py:<module>():254]`,
# TorchServe `[INFO ] W-9000-model_1.0-stdout MODEL_LOG -`, `- INFO - autotuner.py:2216 -`,
# DeepSpeed `[INFO] [real_accelerator.py:219:get_accelerator]`): cut too, its level kept.
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:")
_FOREIGN_LEVEL = re.compile(
    r"(?:[\w.-]{1,40} ){0,3}?-? ?\[?(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL) {0,2}\]? (?:- )?"
    r"(?:\[[^\]]{1,160}\] ?|[\w.-]{1,80}:\d{1,6} - |(?:[\w.-]{1,80} ){1,2}- )?"
)
# glog's header (Triton, abseil, NCCL's C++ side): `E1027 15:54:53.431777 1342 model.py:502] ` (level
# letter, MMDD, time, thread id, file:line); its level is kept, it is no vLLM header.
_GLOG = re.compile(r"([IWEF])\d{4} \d\d:\d\d:\d\d(?:\.\d{1,9})? {1,8}\d{1,10} [^\s\]]{1,200}:\d{1,6}\] ")
_GLOG_LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
# A wrapper relays its child's stdout/stderr at INFO: only its warnings and errors say something.
_FOREIGN_LEVELS = {
    "WARN": "WARNING",
    "WARNING": "WARNING",
    "ERROR": "ERROR",
    "CRITICAL": "CRITICAL",
    "FATAL": "CRITICAL",
}
# The last `(name pid=N[, ip=…])` group before the header names the process.
_PROC = re.compile(r"\(([^()]{1,80}?) pid=(\d+)(?:, ip=[^()]{1,60})?\)[^()]*$")
# Lines that start something of their own even without a vLLM header: never wrap-joined.
_STANDALONE = re.compile(
    r"(?:Traceback |  File |File \S| {4}|During handling|The above exception|\[rank\d|\[[WE]\d{4}|\d{3} \w+ Error|"
    r"[A-Z]{4,8}:|[\w.]*(?:Error|Exception|Exit|Interrupt|Warning)\b|\(\w[^()]{0,60} pid=\d|"
    r"[\w.-]{1,40} +\| |\{|Process |Loading |Capturing |\w[\w ]{0,40}: *\d+%\|)"
)


@dataclass(slots=True)
class LogLine:
    """One logical line: `msg` is the text after vLLM's header (the whole line if none)."""

    msg: str
    proc: str | None = None  # process name from the prefix, e.g. "Worker_TP1"
    pid: str | None = None
    level: str | None = None
    has_header: bool = False


def physical_lines(stream) -> Iterator[str]:
    """Lines of a text stream, each at most MAX_LINE characters, without their newline."""
    readline = stream.readline
    while True:
        line = readline(MAX_LINE)
        if not line:
            return
        if line.endswith("\n"):
            yield line[:-1]
            continue
        yield line
        while line and not line.endswith("\n"):  # skip the rest of an over-long line
            line = readline(MAX_LINE)


def split_text(text: str) -> Iterator[str]:
    """Physical lines of an in-memory string (CR, LF and CRLF all end a line)."""
    for line in text.splitlines():
        yield line[:MAX_LINE]


_UVICORN_LEVELS = frozenset({"INFO", "DEBUG", "WARNING", "ERROR", "CRITICAL"})
_UVICORN = frozenset(level[:5] for level in _UVICORN_LEVELS)


def clean(raw: str) -> str:
    """Without ANSI colour codes (with or without their ESC byte), carriage returns and the
    Markdown a pasted issue adds; each step is gated by a substring test (the common line
    pays a few `in` checks)."""
    if "\x1b" in raw:
        raw = _ANSI.sub("", raw)
    if "\r" in raw:
        raw = raw.replace("\r", "")
    if "[0m" in raw:
        raw = _ANSI_LOST.sub("", raw)
    if raw[:1] in _MARKDOWN_START:
        raw = raw.lstrip("`> ")
    if raw[-1:] == "`":
        raw = raw.rstrip("`")
    if "*" in raw or "__" in raw:
        raw = _EMPHASIS.sub(r"\2", raw)
        if "**" in raw:  # bold around words or a whole line (not a run of *: a redacted name)
            raw = _BOLD.sub(r"\1", raw)
    return raw


_MARKDOWN_START = frozenset("`>")


# Lines that fill long logs and never state a fact or a failure: request/stat chatter.
_NOISE_PREFIXES = (
    "Avg prompt throughput",
    "Received request",
    "Finished request",
    "Added request",
    "Aborted request",
    "Engine 0",
)


def is_noise(msg: str) -> bool:
    """Periodic stats, per-request and HTTP access lines (the bulk of a long-running log).
    Only a serving engine prints them."""
    if msg.startswith(_NOISE_PREFIXES):
        return not msg.startswith("Engine 0") or "throughput" in msg[:40]
    # uvicorn access line: ... HTTP/1.1" 200 OK / 400 Bad Request
    return " HTTP/1." in msg and (msg[-3:].isalpha() or msg[-3:] == " OK")


def _uvicorn(raw: str) -> LogLine | None:
    """uvicorn's own `INFO:     …` lines."""
    if raw[:5] in _UVICORN and raw[5:6] in (":", "I"):
        head, _, rest = raw.partition(":")
        if head in _UVICORN_LEVELS:
            return LogLine(rest.strip(), None, None, head, False)
    return None


def strip_prefixes(raw: str) -> tuple[str, str | None, str | None]:
    """A header-less line without its foreign prefixes, and the process a prefix named."""
    text = raw.lstrip()
    proc = pid = None
    for _ in range(_MAX_PREFIXES):
        m = _PREFIX.match(text)
        if m is None or not m.end():
            break
        if m.group(2):
            proc, pid = m.group(1).strip(), m.group(2)
        text = text[m.end() :].lstrip()
    if text[-2:] == "^M":  # caret notation's carriage return (`cat -v`)
        text = text[:-2]
    return text, proc, pid


def _parse(raw: str) -> LogLine:
    if raw[:5] in _UVICORN and raw[5:6] in (":", "I"):  # inline: the commonest line of a long log
        line = _uvicorn(raw)
        if line is not None:
            return line
    m = _HEADER.search(raw, 0, 400)
    if m is None:
        if raw[:1] == "{" and '"message"' in raw:
            return _parse_json(raw)
        if raw[:1] in _GLOG_LEVELS and raw[1:2].isdigit():
            g = _GLOG.match(raw)
            if g is not None:
                return LogLine(raw[g.end() :].rstrip(), None, None, _GLOG_LEVELS[g.group(1)])
        text, proc, pid = strip_prefixes(raw)
        if text is not raw and text:
            line = _uvicorn(text)
            if line is not None:
                line.proc, line.pid = proc, pid
                return line
            if text[:1] == "{" and '"message"' in text:
                return _parse_json(text)
            # the rest may hold a header after all (`> INFO …`, a prefix longer than 400)
            m = _HEADER.match(text)
            if m is not None:
                return LogLine(text[m.end() :].rstrip(), proc, pid, m.group(1), True)
            if _TIMESTAMP.search(raw, 0, len(raw) - len(text)):  # a timestamp was among the cut prefixes
                fm = _FOREIGN_LEVEL.match(text)
                if fm is not None:
                    return LogLine(text[fm.end() :].rstrip(), proc, pid, _FOREIGN_LEVELS.get(fm.group(1)))
        return LogLine(text.rstrip(), proc, pid)
    start = m.start()
    proc = pid = None
    if start and "pid=" in raw[:start]:
        pm = _PROC.search(raw, 0, start)
        if pm:
            proc, pid = pm.group(1).strip(), pm.group(2)
    return LogLine(raw[m.end() :].rstrip(), proc, pid, m.group(1), True)


def _parse_json(raw: str) -> LogLine:
    """0.32+ `--logging-config.formatter json`: fields asctime, levelname, processName, …"""
    try:
        obj = json.loads(raw)
    except ValueError:
        return LogLine(raw.strip())
    if not isinstance(obj, dict) or not isinstance(obj.get("message"), str):
        return LogLine(raw.strip())
    proc = obj.get("processName")
    pid = obj.get("process")
    return LogLine(
        obj["message"],
        str(proc) if proc else None,
        str(pid) if pid is not None else None,
        str(obj.get("levelname") or "") or None,
        True,
    )


def logical_lines(lines: Iterable[str]) -> Iterator[LogLine]:
    """Parse physical lines, re-joining a line a terminal hard-wrapped.

    A header-less line continues the previous one when the previous physical piece was at
    least _WRAP_MIN wide (and, for a second continuation, exactly as wide as the first:
    a terminal cuts at one fixed width) and it does not look like a line of its own.
    Such a piece is also yielded alone, before the joined line.
    """
    pending: LogLine | None = None
    width = 0  # width of the first cut piece of `pending`, 0 if it was not cut
    last_len = 0  # length of the last physical piece added to `pending`
    for raw in _pieces(lines):
        line = _parse(raw)
        if (
            pending is not None
            and not line.has_header
            and line.msg
            and last_len >= _WRAP_MIN
            and (width == 0 or last_len == width)
            and len(pending.msg) < _MAX_JOINED
            and not _STANDALONE.match(raw)
            and not _PREFIX.match(raw)  # a timestamp, journald, … prefix starts a line of its own
        ):
            width = width or last_len
            last_len = len(raw)
            # a terminal wraps at a character boundary: the pieces join with nothing between
            pending.msg += raw
            # the guess may be wrong (a header-less log of short separate lines): the piece
            # is read on its own too; fact rules need whole phrases, so a true fragment
            # matches nothing by itself
            yield line
            continue
        if pending is not None:
            yield pending
        pending, width, last_len = line, 0, len(raw)
    if pending is not None:
        yield pending


def _pieces(lines: Iterable[str]) -> Iterator[str]:
    """Cleaned physical lines; a long one that holds several vLLM lines comes out in pieces."""
    for raw in lines:
        raw = clean(raw)
        if len(raw) < _FLAT_MIN:
            yield raw
        else:
            yield from unflatten(raw)


_FLAT_MIN = 400  # shorter lines are never a paste of several


def unflatten(raw: str) -> list[str]:
    """A paste that lost its newlines holds several vLLM lines, each with its own header: cut
    before the second and later headers (what precedes the first stays with it: its prefix)."""
    first = _HEADER.search(raw, 0, 400)
    if first is None:
        return [raw]
    pieces: list[str] = []
    start, pos = 0, first.end()
    while (m := _HEADER.search(raw, pos)) is not None:
        pieces.append(raw[start : m.start()].rstrip())
        start, pos = m.start(), m.end()
    pieces.append(raw[start:])
    return pieces
