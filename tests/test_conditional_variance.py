"""The conditional variance sigma2(z) (``ar-conditional``, ``learned-conditional``, ``model.variance_head``).

References are independent of the code under test: torch.distributions.Normal for the Gaussian likelihood with a
per-element variance, a closed-form heteroscedastic noise for the recovery test, the isotropic IS-NLL path for
the model-variance one, and hand-built losses for the gradient checks.
"""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from arelbo.config import ConfigError, ModelConfig, RunConfig
from arelbo.metrics import ELBOAccumulator, OwnVariance, importance_sampled_nll
from arelbo.models import build_model
from arelbo.objectives import POLICIES, GaussianVAELoss, make_policy

pytestmark = pytest.mark.usefixtures("single_thread")

CONDITIONAL = ("ar-conditional", "learned-conditional")
SHAPE = (1, 8, 8)
D = 64


def mlp(head=True, latent=2, hidden=(32,), seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="mlp", hidden=list(hidden), latent_dim=latent, out_activation="none", variance_head=head)
    return build_model(cfg, SHAPE).double()


# ---- the synthetic heteroscedastic data: x_d = a_d t + sqrt(v_d(t)) eps, t ~ U(-1, 1) ------------------------------


def true_variance(t):
    """v_d(t) = 0.01 (1 + 4 u w_d), u = (1 + t) / 2, w_d from 0 to 1 across elements: element 0 has a constant
    variance 0.01, the last one goes from 0.01 to 0.05 with the latent factor."""
    w = torch.linspace(0, 1, D, dtype=torch.float64)
    return 0.01 * (1 + 4 * ((1 + t) / 2)[:, None] * w)


