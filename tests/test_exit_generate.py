"""Early-exit generation (ExitDecoder): cached decoding equals a full forward pass with the same exit decisions.

The KV policy is state propagation: a token that exits at layer n keeps its exit state in every higher layer,
whose keys and values are computed from it. In cached decoding those layers compute nothing for the token
until a deeper token arrives (the *pending* path, ``append_kv``). Whatever the path, every decoded logit must
equal ``model(seq, exit_depth_BT=depths)`` with the prompt at full depth and each fed token at its recorded depth.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from condformer.cache import KVCache
from condformer.config import ExitConfig, LayerSpec, ModelConfig
from condformer.context import Context
from condformer.errors import CondformerError
from condformer.exits.halting import confidence
from condformer.exits.heads import ExitHeads, set_exit_thresholds
from condformer.generation import SamplingConfig, generate, left_pad
from condformer.generation.exit_decoder import ExitDecoder
from condformer.model import build_layer, build_model
from helpers import naive_greedy, one_line_error

L = 4  # layers of every model here
ATOL = 1e-9
CPU = torch.device("cpu")
MOD = LayerSpec(router="mod", options={"capacity": 0.5, "causal_router": "predictor"})
MOE = LayerSpec(ffn="moe", options={"experts": 4, "top_k": 2})
PROMPTS_1 = [[5, 17, 99, 3, 250, 41]]
PROMPTS_2 = [[5, 17, 99, 3, 250, 41], [200, 8, 64]]  # left-padded: positions restart at 0 in row 1


def make_model(layers: list[LayerSpec] | None = None, seed: int = 0, exit_layers: list[int] | None = None,
               **exit_kw) -> nn.Module:
    """A float64 4-layer model with exits whose random weights are perturbed, so exits and argmaxes vary."""
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=L, n_heads=2, max_seq_len=64, layers=layers or [LayerSpec()],
                      exits=ExitConfig(layers=exit_layers, **exit_kw))
    model = build_model(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@torch.no_grad()
def exit_confidences(model: nn.Module, tokens_BT: torch.Tensor) -> list[torch.Tensor]:
    """Every token's confidence at each exit before the last, all tokens through all layers."""
    ex = model.exits
    ctx = model._context(tokens_BT, None, None, None)
    h, out = model.embed(tokens_BT), []
    for i, layer in enumerate(model.layers):
        prev, h = h, layer(h, ctx.for_layer(i))
        k = ex.exit_of_layer.get(i)
        if k is not None and k < ex.n_exits - 1:
            out.append(confidence(ex.spec.confidence, model.exit_heads().logits(k, h), h, prev).flatten())
    return out


def set_quantile_thresholds(model: nn.Module, q: float = 0.6) -> list[float]:
    """Thresholds at the q-quantile of each exit's confidence on random text: the depths come out mixed."""
    g = torch.Generator().manual_seed(99)
    confs = exit_confidences(model, torch.randint(0, 260, (4, 24), generator=g))
    thresholds = [float(c.quantile(q)) for c in confs]
    set_exit_thresholds(model, thresholds)
    return thresholds


def generate_capturing(model: nn.Module, prompts: list[list[int]], n: int,
                       seed: int | None = None) -> tuple[list[list[int]], dict, torch.Tensor, int]:
    """Generation with early exits (greedy, or sampled with ``seed``); also every logit row the decoder returned
    (B, n, V) and the number of ``flush`` calls that found pending tokens (keys and values computed later by
    ``append_kv``)."""
    logits, flushed = [], [0]
    prefill, step, flush = ExitDecoder.prefill, ExitDecoder.step, ExitDecoder.flush

    def capture_prefill(self, *args):
        out = prefill(self, *args)
        logits.append(out.clone())
        return out

    def capture_step(self, *args):
        out = step(self, *args)
        logits.append(out.clone())
        return out

    def count_flush(self, i, lctx):
        flushed[0] += bool(self.pending[i])
        return flush(self, i, lctx)

    stats: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ExitDecoder, "prefill", capture_prefill)
        mp.setattr(ExitDecoder, "step", capture_step)
        mp.setattr(ExitDecoder, "flush", count_flush)
        cfg = SamplingConfig(max_new_tokens=n, greedy=seed is None)
        g = None if seed is None else torch.Generator().manual_seed(seed)
        out = generate(model, prompts, cfg, generator=g, stats=stats)
    return out, stats, torch.stack(logits, dim=1), flushed[0]


