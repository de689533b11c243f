"""A top-down hierarchical Gaussian VAE (VDVAE / NVAE style) whose decoder variance is any policy's.

The model (``model.arch: hvae``):

- **Layout.** The top group z_1 is a vector of ``model.latent_dim`` units (the code ex-post samplers model, as
  a flat VAE's z); ``model.layout`` lists the groups below it, top to bottom, as ``RES:CHANNELS``: ``"7:8,14:4"``
  for 28x28 images gives z_2 with 8 channels at 7x7 and z_3 with 4 channels at 14x14 (an empty layout: the top
  group alone). Resolutions are non-decreasing square sizes, each dividing the next and the image side; a
  resolution may carry several groups (``"7:8,7:8"``). Every shape below is computed from the layout, the data
  shape (C, H, H), ``model.width`` (the residual stream's channels) and ``model.blocks`` (residual blocks per
  group and per resolution of the encoder).
- **Bottom-up encoder.** A patch convolution (kernel = stride = H / R, R the largest resolution of the layout)
  to ``width`` channels at R x R, then at each resolution from R down to the top one ``blocks`` bottleneck
  residual blocks (1x1 -> 3x3 -> 3x3 -> 1x1, width/4 inside, GELU) whose output is kept for the groups at that
  resolution, and average pooling to the next. (No block runs at the image's full resolution: on 2 CPU cores
  those cost more than the rest of the model.)
- **Top-down decoder.** A learned input h at the top resolution; for each group, in order: h is upsampled
  (nearest) to the group's resolution; the prior p(z_l | z_<l) = N(m_p, exp(v_p)) and a feature are read off h,
  the posterior q(z_l | z_<l, x) = N(m_q, exp(v_q)) off (h, the encoder's activation at that resolution); z_l is
  sampled (reparameterised); h <- h + feature + proj(z_l), then ``blocks`` residual blocks. The top group's prior
  is the model's ``prior`` (N(0, I) by default, or a learnable one of :mod:`arelbo.models.priors`) and its
  posterior comes from the encoder alone. After the last group h is brought to R x R (nearest upsampling) and a
  transposed patch convolution (the stem's mirror) gives the decoder mean at H x H (sigmoid for images in
  [0, 1]).
- **Rate.** Every group's KL(q || p) is in closed form (two diagonal Gaussians; the top group's under a
  learnable prior is its one-sample Monte-Carlo estimate): the rate is their sum, each group's part named in the
  output.
- **Generation.** The model's own sample is the top-down pass with z_l drawn from p(z_l | z_<l); ``temperature``
  t scales every group's prior standard deviation (t = 1 is the model). Ex-post samplers model the top group's
  code (``code_dim`` units); :meth:`decode_code` runs the rest of the pass from the priors.

No batch norm: the model's output is a function of its own example only, so data-parallel training needs no
synchronised statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arelbo.models.nets import VarianceHead, output_activation
from arelbo.models.outputs import (
    LOG_2PI,
    LatentGroup,
    ModelOutput,
    Noise,
    Posterior,
    gaussian_kl,
    gaussian_kl_between,
    generator_noise,
    upcast,
)
from arelbo.models.priors import Prior, StandardPrior

__all__ = ["GroupSpec", "parse_layout", "HierarchicalVAE", "ResBlock"]


@dataclass(frozen=True)
class GroupSpec:
    """One latent group of the layout: its name, square resolution and channels."""

    name: str
    resolution: int
    channels: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The group's unit shape: (channels,) for a 1x1 (vector) group, else (channels, res, res)."""
        return (self.channels,) if self.resolution == 1 else (self.channels, self.resolution, self.resolution)

    @property
    def num_units(self) -> int:
        return math.prod(self.shape)


