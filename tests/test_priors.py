"""Learnable priors (arelbo.models.priors) against exact or independent references.

- at N(0, I) (a one-component mixture at the origin, a flow at its identity initialisation) the density is the
  standard normal's and the Monte-Carlo rate averages to the closed-form KL within its standard error;
- each prior's samples match its own density: moments of the samples against the same moments computed by
  importance sampling from the density alone (independent routes, compared within their standard errors);
- a linear VAE with a learnable Gaussian prior, trained on the Monte-Carlo rate, still reaches the exact pPCA
  likelihood (the prior's mean and scale are absorbed by the linear maps);
- the loss with a given rate is the -ELBO computed by hand; the default path is the closed form, unchanged.
"""

import math

import pytest
import torch

from arelbo import linear as L
from arelbo.models import VAE, LinearVAE, MLPDecoder, MLPEncoder
from arelbo.models.priors import PRIORS, FlowPrior, MoGPrior, VampPrior, gaussian_entropy, make_prior
from arelbo.objectives import GaussianVAELoss, gaussian_kl

pytestmark = pytest.mark.usefixtures("single_thread")

LOG_2PI = math.log(2 * math.pi)


def _std_normal_log_prob(z):
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * LOG_2PI)


def test_registry_and_errors():
    assert set(PRIORS) >= {"standard", "mog", "vamp", "flow"}
    with pytest.raises(ValueError, match="unknown prior 'gauss'.*flow, mog, standard, vamp"):
        make_prior("gauss", 2)
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['k'\]; valid: \['components'"):
        make_prior("mog", 2, k=3)
    with pytest.raises(ValueError, match="data shape"):
        make_prior("vamp", 2)
    from arelbo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.prior 'gauss' unknown"):
        load_config("mnist-conv", overrides=["model.prior=gauss"])
    with pytest.raises(ConfigError, match=r"model.prior_options \['depth'\] not options of prior 'flow'"):
        load_config("mnist-conv", overrides=["model.prior=flow", "model.prior_options.depth=3"])
    cfg = load_config("mnist-conv", overrides=["model.prior=mog", "model.prior_options.components=3"])
    assert cfg.model.prior_options == {"components": 3}


@pytest.mark.parametrize("prior", [MoGPrior(4, components=1, init_std=0.0), FlowPrior(4, transforms=2, hidden=[16])],
                         ids=["mog-1-at-origin", "flow-identity"])
def test_prior_at_standard_normal_gives_closed_form_kl_in_expectation(prior):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 4, generator=g) * 2
    torch.testing.assert_close(prior.log_prob(z), _std_normal_log_prob(z), rtol=0, atol=1e-5)
    # rate(x) = log q(z|x) - log p(z) at z ~ q: its mean over many draws is KL(q || N(0, I)) in closed form
    mu = torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.0, 0.3, -0.2, 1.5]])
    logvar = torch.tensor([[-1.0, 0.5, -2.0, 0.0], [0.2, -0.3, -1.0, -4.0]])
    m = 40000
    mu_r, lv_r = mu.repeat(m, 1), logvar.repeat(m, 1)
    z = mu_r + torch.randn(mu_r.shape, generator=g) * (0.5 * lv_r).exp()
    with torch.no_grad():
        rate = prior.rate(mu_r, lv_r, z).reshape(m, 2)
    kl = gaussian_kl(mu, logvar).sum(1)
    se = rate.std(0) / math.sqrt(m)
    assert torch.all((rate.mean(0) - kl).abs() < 4 * se), (rate.mean(0), kl, se)
    assert torch.all(se < 0.05)  # the test has power: the standard error is small against the KLs (~3-9 nats)
    # the standard prior says "closed form" instead of estimating
    assert make_prior("standard", 4).rate(mu, logvar, mu) is None


def _encoder_model(q=2, shape=(1, 1, 3)):
    torch.manual_seed(1)
    enc = MLPEncoder(shape, q, [8])
    return VAE(enc, MLPDecoder(shape, q, [8]), q, shape)


