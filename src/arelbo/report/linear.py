"""The linear VAE's picture for ``arelbo linear --plot``: active units against sigma2, exact and trained."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from arelbo.report.figures import PALETTE, _figure, _save

def linear_active_units_curve(eigenvalues: Sequence[float], latent_dim: int, n: int = 1000, seed: int = 0,
                              sigma2_grid: Sequence[float] | None = None, steps: int = 50) -> dict:
    """Active units against fixed sigma2 for linear VAEs on N(0, diag-rotated spectrum) data: theory (counting
    sample eigenvalues l_j with Var(mu_j) = 1 - sigma2 / l_j > 0.01) and exact fits (:func:`fit_linear_vae`,
    exact=True) on a log grid, plus AR-ELBO's sigma2 and active units against the pPCA noise value."""
    import numpy as np

    from arelbo import linear as L

    eigs = np.asarray(eigenvalues, dtype=np.float64)
    x = L.gaussian_data(eigs, n, seed)
    lam = L.eigenvalues_of(L.second_moment(x))
    if sigma2_grid is None:
        lo, hi = math.log10(lam[min(latent_dim, lam.size) - 1] / 4), math.log10(lam[0] * 3)
        sigma2_grid = np.logspace(lo, hi, 17)
    grid = np.asarray(sorted(float(s) for s in sigma2_grid))
    trained = []
    for s2 in grid:
        fit = L.fit_linear_vae(x, latent_dim, "fixed", policy_kwargs={"sigma2": float(s2)}, steps=steps, seed=seed)
        trained.append(L.summarize_linear_vae(fit.model, x).num_active)
    fine = np.logspace(math.log10(grid[0]), math.log10(grid[-1]), 600)
    ar = L.fit_linear_vae(x, latent_dim, "ar", steps=steps, seed=seed)
    return {
        "eigenvalues": lam.tolist(),
        "latent_dim": int(latent_dim),
        "sigma2": grid.tolist(),
        "trained_active": [int(a) for a in trained],
        "theory_sigma2": fine.tolist(),
        "theory_active": L.active_units_threshold_sweep(lam, fine, latent_dim, threshold=L.ACTIVE_THRESHOLD).tolist(),
        "ar_sigma2": float(ar.output.sigma2.item()),
        "ar_active": int(L.summarize_linear_vae(ar.model, x).num_active),
        "ppca_sigma2": float(L.ppca_sigma2(lam, latent_dim)),
    }


def plot_linear_active_units(curve: dict, path) -> Path:
    """The linear picture: theory as a step function with steps at the eigenvalues, trained fixed-sigma2 fits as
    points, AR-ELBO's sigma2 (star, at its active units) beside the pPCA value (dashed line)."""
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    ax.step(curve["theory_sigma2"], curve["theory_active"], where="post", color="#333333", lw=1.6,
            label="theory: #{l_j : 1 - σ²/l_j > 0.01}")
    ax.plot(curve["sigma2"], curve["trained_active"], "o", color=PALETTE[0], ms=6, mfc="none", mew=1.5,
            label="trained linear VAEs (fixed σ²)")
    for j, lam in enumerate(curve["eigenvalues"][: curve["latent_dim"]]):
        ax.axvline(lam, color="#999999", lw=0.8, ls=":", label="eigenvalues l_j (j ≤ q)" if j == 0 else None)
    ax.axvline(curve["ppca_sigma2"], color=PALETTE[2], ls="--", lw=1.4, label=f"pPCA σ² = {curve['ppca_sigma2']:.4g}")
    ax.plot([curve["ar_sigma2"]], [curve["ar_active"]], "*", color=PALETTE[3], ms=16,
            label=f"AR-ELBO: σ² = {curve['ar_sigma2']:.4g}, {curve['ar_active']} active")
    ax.set_xscale("log")
    ax.set_xlabel("decoder variance σ²")
    ax.set_ylabel("active units")
    ax.set_yticks(range(curve["latent_dim"] + 1))
    ax.set_title(f"linear VAE, q = {curve['latent_dim']}: collapse as σ² grows past each eigenvalue")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, Path(path))

