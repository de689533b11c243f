"""``two-stage``: Dai & Wipf's second VAE on the first stage's latent codes."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from arelbo.models.outputs import generator_noise
from arelbo.samplers.base import LatentSampler, register_sampler, standard_normal

__all__ = ["TwoStageSampler"]


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
        mu, logvar = self.encode(model, loader, max_examples, progress and "two-stage: encoding")
        val = None
        if self.patience is not None and self.val_loader is not None:
            val = self.encode(model, self.val_loader, None, progress and "two-stage: encoding held-out data")
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
            # fused: one kernel for every parameter's update (the per-tensor loop was a quarter of a CPU step)
            opt = torch.optim.Adam(params, lr=self.lr, fused=True)
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
                    loss = self.loss_fn(u, self.vae(u))
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
                out = self.vae(u, noise=generator_noise(gen))
                acc.update_output((u - out.x_hat).pow(2), out)
        value = self.loss_fn.policy.density_sigma2(acc).value
        return value.float().reshape(-1) if value.dim() else value.float()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        self._check_fitted()
        u = standard_normal(n, self.latent_dim, generator)
        with torch.inference_mode():
            z = self.vae.decode(u).float()
            if self.noise:
                z = z + self.sigma2.sqrt() * standard_normal(n, self.latent_dim, generator)
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
            out = loss_fn(self.codes, vae(self.codes, noise=lambda like: self.eps))
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


