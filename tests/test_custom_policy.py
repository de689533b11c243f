"""A decoder-variance policy defined only here trains, validates, evaluates and runs in a study through its own
class: its option comes through ``--set objective.options.NAME=...`` and its held-out rule is the one used by
training validation, ``arelbo eval`` and ``arelbo compare``. Options of another policy are errors that name the
valid ones."""

import json
import math

import pytest

pytest.importorskip("lightning")

from arelbo import cli, runs  # noqa: E402
from arelbo.config import ConfigError, load_config  # noqa: E402
from arelbo.objectives import POLICIES, DecoderVariance, HeldOutSigma2, register_policy  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = [
    "data.options={n_train: 96, n_val: 32, n_test: 40, eigenvalues: [3, 2, 1, 0.5, 0.2, 0.1]}",
    "data.batch_size=32",
    "data.eval_batch_size=16",
    "model.arch=mlp",
    "model.hidden=[8]",
    "model.latent_dim=2",
    "model.out_activation=none",
    "train.log_every_n_steps=1",
    "train.schedule=none",
    "train.n_samples=0",
]


class ScaledAR(DecoderVariance):
    """sigma2 = scale x the batch maximum-likelihood value; on held-out data, scale x the split's MLE."""

    name = "test-scaled-ar"
    label = "scaled AR"

    def __init__(self, scale: float = 1.0, floor: float = 1e-6):
        super().__init__(floor)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = float(scale)

    def sigma2(self, sq_err):
        return (self.scale * sq_err.detach().mean()).clamp_min(self.floor)

    def held_out_sigma2(self, stats):
        return HeldOutSigma2(self.scale * stats.ar_sigma2().clamp_min(self.floor), "isotropic",
                             f"scaled eval-set MLE (x{self.scale:g})")


@pytest.fixture
def scaled_ar():
    register_policy(ScaledAR)
    yield ScaledAR
    POLICIES.pop(ScaledAR.name)


def arelbo(*argv):
    return cli.main([str(a) for a in argv])


def sets(*overrides):
    return [item for o in overrides for item in ("--set", o)]


def isotropic_neg_elbo(distortion, kl, d, s2):
    return distortion / (2 * s2) + 0.5 * d * math.log(2 * math.pi * s2) + kl


