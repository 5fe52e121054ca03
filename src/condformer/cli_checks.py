"""Checks on what a user typed (flag values, devices, text, the run directory, memory) and the one line
each failure becomes.

Why they exist: every user mistake (a bad flag value, a device this machine lacks, text that is not UTF-8,
an ``--out`` that cannot be written, a batch that cannot fit, a full disk, an allocator refusing) must end
the command with **one line** on stderr and exit status 2, and leave **nothing written**: no half-made run
directory, no probe file. A traceback or a stray directory after a typo is a bug; a line naming the flag
and the fix is not. So these checks run before anything is loaded or written (argparse ``type=`` factories
fail while parsing), and what can only fail later (out of memory, an ``OSError``) is turned into one line
by :func:`condformer.cli.main` with :func:`out_of_memory_message` and :func:`os_error_message`.
``tests/e2e/test_cli_errors.py`` holds the table of mistakes. Torch is imported only where needed, so a
bad flag fails fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from condformer.errors import CondformerError, ConfigError


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise CondformerError(f"{message} (see `{self.prog} --help`)")


# -- flag values and text: checked while parsing (argparse type=) or first thing in a command -----
def int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got '{text}'") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {value}")
        return value

    return parse


def finite(lo: float, hi: float = math.inf, *, lo_open: bool = True) -> Callable[[str], float]:
    bounds = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi == math.inf else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {bounds}, got '{text}'") from None
        if not (math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi):
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got '{text}'")
        return value

    return parse


POSITIVE_INT, NONNEG_INT = int_at_least(1), int_at_least(0)
POSITIVE, NONNEG = finite(0), finite(0, lo_open=False)


def parse_thresholds(text: str) -> float | list[float | None]:
    """``--exit-threshold``: one number for every exit, or one per exit, comma-separated (``off``: not checked)."""
    try:
        values = [None if v.strip().lower() == "off" else float(v) for v in text.split(",")]
    except ValueError:
        values = [math.nan]
    if any(v is not None and not math.isfinite(v) for v in values):
        raise ConfigError(f"--exit-threshold takes a number or comma-separated numbers (or 'off'), got '{text}'")
    if len(values) == 1:
        if values[0] is None:
            raise ConfigError("--exit-threshold off alone switches every exit off: omit the flag for full depth")
        return values[0]
    return values


def check_utf8(text: str | None, flag: str) -> None:
    """Text from the shell that is not UTF-8 arrives with surrogate escapes; say so in one line."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{flag} is not valid UTF-8 text (undecodable byte at character {e.start}); "
                          f"pass UTF-8 text") from None


