"""The `arelbo` train / sample / reconstruct / demo commands, end to end on tiny data."""

import os

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("lightning")

from arelbo import cli, runs  # noqa: E402

MINE = ("train", "sample", "reconstruct", "demo", "eval")


@pytest.fixture(autouse=True)
def only_my_commands(monkeypatch):
    """Route through cli.main with just these commands (other modules of the router are tested elsewhere)."""
    monkeypatch.setattr(cli, "COMMANDS", {k: v for k, v in cli.COMMANDS.items() if k in MINE})


def arelbo(*argv):
    return cli.main([str(a) for a in argv])


@pytest.fixture
def image_config(tmp_path):
    """A tiny image dataset (60 blobs of 8x8, uint8, in an .npz) and a config file for a tiny conv VAE."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    centres = rng.uniform(1, 7, size=(60, 2))
    images = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 3.0)
    np.savez(tmp_path / "blobs.npz", x=(images * 255).astype(np.uint8))
    cfg = {
        "data": {"name": "npz", "root": str(tmp_path / "blobs.npz"), "batch_size": 16, "eval_batch_size": 8},
        "model": {"arch": "conv", "hidden": [4, 8], "latent_dim": 2},
        "train": {"epochs": 1, "log_every_n_steps": 1, "n_samples": 4},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_sample_reconstruct_resume(tmp_path, image_config, capsys):
    run_dir = tmp_path / "run"
    assert arelbo("train", "--config", image_config, "--set", "objective.policy=ar-ema", "--out", run_dir, "--quiet") == 0
    assert f"run directory: {run_dir}" in capsys.readouterr().out
    assert runs.read_config(run_dir).objective.policy == "ar-ema"
    assert (run_dir / "samples.png").is_file()  # written at the end of training
    assert runs.load_checkpoint(run_dir / "checkpoints" / "last.pt")["global_step"] == 3  # 48 train / 16

    assert arelbo("sample", run_dir, "--n", 6, "--nrow", 3, "--out", tmp_path / "s.png") == 0
    image = Image.open(tmp_path / "s.png")
    assert image.size == (2 + 3 * 10, 2 + 2 * 10)  # 3 x 2 tiles of 8 px with 2 px padding

    assert arelbo("reconstruct", run_dir, "--n", 4, "--split", "val") == 0
    rec = Image.open(run_dir / "reconstructions-val.png")
    assert rec.mode == "RGB" and rec.size[1] > 2 * 8

    assert arelbo("train", "--resume", run_dir, "--set", "train.epochs=2", "--quiet") == 0
    assert runs.load_checkpoint(run_dir / "checkpoints" / "last.pt")["global_step"] == 6
    assert runs.read_config(run_dir).train.epochs == 2


def test_sample_from_the_gmm_fitted_by_eval(tmp_path, image_config, capsys):
    """`arelbo sample --sampler gmm` decodes draws of the mixture `arelbo eval` saved, and only for the checkpoint
    it was fitted on."""
    import torch

    from arelbo.evaluate import evaluate_run
    from arelbo.imagegrid import make_grid
    from arelbo.samplers import load_sampler

    run_dir = tmp_path / "run"
    assert arelbo("train", "--config", image_config, "--out", run_dir, "--quiet") == 0
    assert arelbo("sample", run_dir, "--sampler", "gmm", "--checkpoint", "last") == 2
    assert "fit one with `arelbo eval" in capsys.readouterr().err
    evaluate_run(run_dir, which="last", samplers="gmm", sampler_options={"gmm": {"n_components": 2}}, n_samples=0,
                 is_examples=0, smoothness_examples=0, mi_examples=0, progress=False)
    assert arelbo("sample", run_dir, "--sampler", "gmm", "--checkpoint", "last", "--n", 6, "--seed", 3) == 0
    written = np.asarray(Image.open(run_dir / "samples-gmm.png"))
    # the same grid computed independently: the saved mixture's draws through the checkpoint's decoder
    model, _, _ = runs.load_model(run_dir, "last")
    gmm, _ = load_sampler(run_dir / "samplers" / "gmm.pt")
    z = gmm.sample(6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = make_grid(model.decode(z))
    np.testing.assert_array_equal(written.reshape(expected.shape), expected)
    # another epoch changes last.pt: the old fit is refused, never silently used
    assert arelbo("train", "--resume", run_dir, "--set", "train.epochs=2", "--quiet") == 0
    capsys.readouterr()
    assert arelbo("sample", run_dir, "--sampler", "gmm", "--checkpoint", "last") == 2
    assert "with other weights" in capsys.readouterr().err
    assert arelbo("sample", run_dir, "--sampler", "maf") == 2
    assert "unknown sampler 'maf'" in capsys.readouterr().err


def test_train_errors_are_one_line(tmp_path, image_config, capsys):
    assert arelbo("train", "--preset", "mnist-cnn") == 2
    err = capsys.readouterr().err
    assert "unknown preset 'mnist-cnn'" in err and "mnist-conv" in err and "celeba64-conv" in err
    assert "Traceback" not in err

    assert arelbo("train", "--preset", "mnist-conv", "--set", "train.epoch=3") == 2
    err = capsys.readouterr().err
    assert "unknown key train.epoch" in err and "epochs" in err

    assert arelbo("train", "--preset", "mnist-conv", "--set", "modle.latent_dim=3") == 2
    assert "valid top-level keys: data, model, objective, train" in capsys.readouterr().err

    assert arelbo("train", "--preset", "mnist-conv", "--set", "train.epochs=ten") == 2
    assert "train.epochs must be int, got 'ten'" in capsys.readouterr().err

    assert arelbo("train", "--preset", "mnist-conv", "--set", "objective.policy=arelbo") == 2
    assert "known: ar, ar-annealed, ar-conditional, ar-diagonal, ar-ema" in capsys.readouterr().err

    assert arelbo("train", "--resume", tmp_path / "missing") == 2
    assert "does not exist" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert arelbo("train", "--resume", tmp_path / "empty") == 2
    assert "no config.yaml" in capsys.readouterr().err

    assert arelbo("train", "--resume", tmp_path / "empty", "--preset", "mnist-conv") == 2
    assert "drop --preset" in capsys.readouterr().err

    assert arelbo("sample", tmp_path / "missing") == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny run (the blobs config, one epoch) shared by the error tests that only read it."""
    tmp = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(0)
    np.savez(tmp / "blobs.npz", x=(rng.random((60, 8, 8)) * 255).astype(np.uint8))
    cfg = {"data": {"name": "npz", "root": str(tmp / "blobs.npz"), "batch_size": 16, "eval_batch_size": 8},
           "model": {"arch": "conv", "hidden": [4, 8], "latent_dim": 2}, "train": {"epochs": 1, "n_samples": 4}}
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", "--config", str(tmp / "tiny.yaml"), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp / "run"


