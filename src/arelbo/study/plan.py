"""The plan: scales, evaluation options, and the resolved training runs of a study (writes nothing).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from arelbo.config import RunConfig, load_config
from arelbo.study.specs import DEFAULT_POLICIES, PolicySpec, RESULTS_FORMAT, StudyError, parse_policies, parse_seeds


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
        "sampler 3000 steps. On 2 idle CPU cores an mnist-conv run trains in about 5 minutes and each checkpoint's "
        "evaluation takes 1.3-1.8 minutes (measured with --two-stage-steps 20000 --two-stage-patience 5 --fid-repeats "
        "3); a GPU (--set train.accelerator=auto) trains faster, the evaluation's GMM and second stage stay on the CPU.",
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
