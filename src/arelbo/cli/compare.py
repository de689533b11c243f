"""``arelbo compare`` and ``arelbo sweep``: train, evaluate and report a study (:mod:`arelbo.study`).

Both commands share this module; ``add_arguments`` tells them apart by the parser's name.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

SCALE_HELP = """\
scales:
  default (CPU)  {cpu}
  --paper        {paper}
Explicit --seeds, --epochs, --steps-per-epoch, --eval-samples and --set override either scale.
Time of the default scale, measured on a 2-core CPU (mnist-conv, the default 9 policies, 1 seed):
{budget}"""

# Measured; see the module arelbo.study (CPU_* constants) and docs/results/mnist.md. Kept in one place.
CPU_BUDGET = (
    "on 2 idle cores one run takes about 3 minutes (ar: 147 s training + 25 s evaluation with the prior and GMM "
    "samplers; the learned run's evaluation adds about 15 s for the two-stage sampler's 2000 steps), so the 9 "
    "default policies (8 training runs: two-stage shares learned's) take about 24 minutes (docs/results/mnist.md). "
    "Other CPU-heavy processes slow torch's multi-threaded training by 3-5x (measured); on a shared machine "
    "--jobs 2 (one thread per run) holds up better.")

SWEEP_INTRO = """\
The oversmoothing sweep: fixed:S for every S of --sigma2, beside the --reference policies (specs as in
`arelbo compare --help`), through the same planner, runs and report as compare. The report adds active units,
decoder smoothness, total KL and FID against sigma^2 (log axis), with AR-ELBO's final sigma^2 as a vertical line
and its values as a star.

