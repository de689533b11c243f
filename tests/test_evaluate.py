"""`arelbo eval` / evaluate_run on tiny run directories made here by training a few steps (then, for the
closed-form checks, given known weights).

The main run is a linear VAE at the probabilistic-PCA optimum of the Gaussian dataset (method.md section 3:
eigenvalues [5, 3, 1.5, 0.8, 0.5, 0.3, 0.2, 0.1], q = 4, sigma2 = 0.275), where every number has a closed form.
"""

import json
import math

import numpy as np
import pytest
import torch

from arelbo.config import ModelConfig, ObjectiveConfig
from arelbo.data import load_dataset
from arelbo.evaluate import METRICS_FILE, evaluate_run, format_table
from arelbo.metrics import linear_gaussian_nll
from arelbo.models import LinearVAE, build_model
from arelbo.runs import load_checkpoint, save_checkpoint

EIGENVALUES = [5.0, 3.0, 1.5, 0.8, 0.5, 0.3, 0.2, 0.1]
Q = 4
SIGMA2 = 0.275  # mean of the trailing eigenvalues
DATA_OPTIONS = {"eigenvalues": EIGENVALUES, "n_train": 1500, "n_val": 10, "n_test": 800, "seed": 0}


# Small tensors: one intra-op thread is fastest, and robust on a shared, oversubscribed CPU (conftest.py).
pytestmark = pytest.mark.usefixtures("single_thread")


def ppca_optimum():
    splits = load_dataset("gaussian", **DATA_OPTIONS)
    U = torch.tensor(splits.info["rotation"], dtype=torch.float64)[:, :Q]
    lam = torch.tensor(EIGENVALUES[:Q], dtype=torch.float64)
    W = U * (lam - SIGMA2).sqrt()
    model = LinearVAE((8, 1, 1), Q)
    with torch.no_grad():  # encoder = exact posterior: mean diag(1/l) W^T x, variance sigma2 / l
        model.decoder.linear.weight.copy_(W)
        model.encoder.linear.weight.copy_((W / lam).T)
        model.encoder.logvar.copy_(torch.log(SIGMA2 / lam))
    return model, W, lam, splits


TRAINED_STEPS = 2


def make_run(path, model, objective=None, data=None, model_cfg=None):
    """A run directory made by `arelbo.train.fit` (one epoch of TRAINED_STEPS steps: every file and checkpoint key
    is the trainer's), whose checkpoints then get ``model``'s weights and a fresh objective state, so the
    evaluation can be checked against closed forms (e.g. at the pPCA optimum). Again on the same ``path``: only
    the weights change."""
    from arelbo.config import RunConfig
    from arelbo.train import fit

    cfg = {
        "data": data or {"name": "gaussian", "options": DATA_OPTIONS},
        "model": model_cfg or {"arch": "linear", "latent_dim": Q},
        "objective": objective or {"policy": "ar"},
    }
    if not (path / "checkpoints" / "last.pt").is_file():
        train = {"epochs": 1, "limit_train_batches": TRAINED_STEPS, "limit_val_batches": 1, "n_samples": 0,
                 "schedule": "none", "log_every_n_steps": 1}
        fit(RunConfig.from_dict({**cfg, "train": train}), path, progress=False)
    loss_fn = ObjectiveConfig(**cfg["objective"]).build()
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(path / "checkpoints" / name)
        assert ckpt["data_shape"] == list(model.shape)
        save_checkpoint(path / "checkpoints" / name, {**ckpt, "model": model.state_dict(), "objective": loss_fn.state_dict()})
    return path


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    model, W, lam, splits = ppca_optimum()
    run = make_run(tmp_path_factory.mktemp("linear-run"), model)
    result = evaluate_run(run, samplers="prior,gmm,two-stage", n_samples=50, k=50,
                          sampler_options={"gmm": {"n_components": 3}, "two-stage": {"steps": 50, "hidden": [16]}},
                          progress=False)
    return run, result, model, W, lam, splits


def test_metrics_json_written_and_schema(linear_run):
    run, result, *_ = linear_run
    on_disk = json.loads((run / METRICS_FILE).read_text())
    assert on_disk == result
    for key in ("format", "checkpoint", "run", "protocol", "summary", "collapse", "likelihood", "fid", "timings_s"):
        assert key in result
    p = result["protocol"]
    assert p["split"] == "test" and p["num_examples"] == 800 and p["num_elements"] == 8 and p["seed"] == 0
    assert p["is_nll"]["k"] == 50 and p["is_nll"]["num_examples"] == 800
    assert set(p["samplers"]) == {"prior", "gmm", "two-stage"}
    assert p["samplers"]["gmm"]["config"]["n_components"] == 3 and p["samplers"]["gmm"]["fit_examples"] == 1500
    assert result["checkpoint"]["step"] == TRAINED_STEPS and result["checkpoint"]["file"] == "best.pt"
    assert result["run"]["policy"] == "ar"
    # FID on non-image data is skipped with the reason, for every sampler
    assert all("not images" in result["fid"][name]["skipped"] for name in ("prior", "gmm", "two-stage"))
    assert "active units" in format_table(result)


