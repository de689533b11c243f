"""VAE models (pure PyTorch): conv and MLP Gaussian encoders/decoders sized from the data shape, the linear VAE, priors,
and the named output every model returns (:mod:`arelbo.models.outputs`)."""

from arelbo.models.outputs import LatentGroup, ModelOutput, Posterior
from arelbo.models.nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, conv_sizes
from arelbo.models.priors import PRIORS, Prior, make_prior, register_prior
from arelbo.models.vae import ARCHITECTURES, VAE, LinearVAE, VAEOutput, build_model

__all__ = [
    "VAE",
    "VAEOutput",
    "ModelOutput",
    "LatentGroup",
    "Posterior",
    "LinearVAE",
    "ConvEncoder",
    "ConvDecoder",
    "MLPEncoder",
    "MLPDecoder",
    "ARCHITECTURES",
    "build_model",
    "conv_sizes",
    "Prior",
    "PRIORS",
    "make_prior",
    "register_prior",
]
