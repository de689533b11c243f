"""The fair learned sigma2 (own learning rate, MLE initialisation), the annealed AR-ELBO, and kept snapshots."""


import pytest
import torch

from arelbo.objectives import GaussianVAELoss, make_policy


def _sq(seed=0, b=8, d=5, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, d, generator=g, dtype=torch.float64)).pow(2)


def test_learned_init_mle_sets_the_first_training_batch_mle_once():
    p = make_policy("learned", init_sigma2=1.0, init_mle=True)
    first, second = _sq(0), _sq(1, scale=2.0)
    p.eval()
    assert float(p.sigma2(first).detach()) == pytest.approx(1.0)  # evaluation never initialises
    p.train()
    assert float(p.sigma2(first).detach()) == pytest.approx(float(first.mean()), rel=1e-6)
    assert bool(p.initialised)
    assert float(p.sigma2(second).detach()) == pytest.approx(float(first.mean()), rel=1e-6)  # not again
    # the flag travels in the state_dict: a resumed policy does not re-initialise at its next batch
    q = make_policy("learned", init_sigma2=1.0, init_mle=True)
    q.load_state_dict(p.state_dict())
    q.train()
    assert float(q.sigma2(second).detach()) == pytest.approx(float(first.mean()), rel=1e-6)
    # a plain learned policy keeps its old state_dict keys (old checkpoints load)
    assert set(make_policy("learned").state_dict()) == {"log_sigma2"}


def test_learned_options_are_checked_and_name_the_lr():
    assert make_policy("learned", log_sigma2_lr=0.05).optimizer_options() == {"lr": 0.05}
    assert make_policy("learned").optimizer_options() == {}
    assert make_policy("ar").optimizer_options() == {}
    with pytest.raises(ValueError, match="log_sigma2_lr"):
        make_policy("learned", log_sigma2_lr=0.0)


def test_annealed_floor_is_log_linear_and_counts_training_steps():
    p = make_policy("ar-annealed", anneal_steps=4, anneal_from=1.0, floor=1e-4)
    assert [p.current_floor(t) for t in (0, 2, 4, 9)] == pytest.approx([1.0, 1e-2, 1e-4, 1e-4])
    small = _sq(0, scale=0.01)  # MLE ~1e-4: the floor binds until it has decayed
    mle = float(small.mean())
    got = [float(p.sigma2(small)) for _ in range(6)]
    expected = [max(mle, 10 ** -min(t, 4)) for t in range(6)]
    assert got == pytest.approx(expected, rel=1e-9)
    assert int(p.num_steps) == 6
    p.eval()
    p.sigma2(small)
    assert int(p.num_steps) == 6  # evaluation does not advance the schedule
    big = _sq(0, scale=3.0)  # above every floor: plain AR-ELBO
    assert float(p.sigma2(big)) == pytest.approx(float(big.mean()))
    with pytest.raises(ValueError, match="anneal_steps"):
        make_policy("ar-annealed", anneal_steps=0)


