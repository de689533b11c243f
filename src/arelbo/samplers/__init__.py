"""Ex-post latent samplers: where the latent codes fed to a trained decoder come from when generating.

A sampler is fitted once on a trained VAE and its training data, then draws latent codes z (n, q); decoding
through the first model is shared (:func:`decode_samples`). Registered samplers:

- ``prior``: z ~ p(z), the VAE's own generative model (N(0, I), or the learnable prior it was trained with: a
  standalone copy of that density is kept, so a saved prior sampler needs no model);
- ``gmm``: a Gaussian mixture (scikit-learn ``GaussianMixture``, full covariances, ``n_components`` = 10 by
  default, seeded) fitted to the posterior means mu(x) of the training set; sampled in torch (component by
  ``torch.multinomial``, then mean + Cholesky factor x standard normal) so a ``torch.Generator`` drives it;
- ``two-stage``: Dai & Wipf (2019)'s two-stage VAE: a second VAE (MLP encoder/decoder, latent dimension = the
  first stage's) trained with an :mod:`arelbo.objectives` policy (``ar`` by default, ``learned`` for their gamma) on
  the first stage's latent codes, z samples from q(z|x) (the aggregate posterior, redrawn every step; the
  default) or the means mu(x). Sampling: u ~ N(0, I) -> z = second decoder's mean at u plus its decoder
  noise N(0, sigma2) (``noise=False``: the mean alone, as Dai & Wipf);
- ``flow``: a masked autoregressive flow (zuko MAF, as pythae's MAF sampler) fitted by maximum likelihood to the
  standardised posterior means mu(x) (or samples of q(z|x)) of the training set, with early stopping on held-out
  codes; sampled by inverting the flow on seeded standard normals.

Fitted state is a plain dict (tensors, numbers, strings): :func:`save_sampler` / :func:`load_sampler` store it
with the sampler's name and config, loadable with ``torch.load(weights_only=True)``.

Adding a sampler: subclass :class:`LatentSampler`, implement ``_fit``/``sample``/``state_dict``/
``load_state_dict``, and decorate with ``@register_sampler``.
"""

from arelbo.samplers.base import SAMPLERS, LatentSampler, make_sampler, register_sampler
from arelbo.samplers.prior import PriorSampler  # imported in registration order: the order samplers are listed
from arelbo.samplers.gmm import GMMSampler
from arelbo.samplers.two_stage import TwoStageSampler
from arelbo.samplers.flow import FlowSampler
from arelbo.samplers.io import decode_samples, load_sampler, save_sampler, to_uint8

__all__ = [
    "LatentSampler",
    "PriorSampler",
    "GMMSampler",
    "TwoStageSampler",
    "FlowSampler",
    "SAMPLERS",
    "register_sampler",
    "make_sampler",
    "save_sampler",
    "load_sampler",
    "decode_samples",
    "to_uint8",
]
