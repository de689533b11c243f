"""Study reports: the results table and matplotlib figures into ``report.md`` and one self-contained ``report.html``.

``write_report(results, out)`` takes the dict :func:`arelbo.study.collect_results` returns (``results.json``) and
writes, into ``out``:

- ``figures/*.png``: the sigma^2 trajectory of every training policy (``metrics.jsonl`` training records, log
  scale), the KL of every latent dimension (sorted, mean over seeds, a heatmap), the oversmoothing sweep (active
  units, decoder smoothness, KL and FID against sigma^2 on a log axis, with the AR-ELBO run's final sigma^2 as a
  vertical line and its values as a star) when the study has two or more fixed sigma^2, FID bars with error
  bars over seeds, and per policy a grid of generated samples (its own sampler) beside reconstructions;
- ``report.md``: the table (mean ± std over seeds) and the figures as links;
- ``report.html``: the same in one file with inline CSS and the figures embedded as base64 PNG (no external
  assets, every text escaped): open it anywhere, mail it, render it headless.

Figures use matplotlib's object API (``matplotlib.figure.Figure``, Agg canvas): no pyplot state, no display.
Also here: :func:`plot_linear_active_units`, the linear VAE's picture for ``arelbo linear --plot``.
"""

from arelbo.report.figures import (
    Figure,
    make_figures,
    plot_curves,
    plot_fid_bars,
    plot_group_kl,
    plot_kl_heatmap,
    plot_sigma2_trajectories,
    plot_sweep,
)
from arelbo.report.linear import linear_active_units_curve, plot_linear_active_units
from arelbo.report.page import render_html, render_markdown, report_notes, write_report
from arelbo.report.tables import format_cell, group_rows, paired_rows, paired_tables, table_rows

__all__ = [
    "write_report",
    "render_markdown",
    "render_html",
    "report_notes",
    "format_cell",
    "table_rows",
    "paired_rows",
    "paired_tables",
    "group_rows",
    "make_figures",
    "Figure",
    "plot_fid_bars",
    "plot_sweep",
    "plot_sigma2_trajectories",
    "plot_kl_heatmap",
    "plot_group_kl",
    "plot_curves",
    "linear_active_units_curve",
    "plot_linear_active_units",
]
