"""KV-cached decoding against full forward passes, batched left-padded prompts, and sampling rules."""

from __future__ import annotations

import math

import pytest
import torch

from condformer.cache import KVCache
from condformer.errors import CondformerError
from condformer.generation import SamplingConfig, generate, left_pad, sample_next
from condformer.model import build_model


@pytest.fixture
def model64(tiny_cfg):
    """A float64 decoder with large enough weights that its next-token distributions are far from uniform."""
    torch.manual_seed(1234)
    return build_model(tiny_cfg(init_std=0.3)).double().eval()


def _naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(prompt):]


# -- cache --------------------------------------------------------------------------------------
@torch.no_grad()
def test_cached_decoding_matches_full_forward(model64):
    B, T, P = 2, 20, 7
    tokens = torch.randint(0, 260, (B, T))
    full = model64(tokens).logits
    cache = KVCache.for_model(model64, B, T)
    assert cache.layers[0].k.dtype == torch.float64
    out = model64(tokens[:, :P], cache=cache)
    torch.testing.assert_close(out.logits, full[:, :P], rtol=0, atol=1e-10)
    for t in range(P, T):
        out = model64(tokens[:, t:t + 1], positions_BT=torch.full((B, 1), t), cache=cache)
        torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=0, atol=1e-10)
    assert all(layer.length == T for layer in cache.layers)
    with pytest.raises(RuntimeError, match="full"):
        model64(tokens[:, :1], positions_BT=torch.full((B, 1), T), cache=cache)


@torch.no_grad()
def test_chunked_prefill_matches_full_forward(model64):
    B, T, split = 2, 21, 9
    tokens = torch.randint(0, 260, (B, T))
    full = model64(tokens).logits
    cache = KVCache.for_model(model64, B, T)
    first = model64(tokens[:, :split], positions_BT=torch.arange(split).expand(B, split), cache=cache)
    second = model64(tokens[:, split:T - 1], positions_BT=torch.arange(split, T - 1).expand(B, T - 1 - split),
                     cache=cache)
    last = model64(tokens[:, T - 1:], positions_BT=torch.full((B, 1), T - 1), cache=cache)
    torch.testing.assert_close(torch.cat([first.logits, second.logits, last.logits], dim=1), full,
                               rtol=0, atol=1e-10)


def test_cache_needs_a_decoder(tiny_cfg):
    model = build_model(tiny_cfg(kind="encoder"))
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, dtype=torch.long), cache=KVCache.for_model(model, 1, 3))


# -- batched, left-padded prompts ---------------------------------------------------------------
def test_left_pad_layout():
    tokens, positions, valid = left_pad([[5, 6, 7], [9]], pad_id=3, device=torch.device("cpu"))
    assert tokens.tolist() == [[5, 6, 7], [3, 3, 9]]
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    assert positions[valid].tolist() == [0, 1, 2, 0]


@torch.no_grad()
def test_padded_batch_matches_each_prompt_alone(model64):
    prompts = [torch.randint(0, 260, (n,)).tolist() for n in (5, 9, 1, 6)]
    tokens, positions, valid = left_pad(prompts, pad_id=0, device=torch.device("cpu"))
    out = model64(tokens, positions_BT=positions, valid_BT=valid)
    assert torch.isfinite(out.logits).all()
    for i, p in enumerate(prompts):
        alone = model64(torch.tensor([p])).logits[0]
        n = len(p)
        torch.testing.assert_close(out.logits[i, -n:], alone, rtol=0, atol=1e-10)
    # the pad id does not matter
    tokens2, _, _ = left_pad(prompts, pad_id=77, device=torch.device("cpu"))
    out2 = model64(tokens2, positions_BT=positions, valid_BT=valid)
    torch.testing.assert_close(out2.logits[valid], out.logits[valid], rtol=0, atol=1e-12)


