"""`build-models`: rebuild (or `--check`) the tiny models the CPU matrix runs.

    python -m harness build-models                 # rebuild all into harness/tinymodels/data
    python -m harness build-models --out /tmp/tm   # rebuild elsewhere
    python -m harness build-models --check         # light: files exist and parse, no torch
    python -m harness build-models --verify        # also serve them with vLLM CPU and check

Rebuilding needs torch + transformers + tokenizers + safetensors (the engine venv has them);
`--check` needs none of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from harness.errors import InputError
from harness.tinymodels import DATA_DIR, MODEL_NAMES
from harness.validate import out_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=out_folder, default=None, help=f"directory to build into (default: {DATA_DIR})")
    parser.add_argument(
        "--only", action="append", choices=MODEL_NAMES, default=None, help="build/check only this model (repeatable)"
    )
    parser.add_argument(
        "--check", action="store_true", help="only verify the built files exist and load (fast, no torch)"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="after building (or with --check), serve the models with the vLLM "
        "CPU server and check their answers (slow: minutes)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable summary on stdout")


def main(args: argparse.Namespace) -> int:
    root = Path(args.out) if args.out else DATA_DIR
    names = tuple(args.only) if args.only else MODEL_NAMES
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    summary: dict = {"root": str(root), "models": list(names)}

    if not args.check:
        try:
            import safetensors  # noqa: F401
            import tokenizers  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            raise InputError(
                f"building needs torch, transformers, tokenizers and safetensors ({exc}); run "
                "it with the engine venv's python (e.g. .venv/bin/python -m harness build-models)"
                " or use --check"
            ) from exc
        from harness.tinymodels.build import build_all

        summary["build"] = build_all(root, names, log=log)

    from harness.tinymodels.build import check_models

    problems = check_models(root, names)
    summary["check"] = problems
    bad = {n: p for n, p in problems.items() if p}
    for name in names:
        log(f"{name}: {'ok' if not problems[name] else 'PROBLEMS'}")
        for p in problems[name]:
            log(f"  {p}")

    if args.verify and not bad:
        summary["verify"] = _verify(root, names, log)
        bad.update({n: [r["error"]] for n, r in summary["verify"].items() if r.get("error")})

    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 1 if bad else 0


def _verify(root: Path, names: tuple[str, ...], log) -> dict:
    from harness.probes.validation import is_correct
    from harness.tinymodels import TINY_CHAT, TINY_RANDOM, TINY_UNSUPPORTED
    from harness.tinymodels import verify as v

    results: dict = {}
    logs = Path(tempfile.mkdtemp(prefix="tinymodels-verify-"))
    for name in names:
        res: dict = {"log": str(logs / f"{name}.log")}
        with v.serve(root / name, logs / f"{name}.log", args={"enforce_eager": True}) as srv:
            res.update(ready_s=srv.ready_s, failed_s=srv.failed_s)
            if name == TINY_UNSUPPORTED:
                if srv.ready_s is not None or "are not supported" not in srv.log():
                    res["error"] = "expected the unsupported-architecture failure"
            elif srv.ready_s is None:
                res["error"] = f"server did not come up, see {res['log']}"
            elif name == TINY_CHAT:
                good, wrong = v.check_facts(srv)
                res.update(exact=good, wrong=wrong[:10])
                if good < 95:
                    res["error"] = f"only {good}/100 facts exact"
            elif name == TINY_RANDOM:
                answer = v.chat(srv, "What is 2+2?", max_tokens=16)
                res["answer"] = answer
                if is_correct(answer):  # the matrix's own judge
                    res["error"] = f"tiny-random answers 4: {answer!r}"
        log(f"verify {name}: {json.dumps(res, default=str)}")
        results[name] = res
    return results
