"""`condformer import` / `export` / `train --init-from` as a user runs them, on a tiny random Llama."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from tests.e2e.test_cli import cf, last_json

pytest.importorskip("transformers")
from tests.hf.models import hf_config, perturbed, save_model_dir, transformers  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {**os.environ, "CONDFORMER_CACHE": str(tmp_path_factory.mktemp("cache")), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory, env: dict) -> tuple[Path, Path, object, dict]:
    root = tmp_path_factory.mktemp("hf-cli")
    hf = perturbed(hf_config("llama"), seed=20)
    src = save_model_dir(hf, root / "src")
    report = last_json(cf("import", str(src), "--out", str(root / "run"), "--json", env=env))
    return root, src, hf, report


def test_import_reports_the_model(imported) -> None:
    root, _, hf, report = imported
    assert report["model_type"] == "llama" and report["n_layers"] == 2 and report["vocab_size"] == 320
    assert report["params"] == sum(p.numel() for p in hf.parameters()) and report["seconds"] > 0
    assert (root / "run" / "config.json").is_file()


def test_generate_equals_transformers_greedy(imported, env: dict) -> None:
    root, src, hf, _ = imported
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(src)
    prompt = "def f(x):\n    return"
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    got = last_json(cf("generate", str(root / "run"), "--prompt", prompt, "--greedy", "--max-new-tokens", "8",
                       "--json", env=env))
    assert got["text"] == tok.decode(want, skip_special_tokens=True)


def test_eval_flops_inspect_and_fine_tuning_read_the_run(imported, env: dict, code_corpus: Path) -> None:
    root, *_ = imported
    run = str(root / "run")
    before = last_json(cf("eval", run, "--data", str(code_corpus), "--json", env=env))
    assert before["step"] == 0 and 0 < before["val_loss"] < 20
    flops = last_json(cf("flops", "--preset", run, "--seq-len", "64", "--json", env=env))
    assert flops["params"] > 0
    assert cf("inspect", run, "--out", str(root / "inspect.png"), env=env).returncode == 0
    # one step at a negligible rate: the fine-tuned run starts from the imported weights, so its first
    # evaluation (same corpus, windows and tokenizer) equals the imported model's
    ft = root / "ft"
    res = last_json(cf("train", "--init-from", run, "--data", str(code_corpus), "--max-steps", "1", "--lr", "1e-12",
                       "--seq-len", "128", "--batch-size", "16", "--eval-every", "1", "--out", str(ft), "--no-progress",
                       "--json", env=env))
    assert res["val_loss"] == pytest.approx(before["val_loss"], abs=1e-5)
    # the fine-tuned run keeps its own copy of the tokenizer: it works without the source run
    moved = root / "moved-away"
    shutil.move(run, moved)
    try:
        again = last_json(cf("eval", str(ft), "--data", str(code_corpus), "--json", env=env))
        assert again["val_loss"] == pytest.approx(res["val_loss"], abs=1e-6)
        assert cf("train", "--resume", "--out", str(ft), "--no-progress", env=env).returncode == 0
    finally:
        shutil.move(moved, run)
    refused = cf("train", "--init-from", run, "--preset", "tiny", "--out", str(root / "x"), env=env)
    assert refused.returncode == 2 and "--init-from" in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_export_loads_in_transformers(imported, env: dict) -> None:
    root, _, hf, _ = imported
    res = last_json(cf("export", str(root / "run"), "--out", str(root / "exported"), "--json", env=env))
    assert res["format"] == "native" and res["architecture"] == "LlamaForCausalLM"
    back = transformers.AutoModelForCausalLM.from_pretrained(root / "exported").eval()
    x = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, rtol=1e-5, atol=1e-5)


def test_bad_sources_are_one_line_errors(tmp_path: Path, env: dict) -> None:
    missing = cf("import", str(tmp_path / "nothing"), "--out", str(tmp_path / "run"), env=env)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "does not exist" in missing.stderr and not (tmp_path / "run").exists()


def test_a_new_model_and_a_study_tokenise_with_an_imported_runs_tokenizer(imported, env: dict, code_corpus: Path,
                                                                          tmp_path: Path) -> None:
    from condformer.checkpoint import read_checkpoint
    from condformer.compare.config import StudyConfig
    from condformer.compare.study import _train_config

    root, *_ = imported
    kind = f"run:{root / 'run'}"
    res = last_json(cf("train", "--preset", "tiny", "--tokenizer", kind, "--data", str(code_corpus),
                       "--max-steps", "1", "--seq-len", "32", "--batch-size", "2", "--out", str(tmp_path / "new"),
                       "--no-progress", "--json", env=env))
    assert res["steps"] == 1
    ck = read_checkpoint(tmp_path / "new")
    assert ck.state["tokenizer"]["kind"] == "hf" and ck.model_cfg.vocab_size == ck.state["tokenizer"]["vocab_size"]
    assert _train_config(StudyConfig(tokenizer=kind), 0, 1e-3).tokenizer == kind  # compare --tokenizer reaches train
    bad = cf("train", "--preset", "tiny", "--tokenizer", f"run:{tmp_path / 'nowhere'}", "--max-steps", "1",
             "--out", str(tmp_path / "bad"), env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "nowhere" in bad.stderr
