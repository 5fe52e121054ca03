"""Self-speculative decoding (LayerSkip): draft with the first E layers, verify with all of them.

Greedy: the output is the full model's own greedy output, token for token, whatever E and the draft length.
Sampling: every emitted token has the full model's sampling distribution (the speculative sampling rule).
Rejected drafts leave nothing in the cache.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from condformer.cache import KVCache, LayerKV
from condformer.config import ExitConfig, LayerSpec, ModelConfig
from condformer.errors import CondformerError
from condformer.generation import SamplingConfig, generate
from condformer.generation.speculative import accept_sampled
from condformer.model import build_model
from helpers import naive_greedy, one_line_error

L = 4
V = 260
ATOL = 1e-9
MOD = LayerSpec(router="mod", options={"capacity": 0.5, "causal_router": "predictor"})
MODELS = {"dense": None, "mod": [LayerSpec(), MOD]}
PROMPTS = [[5, 17, 99, 3, 250, 41], [200, 8, 64], [7]]


def make_model(layers: list[LayerSpec] | None = None, seed: int = 0, n_layers: int = L, vocab_size: int = V,
               exit_layers: list[int] | None = None, **exit_kw) -> nn.Module:
    """A float64 model with exits whose random weights are perturbed, so drafts are often wrong."""
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=n_layers, n_heads=2, max_seq_len=64, vocab_size=vocab_size,
                      layers=layers or [LayerSpec()], exits=ExitConfig(layers=exit_layers, **exit_kw))
    model = build_model(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def greedy(n: int, eos_id: int | None = None) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, greedy=True, eos_id=eos_id)


def check_stats(stats: dict, out: list[list[int]], n_prompts: int, max_draft: int, eos: bool = False) -> None:
    """The acceptance counts agree with each other and with the output."""
    drafted, accepted, rounds = stats["drafted"], stats["accepted"], stats["rounds"]
    assert 0 <= accepted <= drafted <= max_draft * rounds
    total = sum(len(row) for row in out)
    if drafted:
        assert stats["acceptance_rate"] == pytest.approx(accepted / drafted)
    else:
        assert stats["acceptance_rate"] is None
    if rounds:
        # tokens the rounds emitted: each prompt's first new token comes from the prefill
        assert stats["tokens_per_round"] * rounds == pytest.approx(total - n_prompts)
    else:
        assert stats["tokens_per_round"] is None
    # each prompt's first token comes from the prefill; each round emits its accepted drafts and one more
    # token (fewer only when an eos ends the sequence inside the round)
    if eos:
        assert total <= accepted + rounds + n_prompts
    else:
        assert total == accepted + rounds + n_prompts


# -- greedy: exactly the full model's output ------------------------------------------------------------
GRIDS = {  # (E, K, N): every combination on the dense model; a cheaper subset on the MoD one
    "dense": list(itertools.product((1, 2, 3), (1, 2, 3, 4, 5), (1, 2, 7, 20))),
    "mod": list(itertools.product((1, 2, 3), (1, 3, 5), (1, 2, 7))) + [(E, K, 20) for E, K in ((1, 2), (2, 4), (3, 5))],
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_greedy_speculative_is_the_full_models_greedy_output(kind):
    model = make_model(MODELS[kind])
    ref = generate(model, PROMPTS, greedy(20))
    if kind == "dense":
        assert ref == [naive_greedy(model, p, 20) for p in PROMPTS]
    assert len({t for row in ref for t in row}) > 5  # not degenerate
    rates = []
    for E, K, N in GRIDS[kind]:
        stats: dict = {}
        out = generate(model, PROMPTS, greedy(N), speculative=E, draft_tokens=K, stats=stats)
        assert out == [row[:N] for row in ref], (E, K, N)
        check_stats(stats, out, len(PROMPTS), K)
        if N == 1:
            assert stats["rounds"] == 0
        if N == 20:
            rates.append(stats["acceptance_rate"])
    assert min(rates) > 0 and max(rates) < 1  # both accepted and rejected drafts were exercised


@pytest.mark.parametrize("variant", [
    dict(head="separate"),
    dict(exit_layers=[1], layers=[LayerSpec(block="sasp"), LayerSpec(block="parallel", ffn="moe",
                                                                     options={"experts": 4, "top_k": 2})]),
], ids=["separate_heads", "exit_after_layer_1_sasp_parallel_moe"])
def test_greedy_speculative_other_architectures(variant):
    model = make_model(**variant, seed=1)
    ref = generate(model, PROMPTS, greedy(12))
    assert len({t for row in ref for t in row}) > 3
    for E in [layer + 1 for layer in model.exits.exit_layers[:-1]]:
        for K in (1, 4):
            stats: dict = {}
            assert generate(model, PROMPTS, greedy(12), speculative=E, draft_tokens=K, stats=stats) == ref
            check_stats(stats, ref, len(PROMPTS), K)


def test_greedy_speculative_with_eos_stops_like_plain_generate():
    model = make_model()
    ref = generate(model, PROMPTS, greedy(20))
    for eos, EKs in ((ref[0][4], ((1, 1), (2, 4), (3, 5))), (ref[1][0], ((1, 5), (2, 2), (3, 1)))):
        want = generate(model, PROMPTS, greedy(20, eos))
        assert any(len(row) < 20 for row in want)
        for E, K in EKs:
            stats: dict = {}
            assert generate(model, PROMPTS, greedy(20, eos), speculative=E, draft_tokens=K, stats=stats) == want
            check_stats(stats, want, len(PROMPTS), K, eos=True)


def near_model(E: int, scale: float) -> nn.Module:
    """Layers E.. scaled by ``scale`` (0: identities) and exit E-1's norm = the final norm: the draft after
    layer E is then the full model's prediction exactly (scale 0) or often (small scale)."""
    model = make_model(seed=2)
    with torch.no_grad():
        for layer in model.layers[E:]:
            layer.block.attn.out.weight.mul_(scale)
            layer.block.ffn.down.weight.mul_(scale)
        model.exits.norms[E - 1].weight.copy_(model.final_norm.weight)
    return model


