"""Priors p(z) of the VAE (pure PyTorch; flows from zuko): the standard normal and three learnable priors.

A prior is one :class:`Prior` module registered by name (``model.prior`` in the config, options in
``model.prior_options``). It is a submodule of the :class:`~arelbo.models.VAE`, so its parameters are in the
model's ``state_dict`` (checkpoints, exact resume), in the optimiser and under DDP's gradient averaging like any
other weight.

=============  ================================================================================================
``standard``   N(0, I), no parameters; the rate is the closed-form KL (the default, exactly the classic VAE)
``mog``        a mixture of ``components`` diagonal Gaussians with learnable weights, means and variances
``vamp``       VampPrior (Tomczak & Welling 2018): p(z) = 1/K sum_k q(z | u_k), K learnable pseudo-inputs u_k of
               the data's shape pushed through the encoder
``flow``       a masked autoregressive flow (zuko's MAF) on N(0, I), initialised at the identity map
=============  ================================================================================================

**Rate.** For every prior but ``standard`` the KL has no closed form; the rate of example x is the one-sample
Monte-Carlo estimate at the reparameterised z ~ q(z|x) the decoder sees,

    rate(x) = log q(z|x) - log p(z)  with  E_q[log q(z|x)] = -H(q) = -1/2 sum_j (1 + log 2 pi + logvar_j)

in closed form (only the cross-entropy term is sampled), an unbiased estimate of KL(q(z|x) || p(z)).
:meth:`Prior.rate` returns ``None`` for the standard prior, which tells the loss to use the closed form.

**VampPrior and batch norm.** The pseudo-inputs go through the encoder with its batch-norm layers in evaluation
mode (running statistics, none updated), in training as in evaluation: the prior is then one fixed density at
any time and the pseudo-inputs never shift the statistics of the data batches.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from arelbo.registry import build, register

__all__ = [
    "Prior",
    "StandardPrior",
    "MoGPrior",
    "VampPrior",
    "FlowPrior",
    "PRIORS",
    "register_prior",
    "make_prior",
    "prior_options",
    "build_maf",
    "gaussian_entropy",
]

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_entropy(logvar: Tensor) -> Tensor:
    """(B,) entropy of N(mu, diag(exp(logvar))) in nats."""
    return 0.5 * (1.0 + LOG_2PI + logvar).sum(-1)


def _diag_normal_log_prob(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mean, diag(exp(logvar))) summed over the last dimension (broadcasting)."""
    return -0.5 * ((z - mean).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def _randn(shape, generator: torch.Generator | None, device=None, dtype=None) -> Tensor:
    """Standard normals drawn on the generator's device (a CPU generator drives any device), then moved."""
    gen_device = generator.device if generator is not None else device
    out = torch.randn(shape, generator=generator, device=gen_device)
    return out.to(device=device if device is not None else out.device, dtype=dtype or out.dtype)


class Prior(nn.Module):
    """p(z) on R^q. Subclasses implement :meth:`log_prob` and :meth:`sample`.

    ``encoder`` is passed to the methods by the :class:`~arelbo.models.VAE` (only the VampPrior uses it), so the
    prior never holds a second reference to the encoder's weights.
    """

    name: ClassVar[str] = ""
    closed_form_kl: ClassVar[bool] = False  # True: KL(q || p) per latent dimension in closed form (standard only)

    def __init__(self, latent_dim: int, shape: Sequence[int] | None = None):
        super().__init__()
        if int(latent_dim) < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.latent_dim = int(latent_dim)
        self.shape = None if shape is None else tuple(int(s) for s in shape)

    def log_prob(self, z: Tensor, encoder: nn.Module | None = None) -> Tensor:  # pragma: no cover - abstract
        """(B,) log p(z) in nats for z (B, q)."""
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None, encoder: nn.Module | None = None) -> Tensor:
        """(n, q) draws from p(z), on the prior's device; a ``torch.Generator`` makes them reproducible."""
        raise NotImplementedError  # pragma: no cover - abstract

    def rate(self, mu: Tensor, logvar: Tensor, z: Tensor, encoder: nn.Module | None = None) -> Tensor | None:
        """(B,) one-sample estimate of KL(q(z|x) || p(z)) at z ~ q(z|x); None: use the closed form."""
        if self.closed_form_kl:
            return None
        mu = mu.to(torch.promote_types(mu.dtype, torch.float32))
        return -gaussian_entropy(logvar.to(mu.dtype)) - self.log_prob(z.to(mu.dtype), encoder).to(mu.dtype)

    def standalone(self, encoder: nn.Module | None = None) -> "Prior":
        """A detached copy of this distribution that needs no encoder (saved with an ex-post prior sampler)."""
        return copy.deepcopy(self).eval()

    def config(self) -> dict[str, Any]:
        """The constructor arguments (``make_prior(name, **config)`` rebuilds the module)."""
        params = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        out = {p: getattr(self, p) for p in params}
        if out.get("shape") is not None:
            out["shape"] = list(out["shape"])
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    def _ref(self) -> tuple[torch.device, torch.dtype]:
        for t in (*self.parameters(), *self.buffers()):
            if t.is_floating_point():
                return t.device, t.dtype
        return torch.device("cpu"), torch.get_default_dtype()


