"""GRN and LayerNorm that stay in the input's dtype (issue 48): the one-function GRN on the (N, R, C) view
against the official expression (``gamma * (x * Nx) + beta + x``, Nx expanded) in fp32 (forward and every
gradient, to rounding), and in bf16 against the fp32 reference within a stated tolerance; the rows'
LayerNorm returns the input's dtype under autocast."""
import pytest
import torch
import torch.nn.functional as F

from fcmae.models.convnextv2 import GRN
from fcmae.sparse.compact import layer_norm_rows
from fcmae.sparse.grn import grn_per_sample

from conftest import rel_err


def official(x3: torch.Tensor, grn: GRN) -> torch.Tensor:
    """The official ConvNeXt V2 GRN on (N, H, W, C), here with H = rows, W = 1."""
    return grn(x3[:, :, None, :])[:, :, 0, :]


def _grn(c: int) -> GRN:
    g = GRN(c)
    with torch.no_grad():
        g.gamma.normal_()
        g.beta.normal_()
    return g


@pytest.mark.parametrize("zero_sample", [False, True])
def test_the_one_function_grn_equals_the_official_expression_in_fp32(zero_sample):
    torch.manual_seed(0)
    grn = _grn(24)
    x = torch.randn(3, 10, 24, dtype=torch.float64).float()
    if zero_sample:  # a sample whose channels are all zero (a zero norm: the official's grad is 0 there)
        x[1, :, 5] = 0
    gy = torch.randn_like(x)
    outs = []
    for fn in (lambda t: official(t, grn), lambda t: grn_per_sample(t, grn.gamma, grn.beta, grn.eps)):
        xi = x.clone().requires_grad_(True)
        grn.zero_grad()
        y = fn(xi)
        y.backward(gy)
        outs.append((y.detach(), xi.grad, grn.gamma.grad.clone(), grn.beta.grad.clone()))
    for a, b in zip(*outs):
        assert rel_err(b, a) < 1e-6


def test_the_bf16_grn_is_within_bf16_rounding_of_the_fp32_reference():
    """Tolerance: bf16 keeps 8 bits of mantissa (relative step 2^-8 = 3.9e-3); the output and the input
    grad are one or two roundings from the reference: 1e-2 relative (2.5 steps); gamma/beta grads sum
    thousands of bf16 products in fp32: 2e-2."""
    torch.manual_seed(1)
    grn = _grn(64)
    x = torch.randn(4, 49, 64)
    gy = torch.randn_like(x)
    ref_x = x.clone().double().requires_grad_(True)
    ref = official(ref_x, grn.double())
    ref.backward(gy.double())
    ref_grads = (ref_x.grad, grn.gamma.grad.clone(), grn.beta.grad.clone())
    grn.float().zero_grad()
    xb = x.bfloat16().requires_grad_(True)
    y = grn_per_sample(xb, grn.gamma, grn.beta, grn.eps)
    assert y.dtype == torch.bfloat16
    y.backward(gy.bfloat16())
    assert xb.grad.dtype == torch.bfloat16 and grn.gamma.grad.dtype == torch.float32
    assert rel_err(y.double(), ref.detach()) < 1e-2
    assert rel_err(xb.grad.double(), ref_grads[0]) < 1e-2
    assert rel_err(grn.gamma.grad.double(), ref_grads[1]) < 2e-2
    assert rel_err(grn.beta.grad.double(), ref_grads[2]) < 2e-2


def test_the_rows_layer_norm_keeps_bf16_under_autocast_and_matches_fp32():
    norm = torch.nn.LayerNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(50, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer_norm_rows(norm, x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), F.layer_norm(x.bfloat16().float(), (32,), norm.weight, norm.bias, 1e-6)) < 1e-2
    assert torch.equal(layer_norm_rows(norm, x), norm(x))  # fp32: the same kernel, the same numbers
