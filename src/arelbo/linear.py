"""Closed forms for the linear VAE, and exact fits of it with the library's own loss (pure torch/numpy).

Model: data x in R^D with second moment C (eigenvalues l_1 >= ... >= l_D), decoder f(z) = W z, encoder mean
mu = V x, x-independent diagonal encoder variance s, q latent dimensions (:class:`arelbo.models.LinearVAE`).
At the global optimum of the -ELBO (docs/method.md, section 3):

* fixed sigma2: ||w_j||^2 = max(0, l_j - sigma2); unit j is active iff l_j > sigma2; s_j = sigma2 / l_j (1 if
  inactive); Var(mu_j) = max(0, 1 - sigma2 / l_j); E KL_j = 1/2 log(l_j / sigma2) (0 if inactive);
  E||x - f(z)||^2 = k sigma2 + sum of the inactive l_j (k active; the l_j with j >= q are inactive too).
* AR-ELBO isotropic (``"ar"``): sigma2 -> mean of the D - q smallest l_j (the probabilistic-PCA noise MLE) and
  -ELBO -> the exact pPCA negative log-likelihood.
* AR-ELBO diagonal (``"ar-diagonal"``): -ELBO -> the factor-analysis negative log-likelihood, sigma_d^2 -> the
  factor-analysis uniquenesses.

All of these hold for the objective actually optimised on a finite data set when l are the eigenvalues of the
*sample* second moment C = X^T X / N of the (zero-mean) data: the linear VAE's expected loss depends on the data
only through C. :func:`second_moment` computes it.

:func:`fit_linear_vae` trains a :class:`~arelbo.models.LinearVAE` with :class:`~arelbo.objectives.GaussianVAELoss`.
With ``exact=True`` the reparameterisation noise is integrated in closed form
(:meth:`~arelbo.models.LinearVAE.expected_sq_err`), so Adam, then L-BFGS, then a Newton polish in float64 reach
the optimum to near machine precision; ``exact=False`` trains through the ordinary reparameterised forward (the
Monte-Carlo path users run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from arelbo.metrics.collapse import ACTIVE_UNIT_THRESHOLD
from arelbo.models.vae import LinearVAE
from arelbo.objectives import POLICIES, GaussianVAELoss, LossOutput, gaussian_kl, neg_elbo_per_sample

__all__ = [
    "FixedSigmaOptimum",
    "fixed_sigma_optimum",
    "eigenvalues_of",
    "second_moment",
    "data_from_second_moment",
    "gaussian_data",
    "factor_analysis_data",
    "ppca_sigma2",
    "ppca_nll",
    "gaussian_nll",
    "linear_gaussian_nll",
    "active_units_threshold_sweep",
    "LinearFit",
    "LinearSummary",
    "fit_linear_vae",
    "summarize_linear_vae",
    "ACTIVE_THRESHOLD",
]

LOG_2PI = math.log(2.0 * math.pi)
ACTIVE_THRESHOLD = ACTIVE_UNIT_THRESHOLD  # unit j is active iff Var_x(E_q[z_j]) > 0.01 (docs/method.md, section 4)


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def eigenvalues_of(cov_or_eigs) -> np.ndarray:
    """Eigenvalues in descending order of a symmetric (D, D) matrix, or a 1-D vector of eigenvalues sorted."""
    a = _as_numpy(cov_or_eigs)
    if a.ndim == 2:
        if a.shape[0] != a.shape[1]:
            raise ValueError(f"covariance must be square, got shape {a.shape}")
        if not np.allclose(a, a.T, rtol=1e-10, atol=1e-12 * max(1.0, float(np.abs(a).max()))):
            raise ValueError("covariance must be symmetric")
        a = np.linalg.eigvalsh(a)
    elif a.ndim != 1:
        raise ValueError(f"expected eigenvalues (D,) or a covariance (D, D), got shape {a.shape}")
    if a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError("eigenvalues must be a non-empty vector of finite numbers")
    if a.min() < -1e-12 * max(1.0, float(a.max())):
        raise ValueError(f"eigenvalues must be >= 0 (a covariance), got min {a.min():g}")
    return np.sort(np.clip(a, 0.0, None))[::-1].copy()


def second_moment(data) -> np.ndarray:
    """C = X^T X / N in float64 for data (N, ...) flattened to (N, D): the matrix the linear VAE's loss sees
    (no mean subtracted: centre the data first if it is not zero-mean)."""
    x = _as_numpy(data)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"data must be (N, D) or (N, ...), got shape {x.shape}")
    x = x.reshape(x.shape[0], -1)
    return x.T @ x / x.shape[0]


def data_from_second_moment(cov, dtype: torch.dtype = torch.float64) -> Tensor:
    """A (2D, D) zero-mean data set whose second moment X^T X / N is exactly ``cov`` (symmetric PSD, (D, D)).

    Rows are +-sqrt(D) times the columns of Q diag(sqrt(l)) (C = Q diag(l) Q^T). The linear VAE's exact loss
    under every policy whose sigma2 pools the batch (all but ``ar-per-sample``) depends on the data only through
    C, so fitting on these rows is fitting on C.
    """
    c = _as_numpy(cov)
    if c.ndim != 2:
        raise ValueError(f"cov must be a (D, D) matrix, got shape {c.shape}")
    eigenvalues_of(c)  # square, symmetric, finite, PSD: or a clear error
    lam, q = np.linalg.eigh(0.5 * (c + c.T))
    half = (q * np.sqrt(np.clip(lam, 0.0, None))).T * math.sqrt(c.shape[0])  # rows r_i with sum r_i r_i^T = D C
    return torch.from_numpy(np.concatenate([half, -half])).to(dtype)


def gaussian_data(eigenvalues, n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """n samples of x ~ N(0, Q diag(l) Q^T) with a Haar-random rotation Q, then centred exactly (so that the
    second moment X^T X / n is the maximum-likelihood covariance and the no-bias linear VAE sees all of it)."""
    lam = torch.as_tensor(_as_numpy(eigenvalues), dtype=dtype)
    if lam.dim() != 1 or lam.numel() < 1 or not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
        raise ValueError("eigenvalues must be a non-empty vector of finite numbers >= 0")
    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    g = torch.Generator().manual_seed(int(seed))
    dim = lam.numel()
    q_mat, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=dtype))
    q_mat = q_mat * torch.sign(torch.diagonal(r))
    x = (torch.randn(int(n), dim, generator=g, dtype=dtype) * lam.sqrt()) @ q_mat.T
    return x - x.mean(0)


def factor_analysis_data(
    dim: int, factors: int, n: int, seed: int = 0, noise_range: tuple[float, float] = (0.2, 1.0), dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor, Tensor]:
    """n samples of a factor-analysis model x = L f + e, f ~ N(0, I_k), e ~ N(0, diag(psi)), with loadings L
    (dim, k) standard normal and uniquenesses psi uniform in ``noise_range``; centred exactly. Returns
    (x, loadings, psi). Well inside the identifiable region ((dim - k)^2 > dim + k) the maximum-likelihood
    solution is interior, so EM and the ar-diagonal VAE converge to it (no Heywood case)."""
    if not (1 <= factors < dim and n > dim):
        raise ValueError(f"need 1 <= factors < dim < n, got factors={factors}, dim={dim}, n={n}")
    lo, hi = noise_range
    if not 0 < lo <= hi:
        raise ValueError(f"noise_range must satisfy 0 < low <= high, got {noise_range}")
    g = torch.Generator().manual_seed(int(seed))
    loadings = torch.randn(dim, factors, generator=g, dtype=dtype)
    psi = lo + (hi - lo) * torch.rand(dim, generator=g, dtype=dtype)
    x = torch.randn(n, factors, generator=g, dtype=dtype) @ loadings.T + torch.randn(n, dim, generator=g, dtype=dtype) * psi.sqrt()
    return x - x.mean(0), loadings, psi


# --------------------------------------------------------------------------------------------------------------
# Fixed sigma2


@dataclass(frozen=True)
class FixedSigmaOptimum:
    """The global optimum of the fixed-sigma2 linear VAE. Per-latent arrays have length q, in descending order."""

    eigenvalues: np.ndarray  # (D,) descending
    sigma2: float
    latent_dim: int
    column_norms2: np.ndarray  # (q,) ||w_j||^2 = max(0, l_j - sigma2)
    active: np.ndarray  # (q,) bool, l_j > sigma2
    posterior_var: np.ndarray  # (q,) s_j = sigma2 / l_j if active else 1
    mu_var: np.ndarray  # (q,) Var_x(mu_j) = max(0, 1 - sigma2 / l_j)
    kl_per_dim: np.ndarray  # (q,) E KL_j = 1/2 log(l_j / sigma2) if active else 0
    distortion: float  # E ||x - f(z)||^2 = k sigma2 + sum of inactive l (j >= q included)
    neg_elbo: float  # expected -ELBO per sample in nats at the optimum

    @property
    def num_active(self) -> int:
        return int(self.active.sum())

    @property
    def rate(self) -> float:
        return float(self.kl_per_dim.sum())


def _check_sigma2(sigma2) -> float:
    sigma2 = float(sigma2)
    if not (math.isfinite(sigma2) and sigma2 > 0):
        raise ValueError(f"sigma2 must be a positive finite number, got {sigma2!r}")
    return sigma2


def _check_latent_dim(latent_dim) -> int:
    if int(latent_dim) != latent_dim or latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
    return int(latent_dim)


def fixed_sigma_optimum(eigenvalues, sigma2: float, latent_dim: int) -> FixedSigmaOptimum:
    """Closed-form optimum of the linear VAE at a fixed decoder variance sigma2.

    ``eigenvalues``: the data second moment's eigenvalues (any order) or the (D, D) matrix itself. Latent
    dimensions beyond D (q > D) see eigenvalue 0 and are inactive.
    """
    lam = eigenvalues_of(eigenvalues)
    sigma2 = _check_sigma2(sigma2)
    q = _check_latent_dim(latent_dim)
    dim = lam.size
    lq = np.concatenate([lam, np.zeros(max(0, q - dim))])[:q]
    active = lq > sigma2
    safe = np.where(active, lq, 1.0)  # avoid log(0) / division by 0 for inactive entries
    column_norms2 = np.where(active, lq - sigma2, 0.0)
    posterior_var = np.where(active, sigma2 / safe, 1.0)
    mu_var = np.where(active, 1.0 - sigma2 / safe, 0.0)
    kl = np.where(active, 0.5 * np.log(safe / sigma2), 0.0)
    k = int(active.sum())
    distortion = k * sigma2 + float(lam.sum() - lq[active].sum())
    neg_elbo = distortion / (2 * sigma2) + 0.5 * dim * (LOG_2PI + math.log(sigma2)) + float(kl.sum())
    return FixedSigmaOptimum(lam, sigma2, q, column_norms2, active, posterior_var, mu_var, kl, distortion, neg_elbo)


def active_units_threshold_sweep(eigenvalues, sigma2_grid: Sequence[float], latent_dim: int, threshold: float = 0.0) -> np.ndarray:
    """Theoretical number of active units at each sigma2 of a grid (int array, same length as the grid).

    ``threshold=0`` counts l_j > sigma2 (the exact optimum); ``threshold=0.01`` counts units whose Var(mu_j) =
    1 - sigma2 / l_j exceeds the active-units metric's threshold, i.e. l_j > sigma2 / (1 - threshold).
    Sweeping sigma2 upward removes one unit at each of the q largest eigenvalues.
    """
    lam = eigenvalues_of(eigenvalues)
    q = _check_latent_dim(latent_dim)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    top = lam[:q]
    return np.array([int(np.sum(top * (1.0 - threshold) > _check_sigma2(s))) for s in sigma2_grid], dtype=int)


# --------------------------------------------------------------------------------------------------------------
# Likelihoods: pPCA, factor analysis, any zero-mean Gaussian


def gaussian_nll(cov_model, sample_cov) -> float:
    """Mean negative log-likelihood (nats per sample) of zero-mean data with second moment ``sample_cov`` under
    N(0, cov_model): 1/2 (D log 2 pi + log det cov_model + tr(cov_model^-1 sample_cov))."""
    sigma = _as_numpy(cov_model)
    s = _as_numpy(sample_cov)
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1] or s.shape != sigma.shape:
        raise ValueError(f"cov_model {sigma.shape} and sample_cov {s.shape} must be the same square shape")
    sign, logdet = np.linalg.slogdet(sigma)
    if sign <= 0:
        raise ValueError("cov_model must be positive definite")
    dim = sigma.shape[0]
    return 0.5 * (dim * LOG_2PI + logdet + float(np.trace(np.linalg.solve(sigma, s))))


def linear_gaussian_nll(loadings, noise_variance, sample_cov) -> float:
    """NLL of the linear-Gaussian model x = W z + e, z ~ N(0, I), e ~ N(0, diag(noise)): covariance
    W W^T + diag(noise). ``loadings`` is (D, k) (a LinearVAE's ``W``; scikit-learn's ``components_.T``);
    ``noise_variance`` a scalar (pPCA, AR-ELBO) or (D,) (factor analysis, ar-diagonal)."""
    w = _as_numpy(loadings)
    s = _as_numpy(sample_cov)
    if w.ndim != 2 or w.shape[0] != s.shape[0]:
        raise ValueError(f"loadings must be (D, k) with D = {s.shape[0]}, got {w.shape}")
    noise = np.broadcast_to(_as_numpy(noise_variance), (w.shape[0],))
    return gaussian_nll(w @ w.T + np.diag(noise), s)


def ppca_sigma2(eigenvalues, q: int) -> float:
    """Probabilistic-PCA noise MLE: the mean of the D - q smallest eigenvalues."""
    lam = eigenvalues_of(eigenvalues)
    q = _check_latent_dim(q)
    if q >= lam.size:
        raise ValueError(f"pPCA needs q < D, got q = {q}, D = {lam.size}")
    return float(lam[q:].mean())


def ppca_nll(cov_or_eigs, q: int) -> float:
    """Exact mean negative log-likelihood (nats per sample) of pPCA with q components at its maximum-likelihood
    solution, for data whose second moment is ``cov_or_eigs`` (a (D, D) matrix or its eigenvalues):
    1/2 (D log 2 pi + sum_{j<=q} log l_j + (D - q) log sigma2 + D)."""
    lam = eigenvalues_of(cov_or_eigs)
    sigma2 = ppca_sigma2(lam, q)
    dim = lam.size
    if sigma2 <= 0 or lam[q - 1] <= 0:
        raise ValueError("pPCA likelihood is unbounded: the spectrum is singular")
    return 0.5 * (dim * LOG_2PI + float(np.log(lam[:q]).sum()) + (dim - q) * math.log(sigma2) + dim)


# --------------------------------------------------------------------------------------------------------------
# Training a linear VAE with the library's loss


class LinearFit(NamedTuple):
    model: LinearVAE
    loss_fn: GaussianVAELoss
    output: LossOutput  # the exact (noise-integrated) loss at the final parameters, computed in eval mode
    grad_max: float = float("nan")  # max |d loss / d parameter| at the end (exact fits): the convergence measure
    converged: bool = False  # grad_max <= tol (always False for Monte-Carlo and ar-ema fits, which have no such test)
    rounds: int = 0  # L-BFGS + Newton rounds run


def _prepare_data(data, dtype: torch.dtype) -> Tensor:
    x = torch.as_tensor(data).detach().to(dtype=dtype)
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"data must be (N, D) or (N, ...), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("data contains NaN or inf")
    return x


def fit_linear_vae(
    data,
    latent_dim: int,
    policy: str = "ar",
    steps: int = 50,
    lr: float = 0.05,
    *,
    policy_kwargs: dict | None = None,
    exact: bool = True,
    lbfgs_steps: int = 500,
    seed: int = 0,
    sigma2_floor: float = 1e-6,
    dtype: torch.dtype = torch.float64,
    model: LinearVAE | None = None,
    newton_steps: int = 6,
    cov=None,
    tol: float = 1e-6,
    max_rounds: int = 4,
) -> LinearFit:
    """Train a :class:`LinearVAE` (no bias) on ``data`` (N, D) full-batch with ``GaussianVAELoss(policy)``.

    ``exact=True``: the loss is ``loss_fn.from_sq_err(model.expected_sq_err(x), mu, logvar)`` (the
    reparameterisation noise integrated exactly); ``steps`` Adam steps at ``lr``, then up to ``lbfgs_steps`` L-BFGS
    iterations (strong Wolfe line search), then up to ``newton_steps`` Newton steps with the exact Hessian (L-BFGS
    alone stalls at ~1e-6 in the parameters along this objective's flat directions); in float64 the optimum is
    reached to ~1e-13 (values and parameters). Policies with running state (``ar-ema``) change their objective at
    every call, so they get the Adam phase only.

    ``exact=False``: ``steps`` Adam steps on the ordinary reparameterised forward ``model(x)`` (one noise draw
    per step), learning rate cosine-annealed to ``lr / 1000`` so the Monte-Carlo noise averages out.

    Convergence: an exact fit repeats the L-BFGS + Newton round (up to ``max_rounds``) until the largest gradient
    entry of the loss is at most ``tol``, or until a round no longer lowers the loss; :class:`LinearFit` returns that
    measure (``grad_max``) and ``converged``. A fit that stops short, e.g. when an ``ar-diagonal`` (factor
    analysis) optimum lies on the boundary (a variance -> 0, a Heywood case) and is approached only slowly, says
    so rather than passing as an optimum.

    ``cov``: fit on a (D, D) second moment instead of data (``data=None``): the exact loss depends on the data only
    through it (:func:`data_from_second_moment`); not for ``ar-per-sample``, whose sigma2 is per data point.

    The global RNG is left untouched (initialisation and noise use a forked RNG seeded with ``seed``). Returns
    :class:`LinearFit` (model, loss_fn, output, grad_max, converged, rounds) where ``output`` is the exact loss at
    the final parameters.
    """
    latent_dim = _check_latent_dim(latent_dim)
    if (data is None) == (cov is None):
        raise ValueError("give either data (N, D) or cov (D, D), not both and not neither")
    if cov is not None:
        if not getattr(POLICIES.get(policy), "is_density", True):  # a sigma2 per data point: no function of the covariance
            raise ValueError(f"{policy}'s sigma2 is per data point: its loss is not a function of the covariance; "
                             "pass data instead of cov")
        if not exact:
            raise ValueError("cov needs exact=True (the Monte-Carlo fit samples data points)")
        data = data_from_second_moment(cov, dtype)
    x = _prepare_data(data, dtype)
    if steps < 0 or lbfgs_steps < 0 or max_rounds < 1 or not tol > 0:
        raise ValueError("steps and lbfgs_steps must be >= 0, max_rounds >= 1 and tol > 0")
    loss_fn = GaussianVAELoss(policy, sigma2_floor=sigma2_floor, **(policy_kwargs or {})).to(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model is None:
            model = LinearVAE(tuple(x.shape[1:]), latent_dim)
        model = model.to(dtype)
        params = [*model.parameters(), *loss_fn.parameters()]

        def exact_loss() -> Tensor:
            mu, logvar = model.encode(x)
            return loss_fn.from_sq_err(model.expected_sq_err(x), mu, logvar).loss

        def mc_loss() -> Tensor:
            return loss_fn(x, model(x)).loss

        objective = exact_loss if exact else mc_loss
        if steps:
            adam = torch.optim.Adam(params, lr=lr)
            sched = None if exact else torch.optim.lr_scheduler.CosineAnnealingLR(adam, steps, eta_min=lr * 1e-3)
            for _ in range(steps):
                adam.zero_grad(set_to_none=True)
                objective().backward()
                adam.step()
                if sched is not None:
                    sched.step()
        polish = exact and loss_fn.policy.stationary  # a moving objective has no optimum to polish
        grad_max, rounds = float("nan"), 0
        if polish:
            grad_max, previous = _grad_max(exact_loss, params)
        while polish and lbfgs_steps and rounds < max_rounds and not grad_max <= tol:
            rounds += 1
            lbfgs = torch.optim.LBFGS(
                params,
                lr=1.0,
                max_iter=lbfgs_steps,
                max_eval=2 * lbfgs_steps,
                tolerance_grad=min(1e-7, tol),
                tolerance_change=1e-15,
                history_size=50,
                line_search_fn="strong_wolfe",
            )

            def closure(lbfgs=lbfgs) -> Tensor:
                lbfgs.zero_grad(set_to_none=True)
                loss = exact_loss()
                loss.backward()
                return loss

            lbfgs.step(closure)
            if newton_steps:
                _newton_polish(model, loss_fn, x, newton_steps)
            grad_max, value = _grad_max(exact_loss, params)
            if not value < previous - 1e-12 * abs(previous):  # this round gained nothing: more would not either
                break
            previous = value
    was_training = loss_fn.training
    loss_fn.eval()
    with torch.no_grad():
        mu, logvar = model.encode(x)
        output = loss_fn.from_sq_err(model.expected_sq_err(x), mu, logvar)
    loss_fn.train(was_training)
    return LinearFit(model, loss_fn, output, grad_max, bool(polish and grad_max <= tol), rounds)


def _grad_max(loss_fn, params) -> tuple[float, float]:
    """(max |gradient entry|, value) of a scalar loss closure at the current parameters."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return max((float(g.abs().max()) for g in grads if g is not None), default=0.0), float(loss.detach())


# The AR policies return sigma2 detached (the envelope-theorem form). Their loss has the right value and gradient,
# but its autograd Hessian misses the dependence of sigma2 on the parameters; the profile objective -ELBO(theta,
# sigma2(theta)) with sigma2 *not* detached (the policy's ``mle_sigma2``) has the same value and gradient and the
# true Hessian. Used only to take Newton steps; the gradient that decides whether a step is kept is always the
# library loss's own.


class _ExactObjective(nn.Module):
    """The exact (noise-integrated) loss as a module with no inputs, for :func:`torch.func.functional_call`."""

    def __init__(self, model: LinearVAE, loss_fn: GaussianVAELoss, x: Tensor, profile: bool = False):
        super().__init__()
        self.model, self.loss_fn, self.x = model, loss_fn, x
        self.profile = profile

    def forward(self) -> Tensor:
        mu, logvar = self.model.encode(self.x)
        sq_err = self.model.expected_sq_err(self.x)
        sigma2 = self.loss_fn.policy.mle_sigma2(sq_err) if self.profile else None
        if sigma2 is None:
            return self.loss_fn.from_sq_err(sq_err, mu, logvar).loss
        sigma2 = sigma2.clamp_min(self.loss_fn.policy.floor)
        return neg_elbo_per_sample(sq_err, sigma2, gaussian_kl(mu, logvar).sum(1)).mean()


def _newton_polish(model: LinearVAE, loss_fn: GaussianVAELoss, x: Tensor, iters: int, grad_tol: float = 1e-13) -> None:
    """A few Newton steps on all parameters (L-BFGS stalls at ~sqrt(eps) in flat directions of this objective).

    The Hessian is autograd's second derivative of the objective (for the AR policies, of the profile objective
    with sigma2 not detached, see ``_PROFILE_SIGMA2``), inverted on its positive eigenspace only (symmetries and
    saddle directions are left alone); a step is kept only if it shrinks the library loss's gradient.
    """
    objective = _ExactObjective(model, loss_fn, x)
    profile = _ExactObjective(model, loss_fn, x, profile=True)
    named = list(objective.named_parameters())
    if not named:
        return
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]

    def call(module: nn.Module, v: Tensor) -> Tensor:
        return torch.func.functional_call(module, dict(zip(names, (c.view(s) for c, s in zip(v.split(sizes), shapes)))), ())

    def grad(v: Tensor) -> Tensor:
        v = v.detach().requires_grad_(True)
        return torch.autograd.grad(call(objective, v), v)[0].detach()

    v = torch.cat([p.detach().reshape(-1) for _, p in named])
    g = grad(v)
    for _ in range(iters):
        if not bool(torch.isfinite(g).all()) or g.abs().max() < grad_tol:
            break
        hess = torch.autograd.functional.hessian(lambda u: call(profile, u), v, vectorize=True).detach()
        evals, evecs = torch.linalg.eigh(0.5 * (hess + hess.T))
        keep = evals > 1e-10 * evals.abs().max()
        if not bool(keep.any()):
            break
        u = evecs[:, keep]
        v_new = v - u @ ((u.T @ g) / evals[keep])
        g_new = grad(v_new)
        if not (bool(torch.isfinite(g_new).all()) and g_new.norm() < g.norm()):
            break
        v, g = v_new, g_new
    with torch.no_grad():
        for (_, p), c, s in zip(named, v.split(sizes), shapes):
            p.copy_(c.view(s))


