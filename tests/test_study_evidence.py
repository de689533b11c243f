"""Study tooling for the evidence runs: learned/annealed specs, snapshots evaluated and aggregated against steps,
paired differences with t-intervals, evaluation on the run's device."""

import json
import math

import pytest

pytest.importorskip("lightning")

from arelbo import stats  # noqa: E402
from arelbo.report import tables as report_tables  # noqa: E402
from arelbo import study as S  # noqa: E402

from test_study import TINY, TINY_EVAL, tree_state  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("text,spec,slug,objective,train_slug", [
    ("learned:mle", "learned:mle", "learned-mle", {"policy": "learned", "options": {"init_mle": True}}, "learned-mle"),
    ("learned:mle,lr=1e-2", "learned:mle,lr=0.01", "learned-mle-lr0.01",
     {"policy": "learned", "options": {"init_mle": True, "log_sigma2_lr": 0.01}}, "learned-mle-lr0.01"),
    ("learned-fair", S.FAIR_LEARNED, "learned-mle-lr0.01",
     {"policy": "learned", "options": {"init_mle": True, "log_sigma2_lr": 0.01}}, "learned-mle-lr0.01"),
    ("learned:lr=0.05,0.5", "learned:0.5,lr=0.05", "learned-0.5-lr0.05",
     {"policy": "learned", "options": {"init_sigma2": 0.5, "log_sigma2_lr": 0.05}}, "learned-0.5-lr0.05"),
    ("two-stage:mle", "two-stage:mle", "two-stage-mle", {"policy": "learned", "options": {"init_mle": True}}, "learned-mle"),
    ("ar-annealed", "ar-annealed", "ar-annealed", {"policy": "ar-annealed"}, "ar-annealed"),
    ("ar-annealed:5e3", "ar-annealed:5000", "ar-annealed-5000", {"policy": "ar-annealed", "options": {"anneal_steps": 5000}},
     "ar-annealed-5000"),
])
def test_new_policy_specs(text, spec, slug, objective, train_slug):
    p = S.parse_policy(text)
    assert (p.spec, p.slug, p.objective, p.train_slug) == (spec, slug, objective, train_slug)
    assert S.parse_policy(p.spec) == p
    from arelbo.config import apply_overrides, RunConfig

    cfg = RunConfig.from_dict(apply_overrides({}, p.overrides()))  # the overrides are valid config
    assert cfg.objective.policy == objective["policy"]
    assert all(cfg.objective.options[k] == v for k, v in objective.get("options", {}).items())


@pytest.mark.parametrize("text,message", [
    ("learned:mle,mle", "one initial value"),
    ("learned:mle,lr=0", "learning rate must be > 0"),
    ("learned:lr=1,lr=2", "lr given twice"),
    ("learned-fair:1", "takes no argument"),
    ("ar-annealed:2.5", "whole number"),
    ("ar-annealed:0", ">= 1"),
])
def test_new_policy_spec_errors(text, message):
    with pytest.raises(S.StudyError, match=message):
        S.parse_policy(text)


def test_t_quantile_and_interval_match_scipy_and_hand_values():
    from scipy import stats as ss

    assert stats.t_quantile(0.975, 4) == pytest.approx(2.7764451051977987, rel=1e-12)  # tables: 2.776
    t2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # df = 2 in closed form: (2p - 1) / sqrt(2 p (1 - p))
    assert stats.t_quantile(0.975, 2) == pytest.approx(t2, rel=1e-12)  # tables: 4.303
    vals = [1.0, 3.0, 2.0, 6.0, 4.0]
    res = stats.t_interval(vals)
    lo, hi = ss.t.interval(0.95, 4, loc=3.2, scale=ss.sem(vals))
    assert (res["mean"], res["n"]) == (3.2, 5) and (res["lo"], res["hi"]) == pytest.approx((lo, hi), rel=1e-12)
    assert res["std"] == pytest.approx(math.sqrt(3.7), rel=1e-14)
    one = stats.t_interval([2.0, None, float("nan")])
    assert (one["mean"], one["lo"], one["hi"]) == (2.0, None, None)


