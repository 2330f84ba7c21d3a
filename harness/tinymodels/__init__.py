"""Tiny models the CPU matrix runs, shipped under `data/` and rebuilt by `build-models`.

* `tiny-chat`: a 2-layer Llama trained on single-digit addition; through vLLM's chat endpoint it
  answers "What is 2+2?" with "4" (and all 100 facts "What is a+b?", a, b in 0..9).
* `tiny-random`: the same architecture and tokenizer with seeded random weights; it does not
  answer 4 (a cell that comes up but fails validation).
* `tiny-unsupported`: a complete directory whose config names an architecture vLLM does not know
  (a cell that fails with "Model architectures [...] are not supported").

This module stays light (stdlib only): it is imported by the harness without torch.
The builder (`harness.tinymodels.build`) imports torch/transformers inside its functions.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

TINY_CHAT = "tiny-chat"
TINY_RANDOM = "tiny-random"
TINY_UNSUPPORTED = "tiny-unsupported"
MODEL_NAMES: tuple[str, ...] = (TINY_CHAT, TINY_RANDOM, TINY_UNSUPPORTED)

UNSUPPORTED_ARCHITECTURE = "TinyHarnessUnknownForCausalLM"

# The chat template the tokenizers ship: no newlines, no BOS. For
# [{"role": "user", "content": "What is 2+2?"}] + add_generation_prompt it renders exactly
# "<|user|>What is 2+2?<|assistant|>", the prompt tiny-chat was trained on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Files every shipped model directory has.
MODEL_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors",
)


def render_prompt(question: str) -> str:
    """The text the chat template renders for one user turn plus the generation prompt."""
    return f"<|user|>{question}<|assistant|>"


def addition_facts() -> list[tuple[str, str]]:
    """The 100 (question, answer) pairs tiny-chat is trained on and validated against."""
    return [(f"What is {a}+{b}?", str(a + b)) for a in range(10) for b in range(10)]


def model_dir(name: str, root: Path | str | None = None) -> Path:
    """Directory of a shipped (or rebuilt, with `root`) tiny model."""
    if name not in MODEL_NAMES:
        raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return (Path(root) if root is not None else DATA_DIR) / name
