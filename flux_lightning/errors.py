"""Every error the library raises on purpose, in one leaf module (it imports only the standard library).

The entry point maps them to exit codes (``flux_lightning.run.train.main``): the configuration and
input errors to 2, :class:`NonFiniteLossError` to 3, :class:`StopRequested` to 128 + the signal.
Each message is one line per problem naming the file or config field and the fix.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from pathlib import Path


class Problem(str):
    """One problem of a config: ``field`` (the dotted config key it is about, e.g. ``adapter.rank``
    or ``callbacks.eval_loss.every_n_steps``) and ``message`` (one line naming the field and the fix).

    It is the message as a ``str`` (``str(p)``, joins and ``in`` read the message), so callers that
    print problems need nothing else; callers that place them (the web UI's form, the wizard) read
    ``field`` instead of parsing the text.
    """

    __slots__ = ("field",)

    def __new__(cls, field: str, message: str):
        self = super().__new__(cls, message)
        self.field = field
        return self

    @property
    def message(self) -> str:
        return str.__str__(self)

    def __getnewargs__(self):  # pickle / copy
        return self.field, self.message

    def __repr__(self) -> str:
        return f"Problem({self.field!r}, {self.message!r})"


class ConfigError(ValueError):
    """The config cannot run; ``problems`` lists every :class:`Problem` and the message has one
    line per problem with its fix (``invalid config:`` then ``  - <message>`` lines).

    ``ConfigError(Problem(field, text))`` (one problem found outside ``validate()``, e.g. a file that
    cannot be read) keeps ``text`` as the message; ``ConfigError("text")`` is a Problem whose field is ``""``.
    """

    def __init__(self, problems: Iterable[Problem] | Problem | str):
        if isinstance(problems, str):  # one problem, its text as it is
            self.problems = [problems if isinstance(problems, Problem) else Problem("", problems)]
            super().__init__(str.__str__(problems))
            return
        self.problems = [p if isinstance(p, Problem) else Problem("", str(p)) for p in problems]
        super().__init__("invalid config:\n  - " + "\n  - ".join(self.problems))

    def __reduce__(self):  # pickle keeps the problems (an exception pickles its args otherwise)
        return _config_error, (self.problems, self.args[0] if self.args else "")


def _config_error(problems, text):
    err = ConfigError(problems)
    err.args = (text,)
    return err


class DataError(ValueError):
    """The dataset cannot be used; the message names the folder/field and the fix."""


class CacheEntryError(DataError):
    """A cache entry that cannot be used as it is; ``path`` is its file, ``reason`` what is wrong."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(
            f"cache entry {path} is unusable ({reason}); delete it and run again: prepare_data re-encodes it"
        )


class ModelSourceError(RuntimeError):
    """A model source (hub id or folder) cannot be used; the message says how to fix it."""


class AdapterExportError(RuntimeError):
    """The adapter file could not be written; raised only after training and the final checkpoint."""


class LoraFileError(ValueError):
    """A LoRA file (or the base model it is merged into) cannot be used by ``python -m flux_lightning.lora_tools``:
    missing, of an unknown format, or for layers the base does not have; one line naming the file and the fix."""


class StorageError(OSError):
    """A file of the run could not be written (disk full, read-only or not permitted); the message
    is one line naming the folder, and the file it would have replaced is left as it was."""

    def __str__(self) -> str:
        return str(self.strerror)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; the run stops (last good
    checkpoint kept, no adapter file of the bad state written)."""


class RunDirInUse(RuntimeError):
    """Another live process holds the run dir."""


class SettingError(ValueError):
    """SimpleTuner values that have no equivalent here; one line per key, each naming the fix."""


class RankFailed(RuntimeError):
    """A DDP rank that Lightning started exited non-zero after rank 0 finished (``main`` exits 1)."""


class StopRequested(BaseException):
    """Raised at a safe point after SIGTERM/SIGINT (a ``BaseException``, like ``KeyboardInterrupt``,
    so that no ``except Exception`` on the way swallows it).

    Attributes:
        signum: the signal received.
        step: the optimizer step the run stopped at (None before training).
        checkpoint: the resumable checkpoint written at that step (None if none was written).
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.step: int | None = None
        self.checkpoint: str | None = None

    @property
    def exit_code(self) -> int:
        """128 + the signal number, what a shell reports for a process ended by that signal."""
        return 128 + int(self.signum)


# exit code of the command line for each error kind (train.main)
USER_ERRORS = (ConfigError, DataError, ModelSourceError, AdapterExportError, StorageError, LoraFileError)
