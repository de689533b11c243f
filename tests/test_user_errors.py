"""A user's mistakes end in one line saying what to fix (exit code 2, no traceback), are caught before any long work,
and never overwrite or delete the user's files: run folders, study folders, demo folders, edited configs, output
paths, evaluation flags, prior options and data roots."""

import hashlib
import inspect
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("lightning")

from arelbo import cli, runs  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

# a linear VAE on 1000 Gaussian vectors: one epoch trains in about a second
TINY = ["train.epochs=1", "data.options.n_train=1000", "data.options.n_val=200", "data.options.n_test=200",
        "data.batch_size=250", "train.log_every_n_steps=1"]


def arelbo(*argv) -> int:
    return cli.main([str(a) for a in argv])


def sets(*overrides) -> list[str]:
    return [item for o in overrides for item in ("--set", o)]


def one_line_error(capsys, command: str) -> str:
    """The whole stderr of a failed command: exactly one line, `arelbo COMMAND: error: ...`."""
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"arelbo {command}: error: "), lines[0]
    assert "Errno" not in lines[0] and "Traceback" not in lines[0]
    return lines[0]


def tree(path: Path) -> dict:
    """Every file and folder under ``path`` (``.lock`` files aside) with its content's hash: "nothing changed"."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.name == runs.LOCK_FILE:
            continue
        rel = str(p.relative_to(path))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def train_tiny(out: Path, *extra: str) -> Path:
    assert arelbo("train", "--preset", "linear-gaussian", *sets(*TINY, *extra), "--out", out, "--quiet") == 0
    return out


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    """One tiny finished linear run, shared by the tests that only read it (or copy it)."""
    return train_tiny(tmp_path_factory.mktemp("linear") / "run")


def _fail_if_called(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} was called: the arguments were not checked first")
    return fail


# ---------------------------------------------------------------------------------------------- 1. train --out


@pytest.mark.parametrize("content", ["hello\n", "own"])
def test_train_out_refuses_a_folder_whose_config_yaml_arelbo_did_not_write(tmp_path, capsys, content):
    """A folder holding the user's own config.yaml (any text, or a valid config of theirs), metrics.jsonl and
    tensorboard/ is not "a run that stopped before its first checkpoint": refused, nothing touched."""
    mine = tmp_path / "mine"
    mine.mkdir()
    if content == "own":  # the user's own, valid arelbo config (e.g. saved with --print-config)
        assert arelbo("train", "--preset", "linear-gaussian", "--print-config") == 0
        content = capsys.readouterr().out
    (mine / "config.yaml").write_text(content)
    (mine / "metrics.jsonl").write_text('{"mine": 1}\n')
    (mine / "tensorboard").mkdir()
    (mine / "tensorboard" / "notes.txt").write_text("keep me")
    before = tree(mine)
    assert arelbo("train", "--preset", "linear-gaussian", *sets(*TINY), "--out", mine, "--quiet") == 2
    line = one_line_error(capsys, "train")
    assert str(mine) in line and "config.yaml" in line and "--out" in line
    assert tree(mine) == before and not (mine / runs.LOCK_FILE).exists()


def test_train_out_starts_again_only_a_run_arelbo_wrote(tmp_path, capsys):
    """A run that stopped before its first checkpoint is started again (its config.yaml is arelbo's); once the
    user edits that config.yaml it is theirs: refused."""
    run = train_tiny(tmp_path / "run")
    (run / "samples.png").unlink(missing_ok=True)
    for f in (run / runs.CHECKPOINT_DIR).iterdir():  # as if it had died before its first checkpoint
        f.unlink()
    config = tmp_path / "copy.yaml"
    config.write_text((run / "config.yaml").read_text())
    assert arelbo("train", "--config", config, "--out", run, "--quiet") == 0
    assert (run / runs.CHECKPOINT_DIR / "last.pt").is_file()

    for f in (run / runs.CHECKPOINT_DIR).iterdir():
        f.unlink()
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "# my notes\n")
    before = tree(run)
    assert arelbo("train", "--config", config, "--out", run, "--quiet") == 2
    line = one_line_error(capsys, "train")
    assert "config.yaml" in line and "changed" in line
    assert tree(run) == before


def test_a_run_written_before_the_marker_still_resumes(tmp_path):
    """Run directories of older versions have no marker next to config.yaml: with a checkpoint they resume."""
    run = train_tiny(tmp_path / "old")
    for p in run.iterdir():
        if p.name.startswith(".arelbo"):
            p.unlink()
    assert arelbo("train", "--resume", run, "--set", "train.epochs=2", "--quiet") == 0
    assert runs.load_checkpoint(run / runs.CHECKPOINT_DIR / "last.pt")["epoch"] == 1


# ---------------------------------------------------------------------------------------------- 2. compare --out

STUDY = ["--preset", "linear-gaussian", "--epochs", "1", *sets(*TINY[1:]), "--no-fid", "--is-examples", "8", "--k",
         "2", "--quiet"]


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_study_refuses_a_folder_that_is_not_a_study(tmp_path, capsys, command):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("# my report\n")
    (mine / "results.json").write_text('{"mine": 1}\n')
    before = tree(mine)
    policies = ["--policies", "ar"] if command == "compare" else ["--sigma2", "1", "--reference", "ar"]
    assert arelbo(command, *STUDY, *policies, "--out", mine) == 2
    line = one_line_error(capsys, command)
    assert str(mine) in line and "study" in line and "report.md" in line
    assert tree(mine) == before
    assert arelbo(command, *STUDY, *policies, "--out", mine, "--report-only") == 2
    assert "study" in one_line_error(capsys, command)
    assert tree(mine) == before


# ---------------------------------------------------------------------------------------------- 3. resume


def test_resume_refuses_a_config_yaml_edited_to_disagree_with_the_checkpoint(tmp_path, linear_run, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    config = run / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("latent_dim: 4", "latent_dim: 2"))
    before = tree(run)
    assert arelbo("train", "--resume", run, "--set", "train.epochs=2", "--quiet") == 2
    line = one_line_error(capsys, "train")
    assert "model.latent_dim" in line and str(config) in line and "4" in line and "2" in line
    assert tree(run) == before  # nothing written: still resumable once put back

    config.write_text(original.replace("lr: 0.01", "lr: fast"))
    assert "lr: fast" in config.read_text()
    assert arelbo("train", "--resume", run, "--set", "train.epochs=2", "--quiet") == 2
    line = one_line_error(capsys, "train")
    assert "train.lr" in line and str(config) in line

    config.write_text(original)
    assert arelbo("train", "--resume", run, "--set", "train.epochs=2", "--quiet") == 0


# ---------------------------------------------------------------------------------------------- 4. failed studies


def test_a_study_whose_every_run_failed_exits_2_with_the_reason(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = tmp_path / "st"
    assert arelbo("compare", *STUDY, "--policies", "ar,fixed:1", "--out", out, "--runs-dir", afile) == 2
    line = one_line_error(capsys, "compare")
    assert str(afile) in line
    assert not (out / "report.md").exists() and not (out / "results.json").exists()

    # every run fails while training (its data file is missing): exit 2 naming the reason, no empty report
    out = tmp_path / "st2"
    assert arelbo("compare", *STUDY, "--policies", "ar,fixed:1", "--out", out,
                  *sets("data.name=npz", "data.options={}", f"data.root={tmp_path / 'missing.npz'}")) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("arelbo compare: error: ") and "missing.npz" in last and "Traceback" not in err
    assert not (out / "report.md").exists() and not (out / "results.json").exists()


def test_report_only_on_a_folder_without_a_study_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert arelbo("compare", *STUDY, "--policies", "ar", "--out", empty, "--report-only") == 2
    assert "study" in one_line_error(capsys, "compare")
    assert list(empty.iterdir()) == []
    assert arelbo("compare", *STUDY, "--policies", "ar", "--out", tmp_path / "new", "--report-only") == 2
    one_line_error(capsys, "compare")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------- 5. named, early errors


def _bad_value(default):
    return 3 if isinstance(default, str) else "many"


def test_every_prior_option_of_the_wrong_type_is_named_with_its_type():
    from arelbo.config import ConfigError, ModelConfig
    from arelbo.models.priors import PRIORS

    checked = 0
    for name, cls in PRIORS.items():
        for opt, p in inspect.signature(cls.__init__).parameters.items():
            if opt in ("self", "latent_dim", "shape") or p.default is inspect.Parameter.empty or p.default is None:
                continue
            bad = _bad_value(p.default)
            with pytest.raises(ConfigError) as err:
                ModelConfig(prior=name, prior_options={opt: bad})
            message = str(err.value)
            assert message.startswith(f"model.prior_options.{opt} must be "), message
            default = list(p.default) if isinstance(p.default, tuple) else p.default  # as a config spells it
            assert f"(default {default!r})" in message and message.endswith(f"got {bad!r}"), message
            checked += 1
    assert checked >= 7
    with pytest.raises(ConfigError) as err:
        ModelConfig(prior="mog", prior_options={"components": "many"})
    assert str(err.value) == "model.prior_options.components must be an integer (default 10), got 'many'"
    ModelConfig(prior="mog", prior_options={"components": 3, "init_std": 1, "learn_weights": False})  # fine
    ModelConfig(prior="flow", prior_options={"hidden": [8, 8], "transforms": 2})


def test_prior_option_type_is_an_error_before_any_data_is_loaded(tmp_path, capsys, monkeypatch):
    import arelbo.train.loop as loop

    monkeypatch.setattr(loop, "load_splits", _fail_if_called("loading the data"))
    assert arelbo("train", "--preset", "linear-gaussian", *sets("model.prior=mog", "model.prior_options.components=many"),
                  "--out", tmp_path / "r", "--quiet") == 2
    line = one_line_error(capsys, "train")
    assert "model.prior_options.components must be an integer (default 10), got 'many'" in line
    assert not (tmp_path / "r").exists()


def test_eval_checks_its_arguments_and_the_run_dir_before_loading(tmp_path, linear_run, capsys, monkeypatch):
    monkeypatch.setattr(runs, "load_model", _fail_if_called("load_model"))
    monkeypatch.setattr(runs, "load_checkpoint", _fail_if_called("load_checkpoint"))
    assert arelbo("eval", linear_run, "--seed", -1, "--no-write") == 2
    assert "seed" in one_line_error(capsys, "eval")

    afile = tmp_path / "afile"
    afile.write_text("x")
    assert arelbo("eval", afile) == 2
    line = one_line_error(capsys, "eval")
    assert "is a file, not a run directory" in line and "does not exist" not in line


def test_eval_of_a_read_only_run_says_so_before_working(tmp_path, linear_run, capsys, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # the run directory as a user without write permission sees it
        if mode & os.W_OK and Path(path).resolve() == run.resolve():
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    with monkeypatch.context() as m:
        m.setattr(runs, "load_model", _fail_if_called("load_model"))
        assert arelbo("eval", run, "--n-samples", 0, "--is-examples", 5, "--quiet") == 2
        line = one_line_error(capsys, "eval")
        assert str(run) in line and "--no-write" in line
    assert not (run / "metrics.json").exists()
    # --no-write evaluates it all the same
    assert arelbo("eval", run, "--no-write", "--n-samples", 0, "--is-examples", 5, "--k", 2, "--sampler", "prior",
                  "--quiet", "--json") == 0
    assert not (run / "metrics.json").exists()


def test_linear_checks_the_plot_path_before_fitting(tmp_path, capsys, monkeypatch):
    import arelbo.linear as L

    monkeypatch.setattr(L, "gaussian_data", _fail_if_called("the linear fits"))
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "ro").mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # ro/ as a user without write permission sees it
        if mode & os.W_OK and Path(path).resolve() == (tmp_path / "ro").resolve():
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    for path, words in [(tmp_path / "adir", "is a folder"), (tmp_path / "afile" / "p.png", "is a file"),
                        (tmp_path / "ro" / "p.png", "not writable"), (tmp_path / "ro" / "new" / "p.png", "not writable")]:
        assert arelbo("linear", "--plot", path) == 2
        line = one_line_error(capsys, "linear")
        assert "--plot" in line and words in line, line


def test_demo_out_that_is_a_file_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert arelbo("demo", "--out", afile, "--quiet") == 2
    line = one_line_error(capsys, "demo")
    assert str(afile) in line and "is a file" in line
    assert afile.read_text() == "x"


def _tiny_mnist():
    from arelbo.data import Splits, load_dataset

    full = load_dataset("mnist")
    return Splits("mnist", full.train[:64], full.val[:32], full.test[:16])


def test_demo_overwrite_replaces_only_a_folder_the_demo_wrote(tmp_path):
    from arelbo.config import ConfigError
    from arelbo.demo import run_demo

    splits = _tiny_mnist()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "samples.png").write_bytes(b"my own picture")
    (mine / "summary.md").write_text("my notes")
    before = tree(mine)
    kw = dict(epochs=1, steps_per_epoch=1, batch_size=16, progress=False, splits=splits)
    with pytest.raises((FileExistsError, ConfigError), match="samples.png"):
        run_demo(mine, overwrite=True, **kw)
    assert tree(mine) == before

    demo = tmp_path / "demo"
    run_demo(demo, **kw)
    (demo / "notes.txt").write_text("keep")
    run_demo(demo, overwrite=True, **kw)  # the demo's own folder: replaced
    assert (demo / "summary.md").is_file() and (demo / "notes.txt").read_text() == "keep"


def test_reconstruct_refuses_more_images_than_the_split_has(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "blobs.npz", x=(rng.random((60, 8, 8)) * 255).astype(np.uint8))
    cfg = {"data": {"name": "npz", "root": str(tmp_path / "blobs.npz"), "batch_size": 16, "eval_batch_size": 8},
           "model": {"arch": "conv", "hidden": [4, 8], "latent_dim": 2}, "train": {"epochs": 1, "n_samples": 0}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert arelbo("train", "--config", tmp_path / "tiny.yaml", "--out", run, "--quiet") == 0
    capsys.readouterr()
    assert arelbo("reconstruct", run, "--n", 100000) == 2
    line = one_line_error(capsys, "reconstruct")
    assert "--n 100000" in line and "test split has 6" in line
    assert not (run / "reconstructions-test.png").exists()
    assert arelbo("reconstruct", run, "--n", 6) == 0


def test_a_mistyped_mnist_root_leaves_nothing_behind(tmp_path, monkeypatch):
    from arelbo.data import DatasetError, load_dataset
    from arelbo.data import mnist as mnist_mod

    def offline(url, dest, timeout):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(mnist_mod, "fetch_url", offline)
    typo = tmp_path / "dtaa"
    with pytest.raises(DatasetError, match="download"):
        load_dataset("mnist", typo)
    assert not typo.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "readme.txt").write_text("mine")
    with pytest.raises(DatasetError):
        load_dataset("mnist", existing)
    assert sorted(p.name for p in existing.iterdir()) == ["readme.txt"]
    assert json.dumps(tree(existing)) == json.dumps({"readme.txt": hashlib.sha256(b"mine").hexdigest()})