def one_line_error(capsys, command: str) -> str:
    """The whole stderr of a failed command: exactly one line, `arelbo COMMAND: error: ...`."""
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"arelbo {command}: error: "), lines[0]
    return lines[0]


def test_bad_flags_and_paths_are_one_line_errors(tmp_path, trained_run, capsys):
    import shutil

    import torch

    capsys.readouterr()
    (tmp_path / "adir").mkdir()
    assert arelbo("train", "--config", tmp_path / "adir") == 2
    assert "is a folder: give the path of a YAML file" in one_line_error(capsys, "train")

    config = trained_run / "config.yaml"
    (tmp_path / "afile").write_text("x")
    assert arelbo("train", "--config", config, "--out", tmp_path / "afile" / "run", "--quiet") == 2
    assert "Not a directory" in one_line_error(capsys, "train")

    if not torch.cuda.is_available():
        assert arelbo("train", "--config", config, "--set", "train.accelerator=gpu", "--out", tmp_path / "g", "--quiet") == 2
        assert "train.accelerator" in one_line_error(capsys, "train")
        assert arelbo("eval", trained_run, "--device", "cuda") == 2
        assert "--device cuda: no cuda device is available here" in one_line_error(capsys, "eval")

    assert arelbo("sample", trained_run, "--nrow", -3) == 2
    assert "--nrow must be >= 1" in one_line_error(capsys, "sample")
    assert arelbo("reconstruct", trained_run, "--nrow", 0) == 2
    assert "--nrow must be >= 1" in one_line_error(capsys, "reconstruct")
    assert arelbo("sample", trained_run, "--out", tmp_path / "adir") == 2
    assert "is a folder: give a file name" in one_line_error(capsys, "sample")
    assert arelbo("sample", trained_run, "--out", tmp_path / "afile" / "s.png") == 2
    assert "afile is a file, not a folder" in one_line_error(capsys, "sample")

    for flag, value, message in [("--is-examples", -5, "eval.is_examples must be >= 0, got -5"),
                                 ("--max-examples", 0, "eval.max_examples must be >= 1, got 0"),
                                 ("--feature-net", "nope", "unknown feature network 'nope'; choose from"),
                                 ("--n-samples", -1, "eval.n_samples must be >= 0")]:
        assert arelbo("eval", trained_run, flag, value, "--no-write") == 2
        assert message in one_line_error(capsys, "eval")
    assert not (trained_run / "metrics.json").exists()  # nothing recorded for a refused command

    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            assert arelbo("sample", trained_run, "--out", ro / "s.png") == 2
            assert "Permission denied" in one_line_error(capsys, "sample")
        finally:
            ro.chmod(0o700)

    # a corrupt checkpoint and one holding more than tensors (refused by weights_only loading)
    for name, payload in [("garbage", b"not a checkpoint at all"), ("pickle", None)]:
        bad = tmp_path / name
        shutil.copytree(trained_run, bad)
        if payload is None:
            torch.save({"config": {}, "model": {}, "evil": _Evil()}, bad / "checkpoints" / "best.pt")
        else:
            (bad / "checkpoints" / "best.pt").write_bytes(payload)
        assert arelbo("sample", bad) == 2
        line = one_line_error(capsys, "sample")
        assert str(bad / "checkpoints" / "best.pt") in line and "is damaged or not an arelbo checkpoint" in line


