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

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from arelbo.config import ConfigError, RunConfig, load_config
from arelbo.objectives import Learned
from arelbo.runs import training_finished

__all__ = [
    "StudyError",
    "PolicySpec",
    "parse_policy",
    "parse_policies",
    "parse_seeds",
    "parse_floats",
    "sweep_policies",
    "Scale",
    "SCALES",
    "EvalOptions",
    "PlannedRun",
    "StudyPlan",
    "plan_study",
    "run_state",
    "run_study",
    "collect_results",
    "aggregate_values",
    "policy_sigma2_kind",
    "DEFAULT_POLICIES",
    "DEFAULT_SWEEP_SIGMA2",
]

RESULTS_FORMAT = 1
DEFAULT_POLICIES = ("fixed:1", "fixed:0.1", "fixed:0.01", "learned", "two-stage", "ar", "ar-diagonal",
                    "ar-per-sample", "ar-ema")
DEFAULT_SWEEP_SIGMA2 = (1.0, 0.1, 0.01, 0.001, 0.0001)
RUN_MARKER = "study-run.json"  # per run: what the study did to it (timings, failures)
PLAN_DIR = "plan"  # DIR/plan/<run>.yaml: the resolved config each run is trained with


class StudyError(ConfigError):
    """A problem with a study's specification or its output folder that the user can fix."""


# --------------------------------------------------------------------------------------------------------------
# Policy specs


def _num(value: float) -> str:
    """Canonical text of a float: shortest round-trip repr, without a trailing '.0' (1.0 -> '1', 1e-05 -> '1e-05')."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class PolicySpec:
    """One objective policy of a study, parsed from a spec string such as ``fixed:0.1``."""

    spec: str  # canonical spec ("fixed:0.1"); equal specs mean the same cell
    slug: str  # file-name form ("fixed-0.1")
    label: str  # for tables and plots ("fixed sigma2=0.1")
    policy: str  # arelbo.objectives policy name
    objective: dict  # objective.* settings: {"policy": name, "options": {...}} (no options: {"policy": name})
    sampler: str  # the sampler that generates for FID: "prior" or a sampler with a first stage ("two-stage")
    train_slug: str  # the training run this cell uses (= slug, except two-stage -> its learned run)
    sigma2: float | None = None  # the constant sigma2 of a given-sigma2 policy set by its spec (fixed:S), for sweeps
    sigma2_kind: str = "estimated"  # the policy's DecoderVariance.sigma2_kind: "estimated", "given" or "learned"

    def overrides(self) -> list[str]:
        # options start empty: a policy's options never carry over from the base config's policy
        return [f"objective.policy={json.dumps(self.policy)}",
                f"objective.options={json.dumps(self.objective.get('options', {}))}"]

    def to_dict(self) -> dict:
        return asdict(self)


def _spec_forms() -> list[str]:
    """The valid spec forms, from the registered policies (their aliases, and samplers with a first stage)."""
    from arelbo.objectives import POLICIES
    from arelbo.samplers import SAMPLERS

    forms = []
    for name, cls in POLICIES.items():
        opt = cls.spec_option
        form = cls.spec_form or (name if opt is None else f"{name}:{opt}" if cls.spec_required else f"{name}[:{opt}]")
        forms.append(form)
        forms.extend(cls.spec_aliases)
        for sname, scls in SAMPLERS.items():
            if scls.first_stage_policy == name:
                forms.append(sname + form[len(name):].split(" (")[0])
    return forms


def _grammar() -> str:
    return ", ".join(_spec_forms())


FAIR_LEARNED = Learned.spec_aliases["learned-fair"]  # what "learned-fair" stands for


def parse_policy(text: str) -> PolicySpec:
    """Parse one policy spec (see the module docstring); errors name the spec and list the valid forms.

    ``NAME`` or ``NAME:VALUE`` for any registered policy (VALUE sets its ``spec_option``), or ``SAMPLER[:VALUE]``
    for a sampler with a first stage of its own (``two-stage``: the ``learned[:VALUE]`` run, its own sampler).
    """
    from arelbo.objectives import POLICIES, make_policy
    from arelbo.samplers import SAMPLERS

    if not isinstance(text, str) or not text.strip():
        raise StudyError(f"empty policy spec; valid forms: {_grammar()}")
    spec = text.strip().lower()
    name, sep, arg = spec.partition(":")
    name, arg = name.strip(), arg.strip()
    if sep and not arg:
        raise StudyError(f"policy {text!r}: nothing after ':'; valid forms: {_grammar()}")
    for cls in POLICIES.values():  # short names, e.g. learned-fair = learned:mle,lr=0.01
        if name in cls.spec_aliases:
            if sep:
                raise StudyError(f"policy {text!r}: {name} takes no argument (it is {cls.spec_aliases[name]}); "
                                 f"write the full form for other values")
            name, sep, arg = cls.spec_aliases[name].partition(":")
            break
    sampler, sampler_cls = "prior", None
    if name not in POLICIES and getattr(SAMPLERS.get(name), "first_stage_policy", None):
        sampler, sampler_cls = name, SAMPLERS[name]
        name = sampler_cls.first_stage_policy
    if name not in POLICIES:
        raise StudyError(f"unknown policy {text!r}; valid forms: {_grammar()}")
    cls = POLICIES[name]
    options, first, keyed = _spec_args(text, sampler_cls.name if sampler_cls else name, cls, arg if sep else "")
    try:
        make_policy(name, **options)
    except ValueError as err:
        raise StudyError(f"policy {text!r}: {err}") from None
    parts = ([] if first is None else [first]) + [f"{k}={v}" for k, v in keyed.items()]
    train_slug = name + "".join("-" + q.replace("=", "") for q in parts)
    suffix = (":" + ",".join(parts)) if parts else ""
    label = cls.spec_label(first, keyed)
    objective = {"policy": name, "options": options} if options else {"policy": name}
    if sampler_cls is not None:
        base = cls.label or cls.name
        label = sampler_cls.study_label + (label[len(base):] if label.startswith(base + " (") else
                                           "" if label == base else f" ({label})")
        return PolicySpec(sampler + suffix, sampler + train_slug[len(name):], label, name, objective, sampler,
                          train_slug, None, cls.sigma2_kind)
    # the spec's number is the constant sigma2 itself (fixed:S): the x axis of a sweep
    given = options.get("sigma2") if cls.sigma2_kind == "given" and cls.spec_option == "sigma2" else None
    return PolicySpec(name + suffix, train_slug, label, name, objective, "prior", train_slug, given, cls.sigma2_kind)


def _spec_value(text: str, raw: str, what: str, option) -> tuple[Any, str]:
    """A spec's number for ``option`` (a PolicyOption): (value, canonical text); ints must be whole numbers."""
    try:
        value = float(raw)
    except ValueError:
        raise StudyError(f"policy {text!r}: {what} must be a number, got {raw!r}") from None
    if option is not None and option.type is int:
        if not value.is_integer():
            raise StudyError(f"policy {text!r}: {what} must be a whole number, got {raw}")
        return int(value), str(int(value))
    return value, _num(value)


