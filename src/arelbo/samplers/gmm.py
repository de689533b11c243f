"""``gmm``: a full-covariance Gaussian mixture fitted to the training codes (scikit-learn), sampled in torch."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from arelbo.samplers.base import LatentSampler, register_sampler

__all__ = ["GMMSampler", "single_threaded_blas"]


@register_sampler
class GMMSampler(LatentSampler):
    """A full-covariance Gaussian mixture fitted to the training posterior means (scikit-learn, seeded)."""

    name = "gmm"

    def __init__(self, n_components: int = 10, seed: int = 0, reg_covar: float = 1e-6, max_iter: int = 200,
                 n_init: int = 1, components_grid: Sequence[int] | None = None):
        super().__init__()
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        if components_grid is not None and (not components_grid or min(int(k) for k in components_grid) < 1):
            raise ValueError(f"components_grid must be component counts >= 1, got {components_grid!r}")
        self.n_components, self.seed, self.reg_covar = int(n_components), int(seed), float(reg_covar)
        self.max_iter, self.n_init = int(max_iter), int(n_init)
        # choose n_components from this grid by the mean log-likelihood of held-out codes (None: n_components)
        self.components_grid = None if components_grid is None else sorted({int(k) for k in components_grid})
        self.weights: Tensor | None = None  # (K,)
        self.means: Tensor | None = None  # (K, q)
        self.covariances: Tensor | None = None  # (K, q, q)

    def _fit(self, model, loader, max_examples, progress) -> None:
        mu, _ = self.encode(model, loader, max_examples, progress and "gmm: encoding")
        val = None
        if self.components_grid is not None and self.val_loader is not None:
            val, _ = self.encode(model, self.val_loader, None, progress and "gmm: encoding held-out data")
        self.fit_means(mu, val)

    def fit_means(self, codes: Tensor, val_codes: Tensor | None = None) -> "GMMSampler":
        """Fit the mixture to codes (N, q) directly (what :meth:`fit` does with the posterior means).

        With ``components_grid``, one mixture per count is fitted on ``codes`` and the one with the highest mean
        log-likelihood of ``val_codes`` kept (no ``val_codes``: the last 10% of ``codes`` are held out for the
        choice and the chosen count is refitted on all of them); every score is kept in ``fit_info``."""
        codes = codes.detach().double().cpu()
        if self.components_grid is None:
            return self._fit_k(codes, self.n_components)
        if val_codes is None:
            cut = codes.shape[0] - max(1, codes.shape[0] // 10)
            fit_on, held, held_name = codes[:cut], codes[cut:], "last 10% of the training codes"
        else:
            fit_on, held, held_name = codes, val_codes.detach().double().cpu(), "held-out codes"
        scores, fits = {}, {}
        for k in self.components_grid:
            if k > fit_on.shape[0]:
                continue
            self._fit_k(fit_on, k)
            scores[k] = self._score(held)
            fits[k] = (self.weights, self.means, self.covariances, self.fit_info)
        if not scores:
            raise ValueError(f"need more codes than the smallest component count {self.components_grid[0]}")
        best = max(scores, key=lambda k: (scores[k], -k))
        if val_codes is None:
            self._fit_k(codes, best)
        else:  # the grid's fit of the chosen count is the final one (a seeded refit on the same codes repeats it)
            self.weights, self.means, self.covariances, self.fit_info = fits[best]
        self.n_components = best  # config() then rebuilds the chosen mixture
        self.fit_info.update(selection={"chosen": best, "held_out": held_name, "num_held_out": int(held.shape[0]),
                                        "mean_log_likelihood": {str(k): v for k, v in scores.items()}})
        return self

    def _score(self, codes: Tensor) -> float:
        """Mean log-likelihood of codes (N, q) under the fitted mixture (float64, in torch)."""
        chol = torch.linalg.cholesky(self.covariances)
        diff = codes[:, None, :] - self.means[None]  # (N, K, q)
        sol = torch.linalg.solve_triangular(chol[None], diff.unsqueeze(-1), upper=False).squeeze(-1)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        q = codes.shape[1]
        log_comp = -0.5 * (sol.pow(2).sum(-1) + logdet + q * math.log(2 * math.pi)) + torch.log(self.weights)
        return float(torch.logsumexp(log_comp, dim=1).mean())

    def _fit_k(self, codes: Tensor, k: int) -> "GMMSampler":
        from sklearn.mixture import GaussianMixture

        if codes.dim() != 2 or codes.shape[0] < k:
            raise ValueError(f"need (N, q) codes with N >= n_components = {k}, got {tuple(codes.shape)}")
        gmm = GaussianMixture(k, covariance_type="full", reg_covar=self.reg_covar,
                              max_iter=self.max_iter, n_init=self.n_init, random_state=self.seed)
        # One BLAS/OpenMP thread: EM on (N, q) codes is small work, and numpy's BLAS threads competing with
        # torch's OpenMP pool made it ~10x slower on 2 shared cores (measured: 107 s -> 12 s, MNIST codes).
        with single_threaded_blas():
            gmm.fit(codes.numpy())
        self.latent_dim = codes.shape[1]
        self.weights = torch.as_tensor(gmm.weights_, dtype=torch.float64)
        self.means = torch.as_tensor(gmm.means_, dtype=torch.float64)
        self.covariances = torch.as_tensor(gmm.covariances_, dtype=torch.float64)
        with single_threaded_blas():
            score = float(gmm.score(codes.numpy()))
        self.fit_info = {"num_codes": int(codes.shape[0]), "n_components": int(k), "converged": bool(gmm.converged_),
                         "n_iter": int(gmm.n_iter_), "mean_log_likelihood": score}
        return self

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        self._check_fitted()
        gen_device = generator.device if generator is not None else "cpu"
        comp = torch.multinomial(self.weights.to(gen_device), n, replacement=True, generator=generator).cpu()
        eps = torch.randn(n, self.latent_dim, generator=generator, dtype=torch.float64, device=gen_device).cpu()
        chol = torch.linalg.cholesky(self.covariances)  # (K, q, q)
        z = self.means[comp] + (chol[comp] @ eps.unsqueeze(-1)).squeeze(-1)
        return z.float()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "weights": self.weights, "means": self.means, "covariances": self.covariances}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.weights, self.means, self.covariances = state["weights"], state["means"], state["covariances"]


def single_threaded_blas():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


