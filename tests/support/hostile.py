"""Hostile-input tables' checks: an entry point given a bad value or file exits 2 with exactly one line
``error: ...`` naming it, and no traceback."""

from __future__ import annotations

import subprocess

INVALID_CONFIG = "error: invalid config:"  # train.main's header before a ConfigError's problems ("  - ...")


def one_error_line(err: str, *names: str) -> str:
    """The single problem of ``err`` (a command's stderr): one ``error: ...`` line, or train.main's
    ``error: invalid config:`` followed by one ``  - ...`` line; each of ``names`` must be in it."""
    assert err.count("Traceback") == 0, err[-3000:]
    lines = err.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    line = lines[errors[0]]
    if line == INVALID_CONFIG:
        problems = [p for p in lines[errors[0] + 1 :] if p.startswith("  - ")]
        assert len(problems) == 1, err[-3000:]
        line = problems[0]
    for name in names:
        assert str(name) in line, (name, line)
    return line


def exits_2(call, capsys, *names: str) -> str:
    """Run ``call()`` (an entry point's ``main``); it must exit 2 with one error line naming ``names``."""
    capsys.readouterr()
    try:
        call()
    except SystemExit as exit_:
        code = exit_.code
    else:
        code = 0
    out, err = capsys.readouterr()
    assert code == 2, (code, out[-2000:], err[-3000:])
    assert "Traceback" not in out, out[-3000:]
    return one_error_line(err, *names)


def process_exits_2(proc: subprocess.CompletedProcess, *names: str) -> str:
    """A finished CLI process: exit 2, one error line naming ``names``, no traceback anywhere."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    return one_error_line(proc.stderr, *names)
