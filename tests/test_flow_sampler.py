"""The ex-post flow sampler (a zuko MAF fitted to codes) against a known density."""

import math

import pytest
import torch

from arelbo.samplers import FlowSampler, load_sampler, make_sampler, save_sampler

pytestmark = pytest.mark.usefixtures("single_thread")


def _gaussian_codes(n, seed):
    g = torch.Generator().manual_seed(seed)
    mean = torch.tensor([3.0, -1.0])
    chol = torch.tensor([[2.0, 0.0], [1.5, 0.5]])
    return mean + torch.randn(n, 2, generator=g) @ chol.T, torch.distributions.MultivariateNormal(mean, scale_tril=chol)


def test_flow_sampler_fits_a_known_density_and_roundtrips(tmp_path):
    codes, true = _gaussian_codes(4000, 0)
    sampler = make_sampler("flow", max_epochs=40, patience=5, hidden=[32, 32], transforms=2).fit_codes(codes)
    info = sampler.fit_info
    assert info["num_codes"] == 3600 and info["num_held_out"] == 400 and 1 <= info["best_epoch"] <= info["epochs"]
    # the held-out NLL reaches the true density's entropy (an affine MAF represents a Gaussian exactly)
    entropy = float(true.entropy())
    assert info["held_out_nll"] == pytest.approx(entropy, abs=0.1)
    fresh, _ = _gaussian_codes(20000, 1)
    assert float(sampler.log_prob(fresh).mean()) == pytest.approx(float(true.log_prob(fresh).mean()), abs=0.05)
    # its samples have the true mean and covariance, to the precision early stopping on 400 held-out codes allows
    # (their NLL has a standard error ~0.05 nats; a 7% error in a variance costs ~0.002 nats: measured 7-9%)
    z = sampler.sample(20000, torch.Generator().manual_seed(2)).double()
    torch.testing.assert_close(z.mean(0), true.mean.double(), atol=0.15, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), true.covariance_matrix.double(), atol=0, rtol=0.15)
    # saved state_dict + config, loaded with weights_only: the same draws
    save_sampler(sampler, tmp_path / "flow.pt")
    loaded, _ = load_sampler(tmp_path / "flow.pt")
    assert isinstance(loaded, FlowSampler) and loaded.config() == sampler.config()
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(loaded.sample(7, g()), sampler.sample(7, g()))


def test_flow_sampler_stops_early_and_checks_its_arguments():
    codes, _ = _gaussian_codes(600, 3)
    rng_before = torch.get_rng_state()
    sampler = make_sampler("flow", max_epochs=500, patience=1, lr=3e-2, hidden=[8], transforms=1).fit_codes(codes)
    assert sampler.fit_info["stopped_early"] and sampler.fit_info["epochs"] < 500
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched
    assert math.isfinite(sampler.fit_info["held_out_nll"])
    with pytest.raises(ValueError, match="codes must be"):
        make_sampler("flow", codes="both")
    with pytest.raises(ValueError, match="val_fraction"):
        make_sampler("flow", val_fraction=1.0)
    with pytest.raises(ValueError, match="log-variances"):
        make_sampler("flow", codes="sample").fit_codes(codes)
    with pytest.raises(ValueError, match="not fitted"):
        make_sampler("flow").sample(3)
