"""Expert routers: who decides which experts a token visits, and with what gate.

In the seed document's taxonomy (spec/moe.md): ``topk``, ``switch`` and ``noisy_topk`` are learned and
hard; ``hash`` and ``lsh`` are non-learned and hard; ``soft`` is learned and soft (every expert computed,
the baseline); ``expert_choice`` is learned and hard, with the choice reversed (experts pick tokens).

A token-choice router maps x (N, D) to a :class:`Routing`: K expert ids and gates per token, plus what
the balance losses need. Learned routers compute their logits in float32 outside autocast: top-k
decisions and the softmax are sensitive to bf16 rounding (ST-MoE's "selective precision").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """One routing decision for N tokens.

    expert_NK: chosen expert ids; ids >= the number of real experts are no-op experts (integrated MoDE).
    gate_NK: each choice's output weight (float32).
    logits_NE / probs_NE: the learned router's logits and probabilities (None for hash and LSH).
    noisy: (clean logits, noisy logits, noise std), the noisy top-k router's inputs to the load loss.
    """

    expert_NK: torch.Tensor
    gate_NK: torch.Tensor
    logits_NE: torch.Tensor | None = None
    probs_NE: torch.Tensor | None = None
    noisy: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def float32_linear(x_ND: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(x_ND.dtype, torch.float32)
    with torch.autocast(x_ND.device.type, enabled=False):
        return F.linear(x_ND.to(dtype), weight.to(dtype))


class LinearRouter(nn.Module):
    """logits = x W^T over ``n_choices`` experts (real and no-op)."""

    def __init__(self, d_model: int, n_choices: int, init_std: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_choices, d_model))
        nn.init.normal_(self.weight, std=init_std)

    def logits(self, x_ND: torch.Tensor) -> torch.Tensor:
        return float32_linear(x_ND, self.weight)


class TopKRouter(LinearRouter):
    """Token-choice top-k (GShard, Mixtral; Switch with k = 1): softmax over experts, keep the k largest.

    Gates are the chosen probabilities, renormalised to sum to 1 when ``renormalize`` and k > 1 (with
    k = 1 renormalising would make every gate 1 and cut the router off from the language-model loss).
    With aux-loss-free balancing (DeepSeek-V3) the *selection* uses probs + bias, the gates do not.
    """

    def __init__(self, d_model: int, n_choices: int, init_std: float, k: int, renormalize: bool) -> None:
        super().__init__(d_model, n_choices, init_std)
        self.k, self.renormalize = k, renormalize
        self.serve_k: int | None = None  # experts per token at inference (None: k); see served_gates

    def forward(self, x_ND: torch.Tensor, bias_E: torch.Tensor | None = None) -> Routing:
        logits = self.logits(x_ND)
        probs = logits.softmax(dim=-1)
        select = probs if bias_E is None else probs + bias_E
        k = self.k if self.training or self.serve_k is None else self.serve_k
        expert = select.topk(max(k, self.k), dim=-1).indices
        gate = probs.gather(-1, expert)
        if k != self.k:
            trained = gate[:, :self.k].sum(dim=-1, keepdim=True)
            target = torch.ones_like(trained) if self.renormalize and self.k > 1 else trained
            return Routing(expert[:, :k], served_gates(gate[:, :k], target), logits, probs)
        if self.renormalize and self.k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return Routing(expert, gate, logits, probs)


def served_gates(gate_NK: torch.Tensor, mass_N1: torch.Tensor) -> torch.Tensor:
    """The gates of k experts served instead of the trained number, rescaled to the total weight the trained
    choice gave the experts (1 for renormalised top-k, the chosen probability mass otherwise): serving top-1 of a
    top-2 model then adds the first expert at the full weight the two shared, not at its half."""
    return gate_NK * (mass_N1 / gate_NK.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(gate_NK.dtype).tiny))


class NoisyTopKRouter(LinearRouter):
    """Shazeer et al. 2017: H = x W_g + N(0, 1) * softplus(x W_noise); gates = softmax(KeepTopK(H, k)).

    Noise only in training; evaluation routes on the clean logits (deterministic, causal). W_noise starts
    at zero, as in the paper, so the noise scale is learned from softplus(0) = 0.69.
    """

    def __init__(self, d_model: int, n_choices: int, init_std: float, k: int) -> None:
        super().__init__(d_model, n_choices, init_std)
        self.k = k
        self.serve_k: int | None = None  # experts per token at inference (None: k); gates re-softmaxed over them
        self.noise_weight = nn.Parameter(torch.zeros(n_choices, d_model))

    def forward(self, x_ND: torch.Tensor, bias_E: torch.Tensor | None = None) -> Routing:
        clean = self.logits(x_ND)
        noisy, std = clean, None
        if self.training:
            std = F.softplus(float32_linear(x_ND, self.noise_weight)) + 1e-2
            noisy = clean + torch.randn_like(clean) * std
        select = noisy if bias_E is None else noisy + bias_E
        k = self.k if self.training or self.serve_k is None else self.serve_k
        expert = select.topk(k, dim=-1).indices
        gate = noisy.gather(-1, expert).softmax(dim=-1)
        probs = noisy.softmax(dim=-1)
        return Routing(expert, gate, clean, probs, None if std is None else (clean, noisy, std))


class HashRouter(nn.Module):
    """Roller et al. 2021: expert = table[token id], a fixed random table with equal shares per expert.

    No parameters, no balance loss; the table is a buffer (saved with the model) drawn from a seed fixed by
    the layer index, so two models built from one config route identically.
    """

    def __init__(self, vocab_size: int, n_experts: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        table = torch.empty(vocab_size, dtype=torch.long)
        table[torch.randperm(vocab_size, generator=g)] = torch.arange(vocab_size) % n_experts
        self.register_buffer("table", table)

    def forward(self, tokens_N: torch.Tensor) -> Routing:
        expert = self.table[tokens_N][:, None]
        return Routing(expert, torch.ones(expert.shape, device=expert.device))


class LSHRouter(nn.Module):
    """Random-hyperplane LSH: sign bits of x against fixed random planes form a bucket; bucket mod E is the expert.

    Nearby hidden states share buckets, so similar tokens meet the same expert without learning a router.
    With E a power of two the buckets map onto experts exactly; otherwise 3 extra bits keep shares near-equal.
    """

    def __init__(self, d_model: int, n_experts: int, seed: int) -> None:
        super().__init__()
        bits = self.n_bits(n_experts)
        self.n_experts = n_experts
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("planes", torch.randn(d_model, bits, generator=g))
        self.register_buffer("powers", 2 ** torch.arange(bits))

    @staticmethod
    def n_bits(n_experts: int) -> int:
        bits = math.ceil(math.log2(n_experts)) if n_experts > 1 else 1
        return bits if 2 ** bits == n_experts else bits + 3

    def forward(self, x_ND: torch.Tensor) -> Routing:
        bits = (float32_linear(x_ND, self.planes.t()) > 0).long()
        expert = ((bits * self.powers).sum(dim=-1) % self.n_experts)[:, None]
        return Routing(expert, torch.ones(expert.shape, device=expert.device))
