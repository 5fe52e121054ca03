"""A bank of E feed-forward experts stored stacked, so every dispatch path runs them as a few big matmuls.

Weights: ``w_up`` (E, D, F) or (E, D, 2F) for SwiGLU, and ``w_down`` (E, F, D). Storing them stacked
instead of as E separate ``nn.Linear`` modules is what lets the same parameters be run four ways:

* :meth:`grouped`  - rows sorted by expert with group ends ``offs`` (dropless dispatch), no padding: on CUDA
  one grouped matmul per projection (``torch.nn.functional.grouped_mm``, no host sync); on CPU the fused
  kernel of :mod:`condformer.routing.moe.fused_experts` (each expert's whole FFN in turn, in cache);
* :meth:`batched`  - a (E, C, D) buffer of C slots per expert: one batched matmul (capacity dispatch,
  expert choice);
* :meth:`each` / :meth:`run` - one expert at a time on some rows (per-expert loops, the speed reference);
* :meth:`everyone` - every expert on every row (the soft-mixture baseline).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from condformer.routing.moe.fused_experts import expert_ffn


# grouped_mm wrapped as custom ops: torch.compile then treats it as one opaque kernel with our shape rule
# (its built-in fake implementation insists on bf16, so fp32 CPU training could not compile), and the
# backward is two more grouped matmuls: dA = grouped(dY, B^T), dB_g = A_g^T dY_g.
#
# On CPU the op runs one BLAS matmul per group on contiguous row slices (reading ``offs`` costs nothing
# there: no device to wait for). torch's CPU grouped_mm is a reference kernel, 2x slower than plain mm in
# the backward shapes, and limited to 16-byte-aligned fp32/bf16/fp16; the loop has neither problem.
def _group_bounds(offs: torch.Tensor) -> list[tuple[int, int, int]]:
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    return [(g, s, e) for g, (s, e) in enumerate(zip(starts, ends, strict=True)) if e > s]


@torch.library.custom_op("condformer::grouped_mm", mutates_args=())
def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if a.device.type != "cpu":
        return F.grouped_mm(a, b, offs=offs)
    out = a.new_empty(a.shape[0], b.shape[-1])
    bounds = _group_bounds(offs)
    for g, s, e in bounds:
        torch.mm(a[s:e], b[g], out=out[s:e])
    out[(bounds[-1][2] if bounds else 0):].zero_()  # rows past offs[-1]: 0 rather than garbage
    return out


@_grouped_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[-1])


@torch.library.custom_op("condformer::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad(a: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if a.device.type != "cpu":
        return F.grouped_mm(a.t(), grad, offs=offs)
    out = a.new_empty(offs.shape[0], a.shape[1], grad.shape[1])
    bounds = _group_bounds(offs)
    filled = {g for g, _, _ in bounds}
    for g, s, e in bounds:
        torch.mm(a[s:e].t(), grad[s:e], out=out[g])
    for g in range(offs.shape[0]):
        if g not in filled:  # a group with no rows gets a zero gradient
            out[g].zero_()
    return out


@_grouped_mm_weight_grad.register_fake
def _(a: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty(offs.shape[0], a.shape[1], grad.shape[1])


def _grouped_mm_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()  # grouped_mm rejects stride-0 gradients (e.g. from out.sum())
    b_t = b.transpose(-1, -2)
    if b.device.type != "cpu":  # torch's kernel: the row-major layout its forward takes (untested here: no GPU)
        b_t = b_t.contiguous()
    grad_a = _grouped_mm(grad, b_t, offs) if ctx.needs_input_grad[0] else None
    grad_b = _grouped_mm_weight_grad(a, grad, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


class StackedExperts(nn.Module):
    def __init__(self, n_experts: int, d_model: int, d_expert: int, swiglu: bool, init_std: float,
                 n_layers: int, approximate: str = "none") -> None:
        super().__init__()
        self.n_experts, self.d_model, self.d_expert, self.swiglu = n_experts, d_model, d_expert, swiglu
        self.approximate = approximate  # GELU's: "tanh" for GPT-2's approximation
        self.w_up = nn.Parameter(torch.empty(n_experts, d_model, (2 if swiglu else 1) * d_expert))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        nn.init.normal_(self.w_up, std=init_std)
        # as the dense MLP: residual-branch outputs scaled by 1/sqrt(2 * n_layers) (GPT-2)
        nn.init.normal_(self.w_down, std=init_std / math.sqrt(2 * n_layers))

    @property
    def activation(self) -> str:
        """The activation's name for the fused CPU kernel."""
        if self.swiglu:
            return "swiglu"
        return "gelu_tanh" if self.approximate == "tanh" else "gelu"

    def flops_per_token(self) -> int:
        return 2 * self.d_model * self.d_expert * (3 if self.swiglu else 2)

    # -- activation ---------------------------------------------------------------------------
    def _act(self, h: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h, approximate=self.approximate)

    @staticmethod
    def _compute_dtype(like: torch.Tensor) -> torch.dtype:
        """Autocast's dtype when it is on, else the input's."""
        if torch.is_autocast_enabled(like.device.type):
            return torch.get_autocast_dtype(like.device.type)
        return like.dtype

    def _weights(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights in the compute dtype."""
        dtype = self._compute_dtype(like)
        return self.w_up.to(dtype), self.w_down.to(dtype)

    # -- the four ways to run the bank --------------------------------------------------------
    def grouped(self, x_PD: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert; expert e owns rows [offs[e-1], offs[e]). Rows past offs[-1] are garbage.

        Callers must mask rows past ``offs[-1]`` (with ``torch.where``, not a multiply: they may hold NaN).
        On CPU the fused kernel computes each expert's up, activation and down in turn: measured faster
        than two grouped matmuls around one activation over all rows, whose P x F intermediate falls out
        of cache (see ``fused_experts``).
        """
        up, down = self._weights(x_PD)
        x_PD = x_PD.to(up.dtype)
        if x_PD.device.type == "cpu":  # one expert's whole FFN at a time: its intermediates stay in cache
            return expert_ffn(x_PD, up, down, offs_E, self.activation)
        h = _grouped_mm(x_PD, up, offs_E)
        return _grouped_mm(self._act(h), down, offs_E)

    def sized(self, x_PD: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Rows grouped by expert in blocks of known (host) ``sizes``, exactly ``sum(sizes)`` rows: the grouped
        kernel where it runs, else one matmul pair per expert on its slice.

        One method for both, so that a wrapper gathering the weights around a call (FSDP2's
        ``register_fsdp_forward_method``, which expert parallelism's replicas use) sees the whole computation:
        :meth:`each` hands out weights that would be freed before :meth:`run` reads them.
        """
        if self.grouped_supported(x_PD):
            offs = torch.tensor(sizes, device=x_PD.device).cumsum(0).to(torch.int32)
            return self.grouped(x_PD, offs)
        chunks = [self.run(w, part) for w, part in zip(self.each(x_PD), x_PD.split(sizes), strict=True)]
        return torch.cat(chunks)

    def batched(self, x_ECD: torch.Tensor) -> torch.Tensor:
        """C slots per expert: ``x_ECD[e]`` goes through expert e (on CPU: the fused kernel, E equal groups)."""
        up, down = self._weights(x_ECD)
        x_ECD = x_ECD.to(up.dtype)
        if x_ECD.device.type == "cpu":
            E, C, D = x_ECD.shape
            offs = torch.arange(1, E + 1, dtype=torch.int32) * C
            return expert_ffn(x_ECD.reshape(E * C, D), up, down, offs, self.activation).view(E, C, -1)
        return torch.bmm(self._act(torch.bmm(x_ECD, up)), down)

    def one(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone. To loop over experts use :meth:`each` (indexing a stacked parameter E times
        makes E full-size gradient buffers in the backward pass)."""
        up, down = self._weights(x_ND)
        return self._act(x_ND.to(up.dtype) @ up[e]) @ down[e]

    def each(self, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every expert's (up, down) weights, split once (one gradient buffer in the backward pass)."""
        up, down = self._weights(like)
        return list(zip(up.unbind(0), down.unbind(0), strict=True))

    def run(self, weights: tuple[torch.Tensor, torch.Tensor], x_ND: torch.Tensor) -> torch.Tensor:
        up, down = weights
        return self._act(x_ND.to(up.dtype) @ up) @ down

    def everyone(self, x_ND: torch.Tensor) -> torch.Tensor:
        """(E, N, D): every expert on every row."""
        up, down = self._weights(x_ND)
        h = torch.einsum("nd,edf->enf", x_ND.to(up.dtype), up)
        return torch.bmm(self._act(h), down)

    def grouped_supported(self, x: torch.Tensor) -> bool:
        """Whether :meth:`grouped` runs here: always on CPU (our loop); on CUDA torch's grouped_mm needs
        bf16 on SM80+ and 16-byte-aligned rows."""
        if x.device.type == "cpu":
            return True
        if x.device.type != "cuda":
            return False
        dtype = self._compute_dtype(x)  # no weight cast just to ask
        size = dtype.itemsize
        if (self.d_model * size) % 16 or (self.d_expert * size) % 16:
            return False
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
