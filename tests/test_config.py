"""ModelConfig / LayerSpec / TrainConfig: file round trips, layer patterns, presets in files, validation."""

from __future__ import annotations

import json

import pytest

from condformer.config import LayerSpec, ModelConfig, TrainConfig, every_other
from condformer.config_files import load_config_file, save_config_file
from condformer.errors import ConfigError
from condformer.model import build_model
from condformer.presets import preset
from condformer.registry import ROUTERS
from condformer.routing.dense import DenseRouter


class _OptionsRouter(DenseRouter):
    """A dense router that accepts options, so that LayerSpec options can be round-tripped and validated."""

    options = ("capacity", "tags")


if "test_options" not in ROUTERS.names():
    ROUTERS.register("test_options")(_OptionsRouter)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg, "error message is empty"
    assert "\n" not in msg, f"error message spans several lines: {msg!r}"
    return msg


def _non_default_model() -> ModelConfig:
    return ModelConfig(
        name="roundtrip", kind="encoder", vocab_size=300, max_seq_len=96, d_model=48, n_layers=4, n_heads=3,
        d_ff=100, mlp="swiglu", norm="layernorm", norm_eps=1e-6, rope_base=500000.0, tie_embeddings=False,
        init_std=0.013,
        layers=[
            LayerSpec(),
            LayerSpec(router="test_options", options={"capacity": 0.125, "tags": ["a", "b"]}),
        ],
    )


def _non_default_train() -> TrainConfig:
    return TrainConfig(data="/tmp/corpus", val_fraction=0.1, seq_len=32, batch_size=3, grad_accum=2, lr=3e-4,
                       min_lr_ratio=0.05, warmup_steps=7, max_steps=123, budget_tokens=10_000, budget_flops=2.5e15,
                       on_nonfinite="skip", dtype="bf16", seed=17, tensorboard=False, mlm_probability=0.3)


# -- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_file_round_trip_preserves_everything(tmp_path, suffix):
    model, train = _non_default_model().validate(), _non_default_train().validate()
    path = tmp_path / f"cfg{suffix}"
    save_config_file(path, model, train)
    model2, train2 = load_config_file(path)
    assert model2.to_dict() == model.to_dict()
    assert train2 is not None and train2.to_dict() == train.to_dict()
    assert all(isinstance(s, LayerSpec) for s in model2.layers)
    assert model2.layers[1].options == {"capacity": 0.125, "tags": ["a", "b"]}
    assert isinstance(model2.rope_base, float) and isinstance(model2.d_model, int)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_file_without_train_section(tmp_path, suffix):
    model = _non_default_model()
    path = tmp_path / f"m{suffix}"
    save_config_file(path, model)
    model2, train2 = load_config_file(path)
    assert train2 is None
    assert model2.to_dict() == model.to_dict()


def test_bare_model_mapping_is_accepted(tmp_path):
    path = tmp_path / "bare.json"
    path.write_text(json.dumps({"d_model": 64, "n_heads": 4, "layers": ["dense"]}))
    model, train = load_config_file(path)
    assert train is None
    assert (model.d_model, model.n_heads, model.head_size) == (64, 4, 16)
    assert model.layers == [LayerSpec(router="dense")]


def test_dict_round_trip():
    model = _non_default_model()
    again = ModelConfig.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.to_dict() == model.to_dict()
    train = _non_default_train()
    assert TrainConfig.from_dict(train.to_dict()).to_dict() == train.to_dict()


def test_hand_written_yaml_with_exponent_floats(tmp_path):
    # PyYAML's YAML 1.1 resolver reads 3e-4 (no dot) as a string; configs are written that way by hand
    path = tmp_path / "hand.yaml"
    path.write_text("model:\n  d_model: 32\n  n_heads: 2\n  norm_eps: 1e-6\n  rope_base: 5E+5\n"
                    "train:\n  lr: 3e-4\n  budget_flops: 2.5e+15\n  max_steps: 10\n  data: '1e-3'\n")
    model, train = load_config_file(path)
    assert model.norm_eps == 1e-6 and model.rope_base == 5e5
    assert train.lr == 3e-4 and train.budget_flops == 2.5e15
    assert train.data == "1e-3"  # quoted: still a string


