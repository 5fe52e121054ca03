"""User-facing errors.

Every mistake a user can make (bad config, missing corpus, bad flag, corrupt checkpoint) raises a
subclass of :class:`CondformerError` whose message is one line naming the problem and the fix. The CLI
prints that line and exits non-zero; it never shows a traceback for these.
"""


class CondformerError(Exception):
    """Base class for errors caused by user input, reported as one line."""


class ConfigError(CondformerError, ValueError):
    """An invalid model or training configuration."""


class DataError(CondformerError):
    """A corpus, tokenizer or dataset problem (missing path, empty corpus, binary file, ...)."""


class CheckpointError(CondformerError):
    """A missing, incomplete or incompatible checkpoint."""


class TrainingError(CondformerError):
    """Training cannot continue (for example a non-finite loss)."""