def test_verdict_and_paired_differences():
    assert stats.verdict(-3.0, -1.0) == "better" and stats.verdict(1.0, 3.0) == "worse"
    assert stats.verdict(-1.0, 2.0) == "within the spread" and stats.verdict(None, None) == "within the spread"
    assert stats.verdict(1.0, 3.0, lower_is_better=False) == "better"
    assert stats.verdict(1.0, 3.0, lower_is_better=None) == "higher"
    # seeds paired by value; a seed missing on one side is left out
    a = {0: 10.0, 1: 12.0, 2: 11.0, 3: 50.0}
    b = {0: 13.0, 1: 14.0, 2: 15.0, 3: None}
    res = stats.paired_differences(a, b)
    assert res["seeds"] == [0, 1, 2] and res["differences"] == [-3.0, -2.0, -4.0]
    assert res["mean"] == -3.0 and res["hi"] == pytest.approx(-3.0 + 0.95 / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3))
    assert res["verdict"] == "better"  # lower is better and the whole interval is below zero
    # the same means with a large spread: the interval contains zero
    noisy = stats.paired_differences({0: 10.0, 1: 20.0, 2: 3.0}, {0: 13.0, 1: 14.0, 2: 15.0})
    assert noisy["lo"] < 0 < noisy["hi"] and noisy["verdict"] == "within the spread"


