"""A per-process-group guard: it outlives a killed harness just long enough to kill what it started.

The harness starts each engine (and the probe's stub server) in its own process group, then this
script as a separate process in its own session, holding the read end of a pipe whose write end
only the harness has. The harness writes `<pid> <start ticks>` for every process it sees in the
group's tree, and `done` once it has stopped the group itself. If the pipe closes without `done`,
the harness died (SIGKILL included: the kernel closes its descriptors): the guard SIGKILLs the
group and every listed process whose start time still matches, then exits.

Why a separate process: after SIGKILL no code of the harness runs, and the parent-death signal
reaches only the engine's first process, not vLLM's EngineCore and workers. A subreaper would have
to be the engine's parent, changing the engine's pid and exit code the runner relies on; a cgroup
needs a delegated hierarchy most hosts and containers do not give. Processes are matched by pid
*and* start time, never by name, so a recycled pid is never touched.

Runs as `python -I guard.py PGID` (by path, so it needs nothing importable) and imports only the
standard library, so it starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import sys

DONE = b"done"


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def kill_listed(pgid: int, listed: dict[int, int]) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass  # the group is gone already
    for pid, ticks in listed.items():
        if start_ticks(pid) == ticks:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def main(argv: list[str]) -> int:
    pgid = int(argv[1])
    data = bytearray()
    while True:
        try:
            chunk = os.read(0, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        data += chunk
    words = bytes(data).split()
    if words and words[-1] == DONE:
        return 0
    listed = {}
    for line in bytes(data).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            listed[int(parts[0])] = int(parts[1])
    kill_listed(pgid, listed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
