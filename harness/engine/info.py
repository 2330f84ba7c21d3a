"""What an engine install is: its versions and the engine arguments its vLLM accepts.

Runs `introspect.py` in the engine's own interpreter (the harness never imports vllm). The
argument list costs a vLLM import (~10 s), so it is cached per interpreter and vLLM version.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from harness.cache import cache_dir
from harness.errors import InputError
from harness.schema import EngineInstall, EngineVersions

PROBE = Path(__file__).with_name("introspect.py")
MARK = "@@ENGINE_PROBE@@"


def _run_probe(engine: EngineInstall, what: str, timeout: float) -> dict[str, Any]:
    python = Path(engine.python)
    if not python.exists():
        raise InputError(
            f"engine '{engine.name}': interpreter {engine.python} does not exist; run `make install` "
            "or point engines[].python at a venv that has vllm"
        )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.run([str(python), str(PROBE), what], capture_output=True, text=True, timeout=timeout, env=env)
    out = proc.stdout.rpartition(MARK)[2].strip()
    if proc.returncode != 0 or not out:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(f"engine '{engine.name}' ({engine.python}): cannot inspect vLLM: {tail[0]}")
    return json.loads(out)


def engine_versions(engine: EngineInstall) -> EngineVersions:
    return EngineVersions.model_validate(_run_probe(engine, "versions", timeout=60))


def engine_torch(engine: EngineInstall) -> dict[str, Any]:
    """The versions plus torch's view of CUDA in the engine's interpreter (imports torch, ~3 s):
    torch_cuda (its CUDA build, None for a CPU build), cuda_available, cuda_device_count,
    cuda_error (CUDA's own reason when not available), torch_error (torch does not import)."""
    return _run_probe(engine, "torch", timeout=120)


def engine_arg_actions(engine: EngineInstall, versions: EngineVersions) -> dict[str, dict[str, Any]]:
    """dest -> {flags, kind, type, choices, nargs} for every argument of the engine's server."""
    if not versions.vllm:
        raise InputError(f"engine '{engine.name}' ({engine.python}): vllm is not installed there")
    ident = f"{Path(engine.python).resolve()}|{versions.distribution}|{versions.vllm}"
    path = cache_dir() / f"engine-args-{hashlib.sha1(ident.encode()).hexdigest()[:16]}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    actions = _run_probe(engine, "args", timeout=300)["args"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(actions))
    tmp.replace(path)
    return actions


def cli_flags(args: dict[str, Any], actions: dict[str, dict[str, Any]]) -> list[str]:
    """Matrix engine args (snake_case) -> the server's command-line flags."""
    out: list[str] = []
    for key, value in args.items():
        # an engine without a recorded table (or an arg it lacks): a value flag, --snake-to-kebab
        action = actions.get(key) or {"flags": ["--" + key.replace("_", "-")]}
        long = [f for f in action["flags"] if f.startswith("--") and not f.startswith("--no-")]
        flag = long[0] if long else action["flags"][0]  # pragma: no mutate - every vLLM option has a long name
        kind = action.get("kind")
        if kind == "bool_optional":
            out.append(flag if value else "--no-" + flag[2:])
        elif kind in ("store_true", "store_false"):  # pragma: no mutate - vLLM 0.32 has no store_false option
            if bool(value) == (kind == "store_true"):
                out.append(flag)
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out
