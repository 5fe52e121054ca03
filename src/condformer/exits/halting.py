"""Exit decisions: CALM's confidences, LayerSkip's dropout rate, DAT's oracles and halting module.

Everything here reads an exit's *readout* (what the head reads: the residual state, or AltUp's reduced
blocks), so it works on every residual stream.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from condformer.config import ModelConfig
from condformer.losses import wide as _wide


def layer_dropout_rate(p_max: float, layer: int, n_layers: int) -> float:
    """LayerSkip's rate for layer ``layer`` (0-based): 0 at the first layer, ``p_max`` at the last."""
    if n_layers < 2:
        return 0.0
    return p_max * (math.exp(layer * math.log(2) / (n_layers - 1)) - 1)


def confidence(kind: str, logits_BTV: torch.Tensor, h_BTD: torch.Tensor, h_prev_BTD: torch.Tensor) -> torch.Tensor:
    """CALM's confidence of an exit, per token (B, T), in float32 or wider."""
    if kind == "cosine":  # needs no logits: the head runs only where a token exits
        wide = torch.promote_types(h_BTD.dtype, torch.float32)
        return F.cosine_similarity(h_BTD.to(wide), h_prev_BTD.to(wide), dim=-1)
    wide = torch.promote_types(logits_BTV.dtype, torch.float32)
    probs = logits_BTV.to(wide).softmax(dim=-1)
    if kind == "softmax":
        return probs.max(dim=-1).values
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def rbf_smooth(x_BTE: torch.Tensor, valid_BT: torch.Tensor, sigma: float) -> torch.Tensor:
    """x convolved over the valid positions with the RBF kernel exp(-(t - t')^2 / sigma) (DAT's smoothing).

    A convolution, as in the paper, not a kernel-weighted average: the smoothed score of a token in the
    middle of a confident stretch grows with the stretch, which is what lets it outweigh the depth penalty.
    (The two pick different exits once the penalty is > 0.)
    """
    T = x_BTE.shape[1]
    t = torch.arange(T, device=x_BTE.device, dtype=x_BTE.dtype)
    kernel_TT = torch.exp(-((t[:, None] - t[None, :]) ** 2) / sigma)
    return torch.einsum("ts,bse->bte", kernel_TT, x_BTE * valid_BT.to(x_BTE.dtype)[..., None])


def prefix_mean(x_BTD: torch.Tensor, valid_BT: torch.Tensor | None) -> torch.Tensor:
    """The mean of x over each position's valid prefix 0..t (B, T, D): sequence pooling a decoder may use.

    Accumulated in at least float32 (a bf16 running sum loses the late tokens); padding is left out, and a
    position with no valid token before it gets 0.
    """
    x = _wide(x_BTD)
    if valid_BT is not None:
        x = x * valid_BT.to(x.dtype)[..., None]
        count_BT = valid_BT.to(x.dtype).cumsum(dim=1)
    else:
        count_BT = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).expand(x.shape[:2])
    return x.cumsum(dim=1) / count_BT.clamp_min(1)[..., None]


def oracle_exits(ll_BTE: torch.Tensor, correct_BTE: torch.Tensor, depths_E: torch.Tensor, valid_BT: torch.Tensor,
                 kind: str, lam: float, sigma: float, per_sequence: bool) -> torch.Tensor:
    """The oracle's exit index: argmax_n (score_n - lam * depth_n), per token (B, T) or per sequence (B,).

    ``score`` is the target's log-likelihood at each exit (``likelihood``), its RBF-smoothed version
    (``smoothed``), whether the exit's argmax is the target (``correctness``) or that smoothed. Per
    sequence, scores are summed over the sequence's valid tokens. Ties go to the shallower exit.
    """
    score = ll_BTE if kind in ("likelihood", "smoothed") else correct_BTE.to(ll_BTE.dtype)
    if kind.startswith("smoothed"):
        score = rbf_smooth(score, valid_BT, sigma)
    penalty = lam * depths_E.to(score.dtype)
    if per_sequence:
        return ((score * valid_BT[..., None]).sum(dim=1) - penalty).argmax(dim=-1)
    return (score - penalty).argmax(dim=-1)


class Halting(nn.Module):
    """A learned depth estimator over the exits (see the module docstring for the three kinds)."""

    def __init__(self, cfg: ModelConfig, kind: str, n_exits: int) -> None:
        super().__init__()
        self.kind, self.n_exits = kind, n_exits
        d = cfg.head_in_dim  # it reads the stream's readout (K*d for AltUp's concat)
        rows = n_exits - 1 if kind == "geometric" else n_exits
        self.weight = nn.Parameter(torch.randn(rows, d) * cfg.init_std)
        self.bias = nn.Parameter(torch.zeros(rows))

    def log_q_first(self, h1_BTD: torch.Tensor, valid_BT: torch.Tensor | None) -> torch.Tensor:
        """log q_t(n) (B, T, E) from the first-layer states: ``token`` from h1_t, ``sequence`` from their mean
        over the prefix 0..t (causal: a token's depth never depends on later tokens)."""
        if self.kind == "sequence":
            h1_BTD = prefix_mean(h1_BTD, valid_BT)
        return self.log_q(h1_BTD)

    def log_q(self, pooled_xD: torch.Tensor) -> torch.Tensor:
        """log q(n) (..., E) of a (pooled) first-layer state (..., D)."""
        return _wide(F.linear(pooled_xD, self.weight.to(pooled_xD.dtype), self.bias.to(pooled_xD.dtype))).log_softmax(
            dim=-1)

    def halt_logit(self, k: int, h_BTD: torch.Tensor) -> torch.Tensor:
        """``geometric``: the logit of chi at exit k (B, T)."""
        return _wide(h_BTD @ self.weight[k].to(h_BTD.dtype) + self.bias[k].to(h_BTD.dtype))

    def log_q_geometric(self, exit_states: list[torch.Tensor]) -> torch.Tensor:
        """log q_t(n) (B, T, E): chi_n prod_{n'<n} (1 - chi_n'), the last exit taking the remaining mass."""
        z = torch.stack([self.halt_logit(k, h) for k, h in enumerate(exit_states[: self.n_exits - 1])], dim=-1)
        log_stop, log_go = F.logsigmoid(z), F.logsigmoid(-z)
        before = torch.cumsum(log_go, dim=-1) - log_go  # sum over n' < n of log(1 - chi_n')
        return torch.cat([log_stop + before, log_go.sum(dim=-1, keepdim=True)], dim=-1)