def _random_priors():
    torch.manual_seed(3)
    mog = MoGPrior(2, components=3, init_std=2.0)
    with torch.no_grad():
        mog.logvars.copy_(0.5 * torch.randn(3, 2))
        mog.logits.copy_(torch.randn(3))
    model = _encoder_model()
    vamp = VampPrior(2, (1, 1, 3), components=4, init_mean=0.0, init_std=2.0)
    torch.manual_seed(5)
    flow = FlowPrior(2, transforms=2, hidden=[16, 16], identity_init=False)
    return {"mog": (mog, None), "vamp": (vamp, model.encoder), "flow": (flow, None)}


@pytest.mark.parametrize("name", ["mog", "vamp", "flow"])
def test_samples_match_the_prior_density(name):
    """E_p[f(z)] from the prior's own samples equals E_g[f(z) p(z) / g(z)] from its density alone (importance
    sampling from a broad Gaussian g), for several f; and the density integrates to 1."""
    prior, encoder = _random_priors()[name]
    n = 200000
    with torch.no_grad():
        s = prior.sample(n, torch.Generator().manual_seed(0), encoder).double()
        centre, spread = s.mean(0), s.std(0)
        g = torch.Generator().manual_seed(1)
        y = centre + 2.5 * spread * torch.randn(n, 2, generator=g, dtype=torch.float64)
        log_g = (-0.5 * ((y - centre) / (2.5 * spread)).pow(2) - torch.log(2.5 * spread) - 0.5 * LOG_2PI).sum(1)
        w = (prior.log_prob(y.float(), encoder).double() - log_g).exp()
        # not secretly N(0, I): the density differs from the standard normal's
        assert (prior.log_prob(y[:1000].float(), encoder).double() - _std_normal_log_prob(y[:1000])).abs().max() > 0.5
    assert abs(w.mean() - 1) < 5 * w.std() / math.sqrt(n)

    def features(z):
        return torch.stack([z[:, 0], z[:, 1], z[:, 0] ** 2, z[:, 1] ** 2, z[:, 0] * z[:, 1],
                            (z[:, 0] > centre[0]).double()], 1)

    fs, fy = features(s), features(y) * w[:, None]
    diff = fs.mean(0) - fy.mean(0)
    se = (fs.var(0) / n + fy.var(0) / n).sqrt()
    assert torch.all(diff.abs() < 5 * se), (name, diff, se)


def test_vamp_standalone_is_the_same_density_without_the_encoder():
    prior, encoder = _random_priors()["vamp"]
    z = torch.randn(20, 2)
    standalone = prior.standalone(encoder)
    assert standalone.name == "mog"
    torch.testing.assert_close(standalone.log_prob(z), prior.log_prob(z, encoder), rtol=0, atol=1e-5)
    # batch norm in the encoder is frozen for the pseudo-inputs: its running statistics never move
    shape = (1, 4, 4)
    from arelbo.models import ConvEncoder

    enc = ConvEncoder(shape, 2, [4], norm="batch").train()
    vamp = VampPrior(2, shape, components=3)
    before = enc.features[1].running_mean.clone()
    vamp.log_prob(torch.randn(5, 2), enc).sum().backward()
    assert torch.equal(enc.features[1].running_mean, before) and enc.features[1].training
    assert vamp.pseudo_inputs.grad is not None and vamp.pseudo_inputs.grad.abs().sum() > 0


