"""``arelbo eval RUN_DIR``: collapse diagnostics, likelihoods and sample quality of a trained run, with protocol.

Writes ``metrics.json`` into the run directory (atomically) and prints a table. For programmatic use::

    from arelbo.evaluate import evaluate_run
    result = evaluate_run("runs/mnist-ar", samplers=("prior", "gmm"), n_samples=10000)
    result["summary"]["active_units"], result["fid"]["gmm"]["fid"]

What is computed (one encoder pass over the evaluation split, under ``torch.inference_mode``):

- collapse: active units (Var_x(mu_j) > threshold), the variance of each mu_j, KL per latent dimension and in
  total, I(x; z) under the aggregate posterior of the first ``mi_examples`` examples (<= log N) and I(x; z_j) per
  dimension (Gaussian form, not capped), decoder smoothness E||df/dz_j|| at the posterior means of the first
  ``smoothness_examples`` (forward-mode jvp, the only part outside inference mode) and its scale-free form
  E||df/dz_j|| std(mu_j);
- likelihood: the ``ar`` rule's sigma2 on the evaluation set (isotropic, and the diagonal one summarised), the
  -ELBO in nats and bits/dim under the run's own policy (ar-type policies: their rule's sigma2 fitted on the
  validation split) and under one common rule for all (``neg_elbo_ar``: the isotropic MLE fitted on the validation
  split, comparable across runs), the importance-sampled NLL with K samples on the
  first ``is_examples`` examples at the run policy's sigma2, the posterior-mean reconstruction MSE, and for a
  linear model the exact NLL;
- samples: each ex-post sampler (:mod:`arelbo.samplers`) is fitted on the training split (or reloaded from
  ``RUN_DIR/samplers/NAME.pt`` when fitted before for the same checkpoint and options), draws ``n_samples``
  images, and FID (``arelbo.metrics.fid.compute_fid``) scores them against the evaluation split.

Randomness: every random stream has its own generator seeded from ``seed`` and a fixed tag (see ``_generator``),
so each number is reproducible on its own and independent of which other metrics were asked for.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
METRICS_FORMAT = 1
SAMPLER_DIR = "samplers"


def _generator(seed: int, tag: str):
    import torch

    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(tag.encode())) % (2**63))


def _clean(value):
    """JSON-safe: NaN/inf -> None, tensors -> lists/floats, tuples -> lists."""
    import torch

    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _default_feature_net(shape) -> str:
    return "mnist-features" if tuple(shape) == (1, 28, 28) else "inception"


def _parse_samplers(samplers) -> list[str]:
    if samplers is None:
        return []
    if isinstance(samplers, str):
        samplers = samplers.split(",")
    names = [s.strip() for s in samplers if s and s.strip()]
    from arelbo.samplers import SAMPLERS

    unknown = [s for s in names if s not in SAMPLERS]
    if unknown:
        raise ValueError(f"unknown sampler(s) {unknown}; known: {', '.join(sorted(SAMPLERS))}")
    return list(dict.fromkeys(names))


FINAL_CHECKPOINTS = ("best", "last")  # evaluated into metrics.json; any other checkpoint into metrics-<stem>.json


def _checkpoint_stem(which: str) -> str | None:
    """None for best/last, else the checkpoint's file stem (``step-2000`` for checkpoints/step-2000.pt)."""
    return None if which in FINAL_CHECKPOINTS else Path(str(which)).stem


def metrics_file(run_dir, which: str = "best") -> Path:
    """Where ``arelbo eval --checkpoint WHICH`` writes: ``metrics.json`` for best/last (one final evaluation per run),
    ``metrics-<stem>.json`` for another checkpoint (e.g. the snapshot ``step-2000``), so they sit side by side."""
    stem = _checkpoint_stem(which)
    return Path(run_dir) / (METRICS_FILE if stem is None else f"metrics-{stem}.json")


def sampler_file(run_dir, name: str, which: str = "best") -> Path:
    """Where ``arelbo eval`` saves a run's fitted ``name`` sampler (with the checkpoint key it was fitted for):
    ``samplers/NAME.pt`` for best/last, ``samplers/<stem>/NAME.pt`` for another checkpoint (a snapshot's fit must
    not replace the final one's)."""
    stem = _checkpoint_stem(which)
    base = Path(run_dir) / SAMPLER_DIR
    return (base if stem is None else base / stem) / f"{name}.pt"