def _spec_args(text: str, shown: str, cls, arg: str) -> tuple[dict, str | None, dict[str, str]]:
    """A spec's comma-separated arguments -> (policy options, text of its number or flag, {KEY: text})."""
    valid = cls.options()
    options: dict[str, Any] = {}
    first: str | None = None
    keyed: dict[str, str] = {}
    what = cls.spec_what or cls.spec_option or "value"
    for item in (a.strip() for a in arg.split(",")) if arg else ():
        if not item:
            raise StudyError(f"policy {text!r}: empty argument; valid forms: {_grammar()}")
        key, eq, raw = item.partition("=")
        if eq:
            key, raw = key.strip(), raw.strip()
            if key not in cls.spec_keys:
                known = ", ".join(f"{k}=" for k in cls.spec_keys) or "none"
                raise StudyError(f"policy {text!r}: unknown argument {key!r}; {shown} takes {known}")
            if key in keyed:
                raise StudyError(f"policy {text!r}: {key} given twice")
            option = cls.spec_keys[key]
            options[option], keyed[key] = _spec_value(text, raw, f"the {key.replace('_', ' ')}", valid.get(option))
            continue
        if cls.spec_option is None and not cls.spec_flags:
            raise StudyError(f"policy {text!r}: {shown} takes no argument; valid forms: {_grammar()}")
        if first is not None:
            flags = " or ".join(cls.spec_flags)
            raise StudyError(f"policy {text!r}: give one {what}{f' (a number or {flags})' if flags else ''}, got two")
        if item in cls.spec_flags:
            options.update(cls.spec_flags[item])
            first = item
        else:
            options[cls.spec_option], first = _spec_value(text, item, what, valid.get(cls.spec_option))
    if first is None and cls.spec_required:
        raise StudyError(f"policy {text!r}: {shown} needs its {what}, e.g. {shown}:{cls.spec_example}")
    # keyed items in the class's order: equal specs have one canonical text
    keyed = {k: keyed[k] for k in cls.spec_keys if k in keyed}
    return options, first, keyed


def parse_policies(items: str | Iterable[str]) -> list[PolicySpec]:
    """A comma-separated string (or list of specs) -> specs in order, duplicates (same canonical spec) dropped."""
    if isinstance(items, str):
        items = items.split(",")
    out: dict[str, PolicySpec] = {}
    for item in items:
        if not str(item).strip():
            continue
        p = parse_policy(str(item))
        out.setdefault(p.spec, p)
    if not out:
        raise StudyError(f"no policies given; valid forms: {_grammar()}")
    return list(out.values())


def parse_seeds(text: str | Iterable[int]) -> list[int]:
    """``"0,1,2"`` or ``"0-2"`` (or a list) -> sorted unique non-negative ints."""
    if isinstance(text, str):
        seeds: list[int] = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            try:
                if m:
                    lo, hi = int(m.group(1)), int(m.group(2))
                    if hi < lo:
                        raise StudyError(f"seed range {part!r} is empty")
                    seeds.extend(range(lo, hi + 1))
                else:
                    seeds.append(int(part))
            except ValueError:
                raise StudyError(f"--seeds: {part!r} is not a seed (use e.g. 0,1,2 or 0-2)") from None
    else:
        seeds = [int(s) for s in text]
    if not seeds or any(s < 0 for s in seeds):
        raise StudyError(f"--seeds needs one or more non-negative integers, got {text!r}")
    return sorted(set(seeds))


def parse_floats(text: str | Iterable[float], what: str = "--sigma2") -> list[float]:
    values = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    try:
        out = [float(v) for v in values]
    except ValueError:
        raise StudyError(f"{what}: expected numbers separated by commas, got {text!r}") from None
    if not out or any(not (math.isfinite(v) and v > 0) for v in out):
        raise StudyError(f"{what}: expected one or more positive numbers, got {text!r}")
    return out


def sweep_policies(sigma2: Iterable[float], reference: str | Iterable[str] = "ar") -> list[PolicySpec]:
    """The sweep's policy list: ``fixed:S`` for every S (largest first), then the reference policies."""
    from arelbo.objectives import Fixed

    grid = sorted(set(float(s) for s in sigma2), reverse=True)
    refs = parse_policies(reference) if reference else []
    return parse_policies([f"{Fixed.name}:{_num(s)}" for s in grid] + [r.spec for r in refs])


# --------------------------------------------------------------------------------------------------------------
# Scales and evaluation options

# The CPU scale: measured with the mnist-conv preset on a 2-core CPU (see Scale.why and the
# CLI help). Each run: CPU_EPOCHS epochs of CPU_STEPS_PER_EPOCH batches of the preset's batch size (128 for
# mnist-conv), validation on the full validation split after each epoch. Measured on 2 idle cores: ~10 training
# steps/s (2000 steps + 5 validations: 142-152 s), evaluation with prior + GMM 21-29 s (learned + two-stage: 39 s).
CPU_EPOCHS = 5
CPU_STEPS_PER_EPOCH = 400  # 2000 Adam steps of 128 images (4.7 MNIST epochs): ~10 steps/s on 2 idle cores
CPU_EVAL_SAMPLES = 5000  # >= 2048: FID alone (KID is computed below 2048 samples)
CPU_IS_EXAMPLES = 500
CPU_IS_K = 50
CPU_SMOOTHNESS_EXAMPLES = 500
CPU_MI_EXAMPLES = 5000
CPU_MAX_EXAMPLES = None  # the whole test split (10000 MNIST images)
CPU_TWO_STAGE_STEPS = 2000


@dataclass(frozen=True)
class EvalOptions:
    """What :func:`arelbo.evaluate.evaluate_run` is asked for, the same for every run of a study."""

    n_samples: int = 10000  # generated images per sampler for FID (KID too when < 2048)
    fid: bool = True
    checkpoint: str = "last"  # every run is judged at the end of its (equal) training budget
    split: str = "test"
    k: int = 100  # importance samples per example (IS-NLL)
    is_examples: int = 1000
    smoothness_examples: int = 1000
    mi_examples: int = 10000
    max_examples: int | None = None  # cap on evaluation (and sampler-fitting) examples
    gmm: bool = False  # also the GMM sampler (a second FID column)
    flow: bool = False  # also the flow sampler (a MAF fitted to the training codes: another FID column)
    two_stage_steps: int | None = None  # second-stage Adam steps (None: the sampler's default, 3000)
    two_stage_policy: str | None = None  # second-stage decoder-variance policy (None: the sampler's default, ar)
    # Sample the second stage exactly (its decoder noise included); False: its decoder mean (Dai & Wipf). Always
    # passed, so an evaluation made the other way is detected as stale.
    two_stage_noise: bool = True
    batch_size: int = 500
    seed: int = 0
    # Also evaluate every kept snapshot (checkpoints/step-<N>.pt from train.snapshot_steps) into
    # metrics-step-<N>.json, with the same request: metrics against training steps.
    snapshots: bool = True
    dequantize: bool = False  # likelihoods of uniformly dequantised pixels, bits/dim (discrete) reported
    two_stage_all: bool = False  # the two-stage sampler for every run (a "FID (two-stage)" column), not only two-stage
    two_stage_patience: int | None = None  # early stopping of the second stage on validation codes (None: all steps)
    gmm_grid: tuple[int, ...] | None = None  # GMM component counts to choose from by validation likelihood
    fid_repeats: int = 1  # independent sample draws per sampler (the FID's sampling spread)
    fid_reconstruction: bool = True  # FID of the test reconstructions (the floor for every sampler)

    def samplers_for(self, headline: Iterable[str]) -> list[str]:
        names = ["prior", *headline] + (["gmm"] if self.gmm else []) + (["two-stage"] if self.two_stage_all else [])
        names += ["flow"] if self.flow else []
        return list(dict.fromkeys(names))

    def sampler_options(self, samplers: Sequence[str]) -> dict:
        out: dict[str, dict] = {}
        opts: dict[str, Any] = {}
        if "two-stage" in samplers and self.two_stage_steps is not None:
            opts["steps"] = int(self.two_stage_steps)
        if "two-stage" in samplers and self.two_stage_policy is not None:
            opts["policy"] = str(self.two_stage_policy)
        if "two-stage" in samplers and self.two_stage_patience is not None:
            opts["patience"] = int(self.two_stage_patience)
        if "two-stage" in samplers:
            opts["noise"] = bool(self.two_stage_noise)
        if opts:
            out["two-stage"] = opts
        if "gmm" in samplers and self.gmm_grid is not None:
            out["gmm"] = {"components_grid": sorted({int(k) for k in self.gmm_grid})}
        return out

    def eval_config(self, samplers: Sequence[str], which: str | None = None, device: str = "cpu"):
        """The :class:`arelbo.evalconfig.EvalConfig` of one run's evaluation: the fields both have (by name),
        the checkpoint, the samplers and their options."""
        from dataclasses import fields

        from arelbo.evalconfig import EvalConfig

        shared = {f.name for f in fields(self)} & {f.name for f in fields(EvalConfig)}
        return EvalConfig(**{name: getattr(self, name) for name in shared}, which=which or self.checkpoint,
                          device=device, samplers=list(samplers), sampler_options=self.sampler_options(samplers))

    def evaluate_kwargs(self, samplers: Sequence[str], which: str | None = None, device: str = "cpu") -> dict:
        return self.eval_config(samplers, which, device).to_dict()

    def cli_args(self, samplers: Sequence[str], which: str | None = None, device: str = "cpu") -> list[str]:
        """The same request as ``arelbo eval`` arguments (for --jobs subprocesses)."""
        return [*self.eval_config(samplers, which, device).cli_args(), "--no-progress"]


