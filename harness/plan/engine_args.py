"""The engine arguments a plan depends on, resolved once: vLLM's defaults filled in, every value
checked (finite, in range, a name vLLM knows). A bad value raises ArgError naming the argument,
which the `plan` verb turns into one located line and the runner into an unplannable cell."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from harness.plan.kv import KV_DTYPE_BYTES, default_block_size
from harness.plan.model import ModelFacts
from harness.plan.weights import DTYPE_BYTES, runtime_dtype

DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# `--quantization` choices of vLLM (model_executor/layers/quantization/__init__.py QUANTIZATION_METHODS)
QUANTIZATIONS = (
    "aqlm",
    "awq",
    "awq_marlin",
    "auto-round",
    "bitblas",
    "bitsandbytes",
    "compressed-tensors",
    "deepspeedfp",
    "experts_int8",
    "fbgemm_fp8",
    "fp8",
    "fp_quant",
    "gguf",
    "gptq",
    "gptq_bitblas",
    "gptq_marlin",
    "gptq_marlin_24",
    "hqq",
    "inc",
    "ipex",
    "marlin",
    "modelopt",
    "modelopt_fp4",
    "moe_wna16",
    "mxfp4",
    "petit_nvfp4",
    "ptpc_fp8",
    "quark",
    "rtn",
    "torchao",
    "tpu_int8",
)
MAX_GPU_GIB = 4096.0  # no accelerator has more; a larger figure is a typo (or 1e308)


class ArgError(ValueError):
    """One engine argument is out of range or unknown; `arg` is its engine-arg name."""

    def __init__(self, arg: str, message: str):
        super().__init__(f"{arg}: {message}")
        self.arg = arg


def _int(args: dict, key: str, default: int, *, minimum: int = 1) -> int:
    value = args.get(key)
    if value in (None, "", "auto"):
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ArgError(key, f"must be an integer >= {minimum}, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ArgError(key, f"must be an integer >= {minimum}, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or number < minimum:
        raise ArgError(key, f"must be an integer >= {minimum}, got {value!r}")
    return int(number)


def check_total_gib(total_gib: float | None) -> float | None:
    """GPU memory per device in GiB: finite, positive, at most MAX_GPU_GIB."""
    if total_gib is None:
        return None
    if (
        isinstance(total_gib, bool)
        or not isinstance(total_gib, (int, float))
        or not math.isfinite(total_gib)
        or not 0 < total_gib <= MAX_GPU_GIB
    ):
        raise ArgError("gpu_memory_gib", f"must be a number of GiB in (0, {MAX_GPU_GIB:g}], got {total_gib!r}")
    return float(total_gib)


def scheduler_defaults(platform: str, total_gib: float | None, gpu_name: str, world: int) -> tuple[int, int]:
    """vLLM's `vllm serve` defaults for (max_num_seqs, max_num_batched_tokens): engine/arg_utils.py."""
    if platform == "cpu":
        return 128 * world, 2048 * world
    total = total_gib or 0.0
    if total >= 160:
        return 1024, 16384
    if total >= 70 and "a100" not in gpu_name.lower():
        return 1024, 8192
    return 256, 2048


@dataclass(frozen=True)
class EngineArgs:
    tp: int
    pp: int
    enforce_eager: bool
    dtype: str  # the runtime dtype (auto resolved)
    dtype_bytes: int
    kv_cache_dtype: str
    kv_bytes: int
    block_size: int
    max_model_len: int
    max_num_seqs: int
    batched_tokens: int
    utilization: float
    kv_cache_memory_bytes: int | None
    quantization: str | None
    cpu_kv_space_gib: int | None  # VLLM_CPU_KVCACHE_SPACE

    def replace(self, **changes: Any) -> EngineArgs:
        return EngineArgs(**{**self.__dict__, **changes})


def resolve(
    facts: ModelFacts,
    args: dict[str, Any],
    *,
    platform: str,
    total_gib: float | None,
    env: dict[str, str] | None = None,
    gpu_name: str = "",
) -> EngineArgs:
    """vLLM's effective values for one cell; raises ArgError for a value vLLM would refuse."""
    env = env or {}
    tp = _int(args, "tensor_parallel_size", 1)
    pp = _int(args, "pipeline_parallel_size", 1)
    dtype_arg = str(args.get("dtype") or "auto").lower()
    if dtype_arg not in DTYPES:
        raise ArgError("dtype", f"unknown dtype {dtype_arg!r}; one of {', '.join(DTYPES)}")
    dtype = runtime_dtype(facts, dtype_arg)
    db = DTYPE_BYTES.get(dtype, 2)
    kv_dtype = str(args.get("kv_cache_dtype") or "auto").lower()
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ArgError("kv_cache_dtype", f"unknown KV cache dtype {kv_dtype!r}; one of {', '.join(KV_DTYPE_BYTES)}")
    quant = args.get("quantization")
    if quant not in (None, ""):
        quant = str(quant).lower()
        if quant not in QUANTIZATIONS:
            raise ArgError("quantization", f"unknown method {quant!r}; vLLM knows {', '.join(QUANTIZATIONS)}")
    else:
        quant = None
    max_len = _int(args, "max_model_len", facts.max_position)
    seqs_default, tokens_default = scheduler_defaults(platform, total_gib, gpu_name, tp * pp)
    batched = _int(args, "max_num_batched_tokens", tokens_default)
    if args.get("enable_chunked_prefill") is False and "max_num_batched_tokens" not in args:
        batched = max(batched, max_len)
    util = args.get("gpu_memory_utilization")
    if util in (None, ""):
        util = 0.9
    try:
        util = float(util)
    except (TypeError, ValueError):
        raise ArgError("gpu_memory_utilization", f"must be a number in (0, 1], got {util!r}") from None
    if not math.isfinite(util) or not 0 < util <= 1:
        raise ArgError("gpu_memory_utilization", f"must be a number in (0, 1], got {util!r}")
    kv_mem = args.get("kv_cache_memory_bytes")
    kv_mem = None if kv_mem in (None, "") else _int(args, "kv_cache_memory_bytes", 0, minimum=1)
    space = env.get("VLLM_CPU_KVCACHE_SPACE")
    if space in (None, ""):
        cpu_space = None
    else:
        try:
            cpu_space = int(space)  # an integer number of GiB (vllm/envs.py parses int)
        except ValueError:
            raise ArgError("VLLM_CPU_KVCACHE_SPACE", f"must be a whole number of GiB, got {space!r}") from None
        if cpu_space < 0:
            raise ArgError("VLLM_CPU_KVCACHE_SPACE", f"must be >= 0 GiB, got {space!r}")
    return EngineArgs(
        tp=tp,
        pp=pp,
        enforce_eager=bool(args.get("enforce_eager", False)),
        dtype=dtype,
        dtype_bytes=db,
        kv_cache_dtype=kv_dtype,
        kv_bytes=KV_DTYPE_BYTES.get(kv_dtype) or db,
        block_size=_int(args, "block_size", default_block_size(facts, platform)),
        max_model_len=max_len,
        max_num_seqs=_int(args, "max_num_seqs", seqs_default),
        batched_tokens=batched,
        utilization=util,
        kv_cache_memory_bytes=kv_mem,
        quantization=quant,
        cpu_kv_space_gib=cpu_space,
    )
