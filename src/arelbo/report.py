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

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

__all__ = ["write_report", "render_markdown", "render_html", "format_cell", "table_rows", "make_figures",
           "Figure", "linear_active_units_curve", "plot_linear_active_units"]

FIG_DIR = "figures"
GRID_SAMPLES = 64
GRID_RECONSTRUCTIONS = 32
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939"]


@dataclass
class Figure:
    key: str
    title: str
    path: Path  # the PNG file
    caption: str


# --------------------------------------------------------------------------------------------------------------
# Numbers and the table


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    v = float(value)
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.{max(1, digits - 1)}e}"
    text = f"{v:.{digits}g}"
    if "e" in text:  # e.g. 1.235e+03 from .4g: show the integer instead
        text = f"{v:.0f}"
    return text


def format_cell(agg: dict, digits: int = 4) -> str:
    """``mean ± std`` (std over seeds, ddof 1), ``mean`` for one seed, ``n/a`` when no value."""
    if not agg or agg.get("mean") is None:
        return "n/a"
    text = _fmt(agg["mean"], digits)
    if agg.get("std") is not None:
        text += f" ± {_fmt(agg['std'], 2)}"
    if agg.get("n") and len(agg.get("values") or []) > agg["n"]:
        text += f" (n={agg['n']})"
    return text


def table_rows(results: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, footnotes): one row per policy; unavailable values are ``n/a`` with a numbered reason."""
    cols = results["columns"]
    header = ["policy", "seeds"] + [c["label"] + (f" ({c['unit']})" if c["unit"] else "") for c in cols]
    notes: list[str] = []
    rows = []
    for p in results["policies"]:
        row = [p["label"] + ("" if p["sampler"] == "prior" else f" [{p['sampler']} sampler]"),
               f"{p['n_done']}/{len(p['cells'])}" + (f", {p['n_failed']} failed" if p["n_failed"] else "")]
        for c in cols:
            cell = format_cell(p["aggregate"].get(c["key"]), c["digits"])
            if c["key"] == "active_units" and cell != "n/a" and p.get("latent_dim"):
                cell += f" / {p['latent_dim']}"
            reason = (p.get("unavailable") or {}).get(c["key"])
            if cell == "n/a" and reason:
                if reason not in notes:
                    notes.append(reason)
                cell += f" [{notes.index(reason) + 1}]"
            row.append(cell)
        rows.append(row)
    return header, rows, notes


def paired_rows(results: dict, paired: dict | None = None) -> tuple[str, list[str], list[list[str]]]:
    """(title, header, rows) of the paired differences (reference - policy, same seed, t-interval), or rows = [].

    ``paired`` is one entry of ``paired_snapshots`` (differences at a kept snapshot); default: at the end."""
    paired = (results.get("paired") if paired is None else paired) or {}
    labels = {c["key"]: c["label"] + (f" ({c['unit']})" if c["unit"] else "") for c in results.get("columns", [])}
    header = ["policy", "metric", "seeds", "difference (mean)", f"{round(100 * paired.get('confidence', 0.95))}% interval",
              f"{paired.get('reference_label', 'reference')} is"]
    rows = []
    for r in paired.get("rows") or []:
        interval = "n/a" if r["lo"] is None else f"[{_fmt(r['lo'])}, {_fmt(r['hi'])}]"
        rows.append([r["label"], labels.get(r["key"], r["key"]), str(r["n"]), _fmt(r["mean"]), interval, r["verdict"]])
    at_step = f", at step {paired['step']}" if "step" in paired else ""
    title = (f"Paired differences: {paired.get('reference_label', '')} minus each policy, seed by seed{at_step}"
             if paired else "")
    return title, header, rows


def paired_tables(results: dict) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(anchor, title, header, rows) of the paired differences at the end, then at each kept snapshot step."""
    tables = [("paired", *paired_rows(results))]
    tables += [(f"paired-step-{ps['step']}", *paired_rows(results, ps)) for ps in results.get("paired_snapshots") or []]
    return [t for t in tables if t[3]]


CURVE_KEYS = ("fid", "fid_gmm", "fid_two_stage", "fid_flow", "fid_reconstruction", "active_units", "kl_total", "neg_elbo_ar",
              "sigma2_final")
OPTIONAL_COLUMNS = ("fid_gmm", "fid_two_stage", "fid_flow", "fid_reconstruction")  # in the curve only when in the table


