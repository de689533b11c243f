"""Studies (arelbo compare / sweep): policy specs, planning and dedup, run states and resume, aggregation.

Training runs here are tiny: an MLP VAE on an 8-dimensional Gaussian, 2 epochs of 4 steps, no FID.
"""

import hashlib
import json
import math
import os
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from lightning.pytorch.callbacks import Callback  # noqa: E402

from arelbo import study as S  # noqa: E402
from arelbo.config import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = [
    "data.options={n_train: 128, n_val: 32, n_test: 32, eigenvalues: [3, 2, 1, 0.5, 0.2, 0.1]}",
    "data.batch_size=32",
    "data.eval_batch_size=32",
    "model.arch=mlp",
    "model.hidden=[8]",
    "model.latent_dim=3",
    "model.out_activation=none",
    "train.log_every_n_steps=1",
    "train.schedule=none",
]
TINY_EVAL = {"n_samples": 0, "is_examples": 8, "k": 4, "smoothness_examples": 16, "mi_examples": 32,
             "max_examples": None, "two_stage_steps": 10, "gmm": False}


def tiny_plan(out, policies="fixed:1,ar", seeds="0", epochs=2, steps=4, **kw):
    return S.plan_study(policies, seeds, out, preset="linear-gaussian", overrides=TINY, epochs=epochs,
                        steps_per_epoch=steps, eval_options={**TINY_EVAL, **kw.pop("eval_options", {})}, **kw)


def tree_state(d: Path) -> dict:
    """path -> (sha256, mtime_ns) of every file below d."""
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- policy specs


@pytest.mark.parametrize("text, spec, slug, objective, sampler, train_slug", [
    ("fixed:1", "fixed:1", "fixed-1", {"policy": "fixed", "options": {"sigma2": 1.0}}, "prior", "fixed-1"),
    (" FIXED:1e0 ", "fixed:1", "fixed-1", {"policy": "fixed", "options": {"sigma2": 1.0}}, "prior", "fixed-1"),
    ("fixed:0.1", "fixed:0.1", "fixed-0.1", {"policy": "fixed", "options": {"sigma2": 0.1}}, "prior", "fixed-0.1"),
    ("fixed:1e-4", "fixed:0.0001", "fixed-0.0001", {"policy": "fixed", "options": {"sigma2": 1e-4}}, "prior", "fixed-0.0001"),
    ("beta:4", "beta:4", "beta-4", {"policy": "beta", "options": {"beta": 4.0}}, "prior", "beta-4"),
    ("learned", "learned", "learned", {"policy": "learned"}, "prior", "learned"),
    ("learned:0.5", "learned:0.5", "learned-0.5", {"policy": "learned", "options": {"init_sigma2": 0.5}}, "prior", "learned-0.5"),
    ("two-stage", "two-stage", "two-stage", {"policy": "learned"}, "two-stage", "learned"),
    ("two-stage:0.5", "two-stage:0.5", "two-stage-0.5", {"policy": "learned", "options": {"init_sigma2": 0.5}}, "two-stage",
     "learned-0.5"),
    ("ar", "ar", "ar", {"policy": "ar"}, "prior", "ar"),
    ("ar-diagonal", "ar-diagonal", "ar-diagonal", {"policy": "ar-diagonal"}, "prior", "ar-diagonal"),
    ("ar-per-sample", "ar-per-sample", "ar-per-sample", {"policy": "ar-per-sample"}, "prior", "ar-per-sample"),
    ("ar-ema", "ar-ema", "ar-ema", {"policy": "ar-ema"}, "prior", "ar-ema"),
    ("ar-ema:0.9", "ar-ema:0.9", "ar-ema-0.9", {"policy": "ar-ema", "options": {"momentum": 0.9}}, "prior", "ar-ema-0.9"),
])
def test_parse_policy(text, spec, slug, objective, sampler, train_slug):
    p = S.parse_policy(text)
    assert (p.spec, p.slug, p.objective, p.sampler, p.train_slug) == (spec, slug, objective, sampler, train_slug)
    assert p.policy == objective["policy"]
    assert S.parse_policy(p.spec) == p  # canonical specs parse to themselves