def test_custom_policy_trains_validates_and_evaluates_by_its_own_rule(tmp_path, scaled_ar, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--preset", "linear-gaussian", *sets(*TINY, "train.epochs=1", f"objective.policy={ScaledAR.name}",
                                                          "objective.options.scale=2"), "--out", run_dir, "--quiet"]
    assert arelbo(*argv) == 0
    cfg = runs.read_config(run_dir)
    assert cfg.objective.policy == ScaledAR.name and cfg.objective.options == {"scale": 2.0}
    _, loss_fn, _ = runs.load_model(run_dir, "last")
    assert isinstance(loss_fn.policy, ScaledAR) and loss_fn.policy.scale == 2.0
    assert loss_fn.check_finite == "auto"  # the loss's own default: no device sync per call in a user's loop

    # validation: sigma2 = 2 x the validation set's MLE, and the -ELBO at that sigma2
    val = [r for r in runs.read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "val"][-1]
    d = 6
    assert val["sigma2"] == pytest.approx(2 * val["distortion"] / d, rel=1e-12)
    assert val["neg_elbo"] == pytest.approx(isotropic_neg_elbo(val["distortion"], val["kl"], d, val["sigma2"]),
                                            rel=1e-12)
    # training records: the policy's batch value, 2 x the batch MSE
    train = [r for r in runs.read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert all(r["sigma2"] == pytest.approx(2 * r["mse"], rel=1e-5) for r in train)

    # arelbo eval: the same rule, fitted on the validation split, scoring the test split
    assert arelbo("eval", run_dir, "--checkpoint", "last", "--n-samples", "0", "--k", "2", "--is-examples", "8",
                  "--smoothness-examples", "8", "--mi-examples", "8", "--no-fid", "--no-progress") == 0
    capsys.readouterr()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ne = metrics["likelihood"]["neg_elbo"]
    assert ne["sigma2_source"] == "scaled MLE (x2), fitted on the validation split"
    assert ne["sigma2"] == pytest.approx(2 * metrics["likelihood"]["sigma2_val"], rel=1e-12)
    assert ne["neg_elbo"] == pytest.approx(isotropic_neg_elbo(ne["distortion"], ne["rate"], d, ne["sigma2"]), rel=1e-12)
    # -ELBO under the common rule (the validation MLE, near the test split's own) is lower than at twice it
    assert metrics["likelihood"]["neg_elbo_ar"]["neg_elbo"] < ne["neg_elbo"]


def test_options_of_another_policy_are_errors_naming_the_valid_ones(scaled_ar, capsys):
    with pytest.raises(ConfigError, match=r"objective.options.sigma2: not an option of policy 'test-scaled-ar'; "
                                          r"its options: scale \(sigma2 is an option of: fixed\)"):
        load_config("linear-gaussian", overrides=[f"objective.policy={ScaledAR.name}", "objective.options.sigma2=0.1"])
    with pytest.raises(ConfigError, match=r"not an option of policy 'ar'; it takes no options \(sigma2 is an option "
                                          r"of: fixed\)"):
        load_config("linear-gaussian", overrides=["objective.options.sigma2=0.1"])
    with pytest.raises(ConfigError, match="scale must be > 0, got -1"):
        load_config("linear-gaussian", overrides=[f"objective.policy={ScaledAR.name}", "objective.options.scale=-1"])
    with pytest.raises(ConfigError, match="objective.options.scale must be float"):
        load_config("linear-gaussian", overrides=[f"objective.policy={ScaledAR.name}", "objective.options.scale=big"])
    # the old flat keys point at the new place
    with pytest.raises(ConfigError, match=r"unknown key objective.sigma2.*objective.options.sigma2"):
        load_config("linear-gaussian", overrides=["objective.policy=fixed", "objective.sigma2=0.1"])
    # through the command line: one line, exit code 2
    assert arelbo("train", "--preset", "linear-gaussian", "--set", "objective.options.momentum=0.5",
                  "--print-config") == 2
    err = capsys.readouterr().err
    assert "not an option of policy 'ar'" in err and "momentum is an option of: ar-ema" in err and "Traceback" not in err
    # defaults are filled in, so config.yaml records every option the policy used
    assert load_config("linear-gaussian", overrides=[f"objective.policy={ScaledAR.name}"]).objective.options == {
        "scale": 1.0}


def test_custom_policy_runs_in_a_study(tmp_path, scaled_ar):
    out = tmp_path / "st"
    argv = ["compare", "--preset", "linear-gaussian", "--out", out, *sets(*TINY), "--policies",
            f"{ScaledAR.name}:3,ar", "--epochs", "1", "--steps-per-epoch", "2", "--eval-samples", "0", "--no-fid",
            "--no-gmm", "--is-examples", "8", "--k", "2", "--quiet"]
    assert arelbo(*argv) == 0
    results = json.loads((out / "results.json").read_text())
    mine = next(p for p in results["policies"] if p["policy"] == ScaledAR.name)
    assert mine["spec"] == f"{ScaledAR.name}:3" and mine["label"] == "scaled AR scale=3"
    assert mine["n_done"] == 1 and mine["sigma2_kind"] == "estimated"
    run_dir = out / mine["cells"][0]["run_dir"]
    assert runs.read_config(run_dir).objective.options == {"scale": 3.0}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ne = metrics["likelihood"]["neg_elbo"]
    assert ne["sigma2"] == pytest.approx(3 * metrics["likelihood"]["sigma2_val"], rel=1e-12)  # its rule, on val
    # a bad value is an error naming the spec
    assert arelbo("compare", "--preset", "linear-gaussian", "--out", tmp_path / "bad", "--policies",
                  f"{ScaledAR.name}:-1", "--dry-run") == 2


PLUGIN = '''
from arelbo.objectives import AR, register_policy


@register_policy
class PluginAR(AR):
    """AR-ELBO under another name, registered by a module the user names in ARELBO_PLUGINS."""

    name = "test-plugin-ar"
    label = "plugin AR"
'''


def test_shell_command_and_study_subprocesses_import_plugins(tmp_path):
    """A policy in a user's module reaches the `arelbo` shell command, and the processes `compare --jobs 2`
    starts, through ARELBO_PLUGINS; without it the name is unknown; a module that cannot be imported is one line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "my_policies.py").write_text(PLUGIN)
    src = str(Path(runs.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), src]), "OMP_NUM_THREADS": "1"}

    def cli_run(*args, plugins=None):
        e = dict(env)
        e.pop("ARELBO_PLUGINS", None)
        if plugins is not None:
            e["ARELBO_PLUGINS"] = plugins
        return subprocess.run([sys.executable, "-m", "arelbo.cli", *map(str, args)], env=e, capture_output=True,
                              text=True, timeout=300)

    unknown = cli_run("train", "--preset", "linear-gaussian", "--set", "objective.policy=test-plugin-ar", "--print-config")
    assert unknown.returncode == 2 and "'test-plugin-ar' unknown" in unknown.stderr
    missing = cli_run("train", "--print-config", plugins="no_such_module_here")
    assert missing.returncode == 2 and "ARELBO_PLUGINS: cannot import 'no_such_module_here'" in missing.stderr
    assert "Traceback" not in missing.stderr
    out = tmp_path / "st"
    study = cli_run("compare", "--preset", "linear-gaussian", "--out", out, *sets(*TINY), "--policies",
                    "test-plugin-ar,ar", "--epochs", "1", "--steps-per-epoch", "2", "--eval-samples", "0", "--no-fid",
                    "--no-gmm", "--is-examples", "8", "--k", "2", "--jobs", "2", "--quiet", plugins="my_policies")
    assert study.returncode == 0, study.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    mine = next(p for p in results["policies"] if p["policy"] == "test-plugin-ar")
    assert mine["label"] == "plugin AR" and mine["n_done"] == 1
