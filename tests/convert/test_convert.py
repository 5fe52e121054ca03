"""``condformer convert``: the converted model computes the source's function where the technique promises it.

Sources are tiny random transformers models (Llama 3 with GQA and llama3 RoPE, tied; Qwen3 with q/k norms,
untied), perturbed away from their init and imported. The comparison is in float64 against the imported
source model (itself checked against transformers in tests/hf), on fresh random tokens, in training mode
(top-k routing, every exit computed) and in evaluation mode (causal routing, dropless experts).
"""

from __future__ import annotations

import json

import pytest
import torch
from tests.helpers import one_line_error

from condformer.checkpoint import load_for_inference, read_checkpoint
from condformer.convert import convert_run
from condformer.errors import CheckpointError, ConfigError

VOCAB = 320


def _pair(src, out):
    """(source model, converted model), float64."""
    _, a, _ = load_for_inference(src)
    _, b, _ = load_for_inference(out)
    return a.double(), b.double()


@torch.no_grad()
def _logits(model, x, training: bool):
    model.train(training)
    try:
        return model(x).logits
    finally:
        model.eval()


@torch.no_grad()
def _assert_same_function(src, out, *, train_too: bool = True, atol: float = 1e-10):
    a, b = _pair(src, out)
    x = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(7))
    want = a(x).logits
    assert want.abs().max() > 0.1
    torch.testing.assert_close(_logits(b, x, False), want, rtol=0, atol=atol)
    if train_too:
        torch.testing.assert_close(_logits(b, x, True), want, rtol=0, atol=atol)
    return a, b


@pytest.mark.parametrize("head", ["shared", "separate"])
def test_exits_keep_full_depth_logits(llama_run, tmp_path, head):
    r = convert_run(llama_run, "exits", tmp_path / "out", head=head, layer_dropout=0.0)
    assert r.max_logit_diff_eval == 0 and r.layers == [0, 1]
    _, b = _assert_same_function(llama_run, tmp_path / "out")
    assert b.exits.exit_layers == [0, 1]


@torch.no_grad()
def test_exits_start_as_the_logit_lens(llama_run, tmp_path):
    """An exit's norm is the final norm and its head the LM head: exit logits = head(final_norm(h_layer))."""
    convert_run(llama_run, "exits", tmp_path / "out", head="separate")
    _, b = _pair(llama_run, tmp_path / "out")
    torch.testing.assert_close(b.exits.norms[0].weight, b.final_norm.weight, rtol=0, atol=0)
    torch.testing.assert_close(b.exits.heads[0].weight, b.head.weight, rtol=0, atol=0)
    assert not torch.equal(b.final_norm.weight, torch.ones_like(b.final_norm.weight))  # a perturbed gain


@pytest.mark.parametrize("capacity", [1.0, 0.5, 0.125])
def test_mod_keeps_the_function_at_conversion(llama_run, tmp_path, capacity):
    """2sigmoid weighting with a zero router (g = 1), capacity annealed from 1, a predictor routing every token."""
    r = convert_run(llama_run, "mod", tmp_path / "out", layers="all", capacity=capacity, anneal_steps=10)
    assert r.max_logit_diff_train == 0 and r.max_logit_diff_eval == 0
    _assert_same_function(llama_run, tmp_path / "out")


@pytest.mark.parametrize("capacity", [1.0, 0.25])
def test_ffn_routed_mod_keeps_the_function_at_conversion(llama_run, tmp_path, capacity):
    r = convert_run(llama_run, "mod", tmp_path / "out", layers="all", capacity=capacity, anneal_steps=10,
                    routed="ffn")
    # the probe is float32: (x + a) + f rounds differently from the dense layer's x + (a + f)
    assert r.max_logit_diff_train < 1e-5 and r.max_logit_diff_eval < 1e-5
    _assert_same_function(llama_run, tmp_path / "out")
    a, b = _pair(llama_run, tmp_path / "out")
    assert all(layer.routed == "ffn" for layer in b.layers)
    if capacity < 1:  # control: without the ramp, top-k at 0.25 skips FFNs and the logits move
        for layer in b.layers:
            layer.anneal = None
        x = torch.randint(0, VOCAB, (2, 48))
        assert (_logits(b, x, True) - _logits(a, x, False)).abs().max() > 1e-3


def test_mod_without_annealing_routes_at_the_target_from_the_start(llama_run, tmp_path):
    """Control: no ramp and capacity 0.5, so training-mode top-k skips half the tokens and the logits move."""
    convert_run(llama_run, "mod", tmp_path / "out", layers="all", capacity=0.5, anneal_steps=0)
    a, b = _pair(llama_run, tmp_path / "out")
    x = torch.randint(0, VOCAB, (2, 48))
    assert (_logits(b, x, True) - _logits(a, x, False)).abs().max() > 1e-3


def test_sigmoid_weighting_would_change_the_function(llama_run, tmp_path):
    """Control for the 2sigmoid weighting: the same conversion under 'sigmoid' halves every routed update."""
    convert_run(llama_run, "mod", tmp_path / "out", layers="all", capacity=1.0, anneal_steps=0)
    a, b = _pair(llama_run, tmp_path / "out")
    for layer in b.layers:
        layer.weighting = "sigmoid"
    x = torch.randint(0, VOCAB, (1, 32))
    assert (_logits(b, x, False) - _logits(a, x, False)).abs().max() > 1e-2


