"""Engine log -> EngineFacts: memory breakdown, timings, outcome, failure class and remedy.

Pure and streaming: one pass over the lines, bounded memory, never raises on any text.
Stages: `lines` (prefixes, ANSI, CRLF, wraps) -> `facts` (numbers) + `failures` (class,
evidence, remedy) + `config` (model and engine args, for `ingest`).

    parse_log(text) -> EngineFacts          parse_log_file(path) -> EngineFacts
    classify_failure(text) -> (class, evidence, remedy) | None
    scan_file(path) -> (EngineFacts, LogConfig)
"""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike

from harness.parse import facts as _facts
from harness.parse.config import LogConfig
from harness.parse.failures import Failures
from harness.parse.lines import is_noise, logical_lines, physical_lines, split_text
from harness.schema import EngineFacts

__all__ = ["LogConfig", "classify_failure", "parse_log", "parse_log_file", "scan", "scan_file"]

# A config line can only be one of these; checked before the config parser runs.
_CONFIG_MARKS = ("non-default args:", "args: Namespace(", " with config: ")


def _names_vllm(msg: str) -> bool:
    return "vllm" in msg or "vLLM" in msg or "VLLM" in msg


def scan(lines: Iterable[str]) -> tuple[EngineFacts, LogConfig]:
    """One pass over physical lines: the facts and the model/args the log states."""
    facts = _facts.Facts()
    failures = Failures()
    config = LogConfig()
    feed_facts = _facts.feed
    feed_failure = failures.feed
    vllm_log = False  # anything only vLLM (or its workers) prints: the text is a vLLM log
    for line in logical_lines(lines):
        msg = line.msg
        if not msg:
            vllm_log = vllm_log or line.proc is not None  # a bare `(EngineCore_DP0 pid=1) ` prefix
            continue
        if is_noise(msg):
            facts.ready = True  # only a serving engine logs stats, requests and HTTP accesses
            continue
        # a header, a process prefix (`(EngineCore_DP0 pid=1)`, `(RayWorkerWrapper pid=3)`), or the
        # name in a line that is no traceback frame (a command line, a banner, an exception's module):
        # about vLLM. Frames count only in vLLM's own code (`failures`): an HTTP client's `hosted_vllm`
        # module is not the engine.
        vllm_log = (
            vllm_log
            or line.has_header
            or line.proc is not None
            or (_names_vllm(msg) and not msg.lstrip().startswith('File "'))
        )
        # DEBUG lines are most of a DEBUG log; only a few state facts (all in GiB, or blocks)
        if line.level != "DEBUG" or "GiB" in msg or "blocks" in msg:
            feed_facts(line, facts)
        feed_failure(line, facts)
        if "args" in msg or "config: " in msg:
            if any(mark in msg for mark in _CONFIG_MARKS):
                config.feed(line)
    values = facts.result()
    failure = failures.result(facts)
    if failure is not None:
        cls, evidence, remedy = failure
        values.update(failure_class=cls, failure_evidence=evidence, remedy=remedy)
        # a chat-template error is raised by a request: the engine was serving
        values["outcome"] = "ready" if facts.ready or cls == "chat_template_missing" else "failed"
    elif facts.ready:
        values["outcome"] = "ready"
    else:
        # cut before the engine got ready or failed (or not a vLLM log at all)
        # (vLLM's own progress: the shard-loading bar)
        vllm_log = (
            vllm_log or len(values) > 1 or failures.shm_waits > 0 or failures.vllm_frames or facts.loading_started
        )
        values["outcome"] = "inconclusive" if vllm_log else "unknown"
    return EngineFacts.model_validate(values), config


def parse_log(text: str) -> EngineFacts:
    return scan(split_text(text))[0]


def scan_file(path: str | PathLike[str]) -> tuple[EngineFacts, LogConfig]:
    with open(path, encoding="utf-8", errors="replace", newline=None) as stream:
        return scan(physical_lines(stream))


def parse_log_file(path: str | PathLike[str]) -> EngineFacts:
    return scan_file(path)[0]


def classify_failure(text: str) -> tuple[str, str, str] | None:
    facts = parse_log(text)
    if facts.failure_class is None:
        return None
    return facts.failure_class, facts.failure_evidence or "", facts.remedy or ""
