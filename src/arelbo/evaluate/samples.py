"""Stages 4 and 5: samplers fitted (or reused), their samples and the reconstructions scored with FID."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from arelbo.evaluate.common import clean, generator, sampler_file, spread
from arelbo.evaluate.load import Loaded, default_feature_net
from arelbo.evaluate.posterior import Encoded

__all__ = ["Samples", "samples", "decode_codes"]


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



def _fit_or_load_sampler(name, options, model, train_loader, key, run_dir, write, refit, fit_examples, progress,
                         which="best", val_loader=None, codes=None):
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
                val_loader=val_loader, codes=codes)
    seconds = time.perf_counter() - t0
    info = {"source": "fitted", "fit_seconds": round(seconds, 3)}
    if write:
        save_sampler(sampler, path, extra={"key": key, "fit_seconds": round(seconds, 3)})
        info["path"] = str(path)
    return sampler, info



def samples(run: Loaded, enc: Encoded, c, write: bool, progress, timings: dict) -> Samples:
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
    net = c.feature_net or default_feature_net(run.splits.shape)
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
    codes: dict = {}  # the training and validation codes, encoded once for every sampler fitted below
    for name in run.sampler_names:
        t0 = time.perf_counter()
        options = dict(run.sampler_options.get(name, {}))
        if "seed" in _sampler_params(name) and "seed" not in options:
            options["seed"] = int(seed)
        key = {"checkpoint": run.ckpt_file.name, "checkpoint_sha256": ckpt_hash, "options": clean(options),
               "fit_split": "train", "fit_examples": int(run.train_data.shape[0]), "held_out_split": "val",
               "held_out_examples": int(run.val_data.shape[0])}
        sampler, info = _fit_or_load_sampler(name, options, model, train_loader, key, run.run_dir, write,
                                             c.refit_samplers, None, progress, c.which, sampler_val_loader, codes)
        info.update({"config": clean(sampler.config()), "fit_info": clean(sampler.fit_info),
                     "fit_examples": int(run.train_data.shape[0]), "n_samples": int(n_samples)})
        sampler_results[name] = info
        if n_samples == 0:
            continue
        if fid_fn is None:  # nothing would score the images: do not draw them
            fid_results[name] = {"skipped": fid_unavailable}
            timings[f"sampler:{name}"] = time.perf_counter() - t0
            continue
        images = decode_samples(model, sampler, n_samples, generator(seed, f"samples:{name}"), c.batch_size,
                                as_uint8=run.is_image, progress=progress and f"{name}: decoding")
        try:
            fid_results[name] = clean(fid_fn(images, run.eval_data, feature_net=net, seed=int(seed), kid=use_kid,
                                              reference_name=reference_name, progress=progress))
            if c.fid_repeats > 1:  # the sampling spread: the same sampler, independent draws
                fids = [fid_results[name]["fid"]]
                for r in range(1, c.fid_repeats):
                    more = decode_samples(model, sampler, n_samples, generator(seed, f"samples:{name}:draw{r}"),
                                          c.batch_size, as_uint8=run.is_image)
                    fids.append(float(fid_fn(more, run.eval_data, feature_net=net, seed=int(seed), kid=False,
                                             reference_name=reference_name)["fid"]))
                fid_results[name]["sample_draws"] = spread(fids)
        except Exception as err:  # a missing feature network must not lose the other metrics
            fid_results[name] = {"error": f"{type(err).__name__}: {err}", "feature_net": net}
        timings[f"sampler:{name}"] = time.perf_counter() - t0
    fid_recon = None
    if c.fid_reconstruction and fid_fn is not None and run.is_image and n_samples > 0:
        t0 = time.perf_counter()
        try:  # the evaluation images' reconstructions f(mu(x)): the floor for any sampler of this decoder
            recon = decode_codes(model, enc.mu, c.batch_size)
            fid_recon = clean(fid_fn(recon, run.eval_data, feature_net=net, seed=int(seed), kid=use_kid,
                                      reference_name=reference_name))
        except Exception as err:
            fid_recon = {"error": f"{type(err).__name__}: {err}", "feature_net": net}
        timings["fid_reconstruction"] = time.perf_counter() - t0
    return Samples(sampler_results, fid_results, net, reference_name, use_kid, fid_unavailable, fid_recon)


def decode_codes(model, codes, batch_size: int):
    """uint8 decoder means of every unit's code (N, units), in batches on the model's device."""
    import torch

    from arelbo.samplers import to_uint8

    ref = next(model.parameters())
    out = []
    with torch.inference_mode():
        for start in range(0, codes.shape[0], batch_size):
            z = codes[start : start + batch_size].to(device=ref.device, dtype=ref.dtype)
            out.append(to_uint8(model.units_decoder(z).float().cpu()))
    return torch.cat(out)



def _sampler_params(name: str) -> list[str]:
    import inspect

    from arelbo.samplers import SAMPLERS

    return [p for p in inspect.signature(SAMPLERS[name].__init__).parameters if p != "self"]


