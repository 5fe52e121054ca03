"""The trainer's parallel layout refuses, with one line and before building anything, what cannot work."""

from __future__ import annotations

import pytest

from condformer.config import ExitConfig, ModelConfig, TrainConfig
from condformer.errors import ConfigError
from condformer.parallel.runtime import Layout
from helpers import one_line_error


def _layout(world: int = 4, **settings) -> Layout:
    return Layout(TrainConfig(max_steps=1, **settings), 0, world, "cpu")


@pytest.mark.parametrize(("settings", "world", "expected"), [
    ({"expert_parallel": 3}, 4, "expert_parallel 3 does not divide the 4 ranks"),
    ({"checkpoint_format": "sharded"}, 2, "checkpoint_format 'sharded' needs --parallel fsdp"),
    ({"parallel": "fsdp", "expert_parallel": 2, "checkpoint_format": "full"}, 2, "saves sharded checkpoints only"),
    ({"expert_parallel": 2, "compile": True}, 2, "--compile with --expert-parallel"),
])
def test_impossible_layouts_are_one_line(settings: dict, world: int, expected: str) -> None:
    assert expected in one_line_error(lambda: _layout(world, **settings).check(), ConfigError)


@pytest.mark.parametrize("settings", [{"parallel": "fsdp"}, {"expert_parallel": 2}])
def test_exits_that_stop_at_different_depths_need_ddp(settings: dict) -> None:
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, exits=ExitConfig(thresholds=[0.9]))
    assert "every rank to run every layer" in one_line_error(lambda: _layout(2, **settings).check(cfg), ConfigError)
    plain = ModelConfig(d_model=32, n_layers=2, n_heads=2, exits=ExitConfig())
    _layout(2, **settings).check(plain)  # exits trained without thresholds: every rank runs every layer


@pytest.mark.parametrize(("settings", "sharded"), [
    ({}, False), ({"parallel": "fsdp"}, True), ({"parallel": "fsdp", "checkpoint_format": "full"}, False),
    ({"expert_parallel": 2}, False), ({"parallel": "fsdp", "expert_parallel": 2}, True),
])
def test_possible_layouts_pass_and_pick_their_checkpoint_format(settings: dict, sharded: bool) -> None:
    layout = _layout(2, **settings)
    layout.check()
    assert layout.sharded_checkpoints is sharded


def test_bad_settings_are_one_line() -> None:
    for settings, expected in (({"parallel": "tp"}, "parallel"), ({"expert_parallel": 0}, "expert_parallel"),
                               ({"activation_checkpointing": "some"}, "activation_checkpointing"),
                               ({"dist_timeout_s": 0.0}, "dist_timeout_s"),
                               ({"checkpoint_format": "zip"}, "checkpoint_format")):
        assert expected in one_line_error(lambda s=settings: TrainConfig(max_steps=1, **s).validate(), ConfigError)


def test_fsdp_with_experts_does_not_resume_a_single_file() -> None:
    layout = _layout(2, parallel="fsdp", expert_parallel=2)
    assert "resume it with one of them" in one_line_error(lambda: layout.check(None, resuming_single_file=True),
                                                          ConfigError)
    layout.check(None, resuming_single_file=False)  # a sharded checkpoint resumes with both
    _layout(2, parallel="fsdp").check(None, resuming_single_file=True)
    _layout(2, expert_parallel=2).check(None, resuming_single_file=True)
