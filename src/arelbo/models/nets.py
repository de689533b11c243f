"""Encoder and decoder networks whose layer shapes are computed from the data shape (C, H, W) and the config.

Convolutional nets stack ``conv -> norm -> activation`` blocks of the configured widths; the decoder mirrors the
encoder with transposed convolutions whose ``output_padding`` is solved per layer so that it returns exactly the
encoder's input size (28x28, 64x64, or anything else), never a hard-coded size.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}

OUTPUT_ACTIVATIONS = {"none": nn.Identity, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def _norm2d(kind: str, channels: int) -> nn.Module:
    norms = {
        "none": lambda c: nn.Identity(),
        "batch": nn.BatchNorm2d,
        "group": lambda c: nn.GroupNorm(math.gcd(32, c), c),
        "instance": lambda c: nn.InstanceNorm2d(c, affine=True),
    }
    if kind not in norms:
        raise ValueError(f"unknown norm {kind!r}; known: {', '.join(norms)}")
    return norms[kind](channels)


def _norm1d(kind: str, width: int) -> nn.Module:
    norms = {"none": lambda w: nn.Identity(), "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
    if kind not in norms:
        raise ValueError(f"unknown norm {kind!r} for an MLP; known: {', '.join(norms)}")
    return norms[kind](width)


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def output_activation(name: str) -> nn.Module:
    if name not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"unknown output activation {name!r}; known: {', '.join(OUTPUT_ACTIVATIONS)}")
    return OUTPUT_ACTIVATIONS[name]()


class DecoderOutput(NamedTuple):
    """A decoder's mean f(z) and, with a variance head, log sigma^2(z) per element (else None); both x's shape."""

    mean: Tensor
    logvar: Tensor | None


class VarianceHead(nn.Module):
    """log sigma^2(z) per element from the decoder's last features: a twin of the mean's last layer (same shape),
    starting at weight 0, bias 0 (sigma^2 = 1 everywhere; a policy may set the bias, :meth:`set_initial`).

    ``detach_input``: cut the head's gradient from the shared features (set by the policy, not saved): a head
    fitted by maximum likelihood to the residuals must not move the mean."""

    def __init__(self, last_layer: nn.Module):
        super().__init__()
        self.layer = copy.deepcopy(last_layer)
        with torch.no_grad():
            self.layer.weight.zero_()
            self.layer.bias.zero_()
        self.detach_input = False

    def set_initial(self, sigma2: float) -> None:
        """sigma^2(z) = ``sigma2`` for every z: weight 0, bias log sigma2."""
        with torch.no_grad():
            self.layer.weight.zero_()
            self.layer.bias.fill_(math.log(sigma2))

    def forward(self, features: Tensor) -> Tensor:
        return self.layer(features.detach() if self.detach_input else features)


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv_sizes(height: int, width: int, n_layers: int, kernel: int, stride: int, padding: int) -> list[tuple[int, int]]:
    """Spatial sizes before each conv layer and after the last: [(H, W), ..., (h_last, w_last)]."""
    sizes = [(height, width)]
    for i in range(n_layers):
        h, w = (conv_out_size(s, kernel, stride, padding) for s in sizes[-1])
        if h < 1 or w < 1:
            raise ValueError(
                f"image {height}x{width} is too small for {n_layers} conv layers (kernel {kernel}, stride "
                f"{stride}): layer {i + 1} would output {h}x{w}; use fewer channel widths or a smaller stride"
            )
        sizes.append((h, w))
    return sizes


class ConvEncoder(nn.Module):
    """(B, C, H, W) -> (mu, logvar), each (B, latent_dim)."""

    def __init__(
        self,
        shape: Sequence[int],
        latent_dim: int,
        channels: Sequence[int],
        kernel_size: int = 4,
        stride: int = 2,
        norm: str = "none",
        activation: str = "relu",
    ):
        super().__init__()
        c, h, w = shape
        padding = (kernel_size - 1) // 2
        self.sizes = conv_sizes(h, w, len(channels), kernel_size, stride, padding)
        layers, prev = [], c
        for width in channels:
            layers += [nn.Conv2d(prev, width, kernel_size, stride, padding), _norm2d(norm, width), _activation(activation)]
            prev = width
        self.features = nn.Sequential(*layers)
        h_last, w_last = self.sizes[-1]
        self.head = nn.Linear(prev * h_last * w_last, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.features(x).flatten(1)).chunk(2, dim=1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """(B, latent_dim) -> (B, C, H, W): the mirror of :class:`ConvEncoder` with the same config."""

    def __init__(
        self,
        shape: Sequence[int],
        latent_dim: int,
        channels: Sequence[int],
        kernel_size: int = 4,
        stride: int = 2,
        norm: str = "none",
        activation: str = "relu",
        out_activation: str = "sigmoid",
        variance_head: bool = False,
    ):
        super().__init__()
        c, h, w = shape
        padding = (kernel_size - 1) // 2
        sizes = conv_sizes(h, w, len(channels), kernel_size, stride, padding)
        self.start_shape = (channels[-1], *sizes[-1])
        self.project = nn.Sequential(nn.Linear(latent_dim, math.prod(self.start_shape)), _activation(activation))
        layers = []
        widths = [c, *channels]  # widths[i] = channels entering encoder layer i
        for i in reversed(range(len(channels))):
            target, source = sizes[i], sizes[i + 1]
            # Solve output_padding so this layer exactly inverts encoder layer i's spatial size.
            base = [(s - 1) * stride - 2 * padding + kernel_size for s in source]
            out_pad = tuple(t - b for t, b in zip(target, base))
            layers.append(nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size, stride, padding, output_padding=out_pad))
            if i > 0:
                layers += [_norm2d(norm, widths[i]), _activation(activation)]
        layers.append(output_activation(out_activation))
        self.layers = nn.Sequential(*layers)
        self.variance_head = VarianceHead(self.layers[-2]) if variance_head else None

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(self.project(z).view(z.shape[0], *self.start_shape))

    def decode(self, z: Tensor) -> DecoderOutput:
        """Mean and (with a head) log-variance from one pass through the shared layers."""
        h = self.project(z).view(z.shape[0], *self.start_shape)
        if self.variance_head is None:
            return DecoderOutput(self.layers(h), None)
        features = self.layers[:-2](h)
        return DecoderOutput(self.layers[-2:](features), self.variance_head(features))


class MLPEncoder(nn.Module):
    def __init__(self, shape: Sequence[int], latent_dim: int, hidden: Sequence[int], norm="none", activation="relu"):
        super().__init__()
        layers, prev = [nn.Flatten()], math.prod(shape)
        for width in hidden:
            layers += [nn.Linear(prev, width), _norm1d(norm, width), _activation(activation)]
            prev = width
        layers.append(nn.Linear(prev, 2 * latent_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=1)
        return mu, logvar


class MLPDecoder(nn.Module):
    def __init__(
        self,
        shape: Sequence[int],
        latent_dim: int,
        hidden: Sequence[int],
        norm="none",
        activation="relu",
        out_activation="sigmoid",
        variance_head: bool = False,
    ):
        super().__init__()
        self.shape = tuple(shape)
        layers, prev = [], latent_dim
        for width in reversed(hidden):
            layers += [nn.Linear(prev, width), _norm1d(norm, width), _activation(activation)]
            prev = width
        layers += [nn.Linear(prev, math.prod(shape)), output_activation(out_activation)]
        self.net = nn.Sequential(*layers)
        self.variance_head = VarianceHead(self.net[-2]) if variance_head else None

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(z.shape[0], *self.shape)

    def decode(self, z: Tensor) -> DecoderOutput:
        """Mean and (with a head) log-variance from one pass through the shared layers."""
        if self.variance_head is None:
            return DecoderOutput(self(z), None)
        features = self.net[:-2](z)
        shape = (z.shape[0], *self.shape)
        return DecoderOutput(self.net[-2:](features).view(shape), self.variance_head(features).view(shape))
