"""CondformerForCausalLM: condformer models (dense, MoD, MoE, AltUp, exits) as transformers' own model type.

Every model is perturbed away from its init (unit norm gains and zero-initialised matrices would hide mapping
mistakes) and compared with the condformer model it wraps: logits, losses, a save_pretrained/from_pretrained
round trip, cached generation, and three Trainer steps. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from condformer.config import ModelConfig  # noqa: E402
from condformer.errors import ConfigError  # noqa: E402
from condformer.generation import SamplingConfig  # noqa: E402
from condformer.generation import generate as cf_generate  # noqa: E402
from condformer.hf.wrapper import (  # noqa: E402
    CondformerConfig,
    CondformerForCausalLM,
    from_condformer,
    register,
    save_as_transformers,
)
from condformer.model import Transformer  # noqa: E402
from condformer.presets import preset  # noqa: E402

BASE = dict(d_model=64, n_layers=2, n_heads=4, vocab_size=300, max_seq_len=64)
PRESETS = {"mod": "tiny-mod", "moe": "tiny-moe", "exit": "tiny-exit", "altup": "tiny-altup"}


def make_model(kind: str, seed: int = 0) -> Transformer:
    """A small model of ``kind``, every parameter perturbed, in eval mode; exits get a mid-range threshold."""
    if kind in ("dense", "untied"):
        cfg = ModelConfig(**BASE, tie_embeddings=kind == "dense")
    else:
        cfg = dataclasses.replace(preset(PRESETS[kind]), **BASE)
    torch.manual_seed(seed)
    model = Transformer(cfg.validate()).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    if kind == "exit":
        model.set_inference(exit_thresholds=[mid_threshold(model)])
    return model


def mid_threshold(model: Transformer) -> float:
    """A threshold at which some tokens leave at the first exit and others do not, so thresholds matter."""
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    for th in (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2, 0.3, 0.5):
        model.set_inference(exit_thresholds=[th])
        with torch.no_grad():
            frac = float(model(x).stats["layer0/exit_frac"])
        if 0.2 <= frac <= 0.8:
            return th
    raise AssertionError("no threshold splits the tokens between the exits")


def tokens(B: int, T: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 300, (B, T), generator=torch.Generator().manual_seed(seed))


def shifted(labels: torch.Tensor) -> torch.Tensor:
    return F.pad(labels[:, 1:], (0, 1), value=-100)


# -- config and registration -------------------------------------------------------------------------------
def test_config_holds_the_condformer_config_and_mirrors_it() -> None:
    cfg = make_model("mod").cfg
    hf = CondformerConfig.from_condformer_config(cfg)
    assert hf.model_type == "condformer"
    assert hf.to_model_config().to_dict() == cfg.to_dict()
    assert (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads,
            hf.max_position_embeddings, hf.tie_word_embeddings) == (300, 64, 2, 4, 64, True)
    # the condformer dict wins over a contradicting mirror, so the two can never disagree
    assert CondformerConfig(condformer=cfg.to_dict(), hidden_size=999).hidden_size == 64
    again = CondformerConfig.from_dict(json.loads(hf.to_json_string()))
    assert again.to_model_config().to_dict() == cfg.to_dict()
    assert CondformerConfig().to_model_config().to_dict() == ModelConfig().to_dict()  # transformers builds defaults
    with pytest.raises(ConfigError):
        CondformerConfig(condformer={**cfg.to_dict(), "n_heads": 5})


def test_register_is_idempotent_and_auto_classes_know_the_type() -> None:
    register()
    register()
    assert type(transformers.AutoConfig.for_model("condformer")) is CondformerConfig
    model = transformers.AutoModelForCausalLM.from_config(CondformerConfig.from_condformer_config(ModelConfig(**BASE)))
    assert type(model) is CondformerForCausalLM


def test_an_encoder_is_refused_with_one_line() -> None:
    model = Transformer(ModelConfig(**BASE, kind="encoder"))
    with pytest.raises(ValueError, match="encoder") as err:
        from_condformer(model)
    assert "\n" not in str(err.value)


# -- forward -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "mod", "moe", "exit"])
def test_logits_and_losses_match_condformer(kind: str) -> None:
    model = make_model(kind)
    hf = from_condformer(model)
    assert hf.model is model and not hf.training
    x = tokens(2, 16)
    labels = x.clone()
    labels[0, :5] = -100  # e.g. a prompt left out of the loss
    with torch.no_grad():
        ref = model(x, shifted(labels))
        out = hf(input_ids=x, labels=labels)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)
    # transformers' own causal-LM loss on the same logits: the shift follows its convention
    hf_loss = transformers.loss.loss_utils.ForCausalLMLoss(out.logits, labels, vocab_size=300)
    torch.testing.assert_close(out.loss, hf_loss, rtol=1e-6, atol=1e-6)
    assert hf(x, return_dict=False)[0].shape == (2, 16, 300)

    # training mode: condformer's train loss (objective + auxiliary losses), not the plain LM loss
    hf.train()
    torch.manual_seed(7)
    ref = model(x, shifted(labels))
    torch.manual_seed(7)
    loss = hf(input_ids=x, labels=labels).loss
    assert torch.equal(loss, ref.train_loss)
    if kind in ("moe", "exit"):  # MoE adds balance and z losses; exits train on every exit's loss
        assert not torch.allclose(ref.train_loss, ref.loss)


@pytest.mark.parametrize("kind", ["dense", "mod", "exit"])
def test_left_padded_rows_get_the_logits_of_their_prompt_alone(kind: str) -> None:
    model = make_model(kind)
    hf = from_condformer(model)
    x = tokens(2, 12)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    x[1, :4] = 0
    with torch.no_grad():
        out = hf(input_ids=x, attention_mask=mask).logits
        alone = model(x[1:, 4:]).logits
    torch.testing.assert_close(out[1, 4:], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[0], model(x[:1]).logits[0], rtol=0, atol=1e-5)


# -- save_pretrained / from_pretrained ---------------------------------------------------------------------
class _Warnings(logging.Handler):
    """Collects transformers' log warnings (its loggers do not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("kind", ["dense", "untied", "mod", "moe", "exit", "altup"])