@pytest.mark.parametrize("text, message", [
    ("", "empty policy spec"),
    ("fixed", "fixed needs its sigma2, e.g. fixed:0.1"),
    ("fixed:", "nothing after ':'"),
    ("fixed:abc", "sigma2 must be a number, got 'abc'"),
    ("fixed:0", r"sigma2 must be > 0, got 0"),
    ("fixed:-1", r"sigma2 must be > 0"),
    ("fixed:inf", r"sigma2 must be > 0"),
    ("fixed:nan", r"sigma2 must be > 0"),
    ("beta", "beta needs its value"),
    ("ar:2", "ar takes no argument"),
    ("ar-diagonal:1", "ar-diagonal takes no argument"),
    ("ar-ema:1", r"momentum must be >= 0 and < 1"),
    ("learned:-2", r"initial sigma2 must be > 0"),
    ("vae", "unknown policy 'vae'; valid forms: fixed:S"),
    ("sigma-vae", "unknown policy"),
])
def test_parse_policy_errors_are_clear(text, message):
    with pytest.raises(S.StudyError, match=message):
        S.parse_policy(text)
    assert issubclass(S.StudyError, ConfigError)  # the CLI prints it as one line, exit code 2


def test_parse_policies_seeds_floats():
    assert [p.spec for p in S.parse_policies("fixed:1, fixed:1.0,ar,,AR,two-stage")] == ["fixed:1", "ar", "two-stage"]
    assert [p.spec for p in S.parse_policies(S.DEFAULT_POLICIES)] == list(S.DEFAULT_POLICIES)
    assert S.parse_seeds("0,1,2") == [0, 1, 2] and S.parse_seeds("0-2") == [0, 1, 2]
    assert S.parse_seeds("3, 1,3, 0-1") == [0, 1, 3] and S.parse_seeds([2, 0]) == [0, 2]
    for bad in ("a", "-1", "3-1", ""):
        with pytest.raises(S.StudyError):
            S.parse_seeds(bad)
    assert S.parse_floats("1,0.1, 1e-2") == [1.0, 0.1, 0.01]
    for bad in ("1,x", "0", "-1", ""):
        with pytest.raises(S.StudyError):
            S.parse_floats(bad)
    specs = [p.spec for p in S.sweep_policies([0.01, 1, 1.0, 0.1], "ar,ar-ema")]
    assert specs == ["fixed:1", "fixed:0.1", "fixed:0.01", "ar", "ar-ema"]


# ---------------------------------------------------------------------------------------------- planning


def test_plan_dedups_specs_and_shares_two_stage_training(tmp_path):
    plan = tiny_plan(tmp_path / "st", "fixed:1,fixed:1.0,learned,two-stage,ar", "1,0")
    assert [p.spec for p in plan.policies] == ["fixed:1", "learned", "two-stage", "ar"]
    assert plan.seeds == [0, 1]
    assert [r.name for r in plan.runs] == ["fixed-1-s0", "fixed-1-s1", "learned-s0", "learned-s1", "ar-s0", "ar-s1"]
    learned = plan.run_by_name["learned-s1"]
    assert learned.policies == ["learned", "two-stage"] and learned.samplers == ["prior", "two-stage"]
    assert plan.cell("two-stage", 1) is learned and plan.cell("learned", 1) is learned
    assert plan.run_by_name["ar-s0"].samplers == ["prior"]
    assert any("two-stage seed 0 shares the training run learned-s0" in n for n in plan.dropped)
    for r in plan.runs:
        assert r.run_dir == tmp_path / "st" / "runs" / r.name
        assert r.config.train.seed == r.seed and r.config.name == r.name
        assert r.config.train.epochs == 2 and r.config.train.limit_train_batches == 4
    assert plan.run_by_name["fixed-1-s0"].config.objective.policy == "fixed"
    assert plan.run_by_name["fixed-1-s0"].config.objective.options == {"sigma2": 1.0}
    assert plan.run_by_name["learned-s0"].config.objective.policy == "learned"
    # the plan is JSON-able and records the cells
    d = json.loads(json.dumps(plan.to_dict()))
    assert {"policy": "two-stage", "seed": 1, "run": "learned-s1"} in d["cells"]
    assert d["base_config"]["model"]["hidden"] == [8]


