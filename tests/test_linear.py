"""The linear VAE trained with the library's own loss against the exact closed forms (docs/method.md, section 3).

References are evaluated on the *sample* second moment of the (exactly centred) data, which is exact for the
objective that is optimised. Exact fits integrate the reparameterisation noise in closed form and are polished to
near machine precision (float64), so tolerances are tight: the worst deviations measured are ~1e-13 for values
and ~1e-10 for parameters; the asserted tolerances leave two to three orders of magnitude of margin.
"""

import math

import numpy as np
import pytest
import torch

from arelbo import linear as L

pytestmark = pytest.mark.usefixtures("single_thread")

SPECTRUM = (5.0, 3.0, 1.5, 0.8, 0.5, 0.3, 0.2, 0.1)  # docs/method.md example: D = 8, q = 4, sigma2 = 0.275
Q = 4
N = 1000
LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------- closed forms


def test_fixed_sigma_optimum_by_hand():
    th = L.fixed_sigma_optimum(SPECTRUM, 1.0, Q)
    np.testing.assert_allclose(th.column_norms2, [4.0, 2.0, 0.5, 0.0], atol=1e-15)
    assert th.active.tolist() == [True, True, True, False] and th.num_active == 3
    np.testing.assert_allclose(th.posterior_var, [0.2, 1 / 3, 2 / 3, 1.0], atol=1e-15)
    np.testing.assert_allclose(th.mu_var, [0.8, 2 / 3, 1 / 3, 0.0], atol=1e-15)
    np.testing.assert_allclose(th.kl_per_dim, [0.5 * math.log(5), 0.5 * math.log(3), 0.5 * math.log(1.5), 0.0], atol=1e-15)
    # k sigma2 + inactive eigenvalues, including l_j for j >= q: 3 * 1 + (0.8 + 0.5 + 0.3 + 0.2 + 0.1)
    assert th.distortion == pytest.approx(4.9, abs=1e-14)
    assert th.neg_elbo == pytest.approx(4.9 / 2 + 4 * LOG_2PI + 0.5 * math.log(22.5), abs=1e-13)


def test_fixed_sigma_optimum_order_and_padding():
    shuffled = L.fixed_sigma_optimum(SPECTRUM[::-1], 0.4, Q)  # any order in, descending out
    np.testing.assert_allclose(shuffled.column_norms2, [4.6, 2.6, 1.1, 0.4], atol=1e-14)
    wide = L.fixed_sigma_optimum([2.0, 1.0], 0.5, 4)  # q > D: the extra latents see eigenvalue 0
    np.testing.assert_allclose(wide.column_norms2, [1.5, 0.5, 0.0, 0.0])
    assert wide.num_active == 2 and wide.distortion == pytest.approx(1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma2"):
            L.fixed_sigma_optimum(SPECTRUM, bad, Q)
    with pytest.raises(ValueError, match=">= 0"):
        L.fixed_sigma_optimum([1.0, -2.0], 0.5, 1)
    with pytest.raises(ValueError, match="latent_dim"):
        L.fixed_sigma_optimum(SPECTRUM, 1.0, 0)


def test_ppca_closed_forms():
    assert L.ppca_sigma2(SPECTRUM, Q) == pytest.approx(0.275, abs=1e-15)
    expected = 0.5 * (8 * LOG_2PI + math.log(5 * 3 * 1.5 * 0.8) + 4 * math.log(0.275) + 8)
    assert L.ppca_nll(SPECTRUM, Q) == pytest.approx(expected, abs=1e-13)
    # The same number from the pPCA model covariance in a random basis, three independent ways.
    rot, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((8, 8)))
    cov = rot @ np.diag(SPECTRUM) @ rot.T
    loadings = rot[:, :Q] * np.sqrt(np.array(SPECTRUM[:Q]) - 0.275)
    model = loadings @ loadings.T + 0.275 * np.eye(8)
    assert L.ppca_nll(cov, Q) == pytest.approx(expected, abs=1e-12)
    assert L.gaussian_nll(model, cov) == pytest.approx(expected, abs=1e-12)
    assert L.linear_gaussian_nll(loadings, 0.275, cov) == pytest.approx(expected, abs=1e-12)
    # ... and the MLE beats any other noise level.
    for s2 in (0.2, 0.35):
        other = rot[:, :Q] * np.sqrt(np.array(SPECTRUM[:Q]) - s2)
        assert L.linear_gaussian_nll(other, s2, cov) > expected
    with pytest.raises(ValueError, match="q < D"):
        L.ppca_sigma2(SPECTRUM, 8)