def parse_layout(layout: str, top_units: int, image_size: int | None = None) -> list[GroupSpec]:
    """The top vector group z1 of ``top_units`` units, then the groups of ``layout`` (``"7:8,14:4"``) as z2, z3, ...;
    checked against the image side when given."""
    if not isinstance(layout, str):
        raise ValueError(f"model.layout must be a string of RES:CHANNELS items (e.g. 7:8,14:4), got {layout!r}")
    if int(top_units) < 1:
        raise ValueError(f"model.latent_dim (the top group's units) must be >= 1, got {top_units}")
    groups = [GroupSpec("z1", 1, int(top_units))]
    items = [item for item in layout.replace(" ", "").split(",") if item] if layout.strip() else []
    for item in items:
        res, sep, ch = item.partition(":")
        try:
            res_i, ch_i = int(res), int(ch)
        except ValueError:
            raise ValueError(f"model.layout item {item!r} is not RES:CHANNELS (two integers, e.g. 7:8)") from None
        if not sep or res_i < 1 or ch_i < 1:
            raise ValueError(f"model.layout item {item!r} is not RES:CHANNELS with positive integers (e.g. 7:8)")
        if res_i < groups[-1].resolution:
            raise ValueError(f"model.layout {layout!r}: resolutions must not decrease from the top group down "
                             f"({groups[-1].resolution} then {res_i})")
        groups.append(GroupSpec(f"z{len(groups) + 1}", res_i, ch_i))
    if image_size is not None:
        sizes = sorted({g.resolution for g in groups} | {image_size})
        if sizes[-1] != image_size:
            raise ValueError(f"model.layout {layout!r}: resolution {sizes[-1]} is larger than the image ({image_size})")
        for small, big in zip(sizes, sizes[1:]):
            if big % small:
                raise ValueError(f"model.layout {layout!r}: each resolution must divide the next and the image side "
                                 f"({image_size}); {small} does not divide {big}")
    return groups


def _act() -> nn.Module:
    return nn.GELU()


