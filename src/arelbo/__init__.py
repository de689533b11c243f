"""arelbo: Gaussian VAEs whose decoder variance is set to its maximum-likelihood value (AR-ELBO).

The core (``arelbo.objectives``, ``arelbo.models``, ``arelbo.metrics``, ``arelbo.linear``) is pure PyTorch and
needs nothing but ``pip install arelbo``::

    from arelbo import GaussianVAELoss
    loss_fn = GaussianVAELoss("ar")          # AR-ELBO, the default policy

The names below are imported on first use, so ``import arelbo`` (and ``arelbo --help``) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # the loss and its decoder-variance policies
    "GaussianVAELoss": "arelbo.objectives",
    "LossOutput": "arelbo.objectives",
    "DecoderVariance": "arelbo.objectives",
    "HeldOutSigma2": "arelbo.objectives",
    "POLICIES": "arelbo.objectives",
    "register_policy": "arelbo.objectives",
    "make_policy": "arelbo.objectives",
    "gaussian_kl": "arelbo.objectives",
    "neg_elbo_per_sample": "arelbo.objectives",
    # models
    "VAE": "arelbo.models",
    "LinearVAE": "arelbo.models",
    "build_model": "arelbo.models",
    # metrics
    "ELBOAccumulator": "arelbo.metrics",
    "active_units": "arelbo.metrics",
    "neg_elbo": "arelbo.metrics",
    "importance_sampled_nll": "arelbo.metrics",
    "mutual_information": "arelbo.metrics",
    # configuration and run directories
    "RunConfig": "arelbo.config",
    "ConfigError": "arelbo.config",
    "load_config": "arelbo.config",
    "load_model": "arelbo.runs",
    # evaluation of a run directory
    "EvalConfig": "arelbo.evalconfig",
    "evaluate_run": "arelbo.evaluate",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these resolve lazily in __getattr__
    from arelbo.config import ConfigError, RunConfig, load_config
    from arelbo.evalconfig import EvalConfig
    from arelbo.evaluate import evaluate_run
    from arelbo.metrics import ELBOAccumulator, active_units, importance_sampled_nll, mutual_information, neg_elbo
    from arelbo.models import VAE, LinearVAE, build_model
    from arelbo.objectives import (
        POLICIES,
        DecoderVariance,
        GaussianVAELoss,
        HeldOutSigma2,
        LossOutput,
        gaussian_kl,
        make_policy,
        neg_elbo_per_sample,
        register_policy,
    )
    from arelbo.runs import load_model


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'arelbo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
