"""Runs that never lose or corrupt work: exact resume from any step, step checkpoints, finite checkpoints only,
safe run directories, damaged files, the run lock, resumable overrides.

Every checkpoint here is made by training (a tiny MLP VAE on an 8-dimensional Gaussian, 10 steps per epoch).
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from lightning.pytorch.callbacks import Callback  # noqa: E402

from arelbo import cli, runs  # noqa: E402
from arelbo.config import load_config  # noqa: E402
from arelbo.data import load_dataset  # noqa: E402
from arelbo.train import NonFiniteLossError, fit, resume  # noqa: E402

N_TRAIN, BATCH = 320, 32  # 10 steps per epoch
DATA = f"data.options={{n_train: {N_TRAIN}, n_val: 96, n_test: 32, eigenvalues: [3, 2, 1, 0.5, 0.2, 0.1]}}"
TINY = ["model.arch=mlp", "model.hidden=[16]", "model.latent_dim=3", "model.out_activation=none", DATA,
        f"data.batch_size={BATCH}", "data.eval_batch_size=40", "train.epochs=2", "train.log_every_n_steps=1",
        "train.schedule=none",
        "train.n_samples=0"]

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(*extra, policy="ar"):
    return load_config("linear-gaussian", overrides=[f"objective.policy={policy}", *TINY, *extra])


@pytest.fixture(scope="module")
def splits():
    return load_dataset("gaussian", n_train=N_TRAIN, n_val=96, n_test=32, eigenvalues=[3, 2, 1, 0.5, 0.2, 0.1])


def last(run_dir):
    return runs.load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")


def assert_identical(a, b):
    """Every tensor of the two checkpoints equal (model, objective, optimiser state), same step and epoch."""
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    for part in ("model", "objective"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    sa, sb = a["optimizer_states"][0], b["optimizer_states"][0]
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), f"optimizer {i}.{k}"


def same_model(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def arelbo(*argv):
    return cli.main([str(a) for a in argv])


class Raise(Callback):
    """Raise at the start of a chosen global step, as if the process died there."""

    def __init__(self, step, exc=RuntimeError):
        self.step, self.exc = step, exc

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise self.exc(f"killed at step {self.step}")


# ---- 1. exact resume from any step; step checkpoints -------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory, splits):
    """The uninterrupted reference: 2 epochs of 10 steps, ar-ema (its running sigma2 is state that must resume)."""
    return fit(tiny(policy="ar-ema"), tmp_path_factory.mktemp("straight") / "run", splits=splits, progress=False)


def test_max_steps_stop_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path, splits, straight):
    run = fit(tiny("train.max_steps=15", policy="ar-ema"), tmp_path / "run", splits=splits, progress=False)
    assert last(run)["global_step"] == 15 and last(run)["epoch_batches_done"] == 5
    resume(run, ["train.max_steps=null"], splits=splits, progress=False)
    assert_identical(last(straight), last(run))
    assert runs.read_jsonl(straight / "metrics.jsonl") == runs.read_jsonl(run / "metrics.jsonl")


def test_resume_to_more_epochs_finishes_the_interrupted_epoch_first(tmp_path, splits, straight):
    run = fit(tiny("train.epochs=1", "train.max_steps=4", policy="ar-ema"), tmp_path / "run", splits=splits,
              progress=False)
    resume(run, ["train.epochs=2", "train.max_steps=null"], splits=splits, progress=False)
    assert_identical(last(straight), last(run))
    assert runs.read_jsonl(straight / "metrics.jsonl") == runs.read_jsonl(run / "metrics.jsonl")


def test_a_copy_of_a_finished_run_continued_to_more_epochs_is_the_longer_run(tmp_path, splits, straight):
    """What benchmarks/study_mnist_longer.sh rests on: a finished run, copied and resumed with more epochs, is the
    run trained that long from the start (constant lr), and the original stays as it was."""
    import shutil

    short = fit(tiny("train.epochs=1", policy="ar-ema"), tmp_path / "short", splits=splits, progress=False)
    before = {p: p.read_bytes() for p in sorted(short.rglob("*")) if p.is_file()}
    longer = Path(shutil.copytree(short, tmp_path / "longer"))
    resume(longer, ["train.epochs=2"], splits=splits, progress=False)
    assert_identical(last(straight), last(longer))
    assert runs.read_jsonl(straight / "metrics.jsonl") == runs.read_jsonl(longer / "metrics.jsonl")
    assert runs.read_config(longer).train.epochs == 2
    assert {p: p.read_bytes() for p in sorted(short.rglob("*")) if p.is_file()} == before


def test_step_checkpoints_lose_at_most_n_steps_and_resume_exactly(tmp_path, splits, straight):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed at step 14"):
        fit(tiny("train.checkpoint_every_n_steps=3", policy="ar-ema"), run, splits=splits, progress=False,
            callbacks=[Raise(14)])
    ckpt = last(run)
    assert ckpt["global_step"] == 12 and ckpt["epoch"] == 1 and ckpt["epoch_batches_done"] == 2
    assert not list((run / "checkpoints").glob(".*.tmp"))
    resume(run, splits=splits, progress=False)
    ref = last(straight)
    assert_identical(ref, last(run))
    assert runs.read_jsonl(straight / "metrics.jsonl") == runs.read_jsonl(run / "metrics.jsonl")
    # best.pt is the same epoch-end state in both runs
    assert same_model(runs.load_checkpoint(run / "checkpoints" / "best.pt")["model"],
                      runs.load_checkpoint(straight / "checkpoints" / "best.pt")["model"])


def test_step_checkpoint_on_an_epochs_last_batch_is_written_after_validation(tmp_path, splits, straight):
    """Every 5 steps: steps 5 and 15 are mid-epoch, 10 and 20 end an epoch (written at the epoch end)."""
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed at step 11"):
        fit(tiny("train.checkpoint_every_n_steps=5", "train.checkpoint_every_n_epochs=100", policy="ar-ema"), run,
            splits=splits, progress=False, callbacks=[Raise(11)])
    ckpt = last(run)
    assert ckpt["global_step"] == 10 and ckpt["epoch_batches_done"] == 0 and ckpt["val"] is not None
    resume(run, ["train.checkpoint_every_n_epochs=1"], splits=splits, progress=False)
    assert_identical(last(straight), last(run))


def _wait_for(predicate, proc, timeout=120.0, what=""):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the training process ended ({proc.returncode}) before {what}: "
                                 f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _mid_epoch_checkpoint(path):
    try:
        ckpt = runs.load_checkpoint(path)
    except (FileNotFoundError, ValueError):
        return False
    return ckpt["epoch_batches_done"] > 0


def test_kill_9_mid_epoch_through_the_cli_resumes_exactly_and_the_lock_names_the_holder(tmp_path, splits, capsys):
    """`arelbo train` in a subprocess with a checkpoint every 3 steps: while it trains, a second `arelbo train
    --resume` is refused naming its pid; kill -9 once a mid-epoch checkpoint exists; resume to step 2 epochs
    later; every tensor equals an uninterrupted run's. (The lock dies with the process.)"""
    cfg = tiny("train.checkpoint_every_n_steps=3", "train.epochs=1000", policy="ar-ema")
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(cfg.to_yaml())
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(runs.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "arelbo.cli", "train", "--config", config_file, "--out", run,
                             "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Freeze the trainer (SIGSTOP) as soon as its last.pt is a mid-epoch one, so that no later checkpoint (an
        # epoch end) can replace it while the lock is checked; on a busy machine that window is seconds long.
        while True:
            _wait_for(lambda: _mid_epoch_checkpoint(run / "checkpoints" / "last.pt"), proc, what="a mid-epoch checkpoint")
            proc.send_signal(signal.SIGSTOP)
            if _mid_epoch_checkpoint(run / "checkpoints" / "last.pt"):
                break
            proc.send_signal(signal.SIGCONT)
        assert arelbo("train", "--resume", run, "--quiet") == 2  # the stopped process still holds the lock
        err = capsys.readouterr().err
        assert f"in use by pid {proc.pid} on host {socket.gethostname()}" in err and "Traceback" not in err
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ckpt = last(run)
    assert ckpt["epoch_batches_done"] > 0  # mid-epoch
    target = ckpt["global_step"] + 17  # past at least one epoch end (validation, epoch-end checkpoint)
    assert arelbo("train", "--resume", run, "--set", f"train.max_steps={target}", "--quiet") == 0
    ref = fit(tiny("train.checkpoint_every_n_steps=3", "train.epochs=1000", f"train.max_steps={target}",
                   policy="ar-ema"), tmp_path / "straight", splits=splits, progress=False)
    assert_identical(last(ref), last(run))
    assert runs.read_jsonl(ref / "metrics.jsonl") == runs.read_jsonl(run / "metrics.jsonl")


def test_two_runs_cannot_train_in_one_directory(tmp_path, splits):
    run = fit(tiny("train.epochs=1"), tmp_path / "run", splits=splits, progress=False)
    with runs.run_lock(run):  # as if another process were training it
        with pytest.raises(runs.RunInUseError, match=f"in use by pid {os.getpid()} on host"):
            resume(run, ["train.epochs=2"], splits=splits, progress=False)
        assert runs.read_config(run).train.epochs == 1
    resume(run, ["train.epochs=2"], splits=splits, progress=False)  # released
    assert last(run)["global_step"] == 20


# ---- 4. overrides on resume: applied to the restored state, or refused ----------------------------------------


@pytest.mark.parametrize("schedule", ["none", "cosine"])
def test_resume_applies_a_new_lr_to_the_restored_optimiser(tmp_path, splits, schedule):
    run = fit(tiny("train.epochs=1", "train.lr=0.01", f"train.schedule={schedule}"), tmp_path / "run", splits=splits,
              progress=False)
    resume(run, ["train.epochs=2", "train.lr=0.05", "train.weight_decay=0.5", "train.betas=[0.5, 0.9]"],
           splits=splits, progress=False)
    groups = last(run)["optimizer_states"][0]["param_groups"]
    assert groups[0]["weight_decay"] == 0.5 and tuple(groups[0]["betas"]) == (0.5, 0.9)
    lrs = {r["step"]: r["lr"] for r in runs.read_jsonl(run / "metrics.jsonl") if r["split"] == "train"}
    if schedule == "none":
        assert lrs[9] == 0.01 and lrs[10] == lrs[19] == 0.05 and groups[0]["lr"] == 0.05
    else:  # the cosine schedule over the new 20 steps, from the new base lr: 0.05 * (1 + cos(pi * s / 20)) / 2
        assert lrs[9] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 9 / 10)), rel=1e-12)
        for s in (10, 15, 19):
            assert lrs[s] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * s / 20)), rel=1e-12)
    assert runs.read_config(run).train.lr == 0.05


