"""The model and engine args a log states: `non-default args: {…}` (0.8+), `args: Namespace(…)`
(≤0.7 API server), and the engine's `Initializing … LLM engine (vX) with config: …` line.

Used by `ingest` to rebuild a cell from a log alone. Values are Python literals as vLLM
printed them; anything that is not a plain literal is kept as its text.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

from harness.parse.lines import LogLine

# Front-end options that say nothing about the engine (and may hold secrets).
_NOT_ENGINE = frozenset(
    {
        "model",
        "model_tag",
        "host",
        "port",
        "api_key",
        "dispatch_function",
        "subparser",
        "ssl_keyfile",
        "ssl_certfile",
        "allowed_origins",
        "allowed_methods",
        "allowed_headers",
        "uvicorn_log_level",
        "served_model_name",
    }
)
# From the engine config line: (its key, the engine arg, a default to leave out)
_CONFIG_KEYS = (
    ("max_seq_len", "max_model_len", None),
    ("tensor_parallel_size", "tensor_parallel_size", "1"),
    ("pipeline_parallel_size", "pipeline_parallel_size", "1"),
    ("dtype", "dtype", None),
    ("quantization", "quantization", "None"),
    ("enforce_eager", "enforce_eager", "False"),
    ("kv_cache_dtype", "kv_cache_dtype", "auto"),
    ("trust_remote_code", "trust_remote_code", "False"),
)
_PAIR = re.compile(r"(\w{1,64})=('(?:[^'\\]|\\.)*'|\"[^\"]*\"|[^,()\[\]{}]*)")
_DICT_PAIR = re.compile(r"'(\w{1,64})': ('(?:[^'\\]|\\.)*'|[^,{}\[\]]+)")


@dataclass
class LogConfig:
    model: str | None = None
    args: dict[str, Any] = field(default_factory=dict)  # non-default engine args, snake_case
    config_args: dict[str, Any] = field(default_factory=dict)  # from the engine config line
    revision: str | None = None

    def feed(self, line: LogLine) -> None:
        msg = line.msg
        if msg.startswith("non-default args: {"):
            self._take(_literal_dict(msg[len("non-default args: ") :]))
        elif msg.startswith("args: Namespace("):
            self._take({k: _literal(v) for k, v in _PAIR.findall(msg[len("args: Namespace(") :])})
        elif " with config: " in msg and "LLM engine" in msg:
            pairs = dict(_PAIR.findall(msg.split(" with config: ", 1)[1]))
            if self.model is None and "model" in pairs:
                self.model = _literal(pairs["model"])
            if self.revision is None and pairs.get("revision", "None") != "None":
                self.revision = _literal(pairs["revision"])
            for key, arg, default in _CONFIG_KEYS:
                value = pairs.get(key)
                if value is not None and value.strip() != default:
                    text = value.strip()
                    if key == "dtype":
                        text = text.removeprefix("torch.")
                    self.config_args.setdefault(arg, _literal(text))

    def _take(self, found: dict[str, Any]) -> None:
        if not found:
            return
        if isinstance(found.get("model"), str) and not self.model:
            self.model = found["model"]
        elif isinstance(found.get("model_tag"), str) and not self.model:
            self.model = found["model_tag"]
        for key, value in found.items():
            if key not in _NOT_ENGINE:
                self.args.setdefault(key, value)

    def engine_args(self) -> dict[str, Any]:
        """Non-default args when the log printed them, else what the config line states."""
        return dict(self.args) if self.args else dict(self.config_args)


def _literal(text: str) -> Any:
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _literal_dict(text: str) -> dict[str, Any]:
    if len(text) > 64 * 1024:
        return {}
    try:
        value = ast.literal_eval(text.strip())
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    # reprs of objects inside the dict defeat literal_eval: keep the plain pairs
    return {k: _literal(v) for k, v in _DICT_PAIR.findall(text)}