def heteroscedastic(n, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    a = torch.linspace(0.5, 1.5, D, dtype=torch.float64)
    x = a * t[:, None] + true_variance(t).sqrt() * torch.randn(n, D, generator=g, dtype=torch.float64)
    return x.view(n, *SHAPE), t


RECOVERY_TOLERANCE = 0.12  # mean relative error |sigma2(mu(x)) / v(t) - 1| over test examples and elements


def test_ar_conditional_recovers_a_known_heteroscedastic_variance():
    """2000 Adam steps (a few seconds, float64 MLP) of ``ar-conditional`` on x_d = a_d t + sqrt(v_d(t)) eps with
    v_d(t) from 0.01 to 0.05 (a 5x range that depends on the latent factor t). On held-out data the fitted
    sigma2(z) at z = mu(x) recovers v_d(t) within a mean relative error of 12 % (measured: 6.9 %; part of it is
    the encoder's own uncertainty about t, which the residuals of a VAE carry by design, about v / D). Any
    variance that ignores z fails it: the mean over t per element is off by 27 %, one shared value by 41 %."""
    x, _ = heteroscedastic(4096, seed=0)
    model = mlp()
    loss_fn = GaussianVAELoss("ar-conditional").attach(model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(2000):
        idx = torch.randint(0, len(x), (256,), generator=g)
        out = loss_fn(x[idx], model(x[idx]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    x_test, t_test = heteroscedastic(2048, seed=1)
    with torch.no_grad():
        fitted = model(x_test, sample=False).x_logvar.flatten(1).exp()
    truth = true_variance(t_test)
    error = float((fitted / truth - 1).abs().mean())
    assert error < RECOVERY_TOLERANCE, f"sigma2(z) off the true variance by {error:.3f} on average"
    # what a variance that ignores z achieves on the same data: it must fail the same tolerance
    per_element = (truth.mean(0) / truth - 1).abs().mean()
    assert float(per_element) > 2 * RECOVERY_TOLERANCE
    # the head fits the z-dependence, not only the level: the fitted slope in t of the last element is ~0.04
    slope = np.polyfit(t_test.numpy(), fitted[:, -1].numpy(), 1)[0] * 2  # d sigma2 / d u, u = (1 + t) / 2
    assert slope == pytest.approx(0.04, rel=0.25)


# ---- the loss: value, gradients, floor, errors -----------------------------------------------------------------


def batch(seed=3, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g, dtype=torch.float64)


def with_random_head(model, seed=4):
    """Give the head non-trivial weights, so sigma2(z) varies with z and element."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.variance_head.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("policy", CONDITIONAL)
def test_elbo_equals_the_gaussian_log_likelihood_with_per_element_variance(policy):
    model = with_random_head(mlp())
    loss_fn = GaussianVAELoss(policy)
    x = batch()
    out_model = model(x, noise=lambda like: torch.zeros_like(like))
    out = loss_fn(x, out_model)
    std = out_model.x_logvar.flatten(1).exp().sqrt()
    log_lik = Normal(out_model.x_hat.flatten(1), std).log_prob(x.flatten(1)).sum(1)
    expected = (-log_lik + out_model.rate).mean()
    torch.testing.assert_close(out.neg_elbo, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)  # the head's fit adds gradient, not value
    torch.testing.assert_close(out.sigma2, out_model.x_logvar.flatten(1).exp(), rtol=1e-14, atol=0)


def _grads(model, loss, params):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def test_the_heads_update_leaves_the_means_gradient_unchanged():
    """ar-conditional's gradient on every parameter but the head's equals (exactly) that of the ELBO at the
    detached sigma2(z) without the head's term; the head's gradient is that of -log N(r; 0, sigma2(z)) with the
    residual r detached (torch.distributions.Normal). learned-conditional, trained jointly, changes the mean's
    gradient: the check can fail."""
    model = with_random_head(mlp())
    head_ids = {id(p) for p in model.variance_head.parameters()}
    mean_params = [p for p in model.parameters() if id(p) not in head_ids]
    head_params = list(model.variance_head.parameters())
    x = batch()
    noise = lambda like: torch.randn(like.shape, generator=torch.Generator().manual_seed(5), dtype=like.dtype)  # noqa: E731

    loss_fn = GaussianVAELoss("ar-conditional").attach(model)
    full = _grads(model, loss_fn(x, model(x, noise=noise)).loss, [*mean_params, *head_params])

    out = model(x, noise=noise)  # the same pass; the reference: the ELBO at the detached sigma2(z), by hand
    s = out.x_logvar.flatten(1).exp().detach()
    resid = x.flatten(1) - out.x_hat.flatten(1)
    without_head = ((resid.pow(2) / (2 * s) + 0.5 * (math.log(2 * math.pi) + s.log())).sum(1) + out.rate).mean()
    reference = _grads(model, without_head, mean_params)
    for g, g_ref in zip(full[: len(mean_params)], reference):
        assert torch.equal(g, g_ref)

    out = model(x, noise=noise)
    r = (x.flatten(1) - out.x_hat.flatten(1)).detach()
    head_nll = -Normal(0.0, out.x_logvar.flatten(1).exp().sqrt()).log_prob(r).sum(1).mean()
    for g, g_ref in zip(full[len(mean_params):], _grads(model, head_nll, head_params)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-14)
        assert float(g.abs().max()) > 0

    joint_fn = GaussianVAELoss("learned-conditional")
    joint_fn.policy.attach = lambda m: None  # keep the random head (attach would set it to its initial value)
    joint_fn.attach(model)
    model.variance_head.detach_input = False
    joint = _grads(model, joint_fn(x, model(x, noise=noise)).loss, mean_params)
    assert not all(torch.equal(a, b) for a, b in zip(joint, reference))


@pytest.mark.parametrize("policy", CONDITIONAL)
def test_floor_holds_and_keeps_the_gradient_that_lifts_sigma2(policy):
    model = mlp()
    floor = 1e-4
    loss_fn = GaussianVAELoss(policy, sigma2_floor=floor)
    with torch.no_grad():
        model.variance_head.layer.bias.fill_(math.log(1e-12))
    x = batch()
    out = loss_fn(x, model(x))
    assert float(out.sigma2.min()) == pytest.approx(floor, rel=1e-12)
    assert out.loss.isfinite()
    model.zero_grad()
    out.loss.backward()
    assert float(model.variance_head.layer.bias.grad.max()) < 0  # descent raises log sigma2 back towards the data
    # the held-out -ELBO and the IS-NLL floor the model's sigma2(z) at the same value
    acc = ELBOAccumulator(per_sample_floor=floor)
    with torch.no_grad():
        o = model(x, noise=lambda like: torch.zeros_like(like))
        acc.update_output((x.flatten(1) - o.x_hat.flatten(1)).pow(2), o)
    res = acc.result(loss_fn.policy)
    assert res.sigma2_mean == pytest.approx(floor, rel=1e-12)


def test_a_model_without_a_variance_head_is_a_clear_error():
    x = batch()
    for policy in CONDITIONAL:
        with pytest.raises(ValueError, match="model.variance_head: true") as err:
            GaussianVAELoss(policy)(x, mlp(head=False)(x))
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match="model.variance_head: true"):
            GaussianVAELoss(policy).attach(mlp(head=False))
        with pytest.raises(ConfigError, match=r"needs the decoder's log-variance: set model.variance_head: true"):
            RunConfig.from_dict({"objective": {"policy": policy}})
    with pytest.raises(ConfigError, match="policy 'ar' does not read the decoder's log-variance.*ar-conditional"):
        RunConfig.from_dict({"model": {"variance_head": True}})
    with pytest.raises(ConfigError, match="'linear' decoder has no variance head"):
        RunConfig.from_dict({"model": {"arch": "linear", "variance_head": True}})


def test_policies_are_registered_with_their_options_and_held_out_rule():
    assert {"ar-conditional", "learned-conditional"} <= set(POLICIES)
    ar, learned = POLICIES["ar-conditional"], POLICIES["learned-conditional"]
    assert ar.needs_x_logvar and learned.needs_x_logvar and ar.is_density and learned.is_density
    assert (ar.sigma2_kind, learned.sigma2_kind) == ("estimated", "learned")
    assert set(ar.options()) == {"log_sigma2_lr"} and set(learned.options()) == {"init_sigma2", "log_sigma2_lr"}
    held = make_policy("ar-conditional").held_out_sigma2(None)
    assert held.value is None and held.kind == "conditional" and "own sigma2(z)" in held.source
    with pytest.raises(ValueError, match="initial sigma2 must be > 0"):
        make_policy("learned-conditional", init_sigma2=0)
    # learned-conditional's initial value is the head's bias (weight 0): sigma2(z) = init_sigma2 for every z
    model = with_random_head(mlp())
    GaussianVAELoss("learned-conditional", init_sigma2=0.05).attach(model)
    torch.testing.assert_close(model(batch()).x_logvar.exp(), torch.full((6, *SHAPE), 0.05, dtype=torch.float64))
    assert model.variance_head.detach_input is False
    GaussianVAELoss("ar-conditional").attach(model)
    assert model.variance_head.detach_input is True


def test_conv_decoder_head_and_no_head_models_keep_their_weights():
    cfg = dict(arch="conv", hidden=[4, 8], latent_dim=3)
    torch.manual_seed(0)
    plain = build_model(ModelConfig(**cfg), (3, 12, 12))
    torch.manual_seed(0)
    headed = build_model(ModelConfig(**cfg, variance_head=True), (3, 12, 12))
    extra = set(headed.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("decoder.variance_head.") for k in extra)
    assert all(torch.equal(v, headed.state_dict()[k]) for k, v in plain.state_dict().items())
    x = torch.rand(2, 3, 12, 12)
    out = headed(x, sample=False)
    assert out.x_logvar.shape == x.shape and torch.equal(out.x_hat, plain(x, sample=False).x_hat)
    assert plain(x).x_logvar is None


# ---- evaluation: the -ELBO and the IS-NLL at the model's own sigma2(z) ------------------------------------------


def test_held_out_elbo_uses_the_models_own_sigma2():
    model = with_random_head(mlp())
    x = batch(n=9)
    acc = ELBOAccumulator()
    expected = []
    with torch.no_grad():
        for rows in (slice(0, 4), slice(4, 9)):
            out = model(x[rows], noise=lambda like: torch.zeros_like(like))
            acc.update_output((x[rows].flatten(1) - out.x_hat.flatten(1)).pow(2), out)
            std = out.x_logvar.flatten(1).exp().sqrt()
            expected.append(-Normal(out.x_hat.flatten(1), std).log_prob(x[rows].flatten(1)).sum(1) + out.rate)
    res = acc.result(make_policy("ar-conditional"))
    assert res.neg_elbo == pytest.approx(float(torch.cat(expected).mean()), rel=1e-12)
    assert res.sigma2 is None and "own sigma2(z)" in res.sigma2_source


def test_is_nll_with_the_models_variance_equals_the_isotropic_path_for_a_constant_head():
    """A head with weight 0 and bias log 0.07 gives sigma2(z) = 0.07 for every z: the IS-NLL at the model's own
    variance equals the existing isotropic IS-NLL at 0.07 (same draws), and changes when the head varies."""
    model = mlp()
    with torch.no_grad():
        model.variance_head.layer.bias.fill_(math.log(0.07))
    x = batch()
    own = importance_sampled_nll(model, x, OwnVariance(1e-6), k=7, generator=torch.Generator().manual_seed(0))
    iso = importance_sampled_nll(model, x, 0.07, k=7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(own, iso, rtol=1e-12, atol=1e-10)
    with_random_head(model)
    varied = importance_sampled_nll(model, x, OwnVariance(1e-6), k=7, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(varied, iso)


# ---- training, resume, evaluation and studies through the pipeline ----------------------------------------------

N_TRAIN, BATCH = 320, 32  # 10 steps per epoch


def tiny(*extra, policy="ar-conditional"):
    pytest.importorskip("lightning")
    from arelbo.config import load_config

    return load_config("linear-gaussian", overrides=[
        f"objective.policy={policy}", "model.variance_head=true", "model.arch=mlp", "model.hidden=[16]",
        "model.latent_dim=3", "model.out_activation=none",
        f"data.options={{n_train: {N_TRAIN}, n_val: 96, n_test: 32, eigenvalues: [3, 2, 1, 0.5, 0.2, 0.1]}}",
        f"data.batch_size={BATCH}", "data.eval_batch_size=40", "train.schedule=none", "train.epochs=2",
        "train.log_every_n_steps=1", "train.n_samples=0", *extra])


@pytest.mark.parametrize("policy, extra", [
    ("ar-conditional", ()),
    ("learned-conditional", ("objective.options.init_sigma2=0.5", "objective.options.log_sigma2_lr=0.02")),
])
def test_conditional_policies_train_record_their_options_and_resume_exactly(tmp_path, policy, extra):
    from arelbo import runs
    from arelbo.train import fit, resume

    straight = fit(tiny(*extra, policy=policy), tmp_path / "straight", progress=False)
    split = fit(tiny(*extra, "train.epochs=1", policy=policy), tmp_path / "split", progress=False)
    resume(split, ["train.epochs=2"], progress=False)
    a = runs.load_checkpoint(runs.checkpoint_path(straight, "last"))
    b = runs.load_checkpoint(runs.checkpoint_path(split, "last"))
    assert a["global_step"] == b["global_step"] == 20 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert runs.read_jsonl(straight / "metrics.jsonl") == runs.read_jsonl(split / "metrics.jsonl")
    cfg = a["config"]
    assert cfg["model"]["variance_head"] is True and cfg["objective"]["sigma2_floor"] == 1e-6
    groups = a["optimizer_states"][0]["param_groups"]
    head_lr = 0.02 if policy == "learned-conditional" else cfg["train"]["lr"]
    assert [g["lr"] for g in groups] == [cfg["train"]["lr"], head_lr]  # the model, then its variance head
    records = runs.read_jsonl(straight / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    if policy == "learned-conditional":  # the first step's sigma2(z) is the initial value, everywhere
        assert train[0]["sigma2"] == pytest.approx(0.5, rel=1e-6)
    val = [r for r in records if r["split"] == "val"][-1]
    assert math.isfinite(val["neg_elbo"]) and 0 < val["sigma2"] < 10


def test_eval_scores_the_models_own_variance_and_dequantised_bits(tmp_path):
    """`arelbo eval` on a tiny uint8 image run: the -ELBO and IS-NLL at sigma2(z), the common-rule -ELBO beside
    them, and with --dequantize the discrete bits/dim of each."""
    from arelbo.config import load_config
    from arelbo.evaluate import evaluate_run
    from arelbo.train import fit

    pytest.importorskip("lightning")
    images = (np.random.default_rng(1).random((240, 28, 28)) * 255).astype(np.uint8)
    np.savez(tmp_path / "tiny.npz", train=images[:200], val=images[200:220], test=images[220:])
    cfg = load_config("mnist-mlp", overrides=[
        "data.name=npz", f"data.root={tmp_path / 'tiny.npz'}", "data.options={}", "data.batch_size=50",
        "model.latent_dim=3", "model.hidden=[16]", "train.epochs=1", "train.n_samples=0",
        "objective.policy=ar-conditional", "model.variance_head=true"])
    run = fit(cfg, tmp_path / "run", progress=False)
    r = evaluate_run(run, samplers=None, k=4, is_examples=5, smoothness_examples=5, progress=False, write=False,
                     dequantize=True)
    lik, s, d = r["likelihood"], r["summary"], 784
    assert "own sigma2(z)" in lik["neg_elbo"]["sigma2_source"] and lik["neg_elbo"]["is_density"]
    assert lik["is_nll"]["sigma2_kind"] == "conditional" and lik["is_nll"]["sigma2_mean"] > 0
    assert "common rule" in lik["neg_elbo_ar"]["sigma2_source"] and s["neg_elbo_ar"] != s["neg_elbo"]
    for key in ("neg_elbo", "neg_elbo_ar", "is_nll"):
        assert s[f"{key}_bpd_discrete"] == pytest.approx((s[key] + d * math.log(255)) / (d * math.log(2)), rel=1e-12)
    assert s["is_nll"] <= s["neg_elbo"] + 5  # an importance-sampled bound, about the ELBO at K = 4


def test_compare_accepts_the_conditional_policies_and_gives_them_a_variance_head(tmp_path):
    from arelbo.study import plan_study

    plan = plan_study(["ar", "ar-conditional", "learned-conditional:0.05,lr=0.01"], "0", tmp_path / "st",
                      preset="linear-gaussian", overrides=["model.arch=mlp", "model.hidden=[16]"], epochs=1,
                      steps_per_epoch=2)
    by_name = {r.name: r for r in plan.runs}
    assert set(by_name) == {"ar-s0", "ar-conditional-s0", "learned-conditional-0.05-lr0.01-s0"}
    assert by_name["ar-s0"].config.model.variance_head is False
    learned = by_name["learned-conditional-0.05-lr0.01-s0"].config
    assert learned.model.variance_head and learned.objective.options == {"init_sigma2": 0.05, "log_sigma2_lr": 0.01}
    assert by_name["ar-conditional-s0"].config.model.variance_head


def test_reconstruct_variance_draws_the_sigma2_maps_on_a_log_scale(tmp_path, capsys):
    """`arelbo reconstruct --variance [--diagonal RUN]`: data, reconstructions and the sigma2(z) maps. A head set to
    sigma2 = 1e-3 on the left half of every image and 1e-1 on the right must draw tiles black on the left and white
    on the right (the two ends of the log scale), beside an ar-diagonal run's map."""
    from arelbo import cli
    from arelbo.config import load_config
    from arelbo.grids import variance_grid
    from arelbo.runs import checkpoint_path, load_checkpoint, save_checkpoint
    from arelbo.train import fit

    pytest.importorskip("lightning")
    images = (np.random.default_rng(2).integers(1, 255, (150, 28, 28))).astype(np.uint8)
    np.savez(tmp_path / "tiny.npz", train=images[:100], val=images[100:120], test=images[120:])
    runs = {}
    for policy in ("ar-conditional", "ar-diagonal"):
        cfg = load_config("mnist-mlp", overrides=[
            "data.name=npz", f"data.root={tmp_path / 'tiny.npz'}", "data.options={}", "data.batch_size=50",
            "model.latent_dim=2", "model.hidden=[8]", "train.epochs=1", "train.n_samples=0",
            f"objective.policy={policy}", f"model.variance_head={policy == 'ar-conditional'}"])
        runs[policy] = fit(cfg, tmp_path / policy, progress=False)
    run = runs["ar-conditional"]
    pattern = torch.full((28, 28), math.log(1e-3))
    pattern[:, 14:] = math.log(1e-1)
    for which in ("best", "last"):
        path = checkpoint_path(run, which)
        ckpt = load_checkpoint(path)
        state = dict(ckpt["model"])
        state["decoder.variance_head.layer.weight"] = torch.zeros_like(state["decoder.variance_head.layer.weight"])
        state["decoder.variance_head.layer.bias"] = pattern.flatten()
        save_checkpoint(path, {**ckpt, "model": state})
    grid = variance_grid(run, n=2, nrow=2)[:, :, 0]
    x0 = 14  # every block starts at the canvas margin (12) plus the grid's padding (2)
    rows = [y for y in range(grid.shape[0] - 28)
            if (grid[y : y + 28, x0 : x0 + 14] == 0).all() and (grid[y : y + 28, x0 + 14 : x0 + 28] == 255).all()]
    assert len(rows) == 1, "one row of sigma2(z) tiles: black (1e-3) on the left, white (1e-1) on the right"

    assert cli.main(["reconstruct", str(run), "--variance", "--diagonal", str(runs["ar-diagonal"]), "--n", "4"]) == 0
    out = run / "variance-test.png"
    assert out.is_file() and str(out) in capsys.readouterr().out
    from PIL import Image

    assert Image.open(out).size[1] > Image.fromarray(grid).size[1]  # one block more: the diagonal run's map
    with pytest.raises(ValueError, match="decoder outputs no variance"):
        variance_grid(runs["ar-diagonal"], n=2)
    with pytest.raises(ValueError, match="has no per-pixel sigma2"):
        variance_grid(run, n=2, diagonal_run=run)
    assert cli.main(["reconstruct", str(run), "--diagonal", str(runs["ar-diagonal"])]) != 0
    assert "give --variance too" in capsys.readouterr().err


def test_the_hierarchy_has_a_variance_head_too():
    """hvae with ``model.variance_head``: sigma2(z) per element off the last top-down state, in the output and at
    every importance-sampling draw (a constant head: the IS-NLL equals the isotropic one on the same draws)."""
    cfg = ModelConfig(arch="hvae", latent_dim=4, layout="4:2,8:2", width=8, variance_head=True)
    torch.manual_seed(0)
    model = build_model(cfg, SHAPE).double()
    x = batch()
    out = model(x)
    assert out.x_logvar.shape == x.shape and len(out.groups) == 3
    loss = GaussianVAELoss("ar-conditional").attach(model)(x, out)
    torch.testing.assert_close(loss.sigma2, torch.ones(6, D, dtype=torch.float64))  # the head starts at sigma2 = 1
    with torch.no_grad():
        model.variance_head.layer.bias.fill_(math.log(0.07))
    own = importance_sampled_nll(model, x, OwnVariance(1e-6), k=5, generator=torch.Generator().manual_seed(0))
    iso = importance_sampled_nll(model, x, 0.07, k=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(own, iso, rtol=1e-12, atol=1e-10)

