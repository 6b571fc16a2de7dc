"""Runs ``python -m flux_lightning``'s entry point once per case in this one process (the start-up
is paid once): ``python tests/support/hostile_cli.py cases.json out.json``. Each case is a list of overrides;
the result per case is ``{"code": exit status, "stderr": text}``. Used by tests/data/test_inputs.py."""

from __future__ import annotations

import contextlib
import io
import json
import sys


def main(cases_path: str, out_path: str) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from flux_lightning.run import train
    from flux_lightning.run.train import main as entry

    def accepted(*args, **kwargs):  # a case that passed every check: stop before building anything
        raise SystemExit(99)

    train.L = type("L", (), {"seed_everything": staticmethod(accepted)})

    import time

    results = []
    for overrides in json.loads(open(cases_path).read()):
        GlobalHydra.instance().clear()
        sys.argv = ["flux_lightning", *overrides]
        err, code, started = io.StringIO(), 0, time.monotonic()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                entry()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException:  # a traceback the user would see
                import traceback

                code, _ = 1, err.write("Traceback (most recent call last):\n" + traceback.format_exc())
        results.append({"code": code, "stderr": err.getvalue(), "took": time.monotonic() - started})
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
