"""The CPU fused expert kernel and the permutation gather: equal to plain autograd, outputs and gradients.

The reference for the kernel is each expert run on its rows with ordinary autograd (``StackedExperts.one``),
in float64, weights at std 0.3 so that no activation sits in its linear range. Both implementations the
kernel has (the eager autograd Function and the custom ops torch.compile sees) are checked, with an idle
expert and rows past the last group, for every activation.
"""

from __future__ import annotations

import pytest
import torch

from condformer.routing.moe import dispatch
from condformer.routing.moe.experts import StackedExperts
from condformer.routing.moe.fused_experts import _expert_ffn, _expert_ffn_backward, expert_ffn

F64 = torch.float64
ACTS = {"gelu": (False, "none"), "gelu_tanh": (False, "tanh"), "swiglu": (True, "none")}
OFFS = [5, 5, 17, 26]  # expert 1 idle; rows 26..29 belong to no expert


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _bank(act: str, dtype: torch.dtype = F64) -> StackedExperts:
    swiglu, approximate = ACTS[act]
    bank = StackedExperts(4, 16, 24, swiglu, 0.3, 2, approximate).to(dtype)
    assert bank.activation == act
    return bank


def _reference(bank: StackedExperts, x: torch.Tensor, offs: list[int]) -> torch.Tensor:
    """Each expert on its rows through plain autograd; rows past the last group are 0."""
    outs, start = [], 0
    for e, end in enumerate(offs):
        outs.append(bank.one(e, x[start:end]))
        start = end
    outs.append(x.new_zeros(x.shape[0] - start, x.shape[1]))
    return torch.cat(outs)


def _grads(fn, x: torch.Tensor, bank: StackedExperts, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    y = fn()
    return (y, *torch.autograd.grad(y, [x, bank.w_up, bank.w_down], g))


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, offs, output gradient) for 30 rows in the groups of OFFS."""
    x = torch.randn(30, 16, dtype=F64, requires_grad=True)
    return x, torch.tensor(OFFS, dtype=torch.int32), torch.randn(30, 16, dtype=F64)


@pytest.mark.parametrize("act", list(ACTS))
def test_eager_kernel_equals_per_expert_autograd(act):
    bank = _bank(act)
    x, offs, g = _inputs()
    got = _grads(lambda: bank.grouped(x, offs), x, bank, g)
    ref = _grads(lambda: _reference(bank, x, OFFS), x, bank, g)
    for a, b, name in zip(got, ref, ["out", "grad x", "grad w_up", "grad w_down"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
    assert got[0][26:].abs().max() == 0 and got[1][26:].abs().max() == 0  # rows of no expert
    assert got[2][1].abs().max() == 0 and got[3][1].abs().max() == 0  # the idle expert learns nothing
    assert got[2][0].abs().max() > 0  # ...while a busy one does (the check above can fail)


@pytest.mark.parametrize("act", list(ACTS))
def test_compile_ops_equal_the_eager_kernel(act):
    """The custom-op pair (what torch.compile traces) gives the eager Function's output and gradients."""
    bank = _bank(act)
    x, offs, g = _inputs()
    eager = _grads(lambda: expert_ffn(x, bank.w_up, bank.w_down, offs, act), x, bank, g)
    ops = _grads(lambda: _expert_ffn(x, bank.w_up, bank.w_down, offs, act)[0], x, bank, g)
    for a, b in zip(eager, ops, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_custom_ops_pass_torch_opcheck():
    """Schema, fake (meta) implementations and autograd registration agree with the real kernels."""
    bank = _bank("swiglu", torch.float32)
    x = torch.randn(30, 16, requires_grad=True)
    w_up, w_down = bank.w_up.detach().requires_grad_(), bank.w_down.detach().requires_grad_()
    offs = torch.tensor(OFFS, dtype=torch.int32)
    torch.library.opcheck(_expert_ffn, (x, w_up, w_down, offs, "swiglu"))
    h = torch.randn(30, 48)
    torch.library.opcheck(_expert_ffn_backward, (torch.randn(30, 16), x.detach(), h, w_up.detach(), w_down.detach(),
                                                 offs, "swiglu"))


def test_kernel_passes_gradcheck():
    bank = _bank("swiglu")
    x = torch.randn(9, 16, dtype=F64, requires_grad=True)
    offs = torch.tensor([3, 3, 7, 8], dtype=torch.int32)
    w_up, w_down = bank.w_up.detach().requires_grad_(), bank.w_down.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, u, d: expert_ffn(a, u, d, offs, "swiglu"), (x, w_up, w_down))


def test_inference_path_keeps_nothing_and_gives_the_same_output():
    bank = _bank("gelu")
    x = torch.randn(30, 16, dtype=F64)
    offs = torch.tensor(OFFS, dtype=torch.int32)
    with torch.no_grad():
        y = bank.grouped(x, offs)
        assert y.grad_fn is None
    torch.testing.assert_close(y, _reference(bank, x, OFFS).detach(), rtol=0, atol=1e-12)


def test_unknown_activation_is_refused():
    bank = _bank("gelu")
    with pytest.raises(ValueError, match="unknown expert activation 'relu'"):
        expert_ffn(torch.randn(4, 16, dtype=F64), bank.w_up, bank.w_down, torch.tensor([4, 4, 4, 4]), "relu")


def test_bf16_autocast_runs_the_kernel_in_bf16():
    bank = _bank("swiglu", torch.float32)
    x = torch.randn(30, 16, requires_grad=True)
    offs = torch.tensor(OFFS, dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bank.grouped(x, offs)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert bank.w_up.grad is not None and bank.w_up.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), _reference(bank, x, OFFS).detach(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("repeats", [1, 3])
def test_gather_rows_equals_indexing_with_a_gather_backward(repeats):
    """Forward: ``src[index // repeats]``; backward: what autograd's scatter-add gives, computed as a gather."""
    n, d = 7, 5
    src = torch.randn(n, d, dtype=F64, requires_grad=True)
    order = torch.randperm(n * repeats)
    inverse = dispatch.inverse_permutation(order)
    assert torch.equal(order[inverse], torch.arange(n * repeats))
    g = torch.randn(n * repeats, d, dtype=F64)
    y = dispatch.gather_rows(src, order, inverse, repeats)
    (grad,) = torch.autograd.grad(y, src, g)
    y_ref = src[order // repeats]
    (grad_ref,) = torch.autograd.grad(y_ref, src, g)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("grouped", [True, False])
def test_dropless_without_masks_equals_the_masked_path(grouped):
    """``all_real`` (no no-op expert, no padding) skips the masks and changes nothing, gradients included."""
    bank = _bank("gelu")
    N, K = 10, 2
    x = torch.randn(N, 16, dtype=F64, requires_grad=True)
    expert = torch.stack([torch.randperm(4)[:K] for _ in range(N)])
    gate = torch.rand(N, K, dtype=F64, requires_grad=True)
    g = torch.randn(N, 16, dtype=F64)
    runs = []
    for all_real in (False, True):
        y = dispatch.dropless(x, expert, gate, bank, grouped=grouped, all_real=all_real)
        runs.append((y, *torch.autograd.grad(y, [x, gate, bank.w_up], g)))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
