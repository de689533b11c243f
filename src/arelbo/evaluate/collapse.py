"""Stage 2: posterior-collapse diagnostics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from arelbo.evaluate.common import generator
from arelbo.evaluate.load import Loaded
from arelbo.evaluate.posterior import Encoded

__all__ = ["Collapse", "collapse"]


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



def collapse(run: Loaded, enc: Encoded, c, timings: dict) -> Collapse:
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
    top = next(iter(enc.group_slices().values()))  # I(x; z) of the top group: the whole code of a flat VAE
    mi = (mutual_information(mu_all[:n_mi, top], logvar_all[:n_mi, top], generator=generator(c.seed, "mi"))
          if n_mi else None)
    timings["mutual_information"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_smooth = n_eval if c.smoothness_examples is None else min(n_eval, int(c.smoothness_examples))
    smooth = (decoder_smoothness(run.model.units_decoder, mu_all[:n_smooth].to(run.device), batch_size=c.batch_size,
                                 units=getattr(run.model, "smoothness_units", None))
              if n_smooth else None)
    smooth_norm = normalised_smoothness(smooth, mu_all[:n_smooth]) if n_smooth else None
    mi_dims = mutual_information_per_dim(mu_all, logvar_all)
    timings["smoothness"] = time.perf_counter() - t0
    return Collapse(au, mi, n_mi, mi_dims, smooth, smooth_norm, n_smooth)


