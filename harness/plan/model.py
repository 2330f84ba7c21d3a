"""Model facts the planner needs, read from a Hugging Face `config.json` dict.

One normalised view over the many config dialects: multimodal `text_config`, MLA (DeepSeek V2/V3),
MoE, sliding-window and hybrid (Mamba / linear-attention) layer schedules, and the checkpoint's
quantization. Pure: a dict in, a frozen dataclass out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# model_type -> calibration family. Families group architectures whose activation profile is
# alike; anything unlisted is its own family (its model_type), and the table's "*" rows apply.
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen",
    "qwen3": "qwen",
    "qwen3_moe": "qwen_moe",
    "qwen2_moe": "qwen_moe",
    "phi": "phi",
    "phi3": "phi",
    "gpt_oss": "gpt_oss",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "mixtral": "mixtral",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
}

# Layer kinds: "full" and "sliding" attention hold per-token KV; "state" layers (Mamba, linear
# attention) hold a fixed-size state per request.
FULL, SLIDING, STATE = "full", "sliding", "state"


@dataclass(frozen=True)
class Quant:
    """Checkpoint quantization, as the config's `quantization_config` states it."""

    method: str  # "fp8", "compressed-tensors", "awq", "gptq", "mxfp4", "bitsandbytes", ...
    weight_bits: int = 16
    group_size: int | None = None  # AWQ/GPTQ scale group; None: per output channel
    block: tuple[int, int] | None = None  # fp8 block quantization (DeepSeek: 128x128)
    ignored: tuple[str, ...] = ()  # module patterns kept unquantized


@dataclass(frozen=True)
class ModelFacts:
    model_type: str
    architecture: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    tie_embeddings: bool
    max_position: int
    dtype: str  # the checkpoint's torch dtype name: bfloat16, float16, float32
    layer_kinds: tuple[str, ...]  # one per decoder layer
    sliding_window: int | None = None
    gated_mlp: bool = True
    attention_bias: bool = False
    rotary_dim: int = 0
    rope_cache_positions: int = 0
    # MLA (DeepSeek V2/V3): the KV cache holds one latent of kv_lora_rank + qk_rope_head_dim
    mla: bool = False
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # MoE
    experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_experts: int = 0
    shared_intermediate: int = 0  # all shared experts' MLP width (Qwen2-MoE: shared_expert_intermediate_size)
    dense_layers: int = 0  # leading dense layers of an MoE stack (first_k_dense_replace)
    state_bytes_per_layer: int = 0  # Mamba/linear-attention state per request, checkpoint dtype
    quant: Quant | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def family(self) -> str:
        return FAMILIES.get(self.model_type, self.model_type)

    @property
    def attention_layers(self) -> int:
        return sum(1 for k in self.layer_kinds if k in (FULL, SLIDING))


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _quant(cfg: dict[str, Any]) -> Quant | None:
    q = cfg.get("quantization_config") or cfg.get("compression_config")
    if not isinstance(q, dict):
        return None
    method = str(q.get("quant_method") or q.get("quant_type") or "unknown").lower()
    if method == "compressed-tensors":
        bits, group = 8, None
        for grp in (q.get("config_groups") or {}).values():
            weights = grp.get("weights") or {}
            bits = int(weights.get("num_bits", bits))
            if weights.get("strategy") == "group":
                group = weights.get("group_size")
        return Quant(method, bits, group, ignored=tuple(q.get("ignore") or ()))
    if method == "fp8":
        block = q.get("weight_block_size")
        return Quant(
            method,
            8,
            block=tuple(block) if block else None,
            ignored=tuple(q.get("ignored_layers") or q.get("modules_to_not_convert") or ()),
        )
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin"):
        return Quant(
            method, int(q.get("bits", q.get("w_bit", 4)) or 4), q.get("group_size", q.get("q_group_size", 128))
        )
    if method == "mxfp4":
        return Quant(method, 4, 32, ignored=tuple(q.get("modules_to_not_convert") or ()))
    if method == "bitsandbytes":
        return Quant(method, 4 if q.get("load_in_4bit") else 8, 64)
    return Quant(method, int(q.get("bits", 16)))