def test_plan_scales_and_overrides(tmp_path):
    cpu = S.plan_study(["ar"], None, tmp_path, preset="mnist-conv")
    assert cpu.seeds == [0] and cpu.scale.name == "cpu"
    assert cpu.base_config.train.epochs == S.CPU_EPOCHS
    assert cpu.base_config.train.limit_train_batches == S.CPU_STEPS_PER_EPOCH
    assert cpu.eval.n_samples == S.CPU_EVAL_SAMPLES and cpu.eval.max_examples == S.CPU_MAX_EXAMPLES
    assert cpu.eval.gmm and [r.samplers for r in cpu.runs] == [["prior", "gmm"]]  # the GMM column by default
    two = S.plan_study(["two-stage"], None, tmp_path, preset="mnist-conv")
    assert two.runs[0].samplers == ["prior", "two-stage", "gmm"]
    assert two.eval.sampler_options(two.runs[0].samplers) == {"two-stage": {"steps": S.CPU_TWO_STAGE_STEPS,
                                                                            "noise": True}}
    mean_only = S.plan_study(["two-stage"], None, tmp_path, preset="mnist-conv",
                             eval_options={"two_stage_noise": False, "gmm": False})
    assert mean_only.runs[0].samplers == ["prior", "two-stage"]
    assert mean_only.eval.sampler_options(["two-stage"])["two-stage"]["noise"] is False
    paper = S.plan_study(["ar"], None, tmp_path, preset="mnist-conv", scale="paper")
    assert paper.seeds == [0, 1, 2] and paper.base_config.train.epochs == 20  # the preset's own epochs
    assert paper.base_config.train.limit_train_batches is None and paper.eval.gmm and paper.eval.n_samples == 10000
    assert [r.samplers for r in paper.runs] == [["prior", "gmm"]] * 3
    mine = S.plan_study(["ar"], "5", tmp_path, preset="mnist-conv", epochs=7, steps_per_epoch=0,
                        overrides=["train.lr=3e-4"], eval_options={"n_samples": 123})
    assert mine.seeds == [5] and mine.base_config.train.epochs == 7
    assert mine.base_config.train.limit_train_batches is None and mine.base_config.train.lr == 3e-4
    assert mine.eval.n_samples == 123 and mine.runs[0].config.train.seed == 5
    for bad, match in (("objective.policy=fixed", "--policies"), ("train.seed=3", "--seeds"), ("name=x", "--out")):
        with pytest.raises(S.StudyError, match=match):
            S.plan_study(["ar"], None, tmp_path, preset="mnist-conv", overrides=[bad])
    with pytest.raises(ConfigError, match="unknown key train.epoch"):
        S.plan_study(["ar"], None, tmp_path, preset="mnist-conv", overrides=["train.epoch=3"])


def test_eval_options_cli_args_match_kwargs():
    opts = S.EvalOptions(n_samples=50, fid=False, k=7, max_examples=100, two_stage_steps=30)
    args = opts.cli_args(["prior", "two-stage"])
    assert args[args.index("--sampler") + 1] == "prior,two-stage" and "--no-fid" in args
    options = [args[i + 1] for i, a in enumerate(args) if a == "--sampler-option"]
    assert options == ["two-stage.steps=30", "two-stage.noise=True"]
    from arelbo.evalconfig import EvalConfig
    from arelbo.cli.eval import add_arguments
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(["RUN", *args])
    kw = opts.evaluate_kwargs(["prior", "two-stage"])
    assert (ns.n_samples, ns.k, ns.max_examples, ns.which, ns.fid) == (kw["n_samples"], kw["k"],
                                                                        kw["max_examples"], kw["which"], kw["fid"])
    assert EvalConfig.from_args(ns) == opts.eval_config(["prior", "two-stage"]) == EvalConfig(**kw)
    assert kw["sampler_options"] == {"two-stage": {"steps": 30, "noise": True}}


