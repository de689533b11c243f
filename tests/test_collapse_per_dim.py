"""Collapse metrics that separate policies: per-dimension I(x; z_j) and the scale-free decoder smoothness."""

import math

import pytest
import torch

from arelbo.metrics.collapse import (
    decoder_smoothness,
    mutual_information,
    mutual_information_per_dim,
    normalised_smoothness,
)

F64 = torch.float64


def _standardised(n, q, seed):
    """(n, q) samples with exactly zero mean and unit variance (ddof 0) per column."""
    x = torch.randn(n, q, generator=torch.Generator().manual_seed(seed), dtype=F64)
    x = x - x.mean(0)
    return x / x.std(0, unbiased=False)


def test_per_dim_mi_is_the_linear_gaussian_closed_form():
    """Linear encoder of Gaussian data: mu_j = a_j x_j, s_j constant -> I(x; z_j) = 1/2 log(1 + a_j^2 / s_j^2)."""
    a = torch.tensor([3.0, 1.0, 0.2, 0.0], dtype=F64)
    s2 = torch.tensor([0.01, 0.5, 1.0, 1.0], dtype=F64)
    x = _standardised(1000, 4, 0)
    mu, logvar = x * a, s2.log().expand(1000, 4)
    got = mutual_information_per_dim(mu, logvar)
    expected = 0.5 * torch.log1p(a**2 / s2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert got[3] == 0.0  # a collapsed dimension: exactly zero


def test_per_dim_mi_is_not_capped_at_log_n_and_bounds_the_mixture_estimate():
    # a very informative dimension measured on only 50 examples: the joint estimate is capped at log 50
    x = _standardised(50, 1, 1)
    mu, logvar = 10.0 * x, torch.full((50, 1), math.log(1e-4), dtype=F64)
    per_dim = float(mutual_information_per_dim(mu, logvar)[0])
    assert per_dim == pytest.approx(0.5 * math.log1p(100.0 / 1e-4), rel=1e-12) and per_dim > math.log(50)
    assert mutual_information(mu, logvar, generator=torch.Generator().manual_seed(0)) <= math.log(50) + 1e-9
    # Gaussian aggregate posterior, moderate information: the mixture estimator agrees (N large, ~1 nat)
    x = _standardised(4000, 1, 2)
    mu, logvar = 2.0 * x, torch.full((4000, 1), math.log(0.5), dtype=F64)
    mix = mutual_information(mu, logvar, generator=torch.Generator().manual_seed(1))
    assert float(mutual_information_per_dim(mu, logvar)[0]) == pytest.approx(mix, abs=0.05)
    # bimodal codes (not Gaussian): the Gaussian form is an upper bound
    sign = torch.where(torch.arange(4000) % 2 == 0, 1.0, -1.0).to(F64)[:, None]
    mu = 2.0 * sign + 0.1 * x
    logvar = torch.full((4000, 1), math.log(0.09), dtype=F64)
    mix = mutual_information(mu, logvar, generator=torch.Generator().manual_seed(2))
    assert float(mutual_information_per_dim(mu, logvar)[0]) > mix + 0.3


def test_normalised_smoothness_is_invariant_to_rescaling_a_latent():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5)).double()
    mu = torch.randn(40, 3, dtype=F64) * torch.tensor([1.0, 0.3, 2.0], dtype=F64)
    c = torch.tensor([10.0, 0.1, 1.0], dtype=F64)

    def rescaled(z):  # the same model with latent j measured in units 1 / c_j
        return net(z / c)

    raw = decoder_smoothness(net, mu)
    raw_c = decoder_smoothness(rescaled, mu * c)
    torch.testing.assert_close(raw_c.double(), (raw.double() / c), rtol=1e-5, atol=0)  # the raw one changes
    norm = normalised_smoothness(raw, mu)
    torch.testing.assert_close(normalised_smoothness(raw_c, mu * c), norm, rtol=1e-5, atol=0)
    # for a linear decoder it is ||W_:,j|| std(mu_j) exactly
    lin = torch.nn.Linear(3, 5, bias=False).double()
    expected = lin.weight.norm(dim=0) * mu.std(0, unbiased=False)
    torch.testing.assert_close(normalised_smoothness(decoder_smoothness(lin, mu), mu).double(), expected,
                               rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="must be"):
        normalised_smoothness(raw[:2], mu)