PRIORS: dict[str, type[Prior]] = {}


def register_prior(cls: type[Prior]) -> type[Prior]:
    """Class decorator: make a prior available by its ``name`` in :func:`make_prior` and ``model.prior``."""
    return register(PRIORS, cls, "prior")


def prior_options(name: str) -> list[str]:
    """The options (constructor arguments besides latent_dim and shape) the prior ``name`` takes."""
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; known priors: {', '.join(sorted(PRIORS))}")
    return [p for p in inspect.signature(PRIORS[name].__init__).parameters if p not in ("self", "latent_dim", "shape")]


def make_prior(name: str, latent_dim: int, shape: Sequence[int] | None = None, **options) -> Prior:
    """Build a registered prior; unknown names and options are errors that list what is valid."""
    valid = prior_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"prior {name!r} takes no option(s) {unknown}; valid: {valid}")
    return build(PRIORS, name, {"latent_dim": latent_dim, "shape": shape, **options}, kind="prior",
                 long_kind="prior", plural="priors")


@register_prior
class StandardPrior(Prior):
    """N(0, I): no parameters, closed-form KL; the default."""

    name = "standard"
    closed_form_kl = True

    def log_prob(self, z: Tensor, encoder: nn.Module | None = None) -> Tensor:
        return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * LOG_2PI)

    def sample(self, n: int, generator: torch.Generator | None = None, encoder: nn.Module | None = None) -> Tensor:
        return torch.randn(n, self.latent_dim, generator=generator, device=generator.device if generator is not None else "cpu")


class _Mixture(Prior):
    """Shared log-density and sampling of an equal-shape mixture of diagonal Gaussians."""

    def _components(self, encoder) -> tuple[Tensor, Tensor, Tensor]:  # pragma: no cover - abstract
        """(log weights (K,), means (K, q), log-variances (K, q))."""
        raise NotImplementedError

    def log_prob(self, z: Tensor, encoder: nn.Module | None = None) -> Tensor:
        log_w, means, logvars = self._components(encoder)
        dtype = torch.promote_types(z.dtype, means.dtype)
        z, log_w, means, logvars = z.to(dtype), log_w.to(dtype), means.to(dtype), logvars.to(dtype)
        per = _diag_normal_log_prob(z.unsqueeze(-2), means, logvars)  # (B, K)
        return torch.logsumexp(per + log_w, dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None, encoder: nn.Module | None = None) -> Tensor:
        with torch.no_grad():
            log_w, means, logvars = self._components(encoder)
        gen_device = generator.device if generator is not None else "cpu"
        comp = torch.multinomial(log_w.detach().float().exp().to(gen_device), n, replacement=True,
                                 generator=generator).to(means.device)
        eps = _randn((n, self.latent_dim), generator, means.device, means.dtype)
        return (means[comp] + (0.5 * logvars[comp]).exp() * eps).detach()


@register_prior
class MoGPrior(_Mixture):
    """A mixture of ``components`` diagonal Gaussians, all learnable (weights through softmax logits).

    Initialisation: equal weights, unit variances, means ~ N(0, init_std^2) (from the global RNG, i.e. the run's
    seed). ``init_std = 0`` with one component is exactly N(0, I).
    """

    name = "mog"

    def __init__(self, latent_dim: int, shape: Sequence[int] | None = None, components: int = 10,
                 init_std: float = 1.0, learn_weights: bool = True):
        super().__init__(latent_dim, shape)
        if int(components) < 1:
            raise ValueError(f"mog prior: components must be >= 1, got {components}")
        if not (math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"mog prior: init_std must be >= 0, got {init_std}")
        self.components, self.init_std, self.learn_weights = int(components), float(init_std), bool(learn_weights)
        self.means = nn.Parameter(self.init_std * torch.randn(self.components, self.latent_dim))
        self.logvars = nn.Parameter(torch.zeros(self.components, self.latent_dim))
        self.logits = nn.Parameter(torch.zeros(self.components), requires_grad=self.learn_weights)

    def _components(self, encoder):
        return torch.log_softmax(self.logits, 0), self.means, self.logvars