@pytest.mark.parametrize("E", [1, 2, 3])
def test_perfect_drafts_are_all_accepted(E):
    model = near_model(E, 0.0)
    N, K = 20, 4
    ref = generate(model, PROMPTS, greedy(N))
    assert len({t for row in ref for t in row}) > 5
    stats: dict = {}
    assert generate(model, PROMPTS, greedy(N), speculative=E, draft_tokens=K, stats=stats) == ref
    assert stats["acceptance_rate"] == 1.0
    assert stats["rounds"] == len(PROMPTS) * math.ceil((N - 1) / (K + 1))
    assert stats["accepted"] == stats["drafted"] == len(PROMPTS) * (N - 1) - stats["rounds"]
    check_stats(stats, ref, len(PROMPTS), K)


def test_good_drafts_are_partly_accepted_and_the_output_is_unchanged():
    model = near_model(2, 0.3)
    ref = generate(model, PROMPTS, greedy(20))
    for K in (2, 5):
        stats: dict = {}
        assert generate(model, PROMPTS, greedy(20), speculative=2, draft_tokens=K, stats=stats) == ref
        assert 0.3 < stats["acceptance_rate"] < 1
        check_stats(stats, ref, len(PROMPTS), K)


@contextlib.contextmanager
def captured_caches() -> Iterator[list[KVCache]]:
    """Every KV cache the decoders create while the block runs, in order."""
    caches: list[KVCache] = []
    for_model = KVCache.for_model

    def capture(model_, batch, capacity, **kw):
        cache = for_model(model_, batch, capacity, **kw)
        caches.append(cache)
        return cache

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KVCache, "for_model", staticmethod(capture))
        yield caches