def resolve_device(device: str) -> str:
    """``auto``: CUDA when available, else CPU; anything else as given, once checked to exist here (a device that
    does not is a setting to change, said before any work is done)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, mps, auto): {err}") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()}
    if not available.get(dev.type, lambda: True)():
        raise ValueError(f"--device {device}: no {dev.type} device is available here; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return str(device)


def _fit_or_load_sampler(name, options, model, train_loader, key, run_dir, write, refit, fit_examples, progress,
                         which="best", val_loader=None):
    from arelbo.samplers import load_sampler, make_sampler, save_sampler

    path = sampler_file(run_dir, name, which)
    if path.is_file() and not refit:
        try:
            sampler, extra = load_sampler(path)
            if extra.get("key") == key:
                return sampler, {"source": "reused", "path": str(path), "fit_seconds": extra.get("fit_seconds")}
        except (ValueError, RuntimeError, KeyError, TypeError) as err:  # damaged: say so, then refit
            print(f"arelbo eval: {err}; fitting the {name!r} sampler again", file=sys.stderr)
    sampler = make_sampler(name, **options)
    t0 = time.perf_counter()
    sampler.fit(model, train_loader, max_examples=fit_examples, progress=progress and f"{name}: fitting",
                val_loader=val_loader)
    seconds = time.perf_counter() - t0
    info = {"source": "fitted", "fit_seconds": round(seconds, 3)}
    if write:
        save_sampler(sampler, path, extra={"key": key, "fit_seconds": round(seconds, 3)})
        info["path"] = str(path)
    return sampler, info


def evaluate_run(run_dir, config=None, *, write: bool = True, progress: bool = True, **options) -> dict[str, Any]:
    """Evaluate a run directory; returns the metrics.json dict (also written there unless ``write=False``).

    ``config``: an :class:`arelbo.evalconfig.EvalConfig` (default: its defaults); ``options``: any of its fields
    by name, replacing the config's (``evaluate_run(run, which="last", n_samples=0)``). The fields, and what each
    stage computes, are described there and in :func:`_evaluate`.
    """
    from arelbo.evalconfig import from_options

    return _evaluate(run_dir, from_options(config, options), write=write, progress=progress)


@dataclass
class Loaded:
    """Stage 0: the run and the data it is evaluated on."""

    run_dir: Path
    ckpt_file: Path
    ckpt: dict
    cfg: dict  # the run's config (as saved in the checkpoint)
    model: Any
    loss_fn: Any
    device: str
    splits: Any
    eval_data: Any  # the evaluation split (uint8 images or floats), capped at max_examples
    train_data: Any  # what the samplers are fitted on
    score_data: Any  # what the likelihoods score (eval_data, dequantised when asked)
    val_data: Any  # the validation split (capped at max_examples): samplers choose on it
    val_score: Any  # ... in the form the likelihoods score: where data-estimated sigma2 is fitted
    loader: Any  # batches of score_data
    is_image: bool
    sampler_names: list[str]
    sampler_options: dict


@dataclass
class Encoded:
    """Stage 1: one pass over the evaluation split (and the validation split) through the encoder."""

    acc: Any  # ELBOAccumulator over the evaluation split
    val_acc: Any  # ... over the validation split (the same object when evaluating on val)
    mu: Any  # (N, q) posterior means, float32 CPU
    logvar: Any
    mse_sum: float  # sum over examples of ||x - f(mu)||^2
    mode: str  # how E_q (x - f(z))^2 was computed
    num_elements: int
    latent_dim: int
    num_examples: int


@dataclass
class Collapse:
    """Stage 2: posterior-collapse diagnostics."""

    au: Any  # ActiveUnits
    mi: float | None
    n_mi: int
    mi_dims: Any
    smooth: Any
    smooth_norm: Any
    n_smooth: int


@dataclass
class Likelihood:
    """Stage 3: -ELBO under the run's policy and the common rule, IS-NLL, the exact NLL of a linear model."""

    elbo_policy: Any  # ELBOResult
    elbo_ar: Any
    sigma2_diag: Any
    density_sigma2: Any  # the sigma2 the IS-NLL (and exact NLL) use
    is_density: bool
    density_note: str | None
    is_note: str | None
    is_res: Any  # ISResult or None
    n_is: int
    exact: dict | None


@dataclass
class Samples:
    """Stages 4 and 5: each sampler fitted on the training split (choices judged on the validation split), its
    samples drawn and scored with FID (on ``fid_repeats`` independent draws), and the reconstructions' FID."""

    samplers: dict[str, Any]
    fid: dict[str, Any]
    feature_net: str
    reference: str
    kid: bool
    unavailable: str | None
    reconstruction: dict | None  # FID of the evaluation images' reconstructions f(mu(x)): the floor for samplers


