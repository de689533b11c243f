"""Samplers judged on held-out data: the GMM's component count from a grid, the two-stage sampler's early stop;
the FID's sampling spread and the reconstruction floor in arelbo eval."""

import math

import numpy as np
import pytest
import torch

from arelbo.samplers import GMMSampler, TwoStageSampler, load_sampler, make_sampler, save_sampler
from arelbo.samplers.two_stage import _EarlyStopping

from test_samplers import IdentityVAE, mixture_codes

pytestmark = pytest.mark.usefixtures("single_thread")


def test_gmm_component_count_is_chosen_on_held_out_likelihood(tmp_path):
    from sklearn.mixture import GaussianMixture

    train, val = mixture_codes(1500, seed=0), mixture_codes(500, seed=1)
    model = IdentityVAE()
    loader = [train[i : i + 500].float().reshape(-1, 2, 1, 1) for i in range(0, 1500, 500)]
    val_loader = [val.float().reshape(-1, 2, 1, 1)]
    g = make_sampler("gmm", components_grid=[6, 1, 2, 3], seed=4).fit(model, loader, val_loader=val_loader)
    sel = g.fit_info["selection"]
    scores = {int(k): v for k, v in sel["mean_log_likelihood"].items()}
    assert sorted(scores) == [1, 2, 3, 6] and sel["held_out"] == "held-out codes" and sel["num_held_out"] == 500
    # each score is sklearn's own held-out score of the same mixture (an independent computation of the density)
    codes = torch.cat([x.reshape(-1, 2) for x in loader]).double().numpy()
    for k, v in scores.items():
        ref = GaussianMixture(k, covariance_type="full", reg_covar=1e-6, max_iter=200, random_state=4).fit(codes)
        assert v == pytest.approx(ref.score(val.numpy()), rel=1e-6)
    assert sel["chosen"] == max(scores, key=scores.get) >= 3 and g.n_components == sel["chosen"]
    assert g.weights.shape == (sel["chosen"],)
    # the kept mixture is the one a direct fit with the chosen count gives (the grid's fit, not refitted)
    direct = GMMSampler(n_components=sel["chosen"], seed=4).fit_means(torch.from_numpy(codes))
    assert torch.equal(direct.means, g.means) and torch.equal(direct.covariances, g.covariances)
    assert torch.equal(direct.weights, g.weights) and g.fit_info["n_iter"] == direct.fit_info["n_iter"]
    # the chosen mixture survives save/load; config rebuilds it
    save_sampler(g, tmp_path / "g.pt")
    again, _ = load_sampler(tmp_path / "g.pt")
    assert again.n_components == sel["chosen"] and torch.equal(again.means, g.means)
    # no held-out data: the last 10% of the training codes decide, the chosen count is refitted on all
    alone = GMMSampler(components_grid=[1, 3], seed=4).fit_means(train)
    assert alone.fit_info["selection"]["held_out"].startswith("last 10%") and alone.fit_info["num_codes"] == 1500
    with pytest.raises(ValueError, match="components_grid"):
        GMMSampler(components_grid=[0, 2])


def test_two_stage_stops_when_held_out_loss_stops_falling_and_keeps_the_best_weights():
    mu, logvar = mixture_codes(600, 2).float(), torch.full((600, 2), -4.0)
    val = (mixture_codes(200, 3).float(), torch.full((200, 2), -4.0))
    s = TwoStageSampler(steps=400, batch_size=64, lr=3e-2, hidden=[16], patience=2, eval_every=10, seed=1)
    s.fit_codes(mu, logvar, val=val)
    es = s.fit_info["early_stopping"]
    steps = [h[0] for h in es["val_neg_elbo"]]
    values = [h[1] for h in es["val_neg_elbo"]]
    assert steps == sorted(set(steps)) and all(st % 10 == 0 for st in steps[:-1])
    assert es["best_step"] == steps[int(np.argmin(values))]
    assert es["stopped_early"]  # after `patience` checks without improvement (deterministic: seeded)
    assert s.fit_info["steps_run"] == steps[-1] < 400
    assert steps.index(s.fit_info["steps_run"]) - steps.index(es["best_step"]) == 2
    # the kept weights are the best check's: measuring them again with the same noise gives its value
    again = _EarlyStopping(s, val, 1)
    s.vae.train()
    again.check(0)
    s.vae.eval()
    assert again.history[0][1] == pytest.approx(min(values), rel=1e-6)
    assert s.fit_info["sigma2_mean"] > 0 and math.isfinite(s.fit_info["sigma2_mean"])
    # without patience: every step, nothing held out
    plain = TwoStageSampler(steps=30, batch_size=64, hidden=[16], seed=1).fit_codes(mu, logvar)
    assert plain.fit_info["steps_run"] == 30 and "early_stopping" not in plain.fit_info


def test_eval_reports_fid_sampling_spread_and_reconstruction_floor(tmp_path):
    from test_evaluate import make_run

    from arelbo.config import ModelConfig
    from arelbo.evaluate import evaluate_run
    from arelbo.models import build_model

    rng = np.random.default_rng(0)
    images = (rng.random((260, 28, 28)) * 255).astype(np.uint8)
    np.savez(tmp_path / "tiny.npz", train=images[:200], val=images[200:210], test=images[210:])
    cfg = {"arch": "mlp", "latent_dim": 3, "hidden": [16]}
    torch.manual_seed(0)
    run = make_run(tmp_path / "run", build_model(ModelConfig(**cfg), (1, 28, 28)),
                   data={"name": "npz", "root": str(tmp_path / "tiny.npz")}, model_cfg=cfg)
    r = evaluate_run(run, samplers="prior", n_samples=30, k=2, is_examples=4, smoothness_examples=4, fid_repeats=3,
                     kid=False, progress=False, write=False)
    res = r["fid"]["prior"]
    if "fid" not in res:
        pytest.skip(f"FID feature network unavailable: {res}")
    draws = res["sample_draws"]
    assert draws["n"] == 3 and draws["fids"][0] == res["fid"] and len(set(draws["fids"])) == 3
    assert draws["std"] == pytest.approx(float(np.std(draws["fids"], ddof=1)), rel=1e-12)
    assert r["summary"]["fid_prior_draws_std"] == draws["std"]
    rec = r["fid_reconstruction"]
    assert rec["protocol"]["n_generated"] == 50 and r["summary"]["fid_reconstruction"] == rec["fid"] > 0
    off = evaluate_run(run, samplers="prior", n_samples=30, k=2, is_examples=4, smoothness_examples=4, kid=False,
                       fid_reconstruction=False, progress=False, write=False)
    assert off["fid_reconstruction"] is None and "sample_draws" not in off["fid"]["prior"]