def test_save_as_transformers_loads_back_with_identical_logits(kind: str, tmp_path: Path) -> None:
    model = make_model(kind)
    out = save_as_transformers(model, tmp_path / "m")
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]  # never pickles
    assert json.loads((out / "config.json").read_text())["model_type"] == "condformer"

    warned = _Warnings()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(warned)
    try:
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    finally:
        hf_logger.removeHandler(warned)
    assert type(loaded) is CondformerForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not warned.messages  # e.g. tied weights "present with different values", missing keys
    assert not loaded.training
    tied = loaded.model.head.weight is loaded.model.embed.weight
    assert tied == (kind != "untied")
    # non-persistent buffers (rotary frequencies, exit depths): rebuilt, not left as transformers' empty memory
    for (name, a), (_, b) in zip(model.named_buffers(), loaded.model.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    x = tokens(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert loaded.model.inference_settings() == model.inference_settings()
    if kind == "exit":  # the thresholds (set at run time, not in the model config) decide the logits
        full = make_model("exit")
        full.set_inference(exit_thresholds=None)
        with torch.no_grad():
            assert not torch.allclose(full(x).logits, model(x).logits)


def test_a_tokenizer_is_saved_and_its_eos_stops_generation(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    model = make_model("dense")
    prompt = [5, 6, 7, 8]
    cont = cf_generate(model, [prompt], SamplingConfig(max_new_tokens=8, greedy=True))[0]
    k = next(i for i in range(1, 8) if cont[i] not in cont[:i])
    vocab = {f"w{i}": i for i in range(300)}
    inner = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    inner.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, eos_token=f"w{cont[k]}", pad_token="w299",
                                               unk_token="w0")
    out = save_as_transformers(model, tmp_path / "m", tokenizer=tok)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert (loaded.config.eos_token_id, loaded.config.pad_token_id) == (cont[k], 299)
    again = transformers.AutoTokenizer.from_pretrained(out)
    ids = again(" ".join(f"w{i}" for i in prompt), return_tensors="pt")["input_ids"]
    assert ids.tolist() == [prompt]
    got = loaded.generate(ids, max_new_tokens=8)  # eos from the saved config, as transformers models do
    assert got[0].tolist() == prompt + cont[:k + 1]

    from condformer.data.tokenizer import ByteTokenizer

    byte_dir = save_as_transformers(model, tmp_path / "b", tokenizer=ByteTokenizer())
    config = json.loads((byte_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (257, 258, 256)


# -- generate ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "mod", "exit"])
def test_greedy_generate_matches_condformer_and_batches_left_padded(kind: str) -> None:
    model = make_model(kind)
    hf = from_condformer(model)
    x = tokens(1, 6)
    got = hf.generate(x, max_new_tokens=8)
    ref = cf_generate(model, x.tolist(), SamplingConfig(max_new_tokens=8, greedy=True))
    assert got.dtype == torch.long and got.shape == (1, 14)
    assert got[0, :6].tolist() == x[0].tolist() and got[0, 6:].tolist() == ref[0]
    if kind == "exit":  # adaptive depth really ran: some tokens left early
        stats: dict = {}
        cf_generate(model, x.tolist(), SamplingConfig(max_new_tokens=8, greedy=True), stats=stats)
        assert 1 in stats["exit_depths"]

    short, long = tokens(1, 4, seed=8)[0].tolist(), tokens(1, 9, seed=9)[0].tolist()
    batch = torch.tensor([[0] * 5 + short, long])
    mask = torch.tensor([[0] * 5 + [1] * 4, [1] * 9])
    got = hf.generate(batch, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(got[:, :9], batch)
    for row, prompt in zip(got, (short, long), strict=True):
        alone = hf.generate(torch.tensor([prompt]), max_new_tokens=8)
        assert row[9:].tolist() == alone[0, len(prompt):].tolist()


def test_rows_that_stop_at_eos_are_right_padded() -> None:
    model = make_model("dense")
    hf = from_condformer(model)
    a, b = [11, 12, 13, 14, 15], [40, 41, 42, 43, 44]
    cont = cf_generate(model, [a], SamplingConfig(max_new_tokens=8, greedy=True))[0]
    k = next(i for i in range(1, 8) if cont[i] not in cont[:i])
    eos = cont[k]
    got = hf.generate(torch.tensor([a, b]), max_new_tokens=8, eos_token_id=eos, pad_token_id=299)
    rows = cf_generate(model, [a, b], SamplingConfig(max_new_tokens=8, greedy=True, eos_id=eos))
    assert rows[0] == cont[:k + 1]
    width = max(len(r) for r in rows)
    assert got.shape == (2, 5 + width)
    for row, prompt, new in zip(got.tolist(), (a, b), rows, strict=True):
        assert row == prompt + new + [299] * (width - len(new))
    assert hf.generate(torch.tensor([a]), max_new_tokens=8, eos_token_id=[eos])[0].tolist() == a + cont[:k + 1]


def test_sampling_options_reach_condformers_decoder() -> None:
    model = make_model("mod")
    hf = from_condformer(model)
    x = tokens(2, 5)
    torch.manual_seed(123)
    got = hf.generate(x, do_sample=True, temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=8)
    torch.manual_seed(123)
    ref = cf_generate(model, x.tolist(), SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=40, top_p=0.9))
    assert got[:, 5:].tolist() == ref
    greedy = hf.generate(x, max_new_tokens=8)
    assert torch.equal(hf.generate(x, do_sample=True, top_k=1, max_new_tokens=8), greedy)
    assert torch.equal(hf.generate(x, do_sample=True, top_p=1e-6, max_new_tokens=8), greedy)
    gc = transformers.GenerationConfig(do_sample=True, top_k=1, max_new_tokens=5)
    assert torch.equal(hf.generate(x, generation_config=gc), greedy[:, :10])
    assert torch.equal(hf.generate(x, max_length=9), greedy[:, :9])  # transformers: max_length counts the prompt


def test_a_streamer_sees_the_prompt_then_each_token() -> None:
    hf = from_condformer(make_model("dense"))

    class Recorder:
        def __init__(self) -> None:
            self.seen: list[list[int]] = []
            self.ended = False

        def put(self, value: torch.Tensor) -> None:
            self.seen.append(value.flatten().tolist())

        def end(self) -> None:
            self.ended = True

    rec = Recorder()
    got = hf.generate(tokens(1, 4), max_new_tokens=5, streamer=rec)
    assert rec.ended and len(rec.seen) == 6 and sum(rec.seen, []) == got[0].tolist()


@pytest.mark.parametrize("call, needle", [
    (dict(num_beams=4), "num_beams"),
    (dict(repetition_penalty=1.3), "repetition_penalty"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(generation_config=transformers.GenerationConfig(num_beams=4)), "num_beams"),
    (dict(frobnicate=True), "frobnicate"),
    (dict(eos_token_id=[1, 2]), "eos_token_id"),
    (dict(max_new_tokens=61), "max_seq_len"),
    (dict(attention_mask=torch.tensor([[1, 1, 1, 0]])), "left padding"),
])
def test_unsupported_generate_options_are_one_line_errors(call: dict, needle: str) -> None:
    hf = from_condformer(make_model("dense"))
    with pytest.raises(ValueError, match=needle) as err:
        hf.generate(tokens(1, 4), **call)
    assert "\n" not in str(err.value)


def test_neutral_generate_options_are_accepted() -> None:
    hf = from_condformer(make_model("dense"))
    x = tokens(1, 4)
    greedy = hf.generate(x, max_new_tokens=4)
    same = hf.generate(x, max_new_tokens=4, num_beams=1, use_cache=False, repetition_penalty=1.0,
                       logits_processor=[], generation_config=transformers.GenerationConfig())
    assert torch.equal(same, greedy)


# -- Trainer -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["moe", "exit"])
def test_trainer_trains_it(kind: str, tmp_path: Path) -> None:
    model = make_model(kind)
    hf = from_condformer(model)
    before = {k: v.detach().clone() for k, v in hf.named_parameters()}
    data = [{"input_ids": row, "labels": row} for row in tokens(8, 16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                          report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                                          learning_rate=1e-3, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=hf, args=args, train_dataset=data)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses) and math.isfinite(result.training_loss)
    changed = [k for k, v in hf.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert len(changed) > len(before) // 2
    assert hf.model is model  # the condformer model itself was trained