@dataclass(frozen=True)
class Scale:
    """A named training/evaluation budget: config overrides, default seeds and evaluation options."""

    name: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...]
    eval: EvalOptions
    why: str


SCALES = {
    "cpu": Scale(
        "cpu",
        (f"train.epochs={CPU_EPOCHS}", f"train.limit_train_batches={CPU_STEPS_PER_EPOCH}"),
        (0,),
        EvalOptions(n_samples=CPU_EVAL_SAMPLES, k=CPU_IS_K, is_examples=CPU_IS_EXAMPLES,
                    smoothness_examples=CPU_SMOOTHNESS_EXAMPLES, mi_examples=CPU_MI_EXAMPLES,
                    max_examples=CPU_MAX_EXAMPLES, gmm=True, two_stage_steps=CPU_TWO_STAGE_STEPS),
        f"CPU default: {CPU_EPOCHS} epochs x {CPU_STEPS_PER_EPOCH} batches (the preset's batch size), seed 0; "
        f"evaluation on the whole test split, {CPU_EVAL_SAMPLES} samples per sampler for FID, "
        f"prior and GMM samplers (+ two-stage), IS-NLL K={CPU_IS_K} on {CPU_IS_EXAMPLES} images, smoothness on "
        f"{CPU_SMOOTHNESS_EXAMPLES}, two-stage sampler {CPU_TWO_STAGE_STEPS} steps. The default 9-policy "
        f"MNIST study (8 training runs: two-stage shares learned's) takes about 24 minutes on 2 idle CPU cores: "
        f"about 3 minutes per run (142-152 s training + 21-39 s evaluation).",
    ),
    "paper": Scale(
        "paper",
        (),
        (0, 1, 2),
        EvalOptions(n_samples=10000, k=100, is_examples=1000, smoothness_examples=1000, mi_examples=10000,
                    max_examples=None, gmm=True, two_stage_steps=None),
        "paper scale (--paper): the preset's full training (all batches, its epochs: 20 for mnist-conv, 50 for "
        "celeba64-conv), seeds 0,1,2; evaluation on the full test split, 10000 samples per sampler for FID, prior "
        "and GMM samplers (+ two-stage), IS-NLL K=100 on 1000 images, smoothness on 1000, MI on 10000, two-stage "
        "sampler 3000 steps. Meant for a GPU (--set train.accelerator=gpu).",
    ),
}


# --------------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class PlannedRun:
    """One training run (a (training policy, seed) pair) and what is asked of its evaluation."""

    name: str  # "<train_slug>-s<seed>"
    seed: int
    run_dir: Path
    config: RunConfig
    samplers: list[str]
    policies: list[str]  # the specs whose cells this run serves

    def to_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "run_dir": str(self.run_dir), "samplers": self.samplers,
                "policies": self.policies}


@dataclass
class StudyPlan:
    kind: str  # "compare" | "sweep"
    out: Path
    runs_dir: Path
    policies: list[PolicySpec]
    seeds: list[int]
    base_config: RunConfig
    runs: list[PlannedRun]
    eval: EvalOptions
    scale: Scale
    preset: str | None = None
    config_file: str | None = None
    overrides: list[str] = field(default_factory=list)
    command: str = ""
    dropped: list[str] = field(default_factory=list)  # notes on deduplication

    def cell(self, spec: str, seed: int) -> PlannedRun:
        p = next(p for p in self.policies if p.spec == spec)
        return self.run_by_name[f"{p.train_slug}-s{seed}"]

    @property
    def run_by_name(self) -> dict[str, PlannedRun]:
        return {r.name: r for r in self.runs}

    def to_dict(self) -> dict:
        return {
            "format": RESULTS_FORMAT,
            "kind": self.kind,
            "command": self.command,
            "preset": self.preset,
            "config_file": self.config_file,
            "overrides": list(self.overrides),
            "scale": {"name": self.scale.name, "overrides": list(self.scale.overrides), "why": self.scale.why},
            "seeds": self.seeds,
            "policies": [p.to_dict() for p in self.policies],
            "eval": asdict(self.eval),
            "runs_dir": str(self.runs_dir),
            "runs": [r.to_dict() for r in self.runs],
            "cells": [{"policy": p.spec, "seed": s, "run": f"{p.train_slug}-s{s}"} for p in self.policies for s in self.seeds],
            "dedup": self.dropped,
            "base_config": self.base_config.to_dict(),
        }


