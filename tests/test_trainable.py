"""Roles and name patterns select the parameters a run trains; everything else is frozen."""

from __future__ import annotations

import pytest
from tests.helpers import one_line_error

from condformer.config import ExitConfig, LayerSpec, ModelConfig
from condformer.model import build_model
from condformer.routing.mod import MoD
from condformer.routing.moe.ffn import MoE
from condformer.trainable import ROLES, apply_trainable, selector


@pytest.fixture
def model():
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=64, mlp="swiglu", tie_embeddings=False,
                      layers=[LayerSpec(router=MoD(capacity=0.5)), LayerSpec(ffn=MoE(experts=4, shared_experts=1))],
                      exits=ExitConfig(layers=[0], head="separate"))
    return build_model(cfg)


def _selected(model, entries, new=()):
    pick = selector(entries, new)
    return {n for n, _ in model.named_parameters() if pick(n)}


def test_each_role_selects_what_it_names(model):
    names = {n for n, _ in model.named_parameters()}
    assert _selected(model, ["routers"]) == {"layers.0.router.weight", "layers.0.predictor.0.weight",
                                             "layers.0.predictor.0.bias", "layers.0.predictor.2.weight",
                                             "layers.0.predictor.2.bias", "layers.1.block.ffn.router.weight"}
    assert _selected(model, ["exits"]) == {"exits.norms.0.weight", "exits.heads.0.weight"}
    assert _selected(model, ["experts"]) == {n for n in names if ".ffn.bank." in n or ".ffn.shared." in n}
    assert len(_selected(model, ["experts"])) == 4
    assert _selected(model, ["attention"]) == {n for n in names if ".attn." in n}
    assert _selected(model, ["head"]) == {"head.weight", "final_norm.weight"}
    assert _selected(model, ["embeddings"]) == {"embed.weight"}
    assert "exits.norms.0.weight" in _selected(model, ["norms"]) and "final_norm.weight" in _selected(model, ["norms"])
    assert not any(".attn.qkv" in n for n in _selected(model, ["norms"]))
    assert _selected(model, ["all"]) == names
    assert _selected(model, ["new"], new=["exits.heads.0.weight"]) == {"exits.heads.0.weight"}
    assert set(ROLES) >= {"all", "new", "routers", "exits", "experts"}


def test_patterns_and_roles_combine(model):
    got = _selected(model, ["routers", "layers.1.block.attn.*"])
    assert "layers.1.block.attn.qkv.weight" in got and "layers.0.router.weight" in got
    assert "layers.0.block.attn.qkv.weight" not in got


def test_apply_freezes_the_rest(model):
    trained, total = apply_trainable(model, ["exits"])
    assert trained == sum(p.numel() for n, p in model.named_parameters() if n.startswith("exits."))
    assert total == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad == n.startswith("exits.") for n, p in model.named_parameters())
    apply_trainable(model, None)  # None trains nothing more than it finds: requires_grad is left as it is
    assert not model.embed.weight.requires_grad


def test_bad_entries_are_one_line(model):
    assert "unknown trainable role 'router'" in one_line_error(lambda: apply_trainable(model, ["router"]))
    assert "selects no parameter" in one_line_error(lambda: apply_trainable(model, ["layers.9.*"]))
    assert "converted" in one_line_error(lambda: apply_trainable(model, ["new"]))
