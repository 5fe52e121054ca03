"""The command line as a user runs it: real subprocesses, JSON on the last line, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def cf(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "condformer.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {**os.environ, "CONDFORMER_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, env: dict, code_corpus: Path) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cli")
    corpus = code_corpus
    cfg = root / "model.yaml"
    cfg.write_text("model:\n  preset: tiny\n  d_model: 32\n  n_heads: 2\n  n_layers: 2\n  max_seq_len: 128\n")
    out = root / "run"
    res = last_json(cf("train", "--config", str(cfg), "--data", str(corpus), "--max-steps", "30",
                       "--seq-len", "64", "--batch-size", "8", "--eval-every", "30", "--out", str(out),
                       "--sample", "def ", "--sample-tokens", "20", "--no-progress", "--json", env=env))
    return out, res


def test_presets_json() -> None:
    names = [p["name"] for p in last_json(cf("presets", "--json"))["presets"]]
    assert {"tiny", "small", "medium", "gpt2-small"} <= set(names)


def test_flops_json_matches_api() -> None:
    from condformer import count_flops, preset

    got = last_json(cf("flops", "--preset", "small", "--seq-len", "128", "--json"))
    ref = count_flops(preset("small"), 128)
    assert (got["forward_flops"], got["train_flops"], got["params"]) == (ref.forward_flops, ref.train_flops,
                                                                         ref.params)


def test_train_reports_validation(run_dir: tuple[Path, dict]) -> None:
    out, res = run_dir
    assert res["steps"] == 30 and res["val_loss"] < 5.0
    assert res["val_bits_per_byte"] > 0 and res["data"]["files"] == 40
    assert isinstance(res["sample"], str) and res["tokens_per_s"] > 0
    assert (out / "log.jsonl").is_file() and (out / "checkpoints" / "latest").is_file()


def test_eval_matches_training(run_dir: tuple[Path, dict], env: dict) -> None:
    out, res = run_dir
    got = last_json(cf("eval", str(out), "--json", env=env))
    assert got["val_loss"] == pytest.approx(res["val_loss"], rel=1e-6)
    assert got["step"] == 30


def test_generate_greedy_is_deterministic(run_dir: tuple[Path, dict], env: dict) -> None:
    out, _ = run_dir
    a = last_json(cf("generate", str(out), "--prompt", "def func_", "--max-new-tokens", "16", "--greedy", "--json",
                     env=env))
    b = last_json(cf("generate", str(out), "--prompt", "def func_", "--max-new-tokens", "16", "--greedy", "--json",
                     env=env))
    assert a["text"] == b["text"] and len(a["text"]) > 0
    streamed = cf("generate", str(out), "--prompt", "def func_", "--max-new-tokens", "16", "--greedy", env=env)
    assert streamed.returncode == 0 and streamed.stdout.startswith("def func_" + a["text"])


def test_resume_extends_nothing_when_done(run_dir: tuple[Path, dict], env: dict) -> None:
    out, res = run_dir
    again = last_json(cf("train", "--out", str(out), "--resume", "--no-progress", "--json", env=env))
    assert again["steps"] == res["steps"]


TINY = ["--seq-len", "32", "--batch-size", "2", "--eval-every", "2", "--no-progress"]


def test_resume_takes_typed_flags_over_the_saved_run(tmp_path: Path, env: dict, code_corpus: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # in-process: four trainer calls without four torch imports
    from condformer.cli import main

    monkeypatch.setenv("CONDFORMER_CACHE", env["CONDFORMER_CACHE"])
    run = str(tmp_path / "run")
    assert main(["train", "--preset", "tiny", "--data", str(code_corpus), "--max-steps", "2", *TINY, "--out", run]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", run, "--lr", "0.5", "--no-progress", "--json"]) == 0
    out, err = capsys.readouterr()
    [warning] = [line for line in err.splitlines() if "ignored" in line]
    assert "lr=0.5" in warning and "max_steps" not in warning and "data" not in warning, warning
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 2  # the saved budget still holds
    for extra in ([], ["--preset", "tiny"]):  # untyped settings (defaults included) are never reported
        assert main(["train", "--resume", "--out", run, "--no-progress", *extra]) == 0
        out, err = capsys.readouterr()
        assert "ignored" not in err and "no steps left to run" in out, err


def test_train_summary_counts_skipped_steps(tmp_path: Path, env: dict, code_corpus: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # as tests/test_train.py does: a router whose auxiliary loss is NaN makes every step non-finite
    from condformer.cli import main
    from condformer.registry import ROUTERS
    from condformer.routing.dense import DenseRouter

    class NaNRouter(DenseRouter):
        def forward(self, x, ctx):  # noqa: ANN001, ANN201
            ctx.tally.loss("nan", x.sum() * float("nan"))
            return super().forward(x, ctx)

    if "test_cli_nan" not in ROUTERS.names():
        ROUTERS.register("test_cli_nan")(NaNRouter)
    cfg = tmp_path / "nan.json"
    cfg.write_text(json.dumps({"model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64,
                                         "layers": ["dense", {"router": "test_cli_nan"}]},
                               "train": {"eval_batches": 1, "tensorboard": False}}))
    monkeypatch.setenv("CONDFORMER_CACHE", env["CONDFORMER_CACHE"])
    assert main(["train", "--config", str(cfg), "--data", str(code_corpus), "--max-steps", "3", "--on-nonfinite",
                 "skip", *TINY, "--out", str(tmp_path / "run")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("trained ") and ": 3 steps, " in first, first
    assert first.endswith(", no update applied, 3 steps skipped (non-finite loss or gradient)"), first


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--preset", "nope"], "unknown preset"),
        (["train", "--preset", "tiny", "--data", "/no/such/dir", "--max-steps", "1"], "does not exist"),
        (["train", "--preset", "tiny", "--seq-len", "5000", "--max-steps", "1"], "max_seq_len"),
        (["train", "--preset", "tiny", "--max-steps", "0"], "max_steps"),
        (["train", "--bogus-flag"], "unrecognized"),
        (["generate", "/no/such/run", "--prompt", "x"], "does not exist"),
        (["eval", "/no/such/run"], "does not exist"),
        (["flops", "--config", "/no/such.json"], "does not exist"),
        (["bench", "--preset", "tiny", "--mode", "sideways"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line(args: list[str], needle: str, env: dict, tmp_path: Path) -> None:
    proc = cf(*args, "--out", str(tmp_path / "o"), env=env) if args[0] == "train" else cf(*args, env=env)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err


def test_bad_config_file_is_one_line(tmp_path: Path, env: dict) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"d_model": 30, "n_heads": 4}}')
    proc = cf("flops", "--config", str(bad), env=env)
    assert proc.returncode == 2 and "divisible" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    bad.write_text("{oops")
    proc = cf("flops", "--config", str(bad), env=env)
    assert proc.returncode == 2 and "cannot parse" in proc.stderr


# -- inspect -----------------------------------------------------------------------------------
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mod_run(tmp_path_factory: pytest.TempPathFactory, env: dict, code_corpus: Path) -> Path:
    """A tiny Mixture-of-Depths run (dense, MoD at capacity 0.25), trained for 5 steps: enough to inspect.

    Trained through ``main()`` in this process rather than a subprocess: the command is the same, and it
    saves a torch import (seconds); ``inspect`` itself runs as a real subprocess below.
    """
    from condformer.cli import main

    root = tmp_path_factory.mktemp("inspect")
    cfg = root / "mod.json"
    cfg.write_text(json.dumps({
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64,
                  "layers": ["dense", {"router": "mod", "options": {"capacity": 0.25}}]},
        "train": {"eval_batches": 2, "tensorboard": False},
    }))
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONDFORMER_CACHE", env["CONDFORMER_CACHE"])
        assert main(["train", "--config", str(cfg), "--data", str(code_corpus), "--max-steps", "5", "--seq-len", "32",
                     "--batch-size", "2", "--out", str(out), "--no-progress"]) == 0
    return out


def test_inspect_mod_run_json_and_png(mod_run: Path, env: dict) -> None:
    import matplotlib.image

    proc = cf("inspect", str(mod_run), "--json", env=env)
    got = last_json(proc)
    n = got["n_tokens"]
    assert 0 < n <= 64 and len(got["tokens"]) == n and got["routers"] == ["dense", "mod"]
    [layer] = got["layers"]
    assert layer["layer"] == 1 and layer["name"] == "mod_routed" and len(layer["routed"]) == n
    assert set(layer["routed"]) <= {0, 1} and layer["routed_frac"] == pytest.approx(sum(layer["routed"]) / n)
    human = proc.stdout.strip().splitlines()[:-1]
    assert human == [f"layer 1  mod  routed {layer['routed_frac']:.1%} of {n} tokens", f"png: {got['png']}"]
    png = Path(got["png"])
    assert png == mod_run / "inspect.png" and png.read_bytes()[:8] == PNG_MAGIC
    assert min(matplotlib.image.imread(png).shape[:2]) > 0


def test_inspect_topk_routes_exactly_the_capacity(mod_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # top-k at capacity 0.25 routes floor(0.25 * n) tokens whatever the (barely trained) predictor says
    from condformer.cli import main

    text = "def f(x):\n    return x + 1\n"  # 27 bytes -> k = floor(0.25 * 27) = 6
    assert main(["inspect", str(mod_run), "--text", text, "--eval-routing", "topk", "--out",
                 str(tmp_path / "k.png"), "--json"]) == 0
    [layer] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layers"]
    assert sum(layer["routed"]) == 6 and len(layer["routed"]) == 27


def test_inspect_text_file_out_and_dense_run(mod_run: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from condformer.checkpoint import save_checkpoint
    from condformer.cli import main
    from condformer.config import ModelConfig
    from condformer.data import ByteTokenizer
    from condformer.model import build_model

    text = tmp_path / "in.txt"
    text.write_text("x" * 100, encoding="utf-8")  # longer than max_seq_len 64: truncated with a note
    assert main(["inspect", str(mod_run), "--text-file", str(text), "--out", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("note: the text is 100 tokens; kept the first 64") and "of 64 tokens" in out[1]
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC

    dense, cfg = tmp_path / "dense", ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    save_checkpoint(dense, 0, build_model(cfg), None, {"tokenizer": ByteTokenizer().to_dict()}, cfg, None)
    assert main(["inspect", str(dense), "--text", "def f(x):", "--out", str(tmp_path / "d.png"), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "no routed layers: all 2 layers compute all 9 tokens"
    assert json.loads(lines[-1])["layers"] == [] and (tmp_path / "d.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "args, needle",
    [
        (["/no/such/run"], "does not exist"),
        (["RUN", "--text", ""], "empty"),
        (["RUN", "--text-file", "/no/such/file.txt"], "cannot read --text-file"),
        (["RUN", "--text-file", "BINARY"], "not UTF-8"),
        (["RUN", "--text", "x", "--text-file", "f"], "not allowed with"),
        (["RUN", "--out", "BINARY/x.png"], "cannot write"),
    ],
)
def test_inspect_user_errors_are_one_line(args: list[str], needle: str, mod_run: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from condformer.cli import main

    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    args = [{"RUN": str(mod_run), "BINARY": str(binary)}.get(a, a.replace("BINARY", str(binary))) for a in args]
    assert main(["inspect", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_compare_lr_sets_one_shared_rate_and_its_absence_each_presets_own(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    import condformer.compare as compare
    from condformer.cli import main

    seen = []
    monkeypatch.setattr(compare, "run_study", lambda cfg, out, progress: seen.append(cfg) or {})
    monkeypatch.setattr(compare, "render_summary", lambda results, out: "")
    for argv in (["--lr", "0.003"], []):
        assert main(["compare", "--quick", "--out", str(tmp_path / "s"), "--no-progress", *argv]) in (0, None)
    shared, own = seen
    assert shared.lr_of("tiny") == shared.lr_of("tiny-sasp") == 0.003
    assert own.lr is None and own.lr_of("tiny-sasp") == 4 * own.lr_of("tiny")


@pytest.mark.parametrize(("threshold", "share"), [("-1e6", 1.0), ("1e6", 0.0)])
def test_mod_threshold_flag_sets_the_routed_share(mod_run: Path, env: dict, threshold: str, share: float) -> None:
    """The compute dial's MoD knob from the command line: every token or none takes the routed block."""
    got = last_json(cf("inspect", str(mod_run), "--eval-routing", "causal", f"--mod-threshold={threshold}",
                       "--out", str(mod_run / f"inspect{threshold}.png"), "--json", env=env))
    assert got["layers"][0]["routed_frac"] == share


def test_knob_flags_a_model_lacks_are_one_line(run_dir: tuple[Path, dict], env: dict) -> None:
    out, _ = run_dir
    proc = cf("eval", str(out), "--moe-top-k", "1", "--json", env=env)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("condformer: error:")]
    assert len(errors) == 1 and "moe_top_k" in errors[0] and "its settings" in errors[0], proc.stderr[-1500:]
    proc = cf("bench", "--preset", "tiny-moe", "--moe-top-k", "1", "--mode", "train", env=env)
    assert proc.returncode != 0 and "use --mode forward or generate" in proc.stderr