def plan_study(
    policies: str | Sequence[str] | Sequence[PolicySpec] = DEFAULT_POLICIES,
    seeds: str | Sequence[int] | None = None,
    out: str | os.PathLike = "study",
    *,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    scale: str = "cpu",
    epochs: int | None = None,
    steps_per_epoch: int | None = None,
    eval_options: dict | None = None,
    runs_dir: str | os.PathLike | None = None,
    kind: str = "compare",
    command: str = "",
) -> StudyPlan:
    """Resolve the base config and the list of training runs (deduplicated) of a study. Writes nothing.

    Layers of the base config: preset <- ``config_file`` <- the scale's overrides <- ``epochs`` /
    ``steps_per_epoch`` (0: full epochs) <- ``overrides`` (``--set``); then per run the policy's
    ``objective.*`` and ``train.seed``. ``eval_options``: fields of :class:`EvalOptions` replacing the scale's.
    """
    if scale not in SCALES:
        raise StudyError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
    sc = SCALES[scale]
    specs = parse_policies(policies if isinstance(policies, str) else
                           [p.spec if isinstance(p, PolicySpec) else p for p in policies])
    seed_list = parse_seeds(seeds) if seeds is not None else list(sc.seeds)
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key.startswith("objective.policy") or key == "objective":
            raise StudyError(f"--set {text}: the policy is what a study varies; list policies with --policies")
        if key.startswith("objective.options"):
            raise StudyError(f"--set {text}: policy options belong to each policy's spec (e.g. fixed:0.1, "
                             f"ar-ema:0.9); list policies with --policies")
        if key == "train.seed":
            raise StudyError(f"--set {text}: seeds are what a study varies; use --seeds")
        if key in ("name", "out_dir"):
            raise StudyError(f"--set {text}: run names and folders are chosen by the study (--out)")
    layers = list(sc.overrides)
    if epochs is not None:
        if epochs < 1:
            raise StudyError(f"--epochs must be >= 1, got {epochs}")
        layers.append(f"train.epochs={int(epochs)}")
    if steps_per_epoch is not None:
        if steps_per_epoch < 0:
            raise StudyError(f"--steps-per-epoch must be >= 0 (0: full epochs), got {steps_per_epoch}")
        layers.append(f"train.limit_train_batches={int(steps_per_epoch) if steps_per_epoch else 'null'}")
    base = load_config(preset, config_file, [*layers, *overrides])
    opts = EvalOptions(**{**asdict(sc.eval), **(eval_options or {})})
    if not opts.fid and (opts.gmm or opts.flow):  # ex-post samplers exist only as FID columns: without FID, no fit
        opts = replace(opts, gmm=False, flow=False)
    if opts.fid_repeats < 1 or (opts.two_stage_patience is not None and opts.two_stage_patience < 1):
        raise StudyError(f"--fid-repeats and --two-stage-patience must be >= 1, got {opts.fid_repeats}, "
                         f"{opts.two_stage_patience}")
    if opts.gmm_grid is not None and (not opts.gmm_grid or min(opts.gmm_grid) < 1):
        raise StudyError(f"--gmm-grid needs component counts >= 1, got {opts.gmm_grid}")
    if opts.n_samples < 0 or opts.k < 1 or opts.is_examples < 0:
        raise StudyError("evaluation needs n_samples >= 0, k >= 1, is_examples >= 0")
    if opts.checkpoint not in ("best", "last"):
        raise StudyError(f"checkpoint must be best or last, got {opts.checkpoint!r}")
    out = Path(out)
    rdir = Path(runs_dir) if runs_dir is not None else out / "runs"

    runs: dict[str, PlannedRun] = {}
    notes: list[str] = []
    for p in specs:
        for seed in seed_list:
            name = f"{p.train_slug}-s{seed}"
            if name in runs:
                run = runs[name]
                if p.spec not in run.policies:
                    notes.append(f"{p.spec} seed {seed} shares the training run {name} with {', '.join(run.policies)}")
                    run.policies.append(p.spec)
                run.samplers = opts.samplers_for([*run.samplers, p.sampler])
                continue
            cfg = RunConfig.from_dict(_with_overrides(base.to_dict(), [*p.overrides(), f"train.seed={seed}"]))
            cfg.out_dir, cfg.name = str(rdir), name
            runs[name] = PlannedRun(name, seed, rdir / name, cfg, opts.samplers_for([p.sampler]), [p.spec])
    return StudyPlan(kind, out, rdir, specs, seed_list, base, list(runs.values()), opts, sc, preset,
                     None if config_file is None else str(config_file), list(overrides), command, notes)


def _with_overrides(d: dict, overrides: Sequence[str]) -> dict:
    from arelbo.config import apply_overrides

    return apply_overrides(d, overrides)


# --------------------------------------------------------------------------------------------------------------
# Run state


def _comparable(cfg: dict) -> dict:
    d = dict(cfg)
    d.pop("out_dir", None)
    d.pop("name", None)
    return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} (existing) vs {b!r} (planned)"]


def _read_marker(run_dir: Path) -> dict:
    path = run_dir / RUN_MARKER
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_marker(run_dir: Path, **updates) -> dict:
    from arelbo.runs import atomic_write_text

    marker = _read_marker(run_dir)
    history = marker.get("history", [])
    if "event" in updates:
        history.append(updates.pop("event"))
    marker.update(updates, history=history)
    atomic_write_text(run_dir / RUN_MARKER, json.dumps(marker, indent=2) + "\n")
    return marker


def _metrics_match(metrics: dict, run: PlannedRun, opts: EvalOptions, ckpt_file: Path, metrics_file: Path,
                   which: str | None = None) -> str | None:
    """None when a metrics file answers this study's evaluation request (of checkpoint ``which``, default the
    study's), else why it does not."""
    which = which or opts.checkpoint
    try:
        p = metrics["protocol"]
        if metrics["checkpoint"]["which"] != which:
            return f"evaluated at checkpoint {metrics['checkpoint']['which']!r}, the study asks for {which!r}"
        missing = [s for s in run.samplers if s not in (p.get("samplers") or {})]
        if missing:
            return f"no evaluation of sampler(s) {', '.join(missing)}"
        if int(p["fid"]["n_samples"]) != opts.n_samples:
            return f"{p['fid']['n_samples']} samples per sampler, the study asks for {opts.n_samples}"
        disabled = str(p["fid"].get("skipped") or "").startswith("disabled")
        if disabled == opts.fid:
            return "FID " + ("skipped" if disabled else "computed") + " there, the study asks otherwise"
        if p.get("max_examples") != opts.max_examples or p.get("split") != opts.split:
            return "a different evaluation split or example cap"
        if int(p["fid"].get("repeats", 1)) != opts.fid_repeats:
            return f"FID on {p['fid'].get('repeats', 1)} sample draw(s), the study asks for {opts.fid_repeats}"
        if bool(p["fid"].get("reconstruction", False)) != opts.fid_reconstruction:
            return "reconstruction FID " + ("missing" if opts.fid_reconstruction else "present") + ", asked otherwise"
        if bool((p.get("dequantize") or {}).get("on")) != opts.dequantize:
            return "dequantisation " + ("off" if opts.dequantize else "on") + " there, the study asks otherwise"
        if int(p["is_nll"]["k"]) != opts.k:
            return f"IS-NLL with K={p['is_nll']['k']}, the study asks for K={opts.k}"
        for name, wanted in opts.sampler_options(run.samplers).items():
            have = (p["samplers"][name].get("config") or {})
            changed = [k for k, v in wanted.items() if have.get(k) != v]
            if changed:
                return f"sampler {name} fitted with other {', '.join(changed)}"
    except (KeyError, TypeError, ValueError) as err:
        return f"unreadable metrics.json ({type(err).__name__}: {err})"
    if ckpt_file.is_file() and ckpt_file.stat().st_mtime > metrics_file.stat().st_mtime:
        return "the checkpoint is newer than metrics.json"
    return None


def run_device(cfg: RunConfig) -> str:
    """The device a run's evaluation uses: the one it trained on (train.accelerator; auto: CUDA when present)."""
    return {"cpu": "cpu", "gpu": "cuda"}.get(cfg.train.accelerator, "auto")


def snapshot_checkpoints(run: PlannedRun) -> list[tuple[int, Path]]:
    """(step, file) of the kept snapshots of ``train.snapshot_steps`` that exist (a run shorter than a planned
    snapshot step has no such file)."""
    from arelbo.runs import CHECKPOINT_DIR, snapshot_name

    out = []
    for step in run.config.train.snapshot_steps:
        f = run.run_dir / CHECKPOINT_DIR / f"{snapshot_name(step)}.pt"
        if f.is_file():
            out.append((int(step), f))
    return out