def _evaluate(run_dir, c, *, write: bool, progress: bool) -> dict[str, Any]:
    """The body of :func:`evaluate_run`: load, then the stages in order, then the metrics.json dict.

    ``c`` is an :class:`arelbo.evalconfig.EvalConfig`. ``max_examples`` caps the evaluation split *and* the
    training examples the samplers are fitted on (quick runs); ``fit_examples`` caps the latter alone.
    ``is_examples``, ``smoothness_examples``, ``mi_examples``: how many of the evaluation examples the IS-NLL,
    smoothness and MI use (None: all); K IS samples each. ``fid``: score samples with FID when the data are images
    (uint8) and ``arelbo.metrics.fid`` is importable; ``feature_net`` default: mnist-features for 1x28x28 data,
    else inception; ``kid`` default: on when ``n_samples`` < 2048. ``sq_err``: how E_q||x - f(z)||^2 is computed
    for the -ELBO and the ar sigma2 (auto: exact for a linear model, else one reparameterised sample per example).

    Likelihoods on one footing: every sigma2 estimated from data (the ar-type policies' own rule, and the common
    rule applied to every policy: the isotropic MLE) is fitted on the *validation* split and scored on the
    evaluation split, never fitted on the data it scores (evaluating ``split="val"`` fits and scores the same
    set, as the protocol says). ``dequantize`` (uint8 images): score x~ = (v + u - 1/2) / 255 with u ~ U[0, 1)^D
    instead of v / 255; then -log P(v) <= E_u[-log p(x~)] + D log 255, reported as bits/dim (discrete).

    Samplers are fitted on the training split; those that choose something (the GMM's component count from a
    grid, the two-stage sampler's stopping step) judge it on the validation split. ``fid_repeats`` > 1: every
    sampler's FID is measured again on that many independent sample draws (mean and std recorded beside the
    first draw's value: the sampling spread). ``fid_reconstruction``: also the FID of the evaluation images'
    reconstructions f(mu(x)), the floor no sampler of this decoder is expected to beat.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    run = _load(Path(run_dir), c)
    timings["load"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    enc = _encode(run, c, progress)
    timings["encode_pass"] = time.perf_counter() - t0
    col = _collapse(run, enc, c, timings)
    t0 = time.perf_counter()
    lik = _likelihood(run, enc, c, progress)
    timings["is_nll"] = time.perf_counter() - t0
    smp = _samples(run, enc, c, write, progress, timings)
    timings["total"] = time.perf_counter() - t_start
    result = _clean(_metrics(run, enc, col, lik, smp, c, timings))
    if write:
        from arelbo.runs import atomic_write_text

        atomic_write_text(metrics_file(run.run_dir, c.which), json.dumps(result, indent=2, sort_keys=False) + "\n")
    return result


def _load(run_dir: Path, c) -> Loaded:
    import torch

    from arelbo.data import load_dataset, make_loader
    from arelbo.runs import checkpoint_path, load_model

    sampler_names = _parse_samplers(c.samplers)
    if c.feature_net is not None:
        from arelbo.metrics.features import FEATURE_NETS

        if c.feature_net not in FEATURE_NETS:
            raise ValueError(f"--feature-net: unknown feature network {c.feature_net!r}; choose from "
                             f"{', '.join(sorted(FEATURE_NETS))}")
    sampler_options = dict(c.sampler_options or {})
    bad = sorted(set(sampler_options) - set(sampler_names))
    if bad:
        raise ValueError(f"options given for sampler(s) {bad} that are not being evaluated ({sampler_names})")

    device = resolve_device(c.device)
    ckpt_file = checkpoint_path(run_dir, c.which)
    model, loss_fn, ckpt = load_model(run_dir, c.which, map_location=device)
    model.to(device)
    cfg = ckpt["config"]
    data_cfg = cfg.get("data")
    if not isinstance(data_cfg, dict) or "name" not in data_cfg:
        raise ValueError(f"the checkpoint's config has no data section naming the dataset: {ckpt_file}")
    splits = load_dataset(data_cfg["name"], c.data_root or data_cfg.get("root"), **(data_cfg.get("options") or {}))
    eval_data = splits.split(c.split)
    train_data = splits.train
    if c.max_examples is not None:
        eval_data, train_data = eval_data[: c.max_examples], train_data[: c.max_examples]
    if c.fit_examples is not None:
        train_data = train_data[: c.fit_examples]
    is_image = eval_data.dtype == torch.uint8
    if c.dequantize and not is_image:
        raise ValueError(f"dequantize needs uint8 images; the {splits.name} data are {eval_data.dtype}")
    val_data = splits.val if c.max_examples is None else splits.val[: c.max_examples]
    score_data, val_score = eval_data, val_data
    if c.dequantize:  # float copies with uniform noise inside each pixel's 1/255 bin (FID keeps the uint8 data)
        score_data = _dequantized(eval_data, _generator(c.seed, "dequantize"))
        val_score = _dequantized(val_data, _generator(c.seed, "dequantize-val"))
    loader = make_loader(score_data, c.batch_size, shuffle=False)
    return Loaded(run_dir, ckpt_file, ckpt, cfg, model, loss_fn, device, splits, eval_data, train_data, score_data,
                  val_data, val_score, loader, is_image, sampler_names, sampler_options)


def _encode(run: Loaded, c, progress) -> Encoded:
    """Posteriors, squared errors, posterior-mean reconstruction error; the validation split's sums."""
    import torch

    from arelbo.data import make_loader
    from arelbo.metrics.collapse import batch_sq_err, iterate_batches
    from arelbo.metrics.likelihood import ELBOAccumulator, monte_carlo_rate

    model, device = run.model, run.device
    mode = c.sq_err
    if mode == "auto":
        mode = "exact" if hasattr(model, "expected_sq_err") else "sample"
    acc = ELBOAccumulator(per_sample_floor=run.loss_fn.policy.floor)
    acc.sq_err_mode = mode
    gen_elbo, gen_rate = _generator(c.seed, "elbo"), _generator(c.seed, "rate")
    mus, logvars = [], []
    mse_sum = 0.0
    with torch.inference_mode():
        for x in iterate_batches(run.loader, device, progress=progress and "eval: encoding"):
            mu, logvar = model.encode(x)
            acc.update(batch_sq_err(model, x, mode, gen_elbo, (mu, logvar)), mu, logvar,
                       monte_carlo_rate(model, mu, logvar, gen_rate))  # None: closed-form KL (standard prior)
            mse_sum += float((x.flatten(1).double() - model.decode(mu).flatten(1).double()).pow(2).sum())
            mus.append(mu.float().cpu())
            logvars.append(logvar.float().cpu())
    mu_all, logvar_all = torch.cat(mus), torch.cat(logvars)
    # the validation split: where every data-estimated sigma2 is fitted
    if c.split == "val":
        val_acc = acc
    else:
        val_acc = ELBOAccumulator(per_sample_floor=run.loss_fn.policy.floor)
        gen_val, gen_val_rate = _generator(c.seed, "elbo-val"), _generator(c.seed, "rate-val")
        with torch.inference_mode():
            for x in iterate_batches(make_loader(run.val_score, c.batch_size, shuffle=False), device,
                                     progress=progress and "eval: validation pass"):
                mu, logvar = model.encode(x)
                val_acc.update(batch_sq_err(model, x, mode, gen_val, (mu, logvar)), mu, logvar,
                               monte_carlo_rate(model, mu, logvar, gen_val_rate))
    return Encoded(acc, val_acc, mu_all, logvar_all, mse_sum, mode, acc.num_elements, int(mu_all.shape[1]),
                   int(run.eval_data.shape[0]))


