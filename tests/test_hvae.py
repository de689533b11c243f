"""The hierarchical (top-down) VAE: shapes from the layout, its rate against a Monte-Carlo estimate, the IS-NLL
against the -ELBO, one group against the flat loss, reproducible sampling, every policy, exact resume, DDP, the
stabilisers, and the per-group diagnostics of `arelbo eval`.

Trained fixtures: a tiny hierarchy (3 groups: a 3-unit vector, 2 channels at 4x4, 1 channel at 8x8) on 8x8 blob
images, trained through `arelbo.train.fit`."""

import math

import numpy as np
import pytest
import torch

from arelbo.config import ModelConfig, load_config
from arelbo.models import build_model
from arelbo.models.hvae import HierarchicalVAE, parse_layout
from arelbo.objectives import POLICIES, GaussianVAELoss
from arelbo.objectives.base import neg_elbo_per_sample

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_MODEL = ["model.arch=hvae", "model.latent_dim=3", "model.layout='4:2,8:1'", "model.width=8", "model.blocks=1"]


def blobs(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = [np.exp(-((xx - rng.uniform(1, size - 2)) ** 2 + (yy - rng.uniform(1, size - 2)) ** 2) / rng.uniform(1, 6))
           for _ in range(n)]
    return (np.stack(out)[:, None] * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("blobs") / "blobs.npz"
    images = blobs(240)
    np.savez(path, train=images[:160], val=images[160:200], test=images[200:])
    return path


def tiny(data_file, *extra, policy="ar"):
    return load_config(overrides=["data.name=npz", f"data.root={data_file}", "data.batch_size=32",
                                  "data.eval_batch_size=20", *TINY_MODEL, f"objective.policy={policy}",
                                  "train.epochs=2", "train.log_every_n_steps=1", "train.n_samples=0", *extra])


def fit_tiny(tmp_path, data_file, *extra, policy="ar", name="run"):
    pytest.importorskip("lightning")
    from arelbo.train import fit

    return fit(tiny(data_file, *extra, policy=policy), tmp_path / name, progress=False)


def records(run_dir, split):
    from arelbo import runs

    return [r for r in runs.read_jsonl(run_dir / "metrics.jsonl") if r["split"] == split]


# ---- shapes and layout ------------------------------------------------------------------------------------------


def test_presets_build_with_every_shape_from_the_layout():
    mnist = build_model(load_config("mnist-hvae").model, (1, 28, 28))
    assert mnist.latent_shapes == {"z1": (16,), "z2": (8, 7, 7), "z3": (8, 7, 7), "z4": (4, 14, 14), "z5": (4, 14, 14)}
    assert mnist.code_dim == 16 and mnist.closed_form_rate
    x = torch.rand(3, 1, 28, 28)
    out = mnist(x)
    assert out.x_hat.shape == x.shape and out.rate.shape == (3,)
    assert [tuple(g.mu.shape[1:]) for g in out.groups] == list(mnist.latent_shapes.values())
    torch.testing.assert_close(out.rate, sum(g.rate for g in out.groups))
    assert all(g.kl.shape == g.mu.shape for g in out.groups)  # closed-form KL per unit, every group
    celeba = build_model(load_config("celeba64-hvae").model, (3, 64, 64))
    assert celeba.latent_shapes["z1"] == (64,) and celeba.latent_shapes["z5"] == (8, 32, 32)
    assert celeba(torch.rand(2, 3, 64, 64)).x_hat.shape == (2, 3, 64, 64)


@pytest.mark.parametrize("layout, size, message", [
    ("7:8,3:2", 28, "must not decrease"),
    ("5:2", 28, "5 does not divide"),
    ("7-8", 28, "not RES:CHANNELS"),
    ("56:2", 28, "larger than the image"),
    ("7:0", 28, "positive integers"),
])
def test_bad_layouts_are_one_line_errors(layout, size, message):
    with pytest.raises(ValueError, match=message):
        parse_layout(layout, 4, size)


def test_bad_layout_in_a_config_names_the_key():
    from arelbo.config import ConfigError

    with pytest.raises(ConfigError, match="model.layout"):
        ModelConfig(arch="hvae", layout="7:x")
    with pytest.raises(ValueError, match="square images"):
        build_model(ModelConfig(arch="hvae", layout="4:2"), (1, 8, 12))


# ---- the rate, the likelihood, one group ------------------------------------------------------------------------


def test_closed_form_rate_equals_a_many_sample_monte_carlo_estimate_over_all_groups():
    """E[rate] (each group's KL in closed form given the sampled groups above) against E_q[log q(z|x) - log p(z)]
    estimated from independent joint samples of every group (log_weights): equal within 5 standard errors."""
    torch.manual_seed(0)
    model = HierarchicalVAE((1, 8, 8), 3, "4:2,8:1", width=8).double()
    with torch.no_grad():  # give the priors and posteriors some shape (a new model's priors are N(0, 1))
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
        n = 4000
        rates = torch.stack([model(x).rate for _ in range(n // 100) for _ in range(100)])  # (n, B)
        _, w = model.log_weights(x, n, torch.Generator().manual_seed(1))
    mc = -w  # log q - log p per joint sample, (n, B)
    diff = rates.mean(0) - mc.mean(0)
    se = (rates.var(0) / n + mc.var(0) / n).sqrt()
    assert (diff.abs() < 5 * se).all(), (diff, se)
    assert (rates.mean(0) > 1.0).all()  # a real KL, not a trivial zero


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_file):
    return fit_tiny(tmp_path_factory.mktemp("trained"), data_file, "train.epochs=4")


def test_is_nll_with_one_sample_is_the_elbo_in_expectation_and_falls_as_k_grows(trained):
    from arelbo import runs
    from arelbo.metrics.likelihood import importance_sampled_nll

    model, _, _ = runs.load_model(trained, "last")
    model.double()
    x = torch.from_numpy(blobs(16, seed=5)).double() / 255
    sigma2 = 0.01
    torch.manual_seed(0)
    with torch.no_grad():
        elbo = []
        for _ in range(400):
            out = model(x)
            sq = (x.flatten(1) - out.x_hat.flatten(1)).pow(2)
            elbo.append(neg_elbo_per_sample(sq, torch.tensor(sigma2, dtype=torch.float64), out.rate))
        elbo = torch.stack(elbo)  # (400, B)
    g = torch.Generator().manual_seed(3)
    k1 = torch.stack([importance_sampled_nll(model, x, sigma2, k=1, generator=g) for _ in range(400)])
    diff = (k1.mean(0) - elbo.mean(0))
    se = (k1.var(0) / 400 + elbo.var(0) / 400).sqrt()
    assert (diff.abs() < 5 * se).all(), (diff, se)
    k10 = importance_sampled_nll(model, x, sigma2, k=10, generator=g)
    k200 = importance_sampled_nll(model, x, sigma2, k=200, generator=g)
    assert k1.mean() > k10.mean() > k200.mean()  # the bound tightens with K


def test_a_one_group_model_gives_the_flat_loss_on_the_same_tensors():
    torch.manual_seed(0)
    model = HierarchicalVAE((1, 8, 8), 4, "", width=8)
    assert list(model.latent_shapes) == ["z1"]
    x = torch.rand(6, 1, 8, 8)
    out = model(x)
    for policy in ("ar", "fixed", "learned", "ar-diagonal"):
        loss = GaussianVAELoss(policy)
        named, flat = loss(x, out), loss(x, out.x_hat, out.mu, out.logvar)
        assert torch.equal(named.loss, flat.loss) and torch.equal(named.rate, flat.rate), policy
        assert torch.equal(named.kl_per_dim, flat.kl_per_dim) and torch.equal(named.sigma2, flat.sigma2)


def test_sampling_is_reproducible_under_a_generator_whatever_the_batch_size():
    from arelbo.samplers import decode_samples, make_sampler

    torch.manual_seed(0)
    model = HierarchicalVAE((1, 8, 8), 3, "4:2,8:1", width=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    a = model.sample(5, torch.Generator().manual_seed(7))
    assert torch.equal(a, model.sample(5, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, model.sample(5, torch.Generator().manual_seed(8)))
    sampler = make_sampler("prior").fit(model, [torch.rand(4, 1, 8, 8)])
    one = decode_samples(model, sampler, 12, torch.Generator().manual_seed(1), batch_size=12)
    four = decode_samples(model, sampler, 12, torch.Generator().manual_seed(1), batch_size=5)
    assert torch.equal(one, four)
    cold = decode_samples(model, make_sampler("prior", temperature=0.0).fit(model, [torch.rand(4, 1, 8, 8)]), 3,
                          torch.Generator().manual_seed(1))
    torch.testing.assert_close(cold, model.decode(torch.zeros(3, 3)).expand(3, 1, 8, 8))  # t = 0: the prior means


# ---- training: every policy, resume, DDP, bf16, priors, stabilisers ---------------------------------------------


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_trains_the_hierarchy(tmp_path, data_file, policy):
    head = ["model.variance_head=true"] if POLICIES[policy].needs_x_logvar else []  # sigma2(z): the variance head
    run = fit_tiny(tmp_path, data_file, "train.epochs=1", *head, policy=policy)
    val = records(run, "val")[-1]
    assert math.isfinite(val["neg_elbo"]) and val["n"] == 40
    assert list(val["kl_per_group"]) == ["z1", "z2", "z3"] and len(val["kl_per_dim"]) == 3 + 32 + 64
    assert val["kl"] == pytest.approx(sum(val["kl_per_group"].values()), rel=1e-9)
    assert set(val["active_units_per_group"]) == {"z1", "z2", "z3"}


def test_resume_from_mid_epoch_is_exact(tmp_path, data_file):
    from arelbo import runs
    from arelbo.train import resume

    straight = fit_tiny(tmp_path, data_file, name="straight", policy="ar-ema")
    cut = fit_tiny(tmp_path, data_file, "train.max_steps=7", name="cut", policy="ar-ema")
    assert runs.load_checkpoint(cut / "checkpoints" / "last.pt")["epoch_batches_done"] == 2
    resume(cut, ["train.max_steps=null"], progress=False)
    a, b = (runs.load_checkpoint(r / "checkpoints" / "last.pt") for r in (straight, cut))
    assert a["global_step"] == b["global_step"] == 10
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert runs.read_jsonl(straight / "metrics.jsonl") == runs.read_jsonl(cut / "metrics.jsonl")


def test_two_processes_match_one_process(tmp_path, data_file):
    one = fit_tiny(tmp_path, data_file, "train.epochs=1", "train.accelerator=cpu", name="one")
    two = fit_tiny(tmp_path, data_file, "train.epochs=1", "train.accelerator=cpu", "train.devices=2", name="two")
    sa = [r["sigma2"] for r in records(one, "train")]
    sb = [r["sigma2"] for r in records(two, "train")]
    assert len(sa) == len(sb) == 5 and sa == pytest.approx(sb, rel=1e-5)
    assert records(one, "val")[-1]["neg_elbo"] == pytest.approx(records(two, "val")[-1]["neg_elbo"], rel=1e-5)


def test_bf16_and_a_learnable_top_prior_train(tmp_path, data_file):
    bf16 = fit_tiny(tmp_path, data_file, "train.epochs=1", "train.precision=bf16-mixed", name="bf16")
    assert math.isfinite(records(bf16, "val")[-1]["neg_elbo"])
    for prior in ("mog", "vamp", "flow"):
        run = fit_tiny(tmp_path, data_file, "train.epochs=1", f"model.prior={prior}", name=prior)
        val = records(run, "val")[-1]
        assert math.isfinite(val["neg_elbo"]) and val["kl_per_dim"] is None  # the top group's rate is Monte-Carlo
        assert list(val["kl_per_group"]) == ["z1", "z2", "z3"]


def test_stabilisers_are_off_by_default_recorded_and_do_what_they_say(tmp_path, data_file):
    from arelbo import runs

    default = load_config("mnist-hvae").train
    assert (default.skip_grad_norm, default.kl_warmup_steps) == (None, 0)
    warm = fit_tiny(tmp_path, data_file, "train.epochs=1", "train.kl_warmup_steps=4", name="warm")
    assert runs.read_config(warm).train.kl_warmup_steps == 4
    assert [r["kl_weight"] for r in records(warm, "train")] == [0.25, 0.5, 0.75, 1.0, 1.0]
    skip = fit_tiny(tmp_path, data_file, "train.epochs=1", "train.skip_grad_norm=1e-12", "train.n_samples=0",
                    name="skip")
    assert runs.read_config(skip).train.skip_grad_norm == 1e-12
    assert [r["skipped_updates"] for r in records(skip, "train")] == [0, 1, 2, 3, 4]  # skipped before each step
    # every update skipped: the weights are those it started with (the run's seed, the same initialisation)
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    init = build_model(tiny(data_file).model, (1, 8, 8)).state_dict()
    ckpt = runs.load_checkpoint(skip / "checkpoints" / "last.pt")
    assert ckpt["global_step"] == 5 and all(torch.equal(ckpt["model"][k], init[k]) for k in init)


# ---- evaluation ------------------------------------------------------------------------------------------------


def test_eval_writes_per_group_diagnostics_and_the_sampler_temperature(trained):
    from arelbo.evaluate import evaluate_run

    res = evaluate_run(trained, which="last", samplers=("prior", "gmm"), n_samples=16, fid=False, is_examples=8,
                       k=4, smoothness_examples=8, mi_examples=40, progress=False, write=False,
                       sampler_options={"prior": {"temperature": 0.7}})
    c = res["collapse"]
    assert [g["name"] for g in c["groups"]] == ["z1", "z2", "z3"] and [g["units"] for g in c["groups"]] == [3, 32, 64]
    assert c["latent_dim"] == 99 and len(c["kl_per_dim"]) == 99
    assert c["active_units"] == sum(g["active_units"] for g in c["groups"])
    assert c["collapsed_groups"] == sum(g["active_units"] == 0 for g in c["groups"])
    kl = res["likelihood"]["neg_elbo"]["rate_per_group"]
    assert sum(kl.values()) == pytest.approx(c["kl_total"], rel=1e-9)
    for g in c["groups"]:  # the group's KL is the sum of its units' KL
        assert g["kl"] == pytest.approx(kl[g["name"]])
    cols = {"z1": slice(0, 3), "z2": slice(3, 35), "z3": slice(35, 99)}
    for name, cols_ in cols.items():
        assert sum(c["kl_per_dim"][cols_]) == pytest.approx(kl[name], rel=1e-9)
    # smoothness: at most 8 units per group measured, the others null
    measured = [v is not None for v in c["smoothness_per_dim"]]
    assert sum(measured[0:3]) == 3 and sum(measured[3:35]) == 8 and sum(measured[35:99]) == 8
    assert res["protocol"]["samplers"]["prior"]["config"] == {"temperature": 0.7}
    assert res["protocol"]["samplers"]["gmm"]["fit_info"]["num_codes"] == 160  # the top group's codes


def test_a_study_of_the_hierarchy_reports_kl_and_active_units_per_group(tmp_path, data_file):
    pytest.importorskip("matplotlib")
    import json

    from arelbo.cli import main

    out = tmp_path / "study"
    sets = [a for s in ("data.name=npz", f"data.root={data_file}", "data.batch_size=32", "data.eval_batch_size=20",
                        *TINY_MODEL, "train.n_samples=0") for a in ("--set", s)]
    assert main(["compare", "--preset", "mnist-hvae", "--policies", "ar,fixed:1", "--seeds", "0,1", "--out", str(out),
                 "--epochs", "1", "--steps-per-epoch", "3", "--eval-samples", "0", "--no-fid", "--no-gmm",
                 "--is-examples", "4", "--k", "2", "--quiet", *sets]) == 0
    results = json.loads((out / "results.json").read_text())
    for p in results["policies"]:
        assert [g["name"] for g in p["groups"]] == ["z1", "z2", "z3"] and p["groups"][1]["units"] == 32
        assert p["groups"][0]["kl"]["n"] == 2
        kl = [sum(c["kl"] for c in cell["groups"]) for cell in p["cells"]]
        assert kl == pytest.approx([c["values"]["kl_total"] for c in p["cells"]], rel=1e-9)
    md = (out / "report.md").read_text()
    assert "## Latent groups" in md and md.count("| AR-ELBO | z") == 3
    assert (out / "figures" / "kl_per_group.png").is_file()


@pytest.mark.slow
def test_bench_train_times_the_presets_side_by_side():
    """benchmarks/bench_train.py --presets: each preset's bare and pipeline step, ratios to the first."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("lightning")
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.bench_presets(["mnist-conv", "mnist-hvae"], steps=2, repeats=1)
    assert res["bare_ratio_to_first"]["mnist-conv"] == 1.0 and res["bare_ratio_to_first"]["mnist-hvae"] > 0
    assert all(v > 0 for v in res["pipeline_step_ms"].values()) and res["parameters"]["mnist-hvae"] > 0