def curve_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the metrics at each kept snapshot and at the end, per policy (rows = [] without any)."""
    labels = {c["key"]: c["label"] for c in results.get("columns", [])}
    labels.update(neg_elbo_ar="-ELBO, common σ² (nats)", sigma2_final="σ²")
    keys = [k for k in CURVE_KEYS
            if k in labels and (k not in OPTIONAL_COLUMNS or any(c["key"] == k for c in results["columns"]))]
    header = ["policy", "step"] + [labels[k] for k in keys]
    rows = []
    for p in results["policies"]:
        for point in p.get("curve") or []:
            step = "n/a" if point["step"] is None else str(point["step"])
            rows.append([p["label"], step + (" (end)" if point["final"] else "")]
                        + [format_cell(point["aggregate"].get(k), 4) for k in keys])
    return header, rows


def failures(results: dict) -> list[tuple[str, int, str]]:
    return [(p["label"], c["seed"], c.get("error") or c["status"]) for p in results["policies"] for c in p["cells"]
            if c["status"] != "done"]


# --------------------------------------------------------------------------------------------------------------
# Figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    import io

    from arelbo.runs import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _run_path(results: dict, out: Path, cell: dict) -> Path:
    p = Path(cell["run_dir"])
    return p if p.is_absolute() else out / p


def _training_groups(results: dict) -> list[tuple[str, dict]]:
    """One (label, policy) per distinct training run set (two-stage shares learned's)."""
    seen: dict[str, tuple[str, dict]] = {}
    for p in results["policies"]:
        if p["train_slug"] in seen:
            label, first = seen[p["train_slug"]]
            seen[p["train_slug"]] = (f"{label} / {p['label']}", first)
        else:
            seen[p["train_slug"]] = (p["label"], p)
    return list(seen.values())


def plot_sigma2_trajectories(results: dict, out: Path, path: Path) -> Figure | None:
    from arelbo.runs import read_jsonl
    from arelbo.study import policy_sigma2_kind

    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    drawn = 0
    for i, (label, p) in enumerate(_training_groups(results)):
        color = PALETTE[i % len(PALETTE)]
        for j, cell in enumerate(p["cells"]):
            f = _run_path(results, out, cell) / "metrics.jsonl"
            if not f.is_file():
                continue
            recs = [r for r in read_jsonl(f) if r.get("split") == "train" and isinstance(r.get("sigma2"), (int, float))
                    and r["sigma2"] > 0 and isinstance(r.get("step"), int)]  # as the aggregation reads them
            if not recs:
                continue
            ax.plot([r["step"] for r in recs], [r["sigma2"] for r in recs], color=color, alpha=1.0 if j == 0 else 0.45,
                    lw=1.4, ls="--" if policy_sigma2_kind(p) == "given" else "-", label=label if j == 0 else None)
            drawn += 1
    if not drawn:
        return None
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("σ² (training batches)")
    ax.set_title("decoder variance σ² during training")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)
    return Figure("sigma2", "σ² trajectory per policy", path,
                  "σ² per logged training step (the batch value for ar-type policies, the learned value for learned, "
                  "the constant for fixed, dashed); lighter lines are further seeds.")


def plot_kl_heatmap(results: dict, path: Path) -> Figure | None:
    import numpy as np

    rows = [(label, p["kl_per_dim_sorted_mean"]) for label, p in _training_groups(results) if p.get("kl_per_dim_sorted_mean")]
    if not rows:
        return None
    q = max(len(r) for _, r in rows)
    data = np.full((len(rows), q), np.nan)
    for i, (_, r) in enumerate(rows):
        data[i, : len(r)] = r
    fig = _figure(min(14, 3 + 0.45 * q), 1.2 + 0.42 * len(rows))
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.set_xticks(range(q), [str(j + 1) for j in range(q)], fontsize=7)
    ax.set_xlabel("latent dimension, sorted by KL (largest first)")
    ax.set_title("KL per latent dimension (nats, mean over seeds)")
    if q <= 32 and len(rows) <= 20:
        top = np.nanmax(data) if np.isfinite(data).any() else 1.0
        for i in range(len(rows)):
            for j in range(q):
                v = data[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.1f}" if v >= 0.05 else "0", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.6 * top else "black")
    fig.colorbar(im, ax=ax, label="KL (nats)")
    _save(fig, path)
    return Figure("kl", "KL per latent dimension", path,
                  "Each row a policy, each column a latent dimension sorted by its KL (evaluation split); a dimension "
                  "with KL ≈ 0 carries no information (collapsed).")


def _has_value(agg) -> bool:
    return bool(agg) and agg.get("mean") is not None