# ---------------------------------------------------------------------------------------------- aggregation


def _fake_run(run_dir: Path, au, fid, kl_per_dim, sigma2, mse=0.5, fid_skip=None):
    run_dir.mkdir(parents=True)
    metrics = {
        "summary": {"active_units": au, "latent_dim": len(kl_per_dim), "kl_total": sum(kl_per_dim), "mse": mse,
                    "neg_elbo": 100.0 + au, "neg_elbo_bpd": 1.0, "is_nll": 99.0, "is_nll_bpd": 0.99,
                    "smoothness_mean": 0.25 * au, "neg_elbo_ar": 90.0, "neg_elbo_ar_bpd": 0.9, "mutual_information": 2.0},
        "collapse": {"kl_per_dim": kl_per_dim},
        "fid": {"prior": {"fid": fid, "protocol": {"feature_net": "mnist-features", "n_generated": 10}}
                if fid is not None else {"skipped": fid_skip}},
        "protocol": {"samplers": {"prior": {}}, "fid": {"n_samples": 10, "skipped": fid_skip}},
        "timings_s": {"total": 1.0},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    lines = [{"split": "train", "step": 0, "epoch": 0, "sigma2": 9.0},
             {"split": "val", "step": 5, "epoch": 0, "sigma2": 7.0},
             {"split": "val", "step": 10, "epoch": 1, "sigma2": sigma2}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_aggregate_values_exact():
    a = S.aggregate_values([3, 4, 5])
    assert (a["mean"], a["std"], a["n"]) == (4.0, 1.0, 3)
    a = S.aggregate_values([1.0, 2.0, 3.0, 4.0])
    assert a["mean"] == 2.5 and a["std"] == pytest.approx(math.sqrt(5 / 3), rel=1e-15)
    a = S.aggregate_values([2.0, None, float("nan")])
    assert (a["mean"], a["std"], a["n"]) == (2.0, None, 1)
    assert S.aggregate_values([None])["mean"] is None


def test_collect_results_mean_std_over_seeds_from_metrics_files(tmp_path):
    plan = tiny_plan(tmp_path / "st", "fixed:1,fixed:0.1,ar", "0,1,2")
    runs = tmp_path / "st" / "runs"
    _fake_run(runs / "fixed-1-s0", 1, 30.0, [2.0, 0.0, 0.0], 1.0)
    _fake_run(runs / "fixed-1-s1", 2, 34.0, [0.0, 1.0, 3.0], 1.0)
    _fake_run(runs / "fixed-1-s2", 3, 38.0, [1.0, 1.0, 1.0], 1.0)
    _fake_run(runs / "fixed-0.1-s0", 3, 20.0, [3.0, 2.0, 1.0], 0.1)
    _fake_run(runs / "fixed-0.1-s1", 3, None, [3.0, 2.0, 1.0], 0.1, fid_skip="disabled (--no-fid)")
    (runs / "fixed-0.1-s2").mkdir(parents=True)
    (runs / "fixed-0.1-s2" / S.RUN_MARKER).write_text(json.dumps({"status": "failed", "error": "NaN at step 3"}))
    for s, s2 in enumerate((0.02, 0.04, 0.06)):
        _fake_run(runs / f"ar-s{s}", 3, None, [4.0, 2.0, 1.0], s2, fid_skip="disabled (--no-fid)")
    res = S.collect_results(plan)
    by = {p["spec"]: p for p in res["policies"]}
    f1 = by["fixed:1"]["aggregate"]
    assert (f1["active_units"]["mean"], f1["active_units"]["std"]) == (2.0, 1.0)
    assert (f1["fid"]["mean"], f1["fid"]["std"]) == (34.0, 4.0)
    assert f1["kl_total"]["mean"] == 3.0 and f1["smoothness"]["mean"] == 0.5
    assert f1["sigma2_final"]["values"] == [1.0, 1.0, 1.0]  # the last validation record
    # KL per dimension sorted within each run, then averaged: [2,0,0], [3,1,0], [1,1,1]
    assert by["fixed:1"]["kl_per_dim_sorted_mean"] == [2.0, 2 / 3, 1 / 3]
    f01 = by["fixed:0.1"]
    assert f01["n_done"] == 2 and f01["n_failed"] == 1
    assert [c["status"] for c in f01["cells"]] == ["done", "done", "failed"]
    assert f01["cells"][2]["error"] == "NaN at step 3"
    assert (f01["aggregate"]["fid"]["mean"], f01["aggregate"]["fid"]["n"]) == (20.0, 1)
    assert "fid" not in f01["unavailable"]  # one seed has a FID: no n/a
    ar = by["ar"]
    assert ar["aggregate"]["fid"]["mean"] is None and ar["unavailable"]["fid"] == "disabled (--no-fid)"
    assert ar["aggregate"]["sigma2_final"]["mean"] == pytest.approx(0.04)
    assert ar["aggregate"]["sigma2_final"]["std"] == pytest.approx(0.02)
    # the sweep summary: fixed policies by sigma2, ar as the reference marker
    sw = res["sweep"]
    assert sw["sigma2"] == [0.1, 1.0] and [a["mean"] for a in sw["curves"]["active_units"]] == [3.0, 2.0]
    assert sw["references"][0]["spec"] == "ar" and sw["references"][0]["sigma2"]["mean"] == pytest.approx(0.04)
    assert json.loads(json.dumps(res)) == res
    from arelbo.report import table_rows

    header, rows, notes = table_rows(res)
    assert rows[0][header.index("FID")] == "34 ± 4"
    assert rows[0][header.index("active units")] == "2 ± 1 / 3"
    assert rows[1][1] == "2/3, 1 failed"
    assert rows[2][header.index("FID")] == "n/a [1]" and notes == ["disabled (--no-fid)"]


# ---------------------------------------------------------------------------------------------- running, resume


class KillPolicy(Callback):
    """Interrupt (as Ctrl-C would) the training of one policy at a global step."""

    def __init__(self, policy, step):
        self.policy, self.step = policy, step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.cfg.objective.policy == self.policy and trainer.global_step == self.step:
            raise KeyboardInterrupt(f"killed {self.policy} at step {self.step}")


class PoisonPolicy(Callback):
    def __init__(self, policy, step):
        self.policy, self.step = policy, step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.cfg.objective.policy == self.policy and trainer.global_step == self.step:
            batch.view(-1)[0] = float("nan")


class HoldLock(Callback):
    """While one policy trains, take another run directory's lock, as a second study sharing --runs-dir would."""

    def __init__(self, policy, run_dir, stack):
        self.policy, self.run_dir, self.stack = policy, run_dir, stack

    def on_train_start(self, trainer, module):
        if module.cfg.objective.policy == self.policy:
            from arelbo.runs import run_lock

            self.stack.enter_context(run_lock(self.run_dir))


def test_a_run_another_process_trains_is_left_alone_not_restarted_or_marked_failed(tmp_path):
    import contextlib

    from arelbo.runs import run_lock

    out = tmp_path / "st"
    plan = tiny_plan(out, policies="ar,fixed:1")
    with pytest.raises(S.StudyInterrupted):  # ar stopped before its first checkpoint: a config, no checkpoint
        S.run_study(plan, progress=False, report=False, train_callbacks=[KillPolicy("ar", 2)], log=lambda m: None)
    held = out / "runs" / "ar-s0"
    assert S.run_state(plan.runs[0], plan.eval)[0] == "restart"

    # held when the study starts: listed as in use, skipped
    logs = []
    with run_lock(held):
        before = tree_state(held)
        state, detail = S.run_state(plan.runs[0], plan.eval)
        assert state == "busy" and detail.startswith(f"in use by pid {os.getpid()} on host ")
        res = S.run_study(tiny_plan(out, policies="ar,fixed:1"), progress=False, report=False, log=logs.append)
        assert tree_state(held) == before  # not restarted (which would delete it), no failure marker written
    assert any("ar-s0" in m and "skip (in use)" in m for m in logs)
    assert json.loads((out / "study.json").read_text())["status"] == "incomplete (runs in use)"
    by = {p["spec"]: p["cells"][0]["status"] for p in res["policies"]}
    assert by["fixed:1"] == "done" and by["ar"] != "done"
    assert S.run_state(plan.runs[0], plan.eval)[0] == "restart"  # free again: still a run to start, not "failed"

    # taken after the study started (while fixed:1 trains): skipped at its turn, no marker, nothing deleted
    (out / "runs" / "fixed-1-s0").rename(tmp_path / "fixed-away")
    logs = []
    with contextlib.ExitStack() as stack:
        plan2 = tiny_plan(out, policies="fixed:1,ar")
        S.run_study(plan2, progress=False, report=False, train_callbacks=[HoldLock("fixed", held, stack)],
                    log=logs.append)
    assert (held / "config.yaml").is_file()
    assert json.loads((held / S.RUN_MARKER).read_text())["status"] == "interrupted"  # as the kill left it
    assert any("ar-s0: skipped" in m and "in use by" in m for m in logs)
    assert S.run_state(plan2.run_by_name["ar-s0"], plan2.eval)[0] == "restart"
    S.run_study(plan2, progress=False, report=False, log=lambda m: None)  # free: trained now
    assert S.run_state(plan2.run_by_name["ar-s0"], plan2.eval)[0] == "done"


def test_interrupted_study_resumes_and_reuses_finished_runs(tmp_path):
    out = tmp_path / "st"
    plan = tiny_plan(out)
    with pytest.raises(S.StudyInterrupted, match="run the same command again"):
        S.run_study(plan, progress=False, report=False, train_callbacks=[KillPolicy("ar", 6)], log=lambda m: None)
    first, second = out / "runs" / "fixed-1-s0", out / "runs" / "ar-s0"
    assert (first / "metrics.json").is_file() and not (second / "metrics.json").exists()
    assert json.loads((out / "study.json").read_text())["status"] == "interrupted"
    assert [S.run_state(r, plan.eval)[0] for r in plan.runs] == ["done", "resume"]
    before = tree_state(first)

    logs = []
    res = S.run_study(tiny_plan(out), progress=False, report=False, log=logs.append)
    assert tree_state(first) == before  # the finished run: not a byte or an mtime changed
    assert any("fixed-1-s0" in m and "reuse" in m for m in logs) and any("ar-s0" in m and "resume" in m for m in logs)
    marker = json.loads((second / S.RUN_MARKER).read_text())
    assert [h["action"] for h in marker["history"]] == ["new (interrupted)", "resume"]
    assert marker["status"] == "done"
    assert all(c["status"] == "done" for p in res["policies"] for c in p["cells"])
    steps = [r["step"] for r in map(json.loads, (second / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert steps == list(range(8))  # one consistent history: 2 epochs x 4 steps, no duplicates from the kill
    assert json.loads((out / "study.json").read_text())["status"] == "complete"

    # trained but not evaluated (metrics.json lost): evaluated again, training untouched
    (second / "metrics.json").unlink()
    ckpt_before = tree_state(second / "checkpoints")
    assert S.run_state(plan.runs[1], plan.eval)[0] == "evaluate"
    S.run_study(tiny_plan(out), progress=False, report=False, log=lambda m: None)
    assert (second / "metrics.json").is_file() and tree_state(second / "checkpoints") == ckpt_before
    # asking for different evaluation options re-evaluates; a different training config is refused
    changed = tiny_plan(out, eval_options={"k": 5})
    assert S.run_state(changed.runs[0], changed.eval) == ("evaluate", "IS-NLL with K=4, the study asks for K=5")
    with pytest.raises(S.StudyError, match=r"different config.*train.epochs: 2 \(existing\) vs 3 \(planned\)"):
        S.run_study(tiny_plan(out, epochs=3), progress=False, report=False, log=lambda m: None)
    # a run directory that stopped before its first checkpoint is started again
    plan2 = tiny_plan(tmp_path / "st2", "ar")
    run = plan2.runs[0]
    run.run_dir.mkdir(parents=True)
    run.config.save(run.run_dir / "config.yaml")
    assert S.run_state(run, plan2.eval)[0] == "restart"


def test_failed_run_is_recorded_skipped_then_retried(tmp_path):
    out = tmp_path / "st"
    res = S.run_study(tiny_plan(out, "fixed:1,ar", epochs=1), progress=False, report=False,
                      train_callbacks=[PoisonPolicy("ar", 2)], log=lambda m: None)
    by = {p["spec"]: p for p in res["policies"]}
    assert by["fixed:1"]["n_done"] == 1 and by["ar"]["n_failed"] == 1
    assert "NonFiniteLossError" in by["ar"]["cells"][0]["error"]
    assert json.loads((out / "study.json").read_text())["status"] == "failed runs"
    plan = tiny_plan(out, "fixed:1,ar", epochs=1)
    assert S.run_state(plan.runs[1], plan.eval)[0] == "failed"
    res = S.run_study(plan, progress=False, report=False, retry_failed=True, log=lambda m: None)
    assert all(p["n_done"] == 1 for p in res["policies"])


def test_cli_dry_run_and_errors(tmp_path, capsys):
    from arelbo.cli import main

    args = ["--preset", "linear-gaussian", "--out", str(tmp_path / "st"), *sum((["--set", o] for o in TINY), [])]
    assert main(["compare", *args, "--policies", "fixed:1,two-stage", "--seeds", "0,1", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert '"run": "learned-s1"' in text and "fixed-1-s0" in text and "new" in text
    assert not (tmp_path / "st").exists()  # a dry run writes nothing
    assert main(["sweep", *args, "--sigma2", "1,0.01", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert '"spec": "fixed:0.01"' in text and '"spec": "ar"' in text and '"kind": "sweep"' in text
    assert '"gmm": true' in text and '"two_stage_noise": true' in text  # the CPU scale's defaults
    assert main(["compare", *args, "--policies", "two-stage", "--no-gmm", "--two-stage-mean", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert '"gmm": false' in text and '"two_stage_noise": false' in text and '"samplers": [\n' in text
    assert '"prior",\n        "two-stage"\n      ]' in text
    assert main(["compare", *args, "--policies", "fixed"]) == 2
    assert "fixed needs its sigma2" in capsys.readouterr().err
    assert main(["compare", *args, "--set", "objective.policy=ar"]) == 2
    assert "--policies" in capsys.readouterr().err


def test_jobs_run_side_by_side_as_subprocesses(tmp_path):
    """--jobs 2: the runs go through `python -m arelbo.cli train` / `eval` subprocesses (~10 s: their imports)."""
    out = tmp_path / "st"
    res = S.run_study(tiny_plan(out, epochs=1), jobs=2, progress=False, report=False, log=lambda m: None)
    assert all(c["status"] == "done" for p in res["policies"] for c in p["cells"])
    for name in ("fixed-1-s0", "ar-s0"):
        assert (out / "runs" / name / "metrics.json").is_file()
        assert "$ " in (out / "runs" / f"{name}.log").read_text()
    assert (out / S.PLAN_DIR / "ar-s0.yaml").is_file()
    # and the in-process path finds everything done
    plan = tiny_plan(out, epochs=1)
    assert [S.run_state(r, plan.eval)[0] for r in plan.runs] == ["done", "done"]


def test_sweep_shares_runs_with_a_compare_through_runs_dir(tmp_path):
    compare = tiny_plan(tmp_path / "compare", "fixed:1,ar", epochs=1)
    S.run_study(compare, progress=False, report=False, log=lambda m: None)
    sweep = tiny_plan(tmp_path / "sweep", S.sweep_policies([1, 0.1], "ar"), epochs=1, kind="sweep",
                      runs_dir=tmp_path / "compare" / "runs")
    assert {r.name: S.run_state(r, sweep.eval)[0] for r in sweep.runs} == {
        "fixed-1-s0": "done", "fixed-0.1-s0": "new", "ar-s0": "done"}
    res = S.run_study(sweep, progress=False, report=False, log=lambda m: None)
    assert res["kind"] == "sweep" and res["runs_dir"] == "../compare/runs"
    assert res["sweep"]["sigma2"] == [0.1, 1.0] and all(p["n_done"] == 1 for p in res["policies"])
