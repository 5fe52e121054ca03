"""AltUp and Recycled-AltUp (Baykal et al. 2023) against independent float64 references.

What is checked, group by group:

1. identity init: Recycled-AltUp (mean output) loaded with a dense twin's weights computes the dense model,
   with scalar and Gemma coefficients, dense / MoD / MoE layers; perturbing one coefficient breaks it;
2. the whole stream against a naive reference (``altup_reference.py``: per-block loops, explicit sums, its
   own expand and reduce) for every variant x output x schedule x layer input x K, with random p and g;
   both coefficient modules against their explicit formulas;
3. Gemma coefficients against transformers' ``Gemma3nTextAltUp`` (weights copied one to one);
4. KV-cached decoding and greedy generation against the full forward;
5. FLOPs against FlopCounterMode (plus the elementwise correct term) and exact parameter counts;
6. config validation (one-line errors naming the field) and round trips;
7. training: gradients of p and g (finite differences), no weight decay on them, stats;
8. bf16 autocast keeps the stream in float32;
9. encoders and padded batches.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from condformer.cache import KVCache
from condformer.config import AltUpConfig, LayerSpec, ModelConfig
from condformer.config_files import load_config_file, save_config_file
from condformer.context import Context
from condformer.flops import count_flops
from condformer.generation import SamplingConfig, generate, left_pad
from condformer.model import build_model
from condformer.optim import param_groups
from condformer.presets import preset
from condformer.routing.altup import GemmaCoefficients, ScalarCoefficients
from condformer.routing.mod import MoDRouter
from helpers import decode_with_cache, naive_greedy, one_line_error

from . import altup_reference as R
from .fixtures import _one_thread, _seed  # noqa: F401  (autouse fixtures)

D = 32
V = 260
F64 = torch.float64
TOL64 = {"rtol": 0, "atol": 1e-10}




# -- builders -------------------------------------------------------------------------------------
PATTERNS = {
    "dense": [LayerSpec()],
    "mod": [LayerSpec(), LayerSpec(router="mod", options={"capacity": 0.5})],
    "moe": [LayerSpec(), LayerSpec(ffn="moe", options={"experts": 4, "top_k": 2})],
}


def _cfg(k: int = 2, variant: str = "recycled", *, n_layers: int = 4, layers: list | None = None,
         tie: bool = True, kind: str = "decoder", init_std: float = 0.1, **altup) -> ModelConfig:
    return ModelConfig(d_model=D, n_layers=n_layers, n_heads=2, max_seq_len=64, vocab_size=V, kind=kind,
                       tie_embeddings=tie, init_std=init_std, layers=list(layers or [LayerSpec()]),
                       altup=AltUpConfig(k=k, variant=variant, **altup))


@torch.no_grad()
def _randomize(model: nn.Module, scale: float = 0.3, router_std: float = 3.0) -> nn.Module:
    """Trained-looking coefficients: p = I + noise, g = 1 + noise; Gemma's router and weights random."""
    for c in model.altup.coefs:
        _randomize_coefs(c, scale, router_std)
    return model


@torch.no_grad()
def _randomize_coefs(c: nn.Module, scale: float = 0.3, router_std: float = 3.0) -> None:
    if isinstance(c, ScalarCoefficients):
        K = c.p.shape[0]
        c.p.copy_(torch.eye(K) + scale * torch.randn(K, K))
        c.g.copy_(1 + scale * torch.randn(K))
    else:
        c.router_norm.weight.copy_(1 + scale * torch.randn_like(c.router_norm.weight))
        c.modality_router.weight.normal_(std=router_std)
        c.prediction_coefs.weight.normal_(std=scale)
        c.correction_coefs.weight.normal_(std=scale)


def _tokens(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T))


def _altup_keys(model: nn.Module) -> set[str]:
    return {k for k in model.state_dict() if k.startswith("altup.")}


