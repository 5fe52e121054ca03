"""Typed component options: LayerSpec(router=MoD(...)) is the same layer as the release's dict form.

Each component's options class declares types, choices and bounds; bad values are one-line errors naming the
layer and the setting; files and checkpoints keep the flat ``options`` mapping (only non-default settings).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import condformer as cf
from condformer.config import LayerSpec, ModelConfig
from condformer.config_files import load_config_file, save_config_file
from condformer.errors import ConfigError
from condformer.model import build_model
from condformer.options import ComponentOptions
from condformer.registry import BLOCKS, FFNS, ROUTERS

TYPED = {"mod": cf.MoD, "moe": cf.MoE, "preln": cf.PreLN, "parallel": cf.Parallel, "sas": cf.SAS, "sasp": cf.SASP}


def _cfg(*layers: LayerSpec) -> ModelConfig:
    return ModelConfig(vocab_size=64, max_seq_len=32, d_model=16, n_layers=len(layers), n_heads=2, layers=list(layers))


def _one_line(fn) -> str:  # noqa: ANN001
    with pytest.raises(ConfigError) as err:
        fn()
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_every_registered_component_with_options_declares_them_typed():
    for registry in (BLOCKS, ROUTERS, FFNS):
        for name in registry.names():
            if not registry.get(name).__module__.startswith("condformer."):
                continue  # a test's own plugin
            options = getattr(registry.get(name), "Options", None)
            if name in TYPED:
                assert options is TYPED[name], name
                assert options.component == name and options.axis == registry.axis
            else:  # dense router, MLP: nothing to set
                assert options is None and not getattr(registry.get(name), "options", ()), name


def test_typed_and_dict_forms_build_the_same_model():
    typed = LayerSpec(block=cf.SASP(value_matrix=True, beta_ff=0.2), router=cf.MoD(capacity=0.25),
                      ffn=cf.MoE(experts=4, top_k=1, capacity_factor=None))
    plain = LayerSpec(block="sasp", router="mod", ffn="moe",
                      options={"value_matrix": True, "beta_ff": 0.2, "capacity": 0.25, "experts": 4, "top_k": 1,
                               "capacity_factor": None})
    assert typed == plain
    models = []
    for spec in (typed, plain):
        torch.manual_seed(0)
        models.append(build_model(_cfg(LayerSpec(), spec)).eval())
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(models[0](x).logits, models[1](x).logits, rtol=0, atol=0)
    assert models[0].layers[1].capacity == 0.25 and models[0].layers[1].block.ffn.n_experts == 4


def test_options_round_trip_through_files_as_the_flat_mapping(tmp_path):
    spec = LayerSpec(router=cf.MoD(capacity=0.5, causal_router="aux"), ffn=cf.MoE(experts=4))
    assert spec.to_dict() == {"block": "preln", "router": "mod", "ffn": "moe",
                              "options": {"capacity": 0.5, "causal_router": "aux", "experts": 4}}
    cfg = _cfg(LayerSpec(), spec).validate()
    for suffix in (".json", ".yaml"):
        save_config_file(tmp_path / f"c{suffix}", cfg)
        again = load_config_file(tmp_path / f"c{suffix}")[0]
        assert again == cfg
        assert cf.MoD.of(again.layers[1]) == cf.MoD(capacity=0.5, causal_router="aux")


def test_defaults_are_not_written_and_parse_back_to_the_defaults():
    for name, options in TYPED.items():
        assert options().to_options() == {}, name
        assert options.from_options({}) == options(), name
    assert LayerSpec(router=cf.MoD()).options == {}


@pytest.mark.parametrize(("options", "needle"), [
    ({"capacity": 1.5}, "layers[0]: capacity must be a number > 0 and <= 1, got 1.5"),
    ({"capacity": "half"}, "layers[0]: capacity must be a number > 0 and <= 1, got 'half'"),
    ({"capacity": float("nan")}, "layers[0]: capacity must be a number > 0 and <= 1, got nan"),
    ({"weighting": "tanh"}, "layers[0]: unknown weighting 'tanh'; choose one of: sigmoid, 2sigmoid, raw"),
    ({"predictor_hidden": 0}, "layers[0]: predictor_hidden must be an integer >= 1, or null for d_model // 4"),
    ({"aux_coef": True}, "layers[0]: aux_coef must be a number >= 0, got True"),
])
def test_bad_mod_options_are_one_line_errors(options, needle):
    msg = _one_line(lambda: _cfg(LayerSpec(router="mod", options=options)).validate())
    assert msg.startswith(needle), msg


@pytest.mark.parametrize(("options", "needle"), [
    ({"experts": 0}, "experts must be an integer >= 1, got 0"),
    ({"experts": 2.0}, "experts must be an integer >= 1, got 2.0"),
    ({"capacity_factor": 0}, "capacity_factor must be a number > 0, or null for dropless, got 0"),
    ({"renormalize": "yes"}, "renormalize must be true or false, got 'yes'"),
    ({"moe_router": "switch", "top_k": 2}, "moe_router 'switch' sends each token to one expert"),
    ({"experts": 2, "top_k": 3}, "top_k (3) exceeds the number of experts (2)"),
])
def test_bad_moe_options_are_one_line_errors(options, needle):
    msg = _one_line(lambda: _cfg(LayerSpec(ffn="moe", options=options)).validate())
    assert msg == f"layers[0]: {needle}" or msg.startswith(f"layers[0]: {needle}"), msg


def test_typed_options_are_checked_when_the_spec_is_made():
    msg = _one_line(lambda: LayerSpec(router=cf.MoD(capacity=0)))
    assert msg.startswith("LayerSpec.router: capacity must be a number > 0")
    msg = _one_line(lambda: LayerSpec(router=cf.MoE(experts=4)))
    assert msg == "LayerSpec.router: MoE holds an ffn's options; pass it as LayerSpec(ffn=MoE(...))"
    msg = _one_line(lambda: LayerSpec(router={"capacity": 0.5}))
    assert msg.startswith("LayerSpec.router must be a registered router name or a router's options")
    msg = _one_line(lambda: LayerSpec(router=cf.MoD(capacity=0.5), options={"capacity": 0.25}))
    assert "['capacity'] set both" in msg
    assert LayerSpec(router=cf.MoD(capacity=0.5), options={"capacity": 0.5}).options == {"capacity": 0.5}


def test_a_plugin_listing_plain_option_keys_still_works():
    """The release's plugin form: a component that lists the keys it reads (``options = (...)``), untyped."""
    from torch import nn

    class Plain(nn.Module):
        options = ("gain",)

        def __init__(self, cfg, spec, layer_index, block):  # noqa: ANN001
            super().__init__()
            self.block, self.gain = block, spec.options.get("gain", 1.0)

        def forward(self, x, ctx):  # noqa: ANN001
            return x + self.gain * self.block(x, ctx)

    if "plain_gain" not in ROUTERS.names():
        ROUTERS.register("plain_gain")(Plain)
    model = build_model(_cfg(LayerSpec(router="plain_gain", options={"gain": 0.5})))
    assert model.layers[0].gain == 0.5
    msg = _one_line(lambda: _cfg(LayerSpec(router="plain_gain", options={"gian": 0.5})).validate())
    assert "unknown option(s) ['gian']" in msg


