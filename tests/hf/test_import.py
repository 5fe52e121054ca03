"""Importing Hugging Face models: condformer's logits and cached greedy decoding equal transformers' own.

Every supported family, as a tiny random transformers model (GQA, biases, q/k norms, RoPE scaling where the
family has them), perturbed away from its init, saved with ``save_pretrained`` and imported.
"""

from __future__ import annotations

import json

import pytest
import torch
from tests.hf.models import FAMILIES, VOCAB, hf_config, perturbed, save_model_dir, transformers

from condformer.checkpoint import load_for_inference
from condformer.generation import SamplingConfig, generate
from condformer.hf.importer import build_imported, import_model, to_condformer
from condformer.hf.source import read_source


def _imported(hf_model, tmp_path):
    cfg, weights, _, _ = to_condformer(read_source(save_model_dir(hf_model, tmp_path / "src")))
    return build_imported(cfg, weights)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_float64(family, tmp_path):
    hf = perturbed(hf_config(family))
    ours = _imported(hf, tmp_path).double()
    hf = hf.double()
    x = torch.randint(0, VOCAB, (2, 96))  # past llama3's original context of 16: every frequency band is used
    with torch.no_grad():
        want, got = hf(x).logits, ours(x).logits
    # transformers computes rotary angles in float32 even in a float64 model; GPT-2 has no rotary
    atol = 1e-11 if family == "gpt2" else 2e-6
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert want.abs().max() > 0.1  # the logits are not trivially small


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_float32_with_padding(family, tmp_path):
    """Left-padded rows: condformer's positions start at each row's first token, as transformers' do."""
    hf = perturbed(hf_config(family), seed=1)
    ours = _imported(hf, tmp_path)
    x = torch.randint(0, VOCAB, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(x, attention_mask=mask, position_ids=positions).logits
        got = ours(x, positions_BT=positions, valid_BT=mask.bool()).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_decoding_equals_transformers_generate(family, tmp_path):
    hf = perturbed(hf_config(family), seed=2)
    ours = _imported(hf, tmp_path)
    prompt = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, 9:].tolist()
    got = generate(ours, [prompt[0].tolist()], SamplingConfig(max_new_tokens=16, greedy=True))[0]
    assert got == want


def test_sharded_safetensors_load(tmp_path):
    hf = perturbed(hf_config("llama"), seed=3)
    src = save_model_dir(hf, tmp_path / "src", max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file()
    assert len(set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    cfg, weights, _, _ = to_condformer(read_source(src))
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(build_imported(cfg, weights)(x).logits, hf(x).logits, rtol=1e-5, atol=1e-5)


def test_import_writes_a_run_every_command_reads(tmp_path):
    hf = perturbed(hf_config("qwen2"), seed=4)
    src = save_model_dir(hf, tmp_path / "src")
    report = import_model(src, tmp_path / "run")
    assert report.model_type == "qwen2" and report.params == sum(p.numel() for p in hf.parameters())
    ck, model, tok = load_for_inference(tmp_path / "run")
    assert ck.state["step"] == 0 and ck.model_cfg.qkv_bias and not ck.model_cfg.attn_out_bias
    # the tokenizer files as transformers reads them (AutoTokenizer would pick Qwen2's own class by model_type, which
    # rebuilds a Qwen pre-tokenizer that this synthetic tokenizer.json does not have)
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(src)
    text = "def f(x):\n    return x + 1  # héllo"
    assert tok.encode(text) == reference.encode(text, add_special_tokens=False)
    x = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, hf(x).logits, rtol=1e-5, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_the_wide_config_fields_are_plain_config(tmp_path):
    """What the families needed is ordinary ModelConfig: a condformer-native model uses it too."""
    hf = perturbed(hf_config("qwen3"), seed=5)
    cfg, _, _, _ = to_condformer(read_source(save_model_dir(hf, tmp_path / "src")))
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.qk_norm, cfg.mlp) == (2, 32, True, "swiglu")
    again = type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))).validate()
    assert again == cfg