# -- the cache after speculative decoding holds exactly the accepted tokens -----------------------------
@pytest.mark.parametrize("kind", list(MODELS))
@torch.no_grad()
def test_cache_after_speculative_decoding_equals_a_prefill_of_the_output(kind):
    model = make_model(MODELS[kind])
    for_model = KVCache.for_model
    N = 15
    for prompt in PROMPTS:
        with captured_caches() as caches:
            stats: dict = {}
            (out,) = generate(model, [prompt], greedy(N), speculative=2, draft_tokens=3, stats=stats)
        assert len(caches) == 1 and stats["drafted"] > stats["accepted"]  # some drafts were rejected
        # every token but the last generated one was fed; a prefill of them gives the reference cache
        seq = prompt + out[:-1]
        ref = for_model(model, 1, len(seq))
        model(torch.tensor([seq]), cache=ref)
        for got, want in zip(caches[0].layers, ref.layers, strict=True):
            n = want.length
            assert got.length == n
            assert torch.equal(got.pos[:, :n], want.pos[:, :n])
            assert torch.equal(got.valid[:, :n], want.valid[:, :n])
            torch.testing.assert_close(got.k[:, :, :n], want.k[:, :, :n], rtol=0, atol=ATOL)
            torch.testing.assert_close(got.v[:, :, :n], want.v[:, :, :n], rtol=0, atol=ATOL)
        if kind == "dense":
            assert all(kv.pos[0, : kv.length].tolist() == list(range(len(seq))) for kv in caches[0].layers)
        else:  # the MoD layers (1 and 3) hold only the routed tokens
            assert min(kv.length for kv in caches[0].layers[1::2]) < len(seq)


def test_truncate_after_drops_later_entries_per_layer():
    def entries(n_pos: list[int], fill: float) -> tuple[torch.Tensor, ...]:
        T = len(n_pos)
        k = torch.full((1, 2, T, 4), fill)
        return k, k + 100, torch.tensor([n_pos]), None

    cache = KVCache(2, 1, 2, 4, 16)
    cache.layers[0].append(*entries([0, 1, 2, 3, 4, 5], 1.0))
    cache.layers[1].append(*entries([0, 2, 5], 2.0))  # a routed layer: a subset of positions
    cache.layers[1].append(*entries([6, 8], 3.0))
    cache.truncate_after(4)
    assert [kv.length for kv in cache.layers] == [5, 2]
    assert cache.layers[0].pos[0, :5].tolist() == [0, 1, 2, 3, 4]
    assert cache.layers[1].pos[0, :2].tolist() == [0, 2]
    cache.truncate_after(10)  # nothing after 10: unchanged
    assert [kv.length for kv in cache.layers] == [5, 2]
    # new entries overwrite the dropped ones
    k, v, pos, valid = cache.layers[1].append(*entries([4], 9.0))
    assert pos[0].tolist() == [0, 2, 4]
    assert k[0, 0, :, 0].tolist() == [2.0, 2.0, 9.0] and v[0, 0, :, 0].tolist() == [102.0, 102.0, 109.0]
    assert valid.all()
    cache.truncate_after(-1)
    assert [kv.length for kv in cache.layers] == [0, 0]
    two_rows = LayerKV(2, 2, 4, 8, torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="one sequence"):
        two_rows.truncate_after(3)
    with pytest.raises(RuntimeError):
        KVCache(1, 3, 2, 4, 8).truncate_after(0)


# -- the speculative sampling rule ----------------------------------------------------------------------
P = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25], [0.4, 0.1, 0.1, 0.2, 0.2]], dtype=torch.float64)
Q = torch.tensor([[0.3, 0.3, 0.1, 0.2, 0.1], [0.05, 0.25, 0.3, 0.2, 0.2]], dtype=torch.float64)
P_BONUS = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.2], dtype=torch.float64)


def assert_frequencies(samples: list[int], p: torch.Tensor, sigmas: float = 4.0) -> None:
    n = len(samples)
    assert n > 1000
    freq = torch.bincount(torch.tensor(samples), minlength=p.numel()).double() / n
    tol = sigmas * (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= tol).all(), (freq.tolist(), p.tolist())