def test_a_setting_of_no_component_of_the_layer_is_refused():
    msg = _one_line(lambda: _cfg(LayerSpec(router="mod", options={"experts": 4})).validate())
    assert msg.startswith("layers[0]: unknown option(s) ['experts'] for preln/mod/mlp")


def test_the_options_base_reads_types_choices_and_bounds_declaratively():
    from condformer.options import option

    @dataclasses.dataclass
    class Toy(ComponentOptions):
        axis = "router"
        component = "toy"
        width: int | None = option(None, ge=2, null="automatic")
        mode: str = option("a", choices=("a", "b"))
        rate: float = option(0.5, gt=0, lt=1)
        flag: bool = False

    got = Toy.from_options({"width": 4, "mode": "b", "rate": 0.25, "flag": True, "other": 1})
    assert got == Toy(4, "b", 0.25, True)  # keys of other components are left to ModelConfig.validate
    assert Toy.from_options({"width": 2}).width == 2  # bounds are inclusive where declared so
    with pytest.raises(ConfigError, match=r"x: rate must be a number > 0 and < 1, got 1$"):
        Toy.from_options({"rate": 1}, "x")  # an int is a number, but this bound is strict
    with pytest.raises(ConfigError, match=r"x: width must be an integer >= 2, or null for automatic, got 1"):
        Toy.from_options({"width": 1}, "x")
    with pytest.raises(ConfigError, match=r"x: mode must not be null"):
        Toy.from_options({"mode": None}, "x")
    with pytest.raises(ConfigError, match=r"x: flag must be true or false, got 0"):
        Toy.from_options({"flag": 0}, "x")
    assert Toy(width=3).to_options() == {"width": 3}