def test_annealed_loss_with_binding_floor_is_the_fixed_sigma2_loss():
    """While the floor binds, the loss (value and gradient) is the fixed-sigma2 VAE's at floor_t."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 4, generator=g, dtype=torch.float64)
    x_hat = (x + 0.01 * torch.randn(6, 4, generator=g, dtype=torch.float64)).requires_grad_()
    mu, logvar = torch.zeros(6, 2, dtype=torch.float64), torch.zeros(6, 2, dtype=torch.float64)
    ann = GaussianVAELoss("ar-annealed", anneal_steps=10, sigma2_floor=1e-6)
    fixed = GaussianVAELoss("fixed", sigma2=1.0)
    a = ann(x, x_hat, mu, logvar)
    (ga,) = torch.autograd.grad(a.loss, x_hat)
    b = fixed(x, x_hat, mu, logvar)
    (gb,) = torch.autograd.grad(b.loss, x_hat)
    assert float(a.loss.detach()) == pytest.approx(float(b.loss.detach()), rel=1e-12) and torch.allclose(ga, gb)
    assert float(a.sigma2) == 1.0


# ---------------------------------------------------------------------------------------------- training

pytest.importorskip("lightning")

from arelbo import runs  # noqa: E402
from arelbo.config import ConfigError, load_config  # noqa: E402
from arelbo.data import load_dataset  # noqa: E402
from arelbo.train import fit, resume  # noqa: E402

N_TRAIN, BATCH = 320, 32  # 10 steps per epoch


def tiny(*extra, policy="ar"):
    return load_config("linear-gaussian", overrides=[
        f"objective.policy={policy}", "model.arch=mlp", "model.hidden=[16]", "model.latent_dim=3",
        "model.out_activation=none",
        f"data.options={{n_train: {N_TRAIN}, n_val: 96, n_test: 32, eigenvalues: [3, 2, 1, 0.5, 0.2, 0.1]}}",
        f"data.batch_size={BATCH}", "data.eval_batch_size=40", "train.schedule=none", "train.epochs=2",
        "train.log_every_n_steps=1", "train.n_samples=0", *extra])


@pytest.fixture(scope="module")
def splits():
    return load_dataset("gaussian", n_train=N_TRAIN, n_val=96, n_test=32, eigenvalues=[3, 2, 1, 0.5, 0.2, 0.1])


def _ckpt(run_dir, which="last"):
    return runs.load_checkpoint(runs.checkpoint_path(run_dir, which))


def _same(a, b):
    for part in ("model", "objective"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["global_step"] == b["global_step"]


FAIR = ("objective.options.init_mle=true", "objective.options.log_sigma2_lr=0.05")


def test_fair_learned_trains_from_the_first_batch_mle_with_its_own_lr(tmp_path, splits):
    cfg = tiny(*FAIR, policy="learned")
    run_dir = fit(cfg, tmp_path / "fair", splits=splits, progress=False)
    train = [r for r in runs.read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    # step 0 used sigma2 = the first batch's MLE, i.e. its mean squared error
    assert train[0]["sigma2"] == pytest.approx(train[0]["mse"], rel=1e-5)
    ckpt = _ckpt(run_dir)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in groups] == [cfg.train.lr, 0.05] and cfg.train.lr != 0.05 and groups[1]["weight_decay"] == 0.0
    assert bool(ckpt["objective"]["policy.initialised"])


@pytest.mark.parametrize("policy,extra", [("learned", FAIR), ("ar-annealed", ("objective.options.anneal_steps=15", "objective.options.anneal_from=10"))])
def test_fair_and_annealed_policies_resume_exactly(tmp_path, splits, policy, extra):
    straight = fit(tiny(*extra, policy=policy), tmp_path / "straight", splits=splits, progress=False)
    split = fit(tiny(*extra, "train.epochs=1", policy=policy), tmp_path / "split", splits=splits, progress=False)
    resume(split, ["train.epochs=2"], splits=splits, progress=False)
    a, b = _ckpt(straight), _ckpt(split)
    _same(a, b)
    if policy == "ar-annealed":
        assert int(b["objective"]["policy.num_steps"]) == 20
        sig = [r["sigma2"] for r in runs.read_jsonl(split / "metrics.jsonl") if r["split"] == "train"]
        assert sig[0] == 10.0 and sig[-1] < 10.0  # the floor bound at step 0 and has decayed since
    assert runs.read_jsonl(straight / "metrics.jsonl") == runs.read_jsonl(split / "metrics.jsonl")


def test_snapshots_are_kept_at_the_chosen_steps_and_equal_a_shorter_run(tmp_path, splits):
    run_dir = fit(tiny("train.snapshot_steps=[13, 4]", policy="ar-ema"), tmp_path / "snap", splits=splits,
                  progress=False)
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.pt"))
    assert names == ["step-13.pt", "step-4.pt"]
    snap = _ckpt(run_dir, runs.snapshot_name(13))
    assert snap["global_step"] == 13 and snap["config"]["train"]["snapshot_steps"] == [4, 13]
    model, loss_fn, _ = runs.load_model(run_dir, "step-4")
    assert int(loss_fn.policy.num_updates) == 4
    # the snapshot at step 13 is the state a run stopped at max_steps=13 ends with
    short = fit(tiny("train.max_steps=13", policy="ar-ema"), tmp_path / "short", splits=splits, progress=False)
    _same(snap, _ckpt(short))
    with pytest.raises(ConfigError, match="snapshot_steps"):
        tiny("train.snapshot_steps=[0]")