def test_generate_same_tokens_alone_and_in_padded_batch(model64):
    prompts = [torch.randint(0, 260, (n,)).tolist() for n in (4, 11, 2)]
    greedy = SamplingConfig(max_new_tokens=12, greedy=True)
    batched = generate(model64, prompts, greedy)
    for p, row in zip(prompts, batched, strict=True):
        assert generate(model64, [p], greedy) == [row]
        assert row == _naive_greedy(model64, p, 12)


def test_greedy_generate_matches_naive_loop(model64):
    prompt = torch.randint(0, 260, (6,)).tolist()
    got = generate(model64, [prompt], SamplingConfig(max_new_tokens=15, greedy=True))
    expected = _naive_greedy(model64, prompt, 15)
    assert got == [expected]
    assert len(set(expected)) > 1  # the model is not degenerate, so the comparison means something


def test_generate_float32_model_runs_and_restores_mode(tiny_cfg):
    model = build_model(tiny_cfg())
    model.train()
    seen = []
    out = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=5, greedy=True), on_tokens=seen.append)
    assert model.training
    assert len(out[0]) == 5 and all(0 <= t < 260 for t in out[0])
    assert [int(t[0]) for t in seen] == out[0]


def test_eos_stops_and_cuts(model64):
    prompts = [torch.randint(0, 260, (5,)).tolist(), torch.randint(0, 260, (3,)).tolist()]
    full = generate(model64, prompts, SamplingConfig(max_new_tokens=10, greedy=True))
    eos = full[0][3]
    cut = generate(model64, prompts, SamplingConfig(max_new_tokens=10, greedy=True, eos_id=eos))
    for row, ref in zip(cut, full, strict=True):
        expected = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert row == expected


def test_max_seq_len_boundary(tiny_cfg):
    model = build_model(tiny_cfg(max_seq_len=12))
    prompt = [1, 2, 3, 4]
    out = generate(model, [prompt], SamplingConfig(max_new_tokens=8, greedy=True))  # 4 + 8 == max_seq_len
    assert len(out[0]) == 8
    with pytest.raises(CondformerError):
        generate(model, [prompt], SamplingConfig(max_new_tokens=9, greedy=True))


# -- sampling -----------------------------------------------------------------------------------
def test_sampling_is_reproducible_with_a_seeded_generator(model64):
    prompts = [[5, 6, 7], [8]]
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.5)
    a = generate(model64, prompts, cfg, generator=torch.Generator().manual_seed(7))
    b = generate(model64, prompts, cfg, generator=torch.Generator().manual_seed(7))
    c = generate(model64, prompts, cfg, generator=torch.Generator().manual_seed(8))
    assert a == b
    assert a != c


def test_top_k_one_and_tiny_top_p_equal_greedy(model64):
    prompts = [torch.randint(0, 260, (n,)).tolist() for n in (3, 7)]
    greedy = generate(model64, prompts, SamplingConfig(max_new_tokens=10, greedy=True))
    g = torch.Generator().manual_seed(0)
    assert generate(model64, prompts, SamplingConfig(max_new_tokens=10, top_k=1, temperature=2.0), generator=g) \
        == greedy
    assert generate(model64, prompts, SamplingConfig(max_new_tokens=10, top_p=1e-6, temperature=2.0),
                    generator=g) == greedy


def _frequencies(tokens: torch.Tensor, V: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=V).double() / tokens.numel()


def test_samples_follow_temperature_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    N = 20000
    cfg = SamplingConfig(temperature=0.7)
    got = sample_next(logits.expand(N, 5), cfg, torch.Generator().manual_seed(0))
    z = [math.exp(v / 0.7) for v in logits[0].tolist()]
    expected = torch.tensor([v / sum(z) for v in z], dtype=torch.float64)
    torch.testing.assert_close(_frequencies(got, 5), expected, rtol=0, atol=0.015)


