"""A naive reference for AltUp (Baykal et al. 2023) and Gemma 3n's coefficients, written independently.

Blocks are Python lists of (B, T, d) tensors, predictions and corrections are explicit sums over blocks
with the coefficients read entry by entry, and expand / reduce are slicing and ``torch.cat``. Only the
model's own embedding, layers, final norm, MLM transform and head modules are reused: what is checked is
the stream around them. Nothing from ``condformer.routing.altup`` is called.

Gemma 3n takes the router's tanh in float32 (``torch.tanh(routed.float())`` in transformers); these
references, like condformer, take it in at least float32, so a float64 model stays float64 throughout.
"""

from __future__ import annotations

import torch

from condformer.context import Context, Tally


# -- coefficients ---------------------------------------------------------------------------------
def scalar_predict(p: list[list[float]], blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """x_hat_i = sum_j p_ij x_j, one block at a time."""
    K = len(blocks)
    out = []
    for i in range(K):
        acc = torch.zeros_like(blocks[0])
        for j in range(K):
            acc = acc + p[i][j] * blocks[j]
        out.append(acc)
    return out


def scalar_correct(g: list[float], x_hat: list[torch.Tensor], out: torch.Tensor, active: int) -> list[torch.Tensor]:
    """x_i = x_hat_i + g_i (out - x_hat_active)."""
    return [x_hat[i] + g[i] * (out - x_hat[active]) for i in range(len(x_hat))]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def clipped(w: torch.Tensor, clip: float | None, training: bool) -> torch.Tensor:
    """Gemma 3n clips its coefficient weights to +-clip in training only."""
    if training and clip is not None:
        return torch.where(w > clip, torch.full_like(w, clip), torch.where(w < -clip, torch.full_like(w, -clip), w))
    return w


def gemma_modalities(x: torch.Tensor, norm_weight: torch.Tensor, router: torch.Tensor, eps: float) -> torch.Tensor:
    """m = tanh(W_r (RMSNorm(x) / d)), (B, T, K); the tanh in at least float32 as in Gemma 3n."""
    d = x.shape[-1]
    z = rms_norm(x, norm_weight, eps) / d
    K = router.shape[0]
    zs = torch.stack([(z * router[k]).sum(-1) for k in range(K)], dim=-1)
    return torch.tanh(zs.to(torch.promote_types(zs.dtype, torch.float32))).to(x.dtype)


def gemma_predict(w: dict, blocks: list[torch.Tensor], active: int, training: bool
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """x_hat_i = x_i + sum_j C_ij x_j with C = reshape(W_p m, (K, K)) per token; returns (x_hat, C_BTKK)."""
    K = len(blocks)
    m = gemma_modalities(blocks[active], w["norm"], w["router"], w["eps"])
    Wp = clipped(w["pred"], w["clip"], training)  # (K*K, K)
    C = torch.zeros(*m.shape[:-1], K, K, dtype=m.dtype)
    for i in range(K):
        for j in range(K):
            for k in range(K):
                C[..., i, j] = C[..., i, j] + Wp[i * K + j, k] * m[..., k]
    x_hat = []
    for i in range(K):
        acc = blocks[i]
        for j in range(K):
            acc = acc + C[..., i, j, None] * blocks[j]
        x_hat.append(acc)
    return x_hat, C


def gemma_correct(w: dict, x_hat: list[torch.Tensor], out: torch.Tensor, active: int, training: bool
                  ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """x_i = x_hat_i + (1 + (W_c m')_i) (out - x_hat_active), m' from ``out``; returns (blocks, g_BTK)."""
    K = len(x_hat)
    m = gemma_modalities(out, w["norm"], w["router"], w["eps"])
    Wc = clipped(w["corr"], w["clip"], training)
    g = torch.ones(*m.shape[:-1], K, dtype=m.dtype)
    for i in range(K):
        for k in range(K):
            g[..., i] = g[..., i] + Wc[i, k] * m[..., k]
    return [x_hat[i] + g[..., i, None] * (out - x_hat[active]) for i in range(K)], g


def gemma_weights(coefs: torch.nn.Module) -> dict:
    """The raw tensors of a ``GemmaCoefficients`` module (read by attribute name: they mirror transformers)."""
    return {"norm": coefs.router_norm.weight.detach(), "router": coefs.modality_router.weight.detach(),
            "pred": coefs.prediction_coefs.weight.detach(), "corr": coefs.correction_coefs.weight.detach(),
            "eps": coefs.router_norm.eps, "clip": coefs.clip}


# -- the whole model --------------------------------------------------------------------------------
def active_block(i: int, k: int, schedule: str) -> int:
    return i % k if schedule == "alternating" else 0


def forward(model: torch.nn.Module, tokens_BT: torch.Tensor, *, positions_BT: torch.Tensor | None = None,
            valid_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Logits of an AltUp model from the naive stream, and per layer the coefficients in use
    ({"p": K x K, "g": K} as nested lists of floats, or per-token tensors for gemma)."""
    cfg = model.cfg
    a = cfg.altup
    K, d = a.k, cfg.d_model
    output = a.output if a.output != "auto" else ("concat" if a.variant == "standard" else "mean")
    B, T = tokens_BT.shape
    contiguous = positions_BT is None
    if positions_BT is None:
        positions_BT = torch.arange(T).expand(B, T)
    ctx = Context(positions_BT=positions_BT, causal=cfg.kind == "decoder", tally=Tally(), valid_BT=valid_BT,
                  contiguous=contiguous, tokens_BT=tokens_BT)
    h = model.embed(tokens_BT)
    if a.variant == "recycled":
        assert h.shape[-1] == d
        blocks = [h.clone() for _ in range(K)]
    else:
        assert h.shape[-1] == K * d
        blocks = [h[..., k * d:(k + 1) * d] for k in range(K)]
    used = []
    for i, layer in enumerate(model.layers):
        j = active_block(i, K, a.schedule)
        coefs = model.altup.coefs[i]
        if a.coefficients == "scalar":
            p = coefs.p.detach().tolist()
            g = coefs.g.detach().tolist()
            x_hat = scalar_predict(p, blocks)
        else:
            w = gemma_weights(coefs)
            x_hat, p = gemma_predict(w, blocks, j, model.training)
        out = layer(blocks[j] if a.layer_input == "block" else x_hat[j], ctx.for_layer(i))
        if a.coefficients == "scalar":
            blocks = scalar_correct(g, x_hat, out, j)
        else:
            blocks, g = gemma_correct(w, x_hat, out, j, model.training)
        used.append({"p": p, "g": g, "active": j})
    if output == "concat":
        z = torch.cat(blocks, dim=-1)
    else:
        z = blocks[0]
        for b in blocks[1:]:
            z = z + b
        if output == "mean":
            z = z / K
    z = model.final_norm(z)
    if model.mlm_head is not None:
        z = model.mlm_head(z)
    return model.head(z), used
