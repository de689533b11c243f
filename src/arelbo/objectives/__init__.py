"""The Gaussian-VAE loss and its decoder-variance policies (pure PyTorch).

A Gaussian VAE's negative ELBO per sample, with D observed elements and decoder variance sigma2, is

    -ELBO = sum_d (x_d - f_d(z))^2 / (2 sigma2_d) + 1/2 sum_d log(2 pi sigma2_d) + KL(q(z|x) || p(z)).

The rate KL is in closed form for p(z) = N(0, I); for a learnable prior (:mod:`arelbo.models.priors`) the caller
passes its Monte-Carlo estimate as ``rate``, and every policy below works unchanged.

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

Under torch.distributed the ``ar*`` policies all-reduce their sums over the default process group. A call made
on only some ranks (rank-0 validation) must opt out, or it waits for the other ranks for ever:
``GaussianVAELoss("ar", all_reduce=False)`` (or ``loss_fn.all_reduce = False``), or name the ranks that take
part with ``process_group=``.
"""

from arelbo.objectives.base import (
    DEFAULT_POLICY,
    POLICIES,
    DecoderVariance,
    HeldOutSigma2,
    LossOutput,
    NonFiniteError,
    PolicyOption,
    gaussian_kl,
    make_policy,
    neg_elbo_per_sample,
    policy_options,
    register_policy,
)
from arelbo.objectives.given import Beta, Fixed  # imported in registration order: the order policies are listed
from arelbo.objectives.learned import Learned
from arelbo.objectives.estimated import AR, AREMA, ARAnnealed, ARDiagonal, ARPerSample
from arelbo.objectives.conditional import ARConditional, LearnedConditional
from arelbo.objectives.loss import GaussianVAELoss

__all__ = [
    "GaussianVAELoss",
    "LossOutput",
    "NonFiniteError",
    "DecoderVariance",
    "HeldOutSigma2",
    "PolicyOption",
    "policy_options",
    "DEFAULT_POLICY",
    "POLICIES",
    "register_policy",
    "make_policy",
    "gaussian_kl",
    "neg_elbo_per_sample",
    "Fixed",
    "Beta",
    "Learned",
    "AR",
    "ARDiagonal",
    "ARPerSample",
    "AREMA",
    "ARAnnealed",
    "ARConditional",
    "LearnedConditional",
]
