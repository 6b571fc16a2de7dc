"""Hydra callback: the run dir's ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` without
secrets (a webhook URL's token, ``*_token`` values...). Hydra writes them before the job starts; they
are rewritten redacted (:func:`flux_lightning.callbacks.redaction.redact_secrets`) in ``on_job_start``, before the
job runs. The job itself gets the real values."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback

from ..callbacks.redaction import redact_secrets

log = logging.getLogger(__name__)

FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def redact_hydra_files(folder) -> None:
    """Rewrite each of :data:`FILES` in ``folder`` whose redacted form differs (others untouched).

    Read with libyaml's parser where PyYAML has it (``CSafeLoader``: the same safe constructor and
    resolver as ``yaml.safe_load``, 0.6 instead of 6 ms for ``hydra.yaml``; this runs before every job).
    """
    import yaml

    from ..atomic_files import write_text_atomic

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for name in FILES:
        path = Path(folder) / name
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
        except (OSError, ValueError, yaml.YAMLError):
            continue
        clean = redact_secrets(data)
        if clean != data:
            write_text_atomic(path, yaml.safe_dump(clean, sort_keys=False, allow_unicode=True))


class RedactHydraFiles(Callback):
    def on_job_start(self, config, **kwargs) -> None:
        subdir = config.hydra.output_subdir
        if subdir is not None:
            try:
                redact_hydra_files(Path(config.hydra.runtime.output_dir) / subdir)
            except OSError as err:  # an unwritable dir is reported by the run itself, with its fix
                log.warning("could not redact %s: %s", subdir, err)