@pytest.mark.parametrize("experts,top_k,split", [(4, 2, 1), (8, 2, 1), (8, 4, 2), (8, 4, 4), (6, 4, 2)])
def test_upcycled_moe_equals_the_dense_model(llama_run, tmp_path, experts, top_k, split):
    r = convert_run(llama_run, "moe", tmp_path / "out", experts=experts, top_k=top_k, split=split)
    assert r.max_logit_diff_eval < 1e-4 and not r.notes
    _, b = _assert_same_function(llama_run, tmp_path / "out")
    bank = b.layers[0].block.ffn.bank
    assert bank.n_experts == experts and bank.d_expert == 96 // split


def test_upcycled_moe_on_another_family(swiglu_untied_run, tmp_path):
    convert_run(swiglu_untied_run, "moe", tmp_path / "out", layers="1", experts=4, top_k=2, split=2)
    _assert_same_function(swiglu_untied_run, tmp_path / "out")


def test_mod_and_exits_on_another_family(swiglu_untied_run, tmp_path):
    convert_run(swiglu_untied_run, "mod", tmp_path / "mod", capacity=0.25)
    _assert_same_function(swiglu_untied_run, tmp_path / "mod")
    convert_run(tmp_path / "mod", "exits", tmp_path / "both", layer_dropout=0.0)  # techniques compose
    _assert_same_function(swiglu_untied_run, tmp_path / "both")


def test_top1_upcycling_is_reported_as_not_exact(llama_run, tmp_path):
    """Control: top-1 gates are not renormalised, so the layer outputs p x MLP(x); the report says so."""
    r = convert_run(llama_run, "moe", tmp_path / "out", experts=4, top_k=1)
    assert r.notes and "top-1" in r.notes[0]
    assert r.max_logit_diff_eval > 1e-3


def test_granular_upcycling_needs_the_virtual_group_router(llama_run, tmp_path):
    """Control: with a router whose rows are not tied per copy, top-k mixes slices of different copies."""
    convert_run(llama_run, "moe", tmp_path / "out", experts=8, top_k=4, split=4)
    a, b = _pair(llama_run, tmp_path / "out")
    with torch.no_grad():
        for layer in b.layers:
            layer.block.ffn.router.weight.normal_(0, 1.0)
    x = torch.randint(0, VOCAB, (2, 32))
    assert (_logits(b, x, False) - _logits(a, x, False)).abs().max() > 1e-3


def test_the_run_records_its_new_parameters(llama_run, tmp_path):
    convert_run(llama_run, "mod", tmp_path / "out", layers="1", capacity=0.5)
    ck = read_checkpoint(tmp_path / "out")
    _, a, _ = load_for_inference(llama_run)
    _, b, _ = load_for_inference(tmp_path / "out")
    old = {n for n, _ in a.named_parameters()}
    want = sorted(n for n, _ in b.named_parameters() if n not in old)
    assert ck.state["new_parameters"] == want
    assert want and all(n.startswith(("layers.1.router", "layers.1.predictor")) for n in want)
    assert ck.state["conversion"]["technique"] == "mod" and ck.state["tokenizer"]["kind"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model"]["layers"][1]["router"] == "mod"


def test_the_source_run_is_untouched(llama_run, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in llama_run.rglob("*") if p.is_file()}
    convert_run(llama_run, "exits", tmp_path / "out")
    assert {p.name: p.stat().st_mtime_ns for p in llama_run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("technique,kw,words", [
    ("quantum", {}, "unknown technique"),
    ("exits", {"layers": "0-9"}, "out of range"),
    ("mod", {"layers": "5"}, "out of range"),
    ("mod", {"capacity": 0.0}, "(0, 1]"),
    ("mod", {"capacity": 1.5}, "(0, 1]"),
    ("mod", {"layers": "odd", "capacity": -0.25}, "(0, 1]"),
    ("moe", {"experts": 6, "top_k": 2, "split": 4}, "multiples"),
    ("moe", {"top_k": 9}, "exceeds"),
    ("exits", {"layers": "1"}, "only the last layer"),
    ("exits", {"capacity": 0.5}, "--capacity is an option of --to mod"),
    ("mod", {"layers": "x-y"}, "not a layer selection"),
    ("mod", {"routed": "attention"}, "--routed must be"),
])
def test_bad_input_is_one_line_and_writes_nothing(llama_run, tmp_path, technique, kw, words):
    out = tmp_path / "out"
    msg = one_line_error(lambda: convert_run(llama_run, technique, out, **kw))
    assert words in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_existing_run_is_never_overwritten(llama_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    one_line_error(lambda: convert_run(llama_run, "exits", tmp_path / "out"), CheckpointError)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_converting_twice_the_same_way_is_refused(llama_run, tmp_path):
    convert_run(llama_run, "exits", tmp_path / "a")
    assert "already has exits" in one_line_error(lambda: convert_run(tmp_path / "a", "exits", tmp_path / "b"))
    convert_run(llama_run, "moe", tmp_path / "m")
    assert "not an MLP" in one_line_error(lambda: convert_run(tmp_path / "m", "moe", tmp_path / "n"), ConfigError)


def test_exit_weights_may_be_listed(llama_run, tmp_path):
    convert_run(llama_run, "exits", tmp_path / "out", layers="0", exit_weights=[0.2, 1.0])
    assert read_checkpoint(tmp_path / "out").model_cfg.exits.weights == [0.2, 1.0]
    msg = one_line_error(lambda: convert_run(llama_run, "exits", tmp_path / "bad", layers="0", exit_weights=[1.0]))
    assert "exits.weights" in msg and not (tmp_path / "bad").exists()
