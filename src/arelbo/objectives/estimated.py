"""AR-ELBO and its variants: sigma2 set to its maximum-likelihood value from the data (all-reduced under DDP)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from arelbo.objectives.base import DecoderVariance, HeldOutSigma2, check_number, reduces, register_policy

__all__ = ["AR", "ARDiagonal", "ARPerSample", "AREMA", "ARAnnealed"]


@register_policy
class AR(DecoderVariance):
    """AR-ELBO, isotropic: sigma2 = (batch mean of ||x - x^||^2) / D, detached, all-reduced under DDP."""

    name = "ar"
    label = "AR-ELBO"

    def sigma2(self, sq_err: Tensor) -> Tensor:
        total, count = self._sums(sq_err.detach().sum(), sq_err.new_tensor(float(sq_err.numel())))
        return (total / count).clamp_min(self.floor).to(sq_err.dtype)

    def mle_sigma2(self, sq_err: Tensor) -> Tensor:
        return sq_err.mean()


@register_policy
class ARDiagonal(DecoderVariance):
    """One sigma2 per observed element, shared across data: sigma2_d = batch mean of (x_d - x^_d)^2."""

    name = "ar-diagonal"
    label = "AR-ELBO diagonal"
    min_batch = 2

    def sigma2(self, sq_err: Tensor) -> Tensor:
        if sq_err.shape[0] < 2 and not reduces(self.process_group, self.all_reduce):
            raise ValueError(
                f"ar-diagonal needs at least 2 samples per batch, got {sq_err.shape[0]}: with one sample each "
                "sigma2_d is that sample's own squared error and the -ELBO is degenerate; use a larger batch, "
                "or the ar / ar-per-sample policy"
            )
        total, count = self._sums(sq_err.detach().sum(0), sq_err.new_tensor(float(sq_err.shape[0])))
        return (total / count).clamp_min(self.floor).to(sq_err.dtype)

    def mle_sigma2(self, sq_err: Tensor) -> Tensor:
        return sq_err.mean(0)

    def held_out_sigma2(self, stats) -> HeldOutSigma2:
        if stats is None:
            return super().held_out_sigma2(stats)
        return HeldOutSigma2(stats.ar_sigma2(diagonal=True).clamp_min(self.floor), "diagonal",
                             f"eval-set MLE, diagonal ({self.name})")


@register_policy
class ARPerSample(DecoderVariance):
    """One isotropic sigma2 per data point: sigma2(x) = ||x - x^||^2 / D (local to each sample: no all-reduce).

    A per-example sigma2 defines no single density p(x): likelihood estimates use the isotropic MLE instead."""

    name = "ar-per-sample"
    label = "AR-ELBO per-sample"
    is_density = False

    def sigma2(self, sq_err: Tensor) -> Tensor:
        return sq_err.detach().mean(1, keepdim=True).clamp_min(self.floor)

    def mle_sigma2(self, sq_err: Tensor) -> Tensor:
        return sq_err.mean(1, keepdim=True)

    def held_out_sigma2(self, stats) -> HeldOutSigma2:
        if stats is None:
            return super().held_out_sigma2(stats)
        if self.floor != stats.per_sample_floor:
            raise ValueError(f"per-sample floor {self.floor} differs from the accumulator's {stats.per_sample_floor}")
        return HeldOutSigma2(None, "per-sample", f"eval-set MLE per example ({self.name})")


@register_policy
class AREMA(DecoderVariance):
    """sigma2 from an exponential moving average of the batch MLE (kept in state_dict, so it resumes).

    In training mode each call updates the average with the (all-reduced) batch MLE and uses the updated value;
    the first call initialises it. In eval mode the stored value is used unchanged. On a held-out split its
    -ELBO uses the split's isotropic MLE, like ``ar``.
    """

    name = "ar-ema"
    label = "AR-ELBO EMA"
    stationary = False

    def __init__(self, momentum: float = 0.99, floor: float = 1e-6):
        super().__init__(floor)
        self.momentum = check_number("momentum", momentum, lo=0.0, lo_inclusive=True, hi=1.0)
        self.register_buffer("running_sigma2", torch.tensor(1.0))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))

    def sigma2(self, sq_err: Tensor) -> Tensor:
        if self.training:
            total, count = self._sums(sq_err.detach().sum(), sq_err.new_tensor(float(sq_err.numel())))
            batch = (total / count).to(self.running_sigma2.dtype)
            with torch.no_grad():  # torch.where, not a Python branch on the count: no host sync per step
                updated = self.running_sigma2 * self.momentum + (1 - self.momentum) * batch
                self.running_sigma2.copy_(torch.where(self.num_updates == 0, batch, updated))
                self.num_updates.add_(1)
        return self.running_sigma2.clamp_min(self.floor).to(sq_err.dtype)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum:g}, floor={self.floor:g}"


@register_policy
class ARAnnealed(DecoderVariance):
    """AR-ELBO with a floor on sigma2 that decays from ``anneal_from`` to ``floor`` over ``anneal_steps`` steps.

    sigma2 = max(batch MLE, floor_t) with log floor_t = log anneal_from + min(t / anneal_steps, 1) (log floor -
    log anneal_from): log-linear, so every decade takes the same number of steps. Early on the floor binds and the
    loss is the fixed-sigma2 VAE at floor_t (a slow descent like a learned sigma2 from 1); once the MLE is above
    the floor it is AR-ELBO. t counts training calls; it is a buffer in the state_dict, so a run resumes exactly.
    In eval mode t does not advance.
    """

    name = "ar-annealed"
    label = "AR-ELBO annealed"
    stationary = False

    def __init__(self, anneal_steps: int = 10000, anneal_from: float = 1.0, floor: float = 1e-6):
        super().__init__(floor)
        if isinstance(anneal_steps, bool) or not isinstance(anneal_steps, int) or anneal_steps < 1:
            raise ValueError(f"anneal_steps must be an integer >= 1, got {anneal_steps!r}")
        if not (math.isfinite(anneal_from) and anneal_from >= self.floor):
            raise ValueError(f"anneal_from must be >= the floor {self.floor:g}, got {anneal_from!r}")
        self.anneal_steps, self.anneal_from = int(anneal_steps), float(anneal_from)
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.long))

    def current_floor(self, step: int | None = None) -> float:
        """floor_t at step t (default: the current step count)."""
        t = int(self.num_steps) if step is None else int(step)
        frac = min(max(t, 0) / self.anneal_steps, 1.0)
        return math.exp(math.log(self.anneal_from) + frac * (math.log(self.floor) - math.log(self.anneal_from)))

    def sigma2(self, sq_err: Tensor) -> Tensor:
        # floor_t computed on the device from the step buffer (float64): reading the count would sync every step
        frac = (self.num_steps.double() / self.anneal_steps).clamp(0.0, 1.0)
        log_from = math.log(self.anneal_from)
        floor_t = torch.exp(log_from + frac * (math.log(self.floor) - log_from))
        if self.training:
            self.num_steps.add_(1)
        total, count = self._sums(sq_err.detach().sum(), sq_err.new_tensor(float(sq_err.numel())))
        return (total / count).clamp_min(floor_t).to(sq_err.dtype)

    def extra_repr(self) -> str:
        return f"anneal_steps={self.anneal_steps}, anneal_from={self.anneal_from:g}, floor={self.floor:g}"

