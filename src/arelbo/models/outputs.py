"""The model's output is the contract: what a forward pass hands to the loss, the trainer and the evaluation, by name.

A model's ``forward(x, sample=True, noise=None)`` returns a :class:`ModelOutput`: the decoder mean, the rate per
example (the model's business: closed-form KL or a Monte-Carlo estimate under a learnable prior, summed over
latent groups), one :class:`LatentGroup` per group of latent variables (a flat VAE has one, a hierarchical VAE one
per level) with what the diagnostics read, and, for decoders that predict it, a log-variance per element. Nothing
downstream unpacks a positional tuple or assumes one latent vector.

``noise``: where the reparameterisation noise comes from, a callable ``noise(like) -> Tensor`` returning standard
normals of ``like``'s shape, dtype and device (default ``torch.randn_like``). The trainer passes one that draws
the global batch's noise and keeps this process's slice (so N data-parallel processes draw what one would), the
evaluation one driven by a seeded generator.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = ["Posterior", "LatentGroup", "ModelOutput", "Noise", "gaussian_kl", "gaussian_kl_between", "upcast",
           "generator_noise", "SplitNoise"]

LOG_2PI = math.log(2.0 * math.pi)

Noise = Callable[[Tensor], Tensor]


def upcast(t: Tensor) -> Tensor:
    """At least float32 (half/bfloat16 values are computed in float32); float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """Elementwise KL(N(mu, exp(logvar)) || N(0, 1)), the shape of ``mu``."""
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0)


def gaussian_kl_between(mu: Tensor, logvar: Tensor, prior_mu: Tensor, prior_logvar: Tensor) -> Tensor:
    """Elementwise KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar)))."""
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) * torch.exp(-prior_logvar) - 1.0)


def generator_noise(generator: torch.Generator | None) -> Noise:
    """Standard normals drawn from ``generator`` (on its device, then moved to the tensor's): reproducible noise."""
    def noise(like: Tensor) -> Tensor:
        gen_device = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=gen_device).to(like.device)

    return noise


class SplitNoise:
    """Standard normals for a whole split, drawn once per latent group from one generator and indexed by example,
    so a pass over the split sees the same noise whatever its batching or number of processes."""

    def __init__(self, generator: torch.Generator, n: int, device):
        self.generator, self.n, self.device = generator, int(n), device
        self.tables: list[Tensor] = []  # one (n, *group shape) table per noise call of a forward pass, in order

    def rows(self, start: int):
        """The noise callable of the batch starting at example ``start``."""
        calls = itertools.count()

        def noise(like: Tensor) -> Tensor:
            k = next(calls)
            if k == len(self.tables):
                self.tables.append(torch.randn((self.n, *like.shape[1:]), generator=self.generator).to(self.device))
            return self.tables[k][start : start + like.shape[0]].to(like.dtype)

        return noise


class Posterior(NamedTuple):
    """q(z | x) = N(mu, diag(exp(logvar))) of the code ex-post samplers model (a flat VAE's z, a hierarchy's top
    group), from :meth:`encode`. A named tuple: ``mu, logvar = model.encode(x)`` reads it too."""

    mu: Tensor
    logvar: Tensor


@dataclass(frozen=True)
class LatentGroup:
    """One group of latent units: its posterior, the code the decoder saw, and its share of the rate.

    ``mu``/``logvar``: (B, *shape) posterior mean and log-variance; ``z``: the code the decoder saw (a sample of
    the posterior, or ``mu`` when the pass did not sample); ``rate``: (B,) this group's KL(q || p) in nats;
    ``kl``: (B, *shape) the KL of each unit in closed form, or None when the group's rate is a Monte-Carlo
    estimate (a learnable prior with no closed form); ``prior_mu``/``prior_logvar``: the Gaussian prior of the
    group given the groups above (None: N(0, I), or a non-Gaussian prior when ``kl`` is None).
    """

    name: str
    mu: Tensor
    logvar: Tensor
    z: Tensor
    rate: Tensor
    kl: Tensor | None = None
    prior_mu: Tensor | None = None
    prior_logvar: Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The group's unit shape (without the batch): (q,) for a vector group, (c, h, w) for a spatial one."""
        return tuple(self.mu.shape[1:])

    @property
    def num_units(self) -> int:
        return math.prod(self.shape)

    @property
    def closed_form(self) -> bool:
        return self.kl is not None

    def kl_float64(self) -> Tensor | None:
        """(B, units) the KL of every unit in float64 (for evaluation sums), or None without a closed form."""
        if self.kl is None:
            return None
        mu, logvar = self.mu.double().flatten(1), self.logvar.double().flatten(1)
        if self.prior_mu is None:
            return gaussian_kl(mu, logvar)
        return gaussian_kl_between(mu, logvar, self.prior_mu.double().flatten(1), self.prior_logvar.double().flatten(1))


@dataclass(frozen=True)
class ModelOutput:
    """What a forward pass returns (see the module docstring).

    ``x_hat``: the decoder mean f(z), x's shape; ``rate``: (B,) KL(q(z|x) || p(z)) summed over the groups;
    ``groups``: one :class:`LatentGroup` per group, top (first generated) first; ``x_logvar``: the decoder's
    log sigma^2 per element (x's shape) for decoders that predict a variance, else None.
    """

    x_hat: Tensor
    rate: Tensor
    groups: tuple[LatentGroup, ...]
    x_logvar: Tensor | None = None

    def _single(self) -> LatentGroup:
        if len(self.groups) != 1:
            names = ", ".join(g.name for g in self.groups)
            raise AttributeError(f"this model has {len(self.groups)} latent groups ({names}): read out.groups[i].mu, "
                                 f".logvar, .z by group")
        return self.groups[0]

    @property
    def mu(self) -> Tensor:
        """The posterior mean of a one-group model (a flat VAE); several groups: read ``groups``."""
        return self._single().mu

    @property
    def logvar(self) -> Tensor:
        return self._single().logvar

    @property
    def z(self) -> Tensor:
        return self._single().z

    @property
    def closed_form(self) -> bool:
        """Whether every group's KL is in closed form (then ``kl_per_unit`` exists)."""
        return all(g.closed_form for g in self.groups)

    def kl_per_unit(self) -> Tensor | None:
        """(B, units of all groups) the closed-form KL of every unit, groups in order; None if some group has none."""
        if not self.closed_form:
            return None
        parts = [g.kl.flatten(1) for g in self.groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def group_rates(self) -> Tensor:
        """(B, groups) each group's rate."""
        return torch.stack([g.rate for g in self.groups], 1)