def test_loss_with_a_given_rate_is_the_hand_computed_elbo():
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    mu, logvar = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    rate = torch.rand(5, generator=g, dtype=torch.float64) * 10
    for policy, kwargs in [("ar", {}), ("fixed", {"sigma2": 0.3}), ("ar-per-sample", {}), ("learned", {}), ("beta", {"beta": 2.0})]:
        loss_fn = GaussianVAELoss(policy, **kwargs)
        out = loss_fn(x, x_hat, mu, logvar, rate=rate)
        sq = (x - x_hat).pow(2)
        s2 = {"ar": sq.mean(), "fixed": torch.tensor(0.3, dtype=torch.float64), "ar-per-sample": sq.mean(1, keepdim=True),
              "learned": torch.tensor(1.0, dtype=torch.float64), "beta": torch.tensor(1.0, dtype=torch.float64)}[policy]
        expected = (sq / (2 * s2) + 0.5 * torch.log(2 * math.pi * s2)).sum(1) + rate
        torch.testing.assert_close(out.neg_elbo, expected.mean(), rtol=1e-12, atol=1e-12)
        assert torch.equal(out.rate, rate) and torch.isnan(out.kl_per_dim).all() and out.kl_per_dim.shape == (3,)
    # no rate: exactly the closed-form KL to N(0, I), as always
    out = GaussianVAELoss("ar")(x, x_hat, mu, logvar)
    assert torch.equal(out.rate, gaussian_kl(mu, logvar).sum(1))
    with pytest.raises(ValueError, match=r"rate must have shape \(B,\) = \(5,\)"):
        GaussianVAELoss("ar")(x, x_hat, mu, logvar, rate=rate[:3])


def test_entropy_closed_form():
    logvar = torch.tensor([[0.3, -1.2]])
    expected = torch.distributions.Normal(torch.zeros(2), (0.5 * logvar[0]).exp()).entropy().sum()
    torch.testing.assert_close(gaussian_entropy(logvar)[0], expected)