"""

COMPARE_EPILOG = """\
policy specs (comma-separated: compare --policies, sweep --reference):
  fixed:S          fixed decoder variance sigma^2 = S (fixed:1 is the classic VAE)
  beta:B           beta-VAE, beta = B
  learned[:S0]     sigma^2 learned by gradient (Dai & Wipf's gamma / sigma-VAE), initialised at S0 (default 1)
  learned:mle,lr=X the same, started at the first batch's MLE, log sigma^2 with its own learning rate X
                   (learned:mle, learned:lr=X, learned:S0,lr=X also work)
  learned-fair     short for learned:mle,lr=0.01
  two-stage[:ARGS] Dai & Wipf's two-stage VAE: the learned[:ARGS] run, generating through a second VAE on its
                   codes (shares the training run of learned[:ARGS])
  ar, ar-diagonal, ar-per-sample, ar-ema[:M]   AR-ELBO and its variants (M: EMA momentum)
  ar-annealed[:N]  AR-ELBO with a sigma^2 floor decaying log-linearly from 1 over N steps (default 10000)
  NAME[:VALUE]     any other registered decoder-variance policy (VALUE: its spec option; docs/method.md)
Every policy but two-stage generates with the prior sampler for FID, and with a Gaussian mixture fitted to its
training codes for a second FID column ("FID (GMM)"; --no-gmm drops it); --flow adds "FID (flow)", a masked
autoregressive flow fitted to the codes. The prior sampler draws from the model's own prior: N(0, I), or the
learnable prior every run is trained with under --set model.prior=mog|vamp|flow. The two-stage sampler samples its second
VAE exactly (decoder noise included); --two-stage-mean uses the decoder mean alone, as Dai & Wipf.

output:
  DIR/study.json      the plan: resolved base config, runs, evaluation options, the command
  DIR/runs/<policy>-s<seed>/   one run directory per (training policy, seed)
  DIR/results.json    every number, per run and aggregated (mean +- std over seeds)
  DIR/report.md, DIR/report.html (self-contained), DIR/figures/*.png
Rerunning the same command continues an interrupted study: finished and evaluated runs are reused untouched,
interrupted ones resumed from checkpoints/last.pt, trained-but-not-evaluated ones evaluated.

CelebA: --preset celeba64-conv --set data.root=/path/to/celeba --no-fid (the project's FID feature network is
MNIST-only; the FID column then shows n/a with the reason).

"""

EXAMPLES = {
    "compare": """examples:
  arelbo compare --preset mnist-conv --out studies/mnist            # the default study (9 policies, seed 0)
  arelbo compare --preset mnist-conv --out studies/mnist --jobs 2   # two runs side by side, 1 thread each
  arelbo compare --preset mnist-conv --policies fixed:1,ar --seeds 0,1,2 --out studies/mnist-small
  arelbo compare --preset mnist-conv --paper --set train.accelerator=gpu --out studies/mnist-paper
""",
    "sweep": """examples:
  arelbo sweep --preset mnist-conv --out studies/mnist-sweep
  arelbo sweep --preset mnist-conv --out studies/mnist-sweep --runs-dir studies/mnist/runs  # reuse compare's runs
""",
}


def _kind(parser: argparse.ArgumentParser) -> str:
    return "sweep" if parser.prog.split()[-1] == "sweep" else "compare"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from arelbo.objectives.base import format_number as _num
    from arelbo.study import DEFAULT_POLICIES, DEFAULT_SWEEP_SIGMA2, SCALES

    kind = _kind(parser)
    parser.set_defaults(_study_kind=kind)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    wrap = lambda s: "\n".join(textwrap.wrap(s, 110, subsequent_indent="                 "))  # noqa: E731
    parser.epilog = ((SWEEP_INTRO if kind == "sweep" else "") + COMPARE_EPILOG + SCALE_HELP.format(cpu=wrap(SCALES["cpu"].why), paper=wrap(SCALES["paper"].why),
                                                        budget=textwrap.fill(CPU_BUDGET, 110)) + "\n\n" + EXAMPLES[kind])
    parser.add_argument("--preset", metavar="NAME", help="a named configuration (mnist-conv, mnist-mlp, celeba64-conv, "
                        "linear-gaussian); default mnist-conv unless --config is given")
    parser.add_argument("--config", metavar="FILE", help="a YAML config applied over the preset")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override a setting of every run, e.g. --set model.latent_dim=32 (repeatable; not "
                        "objective.policy or train.seed: those are what the study varies)")
    if kind == "compare":
        parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES), metavar="LIST",
                            help="comma-separated policy specs (default: %(default)s)")
    else:
        parser.add_argument("--sigma2", default=",".join(_num(s) for s in DEFAULT_SWEEP_SIGMA2), metavar="LIST",
                            help="the fixed sigma^2 grid (default: %(default)s)")
        parser.add_argument("--reference", default="ar", metavar="LIST",
                            help="policies trained beside the grid; ar's final sigma^2 (else the first ar-type "
                            "policy's) is marked on the plots (default: %(default)s)")
    parser.add_argument("--seeds", metavar="LIST", help="seeds, e.g. 0,1,2 or 0-2 (default: 0; --paper: 0,1,2)")
    parser.add_argument("--out", metavar="DIR", required=True, help="the study folder")
    parser.add_argument("--runs-dir", metavar="DIR", help="where the run directories go (default: DIR/runs); point "
                        "two studies at the same one to share runs with identical configs")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="runs side by side as subprocesses, each with cores/N torch threads (default: 1, "
                        "one after the other in this process)")
    parser.add_argument("--paper", action="store_true", help="the paper scale (see below): a GPU or a few hours of CPU")
    parser.add_argument("--epochs", type=int, metavar="N", help="training epochs of every run (overrides the scale)")
    parser.add_argument("--steps-per-epoch", type=int, metavar="N",
                        help="batches per epoch (train.limit_train_batches; 0: full epochs; overrides the scale)")
    parser.add_argument("--eval-samples", type=int, metavar="N", help="generated samples per sampler for FID")
    parser.add_argument("--eval-examples", type=int, metavar="N",
                        help="cap on evaluation-split examples (0: all, the default)")
    parser.add_argument("--is-examples", type=int, metavar="N", help="examples for the IS-NLL (0: skip)")
    parser.add_argument("--k", type=int, metavar="K", help="importance samples per example for the IS-NLL")
    parser.add_argument("--two-stage-steps", type=int, metavar="N", help="Adam steps of the two-stage sampler's "
                        "second VAE")
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last",
                        help="which checkpoint is evaluated (default: last, the end of training: the same number of "
                        "steps for every run)")
    parser.add_argument("--gmm", action=argparse.BooleanOptionalAction, default=None,
                        help="also judge every policy with a GMM sampler (default: on)")
    parser.add_argument("--flow", action="store_true",
                        help="also judge every policy with a flow sampler (a MAF fitted to the training codes)")
    parser.add_argument("--two-stage-mean", action="store_true",
                        help="two-stage sampler: the second VAE's decoder mean alone (Dai & Wipf), not exact samples")
    parser.add_argument("--no-fid", action="store_true", help="skip FID (e.g. CelebA: no feature network here)")
    parser.add_argument("--two-stage-all", action="store_true",
                        help="judge every policy with the two-stage sampler too (a FID (two-stage) column)")
    parser.add_argument("--two-stage-patience", type=int, metavar="N",
                        help="stop the second stage once its validation -ELBO has not improved for N checks (every "
                        "200 steps; --two-stage-steps is then the maximum)")
    parser.add_argument("--gmm-grid", metavar="LIST", help="GMM component counts to choose from by validation "
                        "likelihood, e.g. 1,5,10,20 (default: 10 components)")
    parser.add_argument("--fid-repeats", type=int, metavar="N",
                        help="FID of each sampler on N independent sample draws: the sampling spread (default 1)")
    parser.add_argument("--dequantize", action="store_true",
                        help="likelihoods of uniformly dequantised pixels (v + u - 1/2)/255, with bits/dim (discrete)")
    parser.add_argument("--snapshots", action=argparse.BooleanOptionalAction, default=None,
                        help="also evaluate the kept snapshots (train.snapshot_steps) of every run (default: on)")
    parser.add_argument("--retry-failed", action="store_true", help="retry runs that failed in an earlier invocation")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and each run's state, do nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild results.json and the report from the runs there, train nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _command(args: argparse.Namespace, kind: str) -> str:
    """The command line of this study: as typed when run from a shell, else rebuilt from the parsed arguments."""
    import shlex

    from pathlib import Path

    if sys.argv[1:2] == [kind] and Path(sys.argv[0]).name in ("arelbo", "cli.py", "__main__.py"):
        return "arelbo " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    parts = ["arelbo", kind]
    for key, value in vars(args).items():
        if key in ("gmm", "snapshots") and value is False:  # the negatable flags
            parts.append(f"--no-{key}")
            continue
        if key.startswith("_") or key in ("command", "dry_run", "report_only") or value is None or value is False or value == []:
            continue
        flag = "--set" if key == "overrides" else "--" + key.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            parts += [flag] if v is True else [flag, str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def build_plan(args: argparse.Namespace, kind: str | None = None):
    from arelbo.study import parse_floats, plan_study, sweep_policies

    kind = kind or getattr(args, "_study_kind", "compare")
    preset = args.preset or (None if args.config else "mnist-conv")
    if kind == "sweep":
        policies = sweep_policies(parse_floats(args.sigma2), args.reference)
    else:
        policies = args.policies
    eval_options = {}
    if args.eval_samples is not None:
        eval_options["n_samples"] = args.eval_samples
    if args.eval_examples is not None:
        eval_options["max_examples"] = args.eval_examples or None
    if args.is_examples is not None:
        eval_options["is_examples"] = args.is_examples
    if args.k is not None:
        eval_options["k"] = args.k
    if args.two_stage_steps is not None:
        eval_options["two_stage_steps"] = args.two_stage_steps
    if args.gmm is not None:
        eval_options["gmm"] = args.gmm
    if args.flow:
        eval_options["flow"] = True
    if args.two_stage_mean:
        eval_options["two_stage_noise"] = False
    if args.no_fid:
        eval_options["fid"] = False
    if args.dequantize:
        eval_options["dequantize"] = True
    if args.two_stage_all:
        eval_options["two_stage_all"] = True
    if args.two_stage_patience is not None:
        eval_options["two_stage_patience"] = args.two_stage_patience
    if args.gmm_grid:
        from arelbo.study import StudyError

        try:
            eval_options["gmm_grid"] = tuple(int(k) for k in args.gmm_grid.replace(",", " ").split())
        except ValueError:
            raise StudyError(f"--gmm-grid: expected component counts separated by commas, got {args.gmm_grid!r}") from None
    if args.fid_repeats is not None:
        eval_options["fid_repeats"] = args.fid_repeats
    if args.snapshots is not None:
        eval_options["snapshots"] = args.snapshots
    eval_options["checkpoint"] = args.checkpoint
    return plan_study(policies, args.seeds, args.out, preset=preset, config_file=args.config,
                      overrides=args.overrides, scale="paper" if args.paper else "cpu", epochs=args.epochs,
                      steps_per_epoch=args.steps_per_epoch, eval_options=eval_options, runs_dir=args.runs_dir,
                      kind=kind, command=_command(args, kind))


def run(args: argparse.Namespace) -> int:
    import json

    from arelbo.study import StudyInterrupted, collect_results, run_state, run_study

    plan = build_plan(args)
    if args.dry_run:
        print(json.dumps({k: v for k, v in plan.to_dict().items() if k != "base_config"}, indent=2))
        print("\nbase config:\n" + plan.base_config.to_yaml())
        for r in plan.runs:
            state, detail = run_state(r, plan.eval)
            print(f"  {r.name:<24} {state:<9} {detail}")
        return 0
    if args.report_only:
        from arelbo.report import write_report
        from arelbo.fileio import atomic_write_text
        from arelbo.study import StudyError
        from arelbo.study.runner import check_study_dirs, is_study_dir

        check_study_dirs(plan)  # never over the user's own report.md / results.json
        for r in plan.runs:  # a run trained with another config than this command describes is an error
            run_state(r, plan.eval)
        study_file = plan.out / "study.json"
        if is_study_dir(plan.out):  # the report names the command that ran the study, not this one
            plan.command = json.loads(study_file.read_text(encoding="utf-8")).get("command") or plan.command
        results = collect_results(plan)
        if not any(p["n_done"] for p in results["policies"]):
            where = "its study" if is_study_dir(plan.out) else f"{plan.out} (no study there: no study.json)"
            raise StudyError(f"--report-only: nothing to report: none of the {len(plan.runs)} run(s) this command plans "
                             f"in {plan.runs_dir} has been trained and evaluated for {where}; run the study first (the "
                             f"same command without --report-only); nothing was written")
        atomic_write_text(plan.out / "results.json", json.dumps(results, indent=2) + "\n")
        md, html = write_report(results, plan.out)
        print(f"wrote {plan.out / 'results.json'}, {md}, {html}")
        return 0
    try:
        results = run_study(plan, jobs=args.jobs, progress=not args.quiet and sys.stderr.isatty())
    except StudyInterrupted as err:
        print(f"arelbo {plan.kind}: {err}", file=sys.stderr)
        return 130
    from arelbo.report import table_rows

    header, rows, notes = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    for i, n in enumerate(notes):
        print(f"[{i + 1}] n/a: {n}")
    print(f"\nwrote {plan.out / 'results.json'}, {plan.out / 'report.md'}, {plan.out / 'report.html'}")
    failed = sum(p["n_failed"] for p in results["policies"])
    if failed:
        print(f"{failed} run(s) failed (see the report); rerun with --retry-failed to try them again", file=sys.stderr)
    return 1 if failed else 0
