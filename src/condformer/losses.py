"""The one language-model loss: cross-entropy over targets that are not ``IGNORE_INDEX``, in at least float32.

Every place that scores logits (the plain forward, every exit, mixed exit training, calibration) calls
:func:`lm_loss`, so padding, masked-LM positions and bf16 logits are treated the same everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value (padding, unmasked MLM positions) carry no loss


def wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 logits are too coarse for a softmax); float64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor | None) -> torch.Tensor | None:
    """Mean cross-entropy over the targets != IGNORE_INDEX; None without targets."""
    if targets_BT is None:
        return None
    return F.cross_entropy(wide(logits_BTV).flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE_INDEX)


def target_log_likelihood(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """log p(y_t) per token (B, T); 0 where the target is ignored."""
    logp = wide(logits_BTV).log_softmax(dim=-1)
    valid = targets_BT != IGNORE_INDEX
    ll = logp.gather(-1, targets_BT.clamp(min=0)[..., None]).squeeze(-1)
    return ll * valid
