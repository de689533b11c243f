"""The loss: negative ELBO of a Gaussian VAE with a pluggable decoder-variance policy."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from arelbo.models.outputs import ModelOutput
from arelbo.objectives.base import (
    DecoderVariance,
    LossOutput,
    NonFiniteError,
    check_float,
    gaussian_kl,
    make_policy,
    neg_elbo_per_sample,
    upcast,
)

__all__ = ["GaussianVAELoss"]


class GaussianVAELoss(nn.Module):
    """Negative ELBO of a Gaussian VAE with a pluggable decoder-variance policy.

    Args:
        policy: a registered name (``"ar"`` default, ``"fixed"``, ``"beta"``, ``"learned"``, ``"ar-diagonal"``,
            ``"ar-per-sample"``, ``"ar-ema"``, ``"ar-annealed"``, ``"ar-conditional"``, ``"learned-conditional"``)
            or a :class:`DecoderVariance` instance. The conditional ones read the decoder's log-variance
            (``ModelOutput.x_logvar``); call :meth:`attach` with the model before training.
        sigma2_floor: numerical floor on sigma2 (near-perfect reconstruction would send log sigma2 to -inf).
        check_finite: what to do when the loss comes out NaN or inf (a NaN/inf anywhere in x, x_hat, mu or
            logvar makes it so). ``"auto"`` (default): raise :class:`NonFiniteError`, naming the input at fault,
            at once for CPU tensors (no sync needed); on an accelerator, where reading a device value stalls the
            step, the check is deferred to the first host read of the output (``out.scalars()`` or
            ``out.check_finite()``). ``True``: always check at once (one device sync per call on accelerators).
            ``False``: never check (loops that already guard the loss).
        process_group: the ranks whose statistics the ``ar*`` policies all-reduce (None: the default group).
        all_reduce: False keeps sigma2 local to this process even under torch.distributed: needed when only some
            ranks call the loss (rank-0 validation), which otherwise waits for the others for ever.
        **policy_kwargs: the policy's own arguments, e.g. ``sigma2=0.1`` for ``"fixed"``.

    Inputs must be floating point (uint8 pixels: divide by 255 first) with a batch of at least one sample.
    """

    def __init__(
        self,
        policy: str | DecoderVariance = "ar",
        sigma2_floor: float = 1e-6,
        check_finite: bool | str = "auto",
        process_group=None,
        all_reduce: bool = True,
        **policy_kwargs,
    ):
        super().__init__()
        if isinstance(policy, DecoderVariance):
            if policy_kwargs:
                raise ValueError("pass policy arguments to the policy's constructor, not with a policy instance")
            self.policy = policy
        else:
            self.policy = make_policy(policy, floor=sigma2_floor, **policy_kwargs)
        if not (isinstance(check_finite, bool) or check_finite == "auto"):
            raise ValueError(f"check_finite must be 'auto', True or False, got {check_finite!r}")
        self.check_finite = check_finite
        self.kl_weight = 1.0  # the rate's weight in the loss (a trainer's KL warm-up sets it; 1: the ELBO)
        self.process_group = process_group
        self.all_reduce = all_reduce

    @property
    def process_group(self):
        return self.policy.process_group

    @process_group.setter
    def process_group(self, group) -> None:
        self.policy.process_group = group

    @property
    def all_reduce(self) -> bool:
        return self.policy.all_reduce

    @all_reduce.setter
    def all_reduce(self, enabled: bool) -> None:
        self.policy.all_reduce = bool(enabled)

    @property
    def policy_name(self) -> str:
        return self.policy.name

    def attach(self, model) -> "GaussianVAELoss":
        """Bind the policy to the model it trains, once before training (the conditional policies set up the
        decoder's variance head: its initial value, whether its gradient reaches the shared features)."""
        self.policy.attach(model)
        return self

    def forward(self, x: Tensor, x_hat: Tensor | ModelOutput, mu: Tensor | None = None, logvar: Tensor | None = None,
                rate: Tensor | None = None, x_logvar: Tensor | None = None) -> LossOutput:
        """The loss of a batch x (B, ...), floating point.

        ``loss_fn(x, model(x))``: ``x_hat`` is a model's :class:`~arelbo.models.ModelOutput`; its decoder mean,
        rate (summed over its latent groups; closed form or Monte-Carlo) and KL per unit are used by name.

        ``loss_fn(x, x_hat, mu, logvar)``: any encoder/decoder pair: ``x_hat`` the decoder mean (x's shape),
        ``mu`` and ``logvar`` (B, q); ``rate`` a precomputed (B,) KL(q(z|x) || p(z)) for a prior other than
        N(0, I) (e.g. a Monte-Carlo estimate); None (default): the closed-form KL to N(0, I); ``x_logvar`` the
        decoder's log-variance per element (x's shape) for the conditional policies.
        """
        if isinstance(x_hat, ModelOutput):
            if mu is not None or logvar is not None or rate is not None or x_logvar is not None:
                raise ValueError("with a model's output, pass no mu, logvar, rate or x_logvar: the output carries them")
            return self._from_output(x, x_hat)
        if mu is None or logvar is None:
            raise ValueError("give the posterior's mu and logvar with a decoder mean, or pass the model's output: "
                             "loss_fn(x, model(x))")
        self._check_pair(x, x_hat)
        diff = upcast(x.flatten(1)) - upcast(x_hat.flatten(1))
        out = self._compute(diff * diff, *self._rate(diff.shape[0], mu, logvar, rate), x_logvar=x_logvar)
        given = {**({} if rate is None else {"rate": rate}), **({} if x_logvar is None else {"x_logvar": x_logvar})}
        return self._checked(out, x=x, x_hat=x_hat, mu=mu, logvar=logvar, **given)

    def from_sq_err(self, sq_err: Tensor, mu: Tensor, logvar: Tensor, rate: Tensor | None = None) -> LossOutput:
        """The loss from elementwise squared errors (B, D), e.g. an exact expectation E_q (x_d - f_d(z))^2;
        ``rate`` as in :meth:`forward`."""
        self._check_sq_err(sq_err)
        out = self._compute(sq_err, *self._rate(sq_err.shape[0], mu, logvar, rate))
        given = {} if rate is None else {"rate": rate}
        return self._checked(out, sq_err=sq_err, mu=mu, logvar=logvar, **given)

    def _from_output(self, x: Tensor, output: ModelOutput) -> LossOutput:
        self._check_pair(x, output.x_hat)
        diff = upcast(x.flatten(1)) - upcast(output.x_hat.flatten(1))
        rate = output.rate
        if rate.shape != (diff.shape[0],):
            raise ValueError(f"the model's rate must have shape (B,) = ({diff.shape[0]},), got {tuple(rate.shape)}")
        check_float(rate=rate)
        kl = output.kl_per_unit()
        if kl is None:  # a Monte-Carlo rate somewhere: no KL per unit
            units = sum(g.num_units for g in output.groups)
            kl_per_dim = torch.full((units,), float("nan"), dtype=upcast(rate).dtype, device=rate.device)
        else:
            kl_per_dim = kl.mean(0)
        out = self._compute(diff * diff, upcast(rate), kl_per_dim, x_logvar=output.x_logvar)
        given = {} if output.x_logvar is None else {"x_logvar": output.x_logvar}
        return self._checked(out, x=x, x_hat=output.x_hat, rate=rate, **given,
                             **{f"{g.name}.mu": g.mu for g in output.groups},
                             **{f"{g.name}.logvar": g.logvar for g in output.groups})

    @staticmethod
    def _check_pair(x: Tensor, x_hat: Tensor) -> None:
        if x.shape != x_hat.shape:
            raise ValueError(f"x and reconstruction differ in shape: x {tuple(x.shape)} vs x_hat {tuple(x_hat.shape)}")
        if x.dim() < 2:
            raise ValueError(f"x must be batched (B, ...), got shape {tuple(x.shape)}")
        check_float(x=x, x_hat=x_hat)

    @staticmethod
    def _check_sq_err(sq_err: Tensor) -> None:
        if sq_err.dim() != 2:
            raise ValueError(f"sq_err must have shape (B, D), got {tuple(sq_err.shape)}")

    @staticmethod
    def _rate(batch: int, mu: Tensor, logvar: Tensor, rate: Tensor | None) -> tuple[Tensor, Tensor]:
        """(rate (B,), KL per dimension (q,)) from a flat posterior: closed form, or the given rate (no split)."""
        if batch > 0 and (mu.shape != logvar.shape or mu.dim() != 2 or mu.shape[0] != batch):
            raise ValueError(
                f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must both be (B, q) with B = {batch} matching x"
            )
        check_float(mu=mu, logvar=logvar)
        if rate is None:
            kl = gaussian_kl(upcast(mu), upcast(logvar))
            return kl.sum(1), kl.mean(0)
        if rate.shape != (batch,):
            raise ValueError(f"rate must have shape (B,) = ({batch},), got {tuple(rate.shape)}")
        check_float(rate=rate)
        rate = upcast(rate)
        return rate, torch.full((mu.shape[1],), float("nan"), dtype=rate.dtype, device=rate.device)

    def _compute(self, sq_err: Tensor, rate: Tensor, kl_per_dim: Tensor, x_logvar: Tensor | None = None) -> LossOutput:
        self._check_sq_err(sq_err)
        if sq_err.shape[0] == 0:
            raise ValueError("empty batch (B = 0): the loss is a mean over the batch and needs at least one sample")
        check_float(sq_err=sq_err)
        if self.policy.needs_x_logvar:  # sigma2(z): the decoder's own output
            if x_logvar is None:
                raise ValueError(f"policy {self.policy.name!r} needs the decoder's log-variance, and the model gives "
                                 "none: set model.variance_head: true (conv, mlp or hvae)")
            check_float(x_logvar=x_logvar)
            sigma2 = self.policy.sigma2(sq_err, upcast(x_logvar))
        else:
            sigma2 = self.policy.sigma2(sq_err)
        # a KL warm-up weighs the rate in the loss only; the reported -ELBO is always the full one
        loss = self.policy.loss(sq_err, rate if self.kl_weight == 1.0 else rate * self.kl_weight, sigma2)
        with torch.no_grad():
            neg_elbo = neg_elbo_per_sample(sq_err.detach(), sigma2.detach(), rate.detach()).mean()
        num_elements = sq_err.shape[1]
        return LossOutput(
            loss=loss,
            distortion=sq_err.sum(1),
            rate=rate,
            kl_per_dim=kl_per_dim,
            sigma2=sigma2.detach().squeeze(-1) if sigma2.dim() == 2 else sigma2.detach(),
            neg_elbo=neg_elbo,
            bits_per_dim=neg_elbo / (num_elements * math.log(2.0)),
            num_elements=num_elements,
        )

    def _checked(self, out: LossOutput, **inputs: Tensor) -> LossOutput:
        """Check the loss scalar (NaN/inf in any input reaches it): one cheap test instead of one per input."""
        mode = self.check_finite
        if mode is False:
            return out
        finite = torch.isfinite(out.loss.detach())
        if mode == "auto" and finite.device.type != "cpu":  # reading it now would stall the device: defer
            return dataclasses.replace(out, pending_check=finite)
        if not bool(finite):
            for name, t in inputs.items():
                if not bool(torch.isfinite(t).all()):
                    what = ("encoder output (mu or logvar)" if name.split(".")[-1] in ("mu", "logvar")
                            else name)
                    raise NonFiniteError(f"{what} contains NaN or inf ({name} {tuple(t.shape)}): the loss would be NaN")
            raise NonFiniteError(
                f"the {self.policy.name!r} loss is {out.loss.item()} with finite inputs: sigma2 or the squared "
                "error overflowed (rescale the data to about [0, 1])"
            )
        return out

    def extra_repr(self) -> str:
        return f"policy={self.policy.name!r}"


