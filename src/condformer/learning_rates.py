"""Default peak learning rates, per model width, block family and batch, from measured sweeps.

Why this exists: one shared rate biases every comparison. At 1e-3 (the old default) a 4 x 128 Pre-LN
model ends 11% worse than at its best rate, and the skipless SAS / SAS-P blocks, which want about 4x
Pre-LN's rate, 28% worse, so a study at one rate measures the rate, not the technique. A model trained
without ``--lr`` gets :func:`recommended_lr` of its own config and batch; ``condformer compare`` trains each
preset at its own.

The rate is ``REFERENCE_LR * (REFERENCE_WIDTH / d_model) * family * sqrt(tokens_per_step / REFERENCE_TOKENS)``:

* **measured** (benchmarks/RESULTS.md, "Learning rates"): at d = 128 and 16 x 256 tokens per step, Pre-LN
  decoders 4e-3, parallel 8e-3, SAS and SAS-P 1.6e-2, masked-LM encoders half their decoder's; at 8 x 128
  tokens per step (the quick study) half of those, the square-root rule for Adam (Malladi et al. 2022); the
  techniques (MoD, MoE, AltUp, exits) at the quick study's budget, each bracketed by a lower and a higher rate;
* **extrapolated, not measured** (a CPU cannot sweep them): 1/width for wider models (muP's rule for
  Adam's hidden layers), which gives 6.7e-4 for a 12 x 768 model at 4k tokens per step, near GPT-2 small's
  usual 6e-4. Sweep before a long run at another width (``benchmarks/lr_sweep.py``).
"""

from __future__ import annotations

import dataclasses
import math

from condformer.config import ModelConfig, TrainConfig

REFERENCE_LR = 4e-3
"""Best peak rate of the 4 x 128 Pre-LN decoder at 16 x 256 tokens per step (800 steps, warmup 100, cosine)."""
REFERENCE_WIDTH = 128
REFERENCE_TOKENS = 16 * 256

BLOCK_FACTORS: dict[str, float] = {"preln": 1.0, "parallel": 2.0, "sas": 4.0, "sasp": 4.0}
"""Each block family's best rate relative to Pre-LN's (skipless blocks: small gains, identity-like init)."""
ENCODER_FACTOR = 0.5
"""Masked-LM encoders' best rate relative to the decoder of the same blocks (BERT Pre-LN 2e-3, SAS-P 8e-3)."""
TECHNIQUE_FACTORS: dict[str, float] = {"mod": 1.0, "moe": 1.0, "altup": 2.0, "exits": 1.0}
"""Each technique's best rate relative to its dense twin's at the quick study's budget (swept 1e-3 .. 8e-3):
MoD, MoE and exits want the dense rate; AltUp twice it (better at 4e-3 than at 2e-3 with two seeds, worse at
8e-3)."""


FINETUNE_FACTOR = 0.1
"""A run that starts from trained weights (``init_from``) takes a tenth of the from-scratch rate. Not measured
here: the usual order of continued pretraining (a from-scratch rate undoes what the model learned). Sweep it."""


def techniques(cfg: ModelConfig) -> list[str]:
    """The conditional-computation techniques a config uses (keys of :data:`TECHNIQUE_FACTORS`)."""
    specs = cfg.layer_specs()
    found = []
    if any(s.router == "mod" for s in specs):
        found.append("mod")
    if any(s.ffn == "moe" for s in specs):
        found.append("moe")
    if cfg.altup is not None:
        found.append("altup")
    if cfg.exits is not None:
        found.append("exits")
    return found


def recommended_lr(cfg: ModelConfig, tokens_per_step: int) -> float:
    """The default peak learning rate for ``cfg`` trained on ``tokens_per_step`` tokens per optimizer step.

    A model mixing block families gets the most cautious family's factor (a rate too high for one block
    diverges; one too low only trains slower).
    """
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
    family = min(BLOCK_FACTORS.get(s.block, 1.0) for s in cfg.layer_specs())
    if cfg.kind == "encoder":
        family *= ENCODER_FACTOR
    technique = min((TECHNIQUE_FACTORS[t] for t in techniques(cfg)), default=1.0)
    batch = math.sqrt(tokens_per_step / REFERENCE_TOKENS)
    return REFERENCE_LR * (REFERENCE_WIDTH / cfg.d_model) * family * technique * batch


def with_default_lr(train_cfg: TrainConfig, model_cfg: ModelConfig, world: int = 1) -> TrainConfig:
    """``train_cfg`` with its peak rate filled in when unset (``lr: null``): the recommended rate for the
    model and the global batch (``world`` processes). A set rate is kept as it is."""
    if train_cfg.lr is not None:
        return train_cfg
    tokens = train_cfg.batch_size * train_cfg.grad_accum * train_cfg.seq_len * world
    lr = recommended_lr(model_cfg, tokens)
    if train_cfg.init_from is not None:
        lr *= FINETUNE_FACTOR
    return dataclasses.replace(train_cfg, lr=lr)
