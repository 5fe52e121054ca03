"""The backbone: Output fields, loss, causality, tied heads, limits, and the tally side channel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condformer.config import LayerSpec
from condformer.flops import count_flops
from condformer.model import IGNORE_INDEX, Output, build_model
from condformer.registry import ROUTERS


class _AuxRouter(nn.Module):
    """Dense router that reports an auxiliary loss and a statistic through the tally, and records them."""

    options: tuple[str, ...] = ()

    def __init__(self, cfg, spec, layer_index, block) -> None:
        super().__init__()
        self.block = block
        self.layer_index = layer_index
        self.recorded: dict[str, torch.Tensor] = {}

    def forward(self, x_BTD, ctx):
        u = self.block(x_BTD, ctx)
        aux = (u * u).mean() * (ctx.layer + 1)  # differentiable, different per layer
        frac = (u > 0).float().mean()
        assert ctx.layer == self.layer_index
        ctx.tally.loss("test/aux", aux)
        ctx.tally.stat(ctx.layer, "frac", frac)
        self.recorded = {"aux": aux.detach().clone(), "frac": frac.detach().clone()}
        return x_BTD + u

    @staticmethod
    def flops(cfg, spec, seq_len, block_flops) -> int:
        return block_flops(seq_len, seq_len)


if "test_aux" not in ROUTERS.names():
    ROUTERS.register("test_aux")(_AuxRouter)


def _tokens(B: int, T: int, V: int = 260) -> torch.Tensor:
    return torch.randint(0, V, (B, T))


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_output_fields(tiny_cfg, kind):
    model = build_model(tiny_cfg(kind=kind))
    out = model(_tokens(3, 10))
    assert isinstance(out, Output)
    assert out.logits.shape == (3, 10, 260)
    assert out.loss is None
    assert isinstance(out.aux_loss, torch.Tensor) and out.aux_loss.dim() == 0 and out.aux_loss.item() == 0.0
    assert out.aux_losses == {} and out.stats == {}
    assert torch.isfinite(out.logits).all()
    assert (model.mlm_head is not None) == (kind == "encoder")


def test_loss_matches_independent_cross_entropy(tiny_cfg):
    model = build_model(tiny_cfg(init_std=0.2))
    tokens = _tokens(3, 12)
    targets = _tokens(3, 12)
    targets[0, :4] = IGNORE_INDEX
    targets[2, 7] = IGNORE_INDEX
    assert IGNORE_INDEX == -100
    out = model(tokens, targets)
    logits = out.logits.detach().double()
    keep = targets != -100
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    nll = -logp[keep].gather(1, targets[keep][:, None]).squeeze(1)
    assert out.loss.dim() == 0
    assert abs(out.loss.item() - nll.mean().item()) < 1e-5 * nll.mean().item()
    out.loss.backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0


def test_decoder_is_causal(tiny_cfg):
    model = build_model(tiny_cfg(init_std=0.2)).double()
    T = 16
    tokens = _tokens(2, T)
    base = model(tokens).logits
    for t in (0, 5, 14):
        changed = tokens.clone()
        changed[:, t + 1:] = _tokens(2, T - t - 1)
        assert (changed[:, t + 1:] != tokens[:, t + 1:]).any()
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-12)
        assert (logits[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-6


def test_encoder_is_bidirectional(tiny_cfg):
    model = build_model(tiny_cfg(kind="encoder", init_std=0.2)).double()
    tokens = _tokens(2, 12)
    changed = tokens.clone()
    changed[:, -1] = (tokens[:, -1] + 1) % 260
    diff = (model(changed).logits - model(tokens).logits)[:, 0].abs().max()
    assert diff > 1e-6


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_explicit_positions_equal_default_positions(tiny_cfg, kind):
    # the explicit-mask path agrees with the fused contiguous path
    model = build_model(tiny_cfg(kind=kind, init_std=0.2)).double()
    tokens = _tokens(2, 10)
    a = model(tokens).logits
    b = model(tokens, positions_BT=torch.arange(10).expand(2, 10)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_logits_depend_only_on_relative_positions(tiny_cfg):
    model = build_model(tiny_cfg(init_std=0.2)).double()
    tokens = _tokens(2, 10)
    a = model(tokens).logits
    b = model(tokens, positions_BT=torch.arange(10).expand(2, 10) + 37).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_tied_head_shares_the_embedding(tiny_cfg):
    model = build_model(tiny_cfg(tie_embeddings=True))
    assert model.head.weight is model.embed.weight
    untied = build_model(tiny_cfg(tie_embeddings=False))
    assert untied.head.weight is not untied.embed.weight
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()
    n_tied = sum(p.numel() for p in model.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 260 * 32
    assert model.num_params(non_embedding=False) == n_tied
    assert model.num_params() == n_tied - 260 * 32
    # a change to the embedding is a change to the tied head, and only to the tied head
    with torch.no_grad():
        model.embed.weight[3, 0] += 1.0
        untied.embed.weight[3, 0] += 1.0
    assert model.head.weight[3, 0] == model.embed.weight[3, 0]
    assert untied.head.weight[3, 0] != untied.embed.weight[3, 0]


def test_sequence_longer_than_max_seq_len(tiny_cfg):
    model = build_model(tiny_cfg(max_seq_len=16))
    model(_tokens(1, 16))  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_tokens(1, 17))


def test_tally_side_channel(tiny_cfg):
    cfg = tiny_cfg(layers=[LayerSpec(router="test_aux")])
    model = build_model(cfg)
    assert all(isinstance(layer, _AuxRouter) for layer in model.layers)
    out = model(_tokens(2, 9))
    recorded = [layer.recorded for layer in model.layers]
    expected = recorded[0]["aux"] + recorded[1]["aux"]
    assert expected.item() > 0
    assert out.aux_loss.dim() == 0
    torch.testing.assert_close(out.aux_loss.detach(), expected, rtol=1e-6, atol=0)
    assert set(out.aux_losses) == {"test/aux"}
    torch.testing.assert_close(out.aux_losses["test/aux"].detach(), expected, rtol=1e-6, atol=0)
    assert {"layer0/frac", "layer1/frac"} <= set(out.stats)
    for i in range(2):
        stat = out.stats[f"layer{i}/frac"]
        assert isinstance(stat, torch.Tensor) and not stat.requires_grad
        assert stat.item() == recorded[i]["frac"].item()
    # the auxiliary loss trains the parameters
    out.aux_loss.backward()
    for name in ("layers.0.block.attn.qkv.weight", "layers.1.block.ffn.down.weight", "embed.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # wrapping does not change the computation: same weights in a dense model give the same logits
    dense = build_model(tiny_cfg())
    dense.load_state_dict(model.state_dict())
    tokens = _tokens(2, 9)
    torch.testing.assert_close(model(tokens).logits, dense(tokens).logits, rtol=0, atol=0)
    assert count_flops(cfg, 9).forward_flops == count_flops(tiny_cfg(), 9).forward_flops


def test_tally_is_fresh_per_forward(tiny_cfg):
    model = build_model(tiny_cfg(layers=[LayerSpec(router="test_aux")]))
    tokens = _tokens(1, 5)
    first = model(tokens).aux_loss.item()
    second = model(tokens).aux_loss.item()
    assert second == pytest.approx(first, rel=1e-6)  # not accumulated across calls


@pytest.mark.parametrize("preset_name", ["tiny", "tiny-mod", "tiny-exit"])
def test_last_only_gives_the_last_positions_logits(preset_name):
    """Prefill asks for the last position only: the same numbers as the full forward's last row."""
    from condformer.presets import preset

    cfg = preset(preset_name)
    cfg.d_model, cfg.n_heads, cfg.n_layers = 32, 2, 2
    cfg.exits = cfg.exits and type(cfg.exits)(layers=[0])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        full, last = model(x).logits, model(x, last_only=True).logits
    assert last.shape == (2, 1, cfg.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="last_only"):
        model(x, x, last_only=True)