def test_active_units_threshold_sweep():
    grid = [0.05, 0.5, 0.9, 1.0, 2.0, 2.99, 3.5, 4.99, 5.0, 7.0]
    np.testing.assert_array_equal(L.active_units_threshold_sweep(SPECTRUM, grid, Q), [4, 4, 3, 3, 2, 2, 1, 1, 0, 0])
    # With the active-units metric's threshold Var(mu_j) = 1 - sigma2 / l_j > 0.01: l_j > sigma2 / 0.99.
    np.testing.assert_array_equal(L.active_units_threshold_sweep(SPECTRUM, [0.79, 0.7919, 0.7921], Q, threshold=0.01), [4, 4, 3])
    np.testing.assert_array_equal(L.active_units_threshold_sweep(SPECTRUM, [0.01], 2), [2])  # capped at q


def test_gaussian_data_and_second_moment():
    x = L.gaussian_data(SPECTRUM, 500, seed=3)
    assert x.shape == (500, 8) and x.dtype == torch.float64
    assert x.mean(0).abs().max() < 1e-14
    assert torch.equal(x, L.gaussian_data(SPECTRUM, 500, seed=3))
    np.testing.assert_allclose(L.second_moment(x), x.T.numpy() @ x.numpy() / 500, atol=1e-14)
    lam = L.eigenvalues_of(L.second_moment(x))
    np.testing.assert_allclose(lam, SPECTRUM, rtol=0.3)  # a sample spectrum near the population one


# ---------------------------------------------------------------------------------------------- trained


@pytest.fixture(scope="module")
def data():
    return L.gaussian_data(SPECTRUM, N, seed=0)


@pytest.fixture(scope="module")
def cov(data):
    return L.second_moment(data)


@pytest.fixture(scope="module")
def lam(cov):
    return L.eigenvalues_of(cov)


@pytest.fixture(scope="module")
def sweep(data, lam):
    """Fixed sigma2 fits from above l_1 down to between l_4 and l_5 (geometric midpoints of the sample
    spectrum, so every active unit has Var(mu_j) >= 0.2, far from the 0.01 metric threshold)."""
    grid = [1.25 * lam[0]] + [math.sqrt(lam[j] * lam[j + 1]) for j in range(Q)]
    fits = {}
    for s2 in grid:
        fit = L.fit_linear_vae(data, Q, "fixed", policy_kwargs={"sigma2": s2}, seed=1)
        fits[s2] = (fit, L.fixed_sigma_optimum(lam, s2, Q), L.summarize_linear_vae(fit.model, data))
    return fits


def test_fixed_sigma2_trained_equals_closed_form(sweep, cov, lam):
    evecs = np.linalg.eigh(cov)[1][:, ::-1]
    for s2, (fit, th, sm) in sweep.items():
        out = fit.output
        assert out.sigma2.item() == s2  # the policy uses the given value exactly (float64)
        np.testing.assert_allclose(sm.column_norms2, th.column_norms2, atol=1e-10, err_msg=f"sigma2={s2}")
        np.testing.assert_allclose(sm.posterior_var, th.posterior_var, atol=1e-10)
        np.testing.assert_allclose(sm.mu_var, th.mu_var, atol=1e-10)
        np.testing.assert_allclose(sm.kl_per_dim, th.kl_per_dim, atol=1e-10)
        np.testing.assert_allclose(out.kl_per_dim.numpy()[sm.order], th.kl_per_dim, atol=1e-10)
        assert out.distortion.mean().item() == pytest.approx(th.distortion, abs=1e-9)
        assert out.neg_elbo.item() == pytest.approx(th.neg_elbo, abs=1e-11)
        assert out.loss.item() == pytest.approx(th.neg_elbo, abs=1e-11)
        assert sm.num_active == th.num_active == int(np.sum(lam[:Q] > s2))
        # The decoder spans the top eigenvectors with exactly those gains: W W^T = U diag(||w_j||^2) U^T.
        w = fit.model.W.detach().numpy()
        expected = evecs[:, :Q] @ np.diag(th.column_norms2) @ evecs[:, :Q].T
        np.testing.assert_allclose(w @ w.T, expected, atol=1e-10)


