"""CLI fuzz table: every bad invocation prints exactly one line on stderr, exits 2 and writes nothing.

Invocations run in-process (``condformer.cli.main``) for speed; a few run as real subprocesses to check
that no traceback reaches the terminal end to end. Placeholders in the table: ``{run}`` a trained tiny run
directory (shared, must stay unchanged), ``{tmp}`` the test's own directory, ``{file}`` a plain file in it,
``{corpus}`` a small code corpus.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import condformer.train
from condformer.cli import main

TRAIN = ["train", "--preset", "tiny", "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--no-progress",
         "--data", "{corpus}"]
OUT = ["--out", "{tmp}/run"]
GEN = ["generate", "{run}", "--prompt", "def ", "--max-new-tokens", "4"]


def _raise(exc: BaseException) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise exc

    return fail


def _fake_train_that_fills_the_disk(model_cfg: object, cfg: object, out_dir: str, **kwargs: object) -> None:
    out = Path(out_dir)  # as the trainer does: the run directory and its lock first, then a write fails
    out.mkdir(parents=True)
    (out / getattr(condformer.train, "LOCK_FILE", ".lock")).touch()
    raise OSError(errno.ENOSPC, "No space left on device", str(out / "config.json"))


def _mkdir_on_full_disk(tmp: Path) -> Callable[..., None]:
    real = Path.mkdir

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if str(self).startswith(str(tmp)):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        real(self, *args, **kwargs)

    return mkdir


# patches: (target, factory of the replacement given the test's directory)
UNWRITABLE = ("tempfile.mkstemp", lambda tmp: _raise(PermissionError(errno.EACCES, "Permission denied")))
FULL_DISK = ("os.fsync", lambda tmp: _raise(OSError(errno.ENOSPC, "No space left on device")))
FULL_DISK_MKDIR = ("pathlib.Path.mkdir", _mkdir_on_full_disk)
FULL_DISK_LATER = ("condformer.train.train", lambda tmp: _fake_train_that_fills_the_disk)
CPU_OOM = ("condformer.train.train", lambda tmp: _raise(RuntimeError(
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 4000000000000 bytes. Error code 12 (Cannot allocate memory)")))
CUDA_OOM = ("condformer.train.train", lambda tmp: _raise(torch.OutOfMemoryError(
    "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.1 GiB")))

CONFIGS = {
    "top.json": {"model": {"preset": "tiny"}, "trian": {"max_steps": 1}},
    "model-key.json": {"model": {"preset": "tiny", "d_modle": 64}},
    "train-key.json": {"model": {"preset": "tiny"}, "train": {"max_step": 1}},
    "no-model.json": {"train": {"max_steps": 1}},
    "device.json": {"model": {"preset": "tiny"}, "train": {"device": "bogus", "max_steps": 1}},
}
YAML_TOP = "model:\n  preset: tiny\nTrain:\n  max_steps: 1\n"

CASES: list[tuple[str, list[str], tuple | None]] = [
    # --out
    ("out-is-a-file", [*TRAIN, "--out", "{file}"], None),
    ("out-under-a-file", [*TRAIN, "--out", "{file}/run"], None),
    ("out-under-proc", [*TRAIN, "--out", "/proc/condformer-run"], None),
    ("out-unwritable", [*TRAIN, *OUT], UNWRITABLE),
    ("out-unwritable-existing", [*TRAIN, "--out", "{tmp}"], UNWRITABLE),
    ("out-full-disk", [*TRAIN, *OUT], FULL_DISK),
    ("out-full-disk-at-mkdir", [*TRAIN, *OUT], FULL_DISK_MKDIR),
    ("out-full-disk-while-writing", [*TRAIN, *OUT], FULL_DISK_LATER),
    ("compare-out-is-a-file", ["compare", "--out", "{file}", "--no-progress"], None),
    # devices
    ("train-device-bogus", [*TRAIN, *OUT, "--device", "bogus"], None),
    ("train-device-missing", [*TRAIN, *OUT, "--device", "cuda:99"], None),
    ("bench-device-bogus", ["bench", "--preset", "tiny", "--device", "gpu"], None),
    ("compare-device-bogus", ["compare", "--device", "bogus", "--out", "{tmp}/study"], None),
    ("compare-device-missing", ["compare", "--device", "cuda:99", "--out", "{tmp}/study"], None),
    # non-finite or out-of-range numbers
    ("budget-flops-nan", [*TRAIN, *OUT, "--budget-flops", "nan"], None),
    ("budget-flops-inf", [*TRAIN, *OUT, "--budget-flops", "inf"], None),
    ("budget-flops-negative", [*TRAIN, *OUT, "--budget-flops", "-1e9"], None),
    ("lr-inf", [*TRAIN, *OUT, "--lr", "inf"], None),
    ("lr-nan", [*TRAIN, *OUT, "--lr", "nan"], None),
    ("compare-budget-nan", ["compare", "--budget-flops", "nan", "--out", "{tmp}/study"], None),
    ("compare-lr-nan", ["compare", "--lr", "nan", "--out", "{tmp}/study"], None),
    ("temperature-inf", [*GEN, "--temperature", "inf"], None),
    ("temperature-nan", [*GEN, "--temperature", "nan"], None),
    ("temperature-negative", [*GEN, "--temperature", "-1"], None),
    ("temperature-zero", [*GEN, "--temperature", "0"], None),
    ("top-p-nan", [*GEN, "--top-p", "nan"], None),
    ("top-p-above-one", [*GEN, "--top-p", "1.5"], None),
    ("exit-threshold-nan", [*GEN, "--exit-threshold", "nan"], None),
    ("exit-threshold-text", [*GEN, "--exit-threshold", "high"], None),
    ("tolerance-nan", ["calibrate", "{run}", "--tolerance", "nan"], None),
    ("tolerance-negative", ["calibrate", "{run}", "--tolerance", "-0.1"], None),
    ("check-cost-inf", ["calibrate", "{run}", "--tolerance", "0.01", "--check-cost", "inf"], None),
    # integers that must be >= 1 (or >= 0)
    ("eval-batches-negative", ["eval", "{run}", "--batches", "-1"], None),
    ("eval-batches-zero", ["eval", "{run}", "--batches", "0"], None),
    ("calibrate-batches-zero", ["calibrate", "{run}", "--tolerance", "0.01", "--batches", "0"], None),
    ("max-new-tokens-zero", [*GEN, "--max-new-tokens", "0"], None),
    ("top-k-zero", [*GEN, "--top-k", "0"], None),
    ("draft-tokens-zero", [*GEN, "--speculative", "1", "--draft-tokens", "0"], None),
    ("speculative-zero", [*GEN, "--speculative", "0"], None),
    ("max-steps-zero", [*TRAIN, *OUT, "--max-steps", "0"], None),
    ("max-steps-fraction", [*TRAIN, *OUT, "--max-steps", "1.5"], None),
    ("budget-tokens-zero", [*TRAIN, *OUT, "--budget-tokens", "0"], None),
    ("seq-len-zero", [*TRAIN, *OUT, "--seq-len", "0"], None),
    ("batch-size-zero", [*TRAIN, *OUT, "--batch-size", "0"], None),
    ("grad-accum-zero", [*TRAIN, *OUT, "--grad-accum", "0"], None),
    ("eval-every-zero", [*TRAIN, *OUT, "--eval-every", "0"], None),
    ("checkpoint-every-zero", [*TRAIN, *OUT, "--checkpoint-every", "0"], None),
    ("warmup-negative", [*TRAIN, *OUT, "--warmup-steps", "-1"], None),
    ("sample-tokens-zero", [*TRAIN, *OUT, "--sample", "x", "--sample-tokens", "0"], None),
    ("sample-tokens-too-many", [*TRAIN, *OUT, "--sample", "x", "--sample-tokens", "5000"], None),
    ("flops-seq-len-zero", ["flops", "--preset", "tiny", "--seq-len", "0"], None),
    ("bench-seq-len-zero", ["bench", "--preset", "tiny", "--seq-len", "0"], None),
    ("bench-repeats-zero", ["bench", "--preset", "tiny", "--repeats", "0"], None),
    ("bench-warmup-negative", ["bench", "--preset", "tiny", "--warmup", "-1"], None),
    ("bench-new-tokens-zero", ["bench", "--preset", "tiny", "--mode", "generate", "--new-tokens", "0"], None),
    ("inspect-curve-batches-zero", ["inspect", "{run}", "--curve-batches", "0"], None),
    ("compare-seeds-zero", ["compare", "--seeds", "0", "--out", "{tmp}/study"], None),
    # text that is not UTF-8 (the shell's undecodable bytes arrive as surrogate escapes)
    ("prompt-not-utf8", ["generate", "{run}", "--prompt", "def \udcff\udcfe"], None),
    ("sample-not-utf8", [*TRAIN, *OUT, "--sample", "\udcff"], None),
    ("inspect-text-not-utf8", ["inspect", "{run}", "--text", "x\udcc3"], None),
    # out of memory
    ("batch-size-huge", [*TRAIN, *OUT, "--batch-size", str(10**9)], None),
    ("oom-cpu-allocator", [*TRAIN, *OUT], CPU_OOM),
    ("oom-cuda", [*TRAIN, *OUT], CUDA_OOM),
    # config files
    ("config-unknown-top-level-key", ["train", "--config", "{tmp}/top.json", *OUT], None),
    ("config-misspelt-yaml-section", ["train", "--config", "{tmp}/top.yaml", *OUT], None),
    ("config-unknown-model-key", ["train", "--config", "{tmp}/model-key.json", *OUT], None),
    ("config-unknown-train-key", ["train", "--config", "{tmp}/train-key.json", *OUT], None),
    ("config-no-model", ["train", "--config", "{tmp}/no-model.json", *OUT], None),
    ("config-device-bogus", ["train", "--config", "{tmp}/device.json", *OUT], None),
    ("config-not-utf8", ["train", "--config", "{tmp}/binary.json", *OUT], None),
    ("config-missing", ["train", "--config", "{tmp}/missing.json", *OUT], None),
    # other mistakes
    ("unknown-preset", ["train", "--preset", "tiny-nope", *OUT], None),
    ("unknown-command", ["trian"], None),
    ("unknown-flag", [*TRAIN, *OUT, "--max-stepz", "2"], None),
    ("no-preset-no-config", ["flops"], None),
    ("eval-missing-run", ["eval", "{tmp}/nope"], None),
    ("generate-missing-run", ["generate", "{tmp}/nope", "--prompt", "x"], None),
    ("calibrate-missing-run", ["calibrate", "{tmp}/nope", "--tolerance", "0.01"], None),
    ("inspect-missing-run", ["inspect", "{tmp}/nope"], None),
    ("calibrate-no-exits", ["calibrate", "{run}", "--tolerance", "0.01", "--batches", "1"], None),
    ("speculative-no-exits", [*GEN, "--speculative", "1"], None),
    ("greedy-with-temperature", [*GEN, "--greedy", "--temperature", "0.5"], None),
    ("empty-prompt", ["generate", "{run}", "--prompt", ""], None),
    ("resume-missing-run", [*TRAIN, *OUT, "--resume"], None),
    ("train-into-finished-run", [*TRAIN, "--out", "{run}"], None),
    ("seq-len-above-model", [*TRAIN, "--out", "{tmp}/a/b/run", "--seq-len", "5000"], None),
    ("data-missing", [*TRAIN, *OUT, "--data", "{tmp}/no-corpus"], None),
    ("tokenizer-bogus", [*TRAIN, *OUT, "--tokenizer", "bogus"], None),
    ("eval-data-missing", ["eval", "{run}", "--data", "{tmp}/no-corpus"], None),
    ("inspect-text-file-missing", ["inspect", "{run}", "--text-file", "{tmp}/missing.txt"], None),
]


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONDFORMER_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, code_corpus: Path, _cache: None) -> Path:
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["train", "--preset", "tiny", "--max-steps", "2", "--batch-size", "2", "--seq-len", "32",
                 "--eval-every", "2", "--data", str(code_corpus), "--out", str(out), "--no-progress"]) == 0
    return out


def _listing(*roots: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``roots``: files with size and mtime, directories by name (a probe file written and
    removed again changes a directory's mtime, not what it holds)."""
    return {str(p): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for root in roots if root.exists() for p in [root, *root.rglob("*")]}


