"""The Gaussian-VAE loss and its decoder-variance policies (pure PyTorch).

A Gaussian VAE's negative ELBO per sample, with D observed elements and decoder variance sigma2, is

    -ELBO = sum_d (x_d - f_d(z))^2 / (2 sigma2_d) + 1/2 sum_d log(2 pi sigma2_d) + KL(q(z|x) || N(0, I)).

Everything that distinguishes the methods compared in this project is *how sigma2 is chosen*. That choice is
a :class:`DecoderVariance` policy; adding one is one small class and one ``@register_policy`` line.

AR-ELBO (``"ar"``) sets sigma2 to its batch maximum-likelihood value S / D inside the step. We write its loss
in the equivalent *detached-MLE* form

    loss = mean_b ||x_b - f(z_b)||^2 / (2 sg(sigma2)) + (D/2) log(2 pi sg(sigma2)) + mean_b KL_b

whose gradient equals that of (D/2) log S + KL (envelope theorem) and whose value equals the exact -ELBO at
sigma2 = S / D. That form is the one that survives data parallelism: the sums that make sigma2 are all-reduced
across ranks (detached) and DDP's gradient averaging then gives the single-process full-batch gradient.

Usage in any loop::

    loss_fn = GaussianVAELoss("ar")
    out = loss_fn(x, x_hat, mu, logvar)   # LossOutput: loss, distortion, rate, kl_per_dim, sigma2, neg_elbo, ...
    out.loss.backward()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from arelbo.registry import build, register

__all__ = [
    "LossOutput",
    "DecoderVariance",
    "GaussianVAELoss",
    "POLICIES",
    "register_policy",
    "make_policy",
    "gaussian_kl",
    "neg_elbo_per_sample",
]

LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class LossOutput:
    """What one call of the loss returns. Per-sample tensors have shape (B,)."""

    loss: Tensor  # scalar to minimise (carries gradient)
    distortion: Tensor  # (B,) squared error ||x - x_hat||^2 summed over the D elements
    rate: Tensor  # (B,) KL(q(z|x) || p(z)) in nats
    kl_per_dim: Tensor  # (q,) batch mean of the KL of each latent dimension
    sigma2: Tensor  # the decoder variance used, detached: shape (), (D,) or (B,)
    neg_elbo: Tensor  # scalar: batch mean of -ELBO in nats, all constants included
    bits_per_dim: Tensor  # scalar: neg_elbo / (D ln 2), for the data on the scale it was given
    num_elements: int  # D

    @property
    def sigma2_mean(self) -> Tensor:
        """A scalar summary of sigma2 for logging (the arithmetic mean of its entries)."""
        return self.sigma2.float().mean()

    def scalars(self) -> dict[str, float]:
        """Detached Python floats for loggers (one device sync)."""
        values = torch.stack(
            [
                self.loss.detach().float(),
                self.distortion.detach().float().mean(),
                self.rate.detach().float().mean(),
                self.sigma2_mean,
                self.neg_elbo.detach().float(),
                self.bits_per_dim.detach().float(),
            ]
        ).tolist()
        names = ("loss", "distortion", "rate", "sigma2", "neg_elbo", "bits_per_dim")
        return dict(zip(names, values))


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Elementwise KL(N(mu, exp(logvar)) || N(0, 1)), shape (B, q)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


def neg_elbo_per_sample(sq_err: Tensor, sigma2: Tensor, rate: Tensor) -> Tensor:
    """Exact -ELBO per sample in nats for elementwise squared errors (B, D) and a broadcastable sigma2."""
    num_elements = sq_err.shape[1]
    sigma2 = _as_elementwise(sigma2, sq_err)
    if sigma2.dim() == 0:  # scalar: avoid materialising a (B, D) log
        data = sq_err.sum(1) / (2 * sigma2) + 0.5 * num_elements * (LOG_2PI + torch.log(sigma2))
    else:
        data = (sq_err / (2 * sigma2) + 0.5 * (LOG_2PI + torch.log(sigma2))).sum(1)
    return data + rate


def _as_elementwise(sigma2: Tensor, sq_err: Tensor) -> Tensor:
    """Shape a policy's sigma2 so it broadcasts against (B, D): () stays, (D,) stays, (B,) becomes (B, 1).

    A 1-D sigma2 of length D is always per-element (policies return (B, 1) for per-sample), so a batch whose
    size happens to equal D is not ambiguous.
    """
    if sigma2.dim() == 1 and sigma2.shape[0] != sq_err.shape[1] and sigma2.shape[0] == sq_err.shape[0]:
        return sigma2[:, None]
    return sigma2


def _upcast(t: Tensor) -> Tensor:
    """At least float32 (half/bfloat16 inputs are computed in float32); float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _global_sums(*tensors: Tensor, group=None) -> list[Tensor]:
    """All-reduce (sum) detached statistics across ranks when running under torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return list(tensors)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


# --------------------------------------------------------------------------------------------------------------
# Decoder-variance policies


class DecoderVariance(nn.Module):
    """How the decoder variance sigma2 is chosen. Subclasses implement :meth:`sigma2`.

    ``sigma2(sq_err)`` gets the elementwise squared errors (B, D) (detached unless the policy is learned) and
    returns a variance of shape () (isotropic), (D,) (one per element) or (B, 1) (one per sample). The default
    :meth:`loss` is the batch mean of -ELBO at that sigma2; with a detached maximum-likelihood sigma2 this is the
    AR-ELBO loss in its detached-MLE form.
    """

    name: ClassVar[str] = ""
    kl_weight: float = 1.0

    def __init__(self, floor: float = 1e-6):
        super().__init__()
        if not floor > 0:
            raise ValueError(f"sigma2 floor must be > 0, got {floor}")
        self.floor = float(floor)

    def sigma2(self, sq_err: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, sq_err: Tensor, rate: Tensor, sigma2: Tensor) -> Tensor:
        return neg_elbo_per_sample(sq_err, sigma2, self.kl_weight * rate).mean()

    def optimizer_options(self) -> dict:
        """Optimiser options (e.g. ``{"lr": 1e-2}``) for this policy's own parameters; {}: the trainer's."""
        return {}

    def extra_repr(self) -> str:
        return f"floor={self.floor:g}"


POLICIES: dict[str, type[DecoderVariance]] = {}


def register_policy(cls: type[DecoderVariance]) -> type[DecoderVariance]:
    """Class decorator: make a policy available by its ``name`` in :func:`make_policy` and configs."""
    return register(POLICIES, cls, "policy")


def make_policy(name: str, **kwargs) -> DecoderVariance:
    """Build a registered policy by name; unknown names and arguments are errors that list what is valid."""
    return build(POLICIES, name, kwargs, kind="policy", long_kind="decoder-variance policy", plural="policies")


@register_policy
class Fixed(DecoderVariance):
    """sigma2 given and constant (sigma2 = 1 is the classic VAE). No floor: the user chose the value."""

    name = "fixed"

    def __init__(self, sigma2: float = 1.0, floor: float = 1e-6):
        super().__init__(floor)
        if not (isinstance(sigma2, (int, float)) and math.isfinite(sigma2) and sigma2 > 0):
            raise ValueError(f"fixed sigma2 must be a positive finite number, got {sigma2!r}")
        self.register_buffer("value", torch.tensor(float(sigma2)), persistent=False)
        self.sigma2_value = float(sigma2)  # exact: the float32 buffer would round it for float64 losses

    def sigma2(self, sq_err: Tensor) -> Tensor:
        return torch.full((), self.sigma2_value, dtype=sq_err.dtype, device=sq_err.device)

    def extra_repr(self) -> str:
        return f"sigma2={self.value.item():g}"


@register_policy
class Beta(Fixed):
    """beta-VAE: loss = mean_b(||x_b - x^_b||^2 + beta KL_b) on plain squared error.

    This is the fixed-sigma2 loss at sigma2 = beta / 2 scaled by beta (same optimum, different step scale);
    the reported -ELBO is the exact one at sigma2 = beta / 2.
    """

    name = "beta"

    def __init__(self, beta: float = 1.0, floor: float = 1e-6):
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a positive finite number, got {beta!r}")
        super().__init__(sigma2=beta / 2.0, floor=floor)
        self.beta = float(beta)

    def loss(self, sq_err: Tensor, rate: Tensor, sigma2: Tensor) -> Tensor:
        return (sq_err.sum(1) + self.beta * rate).mean()

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}"


@register_policy
class Learned(DecoderVariance):
    """log sigma2 an ``nn.Parameter`` trained by gradient with the rest (Dai & Wipf's gamma; sigma-VAE).

    Put the loss's parameters in the optimiser: ``Adam([*model.parameters(), *loss_fn.parameters()])``; a trainer
    should give them the options of :meth:`optimizer_options` (their own learning rate).

    Two options make it a fair baseline against AR-ELBO, whose sigma2 sits at the batch MLE from the first step:
    with Adam, log sigma2 moves by about ``lr`` per step, so from 1 at lr 1e-3 it needs thousands of steps to
    reach MLE-sized values; ``log_sigma2_lr`` gives it its own learning rate, and ``init_mle`` sets it on the
    first training call to the batch MLE S / D (all-reduced; ``init_sigma2`` is then unused). Whether that
    happened is a buffer in the state_dict, so a resumed run does not re-initialise.
    """

    name = "learned"

    def __init__(self, init_sigma2: float = 1.0, floor: float = 1e-6, init_mle: bool = False,
                 log_sigma2_lr: float | None = None):
        super().__init__(floor)
        if not init_sigma2 > 0:
            raise ValueError(f"init_sigma2 must be > 0, got {init_sigma2}")
        if log_sigma2_lr is not None and not (math.isfinite(log_sigma2_lr) and log_sigma2_lr > 0):
            raise ValueError(f"log_sigma2_lr must be a positive number or None, got {log_sigma2_lr!r}")
        self.log_sigma2 = nn.Parameter(torch.tensor(math.log(init_sigma2)))
        self.init_mle = bool(init_mle)
        self.log_sigma2_lr = None if log_sigma2_lr is None else float(log_sigma2_lr)
        if self.init_mle:  # only then: state_dicts of plain learned runs keep their keys
            self.register_buffer("initialised", torch.tensor(False))

    def optimizer_options(self) -> dict:
        return {} if self.log_sigma2_lr is None else {"lr": self.log_sigma2_lr}

    def sigma2(self, sq_err: Tensor) -> Tensor:
        if self.init_mle and self.training and not bool(self.initialised):
            total, count = _global_sums(sq_err.detach().sum(), sq_err.new_tensor(float(sq_err.numel())))
            with torch.no_grad():
                self.log_sigma2.copy_((total / count).clamp_min(self.floor).log().to(self.log_sigma2.dtype))
                self.initialised.fill_(True)
        # A floor through a smooth max would bias the optimum; clamp only where it binds.
        return self.log_sigma2.exp().clamp_min(self.floor).to(sq_err.dtype)

    def extra_repr(self) -> str:
        lr = "" if self.log_sigma2_lr is None else f", log_sigma2_lr={self.log_sigma2_lr:g}"
        return f"floor={self.floor:g}, init_mle={self.init_mle}{lr}"


@register_policy
class AR(DecoderVariance):
    """AR-ELBO, isotropic: sigma2 = (batch mean of ||x - x^||^2) / D, detached, all-reduced under DDP."""

    name = "ar"

    def sigma2(self, sq_err: Tensor) -> Tensor:
        total, count = _global_sums(sq_err.detach().sum(), sq_err.new_tensor(float(sq_err.numel())))
        return (total / count).clamp_min(self.floor).to(sq_err.dtype)


@register_policy
class ARDiagonal(DecoderVariance):
    """One sigma2 per observed element, shared across data: sigma2_d = batch mean of (x_d - x^_d)^2."""

    name = "ar-diagonal"

    def sigma2(self, sq_err: Tensor) -> Tensor:
        total, count = _global_sums(sq_err.detach().sum(0), sq_err.new_tensor(float(sq_err.shape[0])))
        return (total / count).clamp_min(self.floor).to(sq_err.dtype)


@register_policy
class ARPerSample(DecoderVariance):
    """One isotropic sigma2 per data point: sigma2(x) = ||x - x^||^2 / D (local to each sample: no all-reduce)."""

    name = "ar-per-sample"

    def sigma2(self, sq_err: Tensor) -> Tensor:
        return sq_err.detach().mean(1, keepdim=True).clamp_min(self.floor)


@register_policy
class AREMA(DecoderVariance):
    """sigma2 from an exponential moving average of the batch MLE (kept in state_dict, so it resumes).

    In training mode each call updates the average with the (all-reduced) batch MLE and uses the updated value;
    the first call initialises it. In eval mode the stored value is used unchanged.
    """

    name = "ar-ema"

    def __init__(self, momentum: float = 0.99, floor: float = 1e-6):
        super().__init__(floor)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("running_sigma2", torch.tensor(1.0))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))

    def sigma2(self, sq_err: Tensor) -> Tensor:
        if self.training:
            total, count = _global_sums(sq_err.detach().sum(), sq_err.new_tensor(float(sq_err.numel())))
            batch = (total / count).to(self.running_sigma2.dtype)
            with torch.no_grad():
                if self.num_updates.item() == 0:
                    self.running_sigma2.copy_(batch)
                else:
                    self.running_sigma2.mul_(self.momentum).add_((1 - self.momentum) * batch)
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
        floor_t = self.current_floor()
        if self.training:
            self.num_steps.add_(1)
        total, count = _global_sums(sq_err.detach().sum(), sq_err.new_tensor(float(sq_err.numel())))
        return (total / count).clamp_min(floor_t).to(sq_err.dtype)

    def extra_repr(self) -> str:
        return f"anneal_steps={self.anneal_steps}, anneal_from={self.anneal_from:g}, floor={self.floor:g}"


# --------------------------------------------------------------------------------------------------------------
# The loss


class GaussianVAELoss(nn.Module):
    """Negative ELBO of a Gaussian VAE with a pluggable decoder-variance policy.

    Args:
        policy: a registered name (``"ar"`` default, ``"fixed"``, ``"beta"``, ``"learned"``, ``"ar-diagonal"``,
            ``"ar-per-sample"``, ``"ar-ema"``, ``"ar-annealed"``) or a :class:`DecoderVariance` instance.
        sigma2_floor: numerical floor on sigma2 (near-perfect reconstruction would send log sigma2 to -inf).
        check_finite: raise on NaN/inf in the inputs (costs one device sync per call; turn off in hot loops
            that already guard the loss).
        **policy_kwargs: the policy's own arguments, e.g. ``sigma2=0.1`` for ``"fixed"``.
    """

    def __init__(
        self,
        policy: str | DecoderVariance = "ar",
        sigma2_floor: float = 1e-6,
        check_finite: bool = True,
        **policy_kwargs,
    ):
        super().__init__()
        if isinstance(policy, DecoderVariance):
            if policy_kwargs:
                raise ValueError("pass policy arguments to the policy's constructor, not with a policy instance")
            self.policy = policy
        else:
            self.policy = make_policy(policy, floor=sigma2_floor, **policy_kwargs)
        self.check_finite = check_finite

    @property
    def policy_name(self) -> str:
        return self.policy.name

    def forward(self, x: Tensor, x_hat: Tensor, mu: Tensor, logvar: Tensor) -> LossOutput:
        """x and x_hat of the same shape (B, ...); mu and logvar of shape (B, q)."""
        if x.shape != x_hat.shape:
            raise ValueError(f"x and reconstruction differ in shape: x {tuple(x.shape)} vs x_hat {tuple(x_hat.shape)}")
        if x.dim() < 2:
            raise ValueError(f"x must be batched (B, ...), got shape {tuple(x.shape)}")
        if self.check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf")
        diff = _upcast(x.flatten(1)) - _upcast(x_hat.flatten(1))
        return self.from_sq_err(diff * diff, mu, logvar)

    def from_sq_err(self, sq_err: Tensor, mu: Tensor, logvar: Tensor) -> LossOutput:
        """The loss from elementwise squared errors (B, D), e.g. an exact expectation E_q (x_d - f_d(z))^2."""
        if sq_err.dim() != 2:
            raise ValueError(f"sq_err must have shape (B, D), got {tuple(sq_err.shape)}")
        if mu.shape != logvar.shape or mu.dim() != 2 or mu.shape[0] != sq_err.shape[0]:
            raise ValueError(
                f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must both be (B, q) with "
                f"B = {sq_err.shape[0]} matching x"
            )
        if self.check_finite and not bool(torch.isfinite(mu).all() & torch.isfinite(logvar).all()):
            raise ValueError("encoder output (mu or logvar) contains NaN or inf")
        kl = gaussian_kl(_upcast(mu), _upcast(logvar))
        rate = kl.sum(1)
        sigma2 = self.policy.sigma2(sq_err)
        loss = self.policy.loss(sq_err, rate, sigma2)
        with torch.no_grad():
            neg_elbo = neg_elbo_per_sample(sq_err.detach(), sigma2.detach(), rate.detach()).mean()
        num_elements = sq_err.shape[1]
        return LossOutput(
            loss=loss,
            distortion=sq_err.sum(1),
            rate=rate,
            kl_per_dim=kl.mean(0),
            sigma2=sigma2.detach().squeeze(-1) if sigma2.dim() == 2 else sigma2.detach(),
            neg_elbo=neg_elbo,
            bits_per_dim=neg_elbo / (num_elements * math.log(2.0)),
            num_elements=num_elements,
        )

    def extra_repr(self) -> str:
        return f"policy={self.policy.name!r}"

