"""Seeded prompts of a requested token count, and output-token counting without usage.

With the model's `tokenizer.json` (read by the `tokenizers` library, no transformers import)
each prompt is random vocabulary decoded to text and re-encoded until it is exactly N tokens
as the server will count them for a completion (special tokens such as BOS included), the
way `vllm bench serve`'s random dataset builds its prompts. Without a tokenizer, prompts are
N common English words and the true count comes from the server's `usage`.
"""

from __future__ import annotations

import random
from pathlib import Path

_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like "
    "so these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now find"
).split()


class PromptFactory:
    """Builds prompt texts; `exact` says whether token counts are known before sending."""

    def __init__(self, tokenizer_dir: str | None = None) -> None:
        self.tokenizer = _load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        self.note = None
        if tokenizer_dir and self.tokenizer is None:
            self.note = f"no usable tokenizer.json under {tokenizer_dir}: word prompts, usage counts"
        if self.tokenizer is not None:
            special = set(self.tokenizer.get_added_tokens_decoder())
            self._ids = [i for i in range(self.tokenizer.get_vocab_size()) if i not in special]

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def make(self, n_tokens: int, seed: int) -> tuple[str, int | None]:
        """(prompt, token count or None when unknown)."""
        rng = random.Random(seed)
        if self.tokenizer is None:
            return " ".join(rng.choice(_WORDS) for _ in range(n_tokens)), None
        return self._exact(n_tokens, rng)

    def _exact(self, n_tokens: int, rng: random.Random) -> tuple[str, int]:
        tok = self.tokenizer
        assert tok is not None  # exact prompts are built only when a tokenizer was found

        def count(ids: list[int]) -> tuple[str, int]:
            text = tok.decode(ids)
            return text, len(tok.encode(text, add_special_tokens=True).ids)

        best: tuple[int, str, int] | None = None
        # Decoding then re-encoding merges or splits tokens, so search the shortest prefix of
        # a random id list whose round trip reaches N (the count grows with the prefix);
        # a list whose counts jump over N is replaced by a fresh one.
        for _ in range(32):
            ids = [rng.choice(self._ids) for _ in range(2 * n_tokens + 8)]
            lo, hi = 1, len(ids)
            while lo < hi:
                mid = (lo + hi) // 2
                if count(ids[:mid])[1] >= n_tokens:
                    hi = mid
                else:
                    lo = mid + 1
            text, got = count(ids[:lo])
            if best is None or abs(got - n_tokens) < best[0]:
                best = (abs(got - n_tokens), text, got)
            if got == n_tokens:
                break
        assert best is not None  # the loop ran at least once
        return best[1], best[2]

    def count_output(self, text: str) -> int | None:
        """Tokens of generated text (no special tokens), or None without a tokenizer."""
        if self.tokenizer is None:
            return None
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


def _load_tokenizer(tokenizer_dir: str):
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(str(path))