class ResBlock(nn.Module):
    """x + f(x), f a bottleneck 1x1 -> 3x3 -> 3x3 -> 1x1 with GELU (VDVAE's block); 1x1 maps at resolution 1.
    The last convolution starts at zero scale, so a new block is the identity."""

    def __init__(self, width: int, resolution: int, out_width: int | None = None, residual: bool = True,
                 in_width: int | None = None):
        super().__init__()
        mid = max(1, width // 4)
        k = 1 if resolution == 1 else 3
        inp = in_width or width
        self.residual = residual
        self.net = nn.Sequential(
            _act(), nn.Conv2d(inp, mid, 1),
            _act(), nn.Conv2d(mid, mid, k, padding=k // 2),
            _act(), nn.Conv2d(mid, mid, k, padding=k // 2),
            _act(), nn.Conv2d(mid, out_width or width, 1),
        )
        if residual:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x) if self.residual else self.net(x)


class BottomUp(nn.Module):
    """x -> the activation at every resolution of the layout; ``forward`` gives the top group's posterior (so the
    encoder is what the VampPrior pushes pseudo-inputs through)."""

    def __init__(self, channels: int, size: int, groups: Sequence[GroupSpec], width: int, blocks: int):
        super().__init__()
        self.size = size
        self.resolutions = sorted({g.resolution for g in groups}, reverse=True)  # the largest first
        patch = size // self.resolutions[0]
        self.stem = nn.Conv2d(channels, width, patch, stride=patch)
        self.stages = nn.ModuleList(nn.Sequential(*[ResBlock(width, r) for _ in range(blocks)])
                                    for r in self.resolutions)
        top = groups[0]
        self.top_resolution = top.resolution
        self.top_head = nn.Conv2d(width, 2 * top.channels, 1)
        self.top_shape = top.shape

    def features(self, x: Tensor) -> dict[int, Tensor]:
        h = self.stem(x)
        acts = {}
        for i, (r, stage) in enumerate(zip(self.resolutions, self.stages)):
            if i:
                h = F.avg_pool2d(h, self.resolutions[i - 1] // r)
            h = stage(h)
            acts[r] = h
        return acts

    def top_posterior(self, acts: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
        mu, logvar = self.top_head(acts[self.top_resolution]).chunk(2, dim=1)
        b = mu.shape[0]
        return mu.reshape(b, *self.top_shape), logvar.reshape(b, *self.top_shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.top_posterior(self.features(x))


class GroupBlock(nn.Module):
    """One latent group below the top: its prior and posterior from the top-down state, then the state update."""

    def __init__(self, spec: GroupSpec, width: int, blocks: int):
        super().__init__()
        self.spec = spec
        r, c = spec.resolution, spec.channels
        self.prior_net = ResBlock(width, r, out_width=2 * c + width, residual=False)
        self.posterior_net = ResBlock(width, r, out_width=2 * c, residual=False, in_width=2 * width)
        self.z_proj = nn.Conv2d(c, width, 1)
        self.blocks = nn.Sequential(*[ResBlock(width, r) for _ in range(blocks)])
        # the prior's feature and logvar start at zero: a new model's priors are N(., 1) and its state unchanged
        last = self.prior_net.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def prior(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.spec.channels
        out = self.prior_net(h)
        return out[:, :c], out[:, c : 2 * c], out[:, 2 * c :]

    def posterior(self, h: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        return self.posterior_net(torch.cat([h, act], 1)).chunk(2, dim=1)

    def update(self, h: Tensor, feature: Tensor, z: Tensor) -> Tensor:
        return self.blocks(h + feature + self.z_proj(z))


class _Pass(NamedTuple):
    """One top-down pass: the decoder mean, each group's record, and the variance head's log sigma2 (or None)."""

    x_hat: Tensor
    groups: list
    x_logvar: Tensor | None


class HierarchicalVAE(nn.Module):
    """The top-down hierarchical VAE of this module's docstring. Keeps the interface of every model of
    :mod:`arelbo.models` (forward -> :class:`ModelOutput`, ``encode`` -> the top group's :class:`Posterior`)."""

    def __init__(self, shape: Sequence[int], latent_dim: int, layout: str, width: int = 32, blocks: int = 1,
                 out_activation: str = "sigmoid", prior: Prior | None = None, variance_head: bool = False):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3 or self.shape[1] != self.shape[2]:
            raise ValueError(f"the hierarchical VAE needs square images (C, H, H), got {self.shape}")
        if width < 4 or blocks < 1:
            raise ValueError(f"model.width must be >= 4 and model.blocks >= 1, got {width}, {blocks}")
        channels, size = self.shape[0], self.shape[1]
        self.groups = parse_layout(layout, latent_dim, size)
        self.layout, self.width, self.num_blocks = layout, int(width), int(blocks)
        top = self.groups[0]
        self.latent_dim = top.num_units  # the top group: what the prior and ex-post samplers model
        self.encoder = BottomUp(channels, size, self.groups, width, blocks)
        self.h0 = nn.Parameter(torch.zeros(1, width, top.resolution, top.resolution))
        self.top_proj = nn.Conv2d(top.channels, width, 1)
        self.top_blocks = nn.Sequential(*[ResBlock(width, top.resolution) for _ in range(blocks)])
        self.group_blocks = nn.ModuleList(GroupBlock(g, width, blocks) for g in self.groups[1:])
        self.top_resolution = max(g.resolution for g in self.groups)
        patch = size // self.top_resolution
        self.out_conv = nn.ConvTranspose2d(width, channels, patch, stride=patch)
        self.out_act = output_activation(out_activation)
        # log sigma2(z) per element off the last state h, a twin of out_conv (model.variance_head)
        self.variance_head = VarianceHead(self.out_conv) if variance_head else None
        self.prior = prior if prior is not None else StandardPrior(self.latent_dim, self.shape)
        if self.prior.latent_dim != self.latent_dim:
            raise ValueError(f"prior has latent_dim {self.prior.latent_dim}, the top group {self.latent_dim}")

    # ---- the interface every model keeps

    @property
    def latent_shapes(self) -> dict[str, tuple[int, ...]]:
        return {g.name: g.shape for g in self.groups}

    @property
    def closed_form_rate(self) -> bool:
        return self.prior.closed_form_kl

    @property
    def code_dim(self) -> int:
        return self.latent_dim

    smoothness_units_per_group = 8

    @property
    def smoothness_units(self) -> list[int]:
        """The units whose decoder smoothness is measured: up to ``smoothness_units_per_group`` per group, evenly
        spaced over its units (all of a small group), so the cost does not grow with the spatial groups' size."""
        out, start = [], 0
        for g in self.groups:
            k = min(g.num_units, self.smoothness_units_per_group)
            out += [start + (i * g.num_units) // k for i in range(k)]
            start += g.num_units
        return out

    @property
    def units_decoder(self):
        """The decoder mean as a function of every unit's code (B, units): the top-down pass with each group at
        the given value (no sampling)."""
        return self._decode_units

    def encode(self, x: Tensor) -> Posterior:
        """The top group's posterior q(z_1 | x), each (B, code_dim)."""
        self._check(x)
        mu, logvar = self.encoder(x)
        return Posterior(mu.flatten(1), logvar.flatten(1))

    def forward(self, x: Tensor, sample: bool = True, noise: Noise | None = None) -> ModelOutput:
        """Posterior pass: every group sampled from q(z_l | z_<l, x) with ``noise`` (default randn_like), or at
        its posterior mean (``sample=False``, each group given the groups above at theirs)."""
        self._check(x)
        acts = self.encoder.features(x)
        down = self._top_down(acts, x.shape[0], mode="posterior" if sample else "mean", noise=noise)
        groups = down.groups
        rate = groups[0].rate
        for g in groups[1:]:
            rate = rate + g.rate
        return ModelOutput(down.x_hat, rate, tuple(groups), down.x_logvar)

    def decode(self, z: Tensor) -> Tensor:
        """The decoder mean from a top-group code, every group below at its prior mean (deterministic)."""
        return self.decode_code(z, temperature=0.0)

    def decode_code(self, code: Tensor, noise: Noise | None = None, temperature: float = 1.0) -> Tensor:
        """The decoder mean from a sampler's top-group code (B, code_dim), the groups below drawn from their priors
        with ``noise``, standard deviations scaled by ``temperature``."""
        return self._top_down(None, code.shape[0], mode="prior", noise=noise, top=code,
                              temperature=temperature).x_hat

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """n decoder means from the model's own top-down pass (reproducible with a generator); ``temperature``
        scales every group's prior standard deviation."""
        top = self.sample_latent(n, generator)
        if temperature != 1.0:
            if not self.prior.closed_form_kl:
                raise ValueError("a temperature other than 1 needs the standard prior on the top group")
            top = top * temperature
        ref = self.h0
        return self.decode_code(top.to(ref.device, ref.dtype), generator_noise(generator), temperature)

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.prior.sample(n, generator, self.encoder)

    def log_prior(self, z: Tensor) -> Tensor:
        return self.prior.log_prob(z, self.encoder)

    def log_weights(self, x: Tensor, k: int, generator: torch.Generator | None = None,
                    max_rows: int = 2048, variance: bool = False):
        """k posterior samples of every group per example: decoder means (k, B, *x's shape) and
        sum_l [log p(z_l | z_<l) - log q(z_l | z_<l, x)] in float64, (k, B). Rows go through the network
        ``max_rows`` at a time. ``variance=True`` (a variance head): the named
        :class:`~arelbo.models.vae.WeightedDraws`, with the head's log sigma2 at each draw."""
        from arelbo.models.vae import WeightedDraws

        if variance and self.variance_head is None:
            raise ValueError("this model's decoder has no variance head (set model.variance_head: true)")
        self._check(x)
        b = x.shape[0]
        acts = self.encoder.features(x)
        noise = generator_noise(generator)
        per = max(1, max_rows // max(1, b))
        x_hats, weights, logvars = [], [], []
        for start in range(0, k, per):
            kc = min(per, k - start)
            rep = {r: a.repeat(kc, *([1] * (a.dim() - 1))) for r, a in acts.items()}
            down = self._top_down(rep, kc * b, mode="posterior", noise=noise, log_density=True)
            w = sum(g.rate for g in down.groups)  # here each group's rate slot holds log p - log q (see _top_down)
            x_hats.append(down.x_hat.reshape(kc, *x.shape))
            weights.append(w.reshape(kc, b))
            if variance:
                logvars.append(down.x_logvar.reshape(kc, *x.shape))
        if variance:
            return WeightedDraws(torch.cat(x_hats), torch.cat(weights), torch.cat(logvars))
        return torch.cat(x_hats), torch.cat(weights)

    def rate(self, mu: Tensor, logvar: Tensor, z: Tensor) -> Tensor | None:
        """The top group's one-sample Monte-Carlo KL under a learnable prior (None: closed form)."""
        return self.prior.rate(mu, logvar, z, self.encoder)

    # ---- the pass

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"model expects inputs of shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")

    def _decode_units(self, units: Tensor) -> Tensor:
        codes, start = [], 0
        for g in self.groups:
            codes.append(units[:, start : start + g.num_units].reshape(units.shape[0], *g.shape))
            start += g.num_units
        return self._top_down(None, units.shape[0], mode="given", given=codes).x_hat

    def _top_down(self, acts, b: int, mode: str, noise: Noise | None = None, top: Tensor | None = None,
                  temperature: float = 1.0, given: list[Tensor] | None = None,
                  log_density: bool = False) -> _Pass:
        """The top-down pass. ``mode``: "posterior" (sample q), "mean" (q's means), "prior" (sample p, the top
        group from ``top``), "given" (every group's code given). With ``log_density``, each group's rate slot holds
        log p(z_l | z_<l) - log q(z_l | z_<l, x) at the sampled z_l (float64) instead of the KL."""
        draw = noise if noise is not None else torch.randn_like
        spec0 = self.groups[0]
        out: list[LatentGroup] = []
        # the top group
        if mode in ("posterior", "mean"):
            mu, logvar = self.encoder.top_posterior(acts)
            z = mu + draw(mu) * (0.5 * logvar).exp() if mode == "posterior" else mu
            flat_mu, flat_lv, flat_z = mu.flatten(1), logvar.flatten(1), z.flatten(1)
            if log_density:
                log_q = _diag_log_density(z, mu, logvar)
                log_p = (-0.5 * (flat_z.double().pow(2).sum(1) + flat_z.shape[1] * LOG_2PI)
                         if self.prior.closed_form_kl else self.log_prior(flat_z).double())
                out.append(LatentGroup(spec0.name, flat_mu, flat_lv, flat_z, log_p - log_q))
            elif self.prior.closed_form_kl:
                kl = gaussian_kl(upcast(flat_mu), upcast(flat_lv))
                out.append(LatentGroup(spec0.name, flat_mu, flat_lv, flat_z, kl.sum(1), kl))
            else:
                rate = self.prior.rate(flat_mu, flat_lv, flat_z, self.encoder)
                out.append(LatentGroup(spec0.name, flat_mu, flat_lv, flat_z, rate))
        else:
            z = (top if mode == "prior" else given[0]).reshape(b, *spec0.shape)
        z_map = z.reshape(b, spec0.channels, spec0.resolution, spec0.resolution)
        h = self.top_blocks(self.h0.expand(b, -1, -1, -1) + self.top_proj(z_map.to(self.h0.dtype)))
        for i, block in enumerate(self.group_blocks):
            spec = block.spec
            if h.shape[-1] != spec.resolution:
                h = F.interpolate(h, scale_factor=spec.resolution // h.shape[-1], mode="nearest")
            p_mu, p_logvar, feature = block.prior(h)
            if mode in ("posterior", "mean"):
                q_mu, q_logvar = block.posterior(h, acts[spec.resolution])
                z = q_mu + draw(q_mu) * (0.5 * q_logvar).exp() if mode == "posterior" else q_mu
                if log_density:
                    lw = _diag_log_density(z, p_mu, p_logvar) - _diag_log_density(z, q_mu, q_logvar)
                    out.append(LatentGroup(spec.name, q_mu, q_logvar, z, lw))
                else:
                    kl = gaussian_kl_between(upcast(q_mu), upcast(q_logvar), upcast(p_mu), upcast(p_logvar))
                    out.append(LatentGroup(spec.name, q_mu, q_logvar, z, kl.flatten(1).sum(1), kl, p_mu, p_logvar))
            elif mode == "prior":
                z = p_mu + draw(p_mu) * (0.5 * p_logvar).exp() * temperature if temperature else p_mu
            else:
                z = given[i + 1].to(h.dtype)
            h = block.update(h, feature, z)
        if h.shape[-1] != self.top_resolution:
            h = F.interpolate(h, scale_factor=self.top_resolution // h.shape[-1], mode="nearest")
        x_hat = self.out_act(self.out_conv(h))
        return _Pass(x_hat, out, None if self.variance_head is None else self.variance_head(h))

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, width={self.width}, blocks={self.num_blocks}"


def _diag_log_density(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """(B,) log N(z; mu, diag(exp(logvar))) summed over every unit, float64."""
    z, mu, logvar = z.double().flatten(1), mu.double().flatten(1), logvar.double().flatten(1)
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(1)