def test_sweep_removes_one_active_unit_per_eigenvalue_crossed(sweep, lam):
    grid = sorted(sweep, reverse=True)
    trained = [sweep[s2][2].num_active for s2 in grid]
    assert trained == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(trained, L.active_units_threshold_sweep(lam, grid, Q, threshold=L.ACTIVE_THRESHOLD))
    # Each crossing switches one unit fully off: its column and KL go to zero, its posterior to the prior.
    for s2 in grid:
        _, th, sm = sweep[s2]
        off = ~th.active
        assert np.all(sm.column_norms2[off] < 1e-18) and np.all(np.abs(sm.posterior_var[off] - 1) < 1e-9)


@pytest.fixture(scope="module")
def ar_fit(data):
    return L.fit_linear_vae(data, Q, "ar", seed=2)


def test_ar_converges_to_ppca(ar_fit, data, cov, lam):
    out = ar_fit.output
    s2 = L.ppca_sigma2(lam, Q)
    # sigma2 -> pPCA noise MLE and -ELBO -> exact pPCA NLL, both reached to ~1e-15 (measured).
    assert out.sigma2.item() == pytest.approx(s2, rel=1e-12)
    assert out.neg_elbo.item() == pytest.approx(L.ppca_nll(cov, Q), abs=1e-11)
    assert out.loss.item() == pytest.approx(out.neg_elbo.item(), abs=1e-12)  # detached-MLE form: loss = -ELBO
    # All q units stay active (l_q > sigma2) with the pPCA gains l_j - sigma2.
    sm = L.summarize_linear_vae(ar_fit.model, data)
    assert sm.num_active == Q and lam[Q - 1] > s2
    np.testing.assert_allclose(sm.column_norms2, lam[:Q] - s2, atol=1e-10)
    # The VAE's own marginal model N(0, W W^T + sigma2 I) is the pPCA MLE: the ELBO is tight.
    assert L.linear_gaussian_nll(ar_fit.model.W, out.sigma2, cov) == pytest.approx(out.neg_elbo.item(), abs=1e-11)
    # And the population value of the example (the number in method.md).
    assert L.ppca_sigma2(SPECTRUM, Q) == pytest.approx(0.275)


def test_ar_monte_carlo_forward_reaches_the_same_sigma2(data, lam, cov):
    """The ordinary reparameterised forward (one noise draw per step, the path users run) converges to the same
    optimum. Tolerance: 1% on sigma2 and 0.02 nats on -ELBO, against a measured 8.6e-4 and 6e-4 after 500 cosine-
    annealed Adam steps; the residual is the Monte-Carlo gradient noise of one draw per sample, not a bias."""
    fit = L.fit_linear_vae(data, Q, "ar", steps=500, lr=0.05, exact=False, seed=0)
    assert fit.output.sigma2.item() == pytest.approx(L.ppca_sigma2(lam, Q), rel=1e-2)
    assert fit.output.neg_elbo.item() == pytest.approx(L.ppca_nll(cov, Q), abs=2e-2)
    assert fit.output.neg_elbo.item() >= L.ppca_nll(cov, Q) - 1e-12  # never below the exact optimum
    assert L.summarize_linear_vae(fit.model, data).num_active == Q


@pytest.fixture(scope="module")
def fa_data():
    x, _, _ = L.factor_analysis_data(8, 2, N, seed=0)
    return x