def test_study_evaluates_snapshots_and_aggregates_against_steps_with_paired_stats(tmp_path):
    out = tmp_path / "st"
    overrides = [*TINY, "train.snapshot_steps=[3, 6]"]
    plan = S.plan_study("fixed:1,ar", "0,1", out, preset="linear-gaussian", overrides=overrides, epochs=2,
                        steps_per_epoch=4, eval_options=dict(TINY_EVAL))
    res = S.run_study(plan, progress=False, log=lambda m: None)
    run = out / "runs" / "ar-s1"
    for step in (3, 6):
        m = json.loads((run / f"metrics-step-{step}.json").read_text())
        assert m["checkpoint"]["which"] == f"step-{step}" and m["checkpoint"]["global_step"] == step
    final = json.loads((run / "metrics.json").read_text())
    assert final["checkpoint"]["global_step"] == 8 and final["protocol"]["device"] == "cpu"
    c = final["collapse"]
    assert len(c["mutual_information_per_dim"]) == 3 and len(c["smoothness_normalised_per_dim"]) == 3
    assert c["mutual_information_per_dim_total"] == pytest.approx(sum(c["mutual_information_per_dim"]))
    by = {p["spec"]: p for p in res["policies"]}
    curve = by["ar"]["curve"]
    assert [(c["step"], c["final"], c["n"]) for c in curve] == [(3, False, 2), (6, False, 2), (8, True, 2)]
    # each point aggregates the per-seed values of its own metrics file
    kl3 = [json.loads((out / "runs" / f"ar-s{s}" / "metrics-step-3.json").read_text())["summary"]["kl_total"]
           for s in (0, 1)]
    assert curve[0]["aggregate"]["kl_total"]["values"] == kl3
    assert curve[2]["aggregate"]["kl_total"] == by["ar"]["aggregate"]["kl_total"]
    cell = by["ar"]["cells"][1]
    assert cell["values"]["mi_per_dim"] == c["mutual_information_per_dim_total"]
    assert cell["values"]["smoothness_normalised"] == c["smoothness_normalised_mean"]
    assert cell["mi_per_dim"] == c["mutual_information_per_dim"]
    assert [sn["step"] for sn in cell["snapshots"]] == [3, 6]
    # sigma2 at a snapshot comes from the training log up to that step
    log = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["step"] <= 3]
    assert cell["snapshots"][0]["values"]["sigma2_final"] == [r["sigma2"] for r in log if r["split"] == "train"][-1]
    # paired differences: ar - fixed:1, per seed, from the cells' values
    paired = res["paired"]
    assert paired["reference"] == "ar"
    row = next(r for r in paired["rows"] if r["policy"] == "fixed:1" and r["key"] == "mse")
    ar_mse = [c["values"]["mse"] for c in by["ar"]["cells"]]
    f1_mse = [c["values"]["mse"] for c in by["fixed:1"]["cells"]]
    assert row["differences"] == pytest.approx([a - b for a, b in zip(ar_mse, f1_mse)], rel=1e-12)
    assert row["n"] == 2 and row["verdict"] == stats.verdict(row["lo"], row["hi"], True)
    # the collapse diagnostics are paired too, with no better side (higher / lower / within the spread)
    mi = next(r for r in paired["rows"] if r["policy"] == "fixed:1" and r["key"] == "mi_per_dim")
    assert mi["lower_is_better"] is None and mi["verdict"] in ("higher", "lower", stats.WITHIN)
    assert mi["differences"] == pytest.approx([a["values"]["mi_per_dim"] - b["values"]["mi_per_dim"]
                                               for a, b in zip(by["ar"]["cells"], by["fixed:1"]["cells"])], rel=1e-12)
    # and at each kept snapshot, from that snapshot's metrics file of each seed
    assert [ps["step"] for ps in res["paired_snapshots"]] == [3, 6]
    at3 = next(r for r in res["paired_snapshots"][0]["rows"] if r["policy"] == "fixed:1" and r["key"] == "kl_total")
    kl3_fixed = [json.loads((out / "runs" / f"fixed-1-s{s}" / "metrics-step-3.json").read_text())["summary"]["kl_total"]
                 for s in (0, 1)]
    assert at3["differences"] == pytest.approx([a - b for a, b in zip(kl3, kl3_fixed)], rel=1e-12) and at3["n"] == 2
    md = (out / "report.md").read_text()
    assert "## Paired differences" in md and "## Against training steps" in md and "| 3 |" in md
    # the report renders the snapshot differences too, one table per kept step, with the JSON's numbers
    table3 = md.split("seed by seed, at step 3")[1].split("\n## ")[0]
    assert f"| {at3['label']} | KL (nats) | 2 | {report_tables._fmt(at3['mean'])} |" in table3 and "at step 6" in md
    assert 'id="paired-step-3"' in (out / "report.html").read_text()
    # and no note about what this study lacks (no two-stage policy, no two-stage or reconstruction FID column)
    assert "two-stage: the learned-σ² run" not in md and "- FID (two-stage), when present" not in md
    assert "- Decoder smoothness, scale-free" in md
    assert "![FID and active units against training steps](figures/curves.png)" in md and (out / "figures" / "curves.png").is_file()
    assert json.loads(json.dumps(res)) == res

    # everything evaluated: reused; a lost snapshot evaluation is redone alone
    assert [S.run_state(r, plan.eval)[0] for r in plan.runs] == ["done"] * 4
    (run / "metrics-step-3.json").unlink()
    state, detail = S.run_state(plan.run_by_name["ar-s1"], plan.eval)
    assert state == "evaluate" and "metrics-step-3.json" in detail
    before = tree_state(run)
    S.run_study(plan, progress=False, report=False, log=lambda m: None)
    after = tree_state(run)
    assert (run / "metrics-step-3.json").is_file()
    assert after["metrics.json"] == before["metrics.json"] and after["metrics-step-6.json"] == before["metrics-step-6.json"]


def test_snapshot_samplers_are_kept_apart_from_the_final_ones(tmp_path):
    from arelbo.evaluate import evaluate_run, metrics_file, sampler_file

    out = tmp_path / "st"
    plan = S.plan_study("ar", "0", out, preset="linear-gaussian", overrides=[*TINY, "train.snapshot_steps=[2]"],
                        epochs=1, steps_per_epoch=4, eval_options={**TINY_EVAL, "snapshots": False})
    S.run_study(plan, progress=False, report=False, log=lambda m: None)
    run = plan.runs[0].run_dir
    assert not metrics_file(run, "step-2").exists()  # snapshots=False: only the final evaluation
    kw = dict(samplers=["gmm"], n_samples=0, fid=False, is_examples=0, smoothness_examples=0, mi_examples=8,
              sampler_options={"gmm": {"n_components": 2}}, progress=False)
    evaluate_run(run, which="step-2", device="auto", **kw)
    assert sampler_file(run, "gmm", "step-2") == run / "samplers" / "step-2" / "gmm.pt"
    assert sampler_file(run, "gmm", "step-2").is_file() and not sampler_file(run, "gmm", "last").exists()
    assert json.loads(metrics_file(run, "step-2").read_text())["protocol"]["device"] == "cpu"  # auto, no CUDA here