# -- layer patterns ------------------------------------------------------------------------------
def test_two_entry_pattern_alternates_over_four_layers():
    a, b = LayerSpec(), LayerSpec(router="test_options", options={"capacity": 0.5})
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=4, layers=[a, b]).validate()
    specs = cfg.layer_specs()
    assert [s.router for s in specs] == ["dense", "test_options", "dense", "test_options"]
    assert [s.options for s in specs] == [{}, {"capacity": 0.5}, {}, {"capacity": 0.5}]
    specs[1].options["capacity"] = 0.9  # expanded specs are copies, not aliases of the pattern
    assert b.options == {"capacity": 0.5}
    assert cfg.layer_specs()[3].options == {"capacity": 0.5}
    model = build_model(cfg)
    assert [type(layer) for layer in model.layers] == [DenseRouter, _OptionsRouter] * 2


def test_one_spec_per_layer():
    specs = [LayerSpec(router="test_options", options={"capacity": i / 10}) for i in range(4)]
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=4, layers=specs).validate()
    assert [s.options["capacity"] for s in cfg.layer_specs()] == [0.0, 0.1, 0.2, 0.3]


def test_pattern_that_does_not_divide_n_layers_is_rejected():
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=4, layers=[LayerSpec(), LayerSpec(), LayerSpec()])
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    msg = _one_line(err)
    assert "3" in msg and "n_layers" in msg


def test_every_other():
    routed = LayerSpec(router="test_options", options={"capacity": 0.25})
    assert every_other(routed) == [LayerSpec(), routed]
    dense = LayerSpec(block="preln", router="dense", ffn="mlp")
    pattern = every_other(routed, dense)
    assert pattern[0] is dense and pattern[1] is routed
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=6, layers=every_other(routed)).validate()
    assert [s.router for s in cfg.layer_specs()] == ["dense", "test_options"] * 3


# -- presets in files ----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_preset_with_overrides_in_config_file(tmp_path, suffix):
    import yaml

    payload = {"model": {"preset": "small", "n_layers": 8}, "train": {"max_steps": 5}}
    path = tmp_path / f"p{suffix}"
    path.write_text(json.dumps(payload) if suffix == ".json" else yaml.safe_dump(payload))
    model, train = load_config_file(path)
    expected = preset("small").to_dict()
    expected["n_layers"] = 8
    assert model.to_dict() == expected
    assert (model.d_model, model.n_heads, model.n_layers) == (256, 4, 8)
    assert train is not None and train.max_steps == 5


def test_unknown_preset_in_config_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"model": {"preset": "enormous"}}))
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    assert "enormous" in _one_line(err)


# -- validation ----------------------------------------------------------------------------------
_BASE = {"d_model": 32, "n_heads": 2, "n_layers": 2, "max_seq_len": 64}

_BAD_MODELS = {
    "not-divisible": ({"d_model": 30, "n_heads": 4}, "divisible"),
    "odd-head-dim": ({"d_model": 36, "n_heads": 4}, "even"),
    "unknown-norm": ({"norm": "batchnorm"}, "batchnorm"),
    "unknown-mlp": ({"mlp": "relu"}, "relu"),
    "unknown-kind": ({"kind": "seq2seq"}, "seq2seq"),
    "unknown-block": ({"layers": [{"block": "postln"}]}, "postln"),
    "unknown-router": ({"layers": [{"router": "mystery"}]}, "mystery"),
    "unknown-router-shorthand": ({"layers": ["mystery"]}, "mystery"),
    "unknown-ffn": ({"layers": [{"ffn": "moe-of-doom"}]}, "moe-of-doom"),
    "unknown-field": ({"d_modle": 64}, "d_modle"),
    "unknown-layerspec-field": ({"layers": [{"routr": "dense"}]}, "routr"),
    "string-for-int": ({"d_model": "128"}, "d_model"),
    "bool-for-int": ({"n_layers": True}, "n_layers"),
    "string-for-float": ({"norm_eps": "1e-5"}, "norm_eps"),
    "int-for-bool": ({"tie_embeddings": 1}, "tie_embeddings"),
    "null-for-int": ({"d_model": None}, "d_model"),
    "zero-layers": ({"n_layers": 0}, "n_layers"),
    "unknown-option": ({"layers": [{"options": {"capacity": 0.5}}]}, "capacity"),
    "unknown-option-on-known-router": (
        {"layers": [{"router": "test_options", "options": {"capacity": 0.5, "bogus": 1}}]}, "bogus"),
    "empty-layers": ({"layers": []}, "layers"),
    "layers-not-a-list": ({"layers": 5}, "layers"),
    "layers-a-mapping": ({"layers": {"router": "dense"}}, "list"),
    "options-not-a-mapping": ({"layers": [{"options": 5}]}, "options"),
    "options-a-list": ({"layers": [{"options": ["capacity"]}]}, "options"),
}