def test_linear_vae_with_learnable_gaussian_prior_reaches_ppca():
    """One learnable Gaussian (a one-component mixture, mean and diagonal variance learned, started away from
    N(0, I)) with the Monte-Carlo rate: -ELBO reaches the pPCA NLL; the model's marginal N(W m, W S W^T + sigma2 I)
    is the pPCA MLE. Tolerance 2e-3 nats against a measured gap of 3e-5 after 1500 cosine-annealed Adam steps (the
noise-integrated distortion; the rate is the library's one-draw Monte-Carlo estimate)."""
    spectrum, q, n = (5.0, 3.0, 1.5, 0.8, 0.5, 0.3, 0.2, 0.1), 4, 1000
    x = L.gaussian_data(spectrum, n, seed=0)
    cov = L.second_moment(x)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        prior = MoGPrior(q, components=1, init_std=1.0)
        with torch.no_grad():
            prior.logvars.fill_(math.log(3.0))
        model = LinearVAE((8,), q, prior=prior).double()
        loss_fn = GaussianVAELoss("ar")
        steps, lr = 1500, 0.05
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 1e-3)
        for _ in range(steps):
            mu, logvar = model.encode(x)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            loss = loss_fn.from_sq_err(model.expected_sq_err(x), mu, logvar, rate=model.rate(mu, logvar, z)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        mu, logvar = model.encode(x)
        m, lv = prior.means[0].double(), prior.logvars[0].double()
        # exact KL(N(mu, diag e^logvar) || N(m, diag e^lv)), by hand
        kl = 0.5 * (lv - logvar + (logvar.exp() + (mu - m).pow(2)) / lv.exp() - 1).sum(1)
        sq = model.expected_sq_err(x)
        s2 = sq.mean()
        neg_elbo = float((0.5 * 8 * (math.log(2 * math.pi * s2) + 1) + kl).mean())
        ppca = L.ppca_nll(cov, q)
        assert neg_elbo >= ppca - 1e-9
        assert neg_elbo == pytest.approx(ppca, abs=2e-3)
        # the prior moved away from where it started, and the linear maps absorbed it
        assert (lv - math.log(3.0)).abs().max() > 0.05 or (m.abs().max() > 0.05)
        W_eff = model.W.double() * (0.5 * lv).exp()
        assert L.linear_gaussian_nll(W_eff, s2, cov) == pytest.approx(ppca, abs=2e-3)


# --------------------------------------------------------------------------------------------------------------
# Training, resume, evaluation and the CLI with a learnable prior (tiny problems)

N_TRAIN = 320  # 10 steps per epoch of 32


def _tiny(prior, *extra):
    from arelbo.config import load_config

    return load_config("linear-gaussian", overrides=[
        "objective.policy=ar", "model.arch=mlp", "model.hidden=[16]", "model.latent_dim=3", "model.out_activation=none",
        f"model.prior={prior}",
        f"data.options={{n_train: {N_TRAIN}, n_val: 96, n_test: 64, eigenvalues: [3, 2, 1, 0.5, 0.2, 0.1]}}",
        "data.batch_size=32", "data.eval_batch_size=40", "train.epochs=2", "train.log_every_n_steps=1", "train.schedule=none",
        "train.weight_decay=0.1", *extra])


@pytest.fixture(scope="module")
def gaussian_splits():
    from arelbo.data import load_dataset

    return load_dataset("gaussian", n_train=N_TRAIN, n_val=96, n_test=64, eigenvalues=[3, 2, 1, 0.5, 0.2, 0.1])


@pytest.mark.parametrize("prior,options", [("mog", ["model.prior_options.components=3"]),
                                           ("vamp", ["model.prior_options={components: 4, init_mean: 0.0}"]),
                                           ("flow", ["model.prior_options={transforms: 2, hidden: [8]}"])])
def test_train_and_resume_exactly_with_a_learnable_prior(tmp_path, gaussian_splits, prior, options):
    pytest.importorskip("lightning")
    from arelbo import runs
    from arelbo.models import build_model
    from arelbo.train import fit, resume

    cfg = _tiny(prior, *options)
    straight = fit(cfg, tmp_path / "straight", splits=gaussian_splits, progress=False)
    split = fit(_tiny(prior, *options, "train.epochs=1"), tmp_path / "split", splits=gaussian_splits, progress=False)
    resume(split, ["train.epochs=2"], splits=gaussian_splits, progress=False)
    a, b = (runs.load_checkpoint(runs.checkpoint_path(d, "last")) for d in (straight, split))
    assert a["model"].keys() == b["model"].keys() and a["global_step"] == b["global_step"] == 20
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the prior's parameters are in the checkpoint, were trained (moved from their initialisation under the run's
    # seed) and are in the optimiser without weight decay
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg.model, (6, 1, 1)).state_dict()
    prior_keys = [k for k, v in init.items() if k.startswith("prior.") and v.is_floating_point()
                  and not k.endswith(("base.loc", "base.scale"))]
    assert prior_keys and any(not torch.equal(init[k], a["model"][k]) for k in prior_keys)
    groups = a["optimizer_states"][0]["param_groups"]
    model, _, _ = runs.load_model(straight, "last")
    n_prior = sum(1 for p in model.prior.parameters() if p.requires_grad)
    assert groups[-1]["weight_decay"] == 0.0 and len(groups[-1]["params"]) == n_prior
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    # validation: a finite Monte-Carlo KL, no KL per dimension
    val = [r for r in runs.read_jsonl(straight / "metrics.jsonl") if r["split"] == "val"]
    assert val[-1]["kl_per_dim"] is None and math.isfinite(val[-1]["kl"]) and math.isfinite(val[-1]["neg_elbo"])
    assert model.prior.name == prior