def test_ar_diagonal_equals_factor_analysis(fa_data):
    from sklearn.decomposition import FactorAnalysis

    k = 2
    cov = L.second_moment(fa_data)
    fit = L.fit_linear_vae(fa_data, k, "ar-diagonal", seed=0)
    out = fit.output
    s2 = out.sigma2.numpy()
    assert s2.shape == (8,)
    w = fit.model.W.detach().numpy()

    # 1. Exact checks that need no reference implementation: the ELBO is tight at the optimum (-ELBO equals the
    #    NLL of the VAE's own linear-Gaussian model), and that model is a stationary point of the factor-analysis
    #    likelihood: dNLL/dW = (S^-1 - S^-1 C S^-1) W = 0 and dNLL/dpsi = diag(...) / 2 = 0, i.e. diag(S) = diag(C).
    assert L.linear_gaussian_nll(w, s2, cov) == pytest.approx(out.neg_elbo.item(), abs=1e-11)
    sigma = w @ w.T + np.diag(s2)
    inv = np.linalg.inv(sigma)
    grad_sigma = inv - inv @ cov @ inv
    assert np.abs(grad_sigma @ w).max() < 1e-11
    assert np.abs(np.diag(grad_sigma)).max() < 1e-11
    np.testing.assert_allclose(np.diag(sigma), np.diag(cov), atol=1e-11)

    # 2. scikit-learn's FactorAnalysis (EM) on the same data. Its `score` is the mean log-likelihood, with the
    #    mean subtracted; the data are exactly centred so that equals our zero-mean model. EM stops when the total
    #    log-likelihood gains less than tol = 1e-10 per iteration, i.e. ~1e-13 nats per sample; its last steps
    #    move the uniquenesses by ~1e-6 (EM converges linearly along the likelihood's flattest direction).
    #    So: NLLs agree to 1e-9 (measured 1e-13) and the VAE is never worse than EM (it sits at the optimum);
    #    uniquenesses agree to 2e-5 (measured 1e-6); loadings only up to rotation, so compare W W^T.
    fa = FactorAnalysis(k, tol=1e-10, max_iter=20000, svd_method="lapack").fit(fa_data.numpy())
    nll_fa = -fa.score(fa_data.numpy())
    assert np.abs(fa.mean_).max() < 1e-14
    assert L.linear_gaussian_nll(fa.components_.T, fa.noise_variance_, cov) == pytest.approx(nll_fa, abs=1e-12)
    assert out.neg_elbo.item() == pytest.approx(nll_fa, abs=1e-9)
    assert out.neg_elbo.item() <= nll_fa + 1e-12
    np.testing.assert_allclose(s2, fa.noise_variance_, atol=2e-5)
    np.testing.assert_allclose(w @ w.T, fa.components_.T @ fa.components_, atol=1e-4)


HEYWOOD_SPECTRUM = np.geomspace(5.0, 0.1, 12)  # with 5 factors, factor analysis drives a uniqueness towards 0


def test_fit_reports_convergence(ar_fit):
    """An exact fit returns how far it is from a stationary point; one that stops short says so."""
    from arelbo.cli.linear import _convergence

    assert ar_fit.converged and ar_fit.grad_max < 1e-9 and ar_fit.rounds >= 1
    assert _convergence(ar_fit).startswith("converged")
    x = L.gaussian_data(HEYWOOD_SPECTRUM, 1000, 0)
    short = L.fit_linear_vae(x, 5, "ar-diagonal", max_rounds=1)
    assert not short.converged and short.grad_max > 1e-6 and short.rounds == 1
    # its own gradient, measured independently of the fit
    mu, logvar = short.model.encode(x)
    loss = short.loss_fn.from_sq_err(short.model.expected_sq_err(x), mu, logvar).loss
    grads = torch.autograd.grad(loss, list(short.model.parameters()))
    assert max(float(g.abs().max()) for g in grads) == pytest.approx(short.grad_max, rel=1e-6)
    assert _convergence(short).startswith("NOT CONVERGED: max |grad|")
    mc = L.fit_linear_vae(x[:200], 2, "ar", steps=5, exact=False)
    assert not mc.converged  # a Monte-Carlo fit has no stationarity test


