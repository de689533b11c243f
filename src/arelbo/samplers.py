"""Ex-post latent samplers: where the latent codes fed to a trained decoder come from when generating.

A sampler is fitted once on a trained VAE and its training data, then draws latent codes z (n, q); decoding
through the first model is shared (:func:`decode_samples`). Registered samplers:

- ``prior``: z ~ p(z), the VAE's own generative model (N(0, I), or the learnable prior it was trained with: a
  standalone copy of that density is kept, so a saved prior sampler needs no model);
- ``gmm``: a Gaussian mixture (scikit-learn ``GaussianMixture``, full covariances, ``n_components`` = 10 by
  default, seeded) fitted to the posterior means mu(x) of the training set; sampled in torch (component by
  ``torch.multinomial``, then mean + Cholesky factor x standard normal) so a ``torch.Generator`` drives it;
- ``two-stage``: Dai & Wipf (2019)'s two-stage VAE: a second VAE (MLP encoder/decoder, latent dimension = the
  first stage's) trained with an :mod:`arelbo.objectives` policy (``ar`` by default, ``learned`` for their gamma) on
  the first stage's latent codes, z samples from q(z|x) (the aggregate posterior, redrawn every step; the
  default) or the means mu(x). Sampling: u ~ N(0, I) -> z = second decoder's mean at u plus its decoder
  noise N(0, sigma2) (``noise=False``: the mean alone, as Dai & Wipf);
- ``flow``: a masked autoregressive flow (zuko MAF, as pythae's MAF sampler) fitted by maximum likelihood to the
  standardised posterior means mu(x) (or samples of q(z|x)) of the training set, with early stopping on held-out
  codes; sampled by inverting the flow on seeded standard normals.

Fitted state is a plain dict (tensors, numbers, strings): :func:`save_sampler` / :func:`load_sampler` store it
with the sampler's name and config, loadable with ``torch.load(weights_only=True)``.

Adding a sampler: subclass :class:`LatentSampler`, implement ``_fit``/``sample``/``state_dict``/
``load_state_dict``, and decorate with ``@register_sampler``.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import Tensor

from arelbo.registry import build, register

__all__ = [
    "LatentSampler",
    "PriorSampler",
    "GMMSampler",
    "TwoStageSampler",
    "FlowSampler",
    "SAMPLERS",
    "register_sampler",
    "make_sampler",
    "save_sampler",
    "load_sampler",
    "decode_samples",
    "to_uint8",
]

SAMPLER_FORMAT = 1


class LatentSampler:
    """Base class. ``fit(model, train_loader)`` then ``sample(n, generator) -> (n, q)`` latent codes (float32, CPU).

    ``config()`` returns the constructor arguments (so ``make_sampler(name, **config)`` rebuilds it) and
    ``state_dict()`` the fitted state.
    """

    name: ClassVar[str] = ""
    # set on samplers that define a study method of their own: the policy its first stage trains with
    first_stage_policy: ClassVar[str | None] = None
    study_label: ClassVar[str] = ""

    def __init__(self):
        self.latent_dim: int | None = None
        self.fit_info: dict[str, Any] = {}
        self.val_loader: Iterable | None = None

    # -- interface
    def fit(self, model, loader: Iterable, max_examples: int | None = None, progress: bool | str = False,
            val_loader: Iterable | None = None) -> "LatentSampler":
        """Fit on the training data ``loader``; ``val_loader`` (held-out data, optional) is where samplers that
        choose something (a component count, when to stop) judge it (``self.val_loader`` in ``_fit``)."""
        self.latent_dim = int(model.latent_dim)
        self.val_loader = val_loader
        try:
            self._fit(model, loader, max_examples, progress)
        finally:
            self.val_loader = None
        return self

    def _fit(self, model, loader, max_examples, progress) -> None:
        pass

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def fitted(self) -> bool:
        return self.latent_dim is not None

    def _check_fitted(self):
        if not self.fitted:
            raise ValueError(f"sampler {self.name!r} is not fitted: call fit(model, train_loader) or load a state first")

    def config(self) -> dict[str, Any]:
        params = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {p: getattr(self, p) for p in params}

    def state_dict(self) -> dict[str, Any]:
        return {"latent_dim": self.latent_dim, "fit_info": dict(self.fit_info)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.latent_dim = None if state.get("latent_dim") is None else int(state["latent_dim"])
        self.fit_info = dict(state.get("fit_info", {}))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args}{', unfitted' if not self.fitted else ''})"


SAMPLERS: dict[str, type[LatentSampler]] = {}


def register_sampler(cls: type[LatentSampler]) -> type[LatentSampler]:
    return register(SAMPLERS, cls, "sampler")


def make_sampler(name: str, **kwargs) -> LatentSampler:
    """Build a registered sampler by name; unknown names and arguments are errors that list what is valid."""
    return build(SAMPLERS, name, kwargs, kind="sampler", long_kind="sampler", plural="samplers")


def _standard_normal(n: int, q: int, generator: torch.Generator | None) -> Tensor:
    return torch.randn(n, q, generator=generator, device=generator.device if generator is not None else "cpu").cpu()


@register_sampler
class PriorSampler(LatentSampler):
    """z ~ p(z), the model's own prior: N(0, I) (nothing to fit), or a standalone copy of its learnable prior."""

    name = "prior"

    def __init__(self):
        super().__init__()
        self.prior = None  # None: N(0, I); else a arelbo.models.priors.Prior that needs no encoder

    def _fit(self, model, loader, max_examples, progress) -> None:
        prior = getattr(model, "prior", None)
        self.prior = None if prior is None or prior.closed_form_kl else prior.standalone(model.encoder).cpu()
        if self.prior is not None:
            self.fit_info = {"prior": prior.name}

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        self._check_fitted()
        if self.prior is None:
            return _standard_normal(n, self.latent_dim, generator)
        with torch.no_grad():
            return self.prior.sample(n, generator).float().cpu()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.prior is not None:
            state["prior"] = {"name": self.prior.name, "config": self.prior.config(), "state": self.prior.state_dict()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from arelbo.models.priors import make_prior

        super().load_state_dict(state)
        self.prior = None
        if state.get("prior") is not None:
            p = state["prior"]
            self.prior = make_prior(p["name"], **p["config"])
            self.prior.load_state_dict(p["state"])
            self.prior.eval()


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
        from arelbo.metrics.collapse import encode_dataset

        mu, _ = encode_dataset(model, loader, max_examples, progress and "gmm: encoding")
        val = None
        if self.components_grid is not None and self.val_loader is not None:
            val, _ = encode_dataset(model, self.val_loader, None, progress and "gmm: encoding held-out data")
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
        scores = {}
        for k in self.components_grid:
            if k > fit_on.shape[0]:
                continue
            self._fit_k(fit_on, k)
            scores[k] = self._score(held)
        if not scores:
            raise ValueError(f"need more codes than the smallest component count {self.components_grid[0]}")
        best = max(scores, key=lambda k: (scores[k], -k))
        if val_codes is None:
            self._fit_k(codes, best)
        else:
            self._fit_k(fit_on, best)
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
        with _single_threaded_blas():
            gmm.fit(codes.numpy())
        self.latent_dim = codes.shape[1]
        self.weights = torch.as_tensor(gmm.weights_, dtype=torch.float64)
        self.means = torch.as_tensor(gmm.means_, dtype=torch.float64)
        self.covariances = torch.as_tensor(gmm.covariances_, dtype=torch.float64)
        with _single_threaded_blas():
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


def _single_threaded_blas():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def _second_stage_vae(latent_dim: int, hidden: Sequence[int]):
    from arelbo.models import VAE, MLPDecoder, MLPEncoder

    shape = (latent_dim,)
    enc = MLPEncoder(shape, latent_dim, list(hidden))
    dec = MLPDecoder(shape, latent_dim, list(hidden), out_activation="none")
    return VAE(enc, dec, latent_dim, shape)


@register_sampler
class TwoStageSampler(LatentSampler):
    """Dai & Wipf's two-stage VAE: a second (MLP) VAE on the first stage's latent codes, sampled through it.

    Args:
        steps: Adam steps for the second stage; batch_size, lr as usual (lr halved at 50% and 75% of steps).
        hidden: widths of the second stage's MLP encoder (the decoder mirrors them). Defaults are sized for CPU
            evaluation (Dai & Wipf used 3 x 1024 units and far more steps; raise both for a faithful baseline).
        policy: a decoder-variance policy of :mod:`arelbo.objectives` (``"ar"``; ``"learned"`` is Dai & Wipf's gamma).
        codes: ``"sample"`` (z ~ q(z|x), redrawn each step: the aggregate posterior) or ``"mean"`` (mu(x)).
        noise: sampling adds the second stage's decoder noise N(0, sigma2) to its decoder mean, i.e. samples the
            fitted second-stage model exactly (the default). ``noise=False`` is Dai & Wipf's choice, the decoder
            mean alone, which is right only once sigma2 -> 0 (codes on a lower-dimensional manifold, a long
            second-stage fit). When the codes fill all q dimensions, or the second stage is short, the mean alone is
            under-dispersed and collapses onto few modes (MNIST, mnist-conv CPU study: FID 595 with the mean alone
            against 178 with the noise; docs/results/mnist.md). sigma2 (stored after fitting, in ``fit_info``):
            the learned/fixed value, or the ar-type MLE on the training codes.
        seed: seeds initialisation, batches and noise (the global RNG is left untouched).
        patience: early stopping. Every ``eval_every`` steps the second stage's -ELBO on held-out codes (the
            ``val_loader`` given to :meth:`fit`, else the last 10% of the training codes, which are then not
            trained on) is measured with fixed noise; training stops once it has not improved for ``patience``
            evaluations (or at ``steps``), and the weights of the best evaluation are kept. None: all ``steps``.
    """

    name = "two-stage"
    # a study spec "two-stage[:S0]" means: train with this policy ("learned[:S0]"), generate with this sampler
    first_stage_policy: ClassVar[str] = "learned"
    study_label: ClassVar[str] = "two-stage VAE"

    def __init__(self, steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
                 hidden: Sequence[int] = (256, 256), policy: str = "ar", codes: str = "sample", noise: bool = True,
                 seed: int = 0, patience: int | None = None, eval_every: int = 200):
        super().__init__()
        from arelbo.objectives import POLICIES

        if codes not in ("sample", "mean"):
            raise ValueError(f"codes must be 'sample' or 'mean', got {codes!r}")
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(sorted(POLICIES))}")
        if steps < 0 or batch_size < 1 or not lr > 0:
            raise ValueError("need steps >= 0, batch_size >= 1, lr > 0")
        self.steps, self.batch_size, self.lr = int(steps), int(batch_size), float(lr)
        self.hidden, self.policy, self.codes, self.seed = [int(h) for h in hidden], policy, codes, int(seed)
        self.noise = bool(noise)
        if patience is not None and int(patience) < 1 or int(eval_every) < 1:
            raise ValueError(f"need patience >= 1 (or None) and eval_every >= 1, got {patience}, {eval_every}")
        self.patience, self.eval_every = None if patience is None else int(patience), int(eval_every)
        self.vae = None
        self.loss_fn = None
        self.sigma2: Tensor | None = None  # () or (q,): the second stage's decoder variance after fitting

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["hidden"] = list(cfg["hidden"])
        return cfg

    def _build(self, latent_dim: int):
        from arelbo.objectives import GaussianVAELoss

        self.vae = _second_stage_vae(latent_dim, self.hidden)
        self.loss_fn = GaussianVAELoss(self.policy, check_finite=False)

    def _fit(self, model, loader, max_examples, progress) -> None:
        from arelbo.metrics.collapse import encode_dataset

        mu, logvar = encode_dataset(model, loader, max_examples, progress and "two-stage: encoding")
        val = None
        if self.patience is not None and self.val_loader is not None:
            val = encode_dataset(model, self.val_loader, None, progress and "two-stage: encoding held-out data")
        self.fit_codes(mu, logvar, progress=progress, val=val)

    def fit_codes(self, mu: Tensor, logvar: Tensor | None = None, progress: bool | str = False,
                  val: tuple[Tensor, Tensor] | None = None) -> "TwoStageSampler":
        """Train the second stage on first-stage posteriors (N, q) directly (``logvar`` needed for codes='sample');
        ``val``: held-out (mu, logvar) for early stopping (with ``patience``)."""
        mu = mu.detach().float().cpu()
        if self.codes == "sample" and logvar is None:
            raise ValueError("codes='sample' needs the posterior log-variances")
        held_name = None
        if self.patience is not None:
            if val is None:  # hold out the last 10% of the training codes
                cut = mu.shape[0] - max(1, mu.shape[0] // 10)
                val = (mu[cut:], None if logvar is None else logvar[cut:])
                mu, logvar = mu[:cut], None if logvar is None else logvar[:cut]
                held_name = "last 10% of the training codes"
            else:
                held_name = "held-out codes"
        if self.codes == "sample":
            std = (0.5 * logvar.detach().float().cpu()).exp()
        n, q = mu.shape
        self.latent_dim = q
        losses = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._build(q)
            gen = torch.Generator().manual_seed(self.seed)
            params = [*self.vae.parameters(), *self.loss_fn.parameters()]
            opt = torch.optim.Adam(params, lr=self.lr)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, [self.steps // 2, (3 * self.steps) // 4], 0.5)
            self.vae.train()
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=self.steps, desc="two-stage: training", leave=False)
            stopper = None if self.patience is None else _EarlyStopping(self, val, self.seed)
            steps_run = 0
            with torch.enable_grad():
                for step in range(self.steps):
                    idx = torch.randint(0, n, (min(self.batch_size, n),), generator=gen)
                    u = mu[idx]
                    if self.codes == "sample":
                        u = u + std[idx] * torch.randn(u.shape, generator=gen)
                    out = self.vae(u)
                    loss = self.loss_fn(u, out.x_hat, out.mu, out.logvar)
                    opt.zero_grad(set_to_none=True)
                    loss.loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(float(loss.neg_elbo))
                    del losses[:-100]
                    steps_run = step + 1
                    if bar is not None:
                        bar.update(1)
                    if stopper is not None and steps_run % self.eval_every == 0 and stopper.check(steps_run):
                        break
            if bar is not None:
                bar.close()
            if stopper is not None:
                stopper.check(steps_run)  # the final weights compete too
                stopper.restore()
            self.vae.eval()
            self.sigma2 = self._final_sigma2(mu, std if self.codes == "sample" else None, gen)
        self.fit_info = {"num_codes": int(n), "steps": self.steps, "steps_run": steps_run,
                         "final_neg_elbo": float(sum(losses) / len(losses)) if losses else None,
                         "sigma2_mean": float(self.sigma2.mean())}
        if stopper is not None:
            self.fit_info["early_stopping"] = {"held_out": held_name, "num_held_out": int(val[0].shape[0]),
                                               "patience": self.patience, "eval_every": self.eval_every,
                                               "best_step": stopper.best_step, "stopped_early": steps_run < self.steps,
                                               "val_neg_elbo": stopper.history}
        return self

    def _final_sigma2(self, mu: Tensor, std: Tensor | None, gen: torch.Generator) -> Tensor:
        """The second stage's decoder variance: its policy's value, or the ar-type MLE over all training codes."""
        from arelbo.metrics.likelihood import ELBOAccumulator

        acc = ELBOAccumulator(per_sample_floor=self.loss_fn.policy.floor)
        with torch.inference_mode():
            for start in range(0, mu.shape[0], 4096):
                u = mu[start : start + 4096]
                if std is not None:
                    u = u + std[start : start + 4096] * torch.randn(u.shape, generator=gen)
                m, lv = self.vae.encode(u)
                z = m + (0.5 * lv).exp() * torch.randn(m.shape, generator=gen)
                acc.update((u - self.vae.decode(z)).pow(2), m, lv)
        value = self.loss_fn.policy.density_sigma2(acc).value
        return value.float().reshape(-1) if value.dim() else value.float()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        self._check_fitted()
        u = _standard_normal(n, self.latent_dim, generator)
        with torch.inference_mode():
            z = self.vae.decode(u).float()
            if self.noise:
                z = z + self.sigma2.sqrt() * _standard_normal(n, self.latent_dim, generator)
        return z

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "vae": self.vae.state_dict() if self.vae is not None else None,
                "loss": self.loss_fn.state_dict() if self.loss_fn is not None else None, "sigma2": self.sigma2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("vae") is not None:
            self._build(self.latent_dim)
            self.vae.load_state_dict(state["vae"])
            self.loss_fn.load_state_dict(state.get("loss") or {})
            self.vae.eval()
        self.sigma2 = state.get("sigma2")


class _EarlyStopping:
    """The two-stage sampler's held-out -ELBO every few steps (fixed noise), the best weights, and when to stop."""

    def __init__(self, sampler: TwoStageSampler, val: tuple[Tensor, Tensor | None], seed: int):
        self.sampler = sampler
        mu, logvar = val[0].detach().float().cpu(), val[1]
        gen = torch.Generator().manual_seed(seed + 1)
        if sampler.codes == "sample":
            mu = mu + (0.5 * logvar.detach().float().cpu()).exp() * torch.randn(mu.shape, generator=gen)
        self.codes = mu
        self.eps = torch.randn(mu.shape, generator=gen)  # the second stage's noise, the same at every check
        self.best: float | None = None
        self.best_step = 0
        self.best_state = None
        self.bad = 0
        self.history: list[list[float]] = []

    def check(self, step: int) -> bool:
        """Measure at ``step``; True when training should stop (no improvement for ``patience`` checks)."""
        if self.history and self.history[-1][0] == step:
            return False
        vae, loss_fn = self.sampler.vae, self.sampler.loss_fn
        vae.eval()
        loss_fn.eval()
        with torch.inference_mode():
            m, lv = vae.encode(self.codes)
            out = loss_fn(self.codes, vae.decode(m + (0.5 * lv).exp() * self.eps), m, lv)
            value = float(out.neg_elbo)
        vae.train()
        loss_fn.train()
        self.history.append([step, value])
        if self.best is None or value < self.best:
            self.best, self.best_step, self.bad = value, step, 0
            self.best_state = ({k: v.clone() for k, v in vae.state_dict().items()},
                               {k: v.clone() for k, v in loss_fn.state_dict().items()})
            return False
        self.bad += 1
        return self.bad >= self.sampler.patience

    def restore(self) -> None:
        if self.best_state is not None:
            self.sampler.vae.load_state_dict(self.best_state[0])
            self.sampler.loss_fn.load_state_dict(self.best_state[1])


@register_sampler
class FlowSampler(LatentSampler):
    """A masked autoregressive flow (zuko MAF) fitted to the training codes by maximum likelihood.

    The codes are standardised (mean and scale kept) and Adam trains on them in minibatches of ``batch_size``; after
    each epoch the negative log-likelihood of held-out codes is measured and the best state is kept; training stops
    after ``patience`` epochs without improvement or ``max_epochs``. Held-out codes: those of the ``val_loader``
    given to :meth:`fit` (the validation split), else a seeded ``val_fraction`` of the training codes, which are
    then not trained on. ``codes``: ``"mean"`` (mu(x), as the GMM sampler) or ``"sample"`` (z ~ q(z|x),
    redrawn each epoch: the aggregate posterior). ``seed`` drives initialisation, split, batches and noise; the
    global RNG is left untouched.
    """

    name = "flow"

    def __init__(self, transforms: int = 4, hidden: Sequence[int] = (128, 128), codes: str = "mean",
                 max_epochs: int = 100, patience: int = 10, batch_size: int = 512, lr: float = 1e-3,
                 val_fraction: float = 0.1, seed: int = 0):
        super().__init__()
        if codes not in ("sample", "mean"):
            raise ValueError(f"codes must be 'sample' or 'mean', got {codes!r}")
        if transforms < 1 or not hidden or min(hidden) < 1:
            raise ValueError(f"need transforms >= 1 and positive hidden widths, got {transforms}, {hidden}")
        if max_epochs < 1 or patience < 1 or batch_size < 1 or not lr > 0 or not 0 < val_fraction < 1:
            raise ValueError("need max_epochs >= 1, patience >= 1, batch_size >= 1, lr > 0, 0 < val_fraction < 1")
        self.transforms, self.hidden, self.codes = int(transforms), [int(h) for h in hidden], codes
        self.max_epochs, self.patience, self.batch_size = int(max_epochs), int(patience), int(batch_size)
        self.lr, self.val_fraction, self.seed = float(lr), float(val_fraction), int(seed)
        self.flow = None
        self.shift: Tensor | None = None  # (q,) code mean
        self.scale: Tensor | None = None  # (q,) code standard deviation

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["hidden"] = list(cfg["hidden"])
        return cfg

    def _build(self, latent_dim: int):
        from arelbo.models.priors import build_maf

        self.flow = build_maf(latent_dim, self.transforms, self.hidden, identity=True)

    def _fit(self, model, loader, max_examples, progress) -> None:
        from arelbo.metrics.collapse import encode_dataset

        mu, logvar = encode_dataset(model, loader, max_examples, progress and "flow: encoding")
        val = None
        if self.val_loader is not None:
            val = encode_dataset(model, self.val_loader, None, progress and "flow: encoding held-out data")
        self.fit_codes(mu, logvar, progress=progress, val=val)

    def fit_codes(self, mu: Tensor, logvar: Tensor | None = None, progress: bool | str = False,
                  val: tuple[Tensor, Tensor | None] | None = None) -> "FlowSampler":
        """Fit to codes (N, q) directly (``logvar`` needed for codes='sample'); ``val``: held-out (mu, logvar)
        for early stopping (default: a ``val_fraction`` of these codes)."""
        import copy

        mu = mu.detach().float().cpu()
        if mu.dim() != 2 or mu.shape[0] < 2:
            raise ValueError(f"need (N, q) codes with N >= 2, got {tuple(mu.shape)}")
        std = None
        if self.codes == "sample":
            if logvar is None:
                raise ValueError("codes='sample' needs the posterior log-variances")
            std = (0.5 * logvar.detach().float().cpu()).exp()
        n, q = mu.shape
        self.latent_dim = q
        self.shift = mu.mean(0)
        self.scale = mu.std(0).clamp_min(1e-6)
        gen = torch.Generator().manual_seed(self.seed)

        def codes(idx, m=mu, s=std):
            u = m[idx] if s is None else m[idx] + s[idx] * torch.randn(len(idx), q, generator=gen)
            return (u - self.shift) / self.scale

        if val is None:
            perm = torch.randperm(n, generator=gen)
            n_val = min(n - 1, max(1, round(self.val_fraction * n)))
            val_idx, train_idx = perm[:n_val], perm[n_val:]
            val_codes = codes(val_idx)  # drawn once: the same held-out set every epoch
            held_out = f"{self.val_fraction:g} of the training codes"
        else:
            val_mu = val[0].detach().float().cpu()
            val_std = None if std is None else (0.5 * val[1].detach().float().cpu()).exp()
            n_val, train_idx = val_mu.shape[0], torch.arange(n)
            val_codes = codes(torch.arange(n_val), val_mu, val_std)
            held_out = "held-out codes"
        best, best_epoch, best_state, history = float("inf"), -1, None, []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._build(q)
        opt = torch.optim.Adam(self.flow.parameters(), lr=self.lr)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_epochs, desc="flow: training", leave=False)
        epoch = 0
        with torch.enable_grad():
            for epoch in range(self.max_epochs):
                self.flow.train()
                order = train_idx[torch.randperm(len(train_idx), generator=gen)]
                for start in range(0, len(order), self.batch_size):
                    loss = -self.flow().log_prob(codes(order[start : start + self.batch_size])).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                self.flow.eval()
                with torch.no_grad():
                    val_nll = float(-self.flow().log_prob(val_codes).mean())
                history.append(val_nll)
                if bar is not None:
                    bar.update(1)
                if val_nll < best:
                    best, best_epoch, best_state = val_nll, epoch, copy.deepcopy(self.flow.state_dict())
                elif epoch - best_epoch >= self.patience:
                    break
        if bar is not None:
            bar.close()
        if best_state is not None:
            self.flow.load_state_dict(best_state)
        self.flow.eval()
        # held-out NLL of the codes on their own scale: the standardisation's log-Jacobian added back
        log_scale = float(self.scale.log().sum())
        self.fit_info = {"num_codes": int(len(train_idx)), "num_held_out": int(n_val), "held_out": held_out,
                         "epochs": epoch + 1, "best_epoch": best_epoch + 1,
                         "held_out_nll": best + log_scale if best_state is not None else None,
                         "stopped_early": epoch + 1 < self.max_epochs}
        return self

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        self._check_fitted()
        u = _standard_normal(n, self.latent_dim, generator)
        with torch.inference_mode():
            z = self.flow().transform.inv(u)
        return (z * self.scale + self.shift).float()

    def log_prob(self, z: Tensor) -> Tensor:
        """(N,) log density of the fitted flow at codes z (N, q), on the codes' own scale."""
        self._check_fitted()
        with torch.no_grad():
            return self.flow().log_prob((z.float() - self.shift) / self.scale) - self.scale.log().sum()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "flow": None if self.flow is None else self.flow.state_dict(),
                "shift": self.shift, "scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("flow") is not None:
            self._build(self.latent_dim)
            self.flow.load_state_dict(state["flow"])
            self.flow.eval()
        self.shift, self.scale = state.get("shift"), state.get("scale")