def _fill(args: list[str], **places: Path) -> list[str]:
    return [a.format(**{k: str(v) for k, v in places.items()}) for a in args]


@pytest.mark.parametrize(("argv", "patch"), [pytest.param(a, p, id=name) for name, a, p in CASES])
def test_mistake_is_one_line_and_writes_nothing(argv: list[str], patch: tuple | None, run: Path, code_corpus: Path,
                                                tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("not a directory\n")
    for name, payload in CONFIGS.items():
        (tmp_path / name).write_text(json.dumps(payload))
    (tmp_path / "top.yaml").write_text(YAML_TOP)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe{\x00}")
    args = _fill(argv, run=run, tmp=tmp_path, file=file, corpus=code_corpus)
    before = _listing(tmp_path, run)
    if patch is not None:
        monkeypatch.setattr(patch[0], patch[1](tmp_path))
    code = main(args)
    monkeypatch.undo()
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("condformer: error: ") and len(lines[0]) > 25, err
    assert "Traceback" not in out + err
    assert _listing(tmp_path, run) == before  # nothing created, nothing modified (the shared run included)


def test_other_runtime_errors_still_raise(monkeypatch: pytest.MonkeyPatch, code_corpus: Path,
                                          tmp_path: Path) -> None:
    monkeypatch.setattr("condformer.train.train", _raise(RuntimeError("an internal bug, not a user mistake")))
    with pytest.raises(RuntimeError, match="internal bug"):
        main(_fill([*TRAIN, *OUT], tmp=tmp_path, corpus=code_corpus))


def test_probe_leaves_no_file(run: Path) -> None:
    from condformer.cli_checks import check_out_dir

    before = _listing(run)
    check_out_dir(run)
    check_out_dir(run / "not-yet")
    assert _listing(run) == before and not (run / "not-yet").exists()


def _cli(*args: str | bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "condformer.cli", *args], capture_output=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("args", [
    pytest.param(("generate", "{run}", "--prompt", b"def \xff\xfe"), id="prompt-bytes-not-utf8"),
    pytest.param(("train", "--preset", "tiny", "--out", "{file}"), id="out-is-a-file"),
    pytest.param(("train", "--preset", "tiny", "--device", "bogus", "--out", "{tmp}/run"), id="device-bogus"),
    pytest.param(("eval", "{run}", "--batches", "-1"), id="eval-batches-negative"),
])
def test_end_to_end_no_traceback(args: tuple, run: Path, tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("x")
    before = _listing(tmp_path, run)
    places = {"run": str(run), "tmp": str(tmp_path), "file": str(file)}
    proc = _cli(*[a.format(**places) if isinstance(a, str) else a for a in args])
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert _listing(tmp_path, run) == before


@pytest.mark.skipif(Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1"
                    if Path("/proc/sys/vm/overcommit_memory").exists() else True,
                    reason="needs an allocator that refuses a 2 TB request at once (Linux, no forced overcommit)")
def test_real_allocator_failure_is_one_line(capsys: pytest.CaptureFixture) -> None:
    code = main(["bench", "--preset", "tiny", "--batch-size", str(10**9), "--seq-len", "256", "--repeats", "1",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "out of memory" in err and "--batch-size" in err, err
