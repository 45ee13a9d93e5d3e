"""GRN on the ``(N, rows, C)`` view of a stage's rows (every sample keeps the same rows): one autograd
function that moves what it must.

The textbook expression ``gamma * (x * Nx) + beta + x`` with ``Nx`` expanded to every row costs, under
CUDA autocast, about 25 full-size kernels a block forward and backward, most of them in fp32 (gamma,
beta and the norm are fp32, so the whole expression is): 40 of the 62 ms of FCMAE-B's modelled eager
step (``benchmarks/step_roofline.py``). Here the same maths is

    Gx = ||x||_2 over the rows (fp32, one reduction)      Nx = Gx / (mean_c Gx + eps)     (N, C), fp32
    y  = x * (1 + gamma * Nx) + beta                        one full-size pass, in x's dtype

and its backward two full-size passes (``sum_rows(gy * x)`` for the per-image statistics; ``dx``), with
only ``x`` and the ``(N, C)`` statistics saved. The per-image scale is rounded to x's dtype once; in
fp32 the result equals the official expression to rounding (``tests/sparse/test_grn.py``).
"""
from __future__ import annotations

import torch


class SampleGRN(torch.autograd.Function):
    """``(N, R, C) -> (N, R, C)``: GRN with the norm over each sample's R rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=1, dtype=torch.float32)  # (N, C), accumulated in fp32
        denom = gx.mean(dim=-1, keepdim=True) + eps  # (N, 1)
        nx = gx / denom
        scale = (1.0 + gamma.float() * nx).to(x.dtype)  # (N, C)
        ctx.save_for_backward(x, gamma, gx, denom, scale)
        ctx.eps = eps
        return torch.addcmul(beta.to(x.dtype), x, scale[:, None, :])

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, gamma, gx, denom, scale = ctx.saved_tensors
        c = x.shape[-1]
        gy = gy.contiguous()
        # per image and channel: sum over the rows of gy * x (fp32 accumulation), the one full-size reduction
        gs = (gy * x).sum(dim=1, dtype=torch.float32)  # (N, C)
        nx = gx / denom
        dgamma = (gs * nx).sum(dim=0)
        dbeta = gy.sum(dim=(0, 1), dtype=torch.float32)
        dnx = gs * gamma.float()  # (N, C)
        # nx = gx / (mean_c gx + eps)
        dgx = dnx / denom - (dnx * gx).sum(dim=-1, keepdim=True) / (denom * denom * c)
        # gx = ||x|| over rows: d x = x * dgx / gx (a zero norm has a zero gradient, as the official's 0/0 -> 0
        # would not be; its x is all zeros there, so the term vanishes either way)
        coef = torch.where(gx > 0, dgx / gx.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(gx))
        dx = torch.addcmul(gy * scale[:, None, :], x, coef.to(x.dtype)[:, None, :])
        return dx, dgamma.to(gamma.dtype).view_as(gamma), dbeta.to(gamma.dtype).view_as(gamma), None


def grn_per_sample(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """GRN of ``(N, R, C)`` rows (gamma, beta: ``C`` values in any shape), in x's dtype."""
    return SampleGRN.apply(x, gamma.reshape(-1), beta.reshape(-1), eps)
