"""Ex-post latent samplers: prior, Gaussian mixture (recovers a known mixture), two-stage VAE; save/load."""

import pytest
import torch

from arelbo.models import LinearVAE
from arelbo.samplers import (
    SAMPLERS,
    GMMSampler,
    TwoStageSampler,
    decode_samples,
    load_sampler,
    make_sampler,
    save_sampler,
)

TRUE_MEANS = torch.tensor([[-6.0, 0.0], [0.0, 6.0], [6.0, -3.0]], dtype=torch.float64)
TRUE_WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
TRUE_STD = torch.tensor([[0.5, 1.0], [1.0, 0.3], [0.7, 0.7]], dtype=torch.float64)


# Small tensors: one intra-op thread is fastest, and robust on a shared, oversubscribed CPU (conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def mixture_codes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(TRUE_WEIGHTS, n, replacement=True, generator=g)
    return TRUE_MEANS[comp] + TRUE_STD[comp] * torch.randn(n, 2, generator=g, dtype=torch.float64)


class IdentityVAE(LinearVAE):
    """Encoder mu = x (2-d data), logvar = log 0.01: the posterior means are the data themselves."""

    def __init__(self):
        super().__init__((2, 1, 1), 2)
        with torch.no_grad():
            self.encoder.linear.weight.copy_(torch.eye(2))
            self.decoder.linear.weight.copy_(torch.eye(2))
            self.encoder.logvar.fill_(torch.log(torch.tensor(0.01)))


def test_registry_and_errors():
    assert {"prior", "gmm", "two-stage"} <= set(SAMPLERS)
    with pytest.raises(ValueError, match="known samplers"):
        make_sampler("nope")
    with pytest.raises(ValueError, match="valid"):
        make_sampler("gmm", n_comp=3)
    with pytest.raises(ValueError, match="not fitted"):
        make_sampler("prior").sample(3)


def test_prior_shapes_and_seeding():
    model = IdentityVAE()
    s = make_sampler("prior").fit(model, [])
    z1 = s.sample(1000, torch.Generator().manual_seed(3))
    z2 = s.sample(1000, torch.Generator().manual_seed(3))
    assert z1.shape == (1000, 2) and torch.equal(z1, z2)
    assert abs(float(z1.mean())) < 0.1 and abs(float(z1.std()) - 1) < 0.1


def test_gmm_recovers_known_mixture():
    codes = mixture_codes(6000)
    gmm = GMMSampler(n_components=3, seed=0).fit_means(codes)
    order = torch.argsort(gmm.means[:, 0])  # the true means are sorted by their first coordinate
    torch.testing.assert_close(gmm.means[order], TRUE_MEANS, atol=0.08, rtol=0)
    torch.testing.assert_close(gmm.weights[order], TRUE_WEIGHTS, atol=0.03, rtol=0)
    true_cov = torch.diag_embed(TRUE_STD**2)
    torch.testing.assert_close(gmm.covariances[order], true_cov, atol=0.08, rtol=0)
    # samples follow the fitted mixture: overall mean and component proportions
    z = gmm.sample(20000, torch.Generator().manual_seed(1))
    assert z.shape == (20000, 2) and z.dtype == torch.float32
    overall = (TRUE_WEIGHTS[:, None] * TRUE_MEANS).sum(0)
    torch.testing.assert_close(z.double().mean(0), overall, atol=0.1, rtol=0)
    near_first = ((z.double() - TRUE_MEANS[0]).norm(dim=1) < 3).double().mean()
    assert float(near_first) == pytest.approx(0.5, abs=0.02)


def test_gmm_fit_on_model_posterior_means_and_roundtrip(tmp_path):
    model = IdentityVAE()
    x = mixture_codes(3000, seed=5).float().reshape(-1, 2, 1, 1)
    loader = [x[i : i + 256] for i in range(0, len(x), 256)]
    gmm = make_sampler("gmm", n_components=3, seed=1).fit(model, loader, max_examples=2000)
    assert gmm.fit_info["num_codes"] == 2000
    order = torch.argsort(gmm.means[:, 0])
    torch.testing.assert_close(gmm.means[order], TRUE_MEANS, atol=0.15, rtol=0)
    save_sampler(gmm, tmp_path / "gmm.pt", extra={"key": 1})
    again, extra = load_sampler(tmp_path / "gmm.pt")
    assert extra == {"key": 1} and isinstance(again, GMMSampler) and again.config() == gmm.config()
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(gmm.sample(50, g1), again.sample(50, g2))


