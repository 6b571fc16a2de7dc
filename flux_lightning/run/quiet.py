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
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community ..." warning, logged when
  it is imported, which happens on every run: peft imports bitsandbytes whenever it is installed
  (``peft/helpers.py``: ``try: import bitsandbytes``), and diffusers imports peft. It concerns only
  NF4 layers on the CPU, so it is dropped unless the run quantizes to NF4 (``keep_bnb_cpu_warning``).
- Lightning's "You're resuming from a checkpoint that ended before the epoch ended and your dataloader
  is not resumable" warning on every mid-epoch resume: Lightning looks for ``state_dict`` on the
  dataloader, but the run's position lives in ``BucketBatchSampler`` (restored from the checkpoint:
  a mid-epoch resume continues with the next batch, bit for bit; tests/run/test_resume.py), so the
  warning is false here.

The entry point (:func:`flux_lightning.run.train.main`) installs them; the library itself changes no
global logging or warning state on import.
"""

from __future__ import annotations

import logging
import warnings

TIP_PREFIX = "💡 Tip:"
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_CPU_PREFIX = "Failed to load CPU gemm_4bit_forward"
RESUME_WARNING = (
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable"
)


class DropLightningTips(logging.Filter):
    """Drops Lightning's ``💡 Tip:`` adverts; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


class DropBnbCpuKernelWarning(logging.Filter):
    """Drops bitsandbytes' warning about its optional CPU NF4 kernel; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_CPU_PREFIX)


def _install(logger: logging.Logger, kind: type[logging.Filter], on: bool = True) -> None:
    present = [f for f in logger.filters if isinstance(f, kind)]
    if on and not present:
        logger.addFilter(kind())
    for f in present if not on else []:
        logger.removeFilter(f)


def silence_third_party_noise(keep_bnb_cpu_warning: bool = False) -> None:
    """Install the Lightning-tip filter, the LeafSpec and mid-epoch-resume warning filters and, unless
    ``keep_bnb_cpu_warning`` (an NF4 run), the bitsandbytes CPU-kernel filter (idempotent)."""
    for name in LIGHTNING_INFO_LOGGERS:
        _install(logging.getLogger(name), DropLightningTips)
    _install(logging.getLogger(BNB_CPU_LOGGER), DropBnbCpuKernelWarning, on=not keep_bnb_cpu_warning)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    warnings.filterwarnings("ignore", message=RESUME_WARNING)