def test_accept_sampled_emits_the_target_distribution():
    """Drafts from q, the rule's output: the first token ~ p[0], the second (given the first draft kept) ~ p[1],
    and the bonus after every draft was kept ~ p_bonus; draft j is kept with probability sum_x min(p_j, q_j)."""
    n = 20000
    g = torch.Generator().manual_seed(0)
    drafts = torch.stack([torch.multinomial(Q[j], n, replacement=True, generator=g) for j in range(2)], dim=1)
    first, second, bonus, kept = [], [], [], [0, 0]
    for i in range(n):
        d = drafts[i]
        j, tok = accept_sampled(P, Q, d, P_BONUS, g)
        assert 0 <= j <= 2 and 0 <= tok < 5
        emitted = [*d[:j].tolist(), tok]
        first.append(emitted[0])
        kept[0] += j >= 1
        if j >= 1:
            second.append(emitted[1])
            kept[1] += j == 2
        if j == 2:
            bonus.append(tok)
    assert_frequencies(first, P[0])
    assert_frequencies(second, P[1])
    assert_frequencies(bonus, P_BONUS)
    for j, (n_tried, n_kept) in enumerate(((n, kept[0]), (len(second), kept[1]))):
        alpha = float(torch.minimum(P[j], Q[j]).sum())
        assert abs(n_kept / n_tried - alpha) <= 4 * math.sqrt(alpha * (1 - alpha) / n_tried)


def test_accept_sampled_edge_cases():
    g = torch.Generator().manual_seed(1)
    # p == q: every draft is kept (ratio 1), the token after them is the bonus
    for _ in range(50):
        assert accept_sampled(P, P, torch.tensor([2, 0]), torch.tensor([0.0, 0, 0, 1, 0]), g) == (2, 3)
    # a draft p gives no mass is always rejected and replaced from norm(max(0, p - q))
    p = torch.tensor([[0.0, 0.5, 0.5]])
    q = torch.tensor([[0.5, 0.5, 0.0]])
    for _ in range(50):
        assert accept_sampled(p, q, torch.tensor([0]), torch.tensor([1.0, 0, 0]), g) == (0, 2)
    # no drafts: the bonus token alone
    assert accept_sampled(P[:0], Q[:0], torch.tensor([], dtype=torch.long), torch.tensor([0.0, 1, 0]), g) == (0, 1)


def test_sampling_end_to_end_is_seeded_and_well_formed():
    model = make_model([LayerSpec(), MOD])
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.3, top_k=40)

    def run(seed: int, E: int = 2, **kw) -> list[list[int]]:
        stats: dict = {}
        out = generate(model, PROMPTS, cfg, speculative=E, draft_tokens=3, stats=stats,
                       generator=torch.Generator().manual_seed(seed), **kw)
        check_stats(stats, out, len(PROMPTS), 3)
        return out

    a = run(7)
    assert [len(row) for row in a] == [12] * len(PROMPTS)
    assert all(0 <= t < V for row in a for t in row)
    assert run(7) == a
    assert run(8) != a
    streamed: list[int] = []
    (row,) = generate(model, [PROMPTS[0]], cfg, speculative=1, draft_tokens=4,
                      generator=torch.Generator().manual_seed(3), on_tokens=lambda t: streamed.extend(t.tolist()))
    assert streamed == row and len(row) == 12
    # an eos ends the sequence where it is first sampled
    eos = a[0][5]
    cut = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=1.3, top_k=40, eos_id=eos),
                   speculative=2, draft_tokens=3, generator=torch.Generator().manual_seed(7))
    for r in cut:
        assert eos not in r[:-1] and (r[-1] == eos or len(r) == 12)