def test_linear_run_collapse_values_match_closed_forms(linear_run):
    _, result, model, W, lam, splits = linear_run
    c = result["collapse"]
    assert c["active_units"] == Q and c["latent_dim"] == Q
    # decoder smoothness of f(z) = W z: the column norms sqrt(l_j - sigma2), exactly
    np.testing.assert_allclose(c["smoothness_per_dim"], (lam - SIGMA2).sqrt().numpy(), rtol=1e-5)
    # Var(mu_j) -> 1 - sigma2 / l_j and KL_j -> 1/2 log(l_j / sigma2) (finite-sample tolerance)
    np.testing.assert_allclose(c["latent_variance"], (1 - SIGMA2 / lam).numpy(), atol=0.1)
    np.testing.assert_allclose(c["kl_per_dim"], (0.5 * torch.log(lam / SIGMA2)).numpy(), atol=0.1)
    # I(x; z) of the exact posterior: 1/2 sum_j log(l_j / sigma2), estimated with N = 800 (<= log N)
    assert c["mutual_information"] <= math.log(800)
    assert c["mutual_information"] == pytest.approx(0.5 * float(torch.log(lam / SIGMA2).sum()), abs=0.2)


def test_linear_run_likelihood_values_match_hand_computation(linear_run):
    _, result, model, W, lam, splits = linear_run
    lk, s = result["likelihood"], result["summary"]
    x = splits.test
    with torch.no_grad():
        sq = model.expected_sq_err(x).double()
    s2 = float(sq.mean())
    assert lk["sigma2_ar"] == pytest.approx(s2, rel=1e-9)  # the test split's own MLE, reported
    # every estimated sigma2 is fitted on the validation split and scored on the test split
    with torch.no_grad():
        s2v = float(model.expected_sq_err(splits.val).double().mean())
    assert lk["sigma2_val"] == pytest.approx(s2v, rel=1e-9) and s2v != pytest.approx(s2, rel=1e-3)
    hand = 0.5 * 8 * math.log(2 * math.pi * s2v) + 8 * s2 / (2 * s2v) + result["collapse"]["kl_total"]
    assert lk["neg_elbo_ar"]["neg_elbo"] == pytest.approx(hand, rel=1e-9)
    assert lk["neg_elbo"]["neg_elbo"] == pytest.approx(hand, rel=1e-9)  # the run's policy is ar
    assert "fitted on the validation split" in lk["neg_elbo"]["sigma2_source"] and lk["neg_elbo"]["is_density"]
    assert s["neg_elbo_bpd"] == pytest.approx(hand / (8 * math.log(2)), rel=1e-9)
    exact = float(linear_gaussian_nll(x, W, s2v).mean())
    assert lk["exact_nll"]["nll"] == pytest.approx(exact, rel=1e-6)
    # at the pPCA optimum the ELBO is (almost) tight and the IS-NLL matches the exact NLL
    # (the encoder is optimal for the population sigma2; at the 10-example validation MLE the gap is a bit wider)
    assert 0 <= s["neg_elbo"] - exact < 2e-2
    assert s["is_nll"] == pytest.approx(lk["exact_nll"]["nll_is_subset"], abs=2e-3)
    with torch.no_grad():
        mse = float((x.flatten(1).double() - model.decode(model.encode(x)[0]).flatten(1).double()).pow(2).mean())
    assert s["mse"] == pytest.approx(mse, rel=1e-6)


def test_samplers_are_saved_and_reused(linear_run):
    run, result, *_ = linear_run
    for name in ("prior", "gmm", "two-stage"):
        assert (run / "samplers" / f"{name}.pt").is_file()
    again = evaluate_run(run, samplers="gmm,two-stage", n_samples=50, k=2, is_examples=10, smoothness_examples=10,
                         sampler_options={"gmm": {"n_components": 3}, "two-stage": {"steps": 50, "hidden": [16]}},
                         progress=False, write=False)
    assert again["protocol"]["samplers"]["gmm"]["source"] == "reused"
    assert again["protocol"]["samplers"]["gmm"]["fit_info"] == result["protocol"]["samplers"]["gmm"]["fit_info"]
    assert again["protocol"]["samplers"]["two-stage"]["source"] == "reused"
    changed = evaluate_run(run, samplers="gmm", n_samples=0, k=2, is_examples=10, smoothness_examples=10,
                           sampler_options={"gmm": {"n_components": 2}}, progress=False, write=False)
    assert changed["protocol"]["samplers"]["gmm"]["source"] == "fitted"  # other options: refitted, not reused
    refit = evaluate_run(run, samplers="gmm", n_samples=0, k=2, is_examples=10, smoothness_examples=10,
                         sampler_options={"gmm": {"n_components": 3}}, refit_samplers=True, progress=False, write=False)
    assert refit["protocol"]["samplers"]["gmm"]["source"] == "fitted"