def test_evaluate_a_learnable_prior_run(tmp_path, gaussian_splits):
    """Evaluation of a vamp run: Monte-Carlo rate (no KL per dimension), IS-NLL with log p(z) under the learned
    prior, and the prior sampler drawing from the learned prior (a saved standalone copy, reused)."""
    pytest.importorskip("lightning")
    from arelbo import runs
    from arelbo.evaluate import evaluate_run, format_table, sampler_file
    from arelbo.metrics.likelihood import importance_sampled_nll
    from arelbo.samplers import load_sampler
    from arelbo.train import fit

    run_dir = fit(_tiny("vamp", "model.prior_options.components=4", "train.epochs=1"), tmp_path / "run",
                  splits=gaussian_splits, progress=False)
    kwargs = dict(which="last", samplers="prior,flow", sampler_options={"flow": {"max_epochs": 3}}, n_samples=0, k=5,
                  is_examples=16, smoothness_examples=8, mi_examples=32, progress=False)
    res = evaluate_run(run_dir, **kwargs)
    assert res["collapse"]["kl_per_dim"] is None and res["run"]["prior"] == "vamp"
    assert "Monte-Carlo" in res["protocol"]["rate"] and math.isfinite(res["summary"]["kl_total"])
    assert "not defined under a non-factorised prior" in format_table(res)
    # the IS-NLL uses the learned prior: recompute it independently with the same generator stream
    model, _, _ = runs.load_model(run_dir, "last")
    x = gaussian_splits.test[:16].float()
    # standard-prior IS-NLL of the same model differs: the prior enters log p(x)
    from arelbo.models.priors import StandardPrior

    g = torch.Generator().manual_seed(7)
    learned = importance_sampled_nll(model, x, 0.5, k=5, generator=g)
    model.prior = StandardPrior(3)
    standard = importance_sampled_nll(model, x, 0.5, k=5, generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(learned, standard)
    # the saved prior sampler draws from the learned prior (the same density as the model's vamp prior)
    model, _, _ = runs.load_model(run_dir, "last")
    sampler, _ = load_sampler(sampler_file(run_dir, "prior"))
    z = sampler.sample(5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sampler.prior.log_prob(z), model.log_prior(z), rtol=0, atol=1e-5)
        expected = model.sample_latent(5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, expected)
    assert res["protocol"]["samplers"]["flow"]["fit_info"]["epochs"] <= 3
    again = evaluate_run(run_dir, **kwargs)
    assert again["protocol"]["samplers"]["prior"]["source"] == "reused"
    assert again["protocol"]["samplers"]["flow"]["source"] == "reused"


def test_cli_vamp_prior_trains_samples_evaluates_and_flow_sampler(tmp_path, capsys):
    """`--set model.prior=vamp` from the command line: train, sample from the learned prior, evaluate, then
    `--sampler flow` in eval and sample (a tiny conv VAE with batch norm on 8x8 blobs)."""
    pytest.importorskip("lightning")
    import numpy as np
    import yaml
    from PIL import Image

    from arelbo import cli, runs
    from arelbo.imagegrid import make_grid
    from arelbo.samplers import load_sampler

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    centres = rng.uniform(1, 7, size=(60, 2))
    images = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 3.0)
    np.savez(tmp_path / "blobs.npz", x=(images * 255).astype(np.uint8))
    cfg = {"data": {"name": "npz", "root": str(tmp_path / "blobs.npz"), "batch_size": 16, "eval_batch_size": 8},
           "model": {"arch": "conv", "hidden": [4, 8], "latent_dim": 2, "norm": "batch"},
           "train": {"epochs": 1, "log_every_n_steps": 1, "n_samples": 4}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"

    def arelbo(*argv):
        return cli.main([str(a) for a in argv])

    assert arelbo("train", "--config", tmp_path / "tiny.yaml", "--set", "model.prior=vamp", "--set",
                  "model.prior_options.components=3", "--out", run_dir, "--quiet") == 0
    model, _, ckpt = runs.load_model(run_dir, "last")
    assert model.prior.name == "vamp" and ckpt["model"]["prior.pseudo_inputs"].shape == (3, 1, 8, 8)
    assert (run_dir / "samples.png").is_file()
    # `arelbo sample` decodes draws of the learned prior
    assert arelbo("sample", run_dir, "--n", 6, "--seed", 3, "--checkpoint", "last") == 0
    written = np.asarray(Image.open(run_dir / "samples.png"))
    with torch.no_grad():
        expected = make_grid(model.decode(model.sample_latent(6, torch.Generator().manual_seed(3))))
    np.testing.assert_array_equal(written.reshape(expected.shape), expected)
    capsys.readouterr()
    assert arelbo("eval", run_dir, "--which", "last", "--sampler", "prior,flow", "--sampler-option", "flow.max_epochs=2",
                  "--no-fid", "--k", 2, "--is-examples", 4, "--smoothness-examples", 4, "--mi-examples", 8,
                  "--no-progress") == 0
    out = capsys.readouterr().out
    assert "prior vamp" in out and "not defined under a non-factorised prior" in out and "flow (fitted)" in out
    assert arelbo("sample", run_dir, "--sampler", "flow", "--checkpoint", "last", "--n", 4, "--seed", 1) == 0
    flow, _ = load_sampler(run_dir / "samplers" / "flow.pt")
    with torch.no_grad():
        expected = make_grid(model.decode(flow.sample(4, torch.Generator().manual_seed(1))))
    written = np.asarray(Image.open(run_dir / "samples-flow.png"))
    np.testing.assert_array_equal(written.reshape(expected.shape), expected)


def test_compare_with_a_learnable_prior_and_the_flow_column(tmp_path, capsys):
    """`arelbo compare --set model.prior=mog --flow`: every run trains with the mog prior, its evaluation draws the
    prior column from the learned prior and fits the flow sampler; results.json has the FID (flow) column."""
    pytest.importorskip("lightning")
    import json

    from arelbo import runs
    from arelbo.cli import main

    tiny = ["data.options={n_train: 128, n_val: 32, n_test: 32, eigenvalues: [3, 2, 1, 0.5, 0.2, 0.1]}",
            "data.batch_size=32", "data.eval_batch_size=32", "model.arch=mlp", "model.hidden=[8]", "model.latent_dim=3",
            "model.out_activation=none", "train.schedule=none", "model.prior=mog", "model.prior_options.components=2"]
    out = tmp_path / "st"
    args = ["compare", "--preset", "linear-gaussian", "--out", str(out), *sum((["--set", o] for o in tiny), []),
            "--policies", "ar", "--seeds", "0", "--epochs", "1", "--steps-per-epoch", "2", "--eval-samples", "0",
            "--is-examples", "4", "--k", "2", "--no-gmm", "--flow", "--quiet"]
    assert main([*args, "--dry-run"]) == 0
    assert '"flow": true' in capsys.readouterr().out
    assert main(args) == 0
    run_dir = out / "runs" / "ar-s0"
    assert runs.read_config(run_dir).model.prior == "mog"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["protocol"]["samplers"]) == {"prior", "flow"}
    assert metrics["protocol"]["samplers"]["prior"]["fit_info"] == {"prior": "mog"}
    assert metrics["collapse"]["kl_per_dim"] is None
    results = json.loads((out / "results.json").read_text())
    assert "fid_flow" in [c["key"] for c in results["columns"]]
    assert results["policies"][0]["n_done"] == 1
    cell = results["policies"][0]["cells"][0]
    assert "fid_flow" in cell["values"] and cell["unavailable"]["fid_flow"]  # no images here: the reason is kept


