"""The flat VAE: a Gaussian encoder, a decoder, one latent vector under a prior, and a registry of architectures.

Its forward returns the named :class:`~arelbo.models.outputs.ModelOutput` (one latent group, ``z``), the contract
every model of the package keeps (see :mod:`arelbo.models.outputs`)."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from arelbo.models.nets import ConvDecoder, ConvEncoder, DecoderOutput, MLPDecoder, MLPEncoder
from arelbo.models.outputs import LOG_2PI, LatentGroup, ModelOutput, Noise, Posterior, gaussian_kl, upcast
from arelbo.models.priors import Prior, StandardPrior, make_prior

VAEOutput = ModelOutput  # the flat VAE's output is the common one (one latent group)


class WeightedDraws(NamedTuple):
    """k draws z ~ q(z|x) for importance sampling: decoder means (k, B, *x's shape), log p(z) - log q(z|x) (k, B)
    in float64, and the decoder's log-variance at each draw (k, B, *x's shape)."""

    x_hat: Tensor
    log_ratio: Tensor
    x_logvar: Tensor


class VAE(nn.Module):
    """q(z|x) = N(mu(x), diag(exp(logvar(x)))), a prior p(z) (:mod:`arelbo.models.priors`; N(0, I) by default),
    decoder mean f(z). The loss lives apart, in :mod:`arelbo.objectives`, so any decoder-variance policy can train
    any model with any prior."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int, shape: Sequence[int],
                 prior: Prior | None = None):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.latent_dim = int(latent_dim)
        self.shape = tuple(int(s) for s in shape)
        # the standard prior has no parameters or buffers: state_dicts of standard-prior models are unchanged
        self.prior = prior if prior is not None else StandardPrior(self.latent_dim, self.shape)
        if self.prior.latent_dim != self.latent_dim:
            raise ValueError(f"prior has latent_dim {self.prior.latent_dim}, the model {self.latent_dim}")

    @property
    def latent_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each latent group's unit shape, by name, in the order of the output's groups."""
        return {"z": (self.latent_dim,)}

    @property
    def closed_form_rate(self) -> bool:
        """Whether the rate is a closed-form KL (else a learnable prior's Monte-Carlo estimate)."""
        return self.prior.closed_form_kl

    @property
    def units_decoder(self) -> nn.Module:
        """The decoder mean as a function of every latent unit (B, units), row-wise: what smoothness differentiates."""
        return self.decoder

    @property
    def code_dim(self) -> int:
        """The dimension of the code ex-post samplers model and :meth:`decode` takes (here: the latent vector)."""
        return self.latent_dim

    def encode(self, x: Tensor) -> Posterior:
        """q(z|x) as a named (mu, logvar) pair, each (B, q)."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"model expects inputs of shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        mu, logvar = self.encoder(x)
        return Posterior(mu, logvar)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    @property
    def variance_head(self) -> nn.Module | None:
        """The decoder's log-variance head (``model.variance_head: true``), or None."""
        return getattr(self.decoder, "variance_head", None)

    def decode_with_logvar(self, z: Tensor) -> DecoderOutput:
        """The decoder mean and its log sigma^2(z) per element (None without a variance head), one shared pass."""
        if self.variance_head is None:  # through decode: what a subclass (or a test) puts there still runs
            return DecoderOutput(self.decode(z), None)
        return self.decoder.decode(z)

    def decode_code(self, code: Tensor, noise: Noise | None = None, temperature: float = 1.0) -> Tensor:
        """The decoder mean from a sampler's code (B, code_dim); ``noise`` draws any latent group below the code,
        at ``temperature`` (the flat VAE has none: its code is all of z)."""
        return self.decoder(code)

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor, noise: Noise | None = None) -> Tensor:
        eps = torch.randn_like(mu) if noise is None else noise(mu)
        return mu + eps * (0.5 * logvar).exp()

    def forward(self, x: Tensor, sample: bool = True, noise: Noise | None = None) -> ModelOutput:
        """One pass: z ~ q(z|x) reparameterised with ``noise`` (default ``torch.randn_like``), or ``sample=False``
        z = mu (reconstructions); the rate is the closed-form KL (per unit) for N(0, I), else the prior's
        one-sample Monte-Carlo estimate at z."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, noise) if sample else mu
        if self.prior.closed_form_kl:
            kl = gaussian_kl(upcast(mu), upcast(logvar))
            rate = kl.sum(1)
        else:
            kl, rate = None, self.prior.rate(mu, logvar, z, self.encoder)
        decoded = self.decode_with_logvar(z)
        return ModelOutput(decoded.mean, rate, (LatentGroup("z", mu, logvar, z, rate, kl),), decoded.logvar)

    def log_weights(self, x: Tensor, k: int, generator: torch.Generator | None = None,
                    variance: bool = False) -> tuple[Tensor, Tensor] | WeightedDraws:
        """For importance sampling: k draws z_k ~ q(z|x); returns the decoder means (k, B, *x's shape) and
        log p(z_k) - log q(z_k|x) in float64, (k, B); ``variance=True`` (a model with a variance head): the named
        :class:`WeightedDraws`, with the decoder's log-variance at each z_k."""
        mu, logvar = self.encode(x)
        b, q = mu.shape
        gen_device = generator.device if generator is not None else mu.device
        eps = torch.randn((k, b, q), generator=generator, dtype=mu.dtype, device=gen_device).to(mu.device)
        z = mu + (0.5 * logvar).exp() * eps  # (k, B, q)
        decoded = self.decode_with_logvar(z.reshape(k * b, q)) if variance else None
        x_hat = (decoded.mean if variance else self.decode(z.reshape(k * b, q))).reshape(k, *x.shape)
        if self.prior.closed_form_kl:
            log_pz = -0.5 * (z.double().pow(2).sum(-1) + q * LOG_2PI)
        else:
            log_pz = self.log_prior(z.reshape(-1, q)).reshape(k, b).double()
        log_qz = -0.5 * (eps.double().pow(2).sum(2) + logvar.double().sum(1) + q * LOG_2PI)
        if variance:
            if decoded.logvar is None:
                raise ValueError("this model's decoder has no variance head (set model.variance_head: true)")
            return WeightedDraws(x_hat, log_pz - log_qz, decoded.logvar.reshape(k, *x.shape))
        return x_hat, log_pz - log_qz

    def rate(self, mu: Tensor, logvar: Tensor, z: Tensor) -> Tensor | None:
        """(B,) Monte-Carlo KL(q(z|x) || p(z)) at z ~ q(z|x), or None when the prior's KL is in closed form."""
        return self.prior.rate(mu, logvar, z, self.encoder)

    def log_prior(self, z: Tensor) -> Tensor:
        """(B,) log p(z) under the model's prior."""
        return self.prior.log_prob(z, self.encoder)

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, q) draws z ~ p(z) from the model's prior (reproducible with a generator)."""
        return self.prior.sample(n, generator, self.encoder)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n decoder means f(z), z ~ p(z) (the model's prior)."""
        ref = next(self.parameters())
        return self.decode(self.sample_latent(n, generator).to(device=ref.device, dtype=ref.dtype))


class LinearEncoder(nn.Module):
    """mu = V x (+ b); log-variance a free parameter per latent dimension (at the linear VAE's optimum the
    encoder variance does not depend on x, so this loses nothing)."""

    def __init__(self, dim: int, latent_dim: int, bias: bool = False):
        super().__init__()
        self.linear = nn.Linear(dim, latent_dim, bias=bias)
        self.logvar = nn.Parameter(torch.zeros(latent_dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu = self.linear(x.flatten(1))
        return mu, self.logvar.expand_as(mu)


class LinearDecoder(nn.Module):
    def __init__(self, shape: Sequence[int], latent_dim: int, bias: bool = False):
        super().__init__()
        self.shape = tuple(shape)
        self.linear = nn.Linear(latent_dim, math.prod(shape), bias=bias)

    def forward(self, z: Tensor) -> Tensor:
        return self.linear(z).view(z.shape[0], *self.shape)


class LinearVAE(VAE):
    """f(z) = W z, mu = V x: the model with exact closed forms (:mod:`arelbo.linear`)."""

    def __init__(self, shape: Sequence[int], latent_dim: int, bias: bool = False, prior: Prior | None = None):
        dim = math.prod(shape)
        super().__init__(LinearEncoder(dim, latent_dim, bias), LinearDecoder(shape, latent_dim, bias), latent_dim, shape,
                         prior)

    @property
    def W(self) -> Tensor:  # (D, q) decoder matrix
        return self.decoder.linear.weight

    def expected_sq_err(self, x: Tensor) -> Tensor:
        """E_q (x_d - f_d(z))^2 in closed form, (B, D): ||x - f(mu)||^2 elementwise plus sum_j W_dj^2 s_j.

        Feeding this to ``GaussianVAELoss.from_sq_err`` gives the library's loss with the reparameterisation
        noise integrated exactly, so optimisers converge to the global optimum to machine-level tolerance.
        """
        mu, logvar = self.encode(x)
        resid = x.flatten(1) - self.decode(mu).flatten(1)
        return resid.pow(2) + self.W.pow(2) @ logvar[0].exp()


def _conv(cfg, shape) -> VAE:
    common = dict(kernel_size=cfg.kernel_size, stride=cfg.stride, norm=cfg.norm, activation=cfg.activation)
    enc = ConvEncoder(shape, cfg.latent_dim, cfg.hidden, **common)
    dec = ConvDecoder(shape, cfg.latent_dim, cfg.hidden, out_activation=cfg.out_activation,
                      variance_head=getattr(cfg, "variance_head", False), **common)
    return VAE(enc, dec, cfg.latent_dim, shape, _prior(cfg, shape))


def _mlp(cfg, shape) -> VAE:
    common = dict(norm=cfg.norm, activation=cfg.activation)
    enc = MLPEncoder(shape, cfg.latent_dim, cfg.hidden, **common)
    dec = MLPDecoder(shape, cfg.latent_dim, cfg.hidden, out_activation=cfg.out_activation,
                     variance_head=getattr(cfg, "variance_head", False), **common)
    return VAE(enc, dec, cfg.latent_dim, shape, _prior(cfg, shape))


def _linear(cfg, shape) -> VAE:
    return LinearVAE(shape, cfg.latent_dim, bias=cfg.bias, prior=_prior(cfg, shape))


def _prior(cfg, shape) -> Prior:
    """The config's prior (built after the encoder and decoder, so their initialisation does not depend on it)."""
    return make_prior(getattr(cfg, "prior", "standard"), cfg.latent_dim, shape, **(getattr(cfg, "prior_options", None) or {}))


def _hvae(cfg, shape) -> nn.Module:
    from arelbo.models.hvae import HierarchicalVAE

    return HierarchicalVAE(shape, cfg.latent_dim, cfg.layout, cfg.width, cfg.blocks, cfg.out_activation,
                           prior=_prior(cfg, shape), variance_head=getattr(cfg, "variance_head", False))


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"conv": _conv, "mlp": _mlp, "linear": _linear, "hvae": _hvae}
VARIANCE_HEAD_ARCHITECTURES = ("conv", "mlp", "hvae")  # decoders with a log-variance head (model.variance_head: true)


def build_model(cfg, shape: Sequence[int]) -> nn.Module:
    """Build the model a :class:`arelbo.config.ModelConfig` describes for data of shape (C, H, W): a flat
    :class:`VAE` (conv, mlp, linear) or the :class:`~arelbo.models.hvae.HierarchicalVAE` (hvae)."""
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.arch!r}; known: {', '.join(ARCHITECTURES)}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"data shape must be (C, H, W) with positive sizes, got {tuple(shape)}")
    if getattr(cfg, "variance_head", False) and cfg.arch not in VARIANCE_HEAD_ARCHITECTURES:
        raise ValueError(f"model.variance_head: the {cfg.arch!r} decoder has no variance head; use arch "
                         f"{', '.join(VARIANCE_HEAD_ARCHITECTURES)}")
    return ARCHITECTURES[cfg.arch](cfg, tuple(shape))