def test_sampler_fit_is_not_reused_for_a_changed_checkpoint(tmp_path):
    model, *_ = ppca_optimum()
    run = make_run(tmp_path, model)
    quick = dict(samplers="gmm", sampler_options={"gmm": {"n_components": 2}}, n_samples=0, k=2, is_examples=10,
                 smoothness_examples=10, max_examples=200, progress=False)
    assert evaluate_run(run, **quick)["protocol"]["samplers"]["gmm"]["source"] == "fitted"
    assert evaluate_run(run, **quick)["protocol"]["samplers"]["gmm"]["source"] == "reused"
    with torch.no_grad():
        model.encoder.linear.weight.mul_(0.5)
    make_run(tmp_path, model)  # same file name, new weights
    assert evaluate_run(run, **quick)["protocol"]["samplers"]["gmm"]["source"] == "fitted"


@pytest.mark.parametrize(
    "objective, sigma2_source, is_sigma2",
    [
        ({"policy": "fixed", "options": {"sigma2": 0.5}}, "policy fixed", 0.5),
        ({"policy": "ar-diagonal"}, "diagonal", None),
        ({"policy": "ar-per-sample"}, "per example", None),
        ({"policy": "learned", "options": {"init_sigma2": 0.4}}, "policy learned", 0.4),
    ],
)
def test_policy_variants(tmp_path, objective, sigma2_source, is_sigma2):
    model, W, lam, splits = ppca_optimum()
    run = make_run(tmp_path, model, objective)
    r = evaluate_run(run, samplers=None, k=4, is_examples=20, smoothness_examples=20, max_examples=300, progress=False)
    lk = r["likelihood"]
    assert sigma2_source in lk["neg_elbo"]["sigma2_source"]
    assert r["protocol"]["num_examples"] == 300
    # -ELBO under ar sigma2 is the best isotropic one: no policy's isotropic sigma2 beats it
    if objective["policy"] in ("fixed", "learned"):
        assert lk["neg_elbo"]["neg_elbo"] > lk["neg_elbo_ar"]["neg_elbo"]
        assert r["protocol"]["is_nll"]["sigma2_mean"] == pytest.approx(is_sigma2, rel=1e-6)
    if objective["policy"] == "ar-diagonal":
        assert lk["is_nll"]["sigma2_kind"] == "diagonal"
        # the per-element MLE of the validation split (not of the test split it scores)
        with torch.no_grad():
            s2v = model.expected_sq_err(splits.val).double().mean(0)
        assert lk["neg_elbo"]["sigma2_mean"] == pytest.approx(float(s2v.mean()), rel=1e-9)
        assert lk["neg_elbo"]["is_density"]
    if objective["policy"] == "ar-per-sample":
        assert "isotropic MLE" in lk["is_nll"]["note"]
        assert lk["neg_elbo"]["is_density"] is False and "not a likelihood bound" in lk["neg_elbo"]["note"]
        assert r["summary"]["neg_elbo_is_density"] is False


def eval_cli(argv):
    """`arelbo eval ARGV` through the command's own parser (the router's other commands are not needed)."""
    import argparse

    from arelbo import cli
    from arelbo.cli import eval as eval_command

    assert cli.COMMANDS["eval"][0] == "arelbo.cli.eval"
    parser = argparse.ArgumentParser(prog="arelbo eval")
    eval_command.add_arguments(parser)
    return eval_command.run(parser.parse_args(argv))