def test_priors_study_script_plans_four_studies(tmp_path):
    """benchmarks/study_mnist_priors.sh --dry-run: one study per prior, each in its own runs folder (the standard
    prior's apart from the evidence plan's, whose evaluations it must not replace), the flow column on, the best
    fixed sigma^2 chosen by FIXED; SPECS/SEEDS a subset and LIGHT=1 the lighter evaluation."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import arelbo

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "study_mnist_priors.sh"
    env = {**os.environ, "ARELBO": f"{sys.executable} -m arelbo.cli", "FIXED": "0.03",
           "PYTHONPATH": os.pathsep.join([str(Path(arelbo.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}

    def plan(**extra):
        proc = subprocess.run(["bash", str(script), "", str(tmp_path / "ev"), "2", "--dry-run"], capture_output=True,
                              text=True, env={**env, **extra}, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and line.split()[-1] == "yet"]
        return proc.stdout, runs

    out, runs = plan()
    assert len(runs) == 4 * 4 * 3 and "fixed-0.03-s2" in runs and "learned-mle-lr0.01-s0" in runs
    for prior in ("standard", "mog", "vamp", "flow"):
        assert f"  prior: {prior}\n" in out
    for folder in ("runs-standard", "runs-mog", "runs-vamp", "runs-flow"):
        assert '"runs_dir": "' + str(tmp_path / "ev" / folder) + '"' in out
    assert out.count('"flow": true') == 4 and out.count('"fid_repeats": 3') == 4
    assert out.count('"two_stage_all": true') == 4
    assert not (tmp_path / "ev").exists()  # a dry run copies nothing

    out, runs = plan(LIGHT="1", SPECS="ar,learned", SEEDS="1")
    assert sorted(runs) == sorted(["ar-s1", "learned-s1"] * 4)
    assert out.count('"fid_repeats": 1') == 4 and out.count('"two_stage_all": false') == 4
    assert out.count('"snapshots": false') == 4 and out.count('"is_examples": 0') == 4
    assert out.count('"flow": true') == 4
    bad = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "DATA_ROOT" in bad.stderr


def test_linear_run_with_a_learnable_prior_reports_no_standard_normal_exact_nll(tmp_path, gaussian_splits):
    """-log N(x; b, W W^T + sigma2) is a linear VAE's marginal under N(0, I) only: with a mog prior whose mean
    moved, it is not the model's likelihood, so evaluation must not report it as "exact"; the standard prior does."""
    pytest.importorskip("lightning")
    from arelbo.evaluate import evaluate_run
    from arelbo.train import fit

    kwargs = dict(which="last", samplers="prior", n_samples=0, k=5, is_examples=16, smoothness_examples=8,
                  mi_examples=32, progress=False)
    for prior, has_exact in (("standard", True), ("mog", False)):
        run_dir = fit(_tiny(prior, "model.arch=linear", "train.epochs=1"), tmp_path / prior, splits=gaussian_splits,
                      progress=False)
        res = evaluate_run(run_dir, **kwargs)
        assert (res["likelihood"]["exact_nll"] is not None) == has_exact, prior


