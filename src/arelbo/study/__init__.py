"""Studies: the same VAE trained under several decoder-variance policies and seeds, evaluated and aggregated.

``arelbo compare`` and ``arelbo sweep`` (:mod:`arelbo.cli.compare`) both go through one planner here:

    specs + seeds + base config  --plan_study-->  StudyPlan (training runs, deduplicated)
                                 --run_study--->  DIR/runs/<run>/ (train, resume or reuse; evaluate)
                                 --aggregate--->  DIR/results.json  --arelbo.report-->  report.md, report.html

A sweep is a compare whose policy list is generated (``fixed:S`` over a grid of sigma2, beside ``ar``).

**Policy specs** (:func:`parse_policy`), case-insensitive, numbers in any float syntax (``fixed:1e-2``):

=====================  ==========================================================================================
``fixed:S``            fixed decoder variance sigma2 = S > 0 (``fixed:1`` is the classic VAE)
``beta:B``             beta-VAE on plain squared error, B > 0
``learned[:S0]``       log sigma2 learned by gradient (Dai & Wipf's gamma, sigma-VAE), initialised at S0 (default 1)
``learned:mle,lr=X``   the same, initialised at the first training batch's MLE S / D, with its own Adam learning
                       rate X for log sigma2 (either part alone works: ``learned:mle``, ``learned:lr=0.01``,
                       ``learned:0.5,lr=0.01``); the naive ``learned`` moves log sigma2 ~train.lr per step
``learned-fair``       short for ``learned:mle,lr=0.01`` (the fair baseline: starts where AR-ELBO starts)
``two-stage[:ARGS]``   Dai & Wipf's two-stage VAE: stage 1 is the ``learned[:ARGS]`` run, generation (FID) uses the
                       ``two-stage`` sampler (a second VAE on the latent codes). It shares the training run of
                       ``learned[:ARGS]`` (same config, same seed: one run, two samplers)
``ar``                 AR-ELBO, isotropic (the method)
``ar-diagonal``        AR-ELBO, one variance per observed element
``ar-per-sample``      AR-ELBO, one variance per data point
``ar-ema[:M]``         AR-ELBO with an exponential moving average of the batch MLE, momentum M in [0, 1)
``ar-annealed[:N]``    AR-ELBO with a floor on sigma2 decaying log-linearly from 1 to sigma2_floor over N steps
                       (default objective.options.anneal_steps, 10000)
=====================  ==========================================================================================

Every policy but ``two-stage`` is judged with the ``prior`` sampler (z ~ p(z), the model's own prior: N(0, I), or
the learnable prior of ``--set model.prior=mog|vamp|flow``) and, by default, also with a Gaussian mixture fitted to
the training codes (``gmm``: a second FID column that separates decoder quality from the mismatch between the
aggregate posterior and the prior; ``--no-gmm`` drops it); ``--flow`` adds a third column from a normalising flow
fitted to the codes (``flow``).

**Runs and resume.** The (policy, seed) cell lives in ``RUNS/<slug>-s<seed>/`` (``RUNS`` = ``DIR/runs`` unless
``runs_dir`` is given; ``two-stage`` cells point at the ``learned`` run). Before doing anything each run's state is
read from its directory: no directory -> train; ``config.yaml`` but no checkpoint -> start again; a
``checkpoints/last.pt`` that has not reached the configured epochs/steps -> :func:`arelbo.train.resume`; finished
but no (or a stale / differently configured) ``metrics.json`` -> evaluate; finished and evaluated -> reused, its
files untouched. A run directory whose ``config.yaml`` differs from the planned config is an error (choose another
``--out``), never silently overwritten. A run that fails (e.g. a non-finite loss) is marked in
``study-run.json`` and skipped by later invocations unless ``retry_failed``.
"""

from __future__ import annotations

from arelbo.study.aggregate import (
    COLUMNS,
    PAIRED_KEYS,
    aggregate_values,
    collect_results,
    final_sigma2,
    load_plan_dir,
    paired_summary,
    run_values,
)
from arelbo.study.plan import (
    CPU_EPOCHS,
    CPU_EVAL_SAMPLES,
    CPU_IS_EXAMPLES,
    CPU_IS_K,
    CPU_MAX_EXAMPLES,
    CPU_MI_EXAMPLES,
    CPU_SMOOTHNESS_EXAMPLES,
    CPU_STEPS_PER_EPOCH,
    CPU_TWO_STAGE_STEPS,
    SCALES,
    EvalOptions,
    PlannedRun,
    Scale,
    StudyPlan,
    plan_study,
)
from arelbo.study.runner import (
    StudyInterrupted,
    pending_evaluations,
    run_device,
    run_state,
    run_study,
    snapshot_checkpoints,
    write_plan,
)
from arelbo.study.specs import (
    ALIASES,
    DEFAULT_POLICIES,
    DEFAULT_SWEEP_SIGMA2,
    FAIR_LEARNED,
    PLAN_DIR,
    RESULTS_FORMAT,
    RUN_MARKER,
    PolicySpec,
    SpecGrammar,
    StudyError,
    parse_floats,
    parse_policies,
    parse_policy,
    parse_seeds,
    spec_grammar,
    sweep_policies,
)

__all__ = [
    "RESULTS_FORMAT",
    "DEFAULT_POLICIES",
    "DEFAULT_SWEEP_SIGMA2",
    "RUN_MARKER",
    "PLAN_DIR",
    "StudyError",
    "PolicySpec",
    "SpecGrammar",
    "spec_grammar",
    "ALIASES",
    "FAIR_LEARNED",
    "parse_policy",
    "parse_policies",
    "parse_seeds",
    "parse_floats",
    "sweep_policies",
    "CPU_EPOCHS",
    "CPU_STEPS_PER_EPOCH",
    "CPU_EVAL_SAMPLES",
    "CPU_IS_EXAMPLES",
    "CPU_IS_K",
    "CPU_SMOOTHNESS_EXAMPLES",
    "CPU_MI_EXAMPLES",
    "CPU_MAX_EXAMPLES",
    "CPU_TWO_STAGE_STEPS",
    "EvalOptions",
    "Scale",
    "SCALES",
    "PlannedRun",
    "StudyPlan",
    "plan_study",
    "run_device",
    "snapshot_checkpoints",
    "pending_evaluations",
    "run_state",
    "StudyInterrupted",
    "write_plan",
    "run_study",
    "COLUMNS",
    "aggregate_values",
    "final_sigma2",
    "run_values",
    "collect_results",
    "PAIRED_KEYS",
    "paired_summary",
    "load_plan_dir",
]
