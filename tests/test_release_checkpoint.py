"""Checkpoints written by an earlier release still load, and still compute the same outputs.

``tests/fixtures/release_checkpoint/`` holds three tiny run directories saved by the library's checkpoint
writer at the commit its README names (a MoD/MoE/SwiGLU mix, AltUp with MoE and MoD, early exits with
SAS-P and parallel blocks), each with the eval outputs that commit computed for fixed tokens. Here the
current code loads each one the way the CLI does (:func:`load_for_inference`: JSON config, safetensors
weights, nothing unpickled) and must reproduce those outputs. A failure means a change altered what an
existing checkpoint means; regenerating the fixture would hide exactly that.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from condformer.checkpoint import load_for_inference
from condformer.generation import SamplingConfig, generate
from condformer.routing.early_exit import set_exit_thresholds
from condformer.routing.mod import set_eval_routing

FIXTURE = Path(__file__).parent / "fixtures" / "release_checkpoint"
TOL = dict(atol=1e-5, rtol=1e-5)
GEN_PROMPT, GEN_NEW = 8, 8  # as make_fixture.py decoded


def _load(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    _, model, _ = load_for_inference(FIXTURE / name)
    return model.cpu().eval(), load_file(str(FIXTURE / name / "expected.safetensors"))


@pytest.mark.parametrize("name", ["mixed", "altup", "exits"])
def test_release_checkpoint_logits(name: str) -> None:
    model, exp = _load(name)
    if name == "exits":  # the full-depth logits: the stored thresholds switched off
        set_exit_thresholds(model, None)
    with torch.no_grad():
        logits = model(exp["tokens"]).logits
    torch.testing.assert_close(logits.float(), exp["logits"], **TOL)


@pytest.mark.parametrize("name", ["mixed", "altup"])
def test_release_checkpoint_topk_routing(name: str) -> None:
    model, exp = _load(name)
    set_eval_routing(model, "topk")
    with torch.no_grad():
        logits = model(exp["tokens"]).logits
    torch.testing.assert_close(logits.float(), exp["logits_topk"], **TOL)


def test_release_checkpoint_exits() -> None:
    """The thresholds stored in the checkpoint's config apply: same per-token depths and exit logits, and
    the same greedy tokens and depths from the cached exit decoder."""
    model, exp = _load("exits")
    assert model.exits.policy() == "confidence"
    assert set(exp["exit_depth"].unique().tolist()) == {2, 4}  # the fixture has tokens at both exits
    with torch.no_grad():
        out = model(exp["tokens"], trace=True)
    torch.testing.assert_close(out.traces["exit_depth"].to(torch.int64), exp["exit_depth"], atol=0, rtol=0)
    torch.testing.assert_close(out.logits.float(), exp["exit_logits"], **TOL)
    stats: dict = {}
    new = generate(model, exp["tokens"][:, :GEN_PROMPT].tolist(),
                   SamplingConfig(max_new_tokens=GEN_NEW, greedy=True), stats=stats)
    assert new == exp["generated"].tolist()
    assert list(stats["exit_depths"]) == exp["generated_depths"].tolist()
