"""``arelbo linear``: train linear VAEs on Gaussian data with the library's loss and compare with the exact closed
forms of docs/method.md section 3 (fixed sigma2 collapse thresholds, AR-ELBO -> pPCA, ar-diagonal -> factor
analysis). Theory is evaluated on the *sample* second moment of the generated data (exact for the objective
that is optimised); the population values are printed beside it."""

from __future__ import annotations

import argparse
import time
import warnings

METHOD_SPECTRUM = (5.0, 3.0, 1.5, 0.8, 0.5, 0.3, 0.2, 0.1)  # docs/method.md: D = 8, q = 4, pPCA sigma2 = 0.275
DEFAULT_FIXED = (0.5, 1.0, 2.0, 4.0, 6.0)  # crosses l_4 .. l_1 of the example: 4, 3, 2, 1, 0 active units


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eigenvalues", type=_floats, default=list(METHOD_SPECTRUM),
                        help="population covariance eigenvalues, comma-separated (default: %(default)s)")
    parser.add_argument("--latent-dim", type=int, default=4, help="q, latent dimensions (default: %(default)s)")
    parser.add_argument("--n", type=int, default=1000, help="number of samples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50,
                        help="Adam steps per exact fit before the L-BFGS/Newton polish (default: %(default)s)")
    parser.add_argument("--fixed-sigma2", type=_floats, default=list(DEFAULT_FIXED),
                        help="fixed decoder variances to fit, comma-separated (default: %(default)s)")
    parser.add_argument("--fa-factors", type=int, default=2,
                        help="factors (latents) of the ar-diagonal vs factor-analysis comparison (default: %(default)s)")
    parser.add_argument("--fa-on", choices=("factor-data", "spectrum"), default="factor-data",
                        help="data of that comparison: a generated factor-analysis data set (default), or the "
                        "Gaussian data of --eigenvalues (its optimum may lie on the boundary, a variance -> 0)")
    parser.add_argument("--mc-steps", type=int, default=500,
                        help="Adam steps of the Monte-Carlo (reparameterised forward) 'ar' fit; 0 skips it "
                        "(default: %(default)s)")
    parser.add_argument("--plot", metavar="FILE", help="also write a PNG: active units against sigma2, theory (steps "
                        "at the eigenvalues) vs exact fits on a log grid, and ar's sigma2 vs the pPCA value")


def _plot(args, eigs, q: int) -> None:
    """``--plot FILE``: the linear picture (:func:`arelbo.report.plot_linear_active_units`)."""
    from arelbo.report import linear_active_units_curve, plot_linear_active_units

    curve = linear_active_units_curve(eigs, q, n=args.n, seed=args.seed, steps=args.steps)
    print(f"wrote {plot_linear_active_units(curve, args.plot)} (active units at {len(curve['sigma2'])} sigma2 values; "
          f"ar sigma2 {curve['ar_sigma2']:.6g} vs pPCA {curve['ppca_sigma2']:.6g})")


def _convergence(fit, tol: float = 1e-6) -> str:
    """How far the fit is from a stationary point; a loud flag when it stopped short."""
    if fit.converged:
        return f"converged (max |grad| {fit.grad_max:.1e})"
    return (f"NOT CONVERGED: max |grad| {fit.grad_max:.1e} > {tol:g} after {fit.rounds} L-BFGS/Newton rounds; "
            "the trained values are not the optimum's")