def _layer_kinds(cfg: dict[str, Any], layers: int, window: int | None) -> tuple[str, ...]:
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        kinds = []
        for t in types:
            t = str(t)
            if "sliding" in t or "local" in t:
                kinds.append(SLIDING)
            elif "mamba" in t or "linear" in t or "conv" in t or "recurrent" in t:
                kinds.append(STATE)
            else:
                kinds.append(FULL)
        return tuple(kinds)
    pattern = cfg.get("layers_block_type") or cfg.get("hybrid_override_pattern")
    if isinstance(pattern, list) and len(pattern) == layers:
        return tuple(STATE if "mamba" in str(p) else FULL for p in pattern)
    if isinstance(pattern, str) and len(pattern) == layers:  # Nemotron-H: "M-M*-..."
        return tuple(STATE if c == "M" else FULL for c in pattern)
    # Qwen2 writes sliding_window even when use_sliding_window is false: only the flag counts.
    uses_window = window is not None and cfg.get("use_sliding_window", True) is not False
    if uses_window and cfg.get("model_type") in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        # Qwen: layers below max_window_layers use full attention.
        first = int(cfg.get("max_window_layers", layers))
        return tuple(FULL if i < first else SLIDING for i in range(layers))
    return tuple((SLIDING if uses_window else FULL) for _ in range(layers))


def _state_bytes(cfg: dict[str, Any], hidden: int) -> int:
    """Per-layer recurrent state of one request (conv + SSM), in elements x 2 bytes, before TP.

    Gated DeltaNet (Qwen3-Next style `linear_*` fields): a causal conv over q, k and v plus one
    k x v matrix per value head. Mamba: conv over the inner width plus d_state per inner channel."""
    if cfg.get("linear_num_value_heads"):
        nk = _positive("linear_num_key_heads", cfg.get("linear_num_key_heads") or cfg["linear_num_value_heads"])
        nv = _positive("linear_num_value_heads", cfg["linear_num_value_heads"])
        dk = _positive("linear_key_head_dim", cfg.get("linear_key_head_dim") or 128)
        dv = _positive("linear_value_head_dim", cfg.get("linear_value_head_dim") or 128)
        kernel = _positive("linear_conv_kernel_dim", cfg.get("linear_conv_kernel_dim") or 4)
        return ((2 * nk * dk + nv * dv) * (kernel - 1) + nv * dk * dv) * 2
    d_state = int(_first(cfg, "mamba_d_state", "ssm_state_size", "state_size", default=16))
    d_conv = int(_first(cfg, "mamba_d_conv", "conv_kernel", default=4))
    expand = int(_first(cfg, "mamba_expand", "expand", default=2))
    inner = int(_first(cfg, "mamba_d_inner", "intermediate_size", default=expand * hidden))
    return (inner * d_state + inner * (d_conv - 1)) * 2


def model_facts(config: Any) -> ModelFacts:
    """Normalise a config.json dict. Raises ValueError naming the field when the config is not a
    JSON object, lacks the decoder's shape, or states a shape no model can have."""
    try:
        return _model_facts(config)
    except (TypeError, AttributeError, KeyError, ZeroDivisionError, OverflowError) as exc:
        raise ValueError(f"config is malformed: {type(exc).__name__}: {exc}") from exc


