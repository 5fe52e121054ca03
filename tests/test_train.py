"""Training loop: learning, exact resume, budgets, non-finite handling, checkpoints, MLM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from condformer.checkpoint import read_checkpoint, resolve_checkpoint
from condformer.config import ModelConfig, TrainConfig
from condformer.context import Context
from condformer.data import prepare_data
from condformer.errors import CheckpointError, ConfigError, TrainingError
from condformer.flops import count_flops
from condformer.model import IGNORE_INDEX
from condformer.registry import ROUTERS
from condformer.routing.dense import DenseRouter
from condformer.train import mlm_mask, plan_steps, train


@pytest.fixture
def corpus(code_corpus: Path) -> Path:
    return code_corpus


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDFORMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 128, **kw})


def train_cfg(corpus: Path, **kw) -> TrainConfig:
    base = dict(data=str(corpus), seq_len=32, batch_size=4, max_steps=12, warmup_steps=2, eval_every=6,
                eval_batches=2, log_every=1, checkpoint_every=1000, tensorboard=False, lr=3e-3)
    return TrainConfig(**{**base, **kw})


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def train_interrupt_resume(mc: ModelConfig, tc: TrainConfig, tmp_path: Path) -> tuple[dict, dict]:
    """Train run a straight through and run b stopped after 3 steps then resumed; assert their per-step losses
    are bit-identical and return both runs' final weights."""
    from safetensors.torch import load_file

    train(mc, tc, tmp_path / "a", progress=False)
    train(mc, tc, tmp_path / "b", progress=False, stop_after=3)
    train(mc, tc, tmp_path / "b", progress=False, resume=True)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    return tuple(load_file(str(resolve_checkpoint(tmp_path / r) / "model.safetensors")) for r in "ab")


