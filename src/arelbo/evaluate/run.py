"""``evaluate_run``: load, the stages in order, metrics.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from arelbo.evaluate.collapse import collapse
from arelbo.evaluate.common import check_writable, clean, metrics_file
from arelbo.evaluate.likelihood import likelihood
from arelbo.evaluate.load import load
from arelbo.evaluate.posterior import encode
from arelbo.evaluate.result import metrics_dict
from arelbo.evaluate.samples import samples

__all__ = ["evaluate_run"]


def evaluate_run(run_dir, config=None, *, write: bool = True, progress: bool = True, **options) -> dict[str, Any]:
    """Evaluate a run directory; returns the metrics.json dict (also written there unless ``write=False``).

    ``config``: an :class:`arelbo.evalconfig.EvalConfig` (default: its defaults); ``options``: any of its fields
    by name, replacing the config's (``evaluate_run(run, which="last", n_samples=0)``). The fields, and what each
    stage computes, are described there and in :func:`_evaluate`.
    """
    from arelbo.evalconfig import from_options

    return _evaluate(run_dir, from_options(config, options), write=write, progress=progress)



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
    from arelbo.runs import check_run_directory

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    check_run_directory(run_dir)  # missing, or a file: said before anything is loaded
    if write:
        check_writable(run_dir, c.which)
    run = load(Path(run_dir), c)
    timings["load"] = time.perf_counter() - t_start
    t0 = time.perf_counter()
    enc = encode(run, c, progress)
    timings["encode_pass"] = time.perf_counter() - t0
    col = collapse(run, enc, c, timings)
    t0 = time.perf_counter()
    lik = likelihood(run, enc, c, progress)
    timings["is_nll"] = time.perf_counter() - t0
    smp = samples(run, enc, c, write, progress, timings)
    timings["total"] = time.perf_counter() - t_start
    result = clean(metrics_dict(run, enc, col, lik, smp, c, timings))
    if write:
        from arelbo.fileio import atomic_write_text

        atomic_write_text(metrics_file(run.run_dir, c.which), json.dumps(result, indent=2, sort_keys=False) + "\n")
    return result


