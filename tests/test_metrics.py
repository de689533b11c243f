"""Collapse diagnostics and likelihoods against exact references (hand-made values, closed-form linear Gaussians)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from arelbo.metrics import (
    ELBOAccumulator,
    RunningMoments,
    active_units,
    active_units_from_loader,
    ar_sigma2,
    decoder_smoothness,
    encode_dataset,
    importance_sampled_nll,
    importance_sampled_nll_dataset,
    kl_per_dim,
    linear_gaussian_nll,
    linear_vae_exact_nll,
    mutual_information,
    neg_elbo,
)
from arelbo.models import LinearVAE
from arelbo.objectives import GaussianVAELoss, gaussian_kl

D, Q = 6, 3
SCALES = torch.tensor([2.0, 1.5, 0.7], dtype=torch.float64)  # decoder column norms
SIGMA2 = 0.3


# Small tensors: one intra-op thread is fastest, and robust on a shared, oversubscribed CPU (conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def loader_of(x, batch_size=64):
    return [x[i : i + batch_size] for i in range(0, len(x), batch_size)]


def orthogonal(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def linear_model(sigma2=SIGMA2, perturb=0.0, seed=0, bias=False):
    """A LinearVAE with W = U diag(SCALES) (orthogonal columns) and the exact posterior as its encoder:
    M = W^T W + sigma2 I = diag(c^2 + sigma2), mean M^-1 W^T x, covariance sigma2 M^-1 (diagonal).
    ``perturb`` adds noise to the encoder (a suboptimal q)."""
    W = orthogonal(D, seed)[:, :Q] * SCALES
    m = LinearVAE((D, 1, 1), Q, bias=bias)
    M = SCALES**2 + sigma2
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        m.decoder.linear.weight.copy_(W)
        m.encoder.linear.weight.copy_((W / M).T + perturb * torch.randn(Q, D, generator=g, dtype=torch.float64))
        m.encoder.logvar.copy_(torch.log(sigma2 / M) + perturb * torch.randn(Q, generator=g, dtype=torch.float64))
        if bias:
            m.decoder.linear.bias.copy_(torch.linspace(-1, 1, D))
            m.encoder.linear.bias.copy_(-(W / M).T.float() @ m.decoder.linear.bias)
    return m.eval(), W


def sample_data(W, sigma2, n, seed=0, bias=None):
    cov = W @ W.T + sigma2 * torch.eye(D, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    if bias is not None:
        x = x + bias.double()
    return x.float().reshape(n, D, 1, 1)


# ------------------------------------------------------------------------------------------------ active units


def test_active_units_hand_made_variances():
    s = torch.tensor([-1.0, 1.0]).repeat(50)  # mean 0, population variance exactly 1
    amplitudes = torch.tensor([2.0, 0.2, 0.05, 0.0])  # variances 4, 0.04, 0.0025, 0
    mu = s[:, None] * amplitudes + torch.tensor([3.0, -1.0, 0.5, 7.0])  # offsets do not matter
    au = active_units(mu)
    torch.testing.assert_close(au.variance, amplitudes.double() ** 2, rtol=1e-6, atol=1e-12)
    assert au.count == 2 and au.mask.tolist() == [True, True, False, False]
    assert active_units(mu, threshold=0.001).count == 3
    assert active_units(mu, threshold=5.0).count == 0
    # unbiased: variance * N / (N - 1)
    torch.testing.assert_close(active_units(mu, unbiased=True).variance, amplitudes.double() ** 2 * 100 / 99, rtol=1e-6, atol=1e-12)


def test_running_moments_streaming_matches_full():
    x = torch.randn(1000, 5, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 0.1, 10]) + 100.0
    m = RunningMoments()
    for chunk in torch.split(x, [1, 7, 300, 92, 600]):
        m.update(chunk)
    torch.testing.assert_close(m.variance(), x.var(0, unbiased=False), rtol=1e-10, atol=0)
    torch.testing.assert_close(m.variance(unbiased=True), x.var(0), rtol=1e-10, atol=0)


def test_active_units_from_loader_linear_model_closed_form():
    """mu = V x with x ~ N(0, C): Var(mu) = diag(V C V^T); streaming over a loader equals the in-memory value."""
    model, W = linear_model()
    x = sample_data(W, SIGMA2, 4000)
    streamed = active_units_from_loader(model, loader_of(x, 333))
    mu, _ = encode_dataset(model, loader_of(x))
    torch.testing.assert_close(streamed.variance, active_units(mu).variance, rtol=1e-5, atol=1e-9)
    # population: Var(mu_j) = 1 - sigma2 / l_j with l_j = c_j^2 + sigma2 (method.md section 3)
    expected = 1 - SIGMA2 / (SCALES**2 + SIGMA2)
    torch.testing.assert_close(streamed.variance, expected, rtol=0.08, atol=0)
    assert streamed.count == 3


# ------------------------------------------------------------------------------------------------ KL and MI


def test_kl_per_dim_hand_values():
    mu = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 2.0]])
    logvar = torch.tensor([[0.0, 0.0, math.log(0.25)], [0.0, 0.0, math.log(0.25)]])
    expected = torch.tensor([0.5, 0.0, 0.5 * (2.0 + 0.25 - math.log(0.25) - 1)], dtype=torch.float64)
    torch.testing.assert_close(kl_per_dim(mu, logvar), expected)
    torch.testing.assert_close(kl_per_dim(mu, logvar).float(), gaussian_kl(mu, logvar).mean(0))


def test_mutual_information_collapsed_posterior_is_zero():
    assert mutual_information(torch.zeros(500, 4), torch.zeros(500, 4), generator=torch.Generator().manual_seed(0)) == pytest.approx(0.0, abs=1e-12)
    # the same posterior for every x, whatever it is, carries no information
    mu = torch.tensor([0.3, -2.0]).repeat(300, 1)
    lv = torch.tensor([-1.0, 0.5]).repeat(300, 1)
    assert mutual_information(mu, lv, n_samples=3) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_mutual_information_bounded_by_log_n(seed):
    g = torch.Generator().manual_seed(seed)
    n = 200
    mu = torch.randn(n, 5, generator=g) * 10 ** (seed - 1)
    lv = torch.randn(n, 5, generator=g) - 3 * seed
    mi = mutual_information(mu, lv, generator=g, chunk_size=37)
    assert -0.2 < mi <= math.log(n) + 1e-12


def test_mutual_information_deterministic_encoder_reaches_log_n():
    mu = torch.arange(100.0)[:, None] * 10.0  # far apart, tiny variances: every z identifies its x
    mi = mutual_information(mu, torch.full_like(mu, -10.0))
    assert mi == pytest.approx(math.log(100), abs=1e-9)


def test_mutual_information_linear_gaussian_closed_form():
    """Exact posterior of the linear-Gaussian model: I(x; z) = 1/2 sum_j log(1 + c_j^2 / sigma2)."""
    model, W = linear_model()
    x = sample_data(W, SIGMA2, 3000)
    mu, lv = encode_dataset(model, loader_of(x, 500))
    exact = 0.5 * float(torch.log1p(SCALES**2 / SIGMA2).sum())
    mi = mutual_information(mu, lv, generator=torch.Generator().manual_seed(0))
    assert mi < math.log(3000)
    assert mi == pytest.approx(exact, abs=0.08)  # finite-N mixture: the estimator's bias is small at N = 3000


# ------------------------------------------------------------------------------------------------ smoothness


def test_decoder_smoothness_linear_is_column_norms():
    model, W = linear_model()
    mu = torch.randn(37, Q)
    smooth = decoder_smoothness(model.decoder, mu, batch_size=8)
    torch.testing.assert_close(smooth, SCALES.float(), rtol=1e-6, atol=1e-6)
    # max_jvp_rows smaller than q * batch still works (one example per call)
    torch.testing.assert_close(decoder_smoothness(model.decoder, mu, max_jvp_rows=2), SCALES.float(), rtol=1e-6, atol=1e-6)


def test_decoder_smoothness_nonlinear_matches_autograd_jacobian():
    torch.manual_seed(0)
    dec = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10), torch.nn.Sigmoid())
    mu = torch.randn(25, 3)
    expected = torch.stack([torch.autograd.functional.jacobian(dec, m[None]).reshape(10, 3).norm(dim=0) for m in mu]).mean(0)
    torch.testing.assert_close(decoder_smoothness(dec, mu, batch_size=4), expected, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # mu made under inference mode is accepted
        mu_inf = mu.clone()
    torch.testing.assert_close(decoder_smoothness(dec, mu_inf), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ ar sigma2


def test_ar_sigma2_hand_computation():
    model, W = linear_model(perturb=0.1)
    x = sample_data(W, SIGMA2, 300)
    with torch.no_grad():
        V, s = model.encoder.linear.weight.double(), model.encoder.logvar.double().exp()
        xf = x.flatten(1).double()
        resid = xf - xf @ V.T @ W.T
        exact = resid.pow(2) + (W.pow(2) @ s)  # E_q (x_d - (W z)_d)^2 per element
    loader = loader_of(x, 64)
    torch.testing.assert_close(ar_sigma2(model, loader), exact.sum() / exact.numel(), rtol=1e-5, atol=0)
    torch.testing.assert_close(ar_sigma2(model, loader, diagonal=True), exact.mean(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(ar_sigma2(model, loader, mode="mean"), resid.pow(2).mean(), rtol=1e-5, atol=0)
    # one sample per example: an unbiased estimate of the exact value
    sampled = ar_sigma2(model, loader_of(x.repeat(20, 1, 1, 1)), mode="sample", generator=torch.Generator().manual_seed(0))
    assert float(sampled) == pytest.approx(float(exact.mean()), rel=0.02)


# ------------------------------------------------------------------------------------------------ -ELBO


def test_neg_elbo_ar_equals_hand_computation_and_full_batch_loss():
    model, W = linear_model(perturb=0.2)
    x = sample_data(W, SIGMA2, 250)
    res = neg_elbo(model, loader_of(x, 64), "ar")
    with torch.no_grad():
        sq = model.expected_sq_err(x).double()
        mu, lv = model.encode(x)
        kl = gaussian_kl(mu.double(), lv.double()).sum(1).mean()
    s2 = sq.sum() / sq.numel()
    hand = 0.5 * D * (math.log(2 * math.pi * float(s2)) + 1) + float(kl)
    assert res.neg_elbo == pytest.approx(hand, rel=1e-9, abs=1e-9)
    assert res.sigma2 == pytest.approx(float(s2), rel=1e-9)
    assert res.bits_per_dim == pytest.approx(hand / (D * math.log(2)), rel=1e-9)
    assert res.num_examples == 250 and res.sq_err_mode == "exact"
    # the library's AR loss on the whole set as one batch gives the same -ELBO
    for policy in ("ar", "ar-diagonal", "ar-per-sample"):
        full = GaussianVAELoss(policy).from_sq_err(sq, mu.double(), lv.double())
        assert neg_elbo(model, loader_of(x, 64), policy).neg_elbo == pytest.approx(float(full.neg_elbo), rel=1e-9), policy
    fixed = GaussianVAELoss("fixed", sigma2=0.5)
    assert neg_elbo(model, loader_of(x, 64), fixed).neg_elbo == pytest.approx(
        float(fixed.from_sq_err(sq, mu.double(), lv.double()).neg_elbo), rel=1e-9)
    assert neg_elbo(model, loader_of(x, 64), 0.5).neg_elbo == pytest.approx(
        float(fixed.from_sq_err(sq, mu.double(), lv.double()).neg_elbo), rel=1e-9)


def test_neg_elbo_at_exact_posterior_equals_exact_nll():
    """With the true posterior as encoder, ELBO = log p(x) exactly for every x."""
    model, W = linear_model(bias=True)
    x = sample_data(W, SIGMA2, 400, bias=model.decoder.linear.bias.detach())
    res = neg_elbo(model, loader_of(x, 100), SIGMA2)
    with torch.no_grad():
        exact = linear_vae_exact_nll(model, x, SIGMA2).mean()
    assert res.neg_elbo == pytest.approx(float(exact), rel=1e-6)


def test_accumulator_result_shapes_and_errors():
    acc = ELBOAccumulator()
    with pytest.raises(ValueError):
        acc.result("ar")
    acc.update(torch.rand(10, 4), torch.zeros(10, 2), torch.zeros(10, 2))
    assert acc.result(torch.full((4,), 0.5)).sigma2 == [0.5] * 4
    with pytest.raises(ValueError):
        acc.result(torch.full((3,), 0.5))
    with pytest.raises(ValueError):
        acc.result(-1.0)


# ------------------------------------------------------------------------------------------------ IS-NLL


def test_linear_gaussian_nll_matches_scipy():
    W = torch.randn(D, Q, dtype=torch.float64)
    x = torch.randn(20, D, dtype=torch.float64)
    b = torch.randn(D, dtype=torch.float64)
    for s2 in (0.4, torch.linspace(0.1, 1.0, D, dtype=torch.float64)):
        cov = (W @ W.T + torch.diag(torch.as_tensor(s2).expand(D))).numpy()
        ref = -multivariate_normal(b.numpy(), cov).logpdf(x.numpy())
        np.testing.assert_allclose(linear_gaussian_nll(x, W, s2, b).numpy(), ref, rtol=1e-7)


def test_is_nll_exact_posterior_equals_exact_nll_for_any_k():
    model, W = linear_model(bias=True)
    x = sample_data(W, SIGMA2, 300, seed=1, bias=model.decoder.linear.bias.detach())
    exact = linear_vae_exact_nll(model, x, SIGMA2)
    g = torch.Generator().manual_seed(0)
    for k, chunk in ((1, None), (50, None), (50, 7)):
        est = importance_sampled_nll(model, x, SIGMA2, k=k, generator=g, k_chunk=chunk)
        torch.testing.assert_close(est, exact, rtol=1e-6, atol=2e-5)


def test_is_nll_numerically_stable_for_large_nll():
    """Far-out data: log weights around -1e5 must not underflow (running log-sum-exp in float64)."""
    model, W = linear_model()
    x = sample_data(W, SIGMA2, 20) * 300.0
    exact = linear_vae_exact_nll(model, x, SIGMA2)
    assert float(exact.min()) > 1e4
    est = importance_sampled_nll(model, x, SIGMA2, k=64, k_chunk=5, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(est).all()
    torch.testing.assert_close(est, exact, rtol=1e-6, atol=0.05)


def test_is_nll_perturbed_encoder_k1_is_elbo_and_large_k_approaches_exact():
    model, W = linear_model(perturb=0.05)
    x = sample_data(W, SIGMA2, 200, seed=2)
    exact = float(linear_vae_exact_nll(model, x, SIGMA2).mean())
    g = torch.Generator().manual_seed(0)
    k1 = importance_sampled_nll_dataset(model, loader_of(x), SIGMA2, k=1, generator=g)
    mid = importance_sampled_nll_dataset(model, loader_of(x), SIGMA2, k=100, generator=g)
    big = importance_sampled_nll_dataset(model, loader_of(x), SIGMA2, k=2000, generator=g)
    elbo = neg_elbo(model, loader_of(x), SIGMA2).neg_elbo
    gap = elbo - exact
    assert gap > 0.3  # the perturbed encoder is clearly suboptimal
    assert k1.nll == pytest.approx(elbo, abs=3 * k1.stderr + 0.05)  # K = 1 estimates -ELBO
    assert k1.nll > mid.nll > big.nll
    assert abs(big.nll - exact) < 0.02 * gap + 1e-3  # 98% of the ELBO gap closed
    assert big.nll >= exact - 1e-3  # an upper bound (in expectation; here with margin to spare)
    assert big.bits_per_dim == pytest.approx(big.nll / (D * math.log(2)))


def test_is_nll_diagonal_and_per_sample_sigma2():
    model, W = linear_model(perturb=0.05)
    x = sample_data(W, SIGMA2, 50, seed=3)
    diag = torch.linspace(0.2, 0.5, D, dtype=torch.float64)
    exact = linear_vae_exact_nll(model, x, diag)
    est = importance_sampled_nll(model, x, diag, k=3000, generator=torch.Generator().manual_seed(1))
    assert abs(float((est - exact).mean())) < 0.02
    per = torch.linspace(0.2, 0.5, 50, dtype=torch.float64)[:, None]
    exact_rows = torch.cat([linear_vae_exact_nll(model, x[i : i + 1], float(per[i])) for i in range(50)])
    est_rows = importance_sampled_nll(model, x, per, k=3000, generator=torch.Generator().manual_seed(1))
    assert abs(float((est_rows - exact_rows).mean())) < 0.02
    with pytest.raises(ValueError):
        importance_sampled_nll(model, x, torch.ones(7), k=2)
