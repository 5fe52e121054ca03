"""Every block x router x FFN x residual stream x exits combination builds, trains and decodes.

The grid is the promise of the one layer loop: a technique is a per-layer choice (block, router, FFN) or a
per-model one (stream, depth policy), and any choice composes with any other. Each combination is checked
on a tiny float64 model with every weight perturbed away from its initialisation (AltUp starts at the
identity; a zero-init block hides bugs): one training step gives finite gradients that reach the layers,
and in eval mode cached greedy decoding (with early exits: the exit decoder) equals greedy decoding that
re-runs the full forward at every step. AltUp + exits, refused before the loop was one, gets its own tests:
calibration, exit decoding == the full forward with the same depths, self-speculation == full greedy.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from condformer.calibrate import calibrate
from condformer.config import AltUpConfig, ExitConfig, LayerSpec, ModelConfig
from condformer.exits.halting import confidence
from condformer.generation import SamplingConfig, generate
from condformer.model import build_model
from condformer.registry import BLOCKS, FFNS, ROUTERS
from helpers import naive_greedy

V, D, L = 48, 16, 4
F64 = torch.float64
ROUTER_OPTIONS = {"mod": {"capacity": 0.5, "causal_router": "predictor"}}
FFN_OPTIONS = {"moe": {"experts": 4, "top_k": 2}}
STREAMS = {"plain": None, "altup": AltUpConfig(k=2), "raltup": AltUpConfig(k=2, variant="recycled")}
EXITS = ("none", "confidence")


def _builtin(registry) -> tuple[str, ...]:
    """The library's own registrations: other test modules register test-only routers at import, and the grid must
    not depend on which of them pytest imported first."""
    return tuple(n for n in registry.names() if registry.get(n).__module__.startswith("condformer."))


AXES = (_builtin(BLOCKS), _builtin(ROUTERS), _builtin(FFNS), tuple(STREAMS), EXITS)


def _config(block: str, router: str, ffn: str, stream: str, exits: str, fields: dict | None = None,
            **exit_kw) -> ModelConfig:
    spec = LayerSpec(block=block, router=router, ffn=ffn,
                     options={**ROUTER_OPTIONS.get(router, {}), **FFN_OPTIONS.get(ffn, {})})
    altup = STREAMS[stream]
    return ModelConfig(vocab_size=V, max_seq_len=48, d_model=D, n_layers=L, n_heads=2, d_ff=32,
                       layers=[LayerSpec(block=block), spec], altup=altup,
                       tie_embeddings=altup is None or altup.variant == "standard",
                       exits=None if exits == "none" else ExitConfig(layers=[0, 1, 2], **exit_kw), **(fields or {}))


def _perturbed(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@torch.no_grad()
def _median_thresholds(model: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """Per exit, the median full-depth confidence (about half the tokens stop there), via the layer loop."""
    from condformer.exits.policies import RecordExits

    ex, heads = model.exits, model.exit_heads()
    record = RecordExits(ex.exit_of_layer, model.stream.readout, previous=True)
    model.run(model.enter(x), model.context(x), policy=record)
    out = []
    for k in range(ex.last):
        r = record.readouts[k]
        out.append(float(confidence(ex.spec.confidence, heads.logits(k, r), r, record.before[k]).median()))
    model.set_inference(exit_thresholds=out)
    return out


def _greedy_checked(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Cached greedy decoding, checked against its reference; returns the tokens.

    Without exits (or at full depth) the reference is greedy over full forwards. With exits, the decoder
    prefills the prompt at full depth and decodes each new token at its own exit, so the reference is one
    full forward over the fed tokens with exactly those depths (``exit_depth_BT``): its argmax at every
    position must be the token decoded there, and the decoder must have used an exit's depths only.
    """
    stats: dict = {}
    out = generate(model, [prompt], SamplingConfig(max_new_tokens=n, greedy=True), stats=stats)[0]
    if "exit_depths" not in stats:
        assert out == naive_greedy(model, prompt, n)
        return out
    fed = prompt + out[:-1]
    depths = torch.tensor([[model.cfg.n_layers] * len(prompt) + stats["exit_depths"]])
    assert depths.shape[1] == len(fed)
    with torch.no_grad():
        ref = model(torch.tensor([fed]), exit_depth_BT=depths).logits[0, len(prompt) - 1:].argmax(-1)
    assert out == ref.tolist()
    return out


GRID = list(itertools.product(*AXES))