def _collapse(run: Loaded, enc: Encoded, c, timings: dict) -> Collapse:
    from arelbo.metrics.collapse import (
        active_units,
        decoder_smoothness,
        mutual_information,
        mutual_information_per_dim,
        normalised_smoothness,
    )

    t0 = time.perf_counter()
    n_eval, mu_all, logvar_all = enc.num_examples, enc.mu, enc.logvar
    au = active_units(mu_all, c.threshold)
    n_mi = n_eval if c.mi_examples is None else min(n_eval, int(c.mi_examples))
    mi = mutual_information(mu_all[:n_mi], logvar_all[:n_mi], generator=_generator(c.seed, "mi")) if n_mi else None
    timings["mutual_information"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_smooth = n_eval if c.smoothness_examples is None else min(n_eval, int(c.smoothness_examples))
    smooth = (decoder_smoothness(run.model.decoder, mu_all[:n_smooth].to(run.device), batch_size=c.batch_size)
              if n_smooth else None)
    smooth_norm = normalised_smoothness(smooth, mu_all[:n_smooth]) if n_smooth else None
    mi_dims = mutual_information_per_dim(mu_all, logvar_all)
    timings["smoothness"] = time.perf_counter() - t0
    return Collapse(au, mi, n_mi, mi_dims, smooth, smooth_norm, n_smooth)


def _likelihood(run: Loaded, enc: Encoded, c, progress) -> Likelihood:
    import torch

    from arelbo.data import make_loader
    from arelbo.metrics.collapse import iterate_batches
    from arelbo.metrics.likelihood import importance_sampled_nll_dataset, linear_vae_exact_nll

    model, loss_fn, device = run.model, run.loss_fn, run.device
    acc, val_acc, d, n_eval = enc.acc, enc.val_acc, enc.num_elements, enc.num_examples
    policy = loss_fn.policy
    policy_name = policy.name
    floor = policy.floor
    fitted_on = "the evaluation split itself" if c.split == "val" else "the validation split"
    held = policy.held_out_sigma2(val_acc)  # a data-estimated rule is fitted on the validation split
    common = val_acc.ar_sigma2().clamp_min(floor)
    if held.kind == "per-sample":  # each example of the scored split at its own MLE
        elbo_policy = acc.result(loss_fn)
    else:
        source = (held.source if policy.sigma2_kind != "estimated"
                  else f"{held.source.replace('eval-set ', '')}, fitted on {fitted_on}")
        elbo_policy = acc.result(held.value, source=source)
    elbo_ar = acc.result(common, source=f"common rule for every policy: isotropic MLE fitted on {fitted_on}")
    sigma2_diag = acc.ar_sigma2(diagonal=True)
    value = policy.density_sigma2(val_acc).value
    is_density, is_note, density_note = policy.is_density, None, None
    if not is_density:
        density_note = (f"policy {policy_name}'s sigma2 defines no single density: this -ELBO is not a likelihood "
                        f"bound; compare the common-rule -ELBO (neg_elbo_ar)")
        is_note = f"policy {policy_name}'s sigma2 defines no single density: IS-NLL uses the validation isotropic MLE"
    n_is = n_eval if c.is_examples is None else min(n_eval, int(c.is_examples))
    is_res = None
    if n_is > 0:
        is_loader = make_loader(run.score_data[:n_is], max(1, min(c.batch_size, 100)), shuffle=False)
        is_res = importance_sampled_nll_dataset(model, is_loader, value.to(device), c.k, _generator(c.seed, "is-nll"),
                                                progress=progress and f"eval: IS-NLL (K={c.k})")
    exact = None
    # -log N(x; b, W W^T + sigma2) is the marginal of a linear decoder under the N(0, I) prior only: a learnable
    # prior (no closed-form KL) has another marginal, so no "exact" value is reported for it
    standard_prior = getattr(getattr(model, "prior", None), "closed_form_kl", True)
    if standard_prior and hasattr(model, "expected_sq_err") and hasattr(getattr(model, "decoder", None), "linear"):
        with torch.inference_mode():
            vals = torch.cat([linear_vae_exact_nll(model, x, value.to(x.device)).cpu()
                              for x in iterate_batches(run.loader, device)])
        exact = {"nll": float(vals.mean()), "bits_per_dim": float(vals.mean()) / (d * math.log(2)),
                 "nll_is_subset": float(vals[:n_is].mean()) if n_is else None,
                 "note": "closed-form -log N(x; b, W W^T + sigma2) at the sigma2 the IS-NLL uses"}
    return Likelihood(elbo_policy, elbo_ar, sigma2_diag, value, is_density, density_note, is_note, is_res, n_is, exact)


def _learnable_prior(name: str | None) -> bool:
    """Whether a run's prior (by its recorded name) is other than N(0, I): the prior class says (closed_form_kl)."""
    from arelbo.models.priors import PRIORS

    return name is not None and name in PRIORS and not PRIORS[name].closed_form_kl


def _samples(run: Loaded, enc: Encoded, c, write: bool, progress, timings: dict) -> Samples:
    from arelbo.data import make_loader
    from arelbo.metrics.features import sha256_file
    from arelbo.samplers import decode_samples

    model, device, seed, n_samples = run.model, run.device, c.seed, c.n_samples
    fid_fn, fid_unavailable = None, None
    if not c.fid:
        fid_unavailable = "disabled (--no-fid)"
    elif not run.is_image:
        fid_unavailable = f"data are not images (dtype {run.eval_data.dtype}, shape {tuple(run.eval_data.shape[1:])})"
    else:
        try:
            from arelbo.metrics.fid import compute_fid as fid_fn
        except ImportError as err:
            fid_unavailable = f"arelbo.metrics.fid is not available ({err})"
    net = c.feature_net or _default_feature_net(run.splits.shape)
    if fid_fn is not None and run.sampler_names and n_samples > 0:
        try:  # fail once, before any sample is drawn, when the feature network cannot be loaded
            from arelbo.metrics.features import FeatureNetUnavailable, get_feature_net

            get_feature_net(net)[0].to(device)  # features on the evaluation's device (a GPU when there is one)
        except ImportError:
            pass  # no separate loader to check: compute_fid reports its own errors
        except (FeatureNetUnavailable, FileNotFoundError) as err:  # e.g. offline without Inception weights
            fid_fn, fid_unavailable = None, f"feature network {net!r} unavailable: {type(err).__name__}: {err}"
    use_kid = (n_samples < 2048) if c.kid is None else bool(c.kid)
    reference_name = f"{run.splits.name}:{c.split}" + (f"[:{enc.num_examples}]" if c.max_examples is not None else "")
    train_loader = make_loader(run.train_data, c.batch_size, shuffle=False) if run.sampler_names else None
    sampler_val_loader = make_loader(run.val_data, c.batch_size, shuffle=False) if run.sampler_names else None
    ckpt_hash = sha256_file(run.ckpt_file) if run.sampler_names else None  # a saved fit is reused only for this file
    sampler_results: dict[str, Any] = {}
    fid_results: dict[str, Any] = {}
    for name in run.sampler_names:
        t0 = time.perf_counter()
        options = dict(run.sampler_options.get(name, {}))
        if "seed" in _sampler_params(name) and "seed" not in options:
            options["seed"] = int(seed)
        key = {"checkpoint": run.ckpt_file.name, "checkpoint_sha256": ckpt_hash, "options": _clean(options),
               "fit_split": "train", "fit_examples": int(run.train_data.shape[0]), "held_out_split": "val",
               "held_out_examples": int(run.val_data.shape[0])}
        sampler, info = _fit_or_load_sampler(name, options, model, train_loader, key, run.run_dir, write,
                                             c.refit_samplers, None, progress, c.which, sampler_val_loader)
        info.update({"config": _clean(sampler.config()), "fit_info": _clean(sampler.fit_info),
                     "fit_examples": int(run.train_data.shape[0]), "n_samples": int(n_samples)})
        sampler_results[name] = info
        if n_samples == 0:
            continue
        if fid_fn is None:  # nothing would score the images: do not draw them
            fid_results[name] = {"skipped": fid_unavailable}
            timings[f"sampler:{name}"] = time.perf_counter() - t0
            continue
        images = decode_samples(model, sampler, n_samples, _generator(seed, f"samples:{name}"), c.batch_size,
                                as_uint8=run.is_image, progress=progress and f"{name}: decoding")
        try:
            fid_results[name] = _clean(fid_fn(images, run.eval_data, feature_net=net, seed=int(seed), kid=use_kid,
                                              reference_name=reference_name, progress=progress))
            if c.fid_repeats > 1:  # the sampling spread: the same sampler, independent draws
                fids = [fid_results[name]["fid"]]
                for r in range(1, c.fid_repeats):
                    more = decode_samples(model, sampler, n_samples, _generator(seed, f"samples:{name}:draw{r}"),
                                          c.batch_size, as_uint8=run.is_image)
                    fids.append(float(fid_fn(more, run.eval_data, feature_net=net, seed=int(seed), kid=False,
                                             reference_name=reference_name)["fid"]))
                fid_results[name]["sample_draws"] = _spread(fids)
        except Exception as err:  # a missing feature network must not lose the other metrics
            fid_results[name] = {"error": f"{type(err).__name__}: {err}", "feature_net": net}
        timings[f"sampler:{name}"] = time.perf_counter() - t0
    fid_recon = None
    if c.fid_reconstruction and fid_fn is not None and run.is_image and n_samples > 0:
        t0 = time.perf_counter()
        try:  # the evaluation images' reconstructions f(mu(x)): the floor for any sampler of this decoder
            recon = _decode_codes(model, enc.mu, c.batch_size)
            fid_recon = _clean(fid_fn(recon, run.eval_data, feature_net=net, seed=int(seed), kid=use_kid,
                                      reference_name=reference_name))
        except Exception as err:
            fid_recon = {"error": f"{type(err).__name__}: {err}", "feature_net": net}
        timings["fid_reconstruction"] = time.perf_counter() - t0
    return Samples(sampler_results, fid_results, net, reference_name, use_kid, fid_unavailable, fid_recon)


def _metrics(run: Loaded, enc: Encoded, col: Collapse, lik: Likelihood, smp: Samples, c,
             timings: dict) -> dict[str, Any]:
    """The metrics.json dict of the stages' results."""
    import torch

    from arelbo import __version__

    q, d, n_eval, mode = enc.latent_dim, enc.num_elements, enc.num_examples, enc.mode
    acc, val_acc, mse_sum = enc.acc, enc.val_acc, enc.mse_sum
    au, mi, n_mi, mi_dims = col.au, col.mi, col.n_mi, col.mi_dims
    smooth, smooth_norm, n_smooth = col.smooth, col.smooth_norm, col.n_smooth
    elbo_policy, elbo_ar, sigma2_diag, value = lik.elbo_policy, lik.elbo_ar, lik.sigma2_diag, lik.density_sigma2
    is_density, density_note, is_note, is_res, n_is, exact = (lik.is_density, lik.density_note, lik.is_note,
                                                              lik.is_res, lik.n_is, lik.exact)
    sampler_results, fid_results, net = smp.samplers, smp.fid, smp.feature_net
    reference_name, use_kid, fid_unavailable = smp.reference, smp.kid, smp.unavailable
    run_dir, ckpt_file, ckpt, splits, cfg, device = run.run_dir, run.ckpt_file, run.ckpt, run.splits, run.cfg, run.device
    which, split, max_examples, batch_size, seed = c.which, c.split, c.max_examples, c.batch_size, c.seed
    threshold, k, n_samples, dequantize = c.threshold, c.k, c.n_samples, c.dequantize
    fid_repeats, fid_reconstruction, fid_recon = c.fid_repeats, c.fid_reconstruction, smp.reconstruction
    policy_name = run.loss_fn.policy.name
    collapse = {
        "latent_dim": q,
        "active_units": au.count,
        "active_mask": au.mask.tolist(),
        "latent_variance": au.variance.tolist(),
        "kl_per_dim": elbo_policy.kl_per_dim,
        "kl_total": elbo_policy.rate,
        "mutual_information": mi,
        "mutual_information_max": math.log(n_mi) if n_mi else None,
        "mutual_information_per_dim": mi_dims.tolist(),
        "mutual_information_per_dim_total": float(mi_dims.sum()),
        "smoothness_per_dim": smooth.tolist() if smooth is not None else None,
        "smoothness_mean": float(smooth.mean()) if smooth is not None else None,
        "smoothness_normalised_per_dim": smooth_norm.tolist() if smooth_norm is not None else None,
        "smoothness_normalised_mean": float(smooth_norm.mean()) if smooth_norm is not None else None,
    }
    likelihood = {
        "policy": policy_name,
        "sigma2_ar": float(acc.ar_sigma2()),
        "sigma2_ar_diagonal": {"mean": float(sigma2_diag.mean()), "min": float(sigma2_diag.min()),
                               "max": float(sigma2_diag.max()),
                               "geometric_mean": float(sigma2_diag.clamp_min(1e-30).log().mean().exp())},
        "sigma2_val": float(val_acc.ar_sigma2()),
        "neg_elbo": {**elbo_policy.to_dict(), "is_density": is_density, "note": density_note},
        "neg_elbo_ar": elbo_ar.to_dict(),
        "is_nll": None if is_res is None else {**is_res.to_dict(), "sigma2_kind": "isotropic" if value.dim() == 0 else "diagonal",
                                                 "sigma2_mean": float(value.mean()), "note": is_note},
        "exact_nll": exact,
        "mse": mse_sum / (n_eval * d),
        "distortion": elbo_policy.distortion,
    }
    for key_ in ("neg_elbo", "neg_elbo_ar"):
        if isinstance(likelihood[key_]["sigma2"], list):  # a (D,) vector: keep the summary, not D numbers
            likelihood[key_]["sigma2"] = "diagonal (see sigma2_mean and sigma2_ar_diagonal)"
        likelihood[key_].pop("kl_per_dim")  # already under collapse
    summary = {
        "active_units": au.count,
        "latent_dim": q,
        "kl_total": elbo_policy.rate,
        "mutual_information": mi,
        "smoothness_mean": collapse["smoothness_mean"],
        "smoothness_normalised_mean": collapse["smoothness_normalised_mean"],
        "mi_per_dim_total": collapse["mutual_information_per_dim_total"],
        "sigma2_ar": likelihood["sigma2_ar"],
        "neg_elbo": elbo_policy.neg_elbo,
        "neg_elbo_bpd": elbo_policy.bits_per_dim,
        "neg_elbo_ar": elbo_ar.neg_elbo,
        "neg_elbo_ar_bpd": elbo_ar.bits_per_dim,
        "is_nll": None if is_res is None else is_res.nll,
        "is_nll_bpd": None if is_res is None else is_res.bits_per_dim,
        "neg_elbo_is_density": is_density,
        "mse": likelihood["mse"],
    }
    if dequantize:  # -log2 P(v) / D <= (E_u[-log p(x~)] + D log 255) / (D ln 2)
        for key in ("neg_elbo", "neg_elbo_ar", "is_nll"):
            nats = summary[key]
            summary[f"{key}_bpd_discrete"] = None if nats is None else (nats + d * math.log(255.0)) / (d * math.log(2.0))
    for name, res in fid_results.items():
        summary[f"fid_{name}"] = res.get("fid")
        if res.get("sample_draws"):
            summary[f"fid_{name}_draws_std"] = res["sample_draws"]["std"]
    summary["fid_reconstruction"] = None if fid_recon is None else fid_recon.get("fid")
    result = {
        "format": METRICS_FORMAT,
        "arelbo_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "checkpoint": {"which": which, "file": ckpt_file.name, "step": _clean(ckpt.get("global_step")),
                       "epoch": _clean(ckpt.get("epoch")), "global_step": _clean(ckpt.get("global_step"))},
        "run": {"dataset": splits.name, "data_shape": list(splits.shape), "arch": cfg.get("model", {}).get("arch"),
                "latent_dim": q, "policy": policy_name, "prior": run.model.prior.name},
        "protocol": {
            "split": split,
            "num_examples": n_eval,
            "num_elements": d,
            "max_examples": max_examples,
            "batch_size": batch_size,
            "seed": seed,
            "device": str(device),
            "sq_err": {"exact": "E_q (x - f(z))^2 in closed form (linear model)",
                       "sample": "one reparameterised z ~ q(z|x) per example",
                       "mean": "z = mu (posterior mean)"}[mode],
            "sigma2": elbo_policy.sigma2_source,
            "sigma2_fitted_on": "val" if split != "val" else "val (the evaluation split)",
            "dequantize": {"on": bool(dequantize),
                           "convention": "pixels stored as v/255, v in {0..255}; scored x~ = (v + u - 1/2)/255, "
                                         "u ~ U[0,1)^D; bits/dim (discrete) = (nats + D ln 255) / (D ln 2), an "
                                         "upper bound on -log2 P(v) / D" if dequantize else None},
            "rate": ("closed-form KL(q(z|x) || N(0, I)), per latent dimension" if run.model.prior.closed_form_kl else
                     f"one-sample Monte-Carlo KL(q(z|x) || p(z)) under the learned {run.model.prior.name!r} prior "
                     "(q's entropy in closed form); no KL per dimension"),
            "active_threshold": threshold,
            "active_variance": "Var_x(mu_j) over the evaluation examples, divided by N",
            "mi": {"num_examples": n_mi, "samples_per_example": 1,
                   "estimator": "E[log q(z|x) - log q(z)], q(z) = mixture of the N posteriors; <= log N"},
            "smoothness": {"num_examples": n_smooth, "how": "mean over examples of ||J_f(mu) e_j||_2, forward-mode jvp",
                           "normalised": "times std(mu_j) over the same examples (invariant to rescaling z_j)"},
            "mi_per_dim": {"num_examples": n_eval, "estimator": "1/2 log(Var(mu_j) + E s_j^2) - 1/2 E log s_j^2: "
                           "exact for a Gaussian aggregate posterior of z_j, else an upper bound; not capped at log N"},
            "is_nll": {"k": k, "num_examples": n_is, "sigma2_mean": float(value.mean())},
            "samplers": sampler_results,
            "fid": {"feature_net": net, "reference": reference_name, "kid": use_kid,
                    "n_samples": n_samples, "skipped": fid_unavailable, "repeats": int(fid_repeats),
                    "reconstruction": bool(fid_reconstruction)},
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "threads": torch.get_num_threads()},
        },
        "summary": summary,
        "collapse": collapse,
        "likelihood": likelihood,
        "fid": fid_results,
        "fid_reconstruction": fid_recon,
        "timings_s": {k_: round(v, 3) for k_, v in timings.items()},
    }
    return result


