"""Tiny random transformers models of every supported family, saved as a model directory with a tokenizer.

Weights are perturbed away from transformers' init (norm gains of exactly 1 and zero biases hide mapping
mistakes), then rounded to float32 so that the saved checkpoint and the reference model hold the same values.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = __import__("pytest").importorskip("transformers")

VOCAB = 320  # the tokenizer has 300: a model's vocabulary may be padded past its tokenizer's
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def hf_config(family: str):
    """A 2-layer config of ``family`` with what makes the family itself (GQA, biases, q/k norms, RoPE scaling)."""
    if family == "llama":  # Llama 3: llama3 RoPE scaling, GQA, tied (as SmolLM2)
        return transformers.LlamaConfig(**SIZES, rope_parameters=LLAMA3, tie_word_embeddings=True)
    if family == "llama-bias":  # attention_bias and mlp_bias, untied
        return transformers.LlamaConfig(**SIZES, rope_parameters=ROPE, attention_bias=True, mlp_bias=True,
                                        tie_word_embeddings=False)
    if family == "mistral":
        return transformers.MistralConfig(**SIZES, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**SIZES, tie_word_embeddings=True)
    if family == "qwen3":  # head_dim 32: n_heads * head_dim = 128 != d_model
        return transformers.Qwen3Config(**SIZES, head_dim=32)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    raise ValueError(family)


FAMILIES = ("llama", "llama-bias", "mistral", "qwen2", "qwen3", "gpt2")


def perturbed(config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tokenizer_object():
    """A 300-token byte-level BPE with bos/eos specials, trained here (no download)."""
    tokenizers = __import__("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                             show_progress=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 20, "import os\nprint('hello world')\n" * 20],
                            trainer=trainer)
    return tok


def save_model_dir(model, path: Path, **save_kwargs) -> Path:
    """``save_pretrained`` of the model and of a fast tokenizer next to it: a model directory as users have them."""
    model.save_pretrained(path, **save_kwargs)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer_object(), bos_token="<s>",
                                                eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return path
