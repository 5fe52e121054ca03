"""Bad sources are one-line errors that name the problem, and a failed import writes nothing to RUN."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file
from tests.hf.models import SIZES, hf_config, perturbed, save_model_dir, transformers

from condformer.errors import CheckpointError, ConfigError, DataError
from condformer.hf import source as source_module
from condformer.hf.exporter import export_model
from condformer.hf.importer import import_model
from helpers import one_line_error


@pytest.fixture
def src(tmp_path):
    return save_model_dir(perturbed(hf_config("llama")), tmp_path / "src")


def _fails(src, tmp_path, cls, *needles):
    msg = one_line_error(lambda: import_model(src, tmp_path / "run"), cls)
    for needle in needles:
        assert needle in msg, msg
    assert not (tmp_path / "run").exists()
    assert not list(tmp_path.glob(".run*"))  # no half-written temporary run either
    return msg


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def test_unsupported_architecture(tmp_path):
    neox = transformers.GPTNeoXConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64)
    src = save_model_dir(perturbed(neox), tmp_path / "src")
    _fails(src, tmp_path, ConfigError, "GPTNeoXForCausalLM", "not supported", "llama")


def test_missing_weights(src, tmp_path):
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, src / "model.safetensors")
    _fails(src, tmp_path, CheckpointError, "layers.1.mlp.up_proj.weight")


def test_shape_mismatch(src, tmp_path):
    _edit_config(src, intermediate_size=SIZES["intermediate_size"] + 8)
    _fails(src, tmp_path, CheckpointError, "layers.0.block.ffn.up.weight", "shape")


def test_tensors_the_mapping_does_not_use(src, tmp_path):
    weights = load_file(src / "model.safetensors")
    weights["model.layers.0.self_attn.rotary_scale"] = weights["model.norm.weight"].clone()
    save_file(weights, src / "model.safetensors")
    _fails(src, tmp_path, CheckpointError, "rotary_scale")


@pytest.mark.parametrize(("change", "needle"), [({"hidden_act": "gelu"}, "hidden_act"),
                                                ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4,
                                                                      "factor": 2.0}}, "yarn"),
                                                ({"pretraining_tp": 2}, "pretraining_tp")])
def test_a_field_that_cannot_be_mapped_exactly_is_named(src, tmp_path, change, needle):
    _edit_config(src, **change)
    _fails(src, tmp_path, ConfigError, needle, "exactly")


def test_only_pickled_weights(src, tmp_path):
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not read")
    _fails(src, tmp_path, CheckpointError, "pickled", "safetensors")


def test_a_missing_shard(tmp_path):
    src = save_model_dir(perturbed(hf_config("llama")), tmp_path / "src", max_shard_size="40KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    (src / sorted(set(index["weight_map"].values()))[1]).unlink()
    _fails(src, tmp_path, CheckpointError, "shard")


def test_missing_tokenizer(src, tmp_path):
    (src / "tokenizer.json").unlink()
    _fails(src, tmp_path, DataError, "tokenizer.json")


def test_gguf_without_the_gguf_package(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    real = source_module.importlib.util.find_spec
    monkeypatch.setattr(source_module.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    _fails(gguf, tmp_path, ConfigError, "gguf", "pip install")


def test_no_source_and_a_file_that_is_not_gguf(tmp_path):
    _fails(tmp_path / "nowhere", tmp_path, CheckpointError, "does not exist")
    (tmp_path / "weights.bin").write_bytes(b"x")
    _fails(tmp_path / "weights.bin", tmp_path, CheckpointError, "not a .gguf")


def test_import_and_export_never_overwrite(src, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    one_line_error(lambda: import_model(src, tmp_path / "run"), CheckpointError)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    import_model(src, tmp_path / "run2")
    one_line_error(lambda: export_model(tmp_path / "run2", tmp_path / "run"), CheckpointError)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]
