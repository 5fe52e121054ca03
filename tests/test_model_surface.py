"""The model surface tools use: one layer loop (run), inference knobs asked of components, the refusal table."""

from __future__ import annotations

import pytest
import torch

from condformer.config import AltUpConfig, ExitConfig, LayerSpec, ModelConfig
from condformer.errors import CondformerError, ConfigError
from condformer.exits.policies import DepthPolicy
from condformer.model import build_model
from condformer.refusals import REFUSED

V, D = 64, 16


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, max_seq_len=32, d_model=D, n_layers=4, n_heads=2)
    base.update(kw)
    return ModelConfig(**base)


def _perturbed(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("altup", [None, AltUpConfig(k=2)], ids=["dense", "altup"])
def test_run_in_two_slices_equals_one_walk(altup):
    """run(layers=...) is a real slice: the first two layers then the rest equals the whole walk."""
    model = _perturbed(_cfg(altup=altup, tie_embeddings=altup is None))
    x = torch.randint(0, V, (2, 9))
    ctx = model.context(x)
    whole = model.run(model.enter(x), ctx)
    split = model.run(model.run(model.enter(x), ctx, layers=range(2)), ctx, layers=range(2, 4))
    torch.testing.assert_close(split, whole, rtol=0, atol=0)
    torch.testing.assert_close(model.logits(model.readout(whole)), model(x).logits, rtol=0, atol=0)
    assert not torch.equal(model.run(model.enter(x), ctx, layers=range(3)), whole)  # the slice is not a no-op


def test_run_consults_the_policy_around_every_layer_and_stops_when_done():
    model = _perturbed(_cfg())
    x = torch.randint(0, V, (1, 5))
    seen = []

    class StopAfterTwo(DepthPolicy):
        def before_layer(self, i, state, ctx):
            seen.append(("before", i, ctx.layer))

        def after_layer(self, i, prev, new, ctx):
            seen.append(("after", i))
            self.done = i == 1
            return prev  # keep the old state: the walk must then return the embedding unchanged

    state = model.enter(x)
    out = model.run(state, model.context(x), policy=StopAfterTwo())
    assert seen == [("before", 0, 0), ("after", 0), ("before", 1, 1), ("after", 1)]
    torch.testing.assert_close(out, state, rtol=0, atol=0)


def test_inference_knobs_are_asked_of_components():
    mod = LayerSpec(router="mod", options={"capacity": 0.5, "causal_router": "predictor"})
    model = build_model(_cfg(layers=[LayerSpec(), mod],
                             exits=ExitConfig(layers=[1], thresholds=[0.5])))
    assert model.inference_settings() == {"routing": "causal", "mod_threshold": 0.0, "exit_thresholds": [0.5]}
    model.set_inference(routing="topk", exit_thresholds=0.9, mod_threshold=0.25)
    assert model.inference_settings() == {"routing": "topk", "mod_threshold": 0.25, "exit_thresholds": [0.9]}
    assert all(m.eval_routing == "topk" for m in model.layers[1::2])
    model.set_inference(exit_thresholds=None)
    assert model.adaptive_decoder() is None  # full depth: plain cached decoding
    model.set_inference(exit_thresholds=[0.3])
    assert model.adaptive_decoder() is not None
    with pytest.raises(ConfigError, match="unknown eval_routing"):
        model.set_inference(routing="sideways")


def test_a_knob_no_component_has_is_a_one_line_error_unless_ignored():
    model = build_model(_cfg())
    assert model.inference_settings() == {}
    with pytest.raises(CondformerError) as err:
        model.set_inference(exit_thresholds=0.5)
    assert "exit_thresholds" in str(err.value) and "\n" not in str(err.value)
    model.set_inference(routing="topk", missing="ignore")  # nothing to set, nothing raised


FIRED: set[str] = set()  # the table's keys the tests below have seen raised


def _raises_table_text(fn, key: str, **details) -> None:
    with pytest.raises(ConfigError) as err:
        fn()
    assert str(err.value) == REFUSED[key].format(**details)
    FIRED.add(key)


def test_refusals_come_from_the_table():
    """Each refusal raised by a component is the table's text, word for word (no second copy elsewhere)."""
    ec = LayerSpec(ffn="moe", options={"moe_router": "expert_choice"})
    _raises_table_text(_cfg(layers=[ec]).validate, "moe_noncausal_in_decoder", where="layers[0]",
                       what="expert_choice routing")
    cap = LayerSpec(ffn="moe", options={"eval_capacity_factor": 1.0})
    _raises_table_text(_cfg(layers=[cap]).validate, "moe_eval_capacity_in_decoder", where="layers[0]")
    sas_ffn = LayerSpec(block="sas", router="mod", options={"routed": "ffn"})
    _raises_table_text(_cfg(layers=[sas_ffn]).validate, "mod_ffn_block", where="layers[0]", block="sas")
    no_router = LayerSpec(router="mod", options={"causal_router": "none"})
    _raises_table_text(_cfg(layers=[no_router]).validate, "mod_causal_without_router", where="layers[0]")
    from condformer.cache import KVCache

    topk = LayerSpec(router="mod", options={"eval_routing": "topk", "causal_router": "predictor"})
    model = build_model(_cfg(layers=[topk])).eval()
    cache = KVCache.for_model(model, 1, 8)
    _raises_table_text(lambda: model(torch.zeros(1, 3, dtype=torch.long), cache=cache), "mod_topk_cached",
                       where="MoD layer 0")
    ec_allowed = LayerSpec(ffn="moe", options={"moe_router": "expert_choice", "allow_noncausal": True})
    model = build_model(_cfg(layers=[ec_allowed])).eval()
    cache = KVCache.for_model(model, 1, 8)
    _raises_table_text(lambda: model(torch.zeros(1, 3, dtype=torch.long), cache=cache), "moe_noncausal_cached",
                       where="MoE layer 0", what="expert_choice routing")


def test_config_refusals_come_from_the_table():
    """The exits and AltUp sections refuse with the table's text too."""
    _raises_table_text(_cfg(kind="encoder", exits=ExitConfig()).validate, "exits_in_encoder")
    _raises_table_text(_cfg(exits=ExitConfig(halting="token", training="mixed")).validate,
                       "halting_with_mixed_training")
    _raises_table_text(_cfg(exits=ExitConfig(halting="token", thresholds=[0.5] * 3)).validate,
                       "thresholds_with_halting")
    _raises_table_text(_cfg(altup=AltUpConfig(variant="recycled", output="concat")).validate,
                       "altup_concat_recycled")
    _raises_table_text(_cfg(altup=AltUpConfig(output="mean")).validate, "altup_tied_narrow_head", output="mean")
    sas = LayerSpec(block="sas")
    _raises_table_text(_cfg(layers=[sas], n_kv_heads=1).validate, "shaped_attention_heads", where="layers[0]",
                       block="sas", what="n_kv_heads")
    _raises_table_text(_cfg(layers=[LayerSpec(block="sasp")], head_dim=4, qk_norm=True).validate,
                       "shaped_attention_heads", where="layers[0]", block="sasp", what="head_dim, qk_norm")
    _raises_table_text(_cfg(layers=[LayerSpec(ffn="moe")], mlp_bias=True).validate, "moe_mlp_bias",
                       where="layers[0]")
    # what the reasons point to instead builds
    build_model(_cfg(layers=[LayerSpec(block="parallel")], n_kv_heads=1, head_dim=4, qk_norm=True))
    build_model(_cfg(altup=AltUpConfig(output="mean"), tie_embeddings=False))
    build_model(_cfg(altup=AltUpConfig(variant="recycled", output="sum"), exits=ExitConfig(training="mixed")))


def test_every_refusal_of_the_table_is_raised_by_a_test():
    """A refusal nobody raises is dead text; one raised with other words would fail the tests above."""
    test_refusals_come_from_the_table()
    test_config_refusals_come_from_the_table()
    assert set(REFUSED) == FIRED


def test_every_reason_is_one_line():
    for key, reason in REFUSED.items():
        assert reason and "\n" not in reason, key
