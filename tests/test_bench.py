"""The benchmark harness: result interface, timing protocol, contention detection, FLOPs and memory.

Models are tiny (d_model 32 vs 64, 2 layers) and measurements single iterations, so the file runs in
seconds; where the protocol itself is under test the timer and the /proc/stat reader are replaced by
fakes, which makes call order, retries and ratios exact instead of timing-dependent.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
from typing import Any

import pytest
import torch

from condformer import bench
from condformer.bench import (
    MODES,
    BenchConfig,
    format_bench,
    forward_flops,
    generate_flops,
    others_cpu_cores,
    parse_proc_stat,
    run_bench,
)
from condformer.config import ModelConfig
from condformer.errors import ConfigError
from condformer.flops import count_flops

SEQ, BATCH, NEW = 32, 2, 4


def small() -> ModelConfig:
    return ModelConfig(name="a32", d_model=32, n_layers=2, n_heads=2, max_seq_len=128)


def big() -> ModelConfig:
    return ModelConfig(name="b64", d_model=64, n_layers=2, n_heads=2, max_seq_len=128)


def fast(preset: Any, **kw: Any) -> BenchConfig:
    """A BenchConfig that measures each model a few times, one iteration per measurement."""
    args: dict[str, Any] = dict(seq_len=SEQ, batch_size=BATCH, repeats=3, warmup=1, min_time_s=0.0,
                                memory=False, new_tokens=NEW, max_retries=1)  # bounded on a busy machine
    args.update(kw)
    return BenchConfig(preset, **args)


MODEL_KEYS = {"preset": str, "median_s": float, "times_s": list, "tokens_per_s": float,
              "peak_memory_bytes": type(None), "forward_flops": int, "train_flops": int, "params": int,
              "flops_per_iter": int, "disturbed": int, "retries": int}
TOP_KEYS = {"mode", "seq_len", "batch_size", "device", "dtype", "repeats", "models", "time_ratio", "speedup",
            "paired_speedup",
            "flop_ratio", "ideal_speedup", "efficiency", "memory_ratio", "disturbed", "machine"}


def expected_flops(cfg: ModelConfig, mode: str) -> int:
    """FLOPs of one iteration, computed here without the bench's helpers."""
    if mode == "forward":
        return BATCH * count_flops(cfg, SEQ).forward_flops
    if mode == "train":
        return BATCH * count_flops(cfg, SEQ).train_flops
    # generate, dense model: prefill of P tokens, then NEW - 1 one-token steps at positions P..P+NEW-2,
    # each: QKV + output projections, attention over t+1 keys, the GELU MLP, and the head
    d, f, v, P = cfg.d_model, cfg.ffn_dim, cfg.vocab_size, SEQ - NEW
    steps = sum(cfg.n_layers * (2 * d * 3 * d + 2 * d * d + 4 * d * (t + 1) + 2 * 2 * d * f) + 2 * d * v
                for t in range(P, P + NEW - 1))
    return BATCH * (count_flops(cfg, P).forward_flops + steps)