def _check(combo: tuple[str, ...], fields: dict | None = None) -> None:
    cfg = _config(*combo, fields=fields)
    model = _perturbed(cfg)
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    # training: one step, finite gradients that reach every layer's parameters
    model.train()
    model(x, x).train_loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    for i, layer in enumerate(model.layers):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters()), f"layer {i}"
    # evaluation: cached greedy decoding (exit decoder with thresholds) == greedy over full forwards
    model.eval()
    if cfg.exits is not None:
        _median_thresholds(model, x)
        depths = model(x, trace=True).traces["exit_depth"]
        assert 0 < int((depths < L).sum()) < depths.numel(), "the thresholds should stop some tokens, not all"
    _greedy_checked(model, x[0, :6].tolist(), 8)


@pytest.mark.parametrize("combo", GRID, ids=["-".join(c) for c in GRID])
def test_every_combination_trains_and_decodes(combo):
    _check(combo)


# what pretrained families need (condformer.hf) is ordinary config: it composes with every technique too
GQA = {"n_kv_heads": 1, "head_dim": 12, "qk_norm": True, "qkv_bias": True, "attn_out_bias": True,
       "rope_scaling": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8}}
GPT2_LIKE = {"positions": "learned", "mlp": "gelu_tanh", "norm": "layernorm"}
FIELD_GRID = ([("gqa", c) for c in itertools.product(("preln", "parallel"), _builtin(ROUTERS), _builtin(FFNS),
                                                       ("plain", "altup"), EXITS)]
              + [("gpt2", c) for c in itertools.product(_builtin(BLOCKS), _builtin(ROUTERS), _builtin(FFNS), ("plain",),
                                                        EXITS)])


@pytest.mark.parametrize(("fields", "combo"), FIELD_GRID, ids=[f"{f}-{'-'.join(c)}" for f, c in FIELD_GRID])
def test_pretrained_attention_fields_compose(fields, combo):
    """Grouped-query attention with q/k norms, biases, a head width != d / heads and llama3 RoPE scaling, or
    GPT-2's learned positions: every block with keys and values, every router, FFN, stream and exit decoder."""
    _check(combo, GQA if fields == "gqa" else GPT2_LIKE)


def test_gpt2_biases_compose_with_dense_ffns():
    _check(("parallel", "mod", "mlp", "plain", "confidence"), {**GPT2_LIKE, "qkv_bias": True, "attn_out_bias": True,
                                                               "mlp_bias": True})


def test_the_grid_covers_every_registered_component():
    for i, axis in enumerate(AXES):
        assert {row[i] for row in GRID} == set(axis)
    assert {"mod", "dense"} <= set(ROUTERS.names()) and {"moe", "mlp"} <= set(FFNS.names())


# -- AltUp + exits --------------------------------------------------------------------------------
ALTUP_EXITS = [("altup", "shared"), ("altup", "separate"), ("raltup", "shared")]


@pytest.mark.parametrize(("stream", "head"), ALTUP_EXITS)
def test_altup_exit_decoding_equals_the_full_forward_with_the_same_depths(stream, head):
    model = _perturbed(_config("preln", "mod", "mlp", stream, "confidence", head=head)).eval()
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    _median_thresholds(model, x)
    out = model(x, trace=True)
    depths = out.traces["exit_depth"]
    assert len(set(depths.flatten().tolist())) > 1
    given = model(x, exit_depth_BT=depths)  # the same depths, fixed by the caller
    torch.testing.assert_close(given.logits, out.logits, rtol=1e-10, atol=1e-10)
    stats: dict = {}
    generate(model, [x[1, :5].tolist()], SamplingConfig(max_new_tokens=8, greedy=True), stats=stats)
    assert stats["exit_mean_depth"] < L  # some decoded tokens exited early
    _greedy_checked(model, x[1, :5].tolist(), 8)


@pytest.mark.parametrize(("stream", "head"), ALTUP_EXITS)
def test_altup_self_speculation_equals_full_greedy(stream, head):
    model = _perturbed(_config("preln", "dense", "mlp", stream, "confidence", head=head)).eval()
    prompt = [3, 9, 27, 1, 40]
    full = generate(model, [prompt], SamplingConfig(max_new_tokens=10, greedy=True))[0]
    stats: dict = {}
    spec = generate(model, [prompt], SamplingConfig(max_new_tokens=10, greedy=True), speculative=2,
                    draft_tokens=3, stats=stats)[0]
    assert spec == full
    assert stats["rounds"] > 0