def test_resume_refuses_what_it_cannot_apply_and_records_nothing(tmp_path, splits, capsys):
    run = fit(tiny("train.epochs=1"), tmp_path / "run", splits=splits, progress=False)
    before = (run / "config.yaml").read_text()
    for setting in ("train.seed=3", "train.optimizer=adamw", "train.precision=bf16-mixed"):
        assert arelbo("train", "--resume", run, "--set", "train.epochs=2", "--set", setting, "--quiet") == 2
        err = capsys.readouterr().err
        assert "cannot change when resuming" in err and setting.split("=")[0] in err
    assert (run / "config.yaml").read_text() == before and last(run)["global_step"] == 10


# ---- 6. a failed resume changes nothing --------------------------------------------------------------------------


def test_resume_to_fewer_epochs_is_refused_and_the_run_stays_resumable(tmp_path, splits, capsys):
    run = fit(tiny(), tmp_path / "run", splits=splits, progress=False)
    before = (run / "config.yaml").read_text()
    assert arelbo("train", "--resume", run, "--set", "train.epochs=1", "--quiet") == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "raise train.epochs" in err and "Traceback" not in err
    assert (run / "config.yaml").read_text() == before
    assert arelbo("train", "--resume", run, "--quiet") == 2  # finished: said again, nothing changed
    resume(run, ["train.epochs=3"], splits=splits, progress=False)
    assert last(run)["global_step"] == 30 and runs.read_config(run).train.epochs == 3


