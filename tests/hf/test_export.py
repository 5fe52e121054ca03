"""Exporting runs: a dense model loads in transformers as its native architecture with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from tests.hf.models import FAMILIES, VOCAB, hf_config, perturbed, save_model_dir, transformers

from condformer.config import LayerSpec, ModelConfig
from condformer.errors import ConfigError
from condformer.hf.exporter import dense_reason, export_model
from condformer.hf.importer import import_model
from helpers import one_line_error

NATIVE = {"llama": "LlamaForCausalLM", "llama-bias": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
          "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel"}


@pytest.mark.parametrize("family", FAMILIES)
def test_import_export_load_gives_the_same_logits(family, tmp_path):
    hf = perturbed(hf_config(family), seed=10)
    import_model(save_model_dir(hf, tmp_path / "src"), tmp_path / "run")
    result = export_model(tmp_path / "run", tmp_path / "out")
    assert result["format"] == "native" and result["architecture"] == NATIVE[family]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == NATIVE[family]  # transformers' own class: nothing of condformer needed
    x = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, rtol=1e-5, atol=1e-5)
    # the tokenizer comes along and encodes as the source's did
    src_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "src")
    out_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "out")
    text = "import os\nprint('héllo wörld')  # 日本"
    assert out_tok.encode(text, add_special_tokens=False) == src_tok.encode(text, add_special_tokens=False)
    assert out_tok.eos_token == "<|endoftext|>"


def test_a_condformer_trained_dense_swiglu_model_exports_as_llama(tmp_path):
    """Not only imported models: condformer's own dense model with SwiGLU, RMSNorm and RoPE is a Llama."""
    from condformer.checkpoint import save_checkpoint
    from condformer.model import build_model

    cfg = ModelConfig(vocab_size=VOCAB, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, mlp="swiglu", d_ff=64,
                      max_seq_len=64, tie_embeddings=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(tmp_path / "run", 7, model, None, {}, cfg, None)
    export_model(tmp_path / "run", tmp_path / "out", "native")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_native_export_refuses_conditional_models_in_one_line(tmp_path):
    from condformer.checkpoint import save_checkpoint
    from condformer.model import build_model

    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, mlp="swiglu", max_seq_len=32,
                      layers=[LayerSpec(), LayerSpec(router="mod")])
    assert dense_reason(cfg) == "layer 1 is preln/mod/mlp"
    save_checkpoint(tmp_path / "run", 1, build_model(cfg), None, {}, cfg, None)
    msg = one_line_error(lambda: export_model(tmp_path / "run", tmp_path / "out", "native"), ConfigError)
    assert "layer 1 is preln/mod/mlp" in msg and "--format condformer" in msg
    assert not (tmp_path / "out").exists()
    gelu = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)  # GELU + RoPE: no family
    save_checkpoint(tmp_path / "gelu", 1, build_model(gelu), None, {}, gelu, None)
    msg = one_line_error(lambda: export_model(tmp_path / "gelu", tmp_path / "out", "native"), ConfigError)
    assert "mlp gelu" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