@torch.no_grad()
def forward_with_depths(model: nn.Module, prompts: list[list[int]], fed: list[list[int]],
                        depths_SB: torch.Tensor) -> torch.Tensor:
    """Logits (B, S + 1, V) at the last prompt position and each fed token, from one full forward pass in which
    prompt tokens compute every layer and fed token s of row b computes ``depths_SB[s, b]`` layers."""
    seqs = [p + f for p, f in zip(prompts, fed, strict=True)]
    tokens, positions, valid = left_pad(seqs, 0, CPU)
    S = depths_SB.shape[0]
    depth = torch.full(tokens.shape, L, dtype=torch.long)
    if S:
        depth[:, -S:] = depths_SB.T
    out = model(tokens, positions_BT=positions, valid_BT=None if bool(valid.all()) else valid, exit_depth_BT=depth)
    return out.logits[:, -(S + 1):]


def depths_by_step(stats: dict, batch: int) -> torch.Tensor:
    """The recorded depths as (steps, B): row-major by step."""
    return torch.tensor(stats["exit_depths"], dtype=torch.long).view(-1, batch)


def pending_then_deeper(depths_SB: torch.Tensor) -> bool:
    """Some step exited before the last layer in every row, and a later step went deeper (a flush)."""
    deepest = depths_SB.max(dim=1).values.tolist()
    return any(d < L and any(e > d for e in deepest[s + 1:]) for s, d in enumerate(deepest))


def check_exit_generation(model: nn.Module, prompts: list[list[int]], n: int = 16,
                          seed: int | None = None) -> tuple[torch.Tensor, int]:
    """Generate (greedy, or sampled with ``seed``), then compare every decoded logit with the full forward pass
    under the same exit decisions; return the depths (steps, B) and the number of non-empty flushes."""
    B = len(prompts)
    out, stats, got, flushed = generate_capturing(model, prompts, n, seed)
    assert [len(row) for row in out] == [n] * B
    depths = depths_by_step(stats, B)
    assert depths.shape == (n - 1, B)
    assert set(depths.flatten().tolist()) <= {layer + 1 for layer in model.exits.exit_layers}
    assert stats["exit_histogram"] == [stats["exit_depths"].count(d) for d in range(1, L + 1)]
    assert stats["exit_mean_depth"] == pytest.approx(depths.double().mean().item())
    if seed is None:  # greedy picked the argmax of what the decoder returned
        assert got.argmax(dim=-1).tolist() == out
    want = forward_with_depths(model, prompts, [row[:-1] for row in out], depths)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    return depths, flushed


# -- cached exit decoding == full forward with the same decisions ---------------------------------------
CASES = {
    "dense": dict(),
    "mod": dict(layers=[LayerSpec(), MOD]),
    "parallel": dict(layers=[LayerSpec(block="parallel")]),
    "sas": dict(layers=[LayerSpec(block="sas")]),
    "sasp": dict(layers=[LayerSpec(block="sasp")], seed=1),  # seed 0's sasp model is too peaked to vary
    "moe": dict(layers=[LayerSpec(), MOE]),
    "mod_sas_moe": dict(layers=[LayerSpec(block="sas", ffn="moe", router="mod",
                                          options={**MOD.options, **MOE.options}), LayerSpec(block="parallel")]),
    "gap": dict(confidence="gap"),
    "cosine": dict(confidence="cosine"),
    "exit_at_layer_1_only": dict(layers=[LayerSpec(), MOD], exit_layers=[1]),
    "separate_heads": dict(head="separate"),
    "separate_heads_mod_cosine": dict(layers=[MOD, LayerSpec(block="parallel")], head="separate",
                                      confidence="cosine"),
}