# ---- 5. a checkpoint only from a finite state ---------------------------------------------------------------------


class Diverge(Callback):
    """After the optimiser step that reaches ``step``, push the posterior log-variance to 587 (what a diverging
    run showed): every weight stays finite, but encoding then decoding overflows to NaN."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            head = [m for m in module.model.encoder.modules() if isinstance(m, torch.nn.Linear)][-1]
            with torch.no_grad():
                head.bias[module.model.latent_dim:] = 587.0


def decodes_finite(run_dir, splits):
    model, _, _ = runs.load_model(run_dir, "last")
    with torch.no_grad():
        mu, logvar = model.encode(splits.val)
        return bool(torch.isfinite(model.decode(mu + torch.randn_like(mu) * (0.5 * logvar).exp())).all())


def test_no_checkpoint_after_a_diverged_validation(tmp_path, splits):
    """Diverged on the last step of epoch 1: its validation is NaN, so no epoch-end checkpoint of that state;
    the one named is epoch 0's, which decodes finite values and resumes to the end."""
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"validation -ELBO .* global step 20 .epoch 1.*last good checkpoint"):
        fit(tiny("train.epochs=3"), run, splits=splits, progress=False, callbacks=[Diverge(20)])
    assert last(run)["global_step"] == 10 and decodes_finite(run, splits)
    resume(run, splits=splits, progress=False)
    assert last(run)["global_step"] == 30 and decodes_finite(run, splits)


