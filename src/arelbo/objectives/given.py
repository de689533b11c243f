"""Policies whose sigma2 is given: ``fixed`` (the classic VAE at sigma2 = 1) and the ``beta``-VAE."""

from __future__ import annotations

import torch
from torch import Tensor

from arelbo.objectives.base import DecoderVariance, HeldOutSigma2, check_number, register_policy

__all__ = ["Fixed", "Beta"]


@register_policy
class Fixed(DecoderVariance):
    """sigma2 given and constant (sigma2 = 1 is the classic VAE). No floor: the user chose the value."""

    name = "fixed"
    label = "fixed σ²"
    sigma2_kind = "given"

    def __init__(self, sigma2: float = 1.0, floor: float = 1e-6):
        super().__init__(floor)
        sigma2 = check_number("fixed sigma2", sigma2)
        self.register_buffer("value", torch.tensor(float(sigma2)), persistent=False)
        self.sigma2_value = float(sigma2)  # exact: the float32 buffer would round it for float64 losses

    def sigma2(self, sq_err: Tensor) -> Tensor:
        return torch.full((), self.sigma2_value, dtype=sq_err.dtype, device=sq_err.device)

    def held_out_sigma2(self, stats) -> HeldOutSigma2:
        return self.own_sigma2()

    def extra_repr(self) -> str:
        return f"sigma2={self.value.item():g}"


@register_policy
class Beta(Fixed):
    """beta-VAE: loss = mean_b(||x_b - x^_b||^2 + beta KL_b) on plain squared error.

    This is the fixed-sigma2 loss at sigma2 = beta / 2 scaled by beta (same optimum, different step scale);
    the reported -ELBO is the exact one at sigma2 = beta / 2.
    """

    name = "beta"
    label = "β-VAE"

    def __init__(self, beta: float = 1.0, floor: float = 1e-6):
        beta = check_number("beta", beta)
        super().__init__(sigma2=beta / 2.0, floor=floor)
        self.beta = float(beta)

    def loss(self, sq_err: Tensor, rate: Tensor, sigma2: Tensor) -> Tensor:
        return (sq_err.sum(1) + self.beta * rate).mean()

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"