@pytest.mark.parametrize("batch", [1, 10])
@torch.no_grad()
def test_sampled_sequences_follow_the_full_models_distribution(batch):
    """On a 3-token vocabulary, the joint distribution of 3 generated tokens equals the full model's (chi^2),
    for one prompt at a time and for the rows of a batch (each row accepts on its own)."""
    model = make_model(n_layers=2, vocab_size=3, seed=4)
    prompt, temperature = [1, 2, 0], 1.5
    seqs = torch.tensor([prompt + [a, b] for a in range(3) for b in range(3)])
    probs = (model(seqs).logits[:, -3:] / temperature).softmax(dim=-1)  # (9, 3 positions, 3)
    expected = torch.zeros(3, 3, 3, dtype=torch.float64)
    for a, b, c in itertools.product(range(3), repeat=3):
        row = 3 * a + b
        expected[a, b, c] = probs[row, 0, a] * probs[row, 1, b] * probs[row, 2, c]
    assert float(expected.sum()) == pytest.approx(1.0)
    n = 700
    assert float(expected.min()) * n > 5
    counts = torch.zeros(3, 3, 3, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(max_new_tokens=3, temperature=temperature)
    drafted = accepted = 0
    for _ in range(n // batch):
        stats: dict = {}
        for out in generate(model, [prompt] * batch, cfg, speculative=1, draft_tokens=2, generator=g, stats=stats):
            counts[tuple(out)] += 1
        drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
    assert 0 < accepted < drafted  # both branches of the rule ran
    chi2 = float(((counts - n * expected) ** 2 / (n * expected)).sum())
    dof = expected.numel() - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), chi2


# -- errors ---------------------------------------------------------------------------------------------
def test_speculative_errors():
    model = make_model()
    ok = greedy(5)
    plain = build_model(ModelConfig(d_model=32, n_layers=L, n_heads=2, max_seq_len=64))
    assert "exit" in one_line_error(lambda: generate(plain, [[1, 2]], ok, speculative=1), CondformerError)
    for E in (0, L, L + 1, -1, True, 1.5):
        one_line_error(lambda E=E: generate(model, [[1, 2]], ok, speculative=E), CondformerError)
    only_1 = make_model(exit_layers=[1])  # exits after layers 1 and 3: E = 2 only
    assert "2" in one_line_error(lambda: generate(only_1, [[1, 2]], ok, speculative=1), CondformerError)
    one_line_error(lambda: generate(only_1, [[1, 2]], ok, speculative=3), CondformerError)
    assert len(generate(only_1, [[1, 2]], ok, speculative=2)[0]) == 5
    for K in (0, -2, 1.0, True):
        msg = one_line_error(lambda K=K: generate(model, [[1, 2]], ok, speculative=1, draft_tokens=K),
                             CondformerError)
        assert "draft_tokens" in msg
    assert "max_seq_len" in one_line_error(
        lambda: generate(model, [[1] * 60], greedy(5), speculative=1), CondformerError)
    assert len(generate(model, [[1] * 59], greedy(5), speculative=1, draft_tokens=5)[0]) == 5  # 59 + 5 == 64
    one_line_error(lambda: generate(model, [[]], ok, speculative=1), CondformerError)
    one_line_error(lambda: generate(model, [], ok, speculative=1), CondformerError)
    one_line_error(lambda: generate(model, [[1], [2]], ok, speculative=1, on_tokens=print), CondformerError)
    one_line_error(lambda: generate(model, [[1]], greedy(0), speculative=1), CondformerError)


def test_exit_and_speculative_decoding_run_under_bf16_autocast() -> None:
    """The GPU recipe (bf16 autocast over fp32 weights), here on CPU: caches take the autocast dtype, confidences
    are computed in float32, and both decoders produce full-length, in-vocabulary outputs."""
    from condformer.config import ExitConfig, ModelConfig
    from condformer.model import build_model
    from condformer.routing.early_exit import set_exit_thresholds

    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_layers=4, n_heads=2, max_seq_len=64, exits=ExitConfig())).eval()
    prompts = [[5, 17, 99, 3], [7, 8]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        set_exit_thresholds(model, [0.004, None, 0.0041])
        stats: dict = {}
        out = generate(model, prompts, SamplingConfig(max_new_tokens=12, greedy=True), stats=stats)
        assert [len(o) for o in out] == [12, 12] and all(0 <= t < 260 for o in out for t in o)
        assert len(stats["exit_depths"]) == 2 * 11 and set(stats["exit_depths"]) <= {1, 3, 4}
        set_exit_thresholds(model, None)
        spec = generate(model, prompts, SamplingConfig(max_new_tokens=12, greedy=True), speculative=2)
        assert [len(o) for o in spec] == [12, 12] and all(0 <= t < 260 for o in spec for t in o)


# -- batches: every row accepts its own number of drafts ------------------------------------------------
BATCH = [[5, 17, 99, 3, 250, 41], [200, 8, 64], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42, 42], [100, 3, 9, 77],
         [13], [250, 249, 248, 1, 0]]


