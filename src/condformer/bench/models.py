"""The models under test and their operations: each becomes a zero-argument callable the timer can repeat.

Building happens in one place so that A, B and a memory child get the same seed, the same inputs and the
same op; the timing and memory code then never needs to know which mode it measures.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from condformer.bench.config import BenchConfig
from condformer.config import ModelConfig, TrainConfig
from condformer.errors import ConfigError
from condformer.model import Transformer, build_model


@dataclass
class _Bench:
    """One model under test: its op as a zero-argument callable, plus what timing needs to know."""

    name: str
    label: str  # the preset name, or the config's name
    cfg: ModelConfig
    model: Transformer
    step: Callable[[], None]
    sync: Callable[[], None]
    device: torch.device
    optimizer: torch.optim.Optimizer | None = None  # train mode: the memory probe pre-allocates its state
    checkpoint: str | None = None  # weights loaded from this checkpoint (else the bench seed's init)
    baseline: bool = False  # model B: generate mode decodes it at full depth (no exits, no speculation)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available; use --device cpu or auto")
    return dev


def _resolve_models(cfg: BenchConfig) -> list[tuple[str, str, ModelConfig, str | None]]:
    """[(result key, label, config, checkpoint)] for A and, if given, B. Equal names get a ``#2`` suffix on B.

    A string that names an existing directory is read as a run (or checkpoint) directory: its config is
    used and its trained weights are loaded, which is what a benchmark of learned routing decisions needs.
    """
    from condformer.checkpoint import read_checkpoint
    from condformer.config_files import load_config_file
    from condformer.presets import preset

    out: list[tuple[str, str, ModelConfig, str | None]] = []
    for which in (cfg.preset, cfg.vs):
        if which is None:
            continue
        ck_path = None
        if isinstance(which, str) and os.path.isdir(which):
            ck = read_checkpoint(which)
            mcfg, ck_path = ck.model_cfg, str(ck.path)
            mcfg.name = os.path.basename(os.path.normpath(which)) or mcfg.name
        elif isinstance(which, str) and which.endswith((".json", ".yaml", ".yml")):
            mcfg = load_config_file(which)[0]
        elif isinstance(which, str):
            mcfg = preset(which)
        elif isinstance(which, ModelConfig):
            mcfg = which.validate()
        else:
            raise ConfigError(f"a bench model must be a preset name or a ModelConfig, got {type(which).__name__}")
        label = mcfg.name
        key = label if not out or out[0][0] != label else f"{label}#2"
        if cfg.seq_len > mcfg.max_seq_len:
            raise ConfigError(f"seq_len {cfg.seq_len} exceeds model '{label}' max_seq_len {mcfg.max_seq_len}; "
                              f"lower seq_len")
        if cfg.mode == "generate" and not mcfg.causal:
            raise ConfigError(f"generate mode needs a decoder; model '{label}' is an encoder")
        out.append((key, label, mcfg, ck_path))
    return out


def _autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _make_inputs(cfg: BenchConfig, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) identical for both models and across runs: random from a fixed generator, or
    fixed windows of the corpus ``cfg.data`` (byte tokens) when a routing decision should see real text."""
    if cfg.data is not None:
        from condformer.data import prepare_data

        data = prepare_data(cfg.data, "byte")
        if data.tokenizer.vocab_size > vocab:
            raise ConfigError(f"bench data uses the byte tokenizer ({data.tokenizer.vocab_size} ids) but a model has "
                              f"vocab_size {vocab}; bench without --data")
        return data.get_batch("val", 0, cfg.batch_size, cfg.seq_len, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=g)
    targets = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=g)
    return tokens, targets


def _build(key: str, label: str, mcfg: ModelConfig, cfg: BenchConfig, device: torch.device,
           tokens: torch.Tensor, targets: torch.Tensor, checkpoint: str | None = None,
           baseline: bool = False) -> _Bench:
    """Build a model with the bench seed (so A and B start from the same RNG state) and its op."""
    from condformer.generation import SamplingConfig, generate
    from condformer.optim import make_optimizer

    torch.manual_seed(cfg.seed)
    model = build_model(mcfg)
    if checkpoint is not None:
        from condformer.checkpoint import load_weights, read_checkpoint

        load_weights(read_checkpoint(checkpoint), model)
    model = model.to(device)
    # forward: the requested routing; generate: always the causal decisions (top-k cannot decode)
    model.set_inference(routing=cfg.eval_routing if cfg.mode == "forward" else "causal", missing="ignore")
    if not baseline and cfg.inference:
        model.set_inference(**cfg.inference)  # a setting this model lacks is a one-line error
    x, y = tokens.to(device), targets.to(device)
    dtype = cfg.dtype
    # the compiled module shares the model's parameters; the first (warm-up) calls compile it
    run = torch.compile(model) if cfg.compile else model
    opt: torch.optim.Optimizer | None = None

    if cfg.mode == "forward":
        model.eval()

        def step() -> None:
            with torch.no_grad(), _autocast(dtype, device):
                run(x)

    elif cfg.mode == "train":
        model.train()
        # the trainer's AdamW and param groups (max_steps only satisfies TrainConfig's budget rule)
        adamw = opt = make_optimizer(model, TrainConfig(max_steps=1, lr=1e-3))  # the rate does not change the time

        def step() -> None:
            with _autocast(dtype, device):
                out = run(x, y)
                loss = out.train_loss
            loss.backward()
            adamw.step()
            adamw.zero_grad(set_to_none=True)

    else:
        model.eval()
        prompts = tokens[:, : cfg.seq_len - cfg.new_tokens].tolist()
        sampling = SamplingConfig(max_new_tokens=cfg.new_tokens, greedy=True)
        speculative = None if baseline else cfg.speculative
        if getattr(model, "exits", None) is not None and model.exits.halting is None:
            if baseline:
                # full depth through the same early-exit decoder with every exit switched off: the ratio then
                # measures exiting (and its checks) alone, whatever the two decode paths' own overheads
                model.set_inference(exit_thresholds=[None] * (model.exits.n_exits - 1))
            elif cfg.exit_threshold is not None:
                model.set_inference(exit_thresholds=cfg.exit_threshold)

        def step(stats: dict | None = None) -> None:
            with _autocast(dtype, device):
                generate(model, prompts, sampling, pad_id=0, speculative=speculative, draft_tokens=cfg.draft_tokens,
                         draft_confidence=None if speculative is None else cfg.draft_confidence,
                         stats=stats)

    def sync() -> None:  # the op's device, not merely the current one
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return _Bench(key, label, mcfg, model, step, sync, device, opt, checkpoint, baseline)