def _positive(name: str, value: Any, *, zero_ok: bool = False) -> int:
    """An integer shape from the config; bools, fractions, strings and (unless allowed) zero refuse."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"config {name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"config {name} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")
    return int(value)


def _model_facts(config: Any) -> ModelFacts:
    if not isinstance(config, dict):
        raise ValueError(f"config.json is not a JSON object (it is a {type(config).__name__})")
    top = config
    text = config.get("text_config") or config.get("llm_config") or config
    if not isinstance(text, dict):
        raise ValueError("config text_config is not a JSON object")
    cfg = {**text, "model_type": text.get("model_type") or top.get("model_type")}
    shape = {
        "hidden_size": _first(cfg, "hidden_size", "n_embd", "d_model"),
        "num_hidden_layers": _first(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        "num_attention_heads": _first(cfg, "num_attention_heads", "n_head", "num_heads"),
        "vocab_size": _first(cfg, "vocab_size", "padded_vocab_size", default=top.get("vocab_size")),
    }
    missing = [k for k, v in shape.items() if v is None]
    if missing:
        raise ValueError(f"config lacks the decoder's shape: no {', '.join(missing)}")
    hidden, layers, heads, vocab = (_positive(k, v) for k, v in shape.items())
    kv_heads = _positive(
        "num_key_value_heads", _first(cfg, "num_key_value_heads", "n_head_kv", "num_kv_heads", default=heads)
    )
    if cfg.get("multi_query"):
        kv_heads = 1
    head_dim = _positive("head_dim", _first(cfg, "head_dim", default=hidden // heads))
    window = _first(cfg, "sliding_window", "attention_window_size")
    window = int(window) if isinstance(window, (int, float)) and window > 0 else None
    kinds = _layer_kinds(cfg, layers, window)
    model_type = str(cfg.get("model_type") or "unknown")
    archs = top.get("architectures") or cfg.get("architectures") or ["unknown"]
    max_pos = _positive(
        "max_position_embeddings",
        _first(cfg, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", default=2048),
    )
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = str(rope.get("rope_type") or rope.get("type") or "") if isinstance(rope, dict) else ""
    # vLLM's rotary cos/sin cache: YaRN builds original_max x factor positions, others max_position.
    if rope_type == "yarn":
        cache_positions = int(rope.get("original_max_position_embeddings", max_pos) * rope.get("factor", 1))
    else:
        cache_positions = max_pos
    mla = cfg.get("kv_lora_rank") is not None
    if mla and _positive("kv_lora_rank", cfg.get("kv_lora_rank")) + int(cfg.get("qk_rope_head_dim") or 0) <= 0:
        raise ValueError("config kv_lora_rank + qk_rope_head_dim must be > 0")
    rope_dim = (
        int(cfg.get("qk_rope_head_dim", 0)) if mla else int(head_dim * float(cfg.get("partial_rotary_factor", 1.0)))
    )
    experts = _positive(
        "num_experts", _first(cfg, "n_routed_experts", "num_local_experts", "num_experts", default=0) or 0, zero_ok=True
    )
    moe_inter = _positive(
        "moe_intermediate_size", _first(cfg, "moe_intermediate_size", default=0) or 0, zero_ok=True
    ) or (int(cfg.get("intermediate_size", 0)) if experts else 0)
    top_k = _positive(
        "num_experts_per_tok", _first(cfg, "num_experts_per_tok", "experts_per_token", default=0) or 0, zero_ok=True
    )
    if experts and not 1 <= top_k <= experts:
        raise ValueError(f"config num_experts_per_tok must be 1..{experts} (num_experts), got {top_k}")
    shared = int(cfg.get("n_shared_experts") or 0)
    shared_inter = (
        _positive("shared_expert_intermediate_size", cfg.get("shared_expert_intermediate_size") or 0, zero_ok=True)
        or shared * moe_inter
    )
    intermediate = _positive(
        "intermediate_size",
        _first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        zero_ok=bool(experts),
    )
    dtype = str(_first(cfg, "torch_dtype", "dtype", default=top.get("torch_dtype") or "bfloat16"))
    return ModelFacts(
        model_type=model_type,
        architecture=str(archs[0]),
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        intermediate=intermediate,
        tie_embeddings=bool(_first(cfg, "tie_word_embeddings", default=top.get("tie_word_embeddings", True))),
        max_position=max_pos,
        dtype=dtype.replace("torch.", ""),
        layer_kinds=kinds,
        sliding_window=window if SLIDING in kinds else None,
        gated_mlp=model_type not in ("phi", "gpt2", "gpt_bigcode", "opt", "falcon", "gpt_neox"),
        attention_bias=bool(cfg.get("attention_bias", model_type in ("qwen2", "phi", "qwen2_moe"))),
        rotary_dim=rope_dim,
        rope_cache_positions=cache_positions,
        mla=mla,
        kv_lora_rank=int(cfg.get("kv_lora_rank") or 0),
        q_lora_rank=cfg.get("q_lora_rank"),
        qk_nope_head_dim=int(cfg.get("qk_nope_head_dim", 0)),
        qk_rope_head_dim=int(cfg.get("qk_rope_head_dim", 0)),
        v_head_dim=int(cfg.get("v_head_dim", 0)),
        experts=experts,
        experts_per_token=top_k,
        moe_intermediate=moe_inter,
        shared_experts=shared,
        shared_intermediate=shared_inter,
        dense_layers=int(cfg.get("first_k_dense_replace", 0)) if experts else 0,
        state_bytes_per_layer=_state_bytes(cfg, hidden) if STATE in kinds else 0,
        quant=_quant(top) or _quant(cfg),
    )
