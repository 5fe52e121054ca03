"""Analytic FLOP counts against torch's FlopCounterMode and against the closed-form dense formula."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from condformer.config import ModelConfig
from condformer.errors import ConfigError
from condformer.flops import count_flops
from condformer.model import build_model


def _measured(model, tokens, backward: bool = False) -> int:
    # the fused CPU attention kernel reports 0 FLOPs; the math backend is counted op by op
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if backward:
            out = model(tokens, tokens)
            out.loss.backward()
        else:
            with torch.no_grad():
                model(tokens)
    return counter.get_total_flops()


@pytest.mark.parametrize("T", [16, 48])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_forward_flops_match_flop_counter(tiny_cfg, kind, mlp, tie, T):
    cfg = tiny_cfg(kind=kind, mlp=mlp, tie_embeddings=tie)
    model = build_model(cfg)
    report = count_flops(cfg, T)
    measured = _measured(model, torch.randint(0, 260, (1, T)))
    assert measured > 0
    assert report.forward_flops == measured, (report.forward_flops, measured)
    assert report.train_flops == 3 * report.forward_flops
    assert report.seq_len == T
    assert report.forward_flops_per_token == report.forward_flops / T
    assert report.train_flops_per_token == 3 * report.forward_flops / T
    assert sum(report.per_layer) + report.head_flops == report.forward_flops
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.non_embedding_params == report.params - model.embed.weight.numel()


@pytest.mark.parametrize(("kind", "mlp"), [("decoder", "gelu"), ("encoder", "swiglu")])
def test_forward_plus_backward_is_three_forwards(tiny_cfg, kind, mlp):
    # FlopCounterMode counts every backward matmul: two per forward matmul (grad of input and of weight;
    # the embedding lookup needs the gradient of the first layer's input), so forward + backward measures
    # exactly 3x forward on this model (checked: ratio 3.000).
    cfg = tiny_cfg(kind=kind, mlp=mlp)
    model = build_model(cfg)
    tokens = torch.randint(0, 260, (1, 16))
    total = _measured(model, tokens, backward=True)
    forward = _measured(model, tokens)
    assert total == 3 * forward, (total, forward)
    report = count_flops(cfg, 16)
    assert report.train_flops == total


def test_batch_scales_linearly(tiny_cfg):
    cfg = tiny_cfg()
    measured = _measured(build_model(cfg), torch.randint(0, 260, (3, 20)))
    assert 3 * count_flops(cfg, 20).forward_flops == measured


@pytest.mark.parametrize(("d", "T", "n_layers"), [(32, 16, 2), (64, 100, 3)])
def test_dense_layer_closed_form(d, T, n_layers):
    cfg = ModelConfig(d_model=d, n_layers=n_layers, n_heads=4, vocab_size=300, max_seq_len=128)
    report = count_flops(cfg, T)
    # per layer: qkv 6Td^2 + out 2Td^2 + MLP 16Td^2 + scores and values 4T^2d
    assert report.per_layer == [24 * T * d * d + 4 * T * T * d] * n_layers
    assert report.head_flops == 2 * T * d * 300
    encoder = count_flops(ModelConfig(d_model=d, n_layers=n_layers, n_heads=4, vocab_size=300, max_seq_len=128,
                                      kind="encoder"), T)
    assert encoder.head_flops == 2 * T * d * 300 + 2 * T * d * d  # plus the MLM transform


def test_count_flops_validates(tiny_cfg):
    with pytest.raises(ConfigError):
        count_flops(tiny_cfg(d_model=30), 16)


# -- Mixture-of-Depths: only the work actually done --------------------------------------------
def _mod_cfg(tiny_cfg, capacity: float, causal_router: str, **kw):
    from condformer.config import LayerSpec, every_other

    opts = {"capacity": capacity, "causal_router": causal_router}
    if causal_router == "none":
        opts["eval_routing"] = "topk"
    return tiny_cfg(n_layers=4, layers=every_other(LayerSpec(router="mod", options=opts)), **kw)


@pytest.mark.parametrize("T", [16, 40])
@pytest.mark.parametrize(("capacity", "causal_router"), [(0.25, "predictor"), (0.125, "aux"), (1.0, "none")])
def test_mod_flops_match_flop_counter(tiny_cfg, capacity, causal_router, T):
    # the training-mode forward (top-k at capacity; the predictor runs for its BCE) under FlopCounterMode
    cfg = _mod_cfg(tiny_cfg, capacity, causal_router)
    model = build_model(cfg).train()
    tokens = torch.randint(0, 260, (1, T))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens)
    measured = counter.get_total_flops()
    report = count_flops(cfg, T)
    assert report.forward_flops == measured, (report.forward_flops, measured)
    dense = count_flops(tiny_cfg(n_layers=4), T)
    assert report.per_layer[0] == dense.per_layer[0]  # the dense layers are untouched
    if capacity < 1:
        assert report.forward_flops < dense.forward_flops


def test_mod_flop_formula(tiny_cfg):
    # a routed layer = the block on k = floor(c T) tokens (attention k x k) + router + predictor on all T
    d, T, c = 32, 40, 0.25
    k, h = 10, 8  # predictor_hidden defaults to d // 4
    report = count_flops(_mod_cfg(tiny_cfg, c, "predictor"), T)
    block_k = 24 * k * d * d + 4 * k * k * d
    assert report.per_layer[1] == block_k + 2 * T * d + 2 * T * d * h + 2 * T * h
    assert report.per_layer[0] == 24 * T * d * d + 4 * T * T * d


def _grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    # FlopCounterMode has no formula for our grouped_mm op; 2D x 3D: each of the M rows meets one (K, N) matrix
    (m, k), n = a_shape, b_shape[-1]
    return 2 * m * k * n


MOE_CASES = [
    {},  # top-2, capacity 1.25 in training: E x C slots computed
    {"capacity_factor": None},  # dropless, grouped matmul
    {"capacity_factor": None, "dispatch": "sorted"},
    {"moe_router": "switch"},
    {"moe_router": "noisy_topk"},
    {"moe_router": "expert_choice", "allow_noncausal": True},
    {"moe_router": "hash"},
    {"moe_router": "lsh", "experts": 6},
    {"moe_router": "soft"},
    {"shared_experts": 2, "expert_dim": 64},
    {"null_experts": 8},  # integrated MoDE with capacity: fewer slots per real expert
]


@pytest.mark.parametrize("opts", MOE_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_moe_forward_flops_match_flop_counter(opts, mlp):
    from condformer.config import LayerSpec

    T = 64
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, mlp=mlp,
                      layers=[LayerSpec(), LayerSpec(ffn="moe", options=opts)])
    model = build_model(cfg).train()  # training-mode routing: the training capacity factor
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(
            display=False, custom_mapping={torch.ops.condformer.grouped_mm: _grouped_mm_flops}) as counter:
        model(torch.randint(0, 260, (1, T)))
    measured = counter.get_total_flops()
    report = count_flops(cfg, T)
    assert report.forward_flops == measured, (report.forward_flops, measured)
    dense = count_flops(ModelConfig(d_model=32, n_layers=2, n_heads=2, mlp=mlp), T)
    assert report.per_layer[0] == dense.per_layer[0]  # the dense layer is unchanged


def test_moe_flops_scale_with_active_experts_not_total():
    from condformer.config import LayerSpec

    def ffn_flops(**opts) -> int:
        cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, layers=[LayerSpec(ffn="moe", options=opts)])
        return count_flops(cfg, 64).per_layer[0]

    dense = count_flops(ModelConfig(d_model=32, n_layers=1, n_heads=2), 64).per_layer[0]
    mlp = 2 * 64 * 32 * 128 * 2
    router = 2 * 64 * 32 * 8
    assert ffn_flops(capacity_factor=None, moe_router="switch") == dense + router
    assert ffn_flops(capacity_factor=None, top_k=2) == dense + mlp + router
    assert ffn_flops(capacity_factor=None, top_k=2, experts=64) == dense + mlp + 8 * router  # more experts: same work
    assert ffn_flops(capacity_factor=1.25, moe_router="switch") == dense + mlp // 4 + router  # 8 x 10 slots for 64
    assert ffn_flops(moe_router="soft") == dense + 7 * mlp + router + 2 * 64 * 8 * 32  # + the weighted sum


@pytest.mark.parametrize("opts", [{}, {"eval_capacity_factor": 2.0, "allow_noncausal": True},
                                  {"null_experts": 8, "top_k": 2}],
                         ids=["dropless-eval", "eval-capacity", "integrated-mode"])
def test_moe_eval_flops_count_what_evaluation_runs(opts):
    from condformer.config import LayerSpec

    T = 64
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, layers=[LayerSpec(), LayerSpec(ffn="moe", options=opts)])
    model = build_model(cfg).eval()
    decisions: list[torch.Tensor] = []
    if opts.get("null_experts"):  # dropless with no-op experts costs what the router decides: record it
        model.layers[1].block.ffn.router.register_forward_hook(lambda m, i, r: decisions.append(r.expert_NK))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(
            display=False, custom_mapping={torch.ops.condformer.grouped_mm: _grouped_mm_flops}) as counter:
        model(torch.randint(0, 260, (1, T)))
    measured = counter.get_total_flops()
    report = count_flops(cfg, T, training=False)
    if opts.get("null_experts"):
        # the report counts the balanced expectation (a share 8 / 16 of the 2T pairs reach real experts); the
        # kernel computes exactly the pairs the router sent to real experts (ids < 8)
        expert = 2 * 32 * 128 * 2
        balanced_rows, rows = T * 2 * 8 // 16, int((decisions[0] < 8).sum())
        assert 0 < rows < T * 2  # both kinds of choice occur, so the check can tell them apart
        assert measured == report.forward_flops + (rows - balanced_rows) * expert
    else:
        assert report.forward_flops == measured, (report.forward_flops, measured)
    train_view = count_flops(cfg, T).forward_flops  # the training capacity (1.25) is counted differently
    assert report.forward_flops > train_view if opts.get("eval_capacity_factor") else report.forward_flops < train_view