# -- the result interface ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_result_keys_types_and_ratios(mode: str) -> None:
    r = run_bench(fast(small(), vs=big(), mode=mode), progress=False)
    assert json.loads(json.dumps(r)) == r  # JSON-able, no tensors or tuples
    assert set(r) >= TOP_KEYS
    assert (r["mode"], r["seq_len"], r["batch_size"], r["device"], r["dtype"], r["repeats"]) == (
        mode, SEQ, BATCH, "cpu", "fp32", 3)
    assert list(r["models"]) == ["a32", "b64"]
    for name, cfg in (("a32", small()), ("b64", big())):
        m = r["models"][name]
        for key, typ in MODEL_KEYS.items():
            assert isinstance(m[key], typ), (key, m[key])
        assert m["preset"] == name
        assert len(m["times_s"]) == 3 and all(t > 0 for t in m["times_s"])
        assert m["median_s"] == statistics.median(m["times_s"])
        tokens = BATCH * (NEW if mode == "generate" else SEQ)
        assert m["tokens_per_s"] == pytest.approx(tokens / m["median_s"])
        report = count_flops(cfg, SEQ)
        assert (m["forward_flops"], m["train_flops"], m["params"]) == (
            report.forward_flops, report.train_flops, report.params)
        assert m["flops_per_iter"] == expected_flops(cfg, mode)
    a, b = r["models"]["a32"], r["models"]["b64"]
    assert r["time_ratio"] == a["median_s"] / b["median_s"]
    assert r["speedup"] == b["median_s"] / a["median_s"]
    # paired: the median of the per-repeat ratios (A and B of a repeat are timed back to back)
    pairs = sorted(tb / ta for ta, tb in zip(a["times_s"], b["times_s"], strict=True))
    assert r["paired_speedup"] == pytest.approx(pairs[len(pairs) // 2] if len(pairs) % 2 else
                                                (pairs[len(pairs) // 2 - 1] + pairs[len(pairs) // 2]) / 2)
    assert r["flop_ratio"] == expected_flops(small(), mode) / expected_flops(big(), mode)
    assert 0.2 < r["flop_ratio"] < 0.5  # d=32 vs d=64: roughly a quarter of the work, plus the head
    assert r["ideal_speedup"] == pytest.approx(1 / r["flop_ratio"])
    assert r["efficiency"] == pytest.approx(r["speedup"] * r["flop_ratio"])
    assert r["memory_ratio"] is None and r["disturbed"] == a["disturbed"] + b["disturbed"]
    assert set(r["machine"]) == {"cpu", "threads", "torch"}
    text = format_bench(r)
    assert "A: a32" in text and "B: b64" in text
    assert f"time ratio A/B = {r['time_ratio']:.2f} (speedup {r['speedup']:.2f}x)" in text
    assert f"FLOP ratio {r['flop_ratio']:.2f}" in text and "disturbed measurements" in text


def test_model_against_itself_has_flop_ratio_one_and_distinct_names() -> None:
    r = run_bench(fast(small(), vs=small(), mode="forward", repeats=2), progress=False)
    assert list(r["models"]) == ["a32", "a32#2"]
    assert r["flop_ratio"] == 1.0 and r["ideal_speedup"] == 1.0
    assert r["models"]["a32#2"]["preset"] == "a32"


def test_without_baseline_ratios_are_none() -> None:
    r = run_bench(fast(small(), mode="forward", repeats=1), progress=False)
    assert list(r["models"]) == ["a32"]
    assert all(r[k] is None for k in ("time_ratio", "speedup", "flop_ratio", "ideal_speedup", "efficiency"))
    assert "time ratio" not in format_bench(r)


def test_both_models_get_the_same_seed_and_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[tuple[bench._Bench, torch.Tensor]] = []
    real_build = bench._build

    def spy(*args: Any, **kwargs: Any) -> bench._Bench:
        b = real_build(*args, **kwargs)
        built.append((b, args[5]))
        return b

    monkeypatch.setattr(bench.runner, "_build", spy)
    run_bench(fast(small(), vs=small(), mode="forward", repeats=1, warmup=0), progress=False)
    (a, tokens_a), (b, tokens_b) = built
    assert tokens_a is tokens_b
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


# -- timing protocol ---------------------------------------------------------------------------
def fake_timer(calls: list[str], times: dict[str, float]) -> Any:
    def time_op(b: bench._Bench, min_time_s: float) -> float:
        calls.append(b.name)
        return times[b.name]

    return time_op


def test_measurements_alternate_and_flip_order_each_round(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(bench.runner, "_time_op", fake_timer(calls, {"a32": 2.0, "b64": 1.0}))
    monkeypatch.setattr(bench.runner, "read_cpu_ticks", lambda: None)
    r = run_bench(fast(small(), vs=big(), mode="forward", repeats=4, warmup=0), progress=False)
    assert calls == ["a32", "b64", "b64", "a32", "a32", "b64", "b64", "a32"]
    assert r["models"]["a32"]["times_s"] == [2.0] * 4
    assert (r["time_ratio"], r["speedup"]) == (2.0, 0.5)


def test_time_op_runs_until_min_time_and_reports_per_iteration() -> None:
    calls = []
    b = bench._Bench("x", "x", small(), None, lambda: calls.append(1), lambda: None,  # type: ignore[arg-type]
                     torch.device("cpu"))
    assert bench._time_op(b, 0.0) > 0 and len(calls) == 1  # at least one iteration
    calls.clear()
    per_iter = bench._time_op(b, 0.02)
    assert len(calls) > 1 and per_iter * len(calls) >= 0.02


# -- contention detection ----------------------------------------------------------------------
class FakeStat:
    """A /proc/stat reader whose busy ticks jump by ``load`` during chosen measurement attempts."""

    def __init__(self, heavy: Any) -> None:
        self.heavy, self.busy, self.calls = heavy, 0, 0

    def __call__(self) -> tuple[int, int]:
        self.calls += 1
        attempt = (self.calls - 1) // 2  # two readings (before, after) per attempt
        if self.calls % 2 == 0 and self.heavy(attempt):
            self.busy += 10**9  # others kept millions of cores busy: unmistakably disturbed
        return self.busy, 10 * self.busy + self.calls


def test_a_disturbed_measurement_is_redone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(bench.runner, "_time_op", fake_timer(calls, {"a32": 1.0, "b64": 1.0}))
    monkeypatch.setattr(bench.runner, "read_cpu_ticks", FakeStat(lambda attempt: attempt == 0))
    r = run_bench(fast(small(), vs=big(), mode="forward", repeats=3, warmup=0, max_retries=3), progress=False)
    a, b = r["models"]["a32"], r["models"]["b64"]
    assert calls[:3] == ["a32", "a32", "b64"]  # the first measurement of A was taken again
    assert (a["retries"], b["retries"]) == (1, 0)
    assert r["disturbed"] == a["disturbed"] == b["disturbed"] == 0
    assert len(a["times_s"]) == 3 and a["others_cpu_median"] == 0.0


def test_persistent_load_flags_every_measurement_after_bounded_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(bench.runner, "_time_op", fake_timer(calls, {"a32": 1.0, "b64": 1.0}))
    monkeypatch.setattr(bench.runner, "read_cpu_ticks", FakeStat(lambda attempt: True))
    r = run_bench(fast(small(), vs=big(), mode="forward", repeats=3, warmup=0, max_retries=2), progress=False)
    for m in r["models"].values():
        assert m["disturbed"] == 3 and m["retries"] == 3 * 2
        assert len(m["times_s"]) == 3 and m["others_cpu_median"] > 1e3
    assert r["disturbed"] == 6 and len(calls) == 2 * 3 * (2 + 1)
    assert "6 disturbed measurements" in format_bench(r)


def test_unknown_cpu_load_disables_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.runner, "_time_op", fake_timer([], {"a32": 1.0}))
    monkeypatch.setattr(bench.runner, "read_cpu_ticks", lambda: None)
    m = run_bench(fast(small(), mode="forward", warmup=0), progress=False)["models"]["a32"]
    assert (m["others_cpu_median"], m["disturbed"], m["retries"]) == (None, 0, 0)


FAKE_STAT = """\
cpu  100 5 50 1000 20 3 2 7 11 0
cpu0 60 5 30 500 10 3 2 7 11 0
cpu1 40 0 20 500 10 0 0 0 0 0
intr 1234 0 0
ctxt 999
"""


def test_parse_proc_stat_by_hand() -> None:
    # aggregate: total = 100+5+50+1000+20+3+2+7 = 1187 (guest columns excluded); busy = 1187-1000-20
    assert parse_proc_stat(FAKE_STAT) == (167, 1187)
    # cpu1 alone: total = 40+0+20+500+10 = 570, busy = 570-500-10
    assert parse_proc_stat(FAKE_STAT, cpus={1}) == (60, 570)
    assert parse_proc_stat(FAKE_STAT, cpus={0, 1}) == (167, 1187)
    assert parse_proc_stat(FAKE_STAT, cpus={2}) is None  # a CPU we run on is not listed
    assert parse_proc_stat("intr 1 2 3\n") is None
    assert parse_proc_stat("") is None


def test_others_cpu_cores_by_hand() -> None:
    # 200 busy ticks of 10 ms = 2.0 s busy, 0.5 s of it ours, over 1 s of wall time: 1.5 other cores
    assert others_cpu_cores((100, 1000), (300, 1400), own_cpu_s=0.5, wall_s=1.0, tick_s=0.01) == 1.5
    assert others_cpu_cores((100, 1000), (110, 1100), own_cpu_s=0.5, wall_s=1.0, tick_s=0.01) == 0.0
    assert others_cpu_cores(None, (300, 1400), own_cpu_s=0.5, wall_s=1.0) is None
    assert others_cpu_cores((100, 1000), (300, 1400), own_cpu_s=0.5, wall_s=0.0) is None


def test_read_cpu_ticks_without_proc_stat(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setattr(bench.cpu, "PROC_STAT", str(tmp_path / "missing"))
    assert bench.read_cpu_ticks() is None


# -- FLOPs -------------------------------------------------------------------------------------
def test_forward_flops_matches_count_flops() -> None:
    for cfg in (small(), big()):
        for n in (1, 7, 64):
            assert forward_flops(cfg, n) == count_flops(cfg, n).forward_flops


def test_generate_flops_is_prefill_plus_exact_dense_decode_steps() -> None:
    cfg = small()
    assert generate_flops(cfg, SEQ - NEW, NEW) * BATCH == expected_flops(cfg, "generate")
    assert generate_flops(cfg, 10, 1) == count_flops(cfg, 10).forward_flops  # one new token: prefill only


# -- memory ------------------------------------------------------------------------------------
def test_peak_memory_in_a_subprocess_on_cpu() -> None:
    r = run_bench(fast(small(), mode="forward", repeats=1, warmup=0, memory=True), progress=False)
    peak = r["models"]["a32"]["peak_memory_bytes"]
    assert isinstance(peak, int) and peak >= 0, r["warnings"]
    assert r["warnings"] == []
    assert "peak MiB" in format_bench(r)


def test_memory_failure_is_a_warning_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(method: str) -> Any:
        raise OSError("no semaphores here")

    monkeypatch.setattr(multiprocessing, "get_context", broken)
    r = run_bench(fast(small(), mode="forward", repeats=1, warmup=0, memory=True), progress=False)
    assert r["models"]["a32"]["peak_memory_bytes"] is None
    assert len(r["warnings"]) == 1 and "no semaphores here" in r["warnings"][0]
    assert "warning:" in format_bench(r)


@pytest.mark.compile
@pytest.mark.parametrize("mode", ["train", "forward"])
def test_compile_flag_runs_both_models_compiled(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """--compile times the compiled modules (here with the cheap 'eager' dynamo backend) and says so."""
    compiled: list[torch.nn.Module] = []
    original = torch.compile

    def spy(model: torch.nn.Module) -> Any:
        compiled.append(model)
        return original(model, backend="eager")

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", spy)
    r = run_bench(fast(small(), vs=big(), mode=mode, compile=True), progress=False)
    assert r["compile"] is True and len(compiled) == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # dynamo traced both models
    plain = run_bench(fast(small(), mode=mode), progress=False)
    assert plain["compile"] is False and len(compiled) == 2


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(mode="sideways"), "unknown bench mode"),
    (dict(seq_len=256), "seq_len 256 exceeds model 'a32' max_seq_len 128"),
    (dict(mode="generate", seq_len=16, new_tokens=16), "new_tokens"),
    (dict(repeats=0), "repeats"),
    (dict(dtype="fp8"), "dtype"),
    (dict(min_time_s=-1.0), "min_time_s"),
    (dict(mode="generate", compile=True), "--compile applies to --mode train and forward"),
])
def test_bad_input_is_a_one_line_config_error(kw: dict[str, Any], match: str) -> None:
    args = dict(seq_len=SEQ, batch_size=BATCH, memory=False)
    args.update(kw)
    with pytest.raises(ConfigError, match=match) as e:
        run_bench(BenchConfig(small(), vs=big(), **args), progress=False)
    assert "\n" not in str(e.value)


def test_unknown_preset_and_encoder_generation_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown preset"):
        run_bench(BenchConfig("no-such-preset", memory=False), progress=False)
    enc = ModelConfig(name="enc", kind="encoder", d_model=32, n_layers=2, n_heads=2, max_seq_len=128)
    with pytest.raises(ConfigError, match="needs a decoder"):
        run_bench(fast(enc, mode="generate"), progress=False)


# -- routed models: config files, trained run directories, real text, routing statistics ----------
def small_mod(capacity: float = 0.25) -> ModelConfig:
    from condformer.config import LayerSpec, every_other

    return ModelConfig(name="m32", d_model=32, n_layers=2, n_heads=2, max_seq_len=128,
                       layers=every_other(LayerSpec(router="mod", options={"capacity": capacity})))


@pytest.mark.parametrize("mode", ["train", "forward"])
def test_routed_model_reports_its_routed_fraction(mode: str) -> None:
    # train and forward (default eval_routing "topk") time the static capacity, and say so
    r = run_bench(fast(small_mod(0.25), vs=small(), mode=mode, repeats=1), progress=False)
    stats = r["models"]["m32"]["stats"]
    assert stats["layer1/mod_routed_frac"] == pytest.approx(8 / SEQ)  # k = floor(0.25 * 32)
    assert r["models"]["a32"]["stats"] == {}
    assert bench.mean_routed_fraction(stats) == pytest.approx(0.25)
    assert "process 25.0% of tokens" in format_bench(r)
    assert r["flop_ratio"] == pytest.approx(expected_flops(small_mod(0.25), mode) / expected_flops(small(), mode))


@pytest.mark.parametrize("mode", ["train", "forward", "generate"])
def test_moe_model_reports_drops_and_load(mode: str) -> None:
    from condformer.config import LayerSpec, every_other

    # capacity 0.5 in training drops assignments; evaluation and generation are dropless by default
    moe = ModelConfig(name="e32", d_model=32, n_layers=2, n_heads=2, max_seq_len=128,
                      layers=every_other(LayerSpec(ffn="moe", options={"capacity_factor": 0.5})))
    r = run_bench(fast(moe, vs=small(), mode=mode, repeats=1), progress=False)
    stats = r["models"]["e32"]["stats"]
    loads = [stats[f"layer1/moe_load_e{e}"] for e in range(8)]
    assert sum(loads) == pytest.approx(1.0)
    assert stats["layer1/moe_load_max"] == pytest.approx(8 * max(loads))
    dropped = stats["layer1/moe_dropped_frac"]
    assert dropped >= 0.5 if mode == "train" else dropped == 0.0  # at most half the pairs fit
    assert f"MoE layers drop {dropped:.1%} of expert assignments" in format_bench(r)
    assert "MoE layers" not in format_bench(run_bench(fast(small(), mode=mode, repeats=1), progress=False))


def test_forward_with_causal_routing_uses_the_learned_decision() -> None:
    cfg = small_mod(0.25)
    r = run_bench(fast(cfg, mode="forward", repeats=1, eval_routing="causal"), progress=False)
    torch.manual_seed(0)  # the bench seed: the same weights, so the same decisions
    model = bench.build_model(cfg).eval()
    tokens, _ = bench._make_inputs(fast(cfg), 260)
    expected = float(model(tokens).stats["layer1/mod_routed_frac"])
    assert r["models"]["m32"]["stats"]["layer1/mod_routed_frac"] == pytest.approx(expected)
    with pytest.raises(ConfigError, match="eval_routing"):
        run_bench(fast(cfg, mode="forward", eval_routing="sideways"), progress=False)


def test_models_from_config_files_and_run_directories(tmp_path, monkeypatch) -> None:
    from condformer.checkpoint import save_checkpoint
    from condformer.config import save_config_file

    cfg_file = tmp_path / "m.json"
    save_config_file(cfg_file, small_mod(0.5))
    run = tmp_path / "run"
    torch.manual_seed(123)  # weights unlike the bench seed's
    trained = bench.build_model(small_mod(0.5))
    save_checkpoint(run, 7, trained, None, {}, small_mod(0.5), None)
    built: list[bench._Bench] = []
    real_build = bench._build
    monkeypatch.setattr(bench.runner, "_build", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    r = run_bench(fast(str(run), vs=str(cfg_file), mode="forward", repeats=1), progress=False)
    assert list(r["models"]) == ["run", "m32"]
    assert r["models"]["run"]["checkpoint"].endswith("step-00000007")
    assert r["models"]["m32"]["checkpoint"] is None
    for p, q in zip(built[0].model.parameters(), trained.parameters(), strict=True):
        assert torch.equal(p, q)  # the run's trained weights, not a fresh init
    assert not all(torch.equal(p, q) for p, q in zip(built[1].model.parameters(), trained.parameters(),
                                                          strict=True))


def test_data_gives_real_text_windows(code_corpus) -> None:
    from condformer.data import prepare_data

    cfg = fast(small(), mode="forward", data=str(code_corpus))
    tokens, targets = bench._make_inputs(cfg, 260)
    x, y = prepare_data(str(code_corpus), "byte").get_batch("val", 0, BATCH, SEQ, 0)
    assert torch.equal(tokens, x) and torch.equal(targets, y)
    text = bytes(tokens[0].tolist()).decode("utf-8", errors="replace")
    assert "def func_" in text or "return x" in text
    with pytest.raises(ConfigError, match="vocab_size"):
        bench._make_inputs(cfg, 100)
