"""AltUp and Recycled-AltUp (Baykal et al., NeurIPS 2023): a K-times wider token state, a d-wide layer.

The residual stream is K blocks x_1..x_K of width d, stored as one (K, B, T, d) tensor so that each block
is a contiguous (B, T, d) slice a layer can read without a copy. Every layer

1. **predicts** every block from all blocks: ``x_hat_i = sum_j p_ij x_j`` (K x K scalars per layer);
2. **computes** the ordinary d-wide layer (any block, router and FFN: MoD and MoE included) on the
   activated block ``j*`` (the old block as in the paper, or its prediction as in Gemma 3n);
3. **corrects** every block with the layer's innovation: ``x_i = x_hat_i + g_i (out - x_hat_j*)``.

So the layer's FLOPs stay those of width d while the representation is K*d wide; the extra work is
O(K^2 d) per token per layer, against O(K^2 d^2) for a model really K times wider. Attention only ever
sees one d-wide block, so the KV cache is the dense model's: cached generation needs nothing special,
because predict and correct act on each token independently.

Coefficients start at the identity (p = I, g = 1): every block then follows the dense model's residual
stream, which the paper found essential (random coefficients were catastrophic), and which makes a
Recycled-AltUp model compute its dense twin's function at initialisation (with the ``mean`` output).

``coefficients: gemma`` is Gemma 3n's input-dependent variant (transformers' ``Gemma3nTextAltUp``):
``m = tanh(W_r RMSNorm(x_active) / d)``, ``x_hat_i = x_i + sum_j C_ij(m) x_j`` with ``C = W_p m``
reshaped to K x K, and ``g_i = 1 + (W_c m')_i`` with ``m'`` from the layer's output; W_p and W_c are
clipped to +-coef_clip in training. With zero-initialised W_p and W_c it too starts at the identity.

Predict and correct run outside autocast in the stream's dtype: under bf16 autocast a matmul would round
the (fp32) residual stream to bf16 at every layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from condformer.config import AltUpConfig, ModelConfig
from condformer.context import Context
from condformer.layers.norms import RMSNorm
from condformer.streams.base import ResidualStream


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    return torch.autocast(x.device.type, enabled=False)


def _token_mean(v_BTX: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Mean of a per-token tensor over the real (non-padding) tokens, as a detached float32 tensor."""
    v = v_BTX.detach().float()
    if ctx.valid_BT is None:
        return v.mean((0, 1))
    w = ctx.valid_BT.to(v.dtype).view(*ctx.valid_BT.shape, *([1] * (v.dim() - 2)))
    return (v * w).sum((0, 1)) / w.sum().clamp_min(1)


