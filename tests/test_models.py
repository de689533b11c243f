"""VAE models: nets sized from the data shape, the benchmark architecture, input checks, sampling, and the linear
VAE's closed-form expected squared error against Monte Carlo."""

import math

import pytest
import torch

from arelbo.config import ModelConfig
from arelbo.models import VAE, LinearVAE, VAEOutput, build_model, conv_sizes

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPES = [(1, 28, 28), (3, 64, 64), (1, 27, 31), (3, 17, 9), (2, 5, 6)]


def _check_roundtrip(model: VAE, shape, batch=2, latent_dim=None):
    x = torch.rand(batch, *shape)
    out = model(x)
    assert isinstance(out, VAEOutput)
    assert out.x_hat.shape == x.shape
    q = latent_dim or model.latent_dim
    assert out.mu.shape == out.logvar.shape == out.z.shape == (batch, q)
    assert torch.isfinite(out.x_hat).all()
    assert torch.equal(model(x, sample=False).z, out.mu)
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "arch, hidden, kernel, norm",
    [("conv", [8, 16], 4, "none"), ("conv", [4, 8], 3, "group"), ("conv", [4], 5, "instance"), ("mlp", [32, 16], 4, "layer")],
)
def test_output_shape_equals_input_shape(shape, arch, hidden, kernel, norm):
    if arch == "conv" and min(shape[1:]) < 8 and len(hidden) > 1:
        hidden = hidden[:1]
    cfg = ModelConfig(arch=arch, latent_dim=3, hidden=hidden, kernel_size=kernel, norm=norm)
    model = build_model(cfg, shape)
    out = _check_roundtrip(model, shape)
    assert out.x_hat.min() >= 0 and out.x_hat.max() <= 1  # sigmoid output for images in [0, 1]


@pytest.mark.parametrize("stride, kernel", [(1, 3), (2, 4), (2, 3), (3, 4), (2, 1)])
def test_conv_strides_and_kernels_invert_exactly(stride, kernel):
    shape = (1, 13, 10)
    cfg = ModelConfig(arch="conv", latent_dim=2, hidden=[4, 4], kernel_size=kernel, stride=stride, out_activation="none")
    _check_roundtrip(build_model(cfg, shape), shape)


def test_benchmark_net_builds_for_64x64():
    cfg = ModelConfig(arch="conv", latent_dim=64, hidden=[128, 256, 512, 1024], kernel_size=4, norm="batch")
    model = build_model(cfg, (3, 64, 64))
    assert model.encoder.sizes == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 4 + 3  # encoder 4, decoder 3
    model.eval()
    with torch.no_grad():
        _check_roundtrip(model, (3, 64, 64), batch=1)


def test_too_small_image_for_too_many_layers():
    cfg = ModelConfig(arch="conv", latent_dim=2, hidden=[8, 8, 8, 8, 8], kernel_size=4)
    with pytest.raises(ValueError, match=r"image 8x8 is too small for 5 conv layers .* layer 4 would output 0x0"):
        build_model(cfg, (1, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        conv_sizes(3, 3, 2, kernel=4, stride=2, padding=0)


def test_build_model_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model(ModelConfig(arch="mlp", hidden=[8]), (28, 28))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model(ModelConfig(arch="mlp", hidden=[8]), (1, 0, 28))


@pytest.mark.parametrize("arch", ["conv", "mlp", "linear"])
def test_encode_rejects_wrong_input_shape(arch):
    model = build_model(ModelConfig(arch=arch, latent_dim=2, hidden=[4]), (1, 12, 12))
    for bad in (torch.rand(2, 1, 12, 13), torch.rand(2, 3, 12, 12), torch.rand(1, 12, 12), torch.rand(2, 144)):
        with pytest.raises(ValueError, match=r"model expects inputs of shape \(B, 1, 12, 12\)"):
            model.encode(bad)


@pytest.mark.parametrize("arch", ["conv", "mlp", "linear"])
def test_sample_shape(arch):
    model = build_model(ModelConfig(arch=arch, latent_dim=3, hidden=[4]), (2, 9, 7))
    assert model.sample(5).shape == (5, 2, 9, 7)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(model.sample(3, generator=g1), model.sample(3, generator=g2))
    model.double()
    assert model.sample(2).dtype == torch.float64


@pytest.mark.parametrize("bias", [False, True])
def test_linear_expected_sq_err_matches_monte_carlo(bias):
    """E_q (x_d - f_d(z))^2 in closed form against an average over M = 200,000 reparameterised draws per sample.
    Tolerance from the CLT: each element within 5 standard errors (std of the draws / sqrt(M)); 5 SE is exceeded
    with probability ~6e-7 per element, and the seed is fixed anyway."""
    torch.manual_seed(0)
    shape, q, b, m = (1, 2, 3), 2, 3, 200_000
    model = LinearVAE(shape, q, bias=bias).double()
    with torch.no_grad():
        model.encoder.logvar.copy_(torch.tensor([-0.7, 0.4], dtype=torch.float64))
    x = torch.randn(b, *shape, dtype=torch.float64)
    exact = model.expected_sq_err(x)
    assert exact.shape == (b, 6)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        eps = torch.randn(m, b, q, dtype=torch.float64)
        z = mu + eps * (0.5 * logvar).exp()
        sq = (x.flatten(1) - model.decode(z.reshape(m * b, q)).reshape(m, b, 6)) ** 2
    mean, se = sq.mean(0), sq.std(0) / math.sqrt(m)
    assert torch.all((mean - exact).abs() < 5 * se), ((mean - exact) / se).abs().max()
    # and the exact formula itself: ||x - f(mu)||^2 elementwise + sum_j W_dj^2 s_j
    w = model.W.detach()
    resid = x.flatten(1) - model.decode(mu).flatten(1)
    torch.testing.assert_close(exact, resid**2 + (w**2 * logvar[0].exp()).sum(1), rtol=0, atol=1e-14)


def test_linear_model_via_config():
    model = build_model(ModelConfig(arch="linear", latent_dim=3, bias=True), (1, 4, 4))
    assert isinstance(model, LinearVAE) and model.W.shape == (16, 3)
    _check_roundtrip(model, (1, 4, 4))