def _errorbar(ax, xs, aggs, **kw):
    pts = [(x, a["mean"], a["std"] or 0.0) for x, a in zip(xs, aggs) if _has_value(a)]
    if pts:
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], capsize=3, **kw)
    return len(pts)


def _panels_with_values(sweep: dict, panels: list) -> list:
    """The panels (title, curves) with at least one value, each keeping only its curves that have one: a metric
    the study did not compute (FID under --no-fid) or that predates the results.json (per-dimension MI) gets no
    empty panel."""
    out = []
    for title, curves in panels:
        kept = [c for c in curves
                if any(_has_value(a) for a in sweep["curves"].get(c[0]) or [])
                or any(_has_value(ref.get(c[0])) for ref in sweep["references"])]
        if kept:
            out.append((title, kept))
    return out


def plot_sweep(results: dict, path: Path) -> Figure | None:
    sweep = results.get("sweep")
    if not sweep:
        return None
    from matplotlib.ticker import MaxNLocator

    # (panel title, [(curve key, line style, legend suffix)]): the FID panel has the GMM sampler's curve too
    panels = [("active units", [("active_units", "-", "")]),
              ("decoder smoothness E‖∂f/∂z_j‖", [("smoothness", "-", "")]),
              ("total KL (nats)", [("kl_total", "-", "")]),
              ("FID", [("fid", "-", " (prior sampler)"), ("fid_gmm", ":", " (GMM sampler)")]),
              ("scale-free smoothness E‖∂f/∂z_j‖·std(μ_j)", [("smoothness_normalised", "-", "")]),
              ("Σ_j I(x; z_j) (nats)", [("mi_per_dim", "-", "")])]
    panels = _panels_with_values(sweep, panels)
    fig = _figure(15 if len(panels) > 4 else 10, 7)
    axes = fig.subplots(2, 3 if len(panels) > 4 else 2)
    curves_of = sweep["curves"]
    for ax, (title, curves) in zip(axes.flat, panels):
        n = sum(_errorbar(ax, sweep["sigma2"], curves_of.get(key, []), color="#333333", marker="o", lw=1.5, ls=ls,
                          label=f"fixed σ²{suffix}") for key, ls, suffix in curves)
        for i, ref in enumerate(sweep["references"]):  # the reference's final σ² and its values there
            s2 = (ref.get("sigma2") or {}).get("mean")
            if s2 is None:
                continue
            color = PALETTE[(3 + i) % len(PALETTE)]
            ax.axvline(s2, color=color, ls="--", lw=1.2, label=f"{ref['label']}: final σ²={s2:.3g}")
            for key, _, _ in curves:
                agg = ref.get(key)
                if _has_value(agg):
                    ax.errorbar([s2], [agg["mean"]], yerr=[agg.get("std") or 0.0], color=color, marker="*",
                                ms=14, capsize=3, ls="none")
        ax.set_xscale("log")
        ax.set_xlabel("σ²")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.25)
        if len(curves) > 1 and n:  # FID: prior and GMM curves differ by up to 25x here; a log axis shows both
            ax.set_yscale("log")
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes.flat[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("oversmoothing sweep: fixed σ² against AR-ELBO (star: its values at its own final σ²)")
    _save(fig, path)
    return Figure("sweep", "Oversmoothing sweep", path,
                  "Fixed σ² on a log grid (points: mean, bars: std over seeds). The dashed vertical line is where "
                  "AR-ELBO's σ² ended; the star shows its values there (FID panel, log scale: solid, the prior sampler; "
                  "dotted, a GMM fitted to the training codes, when evaluated). The scale-free smoothness multiplies "
                  "each latent's decoder gradient by the spread of its codes (unchanged when a latent is rescaled); "
                  "Σ_j I(x; z_j) sums each latent's own mutual information (Gaussian form, not capped at log N).")


FID_LEGEND = {"fid": "FID (own sampler: prior / two-stage)", "fid_gmm": "FID (GMM sampler)",
              "fid_two_stage": "FID (two-stage sampler)", "fid_reconstruction": "FID of test reconstructions (floor)",
              "fid_flow": "FID (flow sampler)"}


def plot_fid_bars(results: dict, path: Path) -> Figure | None:
    import numpy as np

    keys = [c["key"] for c in results["columns"] if c["key"].startswith("fid")]
    pols = results["policies"]
    if not any(_has_value(p["aggregate"].get(k)) for p in pols for k in keys):
        return None
    fig = _figure(max(6, 0.9 * len(pols) + 2), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(keys)
    x = np.arange(len(pols))
    for i, key in enumerate(keys):
        means = [(p["aggregate"].get(key) or {}).get("mean") for p in pols]
        stds = [(p["aggregate"].get(key) or {}).get("std") or 0.0 for p in pols]
        xs = x + (i - (len(keys) - 1) / 2) * width
        heights = [m if m is not None else 0.0 for m in means]
        ax.bar(xs, heights, width * 0.9, yerr=stds, capsize=3, color=PALETTE[i], label=FID_LEGEND.get(key, key))
        for xi, m, sd in zip(xs, means, stds):
            if m is None:
                ax.text(xi, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
            else:  # above the error bar, not on it
                ax.text(xi, m + sd, f"{m:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [p["label"] for p in pols], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID per policy (mean ± std over seeds)")
    ax.grid(True, axis="y", alpha=0.25)
    if len(keys) > 1:
        ax.legend(fontsize=8)
    _save(fig, path)
    gmm = ("; FID (GMM): samples from a Gaussian mixture fitted to the training codes, decoded (what the decoder "
           "can do once the prior's mismatch with the aggregate posterior is removed)") if "fid_gmm" in keys else ""
    return Figure("fid", "FID per policy", path,
                  "FID: each policy judged with its own sampler (two-stage: the second-stage VAE; the others: the "
                  f"prior){gmm}. Error bars: std over seeds.")


def _image_grids(results: dict, out: Path, figdir: Path) -> list[dict]:
    """Per policy (first seed that finished): samples from its own sampler and reconstructions, as PNG files."""
    import torch

    from arelbo.data import load_dataset
    from arelbo.imagegrid import make_grid, save_png
    from arelbo.grids import reconstruction_grid
    from arelbo.runs import load_model
    from arelbo.samplers import decode_samples, load_sampler

    grids = []
    data_cache: dict[str, Any] = {}
    which = results.get("eval", {}).get("checkpoint", "last")
    split = results.get("eval", {}).get("split", "test")
    for p in results["policies"]:
        cell = next((c for c in p["cells"] if c["status"] == "done"), None)
        if cell is None:
            continue
        run_dir = _run_path(results, out, cell)
        entry = {"policy": p["label"], "seed": cell["seed"], "samples": None, "reconstructions": None, "note": None}
        try:
            model, _, ckpt = load_model(run_dir, which)
            shape = tuple(ckpt["data_shape"])
            if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 2:
                return []  # not images: no grids for this study
            g = torch.Generator().manual_seed(0)
            if p["sampler"] == "prior":
                with torch.inference_mode():
                    images = model.sample(GRID_SAMPLES, generator=g)
            else:
                sampler, _ = load_sampler(run_dir / "samplers" / f"{p['sampler']}.pt")
                images = decode_samples(model, sampler, GRID_SAMPLES, g)
            entry["samples"] = save_png(make_grid(images, nrow=8), figdir / f"samples-{p['slug']}.png")
            d = ckpt["config"]["data"]
            key = json.dumps(d, sort_keys=True, default=str)
            if key not in data_cache:
                data_cache.clear()
                data_cache[key] = load_dataset(d["name"], d.get("root"), **(d.get("options") or {}))
            n = min(GRID_RECONSTRUCTIONS, int(data_cache[key].split(split).shape[0]))
            grid = reconstruction_grid(run_dir, n=n, split=split, nrow=8, checkpoint=which, splits=data_cache[key])
            entry["reconstructions"] = save_png(grid, figdir / f"reconstructions-{p['slug']}.png")
        except Exception as err:  # noqa: BLE001 - a missing sampler file must not lose the report
            entry["note"] = f"{type(err).__name__}: {err}"
        grids.append(entry)
    return grids


def plot_curves(results: dict, path: Path) -> Figure | None:
    """FID of each sampler (and active units) against training steps, one line per policy (mean ± std over
    seeds), from the kept snapshots and the end of training; None when no policy has two points."""
    columns = {c["key"]: c for c in results["columns"]}
    keys = [k for k in ("fid", "fid_gmm", "fid_two_stage") if k in columns] + ["active_units"]
    pols = [p for p in results["policies"] if len([pt for pt in p.get("curve") or [] if pt["step"] is not None]) > 1]
    if not pols:
        return None
    fig = _figure(4.2 * len(keys), 3.8)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        n = 0
        for i, p in enumerate(pols):
            pts = [pt for pt in p["curve"] if pt["step"] is not None]
            n += _errorbar(ax, [pt["step"] for pt in pts], [pt["aggregate"].get(key) for pt in pts],
                           color=PALETTE[i % len(PALETTE)], marker="o", lw=1.3, label=p["label"])
        label = "active units" if key == "active_units" else FID_LEGEND.get(key, key)
        ax.set_title(label if n else f"{label}: n/a", fontsize=9)
        ax.set_xlabel("training step")
        if key != "active_units" and n:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.25)
    for ax in axes:  # the first panel with lines carries the legend
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
            break
    fig.suptitle("metrics against training steps (kept snapshots and the end; mean ± std over seeds)")
    _save(fig, path)
    return Figure("curves", "FID and active units against training steps", path,
                  "Each policy's FID per sampler and its active units at the kept snapshots and at the end of "
                  "training (FID on a log axis). A policy whose curves are still falling at the end has "
                  "not converged at this budget.")


def make_figures(results: dict, out: Path) -> tuple[list[Figure], list[dict]]:
    figdir = Path(out) / FIG_DIR
    figdir.mkdir(parents=True, exist_ok=True)
    figs = [
        plot_fid_bars(results, figdir / "fid.png"),
        plot_sweep(results, figdir / "sweep.png"),
        plot_sigma2_trajectories(results, Path(out), figdir / "sigma2.png"),
        plot_kl_heatmap(results, figdir / "kl_per_dim.png"),
        plot_curves(results, figdir / "curves.png"),
    ]
    return [f for f in figs if f is not None], _image_grids(results, Path(out), figdir)


# --------------------------------------------------------------------------------------------------------------
# Text


def _intro(results: dict) -> list[tuple[str, str]]:
    """(label, text) lines describing the study, shared by markdown and HTML."""
    t, e = results["training"], results["eval"]
    steps = "all batches" if t["steps_per_epoch"] is None else f"{t['steps_per_epoch']} batches"
    lines = [
        ("command", results.get("command") or "(programmatic)"),
        ("data / model", f"{results['dataset']} ({results.get('preset') or 'custom config'}), {t['preset_model']}"),
        ("training", f"{t['epochs']} epochs x {steps} of {t['batch_size']}"
                     + (f", max {t['max_steps']} steps" if t.get("max_steps") else "")
                     + f", {t['optimizer']} lr {t['lr']}, seeds {', '.join(map(str, results['seeds']))}"),
        ("scale (its defaults; the training and evaluation lines say what this study ran)", results["scale"]["why"]),
        ("evaluation", f"checkpoint '{e['checkpoint']}', {e['split']} split"
                       + (f" (first {e['max_examples']})" if e.get("max_examples") else "")
                       + f"; FID {'on' if e['fid'] else 'off'} with {e['n_samples']} samples per sampler; IS-NLL "
                         f"K={e['k']} on {e['is_examples']} examples; smoothness on {e['smoothness_examples']}"
                       + (f"; two-stage sampler {e['two_stage_steps']} steps" if e.get("two_stage_steps") else "")),
    ]
    protos = [c.get("fid_protocol") for p in results["policies"] for c in p["cells"] if c.get("fid_protocol")]
    if protos:
        pr = protos[0]
        lines.append(("FID protocol", f"feature net {pr.get('feature_net')} (weights sha256 "
                                      f"{str(pr.get('weights_sha256'))[:12]}…), {pr.get('n_generated')} generated vs "
                                      f"{pr.get('n_reference')} reference images; comparable within this project only"))
    if results.get("wall_seconds") is not None:
        lines.append(("wall time", f"{results['wall_seconds'] / 60:.1f} min for this invocation (reused runs cost 0)"))
    return lines


# The notes under a report's table: (what they need, text). What they need: () for always, else column keys or
# TWO_STAGE_POLICY (the study has the two-stage policy), any one of which is enough.
TWO_STAGE_POLICY = "policy:two-stage"
NOTES: list[tuple[tuple[str, ...], str]] = [
    ((),
     "Values are mean ± std over seeds (sample std, ddof = 1; a single seed shows the value alone)."),
    ((),
     "Active units: latent j with Var_x(E_q[z_j]) > 0.01 on the evaluation split. KL: total KL(q(z|x) || p(z)) in nats."),
    ((),
     "MSE: per element, reconstruction from the posterior mean. -ELBO under each run's own σ² (ar-type policies: their "
     "rule's σ² fitted on the validation split, never on the evaluation split; ar-per-sample: n/a, a per-sample σ² "
     "defines no density); -ELBO, common σ²: every policy at the isotropic σ² fitted on the validation split (the same "
     "rule for all). bits/dim of the continuous density of pixels in [0, 1], so it goes negative for small σ² (lower "
     "is better). IS-NLL: importance-sampled at the run's σ² (ar-per-sample: the common σ²)."),
    (("smoothness_normalised", "mi_per_dim"),
     "Decoder smoothness, scale-free: ‖∂f/∂z_j‖ times the spread std(μ_j) of latent j's codes, unchanged when a "
     "latent is rescaled. Σ_j I(x; z_j): each latent's own mutual information with x (Gaussian form: exact for a "
     "Gaussian aggregate posterior, else an upper bound; unlike I(x; z), not capped at log N)."),
    ((),
     "final σ²: the policy's σ² on the validation set after the last epoch (fixed: the constant; per-element and "
     "per-sample policies: the mean)."),
    (("smoothness",),
     "Decoder smoothness: mean over examples and latent dimensions of ‖∂f/∂z_j‖ at the posterior mean."),
    (("fid_two_stage", "fid_reconstruction"),
     "FID (two-stage), when present: the two-stage sampler (a second VAE on the run's codes, stopped when its "
     "validation -ELBO stops falling) for every policy. FID (reconstructions): the test images' reconstructions "
     "f(μ(x)), the floor no sampler of that decoder is expected to beat. With several sample draws, results.json "
     "keeps the FID's sampling spread (fid_draws_std) beside the seeds' spread."),
    (("fid",),
     "FID: the policy's own sampler (the model's prior: N(0, I), or the learnable prior it was trained with; two-stage: "
     "its second VAE). FID (flow), when present: a masked autoregressive flow fitted to the training posterior means "
     "(early stopping on held-out codes), decoded. FID (GMM), when present: a "
     "Gaussian mixture (10 components, or the count of --gmm-grid with the best validation likelihood) fitted to the training posterior means, decoded; the "
     "gap between the two is the prior's mismatch with the aggregate posterior (prior holes), not the decoder."),
    ((TWO_STAGE_POLICY,),
     "two-stage: the learned-σ² run (same training run as 'learned') generating through a second VAE fitted to its "
     "latent codes (Dai & Wipf 2019; the second stage uses arelbo.samplers' defaults, an MLP VAE with the ar "
     "objective, for the number of steps given under evaluation, sampled exactly: its decoder noise included unless "
     "--two-stage-mean); its other columns are those of the learned run."),
]


def report_notes(results: dict) -> list[str]:
    """The notes that apply to this study's table: none about a column it lacks or a policy it did not run."""
    have = {c["key"] for c in results.get("columns", [])}
    if any(p.get("spec") == "two-stage" for p in results.get("policies", [])):
        have.add(TWO_STAGE_POLICY)
    return [text for need, text in NOTES if not need or have.intersection(need)]


def render_markdown(results: dict, figures: list[Figure], grids: list[dict], out: Path) -> str:
    def rel(p: Path) -> str:
        return os.path.relpath(p, out).replace(os.sep, "/")

    def esc(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    title = "Oversmoothing sweep" if results["kind"] == "sweep" else "Policy comparison"
    lines = [f"# {title}: {results['dataset']}", ""]
    lines += [f"- **{k}**: {('`' + v + '`') if k == 'command' else v}" for k, v in _intro(results)]
    header, rows, notes = table_rows(results)
    lines += ["", "## Results", "", "| " + " | ".join(esc(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    if notes:
        lines += [""] + [f"[{i + 1}] n/a: {esc(n)}" for i, n in enumerate(notes)]
    bad = failures(results)
    if bad:
        lines += ["", "Runs without results:", ""] + [f"- {esc(p)} seed {s}: {esc(e)}" for p, s, e in bad]
    lines += ["", *[f"- {n}" for n in report_notes(results)]]
    for _, title, pheader, prow in paired_tables(results):
        lines += ["", f"## {title}", "", "An interval that excludes zero is a difference beyond the spread of the "
                  "training seeds; otherwise the two are within the spread.", "",
                  "| " + " | ".join(esc(h) for h in pheader) + " |", "|" + " --- |" * len(pheader)]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in prow]
    cheader, crows = curve_rows(results)
    if crows:
        lines += ["", "## Against training steps", "", "Mean ± std over seeds at each kept snapshot and at the end.",
                  "", "| " + " | ".join(esc(h) for h in cheader) + " |", "|" + " --- |" * len(cheader)]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in crows]
    for f in figures:
        lines += ["", f"## {f.title}", "", f"![{f.title}]({rel(f.path)})", "", f.caption]
    if grids:
        lines += ["", "## Samples and reconstructions", "",
                  "Per policy (first seed): 64 samples from its own sampler | test images above their reconstructions.",
                  "", "| policy | samples | reconstructions |", "| --- | --- | --- |"]
        for g in grids:
            s = f"![samples]({rel(g['samples'])})" if g["samples"] else esc(g["note"] or "n/a")
            r = f"![reconstructions]({rel(g['reconstructions'])})" if g["reconstructions"] else "n/a"
            lines.append(f"| {esc(g['policy'])} (seed {g['seed']}) | {s} | {r} |")
    lines += ["", f"Per-run files: `{results['runs_dir']}/<policy>-s<seed>/` (config.yaml, metrics.jsonl, "
              "metrics.json, checkpoints/); all numbers: `results.json`.", ""]
    return "\n".join(lines)


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
dl.intro{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;font-size:.9em}
dl.intro dt{font-weight:600}dl.intro dd{margin:0}
code{background:#f4f4f4;padding:.1em .3em;border-radius:3px;font-size:.9em}
.tablewrap{overflow-x:auto}
table.results{border-collapse:collapse;font-size:.85em;white-space:nowrap}
table.results th,table.results td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
table.results th{background:#f0f0f0;white-space:normal;vertical-align:bottom}
table.results td:first-child,table.results th:first-child{text-align:left}
table.results tr:nth-child(even) td{background:#fafafa}
td.na{color:#999}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;max-width:900px}
table.grids td{vertical-align:top;padding:.4em;border-bottom:1px solid #eee}
table.grids img{image-rendering:pixelated;width:260px}
ul.notes{font-size:.85em;color:#444}
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_html(results: dict, figures: list[Figure], grids: list[dict]) -> str:
    e = html.escape
    title = ("Oversmoothing sweep" if results["kind"] == "sweep" else "Policy comparison") + f": {results['dataset']}"
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{e(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>", f"<h1>{e(title)}</h1>",
             '<dl class="intro">']
    for k, v in _intro(results):
        value = f"<code>{e(v)}</code>" if k == "command" else e(v)
        parts.append(f"<dt>{e(k)}</dt><dd>{value}</dd>")
    parts.append("</dl>")
    header, rows, notes = table_rows(results)
    parts += ['<h2 id="results">Results</h2>', '<div class="tablewrap">', '<table class="results">',
              "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead>", "<tbody>"]
    for row in rows:
        cells = []
        for c in row:
            cls = ' class="na"' if c.startswith("n/a") else ""
            cells.append(f"<td{cls}>{e(c)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts += ["</tbody>", "</table>", "</div>"]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>[{i + 1}] n/a: {e(n)}</li>" for i, n in enumerate(notes)) + "</ul>")
    bad = failures(results)
    if bad:
        parts.append("<p>Runs without results:</p><ul class=\"notes\">"
                     + "".join(f"<li>{e(p)} seed {s}: {e(err)}</li>" for p, s, err in bad) + "</ul>")
    parts.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in report_notes(results)) + "</ul>")
    cheader, crows = curve_rows(results)
    for key, heading, header_, rows_ in [*paired_tables(results), ("curve", "Against training steps", cheader, crows)]:
        if rows_:
            parts += [f'<h2 id="{key}">{e(heading)}</h2>', '<div class="tablewrap">', '<table class="results">',
                      "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header_) + "</tr></thead>", "<tbody>"]
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows_]
            parts += ["</tbody>", "</table>", "</div>"]
    for f in figures:
        parts += [f'<h2 id="{e(f.key)}">{e(f.title)}</h2>', "<figure>",
                  f'<img src="{_data_uri(f.path)}" alt="{e(f.title)}">', f"<figcaption>{e(f.caption)}</figcaption>",
                  "</figure>"]
    if grids:
        parts += ['<h2 id="samples">Samples and reconstructions</h2>',
                  "<p>Per policy (first seed): 64 samples from its own sampler, and test images above their "
                  "reconstructions f(μ(x)).</p>", '<table class="grids">',
                  "<thead><tr><th>policy</th><th>samples</th><th>reconstructions</th></tr></thead>", "<tbody>"]
        for g in grids:
            s = (f'<img src="{_data_uri(g["samples"])}" alt="samples: {e(g["policy"])}">' if g["samples"]
                 else e(g["note"] or "n/a"))
            r = (f'<img src="{_data_uri(g["reconstructions"])}" alt="reconstructions: {e(g["policy"])}">'
                 if g["reconstructions"] else "n/a")
            parts.append(f"<tr><td>{e(g['policy'])} (seed {g['seed']})</td><td>{s}</td><td>{r}</td></tr>")
        parts += ["</tbody>", "</table>"]
    parts += [f"<p class=\"notes\">Per-run files: <code>{e(results['runs_dir'])}/&lt;policy&gt;-s&lt;seed&gt;/</code>; "
              "all numbers: <code>results.json</code>.</p>", "</body>", "</html>", ""]
    return "\n".join(parts)


def write_report(results: dict, out) -> tuple[Path, Path]:
    """Figures into ``out/figures/``, then ``out/report.md`` and ``out/report.html``; returns both paths."""
    from arelbo.runs import atomic_write_text

    out = Path(out)
    figures, grids = make_figures(results, out)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, render_markdown(results, figures, grids, out))
    atomic_write_text(html_path, render_html(results, figures, grids))
    return md_path, html_path


# --------------------------------------------------------------------------------------------------------------
# The linear picture (arelbo linear --plot)


def linear_active_units_curve(eigenvalues: Sequence[float], latent_dim: int, n: int = 1000, seed: int = 0,
                              sigma2_grid: Sequence[float] | None = None, steps: int = 50) -> dict:
    """Active units against fixed sigma2 for linear VAEs on N(0, diag-rotated spectrum) data: theory (counting
    sample eigenvalues l_j with Var(mu_j) = 1 - sigma2 / l_j > 0.01) and exact fits (:func:`fit_linear_vae`,
    exact=True) on a log grid, plus AR-ELBO's sigma2 and active units against the pPCA noise value."""
    import numpy as np

    from arelbo import linear as L

    eigs = np.asarray(eigenvalues, dtype=np.float64)
    x = L.gaussian_data(eigs, n, seed)
    lam = L.eigenvalues_of(L.second_moment(x))
    if sigma2_grid is None:
        lo, hi = math.log10(lam[min(latent_dim, lam.size) - 1] / 4), math.log10(lam[0] * 3)
        sigma2_grid = np.logspace(lo, hi, 17)
    grid = np.asarray(sorted(float(s) for s in sigma2_grid))
    trained = []
    for s2 in grid:
        fit = L.fit_linear_vae(x, latent_dim, "fixed", policy_kwargs={"sigma2": float(s2)}, steps=steps, seed=seed)
        trained.append(L.summarize_linear_vae(fit.model, x).num_active)
    fine = np.logspace(math.log10(grid[0]), math.log10(grid[-1]), 600)
    ar = L.fit_linear_vae(x, latent_dim, "ar", steps=steps, seed=seed)
    return {
        "eigenvalues": lam.tolist(),
        "latent_dim": int(latent_dim),
        "sigma2": grid.tolist(),
        "trained_active": [int(a) for a in trained],
        "theory_sigma2": fine.tolist(),
        "theory_active": L.active_units_threshold_sweep(lam, fine, latent_dim, threshold=L.ACTIVE_THRESHOLD).tolist(),
        "ar_sigma2": float(ar.output.sigma2.item()),
        "ar_active": int(L.summarize_linear_vae(ar.model, x).num_active),
        "ppca_sigma2": float(L.ppca_sigma2(lam, latent_dim)),
    }


def plot_linear_active_units(curve: dict, path) -> Path:
    """The linear picture: theory as a step function with steps at the eigenvalues, trained fixed-sigma2 fits as
    points, AR-ELBO's sigma2 (star, at its active units) beside the pPCA value (dashed line)."""
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    ax.step(curve["theory_sigma2"], curve["theory_active"], where="post", color="#333333", lw=1.6,
            label="theory: #{l_j : 1 - σ²/l_j > 0.01}")
    ax.plot(curve["sigma2"], curve["trained_active"], "o", color=PALETTE[0], ms=6, mfc="none", mew=1.5,
            label="trained linear VAEs (fixed σ²)")
    for j, lam in enumerate(curve["eigenvalues"][: curve["latent_dim"]]):
        ax.axvline(lam, color="#999999", lw=0.8, ls=":", label="eigenvalues l_j (j ≤ q)" if j == 0 else None)
    ax.axvline(curve["ppca_sigma2"], color=PALETTE[2], ls="--", lw=1.4, label=f"pPCA σ² = {curve['ppca_sigma2']:.4g}")
    ax.plot([curve["ar_sigma2"]], [curve["ar_active"]], "*", color=PALETTE[3], ms=16,
            label=f"AR-ELBO: σ² = {curve['ar_sigma2']:.4g}, {curve['ar_active']} active")
    ax.set_xscale("log")
    ax.set_xlabel("decoder variance σ²")
    ax.set_ylabel("active units")
    ax.set_yticks(range(curve["latent_dim"] + 1))
    ax.set_title(f"linear VAE, q = {curve['latent_dim']}: collapse as σ² grows past each eigenvalue")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, Path(path))