class ScalarCoefficients(nn.Module):
    """The paper's coefficients: one K x K prediction matrix ``p`` and K correction gains ``g`` per layer."""

    no_weight_decay = ("p", "g")  # decaying them would pull the stream away from the identity for nothing

    def __init__(self, k: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.eye(k))
        self.g = nn.Parameter(torch.ones(k))

    def predict(self, x_KBTD: torch.Tensor, active: int) -> tuple[torch.Tensor, None]:
        """Every block's prediction (K, B, T, d); the second value is for :meth:`effective`."""
        K = x_KBTD.shape[0]
        with _no_autocast(x_KBTD):  # one (K, K) @ (K, B*T*d) matmul
            return (self.p.to(x_KBTD.dtype) @ x_KBTD.reshape(K, -1)).view(x_KBTD.shape), None

    def correct(self, x_hat_KBTD: torch.Tensor, out_BTD: torch.Tensor, active: int) -> tuple[torch.Tensor, None]:
        """Every block corrected by the layer output's innovation (K, B, T, d); second value as in predict."""
        K = x_hat_KBTD.shape[0]
        with _no_autocast(x_hat_KBTD):
            innovation = out_BTD.to(x_hat_KBTD.dtype) - x_hat_KBTD[active]
            g = self.g.to(x_hat_KBTD.dtype).view(K, 1, 1, 1)
            return torch.addcmul(x_hat_KBTD, g, innovation.unsqueeze(0)), None

    def effective(self, predicted: None, corrected: None, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction matrix and correction gains in use: (K, K) and (K,)."""
        # copies, not views: FSDP frees a sharded module's gathered weights after its forward pass
        return self.p.detach().clone(), self.g.detach().clone()


class GemmaCoefficients(nn.Module):
    """Gemma 3n's per-token coefficients from a tanh router over the activated block (see module docstring).

    Parameter names follow transformers' ``Gemma3nTextAltUp`` (``modality_router``, ``router_norm``,
    ``prediction_coefs``, ``correction_coefs``) so weights map one to one.
    """

    no_weight_decay = ()

    def __init__(self, cfg: ModelConfig, k: int, clip: float | None) -> None:
        super().__init__()
        d = cfg.d_model
        self.k, self.clip, self.input_scale = k, clip, 1.0 / d
        self.router_norm = RMSNorm(d, cfg.norm_eps)
        self.modality_router = nn.Linear(d, k, bias=False)
        self.prediction_coefs = nn.Linear(k, k * k, bias=False)
        self.correction_coefs = nn.Linear(k, k, bias=False)
        nn.init.normal_(self.modality_router.weight, std=cfg.init_std)
        nn.init.zeros_(self.prediction_coefs.weight)  # zero: the identity at initialisation
        nn.init.zeros_(self.correction_coefs.weight)

    def modalities(self, x_BTD: torch.Tensor) -> torch.Tensor:
        r = self.modality_router.weight.to(x_BTD.dtype)
        routed = F.linear(self.router_norm(x_BTD) * self.input_scale, r)
        # tanh in at least float32 (as transformers does), without rounding a float64 model down
        return torch.tanh(routed.to(torch.promote_types(routed.dtype, torch.float32))).to(x_BTD.dtype)

    def _weight(self, linear: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
        w = linear.weight
        if self.training and self.clip is not None:
            # functional clamp, where transformers clamps the stored weight in place: the forward is the same,
            # and an optimiser step is never undone behind its back
            w = w.clamp(-self.clip, self.clip)
        return w.to(dtype)

    def predict(self, x_KBTD: torch.Tensor, active: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block's prediction (K, B, T, d), and the per-token coefficients C (B, T, K, K)."""
        K = self.k
        with _no_autocast(x_KBTD):
            m = self.modalities(x_KBTD[active])
            C_BTKK = F.linear(m, self._weight(self.prediction_coefs, m.dtype)).unflatten(-1, (K, K))
            return x_KBTD + torch.einsum("btij,jbtd->ibtd", C_BTKK, x_KBTD), C_BTKK

    def correct(self, x_hat_KBTD: torch.Tensor, out_BTD: torch.Tensor, active: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every block corrected (K, B, T, d), and the per-token gains g (B, T, K)."""
        with _no_autocast(x_hat_KBTD):
            out = out_BTD.to(x_hat_KBTD.dtype)
            m = self.modalities(out)
            g_BTK = F.linear(m, self._weight(self.correction_coefs, m.dtype)) + 1.0
            innovation = out - x_hat_KBTD[active]
            new = torch.addcmul(x_hat_KBTD, g_BTK.permute(2, 0, 1).unsqueeze(-1), innovation.unsqueeze(0))
            return new, g_BTK

    def effective(self, C_BTKK: torch.Tensor, g_BTK: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over real tokens of the per-token prediction matrix (I + C) and gains g, as the paper's p, g."""
        eye = torch.eye(self.k, device=C_BTKK.device)
        return eye + _token_mean(C_BTKK, ctx), _token_mean(g_BTK, ctx)


class AltUp(ResidualStream, nn.Module):
    """The AltUp residual stream: expand, then predict / compute / correct around every layer, then reduce.

    Its state is the K blocks (K, B, T, d); batch and time are dimensions 1 and 2.
    """

    batch_dim = 1
    time_dim = 2

    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)
        a: AltUpConfig = cfg.altup
        self.k, self.d = a.k, cfg.d_model
        self.variant, self.reduction, self.layer_input = a.variant, a.reduction, a.layer_input
        self.active = [i % a.k if a.schedule == "alternating" else 0 for i in range(cfg.n_layers)]
        if a.coefficients == "gemma":
            coefs = [GemmaCoefficients(cfg, a.k, a.coef_clip) for _ in range(cfg.n_layers)]
        else:
            coefs = [ScalarCoefficients(a.k) for _ in range(cfg.n_layers)]
        self.coefs = nn.ModuleList(coefs)

    def enter(self, h_BTE: torch.Tensor) -> torch.Tensor:
        return self.expand(h_BTE)

    def expand(self, h_BTE: torch.Tensor) -> torch.Tensor:
        """The embedding (B, T, K*d) or (B, T, d) as K blocks (K, B, T, d)."""
        B, T, _ = h_BTE.shape
        if self.variant == "recycled":
            return h_BTE.unsqueeze(0).expand(self.k, B, T, self.d).contiguous()
        return h_BTE.view(B, T, self.k, self.d).permute(2, 0, 1, 3).contiguous()

    def readout(self, state: torch.Tensor) -> torch.Tensor:
        return self.reduce(state)

    def reduce(self, x_KBTD: torch.Tensor) -> torch.Tensor:
        """K blocks to what the final norm and head read: (B, T, K*d) for concat, (B, T, d) otherwise."""
        if self.reduction == "concat":
            K, B, T, D = x_KBTD.shape
            return x_KBTD.permute(1, 2, 0, 3).reshape(B, T, K * D)
        return x_KBTD.mean(0) if self.reduction == "mean" else x_KBTD.sum(0)

    def read(self, i: int, state: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, object]]:
        """Predict every block; the layer reads the activated block (old or predicted, per ``layer_input``)."""
        j = self.active[i]
        x_hat, predicted = self.coefs[i].predict(state, j)
        return (state[j] if self.layer_input == "block" else x_hat[j]), (x_hat, predicted)

    def merge(self, i: int, state: torch.Tensor, private: tuple[torch.Tensor, object], out_BTD: torch.Tensor,
              ctx: Context) -> torch.Tensor:
        """Correct every block with the layer output's innovation, and record the coefficients in use."""
        x_hat, predicted = private
        coefs = self.coefs[i]
        new, corrected = coefs.correct(x_hat, out_BTD, self.active[i])
        p, g = coefs.effective(predicted, corrected, ctx)
        for a in range(self.k):
            ctx.tally.stat(i, f"altup_g{a}", g[a])
            for b in range(self.k):
                ctx.tally.stat(i, f"altup_p{a}_{b}", p[a, b])
        return new

    @staticmethod
    def layer_flops(cfg: ModelConfig, seq_len: int) -> int:
        return altup_layer_flops(cfg, seq_len)

    @staticmethod
    def report(stats: dict[str, Any]) -> list[dict[str, Any]]:
        """AltUp's learned coefficients per layer from a forward pass's statistics.

        ``[{"layer": L, "p": K x K prediction matrix (row i predicts block i), "g": K correction gains}]``;
        for Gemma-style coefficients these are the means over the text's tokens.
        """
        found: dict[int, dict[str, dict]] = {}
        for key, value in stats.items():
            prefix, _, name = key.partition("/")
            if not (prefix.startswith("layer") and prefix[5:].isdigit() and name.startswith("altup_")):
                continue
            entry = found.setdefault(int(prefix[5:]), {"p": {}, "g": {}})
            v = float(value)
            if name.startswith("altup_g"):
                entry["g"][int(name[len("altup_g"):])] = v
            elif name.startswith("altup_p"):
                a, b = name[len("altup_p"):].split("_")
                entry["p"][(int(a), int(b))] = v
        result = []
        for layer in sorted(found):
            g, p = found[layer]["g"], found[layer]["p"]
            k = len(g)
            result.append({"layer": layer, "p": [[p[(a, b)] for b in range(k)] for a in range(k)],
                           "g": [g[a] for a in range(k)]})
        return result


def altup_layer_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs that AltUp adds to one layer for one sequence of ``seq_len`` tokens.

    Predict is a (K, K) @ (K, d) product per token (2 K^2 d). Correct is elementwise (a multiply and an add
    per element of the K blocks, 2 K d), which the rest of this library does not count; it is counted here
    because it is the technique's whole extra cost. Gemma's coefficient router adds its small products.
    """
    a = cfg.altup
    if a is None:
        return 0
    K, d = a.k, cfg.d_model
    per_token = 2 * K * K * d + 2 * K * d
    if a.coefficients == "gemma":  # two routers (d -> K), the prediction (K -> K^2) and correction (K -> K) maps
        per_token += 2 * (2 * d * K) + 2 * K * K * K + 2 * K * K
    return seq_len * per_token
