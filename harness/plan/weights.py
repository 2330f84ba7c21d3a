"""Weight memory per GPU: from safetensors headers when a checkpoint is at hand, else from config.

vLLM's "Model loading took X GiB" is the bytes of every parameter a rank holds plus the rotary
cos/sin cache. Both paths below count exactly that: tensors sharded over TP are divided, the
ones vLLM replicates (norms, MLA down-projections, KV heads when TP exceeds them, routers) are
not; a tied lm_head and DeepSeek's MTP layers (not loaded by default) are skipped.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from harness.plan.model import ModelFacts, Quant

GIB = 1 << 30

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float8_e4m3fn": 1}
# safetensors dtype tags -> bytes per element (sub-byte types are packed into U8/I32 tensors)
ST_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F4": 0.5,
}
FLOAT_TAGS = {"F32", "F16", "BF16"}
VOCAB_PADDING = 64  # vLLM pads embedding rows to a multiple of 64 (DEFAULT_VOCAB_PADDING_SIZE)


def runtime_dtype(facts: ModelFacts, dtype_arg: str | None) -> str:
    """vLLM's `--dtype auto`: the checkpoint's dtype, except float32 is downcast to bfloat16."""
    arg = (dtype_arg or "auto").lower()
    if arg == "auto":
        return "bfloat16" if facts.dtype in ("float32", "float") else facts.dtype
    return {"half": "float16", "float": "float32"}.get(arg, arg)


def padded_vocab(vocab: int) -> int:
    return -(-vocab // VOCAB_PADDING) * VOCAB_PADDING


@dataclass
class WeightEstimate:
    per_gpu_bytes: float
    params: int  # whole model, as loaded (tied head counted once, MTP excluded)
    by_dtype: dict[str, float] = field(default_factory=dict)  # whole-model bytes per storage kind
    source: str = "config"
    first_stage_bytes: float | None = None  # with PP: the first stage (embeddings), the rank vLLM logs
    last_stage_bytes: float | None = None  # with PP: the last stage (head, sampler)

    @property
    def first_bytes(self) -> float:
        return self.per_gpu_bytes if self.first_stage_bytes is None else self.first_stage_bytes

    @property
    def last_bytes(self) -> float:
        return self.per_gpu_bytes if self.last_stage_bytes is None else self.last_stage_bytes

    @property
    def per_gpu_gib(self) -> float:
        return self.per_gpu_bytes / GIB


@dataclass(frozen=True)
class _Linear:
    """One weight matrix: in x out, how TP splits it, and whether quantization applies."""

    name: str
    rows_in: int
    rows_out: int
    split: float  # fraction one TP rank holds
    quantizable: bool = True
    expert: bool = False

    @property
    def module(self) -> str:
        return "mlp" if self.name in ("mlp", "experts", "shared_experts", "router") else "self_attn"


def _layer_linears(f: ModelFacts, layer: int, tp: int) -> list[_Linear]:
    out: list[_Linear] = []
    shard = 1.0 / tp
    h = f.hidden
    if f.mla:
        qk = f.qk_nope_head_dim + f.qk_rope_head_dim
        if f.q_lora_rank:
            out.append(_Linear("q_a_proj", h, f.q_lora_rank, 1.0))  # ReplicatedLinear in vLLM
            out.append(_Linear("q_b_proj", f.q_lora_rank, f.heads * qk, shard))
        else:
            out.append(_Linear("q_proj", h, f.heads * qk, shard))
        out.append(_Linear("kv_a_proj_with_mqa", h, f.kv_lora_rank + f.qk_rope_head_dim, 1.0))
        out.append(_Linear("kv_b_proj", f.kv_lora_rank, f.heads * (f.qk_nope_head_dim + f.v_head_dim), shard))
        out.append(_Linear("o_proj", f.heads * f.v_head_dim, h, shard))
    elif f.layer_kinds[layer] != "state":
        kv_split = max(1.0 / tp, 1.0 / f.kv_heads)  # KV heads are replicated once TP exceeds them
        out.append(_Linear("q_proj", h, f.heads * f.head_dim, shard))
        out.append(_Linear("k_proj", h, f.kv_heads * f.head_dim, kv_split))
        out.append(_Linear("v_proj", h, f.kv_heads * f.head_dim, kv_split))
        out.append(_Linear("o_proj", f.heads * f.head_dim, h, shard))
    mats = 3 if f.gated_mlp else 2
    if f.experts and layer >= f.dense_layers:
        out.append(_Linear("experts", h, f.experts * mats * f.moe_intermediate, shard, expert=True))
        if f.shared_intermediate:
            out.append(_Linear("shared_experts", h, mats * f.shared_intermediate, shard))
        out.append(_Linear("router", h, f.experts, 1.0, quantizable=False))
    else:
        out.append(_Linear("mlp", h, mats * f.intermediate, shard))
    return out


def _ignored(quant: Quant, lin: _Linear) -> bool:
    """Ignore lists name module paths ("model.layers.*.self_attn", "re:.*mlp.router"): match the tail."""
    return any(p.split(".")[-1] in (lin.module, lin.name) for p in quant.ignored)


def _linear_bytes(lin: _Linear, quant: Quant | None, runtime_quant: str | None, dtype_bytes: int) -> float:
    n = lin.rows_in * lin.rows_out
    if not lin.quantizable:
        return n * dtype_bytes
    if quant is not None and not _ignored(quant, lin):
        m = quant.method
        if m == "mxfp4":
            # only the experts are MXFP4: 4-bit values + one e8m0 scale per 32
            return n * (0.5 + 1 / 32) if lin.expert else n * dtype_bytes
        if quant.weight_bits == 8 and m in ("fp8", "compressed-tensors", "fbgemm_fp8", "modelopt"):
            if quant.block:
                blocks = math.ceil(lin.rows_in / quant.block[1]) * math.ceil(lin.rows_out / quant.block[0])
                return n + blocks * 4
            return n + lin.rows_out * 4  # per-output-channel fp32 scale
        if quant.weight_bits < 16:
            group = quant.group_size or lin.rows_in
            groups = math.ceil(lin.rows_in / group) * lin.rows_out
            return n * quant.weight_bits / 8 + groups * (2 + quant.weight_bits / 8)  # fp16 scale + zero
    if runtime_quant in ("fp8", "fbgemm_fp8", "ptpc_fp8"):
        return n + 4
    return n * dtype_bytes


def _rope_cache_bytes(f: ModelFacts, dtype_bytes: int) -> int:
    return f.rope_cache_positions * f.rotary_dim * dtype_bytes if f.rotary_dim else 0


def _norm_params(f: ModelFacts) -> int:
    per_layer = 2 * f.hidden * (2 if f.model_type == "phi" else 1)  # phi: LayerNorm with bias
    if f.mla:
        per_layer += f.kv_lora_rank + (f.q_lora_rank or 0)
    return per_layer


def _bias_params(f: ModelFacts, layer: int, tp: int) -> float:
    """Bias bytes-per-rank count in elements (attention qkv/o bias, phi MLP bias, gpt-oss experts)."""
    total = 0.0
    if f.attention_bias and not f.mla:
        total += (f.heads + 2 * f.kv_heads) * f.head_dim / tp + (f.hidden if f.model_type in ("phi", "gpt_oss") else 0)
    if f.model_type == "phi":
        total += f.intermediate / tp + f.hidden
    if f.model_type == "gpt_oss" and f.experts:
        total += f.experts * (2 * f.moe_intermediate + f.hidden) / tp + f.experts + f.heads  # + router bias, sinks
    return total


def weights_from_config(
    facts: ModelFacts, *, dtype: str, tp: int = 1, pp: int = 1, runtime_quant: str | None = None
) -> WeightEstimate:
    """Bytes one GPU holds, computed from the config's shapes (no checkpoint needed)."""
    db = DTYPE_BYTES.get(dtype, 2)
    q = facts.quant
    embed = padded_vocab(facts.vocab) * facts.hidden
    embed_bytes = embed * db  # embeddings and lm_head stay in the model dtype under every scheme
    layer_bytes_rank: list[float] = []
    layer_bytes_all = 0.0
    params = embed * (1 if facts.tie_embeddings else 2)
    for i in range(facts.layers):
        rank = 0.0
        for lin in _layer_linears(facts, i, tp):
            whole = _linear_bytes(lin, q, runtime_quant, db)
            rank += whole * lin.split
            layer_bytes_all += whole
            params += lin.rows_in * lin.rows_out
        norms = _norm_params(facts)
        rank += (norms + _bias_params(facts, i, tp)) * db
        layer_bytes_all += (norms + _bias_params(facts, i, 1)) * db
        params += norms
        layer_bytes_rank.append(rank)
    head_rank = 0 if facts.tie_embeddings else embed_bytes / tp
    per_stage = math.ceil(facts.layers / pp)
    stages = [sum(layer_bytes_rank[s * per_stage : (s + 1) * per_stage]) for s in range(pp)]
    embed_rank, tail = embed_bytes / tp, head_rank + facts.hidden * db  # tail: lm_head + final norm
    # With PP the first stage holds the embeddings and the last the head; report the fuller one.
    rope = _rope_cache_bytes(facts, db)
    if pp == 1:
        first = last = stages[0] + embed_rank + tail + rope
    else:
        first, last = stages[0] + embed_rank + rope, stages[-1] + tail + rope
    by_dtype = {"embeddings": embed_bytes * (1 if facts.tie_embeddings else 2), "layers": layer_bytes_all}
    return WeightEstimate(
        per_gpu_bytes=max(first, last),
        params=int(params),
        by_dtype=by_dtype,
        source="config",
        first_stage_bytes=first,
        last_stage_bytes=last,
    )


