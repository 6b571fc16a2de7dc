"""``python -m flux_lightning`` command lines as the tests start them (with the interpreter running the
tests), so a test states only its own overrides."""

from __future__ import annotations

import sys

FLUX_LIGHTNING = (sys.executable, "-m", "flux_lightning")


def flux_lightning(*args) -> list[str]:
    """``python -m flux_lightning <args>`` (each argument as a string)."""
    return [*FLUX_LIGHTNING, *map(str, args)]


def run_command(run_dir, cache, steps: int, *overrides) -> list[str]:
    """A run in ``run_dir`` (``hydra.run.dir``) with its caches under ``cache`` (``paths.cache_dir``) for
    ``steps`` optimizer steps (``trainer.max_steps``), then ``overrides``."""
    return flux_lightning(
        f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", f"trainer.max_steps={steps}", *overrides
    )
