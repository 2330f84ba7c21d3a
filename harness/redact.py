"""Secrets out of everything the harness stores: engine logs, records, reports.

`Redactor.redact(text)` removes given literal secrets, Hugging Face tokens (hf_…), values of
`--api-key X` / `api_key=…` / `"api_key": …`, `Authorization: Bearer …` headers and the
values of environment variables named like *TOKEN*/*KEY*/*SECRET*/*PASSWORD*. It is called on
every engine log line, so the common case (no secret-ish text) costs a few substring tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
_SECRET_ENV = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_MIN_SECRET = 4  # shorter values ("1", "yes") would blank out ordinary text

_PATTERNS = (
    re.compile(r"\bhf_[A-Za-z0-9]{8,}"),
    re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?(?:bearer|basic|token)\s+)([^\s'\",]+)"),
    re.compile(r"(?i)(--api[-_]key[= ]\s*['\"]?)([^\s'\"]+)"),
    re.compile(r"(?i)(\bapi[-_]?key['\"]?\s*[:=]\s*\[?['\"]?)(?!\*\*\*|None\b|null\b)([^\s'\",)}]+)"),
    re.compile(
        r"(?i)(\b[\w]*(?:token|secret|password)['\"]?\s*[:=]\s*['\"]?)(?!\*\*\*|None\b|null\b|True\b|False\b|\d+\b)([^\s'\",)}]{6,})"
    ),
)
_TRIGGERS = (
    "hf_",
    "uthorization",
    "UTHORIZATION",
    "api",
    "API",
    "Api",
    "oken",
    "OKEN",
    "ecret",
    "ECRET",
    "assword",
    "ASSWORD",
)


def secret_env_values(env: Mapping[str, str]) -> set[str]:
    """Values of the variables named like secrets (*TOKEN*, *KEY*, ...), long enough to mask safely."""
    return {
        value
        for name, value in env.items()
        if isinstance(value, str) and len(value) >= _MIN_SECRET and _SECRET_ENV.search(name)
    }


class Redactor:
    def __init__(self, secrets: Iterable[str] = (), env: Mapping[str, str] | None = None) -> None:
        found = {s for s in secrets if s and len(s) >= _MIN_SECRET} | secret_env_values(env or {})
        # longest first, so a secret that contains another is removed whole
        self._literals = sorted(found, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._literals:
            if secret in text:
                text = text.replace(secret, MASK)
        if not any(t in text for t in _TRIGGERS):
            return text
        text = _PATTERNS[0].sub(MASK, text)
        for pattern in _PATTERNS[1:]:
            text = pattern.sub(lambda m: m.group(1) + MASK, text)
        return text

    def redact_obj(self, obj: Any) -> Any:
        return redact_obj(obj, self)


# A key *named* as a secret (hf_token, --api-key, Authorization), not one that merely mentions
# tokens: kv_cache_size_tokens and --max-num-batched-tokens are numbers users need to see.
_KEY_NAME = re.compile(
    r"(?:^|[_-])(?:token|secret|password|passwd|api[-_]?key|authorization|credentials?)$", re.IGNORECASE
)


def redact_obj(obj: Any, redactor: Redactor | None = None) -> Any:
    """A copy of JSON-like data with secrets removed: strings are redacted, and the value of
    any key named like a secret (api_key, HF_TOKEN, authorization, …) is masked whole."""
    redactor = redactor or Redactor()
    if isinstance(obj, str):
        return redactor.redact(obj)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            secretish = isinstance(key, str) and _KEY_NAME.search(key) and isinstance(value, str) and value
            out[key] = MASK if secretish and value != MASK else redact_obj(value, redactor)
        return out
    if isinstance(obj, list | tuple):
        items = [redact_obj(v, redactor) for v in obj]
        # an argv list: the word after a secret-bearing flag is the secret
        for i, value in enumerate(obj[:-1]):
            if isinstance(value, str) and value.startswith("--") and _KEY_NAME.search(value):
                items[i + 1] = MASK
        return type(obj)(items)
    return obj