def pending_evaluations(run: PlannedRun, opts: EvalOptions) -> list[tuple[str, str]]:
    """(which, why) for each checkpoint of a trained run whose metrics file is missing or not what is asked: the
    final one (``opts.checkpoint``, metrics.json) and, with ``opts.snapshots``, every kept snapshot."""
    from arelbo.evaluate import metrics_file
    from arelbo.runs import snapshot_name

    d = run.run_dir
    wanted = [(opts.checkpoint, d / "checkpoints" / f"{opts.checkpoint}.pt")]
    if opts.snapshots:
        wanted += [(snapshot_name(step), f) for step, f in snapshot_checkpoints(run)]
    out = []
    for which, ckpt_file in wanted:
        if which == "best" and not ckpt_file.is_file():
            ckpt_file = d / "checkpoints" / "last.pt"
        mfile = metrics_file(d, which)
        if not mfile.is_file():
            out.append((which, f"{mfile.name} missing"))
            continue
        try:
            metrics = json.loads(mfile.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            out.append((which, f"{mfile.name} unreadable ({err})"))
            continue
        why = _metrics_match(metrics, run, opts, ckpt_file, mfile, which)
        if why:
            out.append((which, f"{mfile.name}: {why}" if which != opts.checkpoint else why))
    return out


def run_state(run: PlannedRun, opts: EvalOptions) -> tuple[str, str]:
    """(state, detail) of a planned run from its directory alone.

    States: ``new`` (train it), ``restart`` (a config but no checkpoint: interrupted before its first one; start
    again), ``resume`` (a checkpoint short of the end), ``evaluate`` (trained, metrics.json missing or not what
    is asked), ``done`` (reuse), ``failed`` (a previous attempt failed; see study-run.json).
    Raises :class:`StudyError` when the directory holds a run with a different config.
    """
    from arelbo.runs import load_checkpoint

    d = run.run_dir
    cfg_file = d / "config.yaml"
    if not cfg_file.is_file():
        if (d / "checkpoints").exists():
            raise StudyError(f"{d} has checkpoints but no config.yaml: not a run this study can continue; "
                             f"move it away or choose another --out")
        return "new", "no run yet"
    try:
        existing = RunConfig.load(cfg_file).to_dict()
    except (ConfigError, OSError) as err:
        raise StudyError(f"{cfg_file} cannot be read ({err}); move {d} away or choose another --out") from None
    diff = _diff(_comparable(existing), _comparable(run.config.to_dict()))
    if diff:
        raise StudyError(f"{d} holds a run with a different config than this study plans ({'; '.join(diff[:5])}"
                         f"{'; ...' if len(diff) > 5 else ''}); choose another --out (or --runs-dir), or remove it")
    marker = _read_marker(d)
    if marker.get("status") == "failed":
        return "failed", str(marker.get("error", "failed"))
    last = d / "checkpoints" / "last.pt"
    if not last.is_file():
        return "restart", "interrupted before its first checkpoint"
    try:
        ckpt = load_checkpoint(last)
    except Exception as err:  # a truncated file cannot happen with atomic writes, but be clear if it does
        raise StudyError(f"{last} cannot be read ({err}); remove {d} to retrain it") from None
    if not training_finished(ckpt, run.config):
        return "resume", f"stopped at step {ckpt.get('global_step')} (epoch {ckpt.get('epoch')})"
    pending = pending_evaluations(run, opts)
    if pending:
        if not (d / "metrics.json").is_file():
            return "evaluate", "trained, not evaluated"
        return "evaluate", "; ".join(why for _, why in pending)
    return "done", "trained and evaluated"


# --------------------------------------------------------------------------------------------------------------
# Running


class StudyInterrupted(RuntimeError):
    """Ctrl-C (or a training interrupt): the study stopped; running the same command again resumes it."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_plan(plan: StudyPlan, status: str, extra: dict | None = None) -> Path:
    from arelbo.runs import atomic_write_text

    plan.out.mkdir(parents=True, exist_ok=True)
    d = plan.to_dict()
    d.update({"status": status, "updated": _now(), **(extra or {})})
    path = plan.out / "study.json"
    atomic_write_text(path, json.dumps(d, indent=2) + "\n")
    return path


def _run_in_process(run: PlannedRun, state: str, opts: EvalOptions, progress: bool, callbacks, splits_cache: dict,
                    log: Callable[[str], None]) -> dict:
    """Train/resume (as needed) then evaluate one run in this process; returns timings."""
    from arelbo.evaluate import evaluate_run
    from arelbo.train import fit, load_splits, resume

    timings: dict[str, float] = {}
    if state in ("new", "restart", "resume"):
        key = json.dumps(run.config.data.__dict__, sort_keys=True, default=str)
        if key not in splits_cache:
            splits_cache.clear()  # keep one dataset in memory
            splits_cache[key] = load_splits(run.config)
        splits = splits_cache[key]
        t0 = time.perf_counter()
        if state == "resume":
            resume(run.run_dir, splits=splits, progress=progress, callbacks=callbacks)
        else:
            if state == "restart":
                shutil.rmtree(run.run_dir)
            cfg = RunConfig.from_dict(run.config.to_dict())
            fit(cfg, run.run_dir, splits=splits, progress=progress, callbacks=callbacks)
        timings["train_seconds"] = time.perf_counter() - t0
        _write_marker(run.run_dir, event={"action": state, "seconds": round(timings["train_seconds"], 1), "at": _now()})
    t0 = time.perf_counter()
    device = run_device(run.config)
    for which, _ in pending_evaluations(run, opts):
        evaluate_run(run.run_dir, **opts.evaluate_kwargs(run.samplers, which, device), progress=False)
    timings["eval_seconds"] = time.perf_counter() - t0
    return timings


def _package_path() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _run_subprocess(run: PlannedRun, state: str, opts: EvalOptions, plan: StudyPlan, threads: int,
                    log: Callable[[str], None]) -> dict:
    """The same as :func:`_run_in_process` through ``python -m arelbo.cli train/eval`` (for --jobs N)."""
    from arelbo.runs import atomic_write_text

    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([_package_path(), *filter(None, [env.get("PYTHONPATH")])])
    cli = [sys.executable, "-m", "arelbo.cli"]
    timings: dict[str, float] = {}
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run.run_dir.parent / f"{run.name}.log"

    def call(args: list[str], what: str) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"\n$ {' '.join(args)}\n")
            f.flush()
            proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env=env)
        if proc.returncode == 130:
            raise StudyInterrupted(f"{run.name}: {what} interrupted")
        if proc.returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{what} exited with {proc.returncode}: {' | '.join(tail)} (log: {log_path})")

    if state in ("new", "restart", "resume"):
        t0 = time.perf_counter()
        if state == "resume":
            call([*cli, "train", "--resume", str(run.run_dir), "--quiet"], "training")
        else:
            if state == "restart":
                shutil.rmtree(run.run_dir)
            cfg_path = plan.out / PLAN_DIR / f"{run.name}.yaml"
            atomic_write_text(cfg_path, run.config.to_yaml())
            call([*cli, "train", "--config", str(cfg_path), "--out", str(run.run_dir), "--quiet"], "training")
        timings["train_seconds"] = time.perf_counter() - t0
        _write_marker(run.run_dir, event={"action": state, "seconds": round(timings["train_seconds"], 1), "at": _now()})
    t0 = time.perf_counter()
    device = run_device(run.config)
    for which, _ in pending_evaluations(run, opts):
        call([*cli, "eval", str(run.run_dir), *opts.cli_args(run.samplers, which, device)], f"evaluation of {which}")
    timings["eval_seconds"] = time.perf_counter() - t0
    return timings


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_study(plan: StudyPlan, *, jobs: int = 1, progress: bool = True, retry_failed: bool = False,
              train_callbacks: Sequence = (), report: bool = True, log: Callable[[str], None] = print) -> dict:
    """Bring every planned run to ``done`` (train / resume / evaluate as its state requires), then aggregate into
    ``results.json`` and (``report``) write ``report.md`` / ``report.html``. Returns the results dict.

    ``jobs`` > 1: that many runs side by side, each as ``python -m arelbo.cli train`` then ``eval`` subprocesses
    with ``cores // jobs`` torch threads; 1 (default): one after the other in this process.
    ``train_callbacks``: Lightning callbacks for in-process training (tests interrupt runs with them).
    Ctrl-C stops the study (:class:`StudyInterrupted`); the same call again continues it.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from arelbo.train import TrainingInterrupted

    if jobs < 1:
        raise StudyError(f"--jobs must be >= 1, got {jobs}")
    t_start = time.perf_counter()
    plan.out.mkdir(parents=True, exist_ok=True)
    states = {r.name: run_state(r, plan.eval) for r in plan.runs}  # raises before anything is written
    if retry_failed:
        for r in plan.runs:
            if states[r.name][0] == "failed":
                _write_marker(r.run_dir, status="retrying", error=None)
                states[r.name] = run_state(r, plan.eval)
    write_plan(plan, "running", {"started": _now()})
    width = max(len(r.name) for r in plan.runs)
    log(f"study: {len(plan.policies)} policies x {len(plan.seeds)} seed(s) = {len(plan.runs)} training run(s) "
        f"in {plan.runs_dir} ({plan.scale.name} scale, jobs={jobs})")
    for r in plan.runs:
        state, detail = states[r.name]
        action = {"new": "train", "restart": "train again", "resume": "resume", "evaluate": "evaluate",
                  "done": "reuse", "failed": "skip (failed before; --retry-failed)"}[state]
        log(f"  {r.name:<{width}}  {action:<12} {detail}")
    todo = [r for r in plan.runs if states[r.name][0] not in ("done", "failed")]
    threads = max(1, _cores() // jobs)
    failures: dict[str, str] = {}

    def work(run: PlannedRun) -> tuple[PlannedRun, dict]:
        state = states[run.name][0]
        if jobs == 1:
            return run, _run_in_process(run, state, plan.eval, progress, train_callbacks, splits_cache, log)
        return run, _run_subprocess(run, state, plan.eval, plan, threads, log)

    splits_cache: dict = {}
    done_count = 0

    def finished(run: PlannedRun, timings: dict) -> None:
        nonlocal done_count
        done_count += 1
        _write_marker(run.run_dir, status="done", error=None, **{k: round(v, 1) for k, v in timings.items()})
        parts = [f"{k.split('_')[0]} {v:.0f} s" for k, v in timings.items()]
        log(f"[{done_count}/{len(todo)}] {run.name}: {', '.join(parts)} (study {time.perf_counter() - t_start:.0f} s)")

    def failed(run: PlannedRun, err: BaseException) -> None:
        nonlocal done_count
        done_count += 1
        msg = f"{type(err).__name__}: {err}"
        failures[run.name] = msg
        if run.run_dir.is_dir():
            _write_marker(run.run_dir, status="failed", error=msg, event={"action": "failed", "error": msg, "at": _now()})
        log(f"[{done_count}/{len(todo)}] {run.name}: FAILED ({msg})")

    try:
        if jobs == 1:
            for run in todo:
                log(f"== {run.name} ({states[run.name][0]})")
                try:
                    finished(*work(run))
                except (TrainingInterrupted, KeyboardInterrupt, StudyInterrupted) as err:
                    if run.run_dir.is_dir():
                        _write_marker(run.run_dir, status="interrupted",
                                      event={"action": f"{states[run.name][0]} (interrupted)", "at": _now()})
                    raise StudyInterrupted(str(err)) from err
                except Exception as err:  # noqa: BLE001 - one bad run must not stop the others; it is recorded
                    failed(run, err)
        else:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(work, r): r for r in todo}
                try:
                    for fut in as_completed(futures):
                        try:
                            finished(*fut.result())
                        except StudyInterrupted:
                            raise
                        except Exception as err:  # noqa: BLE001
                            failed(futures[fut], err)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    except (StudyInterrupted, KeyboardInterrupt) as err:
        write_plan(plan, "interrupted", {"interrupted": _now()})
        raise StudyInterrupted(f"study interrupted ({err}); run the same command again to continue where it stopped") from None
    results = collect_results(plan, wall_seconds=time.perf_counter() - t_start)
    from arelbo.runs import atomic_write_text

    atomic_write_text(plan.out / "results.json", json.dumps(results, indent=2) + "\n")
    if report:
        from arelbo.report import write_report

        write_report(results, plan.out)
    write_plan(plan, "failed runs" if failures else "complete", {"finished": _now()})
    return results


# --------------------------------------------------------------------------------------------------------------
# Aggregation

# (key, label, unit, digits): the table's columns, in order. "fid" is the policy's own sampler (prior, or
# two-stage for the two-stage policy); "fid_gmm" / "fid_flow" appear when the GMM / flow sampler was evaluated.
COLUMNS = [
    ("fid", "FID", "", 2),
    ("fid_gmm", "FID (GMM)", "", 2),
    ("fid_two_stage", "FID (two-stage)", "", 2),
    ("fid_flow", "FID (flow)", "", 2),
    ("fid_reconstruction", "FID (reconstructions)", "", 2),
    ("active_units", "active units", "", 3),
    ("kl_total", "KL", "nats", 3),
    ("mse", "MSE", "", 3),
    ("neg_elbo", "-ELBO", "nats", 4),
    ("neg_elbo_ar", "-ELBO, common σ²", "nats", 4),
    ("neg_elbo_bpd", "-ELBO", "bits/dim", 4),
    ("is_nll", "IS-NLL", "nats", 4),
    ("is_nll_bpd", "IS-NLL", "bits/dim", 4),
    ("sigma2_final", "final σ²", "", 3),
    ("smoothness", "decoder smoothness", "E‖∂f/∂z_j‖", 3),
    ("smoothness_normalised", "decoder smoothness, scale-free", "E‖∂f/∂z_j‖·std(μ_j)", 3),
    ("mi_per_dim", "Σ_j I(x; z_j)", "nats", 3),
]


def aggregate_values(values: Sequence[float | None]) -> dict:
    """Mean and sample standard deviation (ddof = 1; None with one value) of the finite values given."""
    vals = [float(v) for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    mean = math.fsum(vals) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def _fid_of(metrics: dict, sampler: str) -> tuple[float | None, str | None]:
    res = (metrics.get("fid") or {}).get(sampler)
    if isinstance(res, dict) and res.get("fid") is not None:
        return float(res["fid"]), None
    if isinstance(res, dict) and res.get("skipped"):
        return None, str(res["skipped"])
    if isinstance(res, dict) and res.get("error"):
        return None, str(res["error"])
    skipped = ((metrics.get("protocol") or {}).get("fid") or {}).get("skipped")
    if skipped:
        return None, str(skipped)
    if sampler not in ((metrics.get("protocol") or {}).get("samplers") or {}):
        return None, f"sampler {sampler!r} not evaluated"
    return None, "no samples drawn (n_samples = 0)"


def final_sigma2(run_dir: Path, metrics: dict | None = None, step: int | None = None) -> float | None:
    """The policy's sigma2 at the end of training (or at global step ``step``, for a snapshot): the last
    validation record (whole validation set; the mean for the diagonal and per-sample policies), else the last
    training record, else the metrics file's."""
    from arelbo.runs import read_jsonl

    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        records = read_jsonl(path)
        if step is not None:
            records = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= step]
        for split in ("val", "train"):
            vals = [r["sigma2"] for r in records if r.get("split") == split and isinstance(r.get("sigma2"), (int, float))]
            if vals:
                return float(vals[-1])
    s2 = ((metrics or {}).get("likelihood") or {}).get("neg_elbo", {}).get("sigma2")
    return float(s2) if isinstance(s2, (int, float)) else None


def run_values(run_dir: Path, metrics: dict, sampler: str, gmm: bool, step: int | None = None,
               two_stage: bool = False, flow: bool = False) -> tuple[dict, dict]:
    """The table's values for one run (None where unavailable) and the reasons for unavailable FIDs; ``step``:
    the values of the snapshot at that global step (its sigma2 from the training log up to there)."""
    s = metrics.get("summary") or {}
    values: dict[str, Any] = {
        "active_units": s.get("active_units"),
        "kl_total": s.get("kl_total"),
        "mse": s.get("mse"),
        "neg_elbo": s.get("neg_elbo"),
        "neg_elbo_bpd": s.get("neg_elbo_bpd"),
        "is_nll": s.get("is_nll"),
        "is_nll_bpd": s.get("is_nll_bpd"),
        "sigma2_final": final_sigma2(run_dir, metrics, step),
        "smoothness": s.get("smoothness_mean"),
        "smoothness_normalised": s.get("smoothness_normalised_mean"),
        "mi_per_dim": s.get("mi_per_dim_total"),
        "neg_elbo_ar": s.get("neg_elbo_ar"),
        "neg_elbo_ar_bpd": s.get("neg_elbo_ar_bpd"),
        "mutual_information": s.get("mutual_information"),
        "latent_dim": s.get("latent_dim"),
    }
    reasons = {}
    if s.get("neg_elbo_is_density") is False:  # e.g. per-sample sigma2: a number, but no likelihood bound
        values["neg_elbo"] = values["neg_elbo_bpd"] = None
        reasons["neg_elbo"] = reasons["neg_elbo_bpd"] = ("per-sample σ² defines no density (each example at its own "
                                                         "MLE): see the common-rule -ELBO")
    for key in ("neg_elbo", "neg_elbo_ar", "is_nll"):
        if s.get(f"{key}_bpd_discrete") is not None:
            values[f"{key}_bpd_discrete"] = s[f"{key}_bpd_discrete"]
    values["fid"], why = _fid_of(metrics, sampler)
    if why:
        reasons["fid"] = why
    for key, name, wanted in (("fid_gmm", "gmm", gmm), ("fid_two_stage", "two-stage", two_stage),
                              ("fid_flow", "flow", flow)):
        if wanted:
            values[key], why = _fid_of(metrics, name)
            if why:
                reasons[key] = why
    rec = metrics.get("fid_reconstruction") or {}
    values["fid_reconstruction"] = rec.get("fid")
    if rec.get("fid") is None:
        skipped = ((metrics.get("protocol") or {}).get("fid") or {}).get("skipped")
        reasons["fid_reconstruction"] = rec.get("error") or skipped or "not measured"
    # the FID's sampling spread (std over independent draws), beside the training seeds' spread
    for key, name in (("fid", sampler), ("fid_gmm", "gmm"), ("fid_two_stage", "two-stage"), ("fid_flow", "flow")):
        draws = ((metrics.get("fid") or {}).get(name) or {}).get("sample_draws") or {}
        values[f"{key}_draws_std"] = draws.get("std")
    fits = (metrics.get("protocol") or {}).get("samplers") or {}
    values["two_stage_sigma2"] = ((fits.get("two-stage") or {}).get("fit_info") or {}).get("sigma2_mean")
    values["gmm_components"] = ((fits.get("gmm") or {}).get("config") or {}).get("n_components")
    return values, reasons


def _column_evaluated(key: str, opts: EvalOptions) -> bool:
    """Whether the study's evaluation produces the table column ``key`` (the optional FID columns)."""
    if key == "fid_gmm":
        return opts.gmm
    if key == "fid_two_stage":
        return opts.two_stage_all
    if key == "fid_flow":
        return opts.flow
    if key == "fid_reconstruction":
        return opts.fid and opts.fid_reconstruction and opts.n_samples > 0
    return True


def _sorted_kl(metrics: dict) -> list[float] | None:
    kl = (metrics.get("collapse") or {}).get("kl_per_dim")
    return sorted((float(v) for v in kl), reverse=True) if kl else None


def collect_results(plan: StudyPlan, wall_seconds: float | None = None, reference: str | None = None) -> dict:
    """Read every cell's run directory and aggregate over seeds (the dict written as results.json).

    Besides each policy's mean and std over seeds (every per-seed value kept), ``curve`` holds the same
    aggregates at each kept snapshot and at the end, and ``paired`` the paired differences (same seed) of the
    ``reference`` policy (default ``ar`` when studied, else the first) against every other policy."""
    policies_out = []
    keys = [c[0] for c in COLUMNS] + ["neg_elbo_ar_bpd", "mutual_information",
                                      "neg_elbo_bpd_discrete", "neg_elbo_ar_bpd_discrete", "is_nll_bpd_discrete",
                                      "fid_draws_std", "fid_gmm_draws_std", "fid_two_stage_draws_std",
                                      "two_stage_sigma2", "gmm_components"]
    for p in plan.policies:
        cells = []
        for seed in plan.seeds:
            run = plan.cell(p.spec, seed)
            entry: dict[str, Any] = {"seed": seed, "run": run.name, "run_dir": _rel(run.run_dir, plan.out)}
            marker = _read_marker(run.run_dir)
            metrics_file = run.run_dir / "metrics.json"
            if marker.get("status") == "failed":
                entry.update(status="failed", error=marker.get("error"))
            elif not metrics_file.is_file():
                entry.update(status="missing", error="not evaluated")
            else:
                metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
                values, reasons = run_values(run.run_dir, metrics, p.sampler, plan.eval.gmm,
                                             two_stage=plan.eval.two_stage_all, flow=plan.eval.flow)
                entry["snapshots"] = _snapshot_values(run, p.sampler, plan.eval.gmm, plan.eval.two_stage_all)
                entry["global_step"] = (metrics.get("checkpoint") or {}).get("global_step")
                entry.update(status="done", values=values, unavailable=reasons, kl_per_dim_sorted=_sorted_kl(metrics),
                             kl_per_dim=(metrics.get("collapse") or {}).get("kl_per_dim"),
                             mi_per_dim=(metrics.get("collapse") or {}).get("mutual_information_per_dim"),
                             train_seconds=marker.get("train_seconds"),
                             eval_seconds=(metrics.get("timings_s") or {}).get("total"),
                             checkpoint=metrics.get("checkpoint"),
                             fid_protocol=_fid_protocol(metrics, p.sampler))
            cells.append(entry)
        done = [c for c in cells if c["status"] == "done"]
        agg = {k: aggregate_values([c["values"].get(k) for c in done]) for k in keys}
        notes = {}
        for k in ("fid", "fid_gmm", "fid_two_stage", "fid_flow", "fid_reconstruction", "neg_elbo", "neg_elbo_bpd"):
            reasons = sorted({c["unavailable"][k] for c in done if k in c.get("unavailable", {})})
            if reasons and agg[k]["n"] == 0:
                notes[k] = "; ".join(reasons)
        kl_rows = [c["kl_per_dim_sorted"] for c in done if c.get("kl_per_dim_sorted")]
        kl_mean = [math.fsum(col) / len(col) for col in zip(*kl_rows)] if kl_rows else None
        latent = next((c["values"].get("latent_dim") for c in done if c["values"].get("latent_dim")), None)
        policies_out.append({**p.to_dict(), "cells": cells, "aggregate": agg, "unavailable": notes,
                             "curve": _curve(done, keys),
                             "kl_per_dim_sorted_mean": kl_mean, "latent_dim": latent,
                             "n_done": len(done), "n_failed": sum(c["status"] == "failed" for c in cells)})
    results = {
        "format": RESULTS_FORMAT,
        "kind": plan.kind,
        "created": _now(),
        "command": plan.command,
        "preset": plan.preset,
        "dataset": plan.base_config.data.name,
        "scale": {"name": plan.scale.name, "why": plan.scale.why, "overrides": list(plan.scale.overrides)},
        "training": _training_summary(plan.base_config),
        "eval": asdict(plan.eval),
        "seeds": plan.seeds,
        "runs_dir": _rel(plan.runs_dir, plan.out),
        "columns": [{"key": k, "label": label, "unit": unit, "digits": digits} for k, label, unit, digits in COLUMNS
                    if _column_evaluated(k, plan.eval)],
        "policies": policies_out,
        "sweep": _sweep_summary(policies_out),
        "paired": paired_summary(policies_out, reference),
        "wall_seconds": wall_seconds,
        "dedup": plan.dropped,
    }
    return results


def _snapshot_values(run: PlannedRun, sampler: str, gmm: bool, two_stage: bool = False) -> list[dict]:
    """The evaluated snapshots of one run: [{"step", "values", "unavailable"}] by step."""
    from arelbo.evaluate import metrics_file
    from arelbo.runs import snapshot_name

    out = []
    for step in run.config.train.snapshot_steps:
        f = metrics_file(run.run_dir, snapshot_name(step))
        if not f.is_file():
            continue
        metrics = json.loads(f.read_text(encoding="utf-8"))
        values, reasons = run_values(run.run_dir, metrics, sampler, gmm, step=int(step), two_stage=two_stage)
        out.append({"step": int(step), "values": values, "unavailable": reasons})
    return out


def _curve(done: list[dict], keys: Sequence[str]) -> list[dict]:
    """Aggregates over seeds at each snapshot step and at the end (``final``: true; its step when all seeds
    agree): the metrics against training steps. Seeds that lack a snapshot are left out of that point."""
    steps = sorted({snap["step"] for c in done for snap in c.get("snapshots") or []})
    points = []
    for step in steps:
        rows = [snap["values"] for c in done for snap in c["snapshots"] if snap["step"] == step]
        points.append({"step": step, "final": False, "n": len(rows),
                       "aggregate": {k: aggregate_values([r.get(k) for r in rows]) for k in keys}})
    if done and steps:
        finals = {c.get("global_step") for c in done}
        points.append({"step": finals.pop() if len(finals) == 1 else None, "final": True, "n": len(done),
                       "aggregate": {k: aggregate_values([c["values"].get(k) for c in done]) for k in keys}})
    return points


# (key, lower is better: True / False / None for no direction): what the paired comparison covers
PAIRED_KEYS = [("fid", True), ("fid_gmm", True), ("fid_two_stage", True), ("active_units", False), ("neg_elbo_ar", True), ("is_nll", True),
               ("mse", True), ("kl_total", None)]


def paired_summary(policies: list[dict], reference: str | None = None, confidence: float = 0.95) -> dict | None:
    """Paired differences (reference - other, seed by seed) with their t-intervals and verdicts about the
    reference, for every other policy and each of :data:`PAIRED_KEYS` that both have values for."""
    from arelbo.stats import paired_differences

    if len(policies) < 2:
        return None
    specs = [p["spec"] for p in policies]
    if reference is None:
        from arelbo.objectives import DEFAULT_POLICY

        reference = DEFAULT_POLICY if DEFAULT_POLICY in specs else specs[0]
    if reference not in specs:
        raise StudyError(f"reference policy {reference!r} is not in the study ({', '.join(specs)})")
    ref = policies[specs.index(reference)]

    def by_seed(p: dict, key: str) -> dict:
        return {c["seed"]: c["values"].get(key) for c in p["cells"] if c["status"] == "done"}

    rows = []
    for p in policies:
        if p["spec"] == reference:
            continue
        for key, lower in PAIRED_KEYS:
            res = paired_differences(by_seed(ref, key), by_seed(p, key), confidence, lower)
            if res["n"]:
                rows.append({"policy": p["spec"], "label": p["label"], "key": key, "lower_is_better": lower, **res})
    return {"reference": reference, "reference_label": ref["label"], "confidence": confidence,
            "difference": "reference - policy, per training seed", "rows": rows}


def _rel(path: Path, base: Path) -> str:
    try:
        return str(Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())))
    except ValueError:
        return str(path)