def test_altup_exits_calibrate():
    model = _perturbed(_config("preln", "dense", "mlp", "altup", "confidence"))
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(0, V, (2, 12), generator=g), torch.randint(0, V, (2, 12), generator=g))
               for _ in range(2)]
    result = calibrate(model, batches, tolerance=0.05)
    assert result.thresholds is None or len(result.thresholds) == model.exits.last
    assert result.loss <= result.full_loss * 1.05 + 1e-9  # verified exactly within the tolerance
    assert result.mean_depth <= L


@pytest.mark.parametrize("training", [{"training": "mixed"}, {"layer_dropout": 0.5}, {"halting": "token"},
                                      {"halting": "sequence"}, {"halting": "geometric"}],
                         ids=["mixed", "layer_dropout", "token", "sequence", "geometric"])
@pytest.mark.parametrize("stream", ["altup", "raltup"])
def test_altup_with_every_exit_recipe_trains_and_decodes(stream, training):
    model = _perturbed(_config("preln", "dense", "mlp", stream, "confidence", **training))
    x = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    model.train()
    out = model(x, x)
    out.train_loss.backward()
    assert torch.isfinite(out.train_loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.altup.coefs[1].p.grad is not None  # the stream's own coefficients learn
    model.eval()
    if "halting" not in training:
        _median_thresholds(model, x)
    _greedy_checked(model, x[0, :5].tolist(), 6)


@pytest.mark.parametrize("exit_kw", [{}, {"halting": "sequence"}], ids=["confidence", "sequence_halting"])
def test_altup_exits_never_see_later_tokens(exit_kw):
    model = _perturbed(_config("preln", "mod", "mlp", "altup", "confidence", **exit_kw)).eval()
    x = torch.randint(0, V, (2, 14), generator=torch.Generator().manual_seed(6))
    if not exit_kw:
        _median_thresholds(model, x)
    base = model(x).logits
    for t in (3, 8):
        y = x.clone()
        y[:, t:] = torch.randint(0, V, y[:, t:].shape, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(model(y).logits[:, :t], base[:, :t], rtol=0, atol=1e-12)


@pytest.mark.parametrize("stream", ["altup", "raltup"])
def test_altup_exited_tokens_keys_and_values_come_from_their_propagated_blocks(stream, monkeypatch):
    """Tokens that exit below a layer get their keys and values there later, from the K propagated blocks
    (``flush``: the layer reads them through the stream); decoding must still equal the reference."""
    from condformer.generation.exit_decoder import ExitDecoder

    flushed = []
    real = ExitDecoder.flush

    def counting(self, i, lctx):
        flushed.append(len(self.pending[i]))
        real(self, i, lctx)

    monkeypatch.setattr(ExitDecoder, "flush", counting)
    model = _perturbed(_config("preln", "dense", "mlp", stream, "confidence"), seed=7).eval()
    g = torch.Generator().manual_seed(8)
    for _ in range(6):
        x = torch.randint(0, V, (1, 12), generator=g)
        _median_thresholds(model, x)
        _greedy_checked(model, x[0, :4].tolist(), 10)
    assert sum(1 for n in flushed if n > 0) >= 3, flushed  # the lazy path really ran


# A sample of the grid under torch.compile(fullgraph=True): every value of every axis appears at least once, and
# AltUp + exits (aligned training of every exit) twice. A graph break anywhere in the one layer loop (a stream's
# enter/merge/readout, a depth policy's hooks, a router) fails here.
COMPILED = [("preln", "mod", "moe", "altup", "confidence"), ("parallel", "dense", "mlp", "raltup", "confidence"),
            ("sas", "mod", "mlp", "plain", "none"), ("sasp", "dense", "moe", "raltup", "none")]


def test_compiled_sample_covers_every_axis_value():
    for axis, values in enumerate(AXES):
        assert {c[axis] for c in COMPILED} == set(values), axis


@pytest.mark.compile
@pytest.mark.parametrize("combo", COMPILED, ids=["-".join(c) for c in COMPILED])
def test_sampled_combinations_compile_fullgraph(combo):
    torch._dynamo.reset()
    model = _perturbed(_config(*combo)).float().train()
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    out = torch.compile(model, fullgraph=True)(x, x)
    out.train_loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = model(x, x)
    ref.train_loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.train_loss, ref.train_loss, rtol=1e-4, atol=1e-4)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)
