"""The compute dial's knobs on a trained model (issue 21): MoE experts per token and MoD's decision threshold.

Each knob goes through the model's one settings surface (``set_inference``) and must change what it claims and
nothing else: ``moe_top_k`` the number of experts a token visits (gates rescaled to the trained choice's total
weight), ``mod_threshold`` which tokens take a routed block. Under every setting cached decoding equals the full
forward and no position sees a later token; training ignores both.
"""

from __future__ import annotations

import pytest
import torch

from condformer.config import LayerSpec, ModelConfig
from condformer.errors import CondformerError, ConfigError
from condformer.model import build_model
from helpers import decode_with_cache, one_line_error, perturb_

F64 = torch.float64
V, T = 64, 16


def _moe_model(router: str = "topk", k: int = 2, renormalize: bool = True, aux_free: bool = True) -> torch.nn.Module:
    options = {"experts": 4, "moe_router": router, "capacity_factor": None}
    if router != "switch":
        options["top_k"] = k
        if router == "topk":
            options["renormalize"] = renormalize
    if aux_free:
        options["aux_free_rate"] = 0.01
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, vocab_size=V,
                      layers=[LayerSpec(), LayerSpec(ffn="moe", options=options)])
    torch.manual_seed(0)
    model = perturb_(build_model(cfg).to(F64), 0.05, expert_bias=0.05 if aux_free else 0.0)
    with torch.no_grad():
        model.layers[1].block.ffn.router.weight.mul_(20)  # routers that disagree between tokens
    return model.eval()


def _mod_model(causal_router: str = "predictor") -> torch.nn.Module:
    mod = LayerSpec(router="mod", options={"capacity": 0.5, "causal_router": causal_router})
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, vocab_size=V, layers=[mod, LayerSpec()])
    torch.manual_seed(1)
    model = perturb_(build_model(cfg).to(F64), 0.3).eval()
    if causal_router == "threshold":  # as training leaves it (a fresh model's -inf routes every token)
        model.layers[0].threshold.fill_(0.1)
    return model


def _tokens(B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# -- moe_top_k --------------------------------------------------------------------------------------------
def _reference_moe(ffn, x_ND: torch.Tensor, k: int) -> torch.Tensor:
    """A per-token loop: top-k of probs + bias, gates = probs rescaled to the trained top-k's total weight."""
    probs = (x_ND @ ffn.router.weight.T).softmax(-1)
    select = probs + ffn.expert_bias
    out = torch.zeros_like(x_ND)
    for n in range(x_ND.shape[0]):
        order = select[n].argsort(descending=True)
        trained = probs[n, order[:ffn.k]].sum() if not ffn.router.renormalize else torch.tensor(1.0, dtype=F64)
        chosen = order[:k]
        gates = probs[n, chosen] * trained / probs[n, chosen].sum()
        for e, g in zip(chosen.tolist(), gates, strict=True):
            up, down = ffn.bank.w_up[e], ffn.bank.w_down[e]
            out[n] += g * ffn.bank._act(x_ND[n] @ up) @ down
    return out


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
@torch.no_grad()
def test_moe_top_k_serves_k_experts_with_rescaled_gates(k: int, renormalize: bool) -> None:
    model = _moe_model(k=2, renormalize=renormalize)
    ffn = model.layers[1].block.ffn
    model.set_inference(moe_top_k=k)
    assert model.inference_settings()["moe_top_k"] == k
    x_ND = torch.randn(12, 32, dtype=F64, generator=torch.Generator().manual_seed(3))
    ctx_model_out = ffn(x_ND[None], model.context(torch.zeros(1, 12, dtype=torch.long)))
    torch.testing.assert_close(ctx_model_out[0], _reference_moe(ffn, x_ND, k), rtol=0, atol=1e-12)


@torch.no_grad()
def test_moe_top_k_changes_only_the_experts_visited() -> None:
    model = _moe_model()
    tokens = _tokens()
    base = model(tokens, trace=True)
    model.set_inference(moe_top_k=1)
    one = model(tokens, trace=True)
    visited = one.traces["layer1/moe_expert"]
    assert visited.shape[-1] == 1 and torch.equal(visited[..., 0], base.traces["layer1/moe_expert"][..., 0])
    assert not torch.allclose(one.logits, base.logits)
    model.set_inference(moe_top_k=None)  # back to the trained k: the same numbers, bit for bit
    assert torch.equal(model(tokens).logits, base.logits)
    model.set_inference(moe_top_k=2)
    assert torch.equal(model(tokens).logits, base.logits)


def test_training_ignores_moe_top_k() -> None:
    model = _moe_model(aux_free=False)
    tokens = _tokens()
    model.train()
    torch.manual_seed(5)
    base = model(tokens, tokens).logits
    model.set_inference(moe_top_k=1)
    torch.manual_seed(5)
    assert torch.equal(model(tokens, tokens).logits, base)


@pytest.mark.parametrize("router", ["topk", "switch", "noisy_topk"])
@pytest.mark.parametrize("k", [1, 3])
@torch.no_grad()
def test_cached_decoding_equals_the_full_forward_under_moe_top_k(router: str, k: int) -> None:
    model = _moe_model(router=router, k=1 if router == "switch" else 2, aux_free=router != "noisy_topk")
    model.set_inference(moe_top_k=k)
    tokens = _tokens(B=2, seed=4)
    decode_with_cache(model, tokens, 5, model(tokens).logits, atol=1e-10)


@pytest.mark.parametrize("bad", [0, 5, 1.5, True, "2"])
def test_moe_top_k_out_of_range_is_a_one_line_error(bad: object) -> None:
    msg = one_line_error(lambda: _moe_model().set_inference(moe_top_k=bad))
    assert "moe_top_k" in msg and "1 to 4" in msg


def test_models_without_a_learned_token_choice_router_have_no_moe_top_k() -> None:
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=32, vocab_size=V,
                      layers=[LayerSpec(ffn="moe", options={"experts": 4, "moe_router": "hash"})])
    hashed = build_model(cfg)
    assert "moe_top_k" not in hashed.inference_settings()
    msg = one_line_error(lambda: hashed.set_inference(moe_top_k=1), CondformerError)
    assert "moe_top_k" in msg


