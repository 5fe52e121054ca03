"""Multi-process bad input and failures end with one line on the rank that sees them, never a hang."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from condformer.config import ModelConfig, TrainConfig
from condformer.errors import CondformerError, ConfigError
from condformer.train import train

from .spawn import run_ranks

MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64}


def _stall_then_train(rank: int, world: int, corpus: str, out: str) -> str:
    """Rank 1 stops answering after its first step (as a hung or dead rank does); every rank reports its error."""
    def on_step() -> None:
        if rank == 1:
            time.sleep(8)
            raise SystemExit(0)  # the "dead" rank leaves without another collective

    cfg = TrainConfig(data=corpus, seq_len=32, batch_size=2, max_steps=50, eval_every=100, dist_timeout_s=2,
                      tensorboard=False)
    try:
        train(ModelConfig(**MODEL), cfg, out, progress=False, on_step=on_step)
    except CondformerError as e:
        return f"error: {e}"
    except SystemExit:
        return "left"
    return "finished"


def test_a_stalled_rank_times_out_with_one_line(tmp_path: Path, code_corpus: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDFORMER_CACHE", str(tmp_path / "cache"))
    t0 = time.monotonic()
    rank0, rank1 = run_ranks(_stall_then_train, 2, tmp_path, str(code_corpus), str(tmp_path / "run"), timeout_s=2)
    assert time.monotonic() - t0 < 60  # the survivor did not wait for ever
    assert rank1 == "left"
    assert rank0.startswith("error: rank 0: a collective failed or waited more than 2 s") and "\n" not in rank0
    assert "--resume" in rank0


def test_fsdp_without_a_process_group_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for settings, flag in (({"parallel": "fsdp"}, "--parallel fsdp"), ({"expert_parallel": 2}, "--expert-parallel 2")):
        cfg = TrainConfig(max_steps=1, **settings)
        with pytest.raises(ConfigError) as err:
            train(ModelConfig(**MODEL), cfg, tmp_path / "run", progress=False)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"{flag} needs a process group") and "torchrun" in msg
        assert not (tmp_path / "run").exists()


def _prepare(rank: int, world: int, corpora: list[str]) -> str:
    from condformer.train import _prepare_on_each_node

    try:
        data = _prepare_on_each_node(TrainConfig(data=corpora[rank], max_steps=1), "byte", rank, world)
    except CondformerError as e:
        return f"error: {e}"
    return f"tokens {data.fingerprint['train_tokens']}"


def test_ranks_that_prepare_different_data_stop_with_one_line(tmp_path: Path, code_corpus: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDFORMER_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other"
    other.mkdir()
    for i in range(20):
        (other / f"m{i}.py").write_text(f"x = {i}\n" * 200, encoding="utf-8")
    same = run_ranks(_prepare, 2, tmp_path, [str(code_corpus)] * 2)
    assert same[0] == same[1] and same[0].startswith("tokens")
    differ = run_ranks(_prepare, 2, tmp_path, [str(code_corpus), str(other)])
    for r, msg in enumerate(differ):
        assert msg.startswith(f"error: rank {r}: the ranks prepared different data") and "\n" not in msg
