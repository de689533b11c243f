"""A two-level *linear* Gaussian hierarchical VAE with closed-form -ELBO, exact NLL and AR-ELBO fits (float64).

The linear counterpart of :class:`arelbo.models.hvae.HierarchicalVAE` (top-down inference), used to check what
AR-ELBO does to a hierarchy where everything is exact. Data x in R^D, zero-mean, second moment S = X^T X / N.

Generative model (q1 <= q2 < D)::

    z1 ~ N(0, I_q1),   z2 | z1 ~ N(A z1, P),   x | z2 ~ N(W z2, sigma2 I),   P = diag(exp p)

so x ~ N(0, W M W^T + sigma2 I) with M = A A^T + P: any PSD matrix of rank <= q2 plus sigma2 I, i.e. exactly
probabilistic PCA with q2 latents (A = 0 is the flat pPCA). Its best NLL is :func:`arelbo.linear.ppca_nll`.

Inference (top-down)::

    q(z1 | x)     = N(V1 x, S1),             S1 = diag(exp s1)
    q(z2 | z1, x) = N(V2 x + B z1, S2),      S2 = diag(exp s2)

**Closed-form -ELBO** (derivation; every expectation is over q, then averaged over the data):

* z2 under q(.|x) is Gaussian: z2 = U x + B S1^(1/2) e1 + S2^(1/2) e2 with U = V2 + B V1, so its mean is U x and
  its covariance C2 = B S1 B^T + S2. Hence E||x - W z2||^2 = ||(I - W U) x||^2 + tr(W C2 W^T), and averaged over
  the data: tr((I - W U) S (I - W U)^T) + tr(W C2 W^T).
* KL1 = KL(N(V1 x, S1) || N(0, I)) = 1/2 (||V1 x||^2 + tr S1 - log det S1 - q1); data mean: tr(V1 S V1^T).
* Given z1, KL(q(z2|z1,x) || p(z2|z1)) = 1/2 (tr(P^-1 S2) + d^T P^-1 d - q2 + log det P - log det S2) with
  d = V2 x + (B - A) z1, linear in z1 ~ N(V1 x, S1): E d^T P^-1 d = ||P^(-1/2) G x||^2 + tr(P^-1 E S1 E^T), with
  E = B - A and G = V2 + E V1; data mean of the first term: tr(P^-1 G S G^T).
* -ELBO = E||x - W z2||^2 / (2 sigma2) + D/2 log(2 pi sigma2) + KL1 + E KL2. Everything depends on the data only
  through S.
* AR-ELBO: sigma2 = E||x - W z2||^2 / D (the MLE, what the ``ar`` policy's detached batch MLE converges to) and
  the profile -ELBO = D/2 (log(2 pi sigma2) + 1) + KL1 + E KL2; its gradient equals the detached form's (envelope
  theorem, checked in the tests against :class:`arelbo.objectives.GaussianVAELoss`).

**Why the gap can close** (:func:`posterior_gap`, :func:`posterior_offdiagonal`): -ELBO - NLL = E_x KL(q(z|x) ||
p(z1, z2 | x)) (same sigma2). The true posterior is Gaussian with precision L = L0 + J^T J / sigma2 (L0 the
prior's precision, J = [0, W]) and a mean linear in x. q is the family of Gaussians with means linear in x whose
z1-marginal covariance and z2-given-z1 conditional covariance are diagonal (its conditional mean is free through
B), so q can equal the posterior iff (i) the posterior covariance of z1 is diagonal and (ii) the conditional
precision of z2 given z1, L_22 = P^-1 + W^T W / sigma2, is diagonal. (i) is free: z1 -> R z1 (R orthogonal)
leaves the model unchanged (isotropic prior, A -> A R^T) and diagonalises it. (ii) holds at the pPCA optimum when
W has orthogonal columns and P is diagonal -- e.g. A = 0 (the top level unused: flat pPCA, KL1 = 0), or any A
with orthogonal rows absorbed by P so that M stays diagonal (the top level used at no cost). So the global
optimum of the profile -ELBO is the pPCA NLL, with sigma2 the pPCA sigma2, and the extra level costs nothing;
whether training reaches it is what :func:`fit_two_level` and ``tests/test_linear_hierarchy.py`` check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from arelbo.linear import eigenvalues_of, gaussian_nll, ppca_nll, ppca_sigma2, second_moment

__all__ = [
    "TwoLevelParams",
    "ExpectedTerms",
    "expected_terms",
    "per_example_terms",
    "neg_elbo",
    "ar_sigma2",
    "neg_elbo_ar",
    "marginal_cov",
    "exact_nll",
    "nll_optimal_sigma2",
    "posterior_gap",
    "posterior_offdiagonal",
    "exact_posterior_encoder",
    "TwoLevelFit",
    "fit_two_level",
]

LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class TwoLevelParams:
    """Generative (A, p, W) and inference (V1, s1, V2, B, s2) parameters; p, s1, s2 are log-variances."""

    A: Tensor  # (q2, q1)  E[z2 | z1] = A z1
    p: Tensor  # (q2,)     log Var[z2 | z1]
    W: Tensor  # (D, q2)   E[x | z2] = W z2
    V1: Tensor  # (q1, D)  E_q[z1 | x] = V1 x
    s1: Tensor  # (q1,)    log Var_q[z1 | x]
    V2: Tensor  # (q2, D)  E_q[z2 | z1, x] = V2 x + B z1
    B: Tensor  # (q2, q1)
    s2: Tensor  # (q2,)    log Var_q[z2 | z1, x]

    @property
    def dims(self) -> tuple[int, int, int]:
        """(D, q1, q2)."""
        return self.W.shape[0], self.A.shape[1], self.A.shape[0]

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def flat(self) -> Tensor:
        return torch.cat([t.reshape(-1) for t in self.tensors()])

    def with_flat(self, v: Tensor) -> TwoLevelParams:
        """The same shapes filled from a flat vector (keeps the graph: for autograd and Hessians)."""
        sizes = [t.numel() for t in self.tensors()]
        parts = [c.view(t.shape) for c, t in zip(v.split(sizes), self.tensors())]
        return TwoLevelParams(*parts)

    def detached(self) -> TwoLevelParams:
        return TwoLevelParams(*(t.detach().clone() for t in self.tensors()))

    @classmethod
    def random(cls, dim: int, q1: int, q2: int, seed: int = 0, scale: float = 0.5,
               dtype: torch.dtype = torch.float64) -> TwoLevelParams:
        """Random parameters (log-variances in [-0.5, 0.5]): a generic point, not an optimum."""
        _check_dims(dim, q1, q2)
        g = torch.Generator().manual_seed(int(seed))

        def n(*shape: int, s: float = scale) -> Tensor:
            return s * torch.randn(*shape, generator=g, dtype=dtype)

        def lv(k: int) -> Tensor:
            return torch.rand(k, generator=g, dtype=dtype) - 0.5

        return cls(n(q2, q1), lv(q2), n(dim, q2, s=1.0), n(q1, dim), lv(q1), n(q2, dim), n(q2, q1), lv(q2))


def _check_dims(dim: int, q1: int, q2: int) -> None:
    if not (1 <= q1 <= q2 < dim):
        raise ValueError(f"need 1 <= q1 <= q2 < D, got q1={q1}, q2={q2}, D={dim}")


def _as_tensor(a, like: Tensor) -> Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64) if not isinstance(a, Tensor) else a).to(like)


@dataclass(frozen=True)
class ExpectedTerms:
    """Data means of the -ELBO's parts: E||x - W z2||^2 (sum over D), KL1 and E_{z1} KL2."""

    distortion: Tensor
    kl1: Tensor
    kl2: Tensor

    @property
    def rate(self) -> Tensor:
        return self.kl1 + self.kl2


