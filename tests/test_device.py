"""The accelerator subset: the paths that differ on a GPU, run on every device this machine has.

On CUDA the MoE's grouped dispatch is torch's ``grouped_mm`` (bf16), autocast is bf16 on the GPU and
compiled graphs go through inductor's GPU backend; on CPU the same tests check the CPU kernels. CI runs
them on CPU; ``benchmarks/gpu.sh`` runs them on CUDA with ``CONDFORMER_TEST_DEVICE=cuda`` (which also makes
a missing GPU an error instead of a skip).
"""

from __future__ import annotations

import os

import pytest
import torch

from condformer.config import ExitConfig, LayerSpec, ModelConfig
from condformer.context import Context
from condformer.generation import SamplingConfig, generate
from condformer.model import build_model
from condformer.routing.moe.ffn import MoEFFN
from helpers import naive_greedy

_ASKED = os.environ.get("CONDFORMER_TEST_DEVICE")
DEVICES = [_ASKED] if _ASKED else ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
MOE = {"experts": 4, "top_k": 2, "capacity_factor": None}
MOD = LayerSpec(router="mod", options={"capacity": 0.5, "causal_router": "predictor"})


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    dev = torch.device(request.param)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("CONDFORMER_TEST_DEVICE asks for CUDA, but torch sees no GPU")
    torch.manual_seed(0)
    return dev


def _perturbed(cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    """A model whose weights are moved away from their initialisation (a zero-init block hides bugs)."""
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(device)


def _cfg(layers: list[LayerSpec], **kw) -> ModelConfig:
    return ModelConfig(d_model=64, n_layers=4, n_heads=4, max_seq_len=128, mlp="swiglu", layers=layers, **kw)


def test_moe_grouped_dispatch_equals_sorted_under_bf16_autocast(device):
    """grouped (CUDA: torch's grouped_mm; CPU: the fused kernel) against the per-expert sorted path."""
    cfg = _cfg([LayerSpec(ffn="moe", options={**MOE, "dispatch": "grouped"})]).validate()
    grouped = MoEFFN(cfg, cfg.layer_specs()[0], 0).to(device).train()
    with torch.no_grad():
        grouped.router.weight.mul_(20)  # routing that differs between tokens
    sorted_ = MoEFFN(cfg, cfg.layer_specs()[0], 0).to(device).train()
    sorted_.load_state_dict(grouped.state_dict())
    sorted_.dispatch = "sorted"
    x = torch.randn(2, 48, 64, device=device)
    outs, grads = [], []
    for ffn in (grouped, sorted_):
        inp = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = ffn(inp, Context(positions_BT=torch.arange(48, device=device).expand(2, 48), causal=True))
        y.float().square().sum().backward()
        outs.append(y.float())
        grads.append([inp.grad, ffn.bank.w_up.grad, ffn.bank.w_down.grad])
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def test_bf16_autocast_training_step_tracks_fp32(device):
    cfg = _cfg([LayerSpec(), LayerSpec(router="mod", ffn="moe", options={**MOE, "capacity": 0.5})])
    model = _perturbed(cfg, device).train()
    tokens = torch.randint(0, 256, (2, 64), device=device)
    ref = model(tokens, tokens).train_loss
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(tokens, tokens)
    out.train_loss.backward()
    assert torch.isfinite(out.train_loss)
    assert abs(out.train_loss.item() - ref.item()) < 0.05 * ref.item()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.compile
def test_compiled_training_step_equals_eager(device):
    torch._dynamo.reset()
    cfg = _cfg([LayerSpec(ffn="moe", options={**MOE, "dispatch": "grouped"}), MOD])
    model = _perturbed(cfg, device).train()
    tokens = torch.randint(0, 256, (2, 32), device=device)
    backend = "inductor" if device.type == "cuda" else "aot_eager"  # inductor on CPU: ~45 s cold, in -m slow
    out = torch.compile(model, fullgraph=True, backend=backend)(tokens, tokens)
    ref = model(tokens, tokens)
    torch.testing.assert_close(out.train_loss, ref.train_loss, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_cached_greedy_decoding_equals_rerunning_the_sequence(device):
    model = _perturbed(_cfg([LayerSpec(), MOD]), device).eval()
    prompts = [[5, 17, 99, 3, 250, 41], [200, 8, 64]]
    out = generate(model, prompts, SamplingConfig(max_new_tokens=10, greedy=True))
    assert out == [naive_greedy(model, p, 10) for p in prompts]


@torch.no_grad()
def test_batched_self_speculation_equals_greedy(device):
    model = _perturbed(_cfg([LayerSpec()], exits=ExitConfig()), device).eval()
    prompts = [[5, 17, 99, 3, 250, 41], [200, 8, 64], [7]]
    stats: dict = {}
    out = generate(model, prompts, SamplingConfig(max_new_tokens=10, greedy=True), speculative=2, draft_tokens=3,
                   stats=stats)
    assert out == [naive_greedy(model, p, 10) for p in prompts]
    assert stats["rounds"] > stats["passes"]