@pytest.mark.parametrize("prompts", [PROMPTS_1, PROMPTS_2], ids=["B1", "B2_left_padded"])
@pytest.mark.parametrize("case", list(CASES))
def test_exit_generation_equals_forward_with_same_exits(case, prompts):
    model = make_model(**CASES[case])
    set_quantile_thresholds(model)
    greedy = check_exit_generation(model, prompts)
    # sampled tokens too (greedy decoding of a random model may repeat one token): any fed tokens must work
    sampled = check_exit_generation(model, prompts, seed=11)
    # mixed depths, and the pending path (every row exited, a deeper token later) was taken and flushed
    assert len(set(greedy[0].flatten().tolist()) | set(sampled[0].flatten().tolist())) > 1
    assert any(pending_then_deeper(depths) and flushed > 0 for depths, flushed in (greedy, sampled))


def test_mod_layer_routes_some_decoded_tokens_and_skips_others():
    """The MoD case above is meaningful: its causal router sends some decoded tokens through, not all."""
    model = make_model([LayerSpec(), MOD])
    set_quantile_thresholds(model)
    routed = []
    mod = model.layers[1]
    orig = type(mod)._causal_selection

    def spy(self, x, r, ctx, record=True):
        routed.append((self.causal_logits(x, r) > 0).flatten())
        return orig(self, x, r, ctx, record)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(mod), "_causal_selection", spy)
        generate(model, PROMPTS_1, SamplingConfig(max_new_tokens=16, greedy=True))
    decisions = torch.cat(routed)
    assert 0 < int(decisions.sum()) < decisions.numel()


@pytest.mark.parametrize("kind", ["token", "geometric"])
@pytest.mark.parametrize("prompts", [PROMPTS_1, PROMPTS_2], ids=["B1", "B2_left_padded"])
def test_halting_generation_equals_forward_with_same_exits(kind, prompts):
    model = make_model(halting=kind)
    assert model.exits.policy() == "halting"
    runs = [check_exit_generation(model, prompts), check_exit_generation(model, prompts, seed=11)]
    assert len({d for depths, _ in runs for d in depths.flatten().tolist()}) > 1
    assert any(pending_then_deeper(depths) and flushed > 0 for depths, flushed in runs)


@torch.no_grad()
def test_sequence_halting_decodes_the_depths_of_the_full_forward():
    """Causal sequence pooling: a token's depth comes from the mean first-layer state of its own prefix, in
    cached decoding (a running mean from the prefill on) exactly as in the full forward evaluation runs."""
    prompts = [[5, 17, 99, 3, 250, 41], [200, 8, 64], [7, 7, 1, 90]]
    model = make_model(halting="sequence", seed=3)
    out, stats, got, _ = generate_capturing(model, prompts, 12)
    depths = depths_by_step(stats, len(prompts))  # (steps, B): the decoded tokens out[b][:-1]
    tokens, positions, valid = left_pad([p + row[:-1] for p, row in zip(prompts, out, strict=True)], 0, CPU)
    full = model(tokens, positions_BT=positions, valid_BT=valid, trace=True).traces["exit_depth"]
    assert torch.equal(full[:, -depths.shape[0]:].T, depths)
    assert len(set(depths.flatten().tolist())) > 1 and min(depths.flatten().tolist()) < L  # some stop early
    want = forward_with_depths(model, prompts, [row[:-1] for row in out], depths)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_config_thresholds_act_like_set_exit_thresholds():
    model = make_model()
    thresholds = set_quantile_thresholds(model)
    configured = make_model(thresholds=thresholds)
    assert configured.exits.policy() == "confidence"
    runs = [generate_capturing(m, PROMPTS_2, 10) for m in (model, configured)]
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    torch.testing.assert_close(runs[0][2], runs[1][2], rtol=0, atol=0)