class _Evil:
    """Stands for an arbitrary object in a checkpoint: weights_only loading must refuse it."""


def test_a_real_bug_keeps_its_traceback_and_debug_shows_every_traceback(trained_run, capsys, monkeypatch):
    from arelbo.cli import sample as sample_cli

    def broken(args):
        raise TypeError("boom")

    monkeypatch.setattr(sample_cli, "run", broken)
    capsys.readouterr()
    assert arelbo("sample", trained_run) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "TypeError: boom" in err and "this is a bug in arelbo" in err
    with pytest.raises(ValueError, match="--nrow"):
        monkeypatch.undo()
        arelbo("--debug", "sample", trained_run, "--nrow", 0)

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_cli, "run", interrupted)
    assert arelbo("sample", trained_run) == 130
    assert "interrupted" in capsys.readouterr().err


def test_existing_run_and_resume_restrictions(tmp_path, image_config, capsys):
    run_dir = tmp_path / "run"
    assert arelbo("train", "--config", image_config, "--out", run_dir, "--quiet") == 0
    capsys.readouterr()
    assert arelbo("train", "--config", image_config, "--out", run_dir, "--quiet") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert arelbo("train", "--resume", run_dir, "--set", "model.latent_dim=3") == 2
    assert "only train.* settings" in capsys.readouterr().err


