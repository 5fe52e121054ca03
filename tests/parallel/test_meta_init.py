"""Deferred initialisation (condformer.parallel.meta_init), the single-process parts.

Every preset builds on the meta device without drawing random numbers; allocated and given its unsaved buffers
back, it holds exactly the buffers of a real build (a garbage rotary table or exit weight would change every
output). The distributed part (sharding a meta model and filling it from rank 0) is in test_fsdp.py and
tests/e2e/test_scale_out.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condformer.config import ExitConfig, LayerSpec, ModelConfig
from condformer.errors import CondformerError
from condformer.model import build_model
from condformer.parallel.meta_init import build_on_meta, is_meta, materialize, reset_buffers, unsaved_buffers
from condformer.presets import preset, presets

SMALL = [name for name in presets() if preset(name).d_model <= 128]
# every kind of buffer in one model: llama3 rotary scaling, exits (depths, weights), hash and LSH routers, MoD
EVERYTHING = ModelConfig(
    d_model=32, n_layers=4, n_heads=2, max_seq_len=64, vocab_size=64,
    rope_scaling={"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0},
    exits=ExitConfig(weights="increasing"),
    layers=[LayerSpec(router="mod", options={"capacity": 0.5}), LayerSpec(ffn="moe", options={"moe_router": "hash"}),
            LayerSpec(ffn="moe", options={"moe_router": "lsh"}), LayerSpec()])


def test_small_presets_are_listed() -> None:
    assert len(SMALL) >= 10 and "tiny-exit" in SMALL


@pytest.mark.parametrize("name", presets())
def test_every_preset_builds_on_meta_without_random_draws(name: str) -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    model = build_on_meta(preset(name))
    assert is_meta(model) and all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert torch.equal(torch.get_rng_state(), before)  # so rank 0's real build sets every rank's generator


@pytest.mark.parametrize("cfg", [*(preset(n) for n in SMALL), EVERYTHING], ids=[*SMALL, "everything"])
def test_allocated_meta_model_recomputes_its_unsaved_buffers(cfg: ModelConfig) -> None:
    real = build_model(cfg)
    meta = build_on_meta(cfg)
    meta.to_empty(device="cpu")
    with torch.no_grad():
        for b in meta.buffers():
            b.fill_(7)  # what an allocation might hold: reset_buffers must overwrite every unsaved one
    reset_buffers(meta)
    expected = dict(real.named_buffers())
    names = [n for n, _ in unsaved_buffers(meta)]
    assert names == [n for n, _ in unsaved_buffers(real)]
    for n in names:
        torch.testing.assert_close(dict(meta.named_buffers())[n], expected[n], rtol=0, atol=0, msg=n)


def test_everything_has_every_kind_of_unsaved_buffer() -> None:
    kinds = {n.rsplit(".", 1)[-1] for n, _ in unsaved_buffers(build_on_meta(EVERYTHING))}
    assert kinds == {"inv_freq", "depths", "weights"}


class _Unrestorable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("table", torch.arange(3.0), persistent=False)


def test_an_unsaved_buffer_without_reset_buffers_is_a_one_line_error() -> None:
    with torch.device("meta"):
        model = _Unrestorable()
    model.to_empty(device="cpu")
    with pytest.raises(CondformerError) as err:
        reset_buffers(model)
    assert "'table'" in str(err.value) and "reset_buffers" in str(err.value) and "\n" not in str(err.value)


def test_materialize_without_values_only_allocates() -> None:
    """``from_source=False`` (a sharded checkpoint fills the rest): no process group is needed."""
    meta = build_on_meta(preset("tiny"))
    materialize(meta, "cpu", None, from_source=False)
    assert not is_meta(meta)
    real = build_model(preset("tiny"))
    for (n, b), (_, r) in zip(meta.named_buffers(), real.named_buffers(), strict=True):
        if n.endswith("inv_freq"):
            torch.testing.assert_close(b, r, rtol=0, atol=0)