@pytest.mark.parametrize("case", list(_BAD_MODELS))
def test_invalid_model_configs_raise_one_line_config_error(tmp_path, case):
    override, needle = _BAD_MODELS[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": {**_BASE, **override}}))
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    assert needle in _one_line(err)


def test_base_of_invalid_cases_is_valid(tmp_path):
    # guards the table above: each case fails because of its override, not because of the base
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"model": _BASE}))
    model, _ = load_config_file(path)
    assert model.to_dict() == ModelConfig(**_BASE).to_dict()


def test_divisibility_error_suggests_a_divisor():
    with pytest.raises(ConfigError) as err:
        ModelConfig(d_model=30, n_heads=4).validate()
    msg = _one_line(err)
    suggestion = int(msg.rsplit("n_heads=", 1)[1].split()[0].strip(".;,)"))
    assert 30 % suggestion == 0


def test_build_model_validates():
    with pytest.raises(ConfigError):
        build_model(ModelConfig(d_model=30, n_heads=4))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config_file(tmp_path / "nope.json")
    assert "nope.json" in _one_line(err)


@pytest.mark.parametrize(("name", "text"), [
    ("broken.json", '{"model": {"d_model": 32,,}'),
    ("broken.yaml", "model:\n  d_model: [32\n  n_heads: 2\n"),
    ("list.json", "[1, 2, 3]"),
    ("model-not-mapping.json", '{"model": 5}'),
])
def test_unparseable_or_malformed_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    _one_line(err)


# -- TrainConfig ---------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [{"max_steps": 10}, {"budget_tokens": 1000}, {"budget_flops": 1e12}])
def test_train_config_with_a_budget_is_valid(budget):
    cfg = TrainConfig(**budget)
    assert cfg.validate() is cfg


@pytest.mark.parametrize(("override", "needle"), [
    ({"max_steps": None}, "budget"),
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"val_fraction": 0.6}, "val_fraction"),
    ({"val_fraction": -0.1}, "val_fraction"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite"),
    ({"max_steps": 0}, "max_steps"),
    ({"lr": 0.0}, "lr"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ({"beta2": 1.0}, "beta"),
    ({"dtype": "fp16"}, "dtype"),
    ({"batch_size": 0}, "batch_size"),
])
def test_train_config_validation_errors(override, needle):
    cfg = TrainConfig(**{"max_steps": 10, **override})
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert needle in _one_line(err)


@pytest.mark.parametrize(("d", "needle"), [
    ({"learning_rate": 1e-3}, "learning_rate"),
    ({"max_steps": "10"}, "max_steps"),
    ({"lr": True}, "lr"),
    ({"compile": "yes"}, "compile"),
])
def test_train_config_from_dict_errors(d, needle):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(d)
    assert needle in _one_line(err)


def test_train_config_int_for_float_is_coerced():
    cfg = TrainConfig.from_dict({"lr": 1, "budget_flops": 10**15, "max_steps": 3})
    assert isinstance(cfg.lr, float) and isinstance(cfg.budget_flops, float) and isinstance(cfg.max_steps, int)


def test_save_config_file_is_atomic(tmp_path, monkeypatch):
    """A write that dies before it completes leaves the previous file whole (never a half-written config)."""
    import os

    path = tmp_path / "cfg.json"
    old = ModelConfig(d_model=32, n_heads=2)
    save_config_file(path, old)
    before = path.read_text()

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_config_file(path, ModelConfig(d_model=64, n_heads=4))
    assert path.read_text() == before
    assert load_config_file(path)[0] == old.validate()