def _fid_protocol(metrics: dict, sampler: str) -> dict | None:
    res = (metrics.get("fid") or {}).get(sampler) or {}
    proto = res.get("protocol") if isinstance(res, dict) else None
    if not proto:
        return None
    keep = ("feature_net", "weights_sha256", "n_generated", "n_reference", "reference", "metric", "seed")
    return {k: proto.get(k) for k in keep if k in proto}


def _training_summary(cfg: RunConfig) -> dict:
    t = cfg.train
    return {"preset_model": f"{cfg.model.arch} {cfg.model.hidden} latent {cfg.model.latent_dim}",
            "epochs": t.epochs, "steps_per_epoch": t.limit_train_batches, "max_steps": t.max_steps,
            "batch_size": cfg.data.batch_size, "lr": t.lr, "optimizer": t.optimizer, "schedule": t.schedule}


def _sweep_summary(policies: list[dict]) -> dict | None:
    """Fixed-sigma2 policies (two or more) against sigma2, and the other policies' final sigma2 for the marker."""
    from arelbo.objectives import DEFAULT_POLICY

    fixed = sorted((p for p in policies if policy_sigma2_kind(p) == "given" and p.get("sigma2") is not None),
                   key=lambda p: p["sigma2"])
    if len(fixed) < 2:
        return None
    keys = ("active_units", "smoothness", "smoothness_normalised", "mi_per_dim", "kl_total", "fid", "fid_gmm",
            "fid_two_stage")
    # the marker: AR-ELBO's final sigma2 (the isotropic default policy; other policies whose sigma2 is estimated
    # from the data only when it is absent)
    ar_type = [p for p in policies if policy_sigma2_kind(p) == "estimated" and p["n_done"]]
    marked = [p for p in ar_type if p["policy"] == DEFAULT_POLICY] or ar_type
    refs = [{"spec": p["spec"], "label": p["label"], "sigma2": p["aggregate"]["sigma2_final"],
             **{k: p["aggregate"].get(k) for k in keys}} for p in marked]
    return {"sigma2": [p["sigma2"] for p in fixed],
            "curves": {k: [p["aggregate"].get(k) for p in fixed] for k in keys},
            "specs": [p["spec"] for p in fixed],
            "references": refs}


def policy_sigma2_kind(p: dict) -> str:
    """A results.json policy entry's ``sigma2_kind`` (entries written before it was recorded: from the registry)."""
    from arelbo.objectives import POLICIES

    if p.get("sigma2_kind"):
        return p["sigma2_kind"]
    cls = POLICIES.get(p.get("policy"))
    return cls.sigma2_kind if cls is not None else "estimated"


def load_plan_dir(out: str | os.PathLike) -> dict:
    path = Path(out) / "study.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out} is not a study folder (no study.json)")
    return json.loads(path.read_text(encoding="utf-8"))
