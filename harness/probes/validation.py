"""The "What is 2+2?" validation: ask through the model's chat template, judge the answer.

The answer passes when, after dropping `<think>…</think>` reasoning and any echo of the question
("2+2", "two plus two"), the first number it states is 4 ("4", "four", "2 + 2 = 4", "4.0").
"14", "42" and "40" fail. Models without a chat template get a plain completion prompt, and the
record says so.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.schema import Validation

PROMPT = "What is 2+2?"
COMPLETION_PROMPT = "Question: What is 2+2?\nAnswer:"
# Reasoning models think before answering; give them room, the judge strips the thinking.
MAX_TOKENS = 16
REASONING_MAX_TOKENS = 1024


def settings(reasoning: bool) -> dict[str, object]:
    """What the validation asks and allows: part of a cell's identity (harness.schema.cell_key)."""
    return {
        "prompt": PROMPT,
        "completion_prompt": COMPLETION_PROMPT,
        "temperature": 0,
        "max_tokens": REASONING_MAX_TOKENS if reasoning else MAX_TOKENS,
    }


_WORDS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
    "twenty": 20,
    "forty": 40,
    "forty two": 42,
}
_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_ECHO = re.compile(r"\b(2|two)\s*(\+|plus|and)\s*(2|two)\b", re.I)
_WORD = re.compile(
    r"\b(" + "|".join(w.replace(" ", r"[\s-]") for w in sorted(_WORDS, key=len, reverse=True)) + r")\b", re.I
)
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?")


def normalise(answer: str) -> str:
    text = _THINK.sub(" ", answer)
    text = _ECHO.sub(" ", text)
    return _WORD.sub(lambda m: str(_WORDS[re.sub(r"[\s-]+", " ", m.group(1).lower())]), text)


def first_number(answer: str) -> float | None:
    match = _NUMBER.search(normalise(answer))
    return float(match.group().replace(",", ".")) if match else None


def is_correct(answer: str | None) -> bool:
    return answer is not None and first_number(answer) == 4.0


def has_chat_template(model_dir: str | None) -> bool:
    """True when the model folder ships a chat template (tokenizer_config or a .jinja file)."""
    if not model_dir or not Path(model_dir).is_dir():
        return True  # unknown: try chat, fall back on the server's refusal
    folder = Path(model_dir)
    if any(folder.glob("chat_template*.jinja")) or (folder / "chat_template.json").exists():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(config.get("chat_template"))


def _post(url: str, api_key: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def ask(
    base_url: str, model: str, api_key: str, question: str, *, max_tokens: int = MAX_TOKENS, timeout: float = 60
) -> str:
    """One chat question at temperature 0; the answer's text (the tiny models' fact check)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    return (
        _post(f"{base_url}/v1/chat/completions", api_key, body, timeout)["choices"][0]["message"].get("content") or ""
    )


def validate(
    base_url: str,
    model: str,
    api_key: str,
    *,
    model_dir: str | None = None,
    reasoning: bool = False,
    timeout: float = 120,
) -> Validation:
    """Ask the server; raises on transport errors (the runner classifies crashes and hangs)."""
    max_tokens = REASONING_MAX_TOKENS if reasoning else MAX_TOKENS
    started = time.perf_counter()
    chat = has_chat_template(model_dir)
    note = None
    if chat:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        try:
            reply = _post(f"{base_url}/v1/chat/completions", api_key, body, timeout)
            answer = reply["choices"][0]["message"].get("content") or ""
            reasoning_text = reply["choices"][0]["message"].get("reasoning_content")
            if reasoning_text and not answer.strip():
                note = "answer was empty after reasoning"
            return Validation(
                prompt=PROMPT,
                answer=answer,
                passed=is_correct(answer),
                mode="chat",
                note=note,
                seconds=round(time.perf_counter() - started, 3),
            )
        except urllib.error.HTTPError as exc:
            # Servers refuse chat without a template with a 400; fall back, anything else is real.
            detail = exc.read().decode(errors="replace")
            if exc.code != 400 or "template" not in detail.lower():
                raise
            note = "the server refused chat (no chat template): plain completion prompt"
    else:
        note = "no chat template in the model: plain completion prompt"
    body = {"model": model, "prompt": COMPLETION_PROMPT, "temperature": 0, "max_tokens": max_tokens}
    reply = _post(f"{base_url}/v1/completions", api_key, body, timeout)
    answer = reply["choices"][0].get("text") or ""
    return Validation(
        prompt=COMPLETION_PROMPT,
        answer=answer,
        passed=is_correct(answer),
        mode="completion",
        note=note,
        seconds=round(time.perf_counter() - started, 3),
    )