# --------------------------------------------------------------------------------------------------------------
# Save / load and decoding


def save_sampler(sampler: LatentSampler, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Atomically save {format, name, config, state, extra} (loadable with weights_only=True)."""
    import io

    from arelbo.runs import atomic_write_bytes

    sampler._check_fitted()
    buffer = io.BytesIO()
    torch.save({"format": SAMPLER_FORMAT, "name": sampler.name, "config": sampler.config(),
                "state": sampler.state_dict(), "extra": dict(extra or {})}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_sampler(path: str | os.PathLike) -> tuple[LatentSampler, dict[str, Any]]:
    """(fitted sampler, extra) from :func:`save_sampler`'s file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sampler file at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or overwritten (or more than tensors): never loaded
        raise ValueError(f"sampler file {path} is damaged ({type(err).__name__}) and was not loaded") from None
    if not isinstance(blob, dict) or "name" not in blob or "state" not in blob:
        raise ValueError(f"{path} is not an arelbo sampler file")
    if blob.get("format", 0) > SAMPLER_FORMAT:
        raise ValueError(f"{path} has sampler format {blob['format']}; this arelbo reads up to {SAMPLER_FORMAT}")
    sampler = make_sampler(blob["name"], **blob.get("config", {}))
    sampler.load_state_dict(blob["state"])
    return sampler, blob.get("extra", {})


def to_uint8(x: Tensor) -> Tensor:
    """Float images in [0, 1] (clamped) -> uint8 levels, rounded."""
    return (x.clamp(0, 1) * 255.0).round_().to(torch.uint8)


def decode_samples(
    model,
    sampler: LatentSampler,
    n: int,
    generator: torch.Generator | None = None,
    batch_size: int = 500,
    as_uint8: bool = False,
    progress: bool | str = False,
) -> Tensor:
    """n decoder means f(z) with z from the sampler, in batches under inference mode, on the CPU.

    The generator draws the latent codes in one call, so the images depend only on its seed, not on batch_size.
    ``as_uint8`` quantises to 8-bit levels as each batch is produced (saves memory for large image sets).
    """
    z = sampler.sample(n, generator)
    try:
        ref = next(model.parameters())
        device, dtype = ref.device, ref.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=progress if isinstance(progress, str) else "decoding", unit="ex", leave=False)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            x = model.decode(z[start : start + batch_size].to(device=device, dtype=dtype)).float().cpu()
            out.append(to_uint8(x) if as_uint8 else x)
            if bar is not None:
                bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    return torch.cat(out) if out else torch.empty(0)