@contextlib.contextmanager
def _frozen_batch_norm(module: nn.Module):
    """Batch-norm layers in eval mode (running statistics, not updated) for the duration; others untouched."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in bns:
        m.eval()
    try:
        yield
    finally:
        for m in bns:
            m.train()


@register_prior
class VampPrior(_Mixture):
    """VampPrior: the mixture of the encoder's posteriors at ``components`` learnable pseudo-inputs.

    Pseudo-inputs have the data's shape and start at ``init_mean + init_std * N(0, 1)`` (the run's seed); the defaults
    suit images in [0, 1]. They are free parameters (no clamping): the encoder sees them as it sees data.
    """

    name = "vamp"

    def __init__(self, latent_dim: int, shape: Sequence[int] | None = None, components: int = 50,
                 init_mean: float = 0.5, init_std: float = 0.1):
        super().__init__(latent_dim, shape)
        if self.shape is None:
            raise ValueError("vamp prior: needs the data shape (its pseudo-inputs live in data space)")
        if int(components) < 1:
            raise ValueError(f"vamp prior: components must be >= 1, got {components}")
        self.components, self.init_mean, self.init_std = int(components), float(init_mean), float(init_std)
        self.pseudo_inputs = nn.Parameter(self.init_mean + self.init_std * torch.randn(self.components, *self.shape))

    def _components(self, encoder):
        if encoder is None:
            raise ValueError("vamp prior: the encoder is needed to evaluate or sample the prior")
        with _frozen_batch_norm(encoder):
            mu, logvar = encoder(self.pseudo_inputs)
        log_w = torch.full((self.components,), -math.log(self.components), dtype=mu.dtype, device=mu.device)
        return log_w, mu, logvar

    def standalone(self, encoder: nn.Module | None = None) -> Prior:
        """The same density as a :class:`MoGPrior` with the encoded pseudo-inputs as its components."""
        with torch.no_grad():
            log_w, mu, logvar = self._components(encoder)
        mog = MoGPrior(self.latent_dim, self.shape, components=self.components, init_std=0.0).to(mu.device)
        with torch.no_grad():
            mog.means.copy_(mu)
            mog.logvars.copy_(logvar)
            mog.logits.copy_(log_w)
        return mog.eval()


def build_maf(features: int, transforms: int, hidden: Sequence[int], identity: bool = True) -> nn.Module:
    """zuko's masked autoregressive flow on a standard-normal base; ``identity``: zero the last layer of every
    autoregressive network, so the flow starts as the identity map (its density is exactly N(0, I))."""
    import zuko

    flow = zuko.flows.MAF(features, transforms=int(transforms), hidden_features=[int(h) for h in hidden])
    if identity:
        for t in flow.transform.transforms:
            last = t.hyper[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
    return flow


@register_prior
class FlowPrior(Prior):
    """p(z) = a masked autoregressive flow (zuko MAF, ``transforms`` layers of ``hidden`` units) on N(0, I).

    Starts at the identity (p = N(0, I) exactly), so training begins from the standard VAE. Density evaluation
    is one pass; sampling inverts the autoregression (q passes), done only when generating.
    """

    name = "flow"

    def __init__(self, latent_dim: int, shape: Sequence[int] | None = None, transforms: int = 4,
                 hidden: Sequence[int] = (128, 128), identity_init: bool = True):
        super().__init__(latent_dim, shape)
        if int(transforms) < 1 or not hidden or min(int(h) for h in hidden) < 1:
            raise ValueError(f"flow prior: need transforms >= 1 and positive hidden widths, got {transforms}, {hidden}")
        self.transforms, self.hidden, self.identity_init = int(transforms), [int(h) for h in hidden], bool(identity_init)
        self.flow = build_maf(self.latent_dim, self.transforms, self.hidden, self.identity_init)

    def log_prob(self, z: Tensor, encoder: nn.Module | None = None) -> Tensor:
        return self.flow().log_prob(z.to(self._ref()[1]))

    def sample(self, n: int, generator: torch.Generator | None = None, encoder: nn.Module | None = None) -> Tensor:
        device, dtype = self._ref()
        u = _randn((n, self.latent_dim), generator, device, dtype)
        with torch.no_grad():
            return self.flow().transform.inv(u)
