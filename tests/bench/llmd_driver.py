"""Runs llm-d-planner's capacity planner on the bench's inputs, inside llm-d-planner's own venv
(`make bench-plan` builds it; this file imports nothing of the harness).

stdin: a JSON list of {"id", "model", "config", "params_by_dtype", "max_model_len", "tp", "pp",
"gpu_memory_gib", "gpu_memory_utilization", "block_size"}. The planner normally fetches the
config and the safetensors parameter counts from the Hugging Face Hub; the bench is offline, so
both are handed in (the config from the harness's catalog, the counts from the same shapes).
stdout: a JSON list of {"id", "weights_gib", "kv_cache_gib", "max_concurrency", "error"}.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

from planner import capacity_planner as cp


class _Config(SimpleNamespace):
    """AutoConfig's attribute access over a config.json dict (text_config nested the same way)."""

    def __init__(self, data: dict):
        super().__init__(
            **{k: _Config(v) if k == "text_config" and isinstance(v, dict) else v for k, v in data.items()}
        )
        self._data = data

    def __contains__(self, key: str) -> bool:
        return key in self._data


def _quant_dict(cfg: dict) -> dict:
    return cfg["quantization_config"]


def main() -> int:
    runs = json.load(sys.stdin)
    out = []
    for run in runs:
        configs = {run["model"]: run["config"]}
        counts = {run["model"]: run["params_by_dtype"]}
        cp.get_model_config_from_hf = lambda name, token=None, c=configs: _Config(c[name])  # noqa: E731
        cp.model_params_by_dtype = lambda name, token=None, c=counts: c[name]  # noqa: E731
        cp.get_quantization_config = lambda mc: mc._data["quantization_config"]  # noqa: E731
        try:
            res = cp.calculate_capacity(
                run["model"],
                run["max_model_len"],
                1,
                run["gpu_memory_gib"],
                run["tp"],
                run["pp"],
                1,
                run["gpu_memory_utilization"],
                run["block_size"],
            )
            out.append(
                {
                    "id": run["id"],
                    "weights_gib": res["per_gpu_model_memory_gb"],
                    "kv_cache_gib": res["allocatable_kv_cache_memory_gb"] / (run["tp"] * run["pp"]),
                    "max_concurrency": res["max_concurrent_requests"],
                    "error": None,
                }
            )
        except Exception as exc:  # noqa: BLE001 - one failed input must not hide the others
            out.append({"id": run["id"], "error": f"{type(exc).__name__}: {exc}"})
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
