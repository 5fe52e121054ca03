"""The CPU expert kernel: each expert's whole FFN (up, activation, down) on its own rows, one expert at a time.

Why a kernel of its own: on a CPU the grouped matmul's natural order (every expert's up projection, then
one activation over all P rows, then every down projection) streams a P x F intermediate through memory
twice (32 MiB at P = 4096, F = 2048), while one expert's n x F slice stays in cache between its two
matmuls. Measured on `medium` with 8 experts of 2048 (top-2, T 1024, batch 2), that order made the
inference forward 0.90x of a dense FFN of equal FLOPs; per-expert chaining makes it faster than dense.

The backward writes each expert's weight gradient straight into the stacked (E, ...) gradient buffer.
Autograd through ``unbind`` (the per-expert loop) instead builds E separate gradients and concatenates
them: 470 ms of copies per training step in that measurement, 16% of the step.

Both halves are ``torch.library`` custom ops, so ``torch.compile`` sees one opaque kernel with a known
output shape (reading the group offsets on the host is free on a CPU: there is no device to wait for).
CUDA keeps torch's ``grouped_mm`` (see :mod:`condformer.routing.moe.experts`).

Activations: ``gelu``, ``gelu_tanh`` (GPT-2's), ``swiglu`` (``silu(gate) * up`` with the gate columns
first, as :class:`~condformer.layers.mlp.MLP` stores them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")


def _groups(offs: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert that owns at least one row."""
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    return [(g, s, e) for g, (s, e) in enumerate(zip(starts, ends, strict=True)) if e > s]


def _act(h: torch.Tensor, act: str) -> torch.Tensor:
    if act == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh" if act == "gelu_tanh" else "none")


def _act_backward(grad_a: torch.Tensor, h: torch.Tensor, act: str) -> torch.Tensor:
    """d loss / d h from d loss / d act(h)."""
    if act == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return torch.cat([torch.ops.aten.silu_backward(grad_a * up, gate), grad_a * F.silu(gate)], dim=-1)
    return torch.ops.aten.gelu_backward(grad_a, h, approximate="tanh" if act == "gelu_tanh" else "none")


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown expert activation {act!r}; choose one of {ACTIVATIONS}")


