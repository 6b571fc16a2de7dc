"""Console lines from the libraries underneath that a user of this trainer cannot act on, silenced at their source.

- Lightning's adverts (``💡 Tip: ... litlogger`` / ``litmodels``), logged through ``rank_zero_info``
  whenever a Trainer is built without LitLogger or a checkpoint callback is added (Lightning has no
  setting for them: Lightning-AI/pytorch-lightning#21294). ``rank_zero_info`` logs to
  ``lightning.pytorch.utilities.rank_zero`` (``lightning.fabric.utilities.rank_zero`` before
  ``lightning.pytorch`` is imported); a filter on both drops only records starting with ``💡 Tip:``,
  Lightning's other lines stay.
- torch's ``FutureWarning`` "``isinstance(treespec, LeafSpec)`` is deprecated", raised when Lightning's
  ``CombinedLoader`` builds a ``LeafSpec`` (``lightning/pytorch/utilities/_pytree.py``) at every fit:
  ignored for that message from that module only.

The entry point (:func:`flux_lightning.train.main`) installs both; the library itself changes no
global logging or warning state on import.
"""

from __future__ import annotations

import logging
import warnings

TIP_PREFIX = "💡 Tip:"
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class DropLightningTips(logging.Filter):
    """Drops Lightning's ``💡 Tip:`` adverts; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


def silence_third_party_noise() -> None:
    """Install the Lightning-tip filter and the LeafSpec warning filter (idempotent)."""
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropLightningTips) for f in logger.filters):
            logger.addFilter(DropLightningTips())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
