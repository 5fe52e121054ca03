"""A converted model fine-tunes (frozen parts stay put, new parts move, at their own rate), calibrates,
generates with a KV cache exactly as a full forward pass, and exports to transformers."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import decode_with_cache, naive_greedy, one_line_error

from condformer.checkpoint import load_for_inference, read_checkpoint
from condformer.config import TrainConfig
from condformer.convert import convert_run
from condformer.errors import ConfigError
from condformer.generation import SamplingConfig, generate
from condformer.train import train

VOCAB = 320


def _train(run, out, corpus, steps=3, **kw):
    cfg = TrainConfig(data=str(corpus), init_from=str(run), max_steps=steps, batch_size=2, seq_len=32, warmup_steps=1,
                      eval_every=100, eval_batches=1, tensorboard=False, lr=1e-3, **kw)
    return train(read_checkpoint(run).model_cfg, cfg, out, progress=False)


def _weights(run):
    _, model, _ = load_for_inference(run)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def mod_run(llama_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("mod") / "run"
    convert_run(llama_run, "mod", out, layers="all", capacity=0.5, anneal_steps=2)
    return out


def test_router_tuning_moves_only_the_routers(mod_run, tmp_path, code_corpus):
    before = _weights(mod_run)
    res = _train(mod_run, tmp_path / "ft", code_corpus, trainable=["routers"], lr_new=3e-3)
    after = _weights(tmp_path / "ft")
    routers = {n for n in before if ".router." in n or ".predictor." in n}
    assert routers and res.steps == 3
    for n in before:
        if n in routers:
            assert not torch.equal(before[n], after[n]), n
        else:
            assert torch.equal(before[n], after[n]), n  # bit for bit: no gradient, no weight decay
    # the ramp reached the target (anneal_steps 2 < 3 steps) and the run keeps the conversion's record
    ck = read_checkpoint(tmp_path / "ft")
    assert ck.state["new_parameters"] == read_checkpoint(mod_run).state["new_parameters"]
    _, model, _ = load_for_inference(tmp_path / "ft")
    assert int(model.layers[0].anneal) == 3 and model.layers[0].training_capacity() == 0.5


def test_frozen_parameters_get_no_gradient(mod_run):
    from condformer.trainable import apply_trainable

    _, model, _ = load_for_inference(mod_run)
    model.train()
    trained, total = apply_trainable(model, ["routers", "layers.1.block.attn.*"])
    x = torch.randint(0, VOCAB, (2, 16))
    model(x, x).train_loss.backward()
    for n, p in model.named_parameters():
        if ".router." in n or ".predictor." in n or n.startswith("layers.1.block.attn."):
            assert p.requires_grad and p.grad is not None, n
        else:
            assert not p.requires_grad and p.grad is None, n
    assert 0 < trained < total


def test_new_parameters_take_their_own_rate(mod_run):
    from condformer.optim import make_optimizer, set_lr

    _, model, _ = load_for_inference(mod_run)
    new = frozenset(read_checkpoint(mod_run).state["new_parameters"])
    opt = make_optimizer(model, TrainConfig(max_steps=1, lr=1e-4, lr_new=2e-3), new)
    set_lr(opt, 5e-5)  # half the peak: every group follows the schedule at its own scale
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in opt.param_groups:
        members = {names[id(p)] for p in group["params"]}
        fresh = members <= new
        assert fresh or not (members & new)  # no group mixes old and new parameters
        assert group["lr"] == pytest.approx(1e-3 if fresh else 5e-5)
        seen |= members
    assert seen == set(names.values()) and new <= seen
    # without lr_new the optimiser keeps the two groups older checkpoints hold
    assert len(make_optimizer(model, TrainConfig(max_steps=1, lr=1e-4), new).param_groups) == 2


def test_full_fine_tuning_resumes_exactly(mod_run, tmp_path, code_corpus):
    """The annealing clock is part of the weights: 2 + 2 steps == 4 steps, ramp included."""
    straight = _train(mod_run, tmp_path / "a", code_corpus, steps=4)
    cfg = TrainConfig(data=str(code_corpus), init_from=str(mod_run), max_steps=4, batch_size=2, seq_len=32,
                      warmup_steps=1, eval_every=100, eval_batches=1, tensorboard=False, lr=1e-3)
    model_cfg = read_checkpoint(mod_run).model_cfg
    train(model_cfg, cfg, tmp_path / "b", progress=False, stop_after=2)
    resumed = train(model_cfg, cfg, tmp_path / "b", progress=False, resume=True)
    assert resumed.val_loss == straight.val_loss and resumed.train_loss == straight.train_loss
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_role_that_selects_nothing_is_one_line(llama_run, tmp_path, code_corpus):
    msg = one_line_error(lambda: _train(llama_run, tmp_path / "x", code_corpus, trainable=["routers"]), ConfigError)
    assert "selects no parameter" in msg
    msg = one_line_error(lambda: _train(llama_run, tmp_path / "y", code_corpus, trainable=["new"]), ConfigError)
    assert "converted" in msg
    assert "unknown trainable role" in one_line_error(
        lambda: _train(llama_run, tmp_path / "z", code_corpus, trainable=["routerz"]), ConfigError)


@pytest.mark.parametrize("technique,kw", [
    ("exits", {"curriculum": "rotating", "curriculum_period": 1, "layers": "0"}),
    ("mod", {"capacity": 0.5, "anneal_steps": 1}),
    ("moe", {"experts": 4, "top_k": 2}),
])
def test_a_converted_model_trains_generates_and_exports(llama_run, tmp_path, code_corpus, technique, kw):
    transformers = pytest.importorskip("transformers")
    import condformer.hf.wrapper  # noqa: F401  (registers condformer's transformers model type)
    from condformer.hf.exporter import export_model

    convert_run(llama_run, technique, tmp_path / "conv", **kw)
    res = _train(tmp_path / "conv", tmp_path / "ft", code_corpus, steps=2)
    assert res.val_loss == res.val_loss and res.steps == 2
    _, model, _ = load_for_inference(tmp_path / "ft")
    model = model.double()  # (exits at full depth here; thresholded exit decoding: test_converted_exits_...)
    x = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x).logits
    decode_with_cache(model, x, 8, full, atol=1e-9)
    prompt = x[0, :6].tolist()
    got = generate(model, [prompt], SamplingConfig(max_new_tokens=8, greedy=True))[0]
    assert got == naive_greedy(model, prompt, 8)
    # export: transformers loads it and computes the same logits
    export_model(tmp_path / "ft", tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _, ours, _ = load_for_inference(tmp_path / "ft")
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x).logits, rtol=1e-5, atol=1e-5)


def test_converted_exits_calibrate_and_draft(llama_run, tmp_path, code_corpus):
    from condformer.calibrate import calibrate

    convert_run(llama_run, "exits", tmp_path / "conv", layers="0")
    _train(tmp_path / "conv", tmp_path / "ft", code_corpus, steps=2)
    _, model, _ = load_for_inference(tmp_path / "ft")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, VOCAB, (2, 24), generator=g), torch.randint(0, VOCAB, (2, 24), generator=g))]
    r = calibrate(model, batches, tolerance=0.5, grid=8)
    assert r.loss <= r.full_loss * 1.5 + 1e-9
    prompt = torch.randint(0, VOCAB, (10,), generator=g).tolist()
    sampling = SamplingConfig(max_new_tokens=10, greedy=True)
    stats: dict = {}
    spec = generate(model, [prompt], sampling, speculative=1, draft_tokens=3, stats=stats)[0]
    model.set_inference(exit_thresholds=None)
    assert spec == generate(model, [prompt], sampling)[0] and stats["drafted"] > 0
