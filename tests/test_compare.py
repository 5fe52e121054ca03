"""``condformer compare``: the isoFLOP study end to end on a tiny budget, its report, resume and errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from condformer.compare import StudyConfig, render_report, run_dir, run_study
from condformer.errors import CondformerError, ConfigError
from helpers import one_line_error

PRESETS = ["dense", "mod", "altup", "exit"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDFORMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def study_cfg(corpus: Path | str, **kw) -> StudyConfig:
    # tiny (4 x 128) on 32-token windows: dense gets 5 steps, MoD (cheaper per token) more
    base = dict(presets=list(PRESETS), size="tiny", budget_flops=5 * 2 * 32 * 5.2e6 + 1, data=str(corpus),
                seq_len=32, batch_size=2, warmup_steps=1, eval_every=2, eval_batches=2, bench_repeats=1,
                bench_batch_size=2, bench_modes=["train"], analysis_windows=2)
    return StudyConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, code_corpus: Path) -> tuple[Path, dict, StudyConfig]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONDFORMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        out = tmp_path_factory.mktemp("study")
        cfg = study_cfg(code_corpus)
        return out, run_study(cfg, out, progress=False), cfg


def test_every_preset_reaches_the_budget_within_one_step(study) -> None:
    out, results, cfg = study
    assert results["presets"] == ["tiny", "tiny-mod", "tiny-altup", "tiny-exit"] and results["dense"] == "tiny"
    steps = {}
    for name in results["presets"]:
        (run,) = results["runs"][name]["seeds"]
        assert cfg.budget_flops - run["flops_per_step"] < run["train_flops"] <= cfg.budget_flops
        assert run["train_flops"] == pytest.approx(run["steps"] * run["flops_per_step"])
        steps[name] = run["steps"]
        # the learning curve ends at the final evaluation, at the run's FLOPs
        assert run["curve"][-1]["train_flops"] == pytest.approx(run["train_flops"])
        assert run["curve"][-1]["val_loss"] == run["val_loss"]
    assert steps["tiny-mod"] > steps["tiny"]  # cheaper steps: more of them for the same compute


def test_outputs_exist_and_report_equals_results_json(study) -> None:
    out, results, _ = study
    saved = json.loads((out / "results.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    for png in ("loss_vs_flops.png", "loss_vs_forward_flops.png", "speedup_train.png", "altup_coefficients.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in saved["plots"].values()
    report = (out / "report.md").read_text()
    assert report == render_report(saved)
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \| [\d,]+ \|.*$", report, re.M)}
    assert list(rows) == saved["presets"]
    for name, row in rows.items():
        cells = [c.strip() for c in row.strip("|").split("|")]
        r = saved["runs"][name]
        assert int(cells[1].replace(",", "")) == r["params"]
        assert float(cells[2]) == pytest.approx(r["train_flops_per_token"], rel=1e-3)
        assert float(cells[4]) == pytest.approx(r["lr"], rel=1e-2)
        assert int(cells[5]) == r["steps"]
        assert float(cells[6]) == pytest.approx(r["budget_used"], abs=1e-4)
        assert float(cells[7]) == pytest.approx(r["val_loss"], abs=1e-4)
        if name == saved["dense"]:
            assert cells[8] == "1 (baseline)"
        else:
            b = saved["bench"][name]["train"]
            speedup, ideal = re.fullmatch(r"([\d.]+) \(([\d.]+)\)", cells[8]).groups()
            assert float(speedup) == pytest.approx(b["speedup"], abs=1e-3)
            assert float(ideal) == pytest.approx(b["ideal_speedup"], abs=1e-3)
            assert b["ideal_speedup"] == pytest.approx(1 / b["flop_ratio"])


def test_analysis_sees_the_routing_and_the_altup_coefficients(study) -> None:
    _, results, _ = study
    mod = results["analysis"]["tiny-mod"]
    assert [(e["layer"], e["trace"]) for e in mod["layers"]] == [(1, "mod_routed"), (3, "mod_routed")]
    assert all(0.0 <= e["computed_frac"] <= 1.0 for e in mod["layers"])
    assert mod["heatmap"]["n_tokens"] > 0 and "routing heatmap: tiny-mod" in results["plots"]
    altup = results["analysis"]["tiny-altup"]["altup"]
    assert [e["layer"] for e in altup] == [0, 1, 2, 3] and all(len(e["g"]) == 2 for e in altup)
    assert results["analysis"]["tiny"]["layers"] == []


def test_exit_runs_are_calibrated_within_the_tolerance_and_reported(study) -> None:
    from condformer.checkpoint import read_checkpoint
    from condformer.compare import EXIT_TOLERANCE

    out, results, _ = study
    e = results["runs"]["tiny-exit"]["exits"]
    assert e["loss"] <= e["full_loss"] * (1 + EXIT_TOLERANCE) + 1e-6
    assert sum(e["histogram"]) == e["tokens"] and len(e["histogram"]) == 4
    assert e["mean_depth"] == pytest.approx(sum((d + 1) * c for d, c in enumerate(e["histogram"])) / e["tokens"])
    # the thresholds are in the run's checkpoint, so its analysis (and a generate bench) decode with them
    assert read_checkpoint(run_dir(out, "tiny-exit", 0)).model_cfg.exits.thresholds == e["thresholds"]
    computed = [x for x in results["analysis"]["tiny-exit"]["layers"] if x["trace"] == "exit_computed"]
    if e["thresholds"] is None:
        assert computed == [] and e["histogram"][-1] == e["tokens"]
    else:
        fracs = [x["computed_frac"] for x in computed]
        assert [x["layer"] for x in computed] == [0, 1, 2, 3] and fracs[0] == 1.0
        assert fracs == sorted(fracs, reverse=True)  # a token that stopped computes no layer above
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| `tiny-exit` |") and "of 4" in line)
    assert f"{e['full_loss']:.4f}" in row and f"{e['mean_depth']:.2f} of 4" in row and str(e["histogram"]) in row
    # an exit switched off (a null threshold) renders as "off"
    off = {**results, "runs": {**results["runs"], "tiny-exit": {**results["runs"]["tiny-exit"],
                                                               "exits": {**e, "thresholds": [None, 0.5, None]}}}}
    assert "| off, 0.500, off |" in render_report(off)
    assert (out / "exit_depth.png").read_bytes()[:4] == b"\x89PNG"


def test_a_second_call_reuses_every_finished_run_and_benchmark(study, monkeypatch) -> None:
    out, results, cfg = study

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run or benchmark was redone")

    monkeypatch.setattr("condformer.train.train", refuse)
    monkeypatch.setattr("condformer.bench.run_bench", refuse)
    again = run_study(cfg, out, progress=False)
    assert again["runs"] == results["runs"] and again["bench"] == results["bench"]


def test_other_settings_in_the_same_directory_are_refused(study) -> None:
    out, _, cfg = study
    msg = one_line_error(lambda: run_study(study_cfg(cfg.data, lr=2e-3), out, progress=False), CondformerError)
    assert "lr" in msg and "--out" in msg


def test_an_interrupted_run_resumes_exactly(tmp_path: Path, code_corpus: Path, study) -> None:
    from condformer.presets import preset
    from condformer.train import train

    _, results, _ = study
    cfg = study_cfg(code_corpus, presets=["dense"], bench_modes=[])
    from condformer.compare import _train_config

    train(preset("tiny"), _train_config(cfg, 0, cfg.lr_of("tiny")), run_dir(tmp_path, "tiny", 0), progress=False,
          stop_after=2)
    resumed = run_study(cfg, tmp_path, progress=False)
    (run,) = resumed["runs"]["tiny"]["seeds"]
    (full,) = results["runs"]["tiny"]["seeds"]
    assert run["val_loss"] == full["val_loss"] and run["steps"] == full["steps"]
    assert resumed["bench"] == {}


def test_seeds_give_error_bars(tmp_path: Path, code_corpus: Path) -> None:
    cfg = study_cfg(code_corpus, presets=["dense"], seeds=2, bench_modes=[])
    results = run_study(cfg, tmp_path, progress=False)
    r = results["runs"]["tiny"]
    losses = [s["val_loss"] for s in r["seeds"]]
    assert len(losses) == 2 and losses[0] != losses[1]
    assert r["val_loss"] == pytest.approx(sum(losses) / 2)
    assert r["val_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / 2**0.5)
    assert f"± {r['val_loss_std']:.4f}" in (tmp_path / "report.md").read_text()


def test_presets_resolve_with_dense_first() -> None:
    cfg = StudyConfig(presets=["altup", "tiny-moe", "dense", "mod"], size="tiny")
    assert cfg.resolved() == [("dense", "tiny"), ("altup", "tiny-altup"), ("tiny-moe", "tiny-moe"),
                              ("mod", "tiny-mod")]
    assert StudyConfig(presets=["sasp"], size="small").resolved() == [("dense", "small"), ("sasp", "small-sasp")]


def test_techniques_come_from_the_presets_for_every_size() -> None:
    from condformer.compare import TECHNIQUES
    from condformer.presets import SIZES, presets, technique_presets

    # the table the study took before it was derived from the presets (encoders are no technique)
    assert TECHNIQUES == {
        "dense": "", "mod": "-mod", "moe": "-moe", "switch": "-switch", "mode": "-mode",
        "mode-staged": "-mode-staged", "altup": "-altup", "raltup": "-raltup", "parallel": "-parallel",
        "sas": "-sas", "sasp": "-sasp", "exit": "-exit",
    }
    known = set(presets())
    for size in SIZES:
        assert technique_presets(size) == {t: size + suffix for t, suffix in TECHNIQUES.items()}, size
        assert all(size + suffix in known for suffix in TECHNIQUES.values()), size
    with pytest.raises(ConfigError):
        technique_presets("huge")


@pytest.mark.parametrize(("kw", "needle"), [
    (dict(presets=["warp"]), "warp"), (dict(presets=[]), "--presets"), (dict(size="huge"), "huge"),
    (dict(budget_flops=0), "budget_flops"), (dict(seeds=0), "seeds"), (dict(bench_modes=["fast"]), "fast"),
])
def test_bad_settings_are_one_line_errors(kw: dict, needle: str) -> None:
    msg = one_line_error(StudyConfig(**kw).validate)
    assert needle in msg
    with pytest.raises(ConfigError):
        StudyConfig(**kw).validate()


def test_unknown_budget_names_the_choices() -> None:
    assert "quick" in one_line_error(lambda: StudyConfig.from_budget("huge"))
    assert StudyConfig.from_budget("quick", seeds=3, size=None).seeds == 3  # None = keep the budget's value


def test_cli_compare_prints_a_summary_and_json(tmp_path: Path, code_corpus: Path, capsys) -> None:
    from condformer.cli import main

    assert main(["compare", "--presets", "dense", "--budget-flops", "3e9", "--seq-len", "32", "--batch-size", "2",
                 "--data", str(code_corpus), "--bench-modes", "train", "--out", str(tmp_path), "--no-progress",
                 "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    payload = json.loads(lines[-1])
    assert payload["presets"] == ["tiny"] and lines[-2] == f"report: {tmp_path / 'report.md'}"
    assert lines[0].startswith("tiny") and f"{payload['runs']['tiny']['val_loss']:.4f}" in lines[0]
    assert main(["compare", "--presets", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown study preset 'nope'" in capsys.readouterr().err


def test_a_run_directory_with_other_settings_is_never_overwritten(tmp_path: Path, code_corpus: Path) -> None:
    cfg = study_cfg(code_corpus, presets=["dense"], bench_modes=[])
    run_study(cfg, tmp_path, progress=False)
    result = run_dir(tmp_path, "tiny", 0) / "result.json"
    before = result.read_bytes()
    with pytest.raises(CondformerError):
        run_study(study_cfg(code_corpus, presets=["dense"], bench_modes=[], seq_len=16), tmp_path, progress=False)
    assert result.read_bytes() == before


def test_synthetic_corpus_gives_compute_per_token_class(tmp_path: Path) -> None:
    from condformer.data.synthetic import CLASSES

    cfg = study_cfg("synthetic:mixed-difficulty:60", presets=["dense", "mode"], bench_modes=[],
                    analysis_windows=4, seq_len=128)
    results = run_study(cfg, tmp_path, progress=False)
    analysis = results["analysis"]["tiny-mode"]
    counts = analysis["class_tokens"]
    # only each window's leading partial line (at most one record, <= 63 characters) can be unknown
    assert set(counts) == set(CLASSES) and counts["unknown"] <= 4 * 63
    assert sum(n > 0 for c, n in counts.items() if c != "unknown") >= 4
    # 4 windows x 128 tokens minus the end-of-document tokens, which belong to no class
    assert 0.9 * 4 * 128 <= sum(counts.values()) <= 4 * 128
    layers = {(e["layer"], e["trace"]): e for e in analysis["layers"]}
    assert set(layers) == {(1, "moe_expert"), (1, "moe_routed"), (3, "moe_expert"), (3, "moe_routed")}
    for e in layers.values():  # the per-class shares average back to the overall share
        shares = e["per_class"]
        total = sum(shares[c] * counts[c] for c in CLASSES if shares[c] is not None)
        assert total / sum(counts.values()) == pytest.approx(e["computed_frac"], abs=0.02)
    for layer in (1, 3):  # each class's expert shares sum to 1 over the real experts
        e = layers[(layer, "moe_expert")]
        assert len(e["expert_load"]) == 8  # 8 real experts (the no-ops are ids -1 in the trace)
        for shares in e["experts_per_class"].values():
            if shares is not None:
                assert len(shares) == 8 and sum(shares) == pytest.approx(1.0)
        assert any(v is not None for v in e["experts_per_class"].values())
    report = (tmp_path / "report.md").read_text()
    assert "## Where each model spends compute, per token class" in report and "sum_result" in report
    assert "### `tiny-mode` layer 1: which experts each token class uses" in report