def test_loss_decreases(corpus: Path, tmp_path: Path) -> None:
    r = train(model_cfg(), train_cfg(corpus, max_steps=60, eval_every=60), tmp_path / "run", progress=False)
    curve = losses(tmp_path / "run")
    assert curve[0][1] > math.log(200)  # starts near uniform over the vocabulary
    assert curve[-1][1] < curve[0][1] - 2.0
    assert r.val_loss < curve[0][1] - 2.0
    assert r.steps == 60 and r.tokens == 60 * 4 * 32


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_continues_exactly(corpus: Path, tmp_path: Path, grad_accum: int) -> None:
    cfg = dict(grad_accum=grad_accum, max_steps=10)
    full = train(model_cfg(), train_cfg(corpus, **cfg), tmp_path / "a", progress=False)
    part = train(model_cfg(), train_cfg(corpus, **cfg), tmp_path / "b", progress=False, stop_after=4)
    assert part.steps == 4
    resumed = train(model_cfg(), train_cfg(corpus, **cfg), tmp_path / "b", progress=False, resume=True)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # bit-identical, every step
    assert [s for s, _ in losses(tmp_path / "b")] == list(range(1, 11))  # no duplicated or missing steps
    assert resumed.val_loss == full.val_loss
    from safetensors.torch import load_file

    wa = load_file(str(resolve_checkpoint(tmp_path / "a") / "model.safetensors"))
    wb = load_file(str(resolve_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_refuses_to_overwrite_a_run(corpus: Path, tmp_path: Path) -> None:
    train(model_cfg(), train_cfg(corpus, max_steps=2), tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        train(model_cfg(), train_cfg(corpus, max_steps=2), tmp_path / "run", progress=False)


def test_flop_and_token_budgets(corpus: Path, tmp_path: Path) -> None:
    mc, tc = model_cfg(vocab_size=260), train_cfg(corpus, max_steps=None)
    per_step = count_flops(mc, tc.seq_len).train_flops * tc.batch_size * tc.grad_accum
    tc.budget_flops = 7.5 * per_step
    steps, flops_per_step = plan_steps(mc, tc, world=1)
    assert (steps, flops_per_step) == (7, per_step)
    r = train(mc, tc, tmp_path / "flops", progress=False)
    assert r.steps == 7 and tc.budget_flops - per_step < r.train_flops <= tc.budget_flops
    tc2 = train_cfg(corpus, max_steps=None, budget_tokens=5 * 4 * 32 + 3)
    assert plan_steps(mc, tc2, world=1)[0] == 5
    assert plan_steps(mc, tc2, world=2)[0] == 2  # two ranks consume twice the tokens per step
    with pytest.raises(ConfigError, match="no full step"):
        plan_steps(mc, train_cfg(corpus, max_steps=None, budget_flops=per_step / 2), world=1)


_POISON = {"on": False}


@ROUTERS.register("test_poison")
class _PoisonRouter(DenseRouter):
    """Adds a NaN auxiliary loss while the test switches it on."""

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        if _POISON["on"]:
            ctx.tally.loss("poison", x.sum() * float("nan"))
        return super().forward(x, ctx)


def test_nonfinite_loss_stops_naming_the_step(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    from condformer.config import LayerSpec

    monkeypatch.setitem(_POISON, "on", True)
    mc = model_cfg(layers=[LayerSpec(router="test_poison")])
    with pytest.raises(TrainingError, match="step 0") as e:
        train(mc, train_cfg(corpus, max_steps=3), tmp_path / "stop", progress=False)
    assert "\n" not in str(e.value)


def test_nonfinite_loss_skip_leaves_weights(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    from condformer.config import LayerSpec
    from condformer.model import build_model

    monkeypatch.setitem(_POISON, "on", True)
    mc = model_cfg(layers=[LayerSpec(router="test_poison")])
    r = train(mc, train_cfg(corpus, max_steps=3, on_nonfinite="skip", seed=5), tmp_path / "skip", progress=False)
    assert r.skipped_steps == 3
    torch.manual_seed(5)
    fresh = build_model(read_checkpoint(tmp_path / "skip").model_cfg)  # the initial weights of that run
    from safetensors.torch import load_file

    saved = load_file(str(resolve_checkpoint(tmp_path / "skip") / "model.safetensors"))
    for k, v in fresh.state_dict().items():
        if k in saved:
            assert torch.equal(saved[k], v), k


def test_checkpoints_are_atomic_and_pruned(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(model_cfg(), train_cfg(corpus, max_steps=9, checkpoint_every=2, keep_checkpoints=2), run, progress=False)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts == ["step-00000008", "step-00000009"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000009"
    assert not list((run / "checkpoints").glob(".tmp*"))
    files = {p.name for p in (run / "checkpoints" / "step-00000009").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}  # nothing pickled
    # a crash mid-write leaves only a temp dir, which is never loaded
    (run / "checkpoints" / ".tmp-step-00000010").mkdir()
    assert read_checkpoint(run).state["step"] == 9


def test_corrupt_checkpoint_is_a_clear_error(corpus: Path, tmp_path: Path) -> None:
    from condformer.checkpoint import load_weights
    from condformer.model import build_model

    run = tmp_path / "run"
    train(model_cfg(), train_cfg(corpus, max_steps=2), run, progress=False)
    ck = read_checkpoint(run)
    (ck.path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_weights(ck, build_model(ck.model_cfg))
    (ck.path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(run)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing")


def test_seq_len_longer_than_model_is_rejected(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_seq_len"):
        train(model_cfg(max_seq_len=16), train_cfg(corpus, seq_len=32), tmp_path / "r", progress=False)


def test_mlm_mask_follows_bert_recipe() -> None:
    x = torch.randint(0, 256, (64, 128))
    inputs, targets = mlm_mask(x, mask_id=259, vocab_size=260, prob=0.15, seed=1, step=3)
    chosen = targets != IGNORE_INDEX
    assert torch.equal(targets[chosen], x[chosen])
    frac = chosen.float().mean().item()
    assert 0.13 < frac < 0.17
    masked = (inputs == 259) & chosen
    assert 0.75 < masked.sum().item() / chosen.sum().item() < 0.85
    assert torch.equal(inputs[~chosen], x[~chosen])  # unchosen tokens untouched
    again = mlm_mask(x, 259, 260, 0.15, seed=1, step=3)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], targets)
    other = mlm_mask(x, 259, 260, 0.15, seed=1, step=4)
    assert not torch.equal(other[1], targets)


def test_encoder_trains_with_masked_lm(corpus: Path, tmp_path: Path) -> None:
    r = train(model_cfg(kind="encoder"), train_cfg(corpus, max_steps=40, eval_every=40), tmp_path / "enc",
              progress=False)
    curve = losses(tmp_path / "enc")
    assert r.val_bits_per_byte is None and math.isfinite(r.val_loss)
    assert curve[-1][1] < curve[0][1] - 1.0


def test_val_bits_per_byte_matches_loss(corpus: Path, tmp_path: Path) -> None:
    r = train(model_cfg(), train_cfg(corpus, max_steps=3), tmp_path / "r", progress=False)
    data = prepare_data(str(corpus), "byte", 0.05)
    assert r.val_bits_per_byte == pytest.approx(r.val_loss / math.log(2) / data.bytes_per_token("val"))
    assert r.data["sha256"] == data.fingerprint["sha256"]  # the corpus fingerprint is recorded


@ROUTERS.register("test_pull")
class _PullRouter(DenseRouter):
    """Owns a scalar the LM loss never touches; only its auxiliary loss pulls it toward 3."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.knob = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        ctx.tally.loss(f"layer{ctx.layer}/pull", (self.knob - 3.0) ** 2)
        ctx.tally.stat(ctx.layer, "half", torch.tensor(0.5))
        return super().forward(x, ctx)


def test_trainer_optimises_aux_losses_and_logs_stats(corpus: Path, tmp_path: Path) -> None:
    from condformer.config import LayerSpec
    from condformer.model import build_model

    mc = model_cfg(layers=[LayerSpec(router="test_pull")])
    r = train(mc, train_cfg(corpus, max_steps=30, lr=0.05, weight_decay=0.0), tmp_path / "aux", progress=False)
    ck = read_checkpoint(tmp_path / "aux")
    from condformer.checkpoint import load_weights

    model = build_model(ck.model_cfg)
    load_weights(ck, model)
    knobs = [float(layer.knob.detach()) for layer in model.layers]
    # no LM gradient and no weight decay reach the knob: only the aux loss can move it off 0 (AdamW moves
    # it ~lr per step, ~0.8 over this schedule)
    assert all(0.5 < k < 3.0 for k in knobs), knobs
    rows = [json.loads(line) for line in (tmp_path / "aux" / "log.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "loss" in row]
    assert all(row["layer0/half"] == 0.5 and row["layer1/half"] == 0.5 for row in logged)
    assert r.stats == {"layer0/half": 0.5, "layer1/half": 0.5}


@pytest.mark.parametrize("where", ["lr_at", "evaluate"])
def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(corpus: Path, tmp_path: Path, monkeypatch, where) -> None:
    """Ctrl-C at the start of step 5 (before its update) or during the evaluation after step 6 (after it)."""
    import condformer.train as train_mod

    full = train(model_cfg(), train_cfg(corpus, max_steps=10), tmp_path / "a", progress=False)
    real = getattr(train_mod, where)

    def interrupting(*args, **kwargs):
        if where == "lr_at" and args[0] == 5:
            raise KeyboardInterrupt
        if where == "evaluate":
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, where, interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(model_cfg(), train_cfg(corpus, max_steps=10), tmp_path / "b", progress=False)
    monkeypatch.setattr(train_mod, where, real)
    assert read_checkpoint(tmp_path / "b").state["step"] == (5 if where == "lr_at" else 6)
    resumed = train(model_cfg(), train_cfg(corpus, max_steps=10), tmp_path / "b", progress=False, resume=True)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert resumed.val_loss == full.val_loss


def test_moe_with_aux_free_bias_trains_and_resumes_exactly(corpus: Path, tmp_path: Path) -> None:
    # the aux-loss-free bias is state outside the gradient, updated by the trainer's before-step hook:
    # it must move during training, be saved with the weights, and resume must continue bit-identically
    from condformer.config import LayerSpec

    moe = LayerSpec(ffn="moe", options={"aux_free_rate": 0.01, "balance_coef": 0.0, "capacity_factor": 1.0})
    mc = model_cfg(layers=[LayerSpec(), moe])
    wa, wb = train_interrupt_resume(mc, train_cfg(corpus, grad_accum=2, max_steps=6, eval_every=3), tmp_path)
    bias = wa["layers.1.block.ffn.expert_bias"]
    assert torch.equal(bias, wb["layers.1.block.ffn.expert_bias"])
    # 6 updates of +-0.01 each, centred: nonzero, bounded by 6 x 0.01 per expert plus the centring shift
    assert bias.abs().max() > 0 and bias.abs().max() <= 2 * 6 * 0.01 + 1e-6
    assert abs(float(bias.sum())) < 1e-5
    rows = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    stats = [r for r in rows if "layer1/moe_load_max" in r]
    assert stats and all(r["layer1/moe_load_max"] >= 1.0 for r in stats)


@pytest.mark.parametrize("altup", [{"k": 2}, {"k": 2, "variant": "recycled", "coefficients": "gemma"}])
def test_altup_trains_logs_its_coefficients_and_resumes_exactly(corpus: Path, tmp_path: Path, altup: dict) -> None:
    # the coefficients must move away from the identity, be logged, be saved, and resume must be bit-identical
    mc = model_cfg(altup=altup)
    wa, wb = train_interrupt_resume(mc, train_cfg(corpus, max_steps=6, eval_every=3), tmp_path)
    keys = [k for k in wa if k.startswith("altup.coefs.")]
    assert keys and all(torch.equal(wa[k], wb[k]) for k in keys)
    if altup.get("coefficients") != "gemma":
        assert not torch.equal(wa["altup.coefs.1.p"], torch.eye(2)) and not torch.equal(wa["altup.coefs.1.g"],
                                                                                        torch.ones(2))
    else:
        assert wa["altup.coefs.1.prediction_coefs.weight"].abs().max() > 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "layer1/altup_p0_1" in r and "layer0/altup_g1" in r]
    assert logged and all(math.isfinite(r["layer1/altup_p0_1"]) for r in logged)


def test_validation_batches_do_not_depend_on_the_training_seed(corpus: Path) -> None:
    # runs that differ only in their seed are scored on the same tokens, so seed spread measures training
    from condformer.model import build_model
    from condformer.train import evaluate

    data = prepare_data(str(corpus), "byte", 0.05)
    mc = model_cfg()
    torch.manual_seed(0)
    model = build_model(mc)
    scores = [evaluate(model, data, mc, train_cfg(corpus, seed=s), "cpu")["val_loss"] for s in (0, 1, 7)]
    assert scores[0] == scores[1] == scores[2]
    seen = []
    real_forward = model.forward
    model.forward = lambda x, y=None, **kw: (seen.append(x.clone()), real_forward(x, y, **kw))[1]
    evaluate(model, data, mc, train_cfg(corpus, seed=3), "cpu")
    x0, _ = data.get_batch("val", 0, 4, 32, seed=0)
    assert torch.equal(seen[0], x0)  # EVAL_SEED = 0: seed-0 runs keep their earlier validation numbers


# -- run directories: lock, interrupts, resume ---------------------------------------------------
def test_a_second_trainer_on_a_run_directory_is_refused(corpus: Path, tmp_path: Path) -> None:
    import fcntl
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # as the other trainer wrote it
    holder = subprocess.Popen(  # another process, training there: it holds the run's lock
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()", str(run / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in (False, True):
            with pytest.raises(TrainingError, match="another process is training in") as e:
                train(model_cfg(), train_cfg(corpus, max_steps=2), run, progress=False, resume=resume)
            assert str(run) in str(e.value) and "\n" not in str(e.value)
        assert sorted(p.name for p in run.iterdir()) == [".lock", "config.json"]  # nothing written
        assert (run / "config.json").read_text() == "{}"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)

    probes = []

    def probe() -> None:  # during the run, the lock is held against any other open of the file
        fd = os.open(run / ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            probes.append("free")
        except BlockingIOError:
            probes.append("held")
        finally:
            os.close(fd)

    train(model_cfg(), train_cfg(corpus, max_steps=2), run, progress=False, on_step=probe, resume=True)
    assert probes == ["held", "held"]
    probe()
    assert probes[-1] == "free"  # released when the run ends


def _rows(run: Path) -> list[dict]:
    """The log's deterministic fields, row for row (throughput is timing)."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def _interrupt_cfg(corpus: Path) -> TrainConfig:
    return train_cfg(corpus, max_steps=8, eval_every=3, checkpoint_every=4)


@pytest.fixture(scope="module")
def uninterrupted(code_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CONDFORMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        run = tmp_path_factory.mktemp("uninterrupted") / "run"
        train(model_cfg(), _interrupt_cfg(code_corpus), run, progress=False)
    return _rows(run)


INTERRUPTS = [  # (where, at the n-th call, how): "raise" raises KeyboardInterrupt there, "signal" sends SIGINT
    ("on_step", 4, "raise"), ("on_step", 5, "raise"), ("train_row", 5, "raise"), ("train_row", 5, "signal"),
    ("optimizer_step", 5, "signal"), ("evaluate", 2, "raise"), ("evaluate", 2, "signal"),
    ("save_checkpoint", 1, "raise"),
]


@pytest.fixture
def interactive_sigint():  # noqa: ANN201
    """SIGINT raising KeyboardInterrupt, as at a terminal: a process started in the background by a
    non-interactive shell inherits SIGINT ignored, and Python then installs no handler for it."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("where, n, how", INTERRUPTS)
def test_ctrl_c_anywhere_in_a_step_resumes_to_the_uninterrupted_log(
        where: str, n: int, how: str, corpus: Path, tmp_path: Path, monkeypatch, uninterrupted: list[dict],
        interactive_sigint: None) -> None:
    import os
    import signal

    import condformer.train as train_mod

    calls = [0]

    def fire() -> None:
        calls[0] += 1
        if calls[0] == n:
            if how == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)

    def after(fn):  # the interrupt lands just after fn has done its work (an update applied, a row built)
        return lambda *a, **k: (fn(*a, **k), fire())[0]

    def before(fn):
        return lambda *a, **k: (fire(), fn(*a, **k))[1]

    if where == "train_row":
        real_log = train_mod._Logger.log
        monkeypatch.setattr(train_mod._Logger, "log",
                            lambda self, rec: (fire() if "loss" in rec else None, real_log(self, rec))[1])
    elif where == "optimizer_step":
        real_make = train_mod.make_optimizer

        def make(*a, **k):
            opt = real_make(*a, **k)
            opt.step = after(opt.step)
            return opt

        monkeypatch.setattr(train_mod, "make_optimizer", make)
    elif where == "evaluate":
        monkeypatch.setattr(train_mod, where, before(getattr(train_mod, where)))
    elif where == "save_checkpoint":  # the trainer saves through its parallel layout
        import condformer.parallel.runtime as runtime_mod

        monkeypatch.setattr(runtime_mod, where, before(getattr(runtime_mod, where)))
    run = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(model_cfg(), _interrupt_cfg(corpus), run, progress=False, on_step=fire if where == "on_step" else None)
    assert calls[0] >= n
    monkeypatch.undo()
    train(model_cfg(), _interrupt_cfg(corpus), run, progress=False, resume=True)
    assert _rows(run) == uninterrupted


def test_resume_of_nothing_is_an_error(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        train(model_cfg(), train_cfg(corpus, max_steps=2), tmp_path / "missing", progress=False, resume=True)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint") as e:
        train(model_cfg(), train_cfg(corpus, max_steps=2), tmp_path / "empty", progress=False, resume=True)
    assert "\n" not in str(e.value) and not list((tmp_path / "empty").iterdir())
    # a run killed before its first checkpoint left its config: resuming it starts it over
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.json").write_text("{}")
    r = train(model_cfg(), train_cfg(corpus, max_steps=2), tmp_path / "started", progress=False, resume=True)
    assert r.steps == 2


def test_resume_names_the_settings_it_ignores(corpus: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    train(model_cfg(), train_cfg(corpus, max_steps=6), run, progress=False, stop_after=2)
    capsys.readouterr()
    r = train(model_cfg(), train_cfg(corpus, max_steps=6), run, progress=False, resume=True, stop_after=4)
    assert "ignored" not in capsys.readouterr().err and r.steps == 4  # the same settings: nothing to say
    r = train(model_cfg(d_model=64), train_cfg(corpus, max_steps=9, lr=0.01), run, progress=False, resume=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ignored" in err[0] and str(run) in err[0]
    assert "model.d_model" in err[0] and "max_steps=9 (the run's: 6)" in err[0] and "lr=0.01" in err[0]
    assert r.steps == 6  # continued with the saved settings
    assert read_checkpoint(run).model_cfg.d_model == 32


def test_a_finished_run_resumed_reports_no_bogus_throughput(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = train(model_cfg(), train_cfg(corpus, max_steps=3), run, progress=False)
    assert first.tokens_per_s is not None and first.tokens_per_s > 0
    ck = resolve_checkpoint(run)
    stamps = {p.name: p.stat().st_mtime_ns for p in ck.iterdir()}
    again = train(model_cfg(), train_cfg(corpus, max_steps=3), run, progress=False, resume=True)
    assert again.tokens_per_s is None and again.elapsed_s == 0.0  # no step ran
    assert (again.steps, again.train_loss, again.val_loss) == (first.steps, first.train_loss, first.val_loss)
    assert json.loads(json.dumps(again.to_dict())) == again.to_dict()  # valid JSON: no NaN
    assert {p.name: p.stat().st_mtime_ns for p in ck.iterdir()} == stamps  # nothing re-saved


def test_skipped_steps_are_reported(corpus: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from condformer.config import LayerSpec

    monkeypatch.setitem(_POISON, "on", True)
    mc = model_cfg(layers=[LayerSpec(router="test_poison")])
    tc = train_cfg(corpus, max_steps=3, on_nonfinite="skip")
    part = train(mc, tc, tmp_path / "skip", progress=False, stop_after=2)
    err = capsys.readouterr().err
    assert "step 0: non-finite" in err and "step 1: non-finite" in err and "skipped" in err
    assert part.skipped_steps == 2 and part.tokens_per_s is None  # no update ran
    r = train(mc, tc, tmp_path / "skip", progress=False, resume=True)
    err = capsys.readouterr().err
    assert r.skipped_steps == 3 and r.to_dict()["skipped_steps"] == 3  # over the whole run
    assert "step 2: non-finite" in err and "3 of 3 steps were skipped" in err


def test_resume_refuses_a_config_that_does_not_fit_its_weights(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(model_cfg(), train_cfg(corpus, max_steps=2), run, progress=False, stop_after=1)
    state_file = resolve_checkpoint(run) / "state.json"
    state = json.loads(state_file.read_text())
    state["model"]["d_model"] = 10**6  # allocating this model would die out of memory
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="shape") as e:
        train(model_cfg(), train_cfg(corpus, max_steps=2), run, progress=False, resume=True)
    assert "model.safetensors" in str(e.value) and "\n" not in str(e.value)
