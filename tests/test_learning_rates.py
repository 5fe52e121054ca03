"""Default learning rates: the measured anchors, the scaling rules, and that train and compare use them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from condformer.compare import StudyConfig
from condformer.config import TrainConfig
from condformer.errors import ConfigError
from condformer.learning_rates import recommended_lr, techniques, with_default_lr
from condformer.presets import preset
from condformer.train import train
from helpers import one_line_error

DEFAULT_TOKENS = TrainConfig().batch_size * TrainConfig().seq_len  # 16 x 256


@pytest.mark.parametrize(("name", "want"), [
    ("tiny", 4e-3), ("tiny-parallel", 8e-3), ("tiny-sas", 1.6e-2), ("tiny-sasp", 1.6e-2),
    ("tiny-bert", 2e-3), ("tiny-bert-sasp", 8e-3),
])
def test_measured_anchors_at_the_default_batch(name: str, want: float) -> None:
    """The rates the 800-step sweeps found best at d = 128 and 16 x 256 tokens per step (RESULTS.md)."""
    assert recommended_lr(preset(name), DEFAULT_TOKENS) == pytest.approx(want)


def test_quick_study_batch_takes_the_square_root_rule() -> None:
    """8 x 128 tokens per step is a quarter of the default batch: half the rate (the sweep's 2e-3 for tiny)."""
    assert recommended_lr(preset("tiny"), 8 * 128) == pytest.approx(2e-3)
    assert recommended_lr(preset("tiny"), 4 * DEFAULT_TOKENS) == pytest.approx(8e-3)


def test_wider_models_scale_as_one_over_width() -> None:
    rates = [recommended_lr(preset(size), DEFAULT_TOKENS) for size in ("tiny", "small", "medium", "gpt2-small")]
    assert rates == pytest.approx([4e-3, 2e-3, 1e-3, 4e-3 * 128 / 768])
    assert recommended_lr(preset("medium-sasp"), DEFAULT_TOKENS) == pytest.approx(4e-3)


def test_a_mixed_pattern_takes_the_most_cautious_family() -> None:
    from condformer.config import LayerSpec

    cfg = dataclasses.replace(preset("tiny"), layers=[LayerSpec(block="sasp"), LayerSpec(block="parallel")])
    assert recommended_lr(cfg, DEFAULT_TOKENS) == pytest.approx(8e-3)


def test_technique_factors_from_the_quick_sweep() -> None:
    """At 8 x 128 tokens per step: MoD, MoE and exits best at the dense rate (2e-3), AltUp at twice it."""
    for name, want in (("tiny-mod", 2e-3), ("tiny-moe", 2e-3), ("tiny-exit", 2e-3), ("tiny-altup", 4e-3),
                       ("tiny-raltup", 4e-3)):
        assert recommended_lr(preset(name), 8 * 128) == pytest.approx(want), name


def test_techniques_are_recognised() -> None:
    assert techniques(preset("tiny")) == []
    assert techniques(preset("tiny-mod")) == ["mod"]
    assert techniques(preset("tiny-mode-staged")) == ["mod", "moe"]
    assert techniques(preset("tiny-altup")) == ["altup"]
    assert techniques(preset("tiny-exit")) == ["exits"]


def test_with_default_lr_fills_only_an_unset_rate() -> None:
    cfg = TrainConfig(max_steps=1, batch_size=8, seq_len=128, grad_accum=2)
    assert cfg.lr is None
    filled = with_default_lr(cfg, preset("tiny"), world=2)  # global batch 8 x 2 x 2 x 128 = the default
    assert filled.lr == pytest.approx(4e-3)
    assert with_default_lr(dataclasses.replace(cfg, lr=0.5), preset("tiny")).lr == 0.5


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf"), True, "fast"])
def test_bad_learning_rates_are_one_line_errors(bad) -> None:  # noqa: ANN001
    one_line_error(lambda: TrainConfig(max_steps=1, lr=bad).validate())
    one_line_error(lambda: StudyConfig(lr=bad).validate(), ConfigError)


def test_train_without_lr_saves_the_recommended_rate(tmp_path, code_corpus) -> None:  # noqa: ANN001
    cfg = TrainConfig(data=str(code_corpus), max_steps=2, batch_size=2, seq_len=32, eval_every=2, eval_batches=1,
                      tensorboard=False)
    train(preset("tiny-sasp"), cfg, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["lr"] == pytest.approx(recommended_lr(preset("tiny-sasp"), 2 * 32))


def test_compare_trains_each_preset_at_its_own_rate() -> None:
    study = StudyConfig.from_budget("quick")
    assert study.lr is None
    assert study.lr_of("tiny") == pytest.approx(2e-3)
    assert study.lr_of("tiny-sasp") == pytest.approx(8e-3)
    assert study.run_key("tiny-sasp", 0)["lr"] == study.lr_of("tiny-sasp")
    shared = StudyConfig.from_budget("quick", lr=1e-3)
    assert shared.lr_of("tiny") == shared.lr_of("tiny-sasp") == 1e-3