def expected_terms(prm: TwoLevelParams, cov) -> ExpectedTerms:
    """The closed forms of the module docstring for data with second moment ``cov`` (D, D)."""
    S = _as_tensor(cov, prm.W)
    dim, q1, q2 = prm.dims
    S1, S2 = prm.s1.exp(), prm.s2.exp()
    U = prm.V2 + prm.B @ prm.V1
    C2 = (prm.B * S1) @ prm.B.T + torch.diag(S2)
    R = torch.eye(dim, dtype=S.dtype) - prm.W @ U
    distortion = torch.trace(R @ S @ R.T) + torch.trace(prm.W @ C2 @ prm.W.T)
    kl1 = 0.5 * (torch.trace(prm.V1 @ S @ prm.V1.T) + S1.sum() - prm.s1.sum() - q1)
    E = prm.B - prm.A
    G = prm.V2 + E @ prm.V1
    pinv = (-prm.p).exp()
    kl2 = 0.5 * ((pinv * S2).sum() + (pinv[:, None] * (G @ S @ G.T)).diagonal().sum()
                 + (pinv[:, None] * ((E * S1) @ E.T)).diagonal().sum() - q2 + prm.p.sum() - prm.s2.sum())
    return ExpectedTerms(distortion, kl1, kl2)


def per_example_terms(prm: TwoLevelParams, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per example of x (N, D): E_q (x_d - (W z2)_d)^2 (N, D), KL1 (N,) and E_{z1} KL2 (N,) -- the same closed
    forms before averaging, in the shapes :meth:`arelbo.objectives.GaussianVAELoss.from_sq_err` takes."""
    x = _as_tensor(x, prm.W)
    q1, q2 = prm.dims[1:]
    S1, S2 = prm.s1.exp(), prm.s2.exp()
    U = prm.V2 + prm.B @ prm.V1
    C2 = (prm.B * S1) @ prm.B.T + torch.diag(S2)
    resid = x - x @ (prm.W @ U).T
    sq_err = resid.pow(2) + (prm.W @ C2 @ prm.W.T).diagonal()
    kl1 = 0.5 * ((x @ prm.V1.T).pow(2).sum(1) + S1.sum() - prm.s1.sum() - q1)
    E = prm.B - prm.A
    G = prm.V2 + E @ prm.V1
    pinv = (-prm.p).exp()
    const = (pinv * S2).sum() + (pinv[:, None] * ((E * S1) @ E.T)).diagonal().sum() - q2 + prm.p.sum() - prm.s2.sum()
    kl2 = 0.5 * ((x @ G.T).pow(2) @ pinv + const)
    return sq_err, kl1, kl2


def neg_elbo(prm: TwoLevelParams, cov, sigma2) -> Tensor:
    """Mean -ELBO (nats per example) at a given decoder variance sigma2."""
    t = expected_terms(prm, cov)
    sigma2 = _as_tensor(sigma2, prm.W)
    dim = prm.dims[0]
    return t.distortion / (2 * sigma2) + 0.5 * dim * (LOG_2PI + sigma2.log()) + t.rate


def ar_sigma2(prm: TwoLevelParams, cov) -> Tensor:
    """AR-ELBO's sigma2: the data mean of E_q||x - W z2||^2 over D (the -ELBO's minimiser in sigma2)."""
    return expected_terms(prm, cov).distortion / prm.dims[0]


def neg_elbo_ar(prm: TwoLevelParams, cov, floor: float = 1e-12) -> tuple[Tensor, Tensor]:
    """(profile -ELBO, sigma2) with sigma2 = AR's MLE, *not* detached: same value and gradient as the library's
    detached form (envelope theorem) and, unlike it, the true Hessian (for Newton steps)."""
    t = expected_terms(prm, cov)
    dim = prm.dims[0]
    sigma2 = (t.distortion / dim).clamp_min(floor)
    return 0.5 * dim * (LOG_2PI + sigma2.log() + 1.0) + t.rate, sigma2


# ------------------------------------------------------------------------------------------------- likelihood


def marginal_cov(prm: TwoLevelParams, sigma2) -> np.ndarray:
    """Cov(x) = W (A A^T + P) W^T + sigma2 I of the generative model, (D, D) numpy."""
    A, W, P = (t.detach().cpu().double().numpy() for t in (prm.A, prm.W, prm.p.exp()))
    M = A @ A.T + np.diag(P)
    return W @ M @ W.T + float(sigma2) * np.eye(W.shape[0])


def exact_nll(prm: TwoLevelParams, cov, sigma2) -> float:
    """Exact mean NLL (nats per example) of data with second moment ``cov`` under the generative model."""
    return gaussian_nll(marginal_cov(prm, sigma2), _np(cov))


def nll_optimal_sigma2(prm: TwoLevelParams, cov) -> tuple[float, float]:
    """(sigma2, NLL) minimising the exact NLL over sigma2 with W, A, p held: in the eigenbasis of K = W M W^T
    (eigenvalues k_i, data second moments c_i along them) NLL = 1/2 sum_i (log(k_i + sigma2) + c_i / (k_i +
    sigma2)) + const, which need not be unimodal: a log grid, then golden-section search around its best point."""
    S = _np(cov)
    K = marginal_cov(prm, 0.0)
    k, Q = np.linalg.eigh(0.5 * (K + K.T))
    k = np.clip(k, 0.0, None)
    c = np.einsum("di,de,ei->i", Q, S, Q)
    dim = S.shape[0]

    def f(log_s2: float) -> float:
        a = k + math.exp(log_s2)
        return 0.5 * (dim * LOG_2PI + float(np.sum(np.log(a) + c / a)))

    hi = math.log(max(float(np.trace(S)), 1e-300))
    grid = np.linspace(hi - 40.0, hi + 1.0, 2001)
    i = int(np.argmin([f(g) for g in grid]))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    while b - a > 1e-13:
        c1, c2 = b - ratio * (b - a), a + ratio * (b - a)
        a, b = (a, c2) if f(c1) <= f(c2) else (c1, b)
    best = 0.5 * (a + b)
    return math.exp(best), f(best)


# ------------------------------------------------------------------------------------------ the true posterior


def _posterior(prm: TwoLevelParams, sigma2) -> tuple[Tensor, Tensor]:
    """(precision L (q1+q2)^2, mean map H ((q1+q2), D)) of p(z1, z2 | x) = N(H x, L^-1)."""
    dim, q1, q2 = prm.dims
    sigma2 = _as_tensor(sigma2, prm.W)
    pinv = torch.diag((-prm.p).exp())
    eye1 = torch.eye(q1, dtype=prm.W.dtype)
    L0 = torch.cat([torch.cat([eye1 + prm.A.T @ pinv @ prm.A, -prm.A.T @ pinv], 1),
                    torch.cat([-pinv @ prm.A, pinv], 1)], 0)
    J = torch.cat([torch.zeros(dim, q1, dtype=prm.W.dtype), prm.W], 1)
    L = L0 + J.T @ J / sigma2
    H = torch.linalg.solve(L, J.T) / sigma2
    return L, H


def _q_joint(prm: TwoLevelParams) -> tuple[Tensor, Tensor]:
    """(mean map F, covariance) of q(z1, z2 | x) = N(F x, Sigma_q)."""
    S1, S2 = prm.s1.exp(), prm.s2.exp()
    U = prm.V2 + prm.B @ prm.V1
    BS1 = prm.B * S1
    cov = torch.cat([torch.cat([torch.diag(S1), BS1.T], 1), torch.cat([BS1, BS1 @ prm.B.T + torch.diag(S2)], 1)], 0)
    return torch.cat([prm.V1, U], 0), cov


def posterior_gap(prm: TwoLevelParams, cov, sigma2) -> Tensor:
    """E_x KL(q(z1, z2 | x) || p(z1, z2 | x)) computed directly from the two Gaussians (equals -ELBO - NLL at the
    same sigma2: an independent check of both): 1/2 (tr(L Sigma_q) + tr(L (F - H) S (F - H)^T) - d - log det
    Sigma_q - log det L)."""
    S = _as_tensor(cov, prm.W)
    L, H = _posterior(prm, sigma2)
    F, Sq = _q_joint(prm)
    Dm = F - H
    d = L.shape[0]
    return 0.5 * (torch.trace(L @ Sq) + torch.trace(L @ Dm @ S @ Dm.T) - d - torch.logdet(Sq) - torch.logdet(L))


def posterior_offdiagonal(prm: TwoLevelParams, sigma2) -> tuple[float, float]:
    """How far the true posterior is from q's family, as the largest |off-diagonal| of (i) Cov(z1 | x) and (ii) the
    conditional precision of z2 given (z1, x), P^-1 + W^T W / sigma2, each scaled to a correlation. Both are 0 iff
    some q of this family equals the posterior (its means are free linear maps)."""
    q1 = prm.dims[1]
    L, _ = _posterior(prm, sigma2)
    cov1 = torch.linalg.inv(L)[:q1, :q1]
    return _max_offdiag_corr(cov1), _max_offdiag_corr(L[q1:, q1:])


def _max_offdiag_corr(m: Tensor) -> float:
    d = m.diagonal().abs().sqrt()
    c = (m / d[:, None] / d[None, :]).detach()
    return float((c - torch.diag(c.diagonal())).abs().max()) if m.shape[0] > 1 else 0.0


def exact_posterior_encoder(prm: TwoLevelParams, sigma2) -> TwoLevelParams:
    """``prm`` with the encoder set to the factorisation p(z1|x) p(z2|z1,x) of the true posterior, keeping only the
    diagonals of Cov(z1|x) and of the conditional covariance of z2 (so exact iff :func:`posterior_offdiagonal`
    is (0, 0)): V1 = H_1, S1 = diag((L^-1)_11); B = -L_22^-1 L_21, V2 = H_2 - B H_1, S2 = diag(L_22^-1)."""
    q1 = prm.dims[1]
    L, H = _posterior(prm, sigma2)
    cov = torch.linalg.inv(L)
    L22, L21 = L[q1:, q1:], L[q1:, :q1]
    B = -torch.linalg.solve(L22, L21)
    V1, H2 = H[:q1], H[q1:]
    s1 = cov[:q1, :q1].diagonal().log()
    s2 = torch.linalg.inv(L22).diagonal().log()
    return TwoLevelParams(prm.A, prm.p, prm.W, V1, s1, H2 - B @ V1, B, s2)


# --------------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TwoLevelFit:
    """A trained two-level linear VAE and the numbers the theory compares (nats per example)."""

    params: TwoLevelParams
    neg_elbo: float  # profile -ELBO at AR's sigma2
    sigma2: float  # AR's sigma2 at the trained parameters
    nll: float  # exact NLL of the trained generative parameters at AR's sigma2
    nll_opt: float  # ... at their NLL-optimal sigma2
    sigma2_nll_opt: float
    ppca_nll: float  # the pPCA optimum with q2 latents (the model family's best)
    ppca_sigma2: float
    kl1: float  # the top level's share of the rate
    kl2: float
    posterior_gap: float  # E KL(q || true posterior), computed directly
    offdiagonal: tuple[float, float]  # posterior_offdiagonal at the trained parameters
    grad_max: float  # largest |gradient entry| of the profile -ELBO at the end

    @property
    def elbo_gap(self) -> float:
        """-ELBO - pPCA optimum (>= 0): 0 iff training reached the global optimum."""
        return self.neg_elbo - self.ppca_nll

    @property
    def nll_gap(self) -> float:
        """Exact NLL (AR's sigma2) - pPCA optimum (>= 0)."""
        return self.nll - self.ppca_nll


def _np(a) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def fit_two_level(
    data=None,
    q1: int = 2,
    q2: int = 3,
    seed: int = 0,
    *,
    cov=None,
    adam_steps: int = 300,
    lr: float = 0.03,
    lbfgs_steps: int = 2000,
    newton_steps: int = 20,
    init_scale: float = 0.5,
) -> TwoLevelFit:
    """Minimise the AR profile -ELBO over all parameters on data (N, D) or their second moment ``cov`` (D, D).

    Adam (``adam_steps`` at ``lr``) from a random start (``seed``), then L-BFGS (strong Wolfe), then Newton steps
    with the exact Hessian restricted to its positive eigenspace (the objective has flat directions: rotations of
    z1, scalings and the continuum of optimal A; L-BFGS alone stops with gradients ~1e-7 and values ~1e-13
    above the optimum, Newton brings both to ~1e-15). float64 throughout; the
    global RNG is untouched. Returns :class:`TwoLevelFit` with the -ELBO, both exact NLLs and the pPCA optimum,
    all for the same second moment.
    """
    if (data is None) == (cov is None):
        raise ValueError("give either data (N, D) or cov (D, D), not both and not neither")
    S_np = second_moment(data) if cov is None else _np(cov)
    eigenvalues_of(S_np)  # square, symmetric, PSD: or a clear error
    dim = S_np.shape[0]
    _check_dims(dim, q1, q2)
    S = torch.from_numpy(S_np)
    # data-scaled initialisation, so the start is sensible for any overall scale of the data
    scale = math.sqrt(float(np.trace(S_np)) / dim)
    prm = TwoLevelParams.random(dim, q1, q2, seed, init_scale)
    prm.W = prm.W * scale
    prm.V1, prm.V2 = prm.V1 / scale, prm.V2 / scale
    v = prm.flat().clone().requires_grad_(True)

    def objective(u: Tensor) -> Tensor:
        return neg_elbo_ar(prm.with_flat(u), S)[0]

    if adam_steps:
        adam = torch.optim.Adam([v], lr=lr)
        for _ in range(adam_steps):
            adam.zero_grad(set_to_none=True)
            objective(v).backward()
            adam.step()
    if lbfgs_steps:
        lbfgs = torch.optim.LBFGS([v], lr=1.0, max_iter=lbfgs_steps, max_eval=2 * lbfgs_steps, tolerance_grad=1e-13,
                                  tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            lbfgs.zero_grad(set_to_none=True)
            loss = objective(v)
            loss.backward()
            return loss

        lbfgs.step(closure)
    u = _newton(objective, v.detach(), newton_steps)
    final = prm.with_flat(u)
    with torch.no_grad():
        value, sigma2 = neg_elbo_ar(final, S)
        terms = expected_terms(final, S)
        gap = posterior_gap(final, S, sigma2)
    uu = u.clone().requires_grad_(True)
    grad_max = float(torch.autograd.grad(objective(uu), uu)[0].abs().max())
    s2 = float(sigma2)
    s2_opt, nll_opt = nll_optimal_sigma2(final, S_np)
    return TwoLevelFit(
        params=final.detached(),
        neg_elbo=float(value),
        sigma2=s2,
        nll=exact_nll(final, S_np, s2),
        nll_opt=nll_opt,
        sigma2_nll_opt=s2_opt,
        ppca_nll=ppca_nll(S_np, q2),
        ppca_sigma2=ppca_sigma2(S_np, q2),
        kl1=float(terms.kl1),
        kl2=float(terms.kl2),
        posterior_gap=float(gap),
        offdiagonal=posterior_offdiagonal(final, s2),
        grad_max=grad_max,
    )


def _newton(objective, v: Tensor, iters: int, grad_tol: float = 1e-13) -> Tensor:
    """Newton steps on the positive eigenspace of the exact Hessian; a step is kept only if it lowers the
    objective and shrinks the gradient (symmetry and saddle directions are left alone)."""

    def value_grad(u: Tensor) -> tuple[float, Tensor]:
        u = u.detach().requires_grad_(True)
        f = objective(u)
        return float(f.detach()), torch.autograd.grad(f, u)[0].detach()

    f, g = value_grad(v)
    for _ in range(iters):
        if not bool(torch.isfinite(g).all()) or float(g.abs().max()) < grad_tol:
            break
        hess = torch.autograd.functional.hessian(objective, v.detach())
        evals, evecs = torch.linalg.eigh(0.5 * (hess + hess.T))
        keep = evals > 1e-10 * evals.abs().max()
        if not bool(keep.any()):
            break
        e = evecs[:, keep]
        v_new = v - e @ ((e.T @ g) / evals[keep])
        f_new, g_new = value_grad(v_new)
        if not (math.isfinite(f_new) and f_new <= f + 1e-14 * abs(f) and g_new.norm() < g.norm()):
            break
        v, f, g = v_new.detach(), f_new, g_new
    return v.detach()