def weights_from_total(
    facts: ModelFacts, total_bytes: float, *, dtype: str, tp: int = 1, pp: int = 1
) -> WeightEstimate:
    """`--safetensors-bytes N`: the checkpoint's size, split over TP x PP, plus the rotary cache."""
    db = DTYPE_BYTES.get(dtype, 2)
    return WeightEstimate(
        per_gpu_bytes=total_bytes / (tp * pp) + _rope_cache_bytes(facts, db),
        params=int(total_bytes / db),
        by_dtype={"checkpoint": total_bytes},
        source="safetensors-bytes",
    )


# --------------------------------------------------------------------------- safetensors headers
def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape"}: the 8-byte little-endian length, then that much JSON."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header


def checkpoint_tensors(model_dir: Path) -> dict[str, dict]:
    tensors: dict[str, dict] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(read_safetensors_header(path))
    return tensors


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def weights_from_tensors(
    facts: ModelFacts,
    tensors: dict[str, dict],
    *,
    dtype: str,
    tp: int = 1,
    pp: int = 1,
    runtime_quant: str | None = None,
) -> WeightEstimate:
    """Per-GPU bytes from the checkpoint's own tensor list (headers only, no weights read)."""
    db = DTYPE_BYTES.get(dtype, 2)
    kv_split = max(1.0 / tp, 1.0 / facts.kv_heads)
    by_dtype: dict[str, float] = {}
    rank_bytes = 0.0
    params = 0
    for name, info in tensors.items():
        m = _LAYER.search(name)
        if m and int(m.group(1)) >= facts.layers:
            continue  # MTP / next-n layers: vLLM does not load them by default
        if facts.tie_embeddings and name.startswith("lm_head"):
            continue
        tag = info["dtype"]
        elems = math.prod(info["shape"]) if info["shape"] else 1
        params += elems
        is_scale = re.search(r"(scale|scale_inv|zeros|g_idx|qzeros)$", name) is not None
        if tag in FLOAT_TAGS and not is_scale:
            quantize = (
                runtime_quant in ("fp8", "fbgemm_fp8")
                and len(info["shape"]) == 2
                and "embed" not in name
                and "lm_head" not in name
            )
            nbytes = elems * (1 if quantize else db)
        else:
            nbytes = elems * ST_BYTES.get(tag, 2)
        by_dtype[tag] = by_dtype.get(tag, 0) + elems * ST_BYTES.get(tag, 2)
        if len(info["shape"]) <= 1 and "bias" not in name:
            split = 1.0  # norms and per-tensor scales are replicated
        elif re.search(r"(k_proj|v_proj)", name) and not facts.mla:
            split = kv_split
        elif re.search(r"(q_a_proj|kv_a_proj|mlp\.gate\.|router\.)", name):
            split = 1.0
        else:
            split = 1.0 / tp
        rank_bytes += nbytes * split
    per_gpu = rank_bytes / pp + _rope_cache_bytes(facts, db)
    return WeightEstimate(per_gpu_bytes=per_gpu, params=params, by_dtype=by_dtype, source="safetensors")
