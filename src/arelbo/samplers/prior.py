"""``prior``: z ~ p(z), the model's own generative model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from arelbo.samplers.base import LatentSampler, register_sampler, standard_normal

__all__ = ["PriorSampler"]


@register_sampler
class PriorSampler(LatentSampler):
    """z ~ p(z), the model's own prior: N(0, I) (nothing to fit), or a standalone copy of its learnable prior. With
    a hierarchical model this is its own top-down generative pass: the top group from its prior, every group below
    from p(z_l | z_<l) as the codes are decoded.

    ``temperature`` t scales the prior's standard deviation, of every group (t = 1: the model itself); other than 1
    it needs the standard prior N(0, I) on the (top) code."""

    name = "prior"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.prior = None  # None: N(0, I); else a arelbo.models.priors.Prior that needs no encoder

    def _fit(self, model, loader, max_examples, progress) -> None:
        prior = getattr(model, "prior", None)
        self.prior = None if prior is None or prior.closed_form_kl else prior.standalone(model.encoder).cpu()
        if self.prior is not None:
            if self.temperature != 1.0:
                raise ValueError(f"prior sampler: temperature {self.temperature:g} needs the standard prior N(0, I) on "
                                 f"the code; this model's is the learnable {prior.name!r} prior (use temperature 1)")
            self.fit_info = {"prior": prior.name}

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        self._check_fitted()
        if self.prior is None:
            z = standard_normal(n, self.latent_dim, generator)
            return z if self.temperature == 1.0 else z * self.temperature
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