def test_two_stage_learns_codes_on_a_plane_and_roundtrips(tmp_path):
    """Dai & Wipf's setting: codes on a 2-d affine plane in R^3, far from N(0, I). The second stage drives its
    sigma2 towards 0 and its decoder mean maps N(0, I) onto the codes' distribution."""
    g = torch.Generator().manual_seed(0)
    m = torch.tensor([1.0, -1.0, 0.5])
    B = torch.tensor([[1.0, 0.0], [0.5, 1.2], [0.0, -0.8]])
    codes = m + torch.randn(4000, 2, generator=g) @ B.T
    sampler = TwoStageSampler(steps=600, batch_size=256, hidden=(64, 64), codes="mean", seed=0)
    sampler.fit_codes(codes)
    assert sampler.fit_info["sigma2_mean"] < 0.01
    z = sampler.sample(4000, torch.Generator().manual_seed(1))
    assert z.shape == (4000, 3) and torch.isfinite(z).all()
    torch.testing.assert_close(z.mean(0), m, atol=0.15, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), B @ B.T, atol=0.25, rtol=0)
    # the samples lie on the codes' plane: their distance from it is small next to the plane's spread (and next to
    # the ~0.8 mean distance of N(0, I) draws, which the first stage's prior would give)
    normal = torch.linalg.cross(B[:, 0], B[:, 1])
    normal = normal / normal.norm()
    off_plane = ((z - m) @ normal).abs().mean()
    assert float(off_plane) < 0.1, float(off_plane)
    save_sampler(sampler, tmp_path / "two.pt")
    again, _ = load_sampler(tmp_path / "two.pt")
    torch.testing.assert_close(again.sample(64, torch.Generator().manual_seed(2)), sampler.sample(64, torch.Generator().manual_seed(2)))
    torch.testing.assert_close(again.sigma2, sampler.sigma2)


def test_two_stage_full_rank_codes_need_decoder_noise():
    """Codes filling all q dimensions: the decoder mean alone is under-dispersed; noise=True samples the model."""
    g = torch.Generator().manual_seed(0)
    m, s = torch.tensor([1.0, -1.0, 0.5]), torch.tensor([0.8, 1.3, 1.0])
    codes = m + s * torch.randn(4000, 3, generator=g)
    sampler = TwoStageSampler(steps=400, hidden=(64, 64), codes="mean", noise=True, lr=3e-3, seed=0).fit_codes(codes)
    z = sampler.sample(4000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(z.mean(0), m, atol=0.15, rtol=0)
    torch.testing.assert_close(z.std(0), s, atol=0.15, rtol=0)
    sampler.noise = False
    assert float(sampler.sample(4000, torch.Generator().manual_seed(1)).std(0).min()) < 0.6
    # deterministic given its seed, and the global RNG is left alone
    state = torch.random.get_rng_state()
    twin = TwoStageSampler(steps=20, hidden=(16,), seed=3).fit_codes(codes[:100], torch.zeros(100, 3))
    twin2 = TwoStageSampler(steps=20, hidden=(16,), seed=3).fit_codes(codes[:100], torch.zeros(100, 3))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(twin.sample(5, torch.Generator().manual_seed(0)), twin2.sample(5, torch.Generator().manual_seed(0)))


def test_two_stage_on_model_with_sampled_codes_and_learned_policy():
    model = IdentityVAE()
    x = mixture_codes(500, seed=2).float().reshape(-1, 2, 1, 1)
    sampler = make_sampler("two-stage", steps=30, hidden=[32], policy="learned", codes="sample")
    sampler.fit(model, [x[:256], x[256:]])
    assert sampler.fit_info["num_codes"] == 500
    torch.testing.assert_close(sampler.sigma2, sampler.loss_fn.policy.log_sigma2.detach().exp())
    assert sampler.sample(7).shape == (7, 2)
    with pytest.raises(ValueError):
        TwoStageSampler(codes="other")
    with pytest.raises(ValueError):
        TwoStageSampler().fit_codes(torch.zeros(10, 2))  # codes="sample" needs logvar


def test_decode_samples_shapes_and_uint8():
    model = IdentityVAE()
    sampler = make_sampler("prior").fit(model, [])
    x = decode_samples(model, sampler, 1001, torch.Generator().manual_seed(0), batch_size=100)
    assert x.shape == (1001, 2, 1, 1) and x.dtype == torch.float32
    # independent of the batch size
    y = decode_samples(model, sampler, 1001, torch.Generator().manual_seed(0), batch_size=1001)
    torch.testing.assert_close(x, y)
    u = decode_samples(model, sampler, 1001, torch.Generator().manual_seed(0), as_uint8=True)
    assert u.dtype == torch.uint8
    torch.testing.assert_close(u, (x.clamp(0, 1) * 255).round().to(torch.uint8))