@dataclass(frozen=True)
class LinearSummary:
    """What a trained linear VAE learned, per latent sorted by descending decoder column norm."""

    column_norms2: np.ndarray  # (q,) ||w_j||^2
    posterior_var: np.ndarray  # (q,) s_j
    mu_var: np.ndarray  # (q,) Var_x(mu_j) over the data
    kl_per_dim: np.ndarray  # (q,) data mean of KL_j
    active: np.ndarray  # (q,) bool, mu_var > threshold
    order: np.ndarray  # (q,) the model's latent index of each entry

    @property
    def num_active(self) -> int:
        return int(self.active.sum())


@torch.no_grad()
def summarize_linear_vae(model: LinearVAE, data=None, threshold: float = ACTIVE_THRESHOLD, *, cov=None) -> LinearSummary:
    """Column norms, encoder variances, Var(mu_j), per-dimension KL and active units (Var(mu_j) > threshold),
    over ``data`` (N, D) or, as for a zero-mean data set with that second moment, over ``cov`` (D, D)."""
    ref = next(model.parameters())
    if (data is None) == (cov is None):
        raise ValueError("give either data (N, D) or cov (D, D), not both and not neither")
    x = _prepare_data(data if cov is None else data_from_second_moment(cov, ref.dtype), ref.dtype)
    mu, logvar = model.encode(x)
    s = logvar.exp().mean(0)
    norms2 = model.W.pow(2).sum(0)
    mu_var = mu.var(0, unbiased=False)
    kl = 0.5 * (mu.pow(2).mean(0) + s - logvar.mean(0) - 1.0)
    order = torch.argsort(norms2, descending=True)
    to = lambda t: t[order].cpu().double().numpy()  # noqa: E731
    return LinearSummary(to(norms2), to(s), to(mu_var), to(kl), to(mu_var) > threshold, order.cpu().numpy())