def test_sampled_tokens_stay_in_top_k():
    V, k, N = 50, 5, 4000
    logits = torch.randn(3, V) * 2
    rows = logits.repeat_interleave(N, dim=0)
    got = sample_next(rows, SamplingConfig(top_k=k), torch.Generator().manual_seed(0)).view(3, N)
    for r in range(3):
        top = set(logits[r].topk(k).indices.tolist())
        drawn = set(got[r].tolist())
        assert drawn <= top
        # and the renormalised top-k distribution is what is sampled
        p = logits[r].double().softmax(-1)
        idx = sorted(top)
        expected = p[idx] / p[idx].sum()
        torch.testing.assert_close(_frequencies(got[r], V)[idx], expected, rtol=0, atol=0.03)


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.8, 0.9, 0.97, 1.0])
def test_top_p_keeps_smallest_prefix_reaching_p(top_p):
    probs = [0.05, 0.4, 0.1, 0.25, 0.2]  # sorted: 0.4, 0.25, 0.2, 0.1, 0.05 -> mass 0.4, 0.65, 0.85, 0.95, 1.0
    order = sorted(range(5), key=lambda i: -probs[i])
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i]
        if mass >= top_p:
            break
    logits = torch.tensor([[math.log(p) for p in probs]])
    N = 20000
    got = sample_next(logits.expand(N, 5), SamplingConfig(top_p=top_p), torch.Generator().manual_seed(1))
    assert set(got.tolist()) == set(kept)
    expected = torch.zeros(5, dtype=torch.float64)
    for i in kept:
        expected[i] = probs[i] / sum(probs[j] for j in kept)
    torch.testing.assert_close(_frequencies(got, 5), expected, rtol=0, atol=0.015)


def test_greedy_sample_next_is_argmax():
    logits = torch.randn(6, 40)
    got = sample_next(logits, SamplingConfig(greedy=True, temperature=0.0), None)
    assert got.tolist() == logits.argmax(-1).tolist()


# -- errors -------------------------------------------------------------------------------------
def _one_line_error(fn) -> str:
    with pytest.raises(CondformerError) as err:
        fn()
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_generation_errors(tiny_cfg, model64):
    ok = SamplingConfig(max_new_tokens=5)
    assert "max_seq_len" in _one_line_error(
        lambda: generate(model64, [[1] * 60], SamplingConfig(max_new_tokens=5, greedy=True)))
    encoder = build_model(tiny_cfg(kind="encoder"))
    assert "encoder" in _one_line_error(lambda: generate(encoder, [[1, 2]], ok))
    _one_line_error(lambda: generate(model64, [[]], ok))
    _one_line_error(lambda: generate(model64, [[1, 2], []], ok))
    _one_line_error(lambda: generate(model64, [], ok))


@pytest.mark.parametrize("bad", [
    {"temperature": 0.0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": 0},
    {"max_new_tokens": 0},
])
def test_bad_sampling_config(model64, bad):
    cfg = SamplingConfig(**{"max_new_tokens": 3, **bad})
    msg = _one_line_error(lambda: generate(model64, [[1, 2]], cfg))
    assert next(iter(bad)) in msg


def test_a_monotonic_cache_skips_the_mask_only_when_nothing_needs_it():
    """A decoding loop's cache promises every query comes after every entry: one new token then attends
    without a mask, with the same logits as the masked path; an invalid entry (padding) brings the mask back."""
    from condformer.config import ModelConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=32)).double().eval()
    x = torch.randint(0, 64, (1, 12))
    logits = {}
    for monotonic in (False, True):
        cache = KVCache.for_model(model, 1, 12, monotonic=monotonic)
        assert cache.layers[0].needs_mask is not monotonic
        with torch.no_grad():
            model(x[:, :8], cache=cache)
            logits[monotonic] = torch.cat([model(x[:, t:t + 1], positions_BT=torch.tensor([[t]]), cache=cache).logits
                                           for t in range(8, 12)], dim=1)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(logits[True], model(x).logits[:, 8:], rtol=1e-10, atol=1e-10)
    padded = KVCache.for_model(model, 1, 12, monotonic=True)
    padded.layers[0].append(torch.zeros(1, 2, 1, 8, dtype=torch.float64), torch.zeros(1, 2, 1, 8, dtype=torch.float64),
                            torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.bool))
    assert padded.layers[0].needs_mask and not padded.layers[1].needs_mask
