"""The learned sigma2: log sigma2 a parameter trained by gradient (Dai & Wipf's gamma, sigma-VAE)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from arelbo.objectives.base import DecoderVariance, HeldOutSigma2, check_number, register_policy

__all__ = ["Learned"]


class _FloorUp(torch.autograd.Function):
    """max(s, floor) whose gradient below the floor still flows when it points upwards (descent raises s).

    The value is the clamp's; above the floor the gradient is the identity's. Below it, a gradient that would
    raise s passes unchanged and one that would lower it further is dropped, so the parameter neither sticks at
    the floor (clamp_min's zero gradient) nor drifts away below it.
    """

    @staticmethod
    def forward(ctx, s: Tensor, floor: float) -> Tensor:
        below = s < floor
        ctx.save_for_backward(below)
        return torch.where(below, torch.full_like(s, floor), s)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (below,) = ctx.saved_tensors
        return torch.where(below & (grad > 0), torch.zeros_like(grad), grad), None


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
    label = "learned σ²"
    sigma2_kind = "learned"

    def __init__(self, init_sigma2: float = 1.0, floor: float = 1e-6, init_mle: bool = False,
                 log_sigma2_lr: float | None = None):
        super().__init__(floor)
        init_sigma2 = check_number("initial sigma2", init_sigma2)
        if log_sigma2_lr is not None:
            log_sigma2_lr = check_number("log_sigma2_lr: the log sigma2 learning rate", log_sigma2_lr)
        self.log_sigma2 = nn.Parameter(torch.tensor(math.log(init_sigma2)))
        self.init_mle = bool(init_mle)
        self.log_sigma2_lr = None if log_sigma2_lr is None else float(log_sigma2_lr)
        if self.init_mle:  # only then: state_dicts of plain learned runs keep their keys
            self.register_buffer("initialised", torch.tensor(False))
            # A Python copy of the flag, so that steps after the first read no tensor (no host sync); None: not
            # known yet (read the buffer once), as after construction or after a state_dict is loaded.
            self._initialised_known: bool | None = None
            self.register_load_state_dict_post_hook(_forget_initialised)

    def optimizer_options(self) -> dict:
        return {} if self.log_sigma2_lr is None else {"lr": self.log_sigma2_lr}

    def sigma2(self, sq_err: Tensor) -> Tensor:
        if self.init_mle and self.training and not self._is_initialised():
            total, count = self._sums(sq_err.detach().sum(), sq_err.new_tensor(float(sq_err.numel())))
            with torch.no_grad():
                self.log_sigma2.copy_((total / count).clamp_min(self.floor).log().to(self.log_sigma2.dtype))
                self.initialised.fill_(True)
            self._initialised_known = True
        # A floor through a smooth max would bias the optimum; floor only where it binds, and keep the gradient
        # that lifts sigma2 back above the floor (a plain clamp_min would leave it stuck there for ever).
        return _FloorUp.apply(self.log_sigma2.exp(), self.floor).to(sq_err.dtype)

    def _is_initialised(self) -> bool:
        if self._initialised_known is None:
            self._initialised_known = bool(self.initialised)  # one read after construction or a load
        return self._initialised_known

    def held_out_sigma2(self, stats) -> HeldOutSigma2:
        return self.own_sigma2()

    def extra_repr(self) -> str:
        lr = "" if self.log_sigma2_lr is None else f", log_sigma2_lr={self.log_sigma2_lr:g}"
        return f"floor={self.floor:g}, init_mle={self.init_mle}{lr}"


def _forget_initialised(module: "Learned", incompatible_keys) -> None:
    """After a state_dict is loaded, the buffer decides again whether the MLE initialisation has happened."""
    module._initialised_known = None