def _forward_groups(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, groups: list[tuple[int, int, int]],
                    act: str, keep: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(out, hs): every group through its expert, rows past the last group 0; ``hs``: each group's
    pre-activation (what the backward needs) when ``keep``. The activation itself is not kept: the
    backward recomputes it per expert, in cache, which costs less than writing and re-reading a second
    P x F buffer (and the memory falls below a dense FFN's, for which autograd stores both)."""
    _check_act(act)
    end = groups[-1][2] if groups else 0
    out = x.new_empty(x.shape[0], w_down.shape[-1])
    out[end:].zero_()
    hs = []
    for g, s, e in groups:
        h = x[s:e] @ w_up[g]
        torch.mm(_act(h, act), w_down[g], out=out[s:e])
        if keep:
            hs.append(h)
    return out, hs


def _backward_groups(grad_out: torch.Tensor, x: torch.Tensor, hs: list[torch.Tensor], w_up: torch.Tensor,
                     w_down: torch.Tensor, groups: list[tuple[int, int, int]], n_experts: int, act: str,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_w_up, grad_w_down), one expert at a time, each weight gradient written straight into
    its slot of the stacked buffer; an expert with no rows gets a zero gradient."""
    grad_x = torch.empty_like(x)
    grad_x[(groups[-1][2] if groups else 0):].zero_()
    grad_up, grad_down = torch.empty_like(w_up), torch.empty_like(w_down)
    for g in set(range(n_experts)) - {g for g, _, _ in groups}:
        grad_up[g].zero_()
        grad_down[g].zero_()
    for (g, s, e), h in zip(groups, hs, strict=True):
        go = grad_out[s:e]
        torch.mm(_act(h, act).t(), go, out=grad_down[g])
        gh = _act_backward(go @ w_down[g].t(), h, act)
        torch.mm(x[s:e].t(), gh, out=grad_up[g])
        torch.mm(gh, w_up[g].t(), out=grad_x[s:e])
    return grad_x, grad_up, grad_down


class _ExpertFFN(torch.autograd.Function):
    """Eager autograd: each group's pre-activation is kept as its own tensor. Small per-expert blocks are
    recycled by the C allocator from step to step, while one fresh P x F buffer per layer would be mapped
    and page-faulted anew each step (measured: +11 ms per 32 MiB on this CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, offs: torch.Tensor,  # noqa: ANN001
                act: str) -> torch.Tensor:
        groups = _groups(offs)
        out, hs = _forward_groups(x, w_up, w_down, groups, act, keep=True)
        # the pre-activations go through save_for_backward (not ctx attributes) so that activation checkpointing's
        # saved-tensor hooks see them: under checkpointing they are dropped after the forward and recomputed
        ctx.save_for_backward(x, w_up, w_down, *hs)
        ctx.groups, ctx.act = groups, act
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        x, w_up, w_down, *hs = ctx.saved_tensors
        grads = _backward_groups(grad_out.contiguous(), x, hs, w_up, w_down, ctx.groups, w_up.shape[0], ctx.act)
        return *grads, None, None


# The same kernel as torch.library custom ops, for torch.compile: one opaque node with a known output shape
# (the host reads the group offsets inside the op, which on a CPU costs nothing). Here the pre-activations
# must be one output tensor (P x F), so eager mode uses the autograd Function above instead.
@torch.library.custom_op("condformer::expert_ffn", mutates_args=())
def _expert_ffn(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, offs: torch.Tensor,
                act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, h): rows [offs[g-1], offs[g]) of ``x`` through expert g, rows past offs[-1] 0; h: every row's
    pre-activation (rows past offs[-1] 0)."""
    groups = _groups(offs)
    out, hs = _forward_groups(x, w_up, w_down, groups, act, keep=True)
    end = groups[-1][2] if groups else 0
    h_all = torch.cat([*hs, x.new_zeros(x.shape[0] - end, w_up.shape[-1])])
    return out, h_all


@_expert_ffn.register_fake
def _(x: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, offs: torch.Tensor,
      act: str) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[0], w_down.shape[-1]), x.new_empty(x.shape[0], w_up.shape[-1])


@torch.library.custom_op("condformer::expert_ffn_backward", mutates_args=())
def _expert_ffn_backward(grad_out: torch.Tensor, x: torch.Tensor, h_all: torch.Tensor, w_up: torch.Tensor,
                         w_down: torch.Tensor, offs: torch.Tensor,
                         act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = _groups(offs)
    hs = [h_all[s:e] for _, s, e in groups]
    return _backward_groups(grad_out, x, hs, w_up, w_down, groups, w_up.shape[0], act)


@_expert_ffn_backward.register_fake
def _(grad_out: torch.Tensor, x: torch.Tensor, h_all: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
      offs: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(w_up), torch.empty_like(w_down)


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, w_up, w_down, offs, act = inputs
    _, h_all = output
    ctx.act = act
    # h is an output only so the backward can have it: no gradient flows into it, and without these two
    # calls autograd would fill a zero gradient for it (P x F floats) on every step
    ctx.mark_non_differentiable(h_all)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w_up, w_down, offs, h_all)


def _backward(ctx, grad_out: torch.Tensor | None, grad_h: torch.Tensor | None):  # noqa: ANN001, ANN202
    if grad_out is None:  # the output was not used
        return None, None, None, None, None
    x, w_up, w_down, offs, h_all = ctx.saved_tensors
    grad_x, grad_up, grad_down = _expert_ffn_backward(grad_out.contiguous(), x, h_all, w_up, w_down, offs, ctx.act)
    return grad_x, grad_up, grad_down, None, None


_expert_ffn.register_autograd(_backward, setup_context=_setup)


def expert_ffn(x_PD: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, offs_E: torch.Tensor,
               act: str) -> torch.Tensor:
    """Rows sorted by expert (expert g owns rows [offs[g-1], offs[g])) through their experts; rows past
    offs[-1] come out 0. Keeps intermediates for the backward pass only when a gradient is wanted."""
    _check_act(act)
    if torch.compiler.is_compiling():  # the opaque op: no graph break on the host-side group loop
        return _expert_ffn(x_PD, w_up, w_down, offs_E, act)[0]
    if not (torch.is_grad_enabled() and (x_PD.requires_grad or w_up.requires_grad or w_down.requires_grad)):
        return _forward_groups(x_PD, w_up, w_down, _groups(offs_E), act, keep=False)[0]
    return _ExpertFFN.apply(x_PD, w_up, w_down, offs_E, act)