def test_cli_eval(tmp_path, capsys):
    model, *_ = ppca_optimum()
    run = make_run(tmp_path / "run", model)
    quick = ["--max-examples", "200", "--k", "3", "--n-samples", "10", "--is-examples", "20",
             "--smoothness-examples", "20", "--no-progress"]
    with pytest.raises(ValueError, match="takes no argument"):
        eval_cli([str(run), *quick, "--sampler", "prior", "--sampler-option", "prior.x=1"])
    with pytest.raises(ValueError, match="NAME.KEY=VALUE"):
        eval_cli([str(run), *quick, "--sampler-option", "n_components=2"])
    code = eval_cli([str(run), *quick, "--sampler", "prior,gmm", "--sampler-option", "gmm.n_components=2"])
    out = capsys.readouterr().out
    assert code == 0 and "active units" in out and "IS-NLL" in out and "metrics.json" in out
    saved = json.loads((run / METRICS_FILE).read_text())
    assert saved["protocol"]["num_examples"] == 200 and saved["protocol"]["samplers"]["gmm"]["config"]["n_components"] == 2
    assert eval_cli([str(run), *quick, "--sampler", "prior", "--json", "--no-write"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["active_units"] == Q
    with pytest.raises(FileNotFoundError):
        eval_cli([str(tmp_path / "missing"), "--no-progress"])


def test_image_run_with_fid(tmp_path):
    """uint8 28x28 images (npz dataset), an MLP VAE: samples are drawn and scored by compute_fid with the committed
    mnist-features network (its weights ship with the package, so FID must be computed, never skipped)."""
    rng = np.random.default_rng(0)
    images = (rng.random((260, 28, 28)) * 255).astype(np.uint8)
    np.savez(tmp_path / "tiny.npz", train=images[:200], val=images[200:210], test=images[210:])
    pytest.importorskip("lightning")
    from arelbo.config import load_config
    from arelbo.runs import load_checkpoint
    from arelbo.train import fit

    # a run made by training (a few steps), so the checkpoint is exactly what `arelbo train` writes
    cfg = load_config("mnist-mlp", overrides=["data.name=npz", f"data.root={tmp_path / 'tiny.npz'}",
                                              "data.options={}", "data.batch_size=50", "model.latent_dim=3",
                                              "model.hidden=[16]", "train.epochs=1", "train.n_samples=0"])
    run = fit(cfg, tmp_path / "run", progress=False)
    trained = load_checkpoint(run / "checkpoints" / "best.pt")
    r = evaluate_run(run, samplers="prior,gmm", sampler_options={"gmm": {"n_components": 2}}, n_samples=40, k=4,
                     is_examples=10, smoothness_examples=10, progress=False)
    assert r["protocol"]["fid"]["feature_net"] == "mnist-features" and r["protocol"]["fid"]["kid"] is True
    for name in ("prior", "gmm"):
        res = r["fid"][name]
        assert "skipped" not in res and "error" not in res, res
        assert res["fid"] > 0 and res["protocol"]["n_generated"] == 40 and res["protocol"]["n_reference"] == 50
        assert res["protocol"]["reference"]["name"] == "npz:test"
    assert r["summary"]["active_units"] <= 3 and math.isfinite(r["summary"]["neg_elbo"])
    # metrics.json records which training step it evaluated
    assert r["checkpoint"]["step"] == trained["global_step"] == 4 and r["checkpoint"]["epoch"] == trained["epoch"]


def test_dequantized_scores_stay_in_each_pixels_bin_and_report_discrete_bits(tmp_path):
    from arelbo.evaluate.common import dequantized as _dequantized

    v = torch.arange(256, dtype=torch.uint8).repeat(400)
    x = _dequantized(v, torch.Generator().manual_seed(0))
    offset = x.double() * 255 - v.double()  # u - 1/2, uniform on [-1/2, 1/2)
    assert bool((offset >= -0.5).all() and (offset < 0.5).all()) and abs(float(offset.mean())) < 0.01
    assert float(offset.var()) == pytest.approx(1 / 12, rel=0.02)

    rng = np.random.default_rng(1)
    images = (rng.random((240, 28, 28)) * 255).astype(np.uint8)
    np.savez(tmp_path / "tiny.npz", train=images[:200], val=images[200:220], test=images[220:])
    cfg = {"arch": "mlp", "latent_dim": 3, "hidden": [16]}
    torch.manual_seed(0)
    run = make_run(tmp_path / "run", build_model(ModelConfig(**cfg), (1, 28, 28)),
                   data={"name": "npz", "root": str(tmp_path / "tiny.npz")}, model_cfg=cfg)
    kw = dict(samplers=None, k=4, is_examples=5, smoothness_examples=5, progress=False, write=False)
    plain = evaluate_run(run, **kw)
    deq = evaluate_run(run, dequantize=True, **kw)
    s, d = deq["summary"], 784
    assert deq["protocol"]["dequantize"]["on"] and "(v + u - 1/2)/255" in deq["protocol"]["dequantize"]["convention"]
    for key in ("neg_elbo", "neg_elbo_ar", "is_nll"):
        assert s[f"{key}_bpd_discrete"] == pytest.approx((s[key] + d * math.log(255)) / (d * math.log(2)), rel=1e-12)
    assert s["neg_elbo"] != plain["summary"]["neg_elbo"] and "neg_elbo_bpd_discrete" not in plain["summary"]
    with pytest.raises(ValueError, match="dequantize needs uint8 images"):
        model, *_ = ppca_optimum()
        evaluate_run(make_run(tmp_path / "gauss", model), dequantize=True, **kw)
