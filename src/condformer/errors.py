"""User-facing errors.

Every mistake a user can make (bad config, missing corpus, bad flag, corrupt checkpoint) raises a
subclass of :class:`CondformerError` whose message is one line naming the problem and the fix. The CLI
prints that line and exits non-zero; it never shows a traceback for these.
"""

from __future__ import annotations


class CondformerError(Exception):
    """Base class for errors caused by user input, reported as one line.

    Under torchrun every rank meets the same bad input, so the CLI prints an error on rank 0 only, unless it is
    ``rank_specific``: something only this rank saw (a peer that stopped answering it, its own shard failing to
    write), which every rank that has it reports.
    """

    rank_specific: bool = False

    def on_this_rank(self) -> CondformerError:
        """This error, marked as one only this rank saw (see the class docstring)."""
        self.rank_specific = True
        return self


class ConfigError(CondformerError, ValueError):
    """An invalid model or training configuration."""


class DataError(CondformerError):
    """A corpus, tokenizer or dataset problem (missing path, empty corpus, binary file, ...)."""


class CheckpointError(CondformerError):
    """A missing, incomplete or incompatible checkpoint."""


class TrainingError(CondformerError):
    """Training cannot continue (for example a non-finite loss)."""