def test_wrongly_typed_prior_and_sampler_options_are_one_line_errors():
    """Option types are read off each class's defaults: a wrong type names the option (it was a TypeError deep in
    the constructor, or silently converted: components 2.7 -> 2); right types still build."""
    from arelbo.models.priors import make_prior
    from arelbo.samplers import make_sampler

    with pytest.raises(ValueError, match=r"prior 'flow': option hidden must be a list of integers .* got 64"):
        make_prior("flow", 3, hidden=64)
    with pytest.raises(ValueError, match=r"prior 'mog': option components must be an integer .* got 2.7"):
        make_prior("mog", 3, components=2.7)
    with pytest.raises(ValueError, match=r"sampler 'two-stage': option steps must be an integer .* got 'x'"):
        make_sampler("two-stage", steps="x")
    with pytest.raises(ValueError, match=r"sampler 'flow': option hidden must be a list"):
        make_sampler("flow", hidden=64)
    assert make_prior("mog", 3, components=2).components == 2
    make_sampler("two-stage", hidden=[8, 8], steps=3)


def test_bench_train_times_a_training_step_of_every_prior(gaussian_splits):
    """benchmarks/bench_train.py --priors: every registered prior timed, the standard prior the unit; the timed
    step trains the prior (its parameters move: the Monte-Carlo rate's cost is in the timing), and its first loss
    is the objective at the model's own rate."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = _tiny("standard")
    batches = list(gaussian_splits.train[:64].float().split(32))
    res = bench.bench_priors(cfg, gaussian_splits.shape, batches, repeats=2)
    assert set(res["prior_step_ms"]) == set(PRIORS)
    assert res["prior_step_ratio_to_standard"]["standard"] == 1.0
    assert all(len(v) == 2 and min(v) > 0 for v in res["prior_step_ms_per_repeat"].values())
    for name in sorted(set(PRIORS) - {"standard"}):
        step, model = bench.make_step(cfg, gaussian_splits.shape, "ar", prior=name)
        before = [p.detach().clone() for p in model.prior.parameters()]
        x = batches[0]
        torch.manual_seed(1)
        mu, logvar = model.encode(x)
        z = model.reparameterize(mu, logvar)
        expected = GaussianVAELoss("ar")(x, model.decode(z), mu, logvar, rate=model.rate(mu, logvar, z)).loss
        torch.manual_seed(1)
        loss = step(x)
        torch.testing.assert_close(loss, expected)
        assert before and any(not torch.equal(b, p) for b, p in zip(before, model.prior.parameters())), name
