"""torch.compile accepts the model's training and cached-decoding paths without graph breaks.

Static shapes are a contract (no .item(), .nonzero() or data-dependent Python control flow in forward);
``fullgraph=True`` turns any graph break into an error, so this test fails if one creeps in.
"""

from __future__ import annotations

import pytest
import torch

from condformer import KVCache, LayerSpec, ModelConfig, build_model

pytestmark = pytest.mark.compile


ALTUP = {"k": 2, "variant": "recycled", "coefficients": "gemma"}
EXITS = {"halting": "token"}  # aligned training of every exit plus a halting module and its oracle
# skipless blocks: in-place accumulation, gains folded into the attention, the dense router's output path
SHAPED = [LayerSpec(block="sasp", options={"value_matrix": True}), LayerSpec(block="sas")]


@pytest.mark.parametrize("altup,exits,layers", [(None, None, None), (ALTUP, None, None), (None, EXITS, None),
                                               (None, None, SHAPED)], ids=["dense", "altup", "exits", "shaped"])
def test_training_path_compiles_fullgraph(altup: dict | None, exits: dict | None, layers: list | None) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, altup=altup, exits=exits,
                                    **({"layers": layers} if layers else {})))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randint(0, 260, (2, 16))
    out = compiled(x, x)
    out.train_loss.backward()
    ref = model(x, x)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.train_loss, ref.train_loss, rtol=1e-4, atol=1e-4)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("altup", [None, ALTUP], ids=["dense", "altup"])
def test_cached_decode_step_compiles_fullgraph(altup: dict | None) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, altup=altup)).eval()
    cache = KVCache.for_model(model, 1, 8)
    x = torch.randint(0, 260, (1, 8))
    with torch.no_grad():
        model(x[:, :4], cache=cache)
        step = torch.compile(model, fullgraph=True)
        out = step(x[:, 4:5], positions_BT=torch.tensor([[4]]), cache=cache)
        ref = model(x[:, :5]).logits[:, -1]
    torch.testing.assert_close(out.logits[:, -1], ref, rtol=1e-4, atol=1e-4)