def test_evaluation_device_follows_the_runs_accelerator():
    from arelbo.config import load_config

    assert S.run_device(load_config(overrides=["train.accelerator=cpu"])) == "cpu"
    assert S.run_device(load_config(overrides=["train.accelerator=gpu"])) == "cuda"
    assert S.run_device(load_config(overrides=["train.accelerator=auto"])) == "auto"
    import argparse

    from arelbo.cli.eval import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    opts = S.EvalOptions(n_samples=5)
    ns = parser.parse_args(["RUN", *opts.cli_args(["prior"], "step-2000", "cuda")])
    kw = opts.evaluate_kwargs(["prior"], "step-2000", "cuda")
    assert (ns.which, ns.device) == (kw["which"], kw["device"]) == ("step-2000", "cuda")


def test_evidence_script_plans_the_three_studies(tmp_path):
    """benchmarks/study_mnist_evidence.sh --dry-run: every planned run, shared runs between the 16-latent studies."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "study_mnist_evidence.sh"
    env = {**os.environ, "ARELBO": f"{sys.executable} -m arelbo.cli",
           "PYTHONPATH": os.pathsep.join([str(Path(S.__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["bash", str(script), "", str(tmp_path / "ev"), "3", "--dry-run"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    states = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and line.split()[-1] == "yet"]
    assert len(states) == 35 + 21 + 27  # the variants study lists its 6 shared ar/learned runs again
    for name in ("learned-mle-lr0.01-s4", "ar-annealed-8000-s2", "fixed-0.0056-s2", "fixed-0.001-s2", "fixed-0.03-s4"):
        assert name in states
    assert '"runs_dir": "' + str(tmp_path / "ev" / "runs") + '"' in proc.stdout
    assert "snapshot_steps: [2000, 8000]" in proc.stdout and "accelerator: auto" in proc.stdout
    assert "latent_dim: 64" in proc.stdout
    plan = json.loads(proc.stdout[: proc.stdout.index("\nbase config:")])
    assert plan["eval"]["two_stage_all"] and plan["eval"]["gmm_grid"] == [1, 5, 10, 20]
    assert (plan["eval"]["fid_repeats"], plan["eval"]["two_stage_patience"], plan["eval"]["n_samples"]) == (3, 5, 10000)
    bad = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "DATA_ROOT" in bad.stderr


def test_per_sample_neg_elbo_is_not_tabled_as_a_density_and_discrete_bits_pass_through(tmp_path):
    summary = {"neg_elbo": -900.0, "neg_elbo_bpd": -1.5, "neg_elbo_ar": -850.0, "neg_elbo_is_density": False,
               "neg_elbo_ar_bpd_discrete": 7.9}
    values, reasons = S.run_values(tmp_path, {"summary": summary, "fid": {}, "protocol": {}}, "prior", False)
    assert values["neg_elbo"] is None and values["neg_elbo_bpd"] is None and "no density" in reasons["neg_elbo"]
    assert values["neg_elbo_ar"] == -850.0 and values["neg_elbo_ar_bpd_discrete"] == 7.9
    values, reasons = S.run_values(tmp_path, {"summary": {**summary, "neg_elbo_is_density": True}}, "prior", False)
    assert values["neg_elbo"] == -900.0 and "neg_elbo" not in reasons
    opts = S.EvalOptions(dequantize=True)
    assert "--dequantize" in opts.cli_args(["prior"]) and opts.evaluate_kwargs(["prior"])["dequantize"] is True


def test_study_samplers_for_every_policy_judged_on_validation(tmp_path):
    """--two-stage-all, --two-stage-patience, --gmm-grid, --fid-repeats: through the planner to eval and back."""
    ev = {**TINY_EVAL, "gmm": True, "two_stage_all": True, "two_stage_patience": 1, "gmm_grid": (1, 2),
          "fid_repeats": 2}
    plan = S.plan_study("fixed:1,ar", "0", tmp_path / "st", preset="linear-gaussian", overrides=TINY, epochs=1,
                        steps_per_epoch=4, eval_options=ev)
    assert all(r.samplers == ["prior", "gmm", "two-stage"] for r in plan.runs)
    res = S.run_study(plan, progress=False, report=False, log=lambda m: None)
    m = json.loads((plan.runs[1].run_dir / "metrics.json").read_text())
    fits = m["protocol"]["samplers"]
    assert fits["gmm"]["config"]["components_grid"] == [1, 2]
    assert fits["gmm"]["fit_info"]["selection"]["held_out"] == "held-out codes"
    assert fits["gmm"]["fit_info"]["selection"]["num_held_out"] == 32  # the validation split
    assert fits["two-stage"]["fit_info"]["early_stopping"]["num_held_out"] == 32
    values = next(p for p in res["policies"] if p["spec"] == "ar")["cells"][0]["values"]
    assert values["gmm_components"] == fits["gmm"]["fit_info"]["selection"]["chosen"]
    assert values["two_stage_sigma2"] == fits["two-stage"]["fit_info"]["sigma2_mean"]
    assert m["protocol"]["fid"]["repeats"] == 2
    assert [c["key"] for c in res["columns"] if c["key"].startswith("fid")] == ["fid", "fid_gmm", "fid_two_stage"]
    assert [S.run_state(r, plan.eval)[0] for r in plan.runs] == ["done", "done"]
    more = S.plan_study("fixed:1,ar", "0", tmp_path / "st", preset="linear-gaussian", overrides=TINY, epochs=1,
                        steps_per_epoch=4, eval_options={**ev, "fid_repeats": 3})
    assert "sample draw" in S.run_state(more.runs[0], more.eval)[1]
    # the same request as `arelbo eval` arguments
    import argparse

    from arelbo.cli.eval import add_arguments
    from arelbo.evalconfig import parse_sampler_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(["RUN", *plan.eval.cli_args(plan.runs[0].samplers)])
    kw = plan.eval.evaluate_kwargs(plan.runs[0].samplers)
    assert parse_sampler_options(ns.sampler_options) == kw["sampler_options"] and ns.fid_repeats == 2
    with pytest.raises(S.StudyError, match="gmm-grid"):
        S.plan_study("ar", "0", tmp_path / "x", preset="linear-gaussian", eval_options={"gmm_grid": (0,)})


def test_evidence_options_through_jobs_subprocesses(tmp_path):
    """--jobs 2: snapshots, the GMM grid, two-stage for every run with early stopping and FID repeats all travel as
    `arelbo eval` arguments; the in-process planner then finds every evaluation done."""
    ev = {**TINY_EVAL, "gmm": True, "two_stage_all": True, "two_stage_patience": 1, "gmm_grid": (1, 2),
          "fid_repeats": 2}
    kw = dict(preset="linear-gaussian", overrides=[*TINY, "train.snapshot_steps=[2]"], epochs=1, steps_per_epoch=4,
              eval_options=ev)
    plan = S.plan_study("learned-fair,ar-annealed:3", "0", tmp_path / "st", **kw)
    res = S.run_study(plan, jobs=2, progress=False, report=False, log=lambda m: None)
    assert all(c["status"] == "done" for p in res["policies"] for c in p["cells"]), res["policies"]
    for run in plan.runs:
        snap = json.loads((run.run_dir / "metrics-step-2.json").read_text())
        assert snap["checkpoint"]["which"] == "step-2" and snap["protocol"]["fid"]["repeats"] == 2
        assert snap["protocol"]["samplers"]["gmm"]["config"]["components_grid"] == [1, 2]
        assert (run.run_dir / "samplers" / "step-2" / "two-stage.pt").is_file()
    again = S.plan_study("learned-fair,ar-annealed:3", "0", tmp_path / "st", **kw)
    assert [S.run_state(r, again.eval)[0] for r in again.runs] == ["done", "done"]