def test_no_step_checkpoint_of_a_diverged_state(tmp_path, splits):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite model state at global step 15 .*checkpoints/last.pt"):
        fit(tiny("train.checkpoint_every_n_steps=3"), run, splits=splits, progress=False, callbacks=[Diverge(15)])
    assert last(run)["global_step"] == 12 and decodes_finite(run, splits)
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written"):
        fit(tiny("train.checkpoint_every_n_steps=3"), tmp_path / "early", splits=splits, progress=False,
            callbacks=[Diverge(3)])
    assert not (tmp_path / "early" / "checkpoints" / "last.pt").exists()


# ---- 7. errors at start-up leave nothing; a run without a checkpoint can be started again --------------------------


@pytest.mark.parametrize("setting, message", [
    ("train.seed=-1", "train.seed must be >= 0"),
    ("model.norm=spectral", "unknown norm 'spectral'"),
    ("data.options={n_train: 10, n_val: 4, n_test: 4}", "fewer than one batch"),
    ("data.name=npz", "npz"),
])
def test_startup_errors_create_no_run_directory(tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    overrides = [a for s in TINY for a in ("--set", s)]
    assert arelbo("train", "--preset", "linear-gaussian", *overrides, "--set", setting, "--out", out, "--quiet") == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_without_a_gpu_is_refused_before_the_run_directory(tmp_path, capsys):
    overrides = [a for s in TINY for a in ("--set", s)]
    assert arelbo("train", "--preset", "linear-gaussian", *overrides, "--set", "train.accelerator=gpu",
                  "--out", tmp_path / "run", "--quiet") == 2
    assert "no GPU is available" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_run_that_died_before_its_first_checkpoint_can_be_started_again(tmp_path, splits, capsys):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed at step 3"):
        fit(tiny(), run, splits=splits, progress=False, callbacks=[Raise(3)])
    assert (run / "config.yaml").is_file() and not (run / "checkpoints" / "last.pt").exists()
    with pytest.raises(FileNotFoundError, match=f"arelbo train --config {run / 'config.yaml'} --out {run}"):
        resume(run, splits=splits, progress=False)
    fit(tiny(), run, splits=splits, progress=False)  # the same command again
    steps = [r["step"] for r in runs.read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(20)) and last(run)["global_step"] == 20
    with pytest.raises(FileExistsError, match="already holds a run"):
        fit(tiny(), run, splits=splits, progress=False)


# ---- 9. output directories ------------------------------------------------------------------------------------------


def test_out_must_be_a_new_or_empty_directory_or_a_run(tmp_path, capsys):
    overrides = [a for s in TINY for a in ("--set", s)]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "samples.png").write_bytes(b"my picture")
    (mine / "metrics.jsonl").write_text('{"mine": 1}\n')
    assert arelbo("train", "--preset", "linear-gaussian", *overrides, "--out", mine, "--quiet") == 2
    assert "not a run" in capsys.readouterr().err
    assert (mine / "samples.png").read_bytes() == b"my picture" and sorted(p.name for p in mine.iterdir()) == [
        "metrics.jsonl", "samples.png"]
    assert arelbo("train", "--preset", "linear-gaussian", *overrides, "--out", "", "--quiet") == 2
    assert "--out is empty" in capsys.readouterr().err
    for name in ("../../x", "a/b", ".."):
        assert arelbo("train", "--preset", "linear-gaussian", *overrides, "--set", f"out_dir={tmp_path / 'runs'}",
                      "--set", f"name={name}", "--quiet") == 2
        assert "plain folder name" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "x").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert arelbo("train", "--preset", "linear-gaussian", *overrides, "--set", "train.epochs=1", "--out", empty,
                  "--quiet") == 0