# -- 1. identity init: Recycled-AltUp is its dense twin ---------------------------------------------
@pytest.mark.parametrize("coefficients", ["scalar", "gemma"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("k", [2, 3, 4])
@torch.no_grad()
def test_recycled_altup_at_init_computes_its_dense_twin(k, pattern, coefficients):
    cfg = _cfg(k, "recycled", output="mean", layers=PATTERNS[pattern], coefficients=coefficients)
    dense = build_model(dataclasses.replace(cfg, altup=None)).double()
    model = build_model(cfg).double()
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == []
    assert set(missing) == _altup_keys(model) and missing
    if coefficients == "gemma":  # the router is free at init: only the zero W_p, W_c make it the identity
        for c in model.altup.coefs:
            c.router_norm.weight.normal_(1.0, 0.3)
            c.modality_router.weight.normal_(std=3.0)
    tokens = _tokens(2, 12)
    for training in (True, False):
        model.train(training)
        dense.train(training)
        want = dense(tokens).logits
        got = model(tokens).logits
        assert want.abs().max() > 0.1  # not a trivially small function
        assert (got - want).abs().max() <= 1e-12, (got - want).abs().max()
    # control: one coefficient off the identity and the function changes
    c = model.altup.coefs[0]
    if coefficients == "scalar":
        c.p[0, 1] += 0.1
    else:
        c.prediction_coefs.weight[1, 0] = 0.5
    assert (model(tokens).logits - dense(tokens).logits).abs().max() > 1e-4


@torch.no_grad()
def test_identity_coefficients_at_construction():
    model = build_model(_cfg(3, "recycled", coefficients="scalar"))
    for c in model.altup.coefs:
        assert torch.equal(c.p, torch.eye(3)) and torch.equal(c.g, torch.ones(3))
    model = build_model(_cfg(3, "recycled", coefficients="gemma"))
    for c in model.altup.coefs:
        assert not c.prediction_coefs.weight.any() and not c.correction_coefs.weight.any()
        assert c.modality_router.weight.abs().max() > 0


# -- 2. the whole stream against the naive reference ------------------------------------------------
VARIANT_OUTPUTS = [("standard", "concat"), ("standard", "mean"), ("standard", "sum"), ("recycled", "mean"),
                   ("recycled", "sum")]


def _ref_model(variant: str, output: str, k: int, *, layers=None, **altup) -> nn.Module:
    tie = not (variant == "standard" and output in ("mean", "sum"))
    cfg = _cfg(k, variant, output=output, tie=tie, layers=layers, **altup)
    return _randomize(build_model(cfg).double())


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("layer_input", ["block", "prediction"])
@pytest.mark.parametrize("schedule", ["alternating", "same"])
@pytest.mark.parametrize(("variant", "output"), VARIANT_OUTPUTS)
@torch.no_grad()
def test_forward_matches_naive_reference(variant, output, schedule, layer_input, k):
    model = _ref_model(variant, output, k, schedule=schedule, layer_input=layer_input).eval()
    tokens = _tokens(2, 9)
    want, _ = R.forward(model, tokens)
    torch.testing.assert_close(model(tokens).logits, want, **TOL64)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("layer_input", ["block", "prediction"])
@pytest.mark.parametrize("schedule", ["alternating", "same"])
@pytest.mark.parametrize(("variant", "output"), [("standard", "concat"), ("recycled", "mean")])
@torch.no_grad()
def test_gemma_forward_matches_naive_reference(variant, output, schedule, layer_input, k):
    model = _ref_model(variant, output, k, schedule=schedule, layer_input=layer_input, coefficients="gemma",
                       coef_clip=0.2)
    tokens = _tokens(2, 9)
    for training in (False, True):  # training clips W_p and W_c to +-0.2: a different function
        model.train(training)
        want, _ = R.forward(model, tokens)
        torch.testing.assert_close(model(tokens).logits, want, **TOL64)
    assert (model.train()(tokens).logits - model.eval()(tokens).logits).abs().max() > 1e-4


@pytest.mark.parametrize("pattern", ["mod", "moe"])
@pytest.mark.parametrize("coefficients", ["scalar", "gemma"])
@torch.no_grad()
def test_forward_with_routed_layers_matches_naive_reference(pattern, coefficients):
    model = _ref_model("standard", "concat", 3, layers=PATTERNS[pattern], coefficients=coefficients,
                       layer_input="prediction")
    tokens = _tokens(2, 10)
    for training in (True, False):
        model.train(training)
        want, _ = R.forward(model, tokens)
        torch.testing.assert_close(model(tokens).logits, want, **TOL64)


def test_auto_output_resolves_per_variant():
    assert AltUpConfig(variant="standard").reduction == "concat"
    assert AltUpConfig(variant="recycled").reduction == "mean"
    for variant, width in (("standard", 3 * D), ("recycled", D)):
        cfg = _cfg(3, variant)
        assert cfg.embed_dim == width and cfg.head_in_dim == width
        model = build_model(cfg)
        assert model.embed.weight.shape == (V, width) and model.head.weight.shape == (V, width)
        assert model.final_norm.weight.shape == (width,)
        assert model.head.weight is model.embed.weight
    cfg = _cfg(3, "standard", output="sum", tie=False)
    assert (cfg.embed_dim, cfg.head_in_dim) == (3 * D, D)


@torch.no_grad()
def test_standard_embedding_is_split_into_consecutive_blocks_and_concat_keeps_block_order():
    """Expand views the K*d embedding as (K, d) per token (block k = columns k*d..(k+1)*d), and concat
    undoes exactly that: with zero-update layers the stream is the embedding, end to end."""
    model = build_model(_cfg(3, "standard", n_layers=2)).double()
    seen: list[torch.Tensor] = []
    model.layers[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    model.final_norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    _zero_block_outputs(model)
    tokens = _tokens(1, 5)
    model(tokens)
    emb = model.embed(tokens)
    torch.testing.assert_close(seen[0], emb[..., D:2 * D], rtol=0, atol=0)  # layer 1 reads block 1
    torch.testing.assert_close(seen[1], emb, rtol=0, atol=0)


def _zero_block_outputs(model: nn.Module) -> None:
    """Zero every parameter of every layer's block: each block then returns 0 and the layer is x -> x."""
    for layer in model.layers:
        for p in layer.block.parameters():
            p.zero_()


@pytest.mark.parametrize("k", [2, 3, 4])
@torch.no_grad()
def test_scalar_coefficients_match_explicit_formulas(k):
    c = ScalarCoefficients(k).double()
    _randomize_coefs(c, scale=1.0)
    p, g = c.p.tolist(), c.g.tolist()
    x = torch.randn(k, 2, 5, D, dtype=F64)
    out = torch.randn(2, 5, D, dtype=F64)
    for active in range(k):
        x_hat, _ = c.predict(x, active)
        want_hat = R.scalar_predict(p, list(x))
        torch.testing.assert_close(x_hat, torch.stack(want_hat), **TOL64)
        new, _ = c.correct(x_hat, out, active)
        torch.testing.assert_close(new, torch.stack(R.scalar_correct(g, want_hat, out, active)), **TOL64)
        eff_p, eff_g = c.effective(None, None, Context(positions_BT=torch.zeros(2, 5), causal=True))
        assert eff_p.tolist() == p and eff_g.tolist() == g


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("k", [2, 3, 4])
@torch.no_grad()
def test_gemma_coefficients_match_explicit_formulas(k, training):
    cfg = _cfg(k, "recycled", coefficients="gemma")
    c = GemmaCoefficients(cfg, k, clip=0.4).double().train(training)
    _randomize_coefs(c, scale=1.0)  # many weights beyond the clip
    assert c.prediction_coefs.weight.abs().max() > 0.4 and c.correction_coefs.weight.abs().max() > 0.4
    stored = [w.clone() for w in c.parameters()]
    w = R.gemma_weights(c)
    x = torch.randn(k, 2, 5, D, dtype=F64)
    out = torch.randn(2, 5, D, dtype=F64)
    for active in range(k):
        x_hat, C = c.predict(x, active)
        want_hat, want_C = R.gemma_predict(w, list(x), active, training)
        torch.testing.assert_close(C, want_C, **TOL64)
        torch.testing.assert_close(x_hat, torch.stack(want_hat), **TOL64)
        new, g = c.correct(x_hat, out, active)
        want_new, want_g = R.gemma_correct(w, want_hat, out, active, training)
        torch.testing.assert_close(g, want_g, **TOL64)
        torch.testing.assert_close(new, torch.stack(want_new), **TOL64)
    assert all(torch.equal(a, b) for a, b in zip(stored, c.parameters(), strict=True))  # clipping is functional


# -- 3. Gemma coefficients against transformers' Gemma3nTextAltUp ------------------------------------
class _RMSNormInDtype(nn.Module):
    """Gemma3nRMSNorm's formula (x * (mean(x^2) + eps)^-0.5 * w) computed in the input's dtype.

    (The router's tanh is swapped the same way in the float64 test below.)

    transformers' Gemma3nRMSNorm upcasts with ``.float()``, which in a float64 comparison is a *downcast* to
    float32 (~1e-7 error): swapped in for the 1e-10 float64 comparison only; the float32 test runs the real one.
    """

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.pow(x.pow(2).mean(-1, keepdim=True) + self.eps, -0.5) * self.weight


def _hf_altup(c: GemmaCoefficients, k: int, active: int, clip: float | None, eps: float, dtype: torch.dtype):
    pytest.importorskip("transformers")
    from transformers import Gemma3nTextConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextAltUp

    hf_cfg = Gemma3nTextConfig(hidden_size=D, altup_num_inputs=k, altup_active_idx=active, altup_coef_clip=clip,
                               rms_norm_eps=eps, vocab_size=64, num_hidden_layers=2, intermediate_size=64,
                               num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    hf = Gemma3nTextAltUp(hf_cfg).to(dtype)
    with torch.no_grad():
        for name in ("modality_router", "prediction_coefs", "correction_coefs", "router_norm"):
            getattr(hf, name).weight.copy_(getattr(c, name).weight)
    assert hf.router_input_scale.item() == c.input_scale
    return hf


def _gemma_pair(k: int, dtype: torch.dtype, clip: float | None = 0.5):
    cfg = _cfg(k, "recycled", coefficients="gemma", coef_clip=clip)
    c = GemmaCoefficients(cfg, k, clip).to(dtype)
    _randomize_coefs(c, scale=1.0)  # random and non-zero, many beyond the clip
    return cfg, c


@pytest.mark.parametrize("k", [2, 3, 4])
@torch.no_grad()
def test_gemma_matches_transformers_float64(k):
    cfg, c = _gemma_pair(k, F64)
    x = torch.randn(k, 2, 6, D, dtype=F64)
    out = torch.randn(2, 6, D, dtype=F64)
    stored = {n: p.clone() for n, p in c.named_parameters()}
    for active in range(k):
        for training in (False, True):
            hf = _hf_altup(c, k, active, 0.5, cfg.norm_eps, F64)
            hf.router_norm = _RMSNormInDtype(hf.router_norm.weight, cfg.norm_eps)
            # transformers' tanh(routed.float()) is a downcast here too; the same formula in float64
            hf.compute_router_modalities = lambda v, hf=hf: torch.tanh(
                hf.modality_router(hf.router_norm(v) * hf.router_input_scale))
            hf.train(training)
            c.train(training)
            was_beyond = bool(hf.prediction_coefs.weight.abs().max() > 0.5)
            x_hat, _ = c.predict(x, active)
            torch.testing.assert_close(x_hat, hf.predict(x), **TOL64)
            new, _ = c.correct(x_hat, out, active)
            torch.testing.assert_close(new, hf.correct(x_hat, out), **TOL64)
            if training:  # transformers clamped its stored prediction weight in place; we did not
                assert was_beyond and hf.prediction_coefs.weight.abs().max() <= 0.5
            else:  # no clipping in eval, even beyond the clip value (on both sides)
                assert hf.prediction_coefs.weight.abs().max() > 0.5
    for n, p in c.named_parameters():
        assert torch.equal(p, stored[n]), n


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("k", [2, 4])
@torch.no_grad()
def test_gemma_matches_transformers_float32_unmodified(k, training):
    """The real Gemma3nTextAltUp (its float32 router norm), float32 on both sides."""
    cfg, c = _gemma_pair(k, torch.float32)
    c.train(training)
    x = torch.randn(k, 2, 6, D)
    out = torch.randn(2, 6, D)
    for active in range(k):
        hf = _hf_altup(c, k, active, 0.5, cfg.norm_eps, torch.float32).train(training)
        x_hat, _ = c.predict(x, active)
        torch.testing.assert_close(x_hat, hf.predict(x), rtol=1e-5, atol=1e-5)
        new, _ = c.correct(x_hat, out, active)
        torch.testing.assert_close(new, hf.correct(x_hat, out), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_gemma_train_mode_clip_is_exercised():
    cfg, c = _gemma_pair(3, F64)
    x = torch.randn(3, 2, 6, D, dtype=F64)
    out = torch.randn(2, 6, D, dtype=F64)
    train_hat = c.train().predict(x, 1)[0]
    eval_hat = c.eval().predict(x, 1)[0]
    assert (train_hat - eval_hat).abs().max() > 1e-3
    assert (c.train().correct(train_hat, out, 1)[0] - c.eval().correct(train_hat, out, 1)[0]).abs().max() > 1e-3
    # coef_clip null: no clipping in training either
    c.clip = None
    torch.testing.assert_close(c.train().predict(x, 1)[0], eval_hat, rtol=0, atol=0)


# -- 4. cached generation ---------------------------------------------------------------------------
def _gemma_cfg() -> ModelConfig:
    return _cfg(3, "standard", coefficients="gemma", layer_input="prediction")


def _mod_cfg() -> ModelConfig:
    routed = LayerSpec(router="mod", options={"capacity": 0.5, "causal_router": "predictor"})
    return _cfg(2, "recycled", layers=[LayerSpec(), routed], coefficients="scalar")


@torch.no_grad()
def _cached_model(name: str) -> nn.Module:
    cfg = {"altup": lambda: preset("tiny-altup"), "raltup": lambda: preset("tiny-raltup"),
           "gemma": _gemma_cfg, "mod": _mod_cfg}[name]()
    model = _randomize(build_model(cfg).double()).eval()
    for m in model.layers:  # MoD: centre each predictor so that about half the tokens take the block
        if isinstance(m, MoDRouter):
            m.predictor[-1].weight.normal_(std=1.0)
            seen: list[torch.Tensor] = []
            hook = m.predictor.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(out))
            model(_tokens(4, 16))
            hook.remove()
            m.predictor[-1].bias.sub_(seen[0].median())
    return model


def _assert_mod_mixed(model: nn.Module, tokens: torch.Tensor) -> None:
    traces = model(tokens, trace=True).traces
    for i, m in enumerate(model.layers):
        if isinstance(m, MoDRouter):
            routed = traces[f"layer{i}/mod_routed"]
            assert routed.any() and not routed.all(), "MoD decisions not mixed: the cache test would prove little"


CACHED = ["altup", "raltup", "gemma", "mod"]


@pytest.mark.parametrize("name", CACHED)
@torch.no_grad()
def test_cached_decoding_matches_full_forward_single(name):
    model = _cached_model(name)
    tokens = _tokens(1, 12)
    if name == "mod":
        _assert_mod_mixed(model, tokens)
    full = model(tokens).logits
    cache = decode_with_cache(model, tokens, 5, full, atol=1e-10)
    assert cache.layers[0].k.shape[1:] == (model.cfg.n_heads, 12, model.cfg.head_size)  # the dense model's cache


@pytest.mark.parametrize("name", CACHED)
@torch.no_grad()
def test_cached_decoding_matches_full_forward_left_padded(name):
    """Two prompts of different lengths, left-padded: prefill + decode equals the full padded forward, and
    each row equals its sequence alone."""
    model = _cached_model(name)
    prompts, conts = [_tokens(1, 7)[0].tolist(), _tokens(1, 3)[0].tolist()], _tokens(2, 5).tolist()
    seqs = [p + c for p, c in zip(prompts, conts, strict=True)]
    tokens, positions, valid = left_pad(seqs, 0, torch.device("cpu"))
    full = model(tokens, positions_BT=positions, valid_BT=valid).logits
    for b, s in enumerate(seqs):
        torch.testing.assert_close(full[b, valid[b]], model(torch.tensor([s])).logits[0], **TOL64)
    tp, pp, vp = left_pad(prompts, 0, torch.device("cpu"))
    P = tp.shape[1]
    cache = KVCache.for_model(model, 2, P + 5)
    out = model(tp, positions_BT=pp, valid_BT=vp, cache=cache).logits
    torch.testing.assert_close(out[vp], full[:, :P][vp], **TOL64)
    nxt = pp[:, -1:] + 1
    for i in range(5):
        step = model(torch.tensor([[c[i]] for c in conts]), positions_BT=nxt + i, cache=cache).logits
        torch.testing.assert_close(step[:, 0], full[:, P + i], **TOL64)


@pytest.mark.parametrize("name", CACHED)
def test_greedy_generate_matches_naive_loop(name):
    model = _cached_model(name)
    prompts = [_tokens(1, n)[0].tolist() for n in (4, 9)]
    got = generate(model, prompts, SamplingConfig(max_new_tokens=6, greedy=True))
    for p, row in zip(prompts, got, strict=True):
        assert row == naive_greedy(model, p, 6)


# -- 5. FLOPs and parameters ------------------------------------------------------------------------
def _measured_flops(model: nn.Module, tokens: torch.Tensor) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens)
    return counter.get_total_flops()


def _altup_flops_closed_form(k: int, d: int, T: int, coefficients: str) -> int:
    """Per layer: predict (K x K) @ (K, d) = 2 K^2 d, correct 2 K d (elementwise), per token; Gemma adds two
    routers d -> K, the K -> K^2 prediction map and the K -> K correction map."""
    per_token = 2 * k * k * d + 2 * k * d
    if coefficients == "gemma":
        per_token += 2 * (2 * d * k) + 2 * k * k * k + 2 * k * k
    return T * per_token


@pytest.mark.parametrize("coefficients", ["scalar", "gemma"])
@pytest.mark.parametrize(("variant", "output"), [("standard", "concat"), ("recycled", "mean"),
                                                 ("standard", "sum")])
@pytest.mark.parametrize("k", [2, 3])
def test_flops_match_flop_counter_plus_correct_term(k, variant, output, coefficients):
    T, n_layers = 16, 2
    cfg = _cfg(k, variant, output=output, n_layers=n_layers, tie=output == "concat", coefficients=coefficients)
    measured = _measured_flops(build_model(cfg), _tokens(1, T))
    report = count_flops(cfg, T)
    correct_term = n_layers * T * 2 * k * D  # elementwise: FlopCounterMode does not see it
    assert report.forward_flops == measured + correct_term, (report.forward_flops, measured, correct_term)
    dense = count_flops(dataclasses.replace(cfg, altup=None, tie_embeddings=True), T)
    extra = _altup_flops_closed_form(k, D, T, coefficients)
    assert report.per_layer == [p + extra for p in dense.per_layer]
    assert report.head_flops == (k if output == "concat" else 1) * dense.head_flops
    assert report.forward_flops == sum(report.per_layer) + report.head_flops


def test_flops_with_mod_layer_match_flop_counter():
    T = 16
    routed = LayerSpec(router="mod", options={"capacity": 0.25, "causal_router": "predictor"})
    cfg = _cfg(2, "standard", layers=[LayerSpec(), routed])
    model = build_model(cfg).train()
    measured = _measured_flops(model, _tokens(1, T))
    assert count_flops(cfg, T).forward_flops == measured + 4 * T * 2 * 2 * D


@pytest.mark.parametrize("coefficients", ["scalar", "gemma"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_parameter_counts(k, coefficients):
    n_layers = 4
    dense = build_model(ModelConfig(d_model=D, n_layers=n_layers, n_heads=2, max_seq_len=64, vocab_size=V))
    n_dense = sum(p.numel() for p in dense.parameters())
    per_layer = k * k + k if coefficients == "scalar" else D + D * k + k ** 3 + k * k
    recycled = _cfg(k, "recycled", coefficients=coefficients)
    n = sum(p.numel() for p in build_model(recycled).parameters())
    assert n - n_dense == n_layers * per_layer
    assert count_flops(recycled, 8).params == n
    standard = _cfg(k, "standard", coefficients=coefficients)
    n = sum(p.numel() for p in build_model(standard).parameters())
    # the K*d embedding (tied head), the K*d final norm's gain, the coefficients
    assert n - n_dense == (k - 1) * D * V + (k - 1) * D + n_layers * per_layer
    report = count_flops(standard, 8)
    assert report.params == n and report.non_embedding_params == n - k * D * V


# -- 6. configuration -------------------------------------------------------------------------------
def _model_cfg(**altup) -> ModelConfig:
    return ModelConfig(d_model=D, n_layers=2, n_heads=2, altup=AltUpConfig(**altup))


@pytest.mark.parametrize(("altup", "field"), [
    ({"k": 1}, "altup.k"), ({"k": 0}, "altup.k"), ({"k": "2"}, "altup.k"), ({"k": 2.0}, "altup.k"),
    ({"k": True}, "altup.k"),
    ({"variant": "wide"}, "altup.variant"), ({"output": "max"}, "altup.output"),
    ({"schedule": "random"}, "altup.schedule"), ({"layer_input": "old"}, "altup.layer_input"),
    ({"coefficients": "learned"}, "altup.coefficients"), ({"coef_clip": 0.0}, "altup.coef_clip"),
    ({"coef_clip": -1.0}, "altup.coef_clip"), ({"coef_clip": "x"}, "altup.coef_clip"),
    ({"coef_clip": True}, "altup.coef_clip"),
    ({"variant": "recycled", "output": "concat"}, "altup.output"),
    ({"variant": "standard", "output": "mean"}, "altup.output"),
    ({"variant": "standard", "output": "sum"}, "altup.output"),
])
def test_invalid_altup_config_is_a_one_line_error(altup, field):
    cfg = _model_cfg(**altup)
    msg = one_line_error(cfg.validate)
    assert field in msg
    assert one_line_error(lambda: build_model(_model_cfg(**altup))) == msg


def test_config_error_details():
    assert "tie_embeddings" in one_line_error(_model_cfg(variant="standard", output="mean").validate)
    assert "mean" in one_line_error(_model_cfg(variant="recycled", output="concat").validate)
    for ok in ({"variant": "standard", "output": "mean"}, {"variant": "standard", "output": "sum"}):
        dataclasses.replace(_model_cfg(**ok), tie_embeddings=False).validate()
    _model_cfg(coef_clip=None).validate()
    _model_cfg(k=5, variant="recycled", output="sum", schedule="same", layer_input="prediction",
               coefficients="gemma").validate()


def test_config_round_trips(tmp_path):
    cfg = _cfg(3, "recycled", output="sum", schedule="same", layer_input="prediction", coefficients="gemma",
               coef_clip=7.5)
    back = ModelConfig.from_dict(cfg.to_dict())
    assert isinstance(back.altup, AltUpConfig) and back.altup == cfg.altup and back == cfg
    assert ModelConfig.from_dict(ModelConfig(d_model=D).to_dict()).altup is None
    for name in ("c.json", "c.yaml"):
        save_config_file(tmp_path / name, cfg)
        loaded, _ = load_config_file(tmp_path / name)
        assert loaded.altup == cfg.altup
    d = cfg.to_dict()
    d["altup"] = "not a mapping"
    msg = one_line_error(lambda: ModelConfig.from_dict(d))
    assert "model.altup" in msg and "mapping" in msg
    d["altup"] = {"k": 2, "blocks": 3}
    assert "blocks" in one_line_error(lambda: ModelConfig.from_dict(d))
    d["altup"] = {"k": "2"}
    assert "altup.k" in one_line_error(lambda: ModelConfig.from_dict(d))
    d["altup"] = {"coef_clip": "big"}
    assert "altup.coef_clip" in one_line_error(lambda: ModelConfig.from_dict(d))


def test_presets():
    for size in ("tiny", "small"):
        dense = preset(size)
        for name, variant, width in ((f"{size}-altup", "standard", 2), (f"{size}-raltup", "recycled", 1)):
            cfg = preset(name)
            assert cfg.altup == AltUpConfig(k=2, variant=variant)
            assert (cfg.d_model, cfg.n_layers, cfg.n_heads) == (dense.d_model, dense.n_layers, dense.n_heads)
            assert cfg.head_in_dim == width * dense.d_model and cfg.tie_embeddings


# -- 7. training ------------------------------------------------------------------------------------
def test_coefficient_gradients_match_finite_differences():
    model = _randomize(build_model(_cfg(3, "standard", n_layers=2)).double())
    tokens = _tokens(2, 8)

    def loss_fn() -> torch.Tensor:  # in float64 (Output.loss is float32 whatever the model's dtype)
        logits = model(tokens).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())

    loss_fn().backward()
    for c in model.altup.coefs:
        assert c.p.grad.abs().min() > 0 and c.g.grad.abs().min() > 0
    eps = 1e-6
    for layer, entry in ((0, (0, 1)), (1, (2, 2)), (1, (1,)), (0, (2,))):
        param = model.altup.coefs[layer].p if len(entry) == 2 else model.altup.coefs[layer].g
        with torch.no_grad():
            param[entry] += eps
            up = loss_fn().item()
            param[entry] -= 2 * eps
            down = loss_fn().item()
            param[entry] += eps
        fd = (up - down) / (2 * eps)
        assert float(param.grad[entry]) == pytest.approx(fd, rel=1e-6, abs=1e-9), (layer, entry)


def test_gemma_coefficient_gradients_flow():
    model = _randomize(build_model(_cfg(2, "recycled", n_layers=2, coefficients="gemma")).double())
    tokens = _tokens(2, 8)
    model(tokens, tokens).loss.backward()
    for c in model.altup.coefs:
        for name, p in c.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


@pytest.mark.parametrize("coefficients", ["scalar", "gemma"])
def test_coefficients_are_not_weight_decayed(coefficients):
    model = build_model(_cfg(2, "standard", coefficients=coefficients))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    for c in model.altup.coefs:
        if coefficients == "scalar":
            assert id(c.p) in ids and id(c.g) in ids
        else:
            assert id(c.router_norm.weight) in ids
    assert id(model.embed.weight) not in ids  # the split is real
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


@torch.no_grad()
def test_scalar_stats_equal_the_parameters():
    model = _randomize(build_model(_cfg(3, "recycled", n_layers=2)))
    stats = model(_tokens(2, 6)).stats
    for L, c in enumerate(model.altup.coefs):
        keys = {k for k in stats if k.startswith(f"layer{L}/altup_")}
        assert len(keys) == 9 + 3
        for a in range(3):
            assert float(stats[f"layer{L}/altup_g{a}"]) == float(c.g[a])
            for b in range(3):
                assert float(stats[f"layer{L}/altup_p{a}_{b}"]) == float(c.p[a, b])


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_gemma_stats_are_token_means_of_the_coefficients(padded):
    model = _randomize(build_model(_cfg(2, "recycled", n_layers=2, coefficients="gemma")).double()).eval()
    prompts = [_tokens(1, 9)[0].tolist(), _tokens(1, 4)[0].tolist()]
    tokens, positions, valid = left_pad(prompts, 0, torch.device("cpu"))
    vmask = valid if padded else None
    out = model(tokens, positions_BT=positions, valid_BT=vmask)
    _, used = R.forward(model, tokens, positions_BT=positions, valid_BT=vmask)
    w = (valid if padded else torch.ones_like(valid)).to(F64)
    for L, u in enumerate(used):
        P = torch.eye(2, dtype=F64) + (u["p"] * w[..., None, None]).sum((0, 1)) / w.sum()
        G = (u["g"] * w[..., None]).sum((0, 1)) / w.sum()
        for a in range(2):
            assert float(out.stats[f"layer{L}/altup_g{a}"]) == pytest.approx(float(G[a]), abs=1e-6)
            for b in range(2):
                assert float(out.stats[f"layer{L}/altup_p{a}_{b}"]) == pytest.approx(float(P[a, b]), abs=1e-6)
        if padded:  # the padding's coefficients would have moved the mean: the mask matters
            assert (u["g"].mean((0, 1)) - G).abs().max() > 1e-4


# -- 8. bf16 autocast -------------------------------------------------------------------------------
@pytest.mark.parametrize("coefficients", ["scalar", "gemma"])
@pytest.mark.parametrize("variant", ["standard", "recycled"])
@torch.no_grad()
def test_bf16_autocast_keeps_the_stream_in_float32(variant, coefficients):
    model = _randomize(build_model(_cfg(2, variant, coefficients=coefficients)), scale=0.1, router_std=1.0).eval()
    dtypes: list[torch.dtype] = []
    model.final_norm.register_forward_pre_hook(lambda mod, args: dtypes.append(args[0].dtype))
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda mod, args: dtypes.append(args[0].dtype))
    tokens = _tokens(2, 16)
    want = model(tokens).logits
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(tokens).logits
    assert dtypes == [torch.float32] * (len(model.layers) + 1)
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 0.03, err


# -- 9. encoders and padded batches -----------------------------------------------------------------
@pytest.mark.parametrize(("variant", "output"), [("standard", "concat"), ("recycled", "mean")])
@torch.no_grad()
def test_encoder(variant, output):
    model = _randomize(build_model(_cfg(3, variant, output=output, kind="encoder")).double()).eval()
    width = 3 * D if output == "concat" else D
    assert model.mlm_head.dense.weight.shape == (width, width) and model.mlm_head.norm.weight.shape == (width,)
    tokens = _tokens(2, 9)
    want, _ = R.forward(model, tokens)
    torch.testing.assert_close(model(tokens).logits, want, **TOL64)
    # bidirectional: a later token changes an earlier one's logits
    other = tokens.clone()
    other[:, -1] = (other[:, -1] + 1) % V
    assert (model(other).logits[:, 0] - model(tokens).logits[:, 0]).abs().max() > 1e-8
    # padded batch: every row's real tokens get the logits of the row alone
    seqs = [_tokens(1, 9)[0].tolist(), _tokens(1, 5)[0].tolist()]
    tokens, positions, valid = left_pad(seqs, 0, torch.device("cpu"))
    out = model(tokens, positions_BT=positions, valid_BT=valid)
    want, _ = R.forward(model, tokens, positions_BT=positions, valid_BT=valid)
    torch.testing.assert_close(out.logits, want, **TOL64)
    for b, s in enumerate(seqs):
        torch.testing.assert_close(out.logits[b, valid[b]], model(torch.tensor([s])).logits[0], **TOL64)
    targets = torch.where(valid, tokens, -100)
    assert torch.isfinite(model(tokens, targets, positions_BT=positions, valid_BT=valid).loss)


def test_encoder_flops_head_width():
    cfg = _cfg(2, "standard", kind="encoder")
    dense = count_flops(dataclasses.replace(cfg, altup=None), 8)
    report = count_flops(cfg, 8)
    assert report.head_flops == 2 * 8 * 2 * D * V + 2 * 8 * (2 * D) ** 2
    assert dense.head_flops == 2 * 8 * D * V + 2 * 8 * D * D
    assert report.forward_flops == _measured_flops(build_model(cfg), _tokens(1, 8)) + 4 * 8 * 2 * 2 * D

