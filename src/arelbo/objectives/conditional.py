"""The conditional variance sigma2(z): the decoder outputs log sigma2 per element (``ModelOutput.x_logvar``).

``ar-conditional`` sets it in AR-ELBO's spirit, by maximum likelihood for the current mean: the head is fitted to
the detached squared residuals r^2 (minimising sum_d [log sigma2_d(z) + r_d^2 / sigma2_d(z)], optimum
sigma2_d(z) = E[r_d^2 | z]) on detached decoder features, and the mean is trained by the ELBO at the detached
sigma2(z), so the head never changes the mean's gradient. ``learned-conditional`` is the usual heteroscedastic
decoder: mean and variance trained jointly by the ELBO's gradient (the variance can shrink on easy elements and
take the mean's gradient with it). Both floor sigma2(z) and need a model built with ``model.variance_head: true``.
"""

from __future__ import annotations


import torch
from torch import Tensor

from arelbo.objectives.base import LOG_2PI, DecoderVariance, HeldOutSigma2, check_number, register_policy
from arelbo.objectives.learned import _FloorUp

__all__ = ["ARConditional", "LearnedConditional"]


def _heads(model) -> list:
    """The model's variance heads; none is an error that says what to set."""
    head = getattr(model, "variance_head", None)
    if head is None:
        raise ValueError("this policy needs a decoder that outputs its log-variance: build the model with "
                         "model.variance_head: true (--set model.variance_head=true; conv, mlp or hvae)")
    return [head]


class _Conditional(DecoderVariance):
    """What both conditional policies share: sigma2(z) from the decoder's log-variance, floored, and the model's
    own sigma2(z) as the held-out rule (a per-element variance of a proper decoder: a density)."""

    needs_x_logvar = True
    detach_head_input = False

    def __init__(self, floor: float = 1e-6, log_sigma2_lr: float | None = None):
        super().__init__(floor)
        if log_sigma2_lr is not None:
            log_sigma2_lr = check_number("log_sigma2_lr: the variance head's learning rate", log_sigma2_lr)
        self.log_sigma2_lr = None if log_sigma2_lr is None else float(log_sigma2_lr)

    def sigma2(self, sq_err: Tensor, x_logvar: Tensor | None = None) -> Tensor:
        """(B, D) sigma2(z) floored (the gradient that lifts it back above the floor kept)."""
        if x_logvar is None:
            raise ValueError(f"policy {self.name!r} needs the decoder's log-variance (ModelOutput.x_logvar): build "
                             "the model with model.variance_head: true and call loss_fn(x, model(x))")
        logvar = x_logvar.flatten(1).to(sq_err.dtype)
        if logvar.shape != sq_err.shape:
            raise ValueError(f"x_logvar has {tuple(logvar.shape)} elements, the squared error {tuple(sq_err.shape)}")
        return _FloorUp.apply(logvar.exp(), self.floor)

    def attach(self, model) -> None:
        for head in _heads(model):
            head.detach_input = self.detach_head_input

    def head_optimizer_options(self) -> dict:
        return {} if self.log_sigma2_lr is None else {"lr": self.log_sigma2_lr}

    def held_out_sigma2(self, stats) -> HeldOutSigma2:
        return HeldOutSigma2(None, "conditional", f"the model's own sigma2(z) per element ({self.name})")

    def own_sigma2(self) -> HeldOutSigma2:
        return self.held_out_sigma2(None)

    def extra_repr(self) -> str:
        lr = "" if self.log_sigma2_lr is None else f", log_sigma2_lr={self.log_sigma2_lr:g}"
        return f"floor={self.floor:g}{lr}"


@register_policy
class ARConditional(_Conditional):
    """sigma2(z) the maximum-likelihood fit to the current mean's residuals; the mean trained at it, detached.

    The loss's value is the -ELBO at sigma2(z); its gradient is the ELBO's at the detached sigma2(z) for the mean
    and, for the head (on detached features), that of the Gaussian likelihood of the detached residuals."""

    name = "ar-conditional"
    label = "AR-ELBO conditional"
    detach_head_input = True

    def loss(self, sq_err: Tensor, rate: Tensor, sigma2: Tensor) -> Tensor:
        s = sigma2.detach()
        elbo = ((sq_err / (2 * s) + 0.5 * (LOG_2PI + torch.log(s))).sum(1) + rate).mean()
        head = (sq_err.detach() / (2 * sigma2) + 0.5 * torch.log(sigma2)).sum(1).mean()
        return elbo + (head - head.detach())  # the head's fit adds gradient, not value


@register_policy
class LearnedConditional(_Conditional):
    """The heteroscedastic Gaussian decoder: sigma2(z) and the mean trained jointly by the ELBO's gradient.

    ``init_sigma2``: sigma2(z) at the start (the head's bias; weight 0), set by :meth:`attach`;
    ``log_sigma2_lr``: the head's own learning rate (as ``learned``'s)."""

    name = "learned-conditional"
    label = "learned σ²(z)"
    sigma2_kind = "learned"

    def __init__(self, init_sigma2: float = 1.0, floor: float = 1e-6, log_sigma2_lr: float | None = None):
        super().__init__(floor, log_sigma2_lr)
        self.init_sigma2 = check_number("initial sigma2", init_sigma2)

    def attach(self, model) -> None:
        super().attach(model)
        for head in _heads(model):
            head.set_initial(max(self.init_sigma2, self.floor))

    def extra_repr(self) -> str:
        return f"init_sigma2={self.init_sigma2:g}, " + super().extra_repr()