@pytest.mark.parametrize("kind", list(MODELS))
def test_batched_greedy_speculation_equals_each_rows_greedy_output(kind):
    """Left-padded prompts of 1-9 tokens, decoded together: each row's output is its own greedy output (and
    what the row gets decoded alone), with per-row counts that add up."""
    model = make_model(MODELS[kind])
    N = 12
    per_row = [naive_greedy(model, p, N) for p in BATCH]
    for E, K in ((1, 3), (2, 1), (3, 5)):
        stats: dict = {}
        out = generate(model, BATCH, greedy(N), speculative=E, draft_tokens=K, stats=stats)
        assert out == per_row, (E, K)
        check_stats(stats, out, len(BATCH), K)
        assert stats["passes"] < stats["rounds"]  # rows shared verification passes
        alone = [generate(model, [p], greedy(N), speculative=E, draft_tokens=K)[0] for p in BATCH]
        assert alone == per_row
    assert 0 < stats["acceptance_rate"] < 1


def test_batched_speculation_with_eos_and_rows_that_finish_early():
    model = make_model()
    ref = generate(model, BATCH, greedy(16))
    eos = ref[2][3]
    want = [naive_greedy(model, p, 16) for p in BATCH]
    want = [row[: row.index(eos) + 1] if eos in row else row for row in want]
    assert any(len(row) < 16 for row in want) and any(len(row) == 16 for row in want)
    stats: dict = {}
    assert generate(model, BATCH, greedy(16, eos), speculative=2, draft_tokens=4, stats=stats) == want
    check_stats(stats, want, len(BATCH), 4, eos=True)


def test_batched_speculation_near_a_learned_position_tables_end():
    """Rows reach max_seq_len at different rounds; drafts past a row's budget must not index past the table."""
    torch.manual_seed(3)
    cfg = ModelConfig(d_model=32, n_layers=L, n_heads=2, max_seq_len=24, vocab_size=V, positions="learned",
                      exits=ExitConfig())
    model = build_model(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prompts = [[1] * 20, [3, 4], [9] * 12]
    N = 4  # the longest prompt + N == max_seq_len
    want = [naive_greedy(model, p, N) for p in prompts]
    assert generate(model, prompts, greedy(N), speculative=2, draft_tokens=5) == want


@torch.no_grad()
def test_batched_cache_keeps_exactly_each_rows_accepted_tokens():
    """After a batched run, each row's valid cache entries equal a prefill of that row's own tokens."""
    model = make_model()
    for_model = KVCache.for_model
    with captured_caches() as caches:
        stats: dict = {}
        out = generate(model, BATCH[:4], greedy(10), speculative=2, draft_tokens=3, stats=stats)
    assert stats["drafted"] > stats["accepted"]
    for b, prompt in enumerate(BATCH[:4]):
        seq = prompt + out[b][:-1]
        ref = for_model(model, 1, len(seq))
        model(torch.tensor([seq]), cache=ref)
        for got, want in zip(caches[0].layers, ref.layers, strict=True):
            keep = got.valid[b, : got.length]
            assert got.pos[b, : got.length][keep].tolist() == list(range(len(seq)))
            torch.testing.assert_close(got.k[b, :, : got.length][:, keep], want.k[0, :, : want.length], rtol=0,
                                       atol=ATOL)


def test_invalidate_after_masks_each_rows_later_entries():
    kv = LayerKV(2, 1, 2, 8, torch.device("cpu"), torch.float32)
    kv.append(torch.zeros(2, 1, 4, 2), torch.zeros(2, 1, 4, 2), torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]]),
              torch.tensor([[True, True, True, True], [False, True, True, True]]))
    kv.invalidate_after(torch.tensor([1, 2]))
    assert kv.valid[:, :4].tolist() == [[True, True, False, False], [False, True, True, True]]
    assert kv.length == 4 and kv.needs_mask