def test_fit_on_a_covariance_matrix():
    """The exact loss sees the data only through C: fitting on C gives the pPCA closed forms of C itself."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 6))
    cov = a @ a.T / 6 + 0.1 * np.eye(6)
    x = L.data_from_second_moment(cov)
    assert x.shape == (12, 6) and float(x.mean(0).abs().max()) < 1e-12
    np.testing.assert_allclose(L.second_moment(x), cov, rtol=0, atol=1e-12)
    fit = L.fit_linear_vae(None, 2, "ar", cov=cov, seed=1)
    assert fit.converged
    assert fit.output.sigma2.item() == pytest.approx(L.ppca_sigma2(L.eigenvalues_of(cov), 2), rel=1e-10)
    assert fit.output.neg_elbo.item() == pytest.approx(L.ppca_nll(cov, 2), abs=1e-10)
    on_cov, on_data = L.summarize_linear_vae(fit.model, cov=cov), L.summarize_linear_vae(fit.model, x)
    np.testing.assert_allclose(on_cov.mu_var, on_data.mu_var, rtol=0, atol=1e-14)
    lam = L.eigenvalues_of(cov)
    np.testing.assert_allclose(on_cov.mu_var, 1 - fit.output.sigma2.item() / lam[:2], rtol=1e-9)  # closed form
    with pytest.raises(ValueError, match="ar-per-sample's sigma2 is per data point"):
        L.fit_linear_vae(None, 2, "ar-per-sample", cov=cov)
    with pytest.raises(ValueError, match="either data .* or cov"):
        L.fit_linear_vae(x, 2, "ar", cov=cov)
    with pytest.raises(ValueError, match="symmetric"):
        L.fit_linear_vae(None, 2, "ar", cov=a)


def test_fit_rejects_bad_input():
    x = torch.zeros(10, 3, dtype=torch.float64)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        L.fit_linear_vae(x, 1)
    with pytest.raises(ValueError, match="latent_dim"):
        L.fit_linear_vae(torch.ones(10, 3), 0)
    with pytest.raises(ValueError, match="unknown decoder-variance policy"):
        L.fit_linear_vae(torch.ones(10, 3), 1, policy="nope")


def test_linear_command_arguments(capsys):
    from arelbo.cli import build_parser, main

    args = build_parser().parse_args(["linear", "--eigenvalues", "4, 2,1", "--latent-dim", "1", "--fixed-sigma2", "0.5,3"])
    assert args.eigenvalues == [4.0, 2.0, 1.0] and args.latent_dim == 1 and args.fixed_sigma2 == [0.5, 3.0]
    assert args.n == 1000 and args.mc_steps == 500 and args.fa_on == "factor-data"
    assert main(["linear", "--latent-dim", "8"]) == 2  # q must be < D = 8: one clear line, no traceback
    assert "--latent-dim must be in [1, D - 1]" in capsys.readouterr().err
    assert main(["linear", "--eigenvalues", "1,-1"]) == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["linear", "--eigenvalues", "1,x"])


def test_linear_command_flags_a_fit_that_stopped_short(capsys):
    """Factor analysis on a chosen spectrum whose optimum lies on the boundary: both fits are flagged."""
    from arelbo.cli import main

    eigs = ",".join(f"{v:.6f}" for v in HEYWOOD_SPECTRUM)
    assert main(["linear", "--eigenvalues", eigs, "--latent-dim", "5", "--fa-factors", "5", "--fa-on", "spectrum",
                 "--fixed-sigma2", "1", "--mc-steps", "0", "--n", "300"]) == 0
    out = capsys.readouterr().out
    ar_part, fa_part = out.split('AR-ELBO diagonal')
    assert "fit         converged (max |grad|" in ar_part
    assert "data: the Gaussian data above (D=12, n=300)" in fa_part and "fit               : NOT CONVERGED" in fa_part


@pytest.mark.slow
def test_linear_command_runs(capsys):
    from arelbo.cli import main

    assert main(["linear"]) == 0
    out = capsys.readouterr().out
    assert "population pPCA value 0.2750" in out and "factor analysis" in out
    for active in ("4 / 4", "3 / 3", "2 / 2", "1 / 1", "0 / 0"):
        assert active in out
