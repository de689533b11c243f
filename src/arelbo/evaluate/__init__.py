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

Randomness: every random stream has its own generator seeded from ``seed`` and a fixed tag (see ``arelbo.evaluate.common.generator``),
so each number is reproducible on its own and independent of which other metrics were asked for.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
import zlib

from arelbo.evaluate.common import FINAL_CHECKPOINTS, METRICS_FILE, SAMPLER_DIR, metrics_file, resolve_device, sampler_file
from arelbo.evaluate.result import format_table
from arelbo.evaluate.run import evaluate_run

__all__ = ["evaluate_run", "format_table", "metrics_file", "sampler_file", "resolve_device", "METRICS_FILE",
           "SAMPLER_DIR", "FINAL_CHECKPOINTS"]