# -- a schedule of exits forced step by step ------------------------------------------------------------
def force_depth(model: nn.Module, depth: int) -> None:
    """Softmax thresholds that make every token exit at ``depth`` (-1: always exits; 2: never)."""
    ex = model.exits
    t = [2.0] * (ex.n_exits - 1)
    k = ex.exit_of_layer[depth - 1]
    if k < ex.n_exits - 1:
        t[k] = -1.0
    set_exit_thresholds(model, t)


@torch.no_grad()
def decode_schedule(model: nn.Module, prompts: list[list[int]], fed: list[list[int]],
                    schedule: list[int]) -> tuple[torch.Tensor, ExitDecoder, KVCache]:
    """Drive ExitDecoder directly, feeding ``fed`` tokens with the exit depth of each step forced."""
    tokens, positions, valid = left_pad(prompts, 0, CPU)
    B, T = tokens.shape
    cache = KVCache.for_model(model, B, T + len(schedule))
    dec = ExitDecoder(model)
    logits = [dec.prefill(tokens, positions, None if bool(valid.all()) else valid, cache)]
    pos = positions[:, -1:] + 1
    for s, depth in enumerate(schedule):
        force_depth(model, depth)
        tok = torch.tensor([row[s] for row in fed])
        logits.append(dec.step(tok, pos, cache))
        pos = pos + 1
    return torch.stack(logits, dim=1), dec, cache


SCHEDULE = [1, 1, 4, 2, 3, 3, 1, 4, 2, 2, 1, 4, 3, 1, 1]  # ends with tokens whose upper layers are never flushed


@pytest.mark.parametrize("layers", [None, [LayerSpec(), MOD], [LayerSpec(block="sasp"), LayerSpec(block="sas")]],
                         ids=["dense", "mod", "sasp_sas"])
@pytest.mark.parametrize("prompts", [PROMPTS_1, PROMPTS_2], ids=["B1", "B2_left_padded"])
def test_forced_exit_schedule_pending_and_never_flushed(layers, prompts):
    model = make_model(layers)
    g = torch.Generator().manual_seed(5)
    fed = [torch.randint(0, 260, (len(SCHEDULE),), generator=g).tolist() for _ in prompts]
    got, dec, cache = decode_schedule(model, prompts, fed, SCHEDULE)
    B = len(prompts)
    assert dec.stats.depths == [d for d in SCHEDULE for _ in range(B)]
    depths = torch.tensor(SCHEDULE)[:, None].expand(-1, B)
    torch.testing.assert_close(got, forward_with_depths(model, prompts, fed, depths), rtol=0, atol=ATOL)
    # the last tokens exited at layers 3, 1, 1: layers above still hold them as pending, never computed
    assert [len(p) for p in dec.pending] == [0, 2, 2, 3]
    T = max(len(p) for p in prompts)
    if layers is None:  # dense layers cache every token they computed or flushed
        assert [kv.length for kv in cache.layers] == [T + len(SCHEDULE) - n for n in (0, 2, 2, 3)]


