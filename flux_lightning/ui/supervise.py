"""Run one training command and record its pid and exit status (started by ``RunLauncher.launch``).

``python supervise.py <status.json> -- <command...>``: starts the command (same cwd, environment and
output), writes ``{"pid", "started", "start"}`` (``start``: its start time in /proc, so a reused pid is
never taken for it) to the status file, forwards SIGTERM/SIGINT to it (a stop
from the UI or from the terminal reaches the training process, which writes ``last.ckpt``), and
when it ends adds ``rc`` (negative: the signal that ended it) and ``ended``. So a UI started later
still knows how a run it launched ended. Standard library only; run as a script, so it does not
import the package (or torch).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def _write(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def proc_start(pid: int):
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: supervise.py <status.json> -- <command...>", file=sys.stderr)
        return 2
    status, command = argv[1], argv[3:]
    child = subprocess.Popen(command)
    # the start time tells this process from a later one given the same pid (after a reboot or an OOM kill)
    state = {"pid": child.pid, "started": time.time(), "start": proc_start(child.pid)}
    _write(status, state)

    def forward(signum, frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    rc = child.wait()
    _write(status, {**state, "rc": rc, "ended": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
