"""The trainer: logging, checkpoints, exact resume, the NaN guard and multi-process equivalence.

Everything runs on tiny problems (an 8-dimensional Gaussian, a one-layer MLP VAE, a few steps per epoch).
"""

import math
import time

import pytest
import torch

pytest.importorskip("lightning")

from lightning.pytorch.callbacks import Callback  # noqa: E402

from arelbo import runs  # noqa: E402
from arelbo.config import ConfigError, load_config  # noqa: E402
from arelbo.data import load_dataset  # noqa: E402
from arelbo.train import EpochSampler, NonFiniteLossError, TrainingInterrupted, fit, resume  # noqa: E402

N_TRAIN, BATCH = 320, 32  # 10 steps per epoch


def tiny(*extra, policy="ar"):
    return load_config(
        "linear-gaussian",
        overrides=[
            f"objective.policy={policy}",
            "model.arch=mlp",
            "model.hidden=[16]",
            "model.latent_dim=3",
            "model.out_activation=none",
            f"data.options={{n_train: {N_TRAIN}, n_val: 96, n_test: 32, eigenvalues: [3, 2, 1, 0.5, 0.2, 0.1]}}",
            f"data.batch_size={BATCH}",
            "data.eval_batch_size=40",
            "train.schedule=none",
            "train.epochs=2",
            "train.log_every_n_steps=1",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def splits():
    return load_dataset("gaussian", n_train=N_TRAIN, n_val=96, n_test=32, eigenvalues=[3, 2, 1, 0.5, 0.2, 0.1])


def _params(run_dir, which="last"):
    return runs.load_checkpoint(runs.checkpoint_path(run_dir, which))


def _assert_same_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["objective"]:
        assert torch.equal(a["objective"][k], b["objective"][k]), k
    assert a["global_step"] == b["global_step"]


def test_sampler_order_depends_only_on_seed_and_epoch():
    s = EpochSampler(100, 10, shuffle=True, seed=3, drop_last=True)
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(0)
    assert list(s) != first
    t = EpochSampler(100, 10, shuffle=True, seed=3, drop_last=True)
    t.set_epoch(1)
    assert list(t) == first and sorted(first) == list(range(100))
    # two processes: each gets its contiguous half of every global batch
    halves = [EpochSampler(100, 10, True, 3, True, rank=r, world=2) for r in (0, 1)]
    for h in halves:
        h.set_epoch(1)
    a, b = list(halves[0]), list(halves[1])
    for k in range(10):
        assert sorted(a[5 * k : 5 * k + 5] + b[5 * k : 5 * k + 5]) == sorted(first[10 * k : 10 * k + 10])
    # incomplete last batch: dropped, or trimmed to a multiple of the process count
    assert len(EpochSampler(25, 10, False, 0, drop_last=True)) == 20
    assert len(EpochSampler(25, 10, False, 0, drop_last=False)) == 25
    assert len(EpochSampler(25, 10, False, 0, drop_last=False, rank=0, world=2)) == 12
    with pytest.raises(ConfigError, match="divisible"):
        EpochSampler(25, 9, False, 0, True, rank=0, world=2)


def test_run_directory_contents(tmp_path, splits):
    run_dir = fit(tiny(), tmp_path / "run", splits=splits, progress=False)
    assert (run_dir / "config.yaml").is_file()
    assert runs.read_config(run_dir) == tiny(f"out_dir={tmp_path}", "name=run")
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    records = runs.read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == list(range(20))
    assert {"loss", "mse", "distortion", "rate", "sigma2", "neg_elbo", "bits_per_dim", "lr", "epoch"} <= set(train[0])
    assert math.isclose(train[0]["mse"] * 6, train[0]["distortion"], rel_tol=1e-5)
    assert [r["epoch"] for r in val] == [0, 1] and [r["step"] for r in val] == [10, 20]
    v = val[-1]
    assert {"neg_elbo", "bits_per_dim", "mse", "kl", "kl_per_dim", "active_units", "sigma2"} <= set(v)
    assert len(v["kl_per_dim"]) == 3 and 0 <= v["active_units"] <= 3 and v["n"] == 96
    assert math.isclose(v["bits_per_dim"], v["neg_elbo"] / (6 * math.log(2)))
    assert math.isclose(sum(v["kl_per_dim"]), v["kl"], rel_tol=1e-9)
    # ar: the validation -ELBO uses sigma2 = validation MSE, i.e. (D/2)(log(2 pi sigma2) + 1) + KL
    assert math.isclose(v["sigma2"], v["mse"])
    assert math.isclose(v["neg_elbo"], 3 * (math.log(2 * math.pi * v["mse"]) + 1) + v["kl"], rel_tol=1e-9)
    # checkpoints: our format, weights_only, loadable by runs.load_model; best is the lowest validation -ELBO
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["format"] == runs.CHECKPOINT_FORMAT and last["data_shape"] == [6, 1, 1] and last["epoch"] == 1
    assert {"optimizer_states", "loops", "rng", "config", "model", "objective"} <= set(last)
    model, loss_fn, ckpt = runs.load_model(run_dir)
    assert loss_fn.policy_name == "ar" and model.latent_dim == 3
    best = min(val, key=lambda r: r["neg_elbo"])
    assert _params(run_dir, "best")["val"]["neg_elbo"] == best["neg_elbo"]
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


def test_existing_run_directory_is_not_overwritten(tmp_path, splits):
    fit(tiny("train.epochs=1"), tmp_path / "run", splits=splits, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        fit(tiny("train.epochs=1"), tmp_path / "run", splits=splits, progress=False)


@pytest.mark.parametrize("policy", ["ar", "ar-ema"])
def test_resume_is_exact(tmp_path, splits, policy):
    straight = fit(tiny(policy=policy), tmp_path / "straight", splits=splits, progress=False)
    split = fit(tiny("train.epochs=1", policy=policy), tmp_path / "split", splits=splits, progress=False)
    assert _params(split)["global_step"] == 10
    resume(split, ["train.epochs=2"], splits=splits, progress=False)
    a, b = _params(straight), _params(split)
    _assert_same_state(a, b)
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    if policy == "ar-ema":
        assert int(b["objective"]["policy.num_updates"]) == 20
    # the logs of the two runs are the same history, too
    assert runs.read_jsonl(straight / "metrics.jsonl") == runs.read_jsonl(split / "metrics.jsonl")
    assert runs.read_config(split).train.epochs == 2


class Kill(Callback):
    """Raise at a chosen global step, as if the process had been killed there."""

    def __init__(self, step, exc=KeyboardInterrupt):
        self.step, self.exc = step, exc

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise self.exc(f"killed at step {self.step}")


def test_kill_mid_epoch_leaves_loadable_checkpoint_and_resumes_exactly(tmp_path, splits):
    straight = fit(tiny(policy="ar-ema"), tmp_path / "straight", splits=splits, progress=False)
    run_dir = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed at step 14"):
        fit(tiny(policy="ar-ema"), run_dir, splits=splits, progress=False, callbacks=[Kill(14, RuntimeError)])
    model, loss_fn, ckpt = runs.load_model(run_dir, "last")
    assert ckpt["global_step"] == 10 and ckpt["epoch"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the killed run's log tail (steps 10-13) is dropped on resume; the result equals the straight run
    resume(run_dir, splits=splits, progress=False)
    _assert_same_state(_params(straight), _params(run_dir))
    assert runs.read_jsonl(straight / "metrics.jsonl") == runs.read_jsonl(run_dir / "metrics.jsonl")


def test_ctrl_c_stops_with_a_resume_hint(tmp_path, splits):
    run_dir = tmp_path / "interrupted"
    with pytest.raises(TrainingInterrupted, match=f"global step 12 .*--resume {run_dir}"):
        fit(tiny(), run_dir, splits=splits, progress=False, callbacks=[Kill(12, KeyboardInterrupt)])
    assert runs.load_checkpoint(run_dir / "checkpoints" / "last.pt")["global_step"] == 10
    assert not (run_dir / "samples.png").exists()


class PoisonBatch(Callback):
    """Put a NaN into the data batch of one global step."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch[0].view(-1)[0] = float("nan")


@pytest.mark.parametrize("policy", ["ar", "fixed"])
def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, splits, policy):
    run_dir = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError) as err:
        fit(tiny("train.epochs=3", policy=policy), run_dir, splits=splits, progress=False, callbacks=[PoisonBatch(13)])
    msg = str(err.value)
    assert "global step 13" in msg and "epoch 1" in msg and "last.pt" in msg
    model, loss_fn, ckpt = runs.load_model(run_dir, "last")
    assert ckpt["global_step"] == 10
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert all(torch.isfinite(t).all() for t in ckpt["objective"].values())
    steps = [r["step"] for r in runs.read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert max(steps) == 12  # nothing logged for the bad step


def test_nan_from_the_model_is_caught(tmp_path, splits, monkeypatch):
    from arelbo.models import VAE

    decode = VAE.decode
    calls = {"n": 0}

    def bad_decode(self, z):
        calls["n"] += 1
        out = decode(self, z)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(VAE, "decode", bad_decode)
    with pytest.raises(NonFiniteLossError, match="global step 3 .epoch 0"):
        fit(tiny(), tmp_path / "nan", splits=splits, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoints/last.pt"):
        resume(tmp_path / "nan", splits=splits, progress=False)  # died before its first checkpoint


def test_resume_errors(tmp_path, splits):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resume(tmp_path / "missing")
    run_dir = fit(tiny("train.epochs=1"), tmp_path / "run", splits=splits, progress=False)
    with pytest.raises(ConfigError, match="only train"):
        resume(run_dir, ["model.latent_dim=5"], splits=splits)


def test_learned_policy_trains_its_parameter_and_cosine_schedule(tmp_path, splits):
    run_dir = fit(tiny("train.schedule=cosine", "train.warmup_steps=3", "train.lr=5e-2", policy="learned"),
                  tmp_path / "learned", splits=splits, progress=False)
    ckpt = _params(run_dir)
    assert ckpt["objective"]["policy.log_sigma2"] != 0.0  # init_sigma2 = 1 -> log 0; it moved
    lrs = [r["lr"] for r in runs.read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert lrs[0] == pytest.approx(5e-2 / 3) and max(lrs) == pytest.approx(5e-2) and lrs[-1] < 5e-3


@pytest.mark.parametrize("policy", ["ar-diagonal", "ar-per-sample", "beta", "fixed"])
def test_other_policies_validate_with_their_sigma2(tmp_path, splits, policy):
    options = ["objective.options.sigma2=0.5"] if policy == "fixed" else []  # an option of fixed only
    cfg = tiny("train.epochs=1", "train.limit_train_batches=3", *options, policy=policy)
    v = runs.read_jsonl(fit(cfg, tmp_path / policy, splits=splits, progress=False) / "metrics.jsonl")[-1]
    assert v["split"] == "val" and math.isfinite(v["neg_elbo"]) and v["step"] == 3
    if policy == "fixed":  # -ELBO at the given sigma2: D/2 log(2 pi s2) + distortion / (2 s2) + KL
        assert v["sigma2"] == 0.5
        assert v["neg_elbo"] == pytest.approx(3 * math.log(math.pi) + v["distortion"] + v["kl"], rel=1e-9)
    if policy == "beta":
        assert v["sigma2"] == 0.5  # beta = 1 -> sigma2 = beta / 2
    if policy == "ar-diagonal":  # per-element MLE on the validation set: -ELBO <= the isotropic one
        iso = 3 * (math.log(2 * math.pi * v["mse"]) + 1) + v["kl"]
        assert v["neg_elbo"] <= iso + 1e-9 and v["sigma2"] == pytest.approx(v["mse"])
    if policy == "ar-per-sample":  # per-sample MLE: also below the isotropic value (Jensen)
        assert v["neg_elbo"] <= 3 * (math.log(2 * math.pi * v["mse"]) + 1) + v["kl"] + 1e-9


def test_bf16_mixed_precision_runs(tmp_path, splits):
    cfg = tiny("train.epochs=1", "train.limit_train_batches=3", "train.precision=bf16-mixed", "train.accelerator=cpu")
    v = runs.read_jsonl(fit(cfg, tmp_path / "bf16", splits=splits, progress=False) / "metrics.jsonl")[-1]
    assert v["split"] == "val" and math.isfinite(v["neg_elbo"])


def test_benchmark_steps_times_the_pipeline(splits):
    from arelbo.train import benchmark_steps

    seconds = benchmark_steps(tiny(), splits, steps=4, warmup=2)
    assert 0 < seconds < 5


def test_two_processes_match_one_process_sigma2_trajectory(tmp_path, splits):
    """DDP on CPU (gloo, 2 spawned processes, 16 samples each) vs 1 process on the same global batch of 32."""
    extra = ["train.accelerator=cpu", "train.epochs=1"]
    one = fit(tiny(*extra), tmp_path / "one", splits=splits, progress=False)
    t0 = time.perf_counter()
    two = fit(tiny(*extra, "train.devices=2"), tmp_path / "two", splits=splits, progress=False)
    elapsed = time.perf_counter() - t0
    a = runs.read_jsonl(one / "metrics.jsonl")
    b = runs.read_jsonl(two / "metrics.jsonl")
    sa = [r["sigma2"] for r in a if r["split"] == "train"]
    sb = [r["sigma2"] for r in b if r["split"] == "train"]
    assert len(sa) == len(sb) == 10
    assert sa == pytest.approx(sb, rel=1e-5)
    va, vb = a[-1], b[-1]
    assert va["split"] == vb["split"] == "val" and va["n"] == vb["n"] == 96
    assert va["neg_elbo"] == pytest.approx(vb["neg_elbo"], rel=1e-5)
    ta, tb = _params(one)["model"], _params(two)["model"]
    assert all(torch.allclose(ta[k], tb[k], rtol=1e-4, atol=1e-6) for k in ta)
    print(f"2-process fit took {elapsed:.1f} s")