@torch.no_grad()
def test_control_dropping_pending_keys_and_values_changes_the_logits():
    """If exited tokens' keys and values were skipped instead of propagated, decoding would differ: the
    comparison above can fail."""
    model = make_model()
    prompts = PROMPTS_2
    g = torch.Generator().manual_seed(5)
    fed = [torch.randint(0, 260, (len(SCHEDULE),), generator=g).tolist() for _ in prompts]
    want = forward_with_depths(model, prompts, fed, torch.tensor(SCHEDULE)[:, None].expand(-1, 2))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ExitDecoder, "flush", lambda self, i, lctx: self.pending[i].clear())
        got, _, _ = decode_schedule(model, prompts, fed, SCHEDULE)
    diff = (got - want).abs().amax(dim=(0, 2))
    # identical until the first deeper token after an early exit (step 2 feeds a depth-4 token after two
    # depth-1 ones; its logits are returned at index 3), then different
    assert diff[:3].max() <= ATOL
    assert diff[3] > 1e-4
    # and a generate-based run with the same sabotage fails the check
    set_quantile_thresholds(model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ExitDecoder, "flush", lambda self, i, lctx: self.pending[i].clear())
        with pytest.raises(AssertionError):
            check_exit_generation(model, PROMPTS_1)


# -- append_kv == the keys and values the full layer caches ---------------------------------------------
@pytest.mark.parametrize("padded", [False, True], ids=["all_valid", "padded"])
@pytest.mark.parametrize("router", ["dense", "mod"])
@pytest.mark.parametrize("block", ["preln", "parallel", "sas", "sasp", "sasp-value"])
@torch.no_grad()
def test_append_kv_equals_the_layers_cached_keys_and_values(block, router, padded):
    options = dict(MOD.options) if router == "mod" else {}
    if block == "sasp-value":  # shaped attention with the optional value matrix: values are x (I + W)
        block, options = "sasp", {**options, "value_matrix": True}
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                      layers=[LayerSpec(block=block, router=router, options=options)])
    torch.manual_seed(1)
    layer = build_layer(cfg, 1).double().eval()
    for p in layer.parameters():
        p.add_(0.3 * torch.randn_like(p))
    B, T0, T = 2, 4, 7
    caches = [KVCache(1, B, cfg.n_heads, cfg.head_size, 32, dtype=torch.float64) for _ in range(2)]
    x0, x = torch.randn(B, T0, 32, dtype=torch.float64), torch.randn(B, T, 32, dtype=torch.float64)
    pos0 = torch.arange(T0).expand(B, T0)
    pos = torch.arange(T0, T0 + T).expand(B, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    if padded:
        valid[1, 2] = False
    if router == "mod":  # centre the causal router's logits: about half the tokens get the layer
        layer.predictor[-1].bias -= layer.causal_logits(torch.cat([x0, x], 1), None).median()

    def ctx(cache, positions, v=None):
        return Context(positions_BT=positions, causal=True, cache=cache, contiguous=False, valid_BT=v)

    for cache in caches:  # the same earlier tokens in both
        layer(x0, ctx(cache, pos0))
    n0 = caches[0].layers[0].length
    layer(x, ctx(caches[0], pos, valid if padded else None))
    layer.append_kv(x, ctx(caches[1], pos, valid if padded else None))
    full, kv_only = caches[0].layers[0], caches[1].layers[0]
    n = full.length
    assert kv_only.length == n > n0
    if router == "mod":  # some tokens skip the routed layer: the comparison covers routing too
        assert n - n0 < T
    for name in ("k", "v"):
        torch.testing.assert_close(getattr(kv_only, name)[:, :, :n], getattr(full, name)[:, :, :n], rtol=0, atol=ATOL)
    assert torch.equal(kv_only.pos[:, :n], full.pos[:, :n])
    assert torch.equal(kv_only.valid[:, :n], full.valid[:, :n])


# -- no thresholds: plain greedy ------------------------------------------------------------------------
def test_no_thresholds_is_plain_greedy():
    prompts = PROMPTS_2
    model = make_model(layers=[LayerSpec(), MOD])
    assert model.exits.policy() == "full"
    plain_cfg = ModelConfig(d_model=32, n_layers=L, n_heads=2, max_seq_len=64, layers=[LayerSpec(), MOD])
    plain = build_model(plain_cfg).double().eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("exits.") for k in unexpected)
    cfg = SamplingConfig(max_new_tokens=14, greedy=True)
    stats: dict = {}
    out = generate(model, prompts, cfg, stats=stats)
    assert "exit_depths" not in stats  # no exit decoder ran
    assert out == generate(plain, prompts, cfg)
    assert out == [naive_greedy(plain, p, 14) for p in prompts]
    assert len({t for row in out for t in row}) > 3  # not degenerate
    # thresholds no confidence reaches: the exit decoder runs every token at full depth, same tokens
    set_exit_thresholds(model, 2.0)
    out2, stats2, _, _ = generate_capturing(model, prompts, 14)
    assert out2 == out
    assert stats2["exit_depths"] == [L] * (13 * len(prompts))
    set_exit_thresholds(model, None)
    assert model.exits.policy() == "full"


