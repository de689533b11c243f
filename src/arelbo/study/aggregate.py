"""Aggregation: every run's metrics.json into results.json (means, spreads, snapshots, paired differences, the sweep).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from arelbo.config import RunConfig
from arelbo.study.specs import RESULTS_FORMAT, StudyError
from arelbo.study.plan import EvalOptions, PlannedRun, StudyPlan
from arelbo.study.runner import _now, _read_marker


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
    aggregates at each kept snapshot and at the end, ``paired`` the paired differences (same seed) of the
    ``reference`` policy (default ``ar`` when studied, else the first) against every other policy, and
    ``paired_snapshots`` the same differences at each snapshot step: whether a lead early in training lasts."""
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
                entry["snapshots"] = _snapshot_values(run, p.sampler, plan.eval.gmm, plan.eval.two_stage_all,
                                                      plan.eval.flow)
                entry["global_step"] = (metrics.get("checkpoint") or {}).get("global_step")
                entry.update(status="done", values=values, unavailable=reasons, kl_per_dim_sorted=_sorted_kl(metrics),
                             kl_per_dim=(metrics.get("collapse") or {}).get("kl_per_dim"),
                             mi_per_dim=(metrics.get("collapse") or {}).get("mutual_information_per_dim"),
                             groups=_groups_of(metrics),
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
                             "curve": _curve(done, keys), "groups": _group_aggregates(done),
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
        "paired_snapshots": [{"step": step, **paired}
                             for step in _snapshot_steps(c for p in policies_out for c in p["cells"]
                                                         if c["status"] == "done")
                             if (paired := paired_summary(policies_out, reference, step=step))],
        "wall_seconds": wall_seconds,
        "dedup": plan.dropped,
    }
    return results


def _groups_of(metrics: dict) -> list[dict] | None:
    """A run's latent groups from its metrics.json: name, units, active units, KL (nats), collapsed."""
    groups = (metrics.get("collapse") or {}).get("groups")
    if not groups:
        return None
    return [{k: g.get(k) for k in ("name", "units", "active_units", "kl", "collapsed")} for g in groups]


def _group_aggregates(done: list[dict]) -> list[dict] | None:
    """Per latent group, over the seeds: units, active units and KL (mean, std), and in how many seeds it
    collapsed; None unless every done seed has the same groups."""
    layouts = {tuple((g["name"], g["units"]) for g in c["groups"]) for c in done if c.get("groups")}
    if len(layouts) != 1 or any(not c.get("groups") for c in done):
        return None
    out = []
    for i, (name, units) in enumerate(layouts.pop()):
        rows = [c["groups"][i] for c in done]
        out.append({"name": name, "units": units,
                    "active_units": aggregate_values([r["active_units"] for r in rows]),
                    "kl": aggregate_values([r["kl"] for r in rows]),
                    "collapsed_seeds": sum(bool(r["collapsed"]) for r in rows), "n": len(rows)})
    return out


def _snapshot_values(run: PlannedRun, sampler: str, gmm: bool, two_stage: bool = False,
                     flow: bool = False) -> list[dict]:
    """The evaluated snapshots of one run: [{"step", "values", "unavailable"}] by step."""
    from arelbo.evaluate import metrics_file
    from arelbo.runs import snapshot_name

    out = []
    for step in run.config.train.snapshot_steps:
        f = metrics_file(run.run_dir, snapshot_name(step))
        if not f.is_file():
            continue
        metrics = json.loads(f.read_text(encoding="utf-8"))
        values, reasons = run_values(run.run_dir, metrics, sampler, gmm, step=int(step), two_stage=two_stage,
                                     flow=flow)
        out.append({"step": int(step), "values": values, "unavailable": reasons})
    return out


def _snapshot_steps(cells: Iterable[dict]) -> list[int]:
    """The snapshot steps evaluated in any of these (done) cells, in order."""
    return sorted({snap["step"] for c in cells for snap in c.get("snapshots") or []})


def _values_at(cell: dict, step: int | None = None) -> dict | None:
    """A done cell's values at the scored checkpoint (``step`` None) or at that kept snapshot (None when that
    snapshot was not evaluated)."""
    if step is None:
        return cell["values"]
    return next((snap["values"] for snap in cell.get("snapshots") or [] if snap["step"] == step), None)


def _curve(done: list[dict], keys: Sequence[str]) -> list[dict]:
    """Aggregates over seeds at each snapshot step and at the end (``final``: true; its step when all seeds
    agree): the metrics against training steps. Seeds that lack a snapshot are left out of that point."""
    steps = _snapshot_steps(done)
    points = []
    for step in steps:
        rows = [v for c in done if (v := _values_at(c, step)) is not None]
        points.append({"step": step, "final": False, "n": len(rows),
                       "aggregate": {k: aggregate_values([r.get(k) for r in rows]) for k in keys}})
    if done and steps:
        finals = {c.get("global_step") for c in done}
        points.append({"step": finals.pop() if len(finals) == 1 else None, "final": True, "n": len(done),
                       "aggregate": {k: aggregate_values([c["values"].get(k) for c in done]) for k in keys}})
    return points


# (key, lower is better: True / False / None for no direction): what the paired comparison covers. The collapse
# diagnostics (per-dimension information, scale-free smoothness) have no better side: they say higher or lower.
PAIRED_KEYS = [("fid", True), ("fid_gmm", True), ("fid_two_stage", True), ("fid_flow", True), ("fid_reconstruction", True),
               ("active_units", False),
               ("neg_elbo_ar", True), ("is_nll", True), ("mse", True), ("kl_total", None), ("mi_per_dim", None),
               ("smoothness_normalised", None)]


def paired_summary(policies: list[dict], reference: str | None = None, confidence: float = 0.95,
                   step: int | None = None) -> dict | None:
    """Paired differences (reference - other, seed by seed) with their t-intervals and verdicts about the
    reference, for every other policy and each of :data:`PAIRED_KEYS` that both have values for: at the scored
    checkpoint, or with ``step`` at that kept snapshot (a seed without it evaluated is left out)."""
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
        return {c["seed"]: v.get(key) for c in p["cells"]
                if c["status"] == "done" and (v := _values_at(c, step)) is not None}

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

    fixed = sorted((p for p in policies if _sigma2_kind(p) == "given" and p.get("sigma2") is not None),
                   key=lambda p: p["sigma2"])
    if len(fixed) < 2:
        return None
    keys = ("active_units", "smoothness", "smoothness_normalised", "mi_per_dim", "kl_total", "fid", "fid_gmm",
            "fid_two_stage", "fid_flow")
    # the marker: AR-ELBO's final sigma2 (the isotropic default policy; other policies whose sigma2 is estimated
    # from the data only when it is absent)
    ar_type = [p for p in policies if _sigma2_kind(p) == "estimated" and p["n_done"]]
    marked = [p for p in ar_type if p["policy"] == DEFAULT_POLICY] or ar_type
    refs = [{"spec": p["spec"], "label": p["label"], "sigma2": p["aggregate"]["sigma2_final"],
             **{k: p["aggregate"].get(k) for k in keys}} for p in marked]
    return {"sigma2": [p["sigma2"] for p in fixed],
            "curves": {k: [p["aggregate"].get(k) for p in fixed] for k in keys},
            "specs": [p["spec"] for p in fixed],
            "references": refs}


def _sigma2_kind(p: dict) -> str:
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