def test_list_presets_and_print_config(capsys):
    assert arelbo("train", "--list-presets") == 0
    names = capsys.readouterr().out.split()
    assert {"mnist-conv", "mnist-mlp", "celeba64-conv", "linear-gaussian"} <= set(names)
    assert arelbo("train", "--preset", "celeba64-conv", "--set", "train.epochs=3", "--print-config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 3 and printed["model"]["hidden"] == [128, 256, 512, 1024]


def test_sample_refuses_non_images(tmp_path):
    from arelbo.config import load_config
    from arelbo.train import fit

    cfg = load_config("linear-gaussian", overrides=["train.epochs=1", "data.options.n_train=500", "data.batch_size=250"])
    run_dir = fit(cfg, tmp_path / "lin", progress=False)
    assert not (run_dir / "samples.png").exists()
    assert arelbo("sample", run_dir) == 2


def test_demo_small(tmp_path, capsys):
    """The demo's whole pipeline on a small MNIST subset and a few steps (the full demo is a slow test)."""
    from arelbo.data import Splits, load_dataset
    from arelbo.demo import run_demo

    full = load_dataset("mnist")
    splits = Splits("mnist", full.train[:256], full.val[:200], full.test[:16])
    rows = run_demo(tmp_path / "demo", epochs=1, steps_per_epoch=3, batch_size=16, progress=False, splits=splits)
    out = capsys.readouterr().out
    assert [r["folder"] for r in rows] == ["ar", "fixed-sigma2-1"]
    assert rows[1]["val"]["sigma2"] == 1.0
    summary = (tmp_path / "demo" / "summary.md").read_text()
    for word in ("AR-ELBO (ar)", "fixed sigma^2 = 1", "MSE", "KL", "active units", "final sigma^2", "bits/dim"):
        assert word in summary and word in out
    grid = Image.open(tmp_path / "demo" / "samples.png")
    assert grid.size[0] > 3 * grid.size[1] * 0.8  # three grids side by side: ar prior, ar GMM, sigma^2 = 1 prior
    # AR-ELBO's GMM sampler: fitted on its training codes, saved where `arelbo sample --sampler gmm` finds it
    assert rows[0]["gmm"]["num_codes"] == 256 and "Gaussian mixture" in summary and "--sampler gmm" in summary
    assert arelbo("sample", tmp_path / "demo" / "ar", "--sampler", "gmm", "--checkpoint", "last", "--n", "4",
                  "--out", tmp_path / "g.png") == 0
    assert Image.open(tmp_path / "g.png").size[0] > 0
    for folder in ("ar", "fixed-sigma2-1"):
        runs.load_model(tmp_path / "demo" / folder)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_demo(tmp_path / "demo", epochs=1, steps_per_epoch=1, batch_size=16, progress=False, splits=splits)


@pytest.mark.slow
def test_demo_full(tmp_path):
    """`arelbo demo` as shipped: AR-ELBO ends with more active units than sigma^2 = 1."""
    assert arelbo("demo", "--out", tmp_path / "demo", "--quiet") == 0
    summary = (tmp_path / "demo" / "summary.md").read_text()
    assert "(more active units)" in summary


def test_os_errors_name_the_path_and_what_to_do(capsys):
    """OSErrors (as raised by open/mkdir) become one line with the path and a hint: checked on each errno kind."""
    import errno

    cases = [(PermissionError(errno.EACCES, "Permission denied", "/data/x"), "Permission denied: /data/x; check its permissions"),
             (NotADirectoryError(errno.ENOTDIR, "Not a directory", "afile/run"), "Not a directory: afile/run; a part of that path is a file"),
             (IsADirectoryError(errno.EISDIR, "Is a directory", "out"), "Is a directory: out; that is a folder: give a file path"),
             (OSError(errno.ENOSPC, "No space left on device", "/big"), "No space left on device: /big; free some disk space")]
    for err, expected in cases:
        assert cli.handle_error("train", err) == 2
        assert expected in one_line_error(capsys, "train")