# -- errors ---------------------------------------------------------------------------------------------
def test_set_exit_thresholds_errors():
    model = make_model()
    msg = one_line_error(lambda: set_exit_thresholds(model, [0.5, 0.5]), CondformerError)
    assert "3" in msg
    for bad in ("0.5", "abc", True, [0.5, "x", 0.5]):  # a string of the right length is no list of numbers
        assert "number" in one_line_error(lambda b=bad: set_exit_thresholds(model, b), CondformerError)
    set_exit_thresholds(model, 0.4)  # a scalar applies to every exit
    assert model.exits.thresholds == [0.4, 0.4, 0.4]
    halting = make_model(halting="token")
    one_line_error(lambda: set_exit_thresholds(halting, [0.5] * 3), CondformerError)
    set_exit_thresholds(halting, None)  # clearing is allowed
    plain = build_model(ModelConfig(d_model=32, n_layers=L, n_heads=2, max_seq_len=64))
    one_line_error(lambda: set_exit_thresholds(plain, 0.5), CondformerError)


class _NoKV(nn.Module):
    """A layer without ``append_kv`` (every built-in router has one)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.inner(x, ctx)


def test_exit_decoder_needs_append_kv():
    model = make_model()
    model.layers[2] = _NoKV(model.layers[2])
    msg = one_line_error(lambda: ExitDecoder(model), CondformerError)
    assert "layer 2" in msg
    set_quantile_thresholds(model)
    one_line_error(lambda: generate(model, PROMPTS_1, SamplingConfig(max_new_tokens=3, greedy=True)),
                   CondformerError)


def test_forward_rejects_a_depth_without_exit():
    model = make_model(exit_layers=[1])  # depths 2 and 4
    one_line_error(lambda: model(torch.tensor([[1, 2, 3]]), exit_depth_BT=torch.tensor([[4, 1, 2]])),
                   CondformerError)


@pytest.mark.parametrize("prompts", [PROMPTS_1, PROMPTS_2], ids=["B1", "B2_left_padded"])
@pytest.mark.parametrize("confidence_kind", ["softmax", "cosine"])
def test_a_null_threshold_switches_its_exit_off(prompts, confidence_kind, monkeypatch):
    model = make_model(confidence=confidence_kind)
    low = set_quantile_thresholds(model, q=0.3)
    set_exit_thresholds(model, [None, low[1], None])  # only the exit after layer 1 is checked
    calls = []
    real = ExitHeads.logits

    def spy(self, k, r):
        calls.append(k)
        return real(self, k, r)

    monkeypatch.setattr(ExitHeads, "logits", spy)
    depths, _ = check_exit_generation(model, prompts, seed=3)
    assert set(depths.flatten().tolist()) == {2, L}  # tokens stop after layer 1 or run to the end
    assert set(calls) <= {1, L - 1}  # exits 0 and 2 never computed a head
    # the full forward under the same thresholds decides the same way
    x = torch.randint(0, 260, (2, 20), generator=torch.Generator().manual_seed(5))
    traced = model(x, trace=True).traces["exit_depth"]
    assert set(traced.flatten().tolist()) <= {2, L}