def test_batched_sampling_runs_per_row_and_is_seeded():
    model = make_model([LayerSpec(), MOD])
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.2)

    def run(seed: int) -> list[list[int]]:
        stats: dict = {}
        out = generate(model, BATCH, cfg, speculative=2, draft_tokens=3, stats=stats,
                       generator=torch.Generator().manual_seed(seed))
        check_stats(stats, out, len(BATCH), 3)
        return out

    a = run(5)
    assert [len(row) for row in a] == [10] * len(BATCH) and all(0 <= t < V for row in a for t in row)
    assert run(5) == a and run(6) != a


# -- adaptive drafting: the draft stops below an exit confidence ----------------------------------------
@pytest.mark.parametrize("kind", list(MODELS))
def test_adaptive_drafting_keeps_the_full_models_greedy_output(kind):
    """Whatever the confidence threshold, one prompt or a left-padded batch: each row's own greedy output."""
    model = make_model(MODELS[kind])
    N = 14
    per_row = [naive_greedy(model, p, N) for p in BATCH]
    fixed: dict = {}
    generate(model, BATCH, greedy(N), speculative=1, draft_tokens=4, stats=fixed)
    drafted, rounds = [], []
    for c in (0.0, 0.05, 0.2, 0.6, 1.0):
        for E, K in ((1, 4), (2, 5)):
            stats: dict = {}
            out = generate(model, BATCH, greedy(N), speculative=E, draft_tokens=K, draft_confidence=c, stats=stats)
            assert out == per_row, (c, E, K)
            check_stats(stats, out, len(BATCH), K)
            alone = [generate(model, [p], greedy(N), speculative=E, draft_tokens=K, draft_confidence=c)[0]
                     for p in BATCH[:3]]
            assert alone == per_row[:3]
            if (E, K) == (1, 4):
                drafted.append(stats["drafted"] / stats["rounds"])
                rounds.append(stats["rounds"])
                if c == 0.0:  # never stops early: the fixed-length rounds exactly
                    assert {k: stats[k] for k in fixed} == fixed
    # c = 1 stops after one draft every round (fewer when a row's budget leaves none); in between it adapts
    assert drafted[-1] <= 1.0 < drafted[0] and rounds[-1] > rounds[0]
    assert drafted == sorted(drafted, reverse=True) and len(set(drafted)) >= 3


def test_adaptive_drafting_drafts_more_where_the_exit_is_right():
    """A model whose draft exit is the full model (layers past E are identities): confident drafts, all kept;
    the adaptive draft then runs to K where the exit is sure and stops where it is not."""
    model = near_model(2, 0.0)
    ref = generate(model, PROMPTS, greedy(20))
    stats: dict = {}
    assert generate(model, PROMPTS, greedy(20), speculative=2, draft_tokens=4, draft_confidence=0.3,
                    stats=stats) == ref
    assert stats["acceptance_rate"] == 1.0


def test_adaptive_sampling_runs_and_is_seeded():
    model = make_model()
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.9)
    runs = [generate(model, PROMPTS, cfg, speculative=1, draft_tokens=3, draft_confidence=0.2,
                     generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert runs[0] == runs[1] and all(len(r) == 10 for r in runs[0])


@pytest.mark.parametrize("bad", [-0.1, 1.5, "high", True])
def test_bad_draft_confidence_is_a_one_line_error(bad):
    model = make_model()
    msg = one_line_error(lambda: generate(model, PROMPTS, greedy(4), speculative=1, draft_confidence=bad),
                         CondformerError)
    assert "draft_confidence" in msg
    msg = one_line_error(lambda: generate(model, PROMPTS, greedy(4), draft_confidence=0.5), CondformerError)
    assert "speculative=E" in msg