# ---- 2, 3. metrics.json's checkpoint step; checkpoint names ---------------------------------------------------------


def test_metrics_json_names_the_step_the_trainer_saved(tmp_path, splits):
    from arelbo.evaluate import evaluate_run

    run = fit(tiny("train.max_steps=7"), tmp_path / "run", splits=splits, progress=False)
    result = evaluate_run(run, which="last", samplers=None, n_samples=0, k=2, is_examples=10, smoothness_examples=10,
                          mi_examples=10, progress=False)
    assert result["checkpoint"]["step"] == 7 and result["checkpoint"]["epoch"] == 0
    assert json.loads((run / "metrics.json").read_text())["checkpoint"]["step"] == 7


def test_checkpoint_names_resolve_only_inside_the_run(tmp_path, splits, monkeypatch):
    run = fit(tiny("train.epochs=1"), tmp_path / "run", splits=splits, progress=False)
    other = fit(tiny("train.epochs=1", "train.seed=1"), tmp_path / "other", splits=splits, progress=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (cwd / "last.pt").write_bytes((other / "checkpoints" / "last.pt").read_bytes())
    (cwd / "foreign.pt").write_bytes((other / "checkpoints" / "last.pt").read_bytes())
    assert runs.checkpoint_path(run, "last.pt") == run / "checkpoints" / "last.pt"
    model, _, _ = runs.load_model(run, "last.pt")
    assert same_model(model.state_dict(), last(run)["model"])
    assert not same_model(model.state_dict(), last(other)["model"])
    with pytest.raises(FileNotFoundError, match="no checkpoint 'foreign.pt'"):
        runs.checkpoint_path(run, "foreign.pt")
    assert runs.checkpoint_path(run, "./foreign.pt") == Path("./foreign.pt")  # an explicit path stays explicit


# ---- 8. damaged files ------------------------------------------------------------------------------------------------


def test_damaged_metrics_log_is_repaired_on_resume(tmp_path, splits):
    run = fit(tiny("train.epochs=1"), tmp_path / "run", splits=splits, progress=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"note": "no step"}\n{"split": "train", "step": 10, "lo')  # a killed append
    resume(run, ["train.epochs=2"], splits=splits, progress=False)
    records = runs.read_jsonl(run / "metrics.jsonl")
    assert {"note": "no step"} in records
    assert [r["step"] for r in records if r.get("split") == "train"] == list(range(20))
    with open(run / "metrics.jsonl", "a") as f:
        f.write("not json\n{}\n")
    with pytest.raises(ValueError, match=rf"metrics.jsonl, line {len(records) + 1}: not valid JSON"):
        runs.read_jsonl(run / "metrics.jsonl")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_checkpoint_is_named_with_what_to_do(tmp_path, splits, capsys, damage):
    run = fit(tiny("train.epochs=1"), tmp_path / "run", splits=splits, progress=False)
    path = run / "checkpoints" / "last.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x80\x02garbage" * 100)
    assert arelbo("train", "--resume", run, "--set", "train.epochs=2", "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert f"checkpoint {path} is damaged" in err and "best.pt" in err
    assert len(err.splitlines()) == 1 and "weights_only=False" not in err


def test_damaged_sampler_file_is_refit_by_eval_and_named_by_sample(tmp_path, splits, capsys):
    from arelbo.evaluate import evaluate_run

    run = fit(tiny("train.epochs=1"), tmp_path / "run", splits=splits, progress=False)
    quick = dict(which="last", samplers="gmm", sampler_options={"gmm": {"n_components": 2}}, n_samples=0, k=2,
                 is_examples=10, smoothness_examples=10, mi_examples=10, progress=False)
    evaluate_run(run, **quick)
    gmm = run / "samplers" / "gmm.pt"
    gmm.write_bytes(gmm.read_bytes()[:100])
    assert arelbo("sample", run, "--sampler", "gmm", "--checkpoint", "last") == 2
    err = capsys.readouterr().err
    assert f"sampler file {gmm} is damaged" in err and "--refit-samplers" in err
    result = evaluate_run(run, **quick)
    assert f"sampler file {gmm} is damaged" in capsys.readouterr().err
    assert result["protocol"]["samplers"]["gmm"]["source"] == "fitted"
    evaluate_run(run, **quick)  # the refit was saved: reused now


def test_cuda_rng_state_is_the_current_devices_and_is_restored_on_each_ranks_device(monkeypatch):
    """Rank 0 saves its own device's CUDA generator (all ranks draw the same global noise from their own devices);
    every rank restores it on its current device. Before, rank 0 saved every device's state as it saw them, so
    rank 1 got an unused generator back (its noise restarted from the seed), and a checkpoint from a machine with
    more GPUs raised IndexError. torch.cuda is simulated (2 devices, this process on cuda:1): no GPU here."""
    own, fresh = torch.arange(16, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": own)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [own, fresh])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": calls.__setitem__("current", s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda ss: calls.__setitem__("all", ss))
    state = runs.rng_state()
    assert torch.equal(state["cuda"], own)
    runs.set_rng_state(state)
    assert torch.equal(calls["current"], own) and "all" not in calls
    calls.clear()
    runs.set_rng_state({**state, "cuda": [own, fresh, fresh]})  # an older checkpoint from a 3-GPU machine
    assert torch.equal(calls["current"], fresh) and "all" not in calls  # its cuda:1 entry, no IndexError


def test_fused_optimizer_trains_within_rounding_and_resumes_exactly(tmp_path, splits, straight):
    """train.fused_optimizer: Adam's update as one fused kernel. The run is the plain one up to float rounding,
    the optimiser really is the fused one, and a fused run stopped mid-epoch resumes to its uninterrupted twin."""
    seen = []

    class Fused(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(trainer.optimizers[0].defaults.get("fused"))

    full = fit(tiny("train.fused_optimizer=true", policy="ar-ema"), tmp_path / "full", splits=splits,
               progress=False, callbacks=[Fused()])
    assert set(seen) == {True}
    plain, fused = runs.read_jsonl(straight / "metrics.jsonl"), runs.read_jsonl(full / "metrics.jsonl")
    train = [(a, b) for a, b in zip(plain, fused) if a["split"] == "train"]
    assert len(train) == 20 and all(a["step"] == b["step"] for a, b in train)
    for a, b in train:
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
    assert any(a["loss"] != b["loss"] for a, b in train)  # another kernel: rounding differs somewhere
    stopped = fit(tiny("train.fused_optimizer=true", "train.max_steps=15", policy="ar-ema"), tmp_path / "run",
                  splits=splits, progress=False)
    resume(stopped, ["train.max_steps=null"], splits=splits, progress=False)
    assert_identical(last(full), last(stopped))


def test_compile_mode_is_a_checked_choice():
    from arelbo.config import ConfigError

    assert tiny("train.compile_mode=reduce-overhead").train.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="compile_mode"):
        tiny("train.compile_mode=fastest")