# -- mod_threshold ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal_router", ["predictor", "aux", "threshold"])
@torch.no_grad()
def test_mod_threshold_moves_the_routed_share(causal_router: str) -> None:
    model = _mod_model(causal_router)
    tokens = _tokens(B=4)
    shares = []
    for threshold in (-1e9, -0.5, 0.0, 0.5, 1e9):
        model.set_inference(mod_threshold=threshold)
        shares.append(float(model(tokens).stats["layer0/mod_routed_frac"]))
    assert shares[0] == 1.0 and shares[-1] == 0.0
    assert shares == sorted(shares, reverse=True) and len(set(shares)) >= 3


@torch.no_grad()
def test_mod_threshold_routes_by_the_causal_logit() -> None:
    """Exactly the tokens whose causal decision logit exceeds the threshold take the block."""
    model = _mod_model()
    tokens = _tokens(B=3)
    model.set_inference(mod_threshold=0.3)
    routed = model(tokens, trace=True).traces["layer0/mod_routed"]
    layer, x = model.layers[0], model.enter(tokens)  # the first layer reads the embedded tokens
    logit = layer.causal_logits(x, layer.router_logits(x))
    assert torch.equal(routed, logit > 0.3)
    assert 0 < int(routed.sum()) < routed.numel()


@torch.no_grad()
def test_mod_threshold_far_above_skips_the_block() -> None:
    """No token routed: the MoD layer is the identity, so the model equals running its other layer alone."""
    model = _mod_model()
    tokens = _tokens()
    model.set_inference(mod_threshold=1e9)
    x = model.run(model.enter(tokens), model.context(tokens), layers=[1])
    torch.testing.assert_close(model(tokens).logits, model.logits(model.readout(x)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("threshold", [-0.4, 0.4])
@pytest.mark.parametrize("B", [1, 3])
@torch.no_grad()
def test_cached_decoding_equals_the_full_forward_under_mod_threshold(threshold: float, B: int) -> None:
    model = _mod_model()
    model.set_inference(mod_threshold=threshold)
    tokens = _tokens(B=B, seed=6)
    decode_with_cache(model, tokens, 6, model(tokens).logits, atol=1e-10)


@pytest.mark.parametrize("threshold", [-0.4, 0.4])
@torch.no_grad()
def test_no_position_sees_a_later_token_under_mod_threshold(threshold: float) -> None:
    model = _mod_model()
    model.set_inference(mod_threshold=threshold)
    tokens = _tokens(B=2, seed=7)
    base = model(tokens).logits
    t = 7
    changed = tokens.clone()
    changed[:, t + 1:] = _tokens(B=2, seed=8)[:, t + 1:]
    torch.testing.assert_close(model(changed).logits[:, :t + 1], base[:, :t + 1], rtol=0, atol=0)


def test_training_ignores_mod_threshold() -> None:
    model = _mod_model().train()
    tokens = _tokens()
    base = model(tokens, tokens).logits
    model.set_inference(mod_threshold=5.0)
    assert torch.equal(model(tokens, tokens).logits, base)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "high", True])
def test_bad_mod_threshold_is_a_one_line_error(bad: object) -> None:
    msg = one_line_error(lambda: _mod_model().set_inference(mod_threshold=bad), ConfigError)
    assert "mod_threshold" in msg