def read_utf8_file(path: str, flag: str) -> str:
    """The text of the file a flag names, or one line saying why it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
        raise CondformerError(f"cannot read {flag} '{path}' ({reason})") from None


# -- devices --------------------------------------------------------------------------------------
DEVICES = "auto, cpu, cuda, cuda:N, mps"


def valid_device(name: object) -> bool:
    return isinstance(name, str) and re.fullmatch(r"auto|cpu|(cuda|mps)(:\d+)?", name) is not None


def device_name(text: str) -> str:
    if not valid_device(text):
        raise argparse.ArgumentTypeError(f"unknown device '{text}'; use one of: {DEVICES}")
    return text


def check_device(name: str) -> str:
    """A device name that is valid and present here, or a one-line error listing the valid ones."""
    if not valid_device(name):
        raise ConfigError(f"unknown device '{name}'; use one of: {DEVICES}")
    if name.startswith(("cuda", "mps")):
        import torch

        kind, _, index = name.partition(":")
        count = (torch.cuda.device_count() if torch.cuda.is_available() else 0) if kind == "cuda" else \
            int(torch.backends.mps.is_available())
        if count == 0:
            raise ConfigError(f"device '{name}' requested but {kind.upper()} is not available here; "
                              f"use --device cpu or auto")
        if index and int(index) >= count:
            raise ConfigError(f"device '{name}' does not exist: this machine has {count} {kind} device(s) "
                              f"({kind}:0 to {kind}:{count - 1})")
    return name


# -- the run directory: writable before the run starts, removed again when the run wrote nothing ---
def check_out_dir(out: str | Path, flag: str = "--out") -> None:
    """One line, before anything is written, when ``out`` cannot become a directory this process writes.

    ``out`` must be a directory or not exist yet; the nearest existing directory at or above it must
    take a new file (a probe, written, synced and removed: catches read-only, permission, /proc, full disk).
    """
    p = where = Path(os.path.abspath(out))
    try:
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{flag} '{out}' is an existing file; pass a directory (new or a run directory)")
        while not where.exists():
            where = where.parent
        if not where.is_dir():
            raise ConfigError(f"{flag} '{out}' is under the file '{where}'; pass a path under a directory")
        fd, probe = tempfile.mkstemp(prefix=".condformer-probe-", dir=where)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{flag} '{out}' is not writable: cannot write a file in '{where}' "
                          f"({e.strerror or e}); choose another {flag}") from None


@contextlib.contextmanager
def removed_if_unused(out: str | Path) -> Iterator[None]:
    """Around a run: when it fails before writing anything, the directories it created for ``out`` go again."""
    out = Path(os.path.abspath(out))
    created = missing_top(out)
    try:
        yield
    except BaseException:
        if created is not None:
            remove_unused_run_dir(out, created)
        raise


def missing_top(out: Path) -> Path | None:
    """The highest directory at or above ``out`` that does not exist yet (None: ``out`` exists)."""
    top = None
    while not out.exists():
        top, out = out, out.parent
    return top


def remove_unused_run_dir(out: Path, top: Path) -> None:
    """A run that failed before writing anything leaves no directory behind (its lock file aside)."""
    lock = getattr(sys.modules.get("condformer.train"), "LOCK_FILE", ".lock")
    try:
        if not out.is_dir() or any(p.name != lock for p in out.iterdir()):
            return
        (out / lock).unlink(missing_ok=True)
        while True:  # out, then the parents this run created, each only if empty
            out.rmdir()
            if out == top:
                return
            out = out.parent
    except OSError:  # not empty, or already gone: leave it
        pass


# -- memory: a batch that cannot fit is refused up front; an allocator failure becomes one line
def check_memory(model_cfg: Any, batch_size: int, seq_len: int, device: str) -> None:
    """Refuse a batch whose activations cannot fit: a lower bound (logits and their gradient, one d-wide
    state per layer, in float32) against the device's total memory. Anything it lets through that still
    does not fit is reported by :func:`condformer.cli.main` as out of memory."""
    need = 4 * batch_size * seq_len * (2 * 256 + model_cfg.d_model * model_cfg.n_layers)  # >= 256 token ids
    have = _total_memory(device)
    if have and need > have:
        raise ConfigError(f"--batch-size {batch_size} x --seq-len {seq_len} needs more than {need / 2**30:,.0f} GiB "
                          f"of activations, more than this device's {have / 2**30:,.0f} GiB; lower --batch-size "
                          f"or --seq-len")


def _total_memory(device: str) -> int | None:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(int(device.partition(":")[2] or 0)).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def out_of_memory_message(e: BaseException) -> str | None:
    """One line for an allocator failure (torch.OutOfMemoryError, the CPU allocator's RuntimeError), else None."""
    text = str(e)
    if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or re.search(r"can't allocate memory|not enough memory|out of memory", text, re.IGNORECASE)):
        return None
    size = re.search(r"tried to allocate (\d+) bytes", text, re.IGNORECASE)
    amount = f"{int(size[1]) / 2**30:,.1f} GiB" if size else (
        m[1] if (m := re.search(r"tried to allocate ([\d.]+ [KMGT]i?B)", text, re.IGNORECASE)) else "")
    return (f"out of memory{f' (tried to allocate {amount})' if amount else ''}; lower --batch-size or --seq-len, "
            f"or use a smaller model")


# -- file-system failures while reading or writing ------------------------------------------------
def os_error_message(e: OSError) -> str:
    where = f" '{e.filename}'" if e.filename else ""
    hint = {errno.ENOSPC: "free some disk space or choose another --out", errno.EDQUOT: "free some quota or choose "
            "another --out", errno.EROFS: "choose a writable --out", errno.EACCES: "check its permissions",
            errno.EPERM: "check its permissions"}.get(e.errno, "check the path")
    return f"cannot use{where}: {e.strerror or e}; {hint}"


# -- per command: what a command checks once it has read its flags --------------------------------
def check_generate_flags(args: argparse.Namespace) -> None:
    """``generate``: a UTF-8 prompt and sampling flags that do not contradict each other."""
    check_utf8(args.prompt, "--prompt")
    if args.greedy and (args.temperature is not None or args.top_k is not None or args.top_p is not None):
        raise ConfigError("--greedy takes no --temperature/--top-k/--top-p; drop one or the other")
    if args.speculative is not None and args.exit_threshold is not None:
        raise ConfigError("--speculative verifies every token with the full model; it takes no --exit-threshold")
    if getattr(args, "draft_confidence", None) is not None and args.speculative is None:
        raise ConfigError("--draft-confidence stops a self-speculative draft early; add --speculative E")


def check_train_inputs(model_cfg: Any, train_cfg: Any, sample: str | None, sample_tokens: int, out: str) -> None:
    """``train``, once its configs are assembled: the device (a config file's too), the batch against the
    device's memory, room for ``--sample``, and a writable ``--out``."""
    check_device(train_cfg.device)
    check_memory(model_cfg, train_cfg.batch_size, train_cfg.seq_len, train_cfg.device)
    if sample and sample_tokens >= model_cfg.max_seq_len:
        raise ConfigError(f"--sample-tokens {sample_tokens} leaves no room for the prompt in the model's "
                          f"max_seq_len {model_cfg.max_seq_len}; lower --sample-tokens")
    check_out_dir(out)