def _vec(values, fmt: str = "{:7.4f}") -> str:
    return " ".join(fmt.format(float(v)) for v in values)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from arelbo import linear as L

    eigs = np.asarray(args.eigenvalues, dtype=np.float64)
    dim, q = eigs.size, args.latent_dim
    if dim < 2 or np.any(eigs <= 0):
        raise ValueError("--eigenvalues needs at least two positive numbers")
    if not 1 <= q < dim:
        raise ValueError(f"--latent-dim must be in [1, D - 1] = [1, {dim - 1}], got {q}")
    if args.n < dim + 1:
        raise ValueError(f"--n must exceed D = {dim}, got {args.n}")
    if not 1 <= args.fa_factors < dim:
        raise ValueError(f"--fa-factors must be in [1, D - 1] = [1, {dim - 1}], got {args.fa_factors}")
    if args.steps < 0 or args.mc_steps < 0:
        raise ValueError("--steps and --mc-steps must be >= 0")
    if args.plot:
        from arelbo.cli import check_output_file

        check_output_file(args.plot, "--plot", "linear.png")  # now, not after the fits

    start = time.perf_counter()
    torch.set_num_threads(1)  # an 8-dimensional problem: intra-op threads only add overhead
    with threadpool_limits(1):
        x = L.gaussian_data(eigs, args.n, args.seed)
        cov = L.second_moment(x)
        lam = L.eigenvalues_of(cov)
        pop = np.sort(eigs)[::-1]
        fit_kw = dict(steps=args.steps, seed=args.seed)
        print(f"arelbo linear: D={dim}, q={q}, n={args.n}, seed={args.seed}; data x ~ N(0, Q diag(l) Q^T), centred")
        print(f"  population eigenvalues l : {_vec(pop)}")
        print(f"  sample eigenvalues       : {_vec(lam)}   (theory below uses these)")
        print()

        # ---- fixed sigma2
        print("fixed sigma2: theory (sample covariance) vs trained; active = Var(mu_j) > 0.01")
        print(f"  {'sigma2':>7}  {'active th/tr':>12}  {'max|dNorm2|':>11}  {'-ELBO theory':>12}  {'-ELBO trained':>13}"
              f"  ||w_j||^2 trained (theory max(0, l_j - sigma2))")
        for s2 in args.fixed_sigma2:
            th = L.fixed_sigma_optimum(lam, s2, q)
            fit = L.fit_linear_vae(x, q, "fixed", policy_kwargs={"sigma2": s2}, **fit_kw)
            sm = L.summarize_linear_vae(fit.model, x)
            act_th = int(np.sum(th.mu_var > L.ACTIVE_THRESHOLD))
            print(f"  {s2:7.3g}  {act_th:>5d} / {sm.num_active:<4d}  {np.abs(sm.column_norms2 - th.column_norms2).max():11.1e}"
                  f"  {th.neg_elbo:12.6f}  {fit.output.neg_elbo.item():13.6f}  {_vec(sm.column_norms2, '{:.4f}')}"
                  f"  ({_vec(th.column_norms2, '{:.4f}')})" + ("" if fit.converged else f"  {_convergence(fit)}"))
        print()

        # ---- AR-ELBO isotropic vs pPCA
        s2_ppca = L.ppca_sigma2(lam, q)
        nll_ppca = L.ppca_nll(lam, q)
        fit = L.fit_linear_vae(x, q, "ar", **fit_kw)
        sm = L.summarize_linear_vae(fit.model, x)
        s2_ar = fit.output.sigma2.item()
        th = L.fixed_sigma_optimum(lam, s2_ppca, q)
        print('AR-ELBO isotropic ("ar") vs probabilistic PCA')
        print(f"  sigma2      trained {s2_ar:.10f}   pPCA MLE (sample) {s2_ppca:.10f}   |diff| {abs(s2_ar - s2_ppca):.1e}"
              f"   population pPCA value {L.ppca_sigma2(pop, q):.4f}")
        print(f"  -ELBO       trained {fit.output.neg_elbo.item():.10f}   exact pPCA NLL    {nll_ppca:.10f}   |diff| "
              f"{abs(fit.output.neg_elbo.item() - nll_ppca):.1e}   (nats/sample)")
        print(f"  active      {sm.num_active} of {q} (theory {th.num_active});  ||w_j||^2 trained {_vec(sm.column_norms2, '{:.4f}')}"
              f"  theory l_j - sigma2 {_vec(th.column_norms2, '{:.4f}')}")
        print(f"  fit         {_convergence(fit)}")
        if args.mc_steps:
            mc = L.fit_linear_vae(x, q, "ar", steps=args.mc_steps, lr=0.05, exact=False, seed=args.seed)
            s2_mc = mc.output.sigma2.item()
            print(f"  MC forward  ({args.mc_steps} Adam steps, reparameterised samples): sigma2 {s2_mc:.6f} "
                  f"(rel. diff {abs(s2_mc / s2_ppca - 1):.1e}), exact -ELBO of the result {mc.output.neg_elbo.item():.6f}")
        print()

        # ---- AR-ELBO diagonal vs factor analysis
        from sklearn.decomposition import FactorAnalysis

        k = args.fa_factors
        if args.fa_on == "spectrum":
            xf, psi = x, None
            about = (f"  data: the Gaussian data above (D={dim}, n={args.n}), {k} factors. If some uniqueness heads "
                     "to 0 (a Heywood case),\n  the optimum is on the boundary and neither EM nor gradient descent "
                     "reaches it in useful time: see the convergence lines.")
        else:
            xf, _, psi = L.factor_analysis_data(dim, k, args.n, seed=args.seed)
            about = (f"  data: a {k}-factor model in D={dim}, loadings N(0, 1), uniquenesses U(0.2, 1), n={args.n}, "
                     "centred (--fa-on spectrum: the data above).")
        fit = L.fit_linear_vae(xf, k, "ar-diagonal", **fit_kw)
        xn = xf.numpy()
        fa_max_iter = 20000
        fa = FactorAnalysis(k, tol=1e-10, max_iter=fa_max_iter, svd_method="lapack", random_state=args.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said below, in the table, instead
            fa.fit(xn)
        nll_fa = -fa.score(xn)
        s2_d = fit.output.sigma2.numpy()
        implied = L.linear_gaussian_nll(fit.model.W, s2_d, L.second_moment(xf))
        print('AR-ELBO diagonal ("ar-diagonal", q = %d) vs factor analysis (scikit-learn FactorAnalysis, EM, same data)' % k)
        print(about)
        print(f"  -ELBO trained {fit.output.neg_elbo.item():.10f}   FA NLL {nll_fa:.10f}   diff {fit.output.neg_elbo.item() - nll_fa:+.1e}"
              f"   (exact NLL of the VAE's own model W W^T + diag(sigma_d^2): {implied:.10f})")
        print(f"  sigma_d^2 trained : {_vec(s2_d)}")
        fa_state = ("NOT CONVERGED: EM hit its iteration limit" if fa.n_iter_ >= fa_max_iter
                    else f"EM stopped after {fa.n_iter_} iterations")
        print(f"  FA uniquenesses   : {_vec(fa.noise_variance_)}   max|diff| {np.abs(s2_d - fa.noise_variance_).max():.1e}"
              f" ({fa_state})")
        if psi is not None:
            print(f"  true psi          : {_vec(psi)}")
        print(f"  fit               : {_convergence(fit)}")
        if args.plot:
            _plot(args, eigs, q)
    print(f"\n({time.perf_counter() - start:.1f} s)")
    return 0