def _spread(values) -> dict:
    vals = [float(v) for v in values]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"fids": vals, "mean": mean, "std": std, "n": len(vals)}


def _decode_codes(model, codes, batch_size: int):
    """uint8 decoder means f(z) of codes (N, q), in batches on the model's device."""
    import torch

    from arelbo.samplers import to_uint8

    ref = next(model.parameters())
    out = []
    with torch.inference_mode():
        for start in range(0, codes.shape[0], batch_size):
            z = codes[start : start + batch_size].to(device=ref.device, dtype=ref.dtype)
            out.append(to_uint8(model.decode(z).float().cpu()))
    return torch.cat(out)


def _dequantized(data, generator):
    """uint8 images -> float (v + u - 1/2) / 255 with u ~ U[0, 1) drawn with ``generator``."""
    import torch

    u = torch.rand(data.shape, generator=generator, dtype=torch.float32)
    return (data.to(torch.float32) + u - 0.5).div_(255.0)


def _sampler_params(name: str) -> list[str]:
    import inspect

    from arelbo.samplers import SAMPLERS

    return [p for p in inspect.signature(SAMPLERS[name].__init__).parameters if p != "self"]


# --------------------------------------------------------------------------------------------------------------
# Table


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.6g}"
    return str(value)


def format_table(result: dict[str, Any]) -> str:
    """A readable multi-section table of a metrics.json dict."""
    p, c, lk = result["protocol"], result["collapse"], result["likelihood"]
    rows: list[tuple[str, str]] = []

    def section(title):
        rows.append((f"[{title}]", ""))

    section("run")
    rows += [("run", result["run_dir"]), ("checkpoint", f"{result['checkpoint']['file']} (step {_fmt(result['checkpoint']['step'])})"),
             ("dataset / split", f"{result['run']['dataset']} / {p['split']} ({p['num_examples']} examples, D={p['num_elements']})"),
             ("model / policy", f"{result['run']['arch']}, q={c['latent_dim']} / {result['run']['policy']}"
              + (f", prior {result['run']['prior']}" if _learnable_prior(result["run"].get("prior")) else ""))]
    section("collapse")
    rows += [("active units", f"{c['active_units']} / {c['latent_dim']}  (Var(mu_j) > {p['active_threshold']})"),
             ("KL total (nats)", _fmt(c["kl_total"])),
             ("KL per dim", " ".join(_fmt(v, 3) for v in c["kl_per_dim"]) if c["kl_per_dim"] is not None
              else "- (not defined under a non-factorised prior)"),
             ("I(x;z) (nats)", f"{_fmt(c['mutual_information'])}  (max log N = {_fmt(c['mutual_information_max'])})"),
             ("smoothness E||df/dz_j||", _fmt(c["smoothness_mean"]) + ("  per dim: " + " ".join(_fmt(v, 3) for v in c["smoothness_per_dim"])
                                                               if c["smoothness_per_dim"] else ""))]
    section("likelihood")
    ne, na, isn = lk["neg_elbo"], lk["neg_elbo_ar"], lk["is_nll"]
    rows += [("sigma2 (ar, eval set)", _fmt(lk["sigma2_ar"])),
             (f"-ELBO ({lk['policy']})", f"{_fmt(ne['neg_elbo'])} nats, {_fmt(ne['bits_per_dim'])} bits/dim  [sigma2: {ne['sigma2_source']}]"),
             ("-ELBO (ar sigma2)", f"{_fmt(na['neg_elbo'])} nats, {_fmt(na['bits_per_dim'])} bits/dim"),
             (f"IS-NLL (K={p['is_nll']['k']}, n={p['is_nll']['num_examples']})",
              "-" if isn is None else f"{_fmt(isn['nll'])} +- {_fmt(isn['stderr'], 2)} nats, {_fmt(isn['bits_per_dim'])} bits/dim")]
    if lk.get("exact_nll"):
        rows.append(("exact NLL (linear)", f"{_fmt(lk['exact_nll']['nll'])} nats"))
    rows += [("MSE (posterior mean)", _fmt(lk["mse"])), ("rate / distortion", f"{_fmt(ne['rate'])} / {_fmt(ne['distortion'])}")]
    if p["samplers"]:
        section("samples")
        for name, info in p["samplers"].items():
            res = result["fid"].get(name, {})
            if "fid" in res:
                text = f"FID {_fmt(res['fid'])}"
                if res.get("kid_mean") is not None:
                    text += f", KID {_fmt(res['kid_mean'])} +- {_fmt(res.get('kid_std'), 2)}"
                text += f"  ({res['protocol']['feature_net']}, {res['protocol']['n_generated']} vs {res['protocol']['n_reference']})"
            elif "error" in res:
                text = f"FID failed: {res['error']}"
            elif "skipped" in res:
                text = f"FID skipped: {res['skipped']}"
            else:
                text = "no samples drawn"
            rows.append((f"{name} ({info['source']})", text))
    rows.append(("time (s)", _fmt(result["timings_s"].get("total"))))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a}" if a.startswith("[") else f"  {a:<{width}}  {b}" for a, b in rows)
