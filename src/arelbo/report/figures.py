"""The report's figures (matplotlib object API, Agg canvas: no pyplot state, no display) and image grids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
# Figures


def _figure(width: float, height: float):
    from matplotlib.figure import Figure as MplFigure

    return MplFigure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    import io

    from arelbo.fileio import atomic_write_bytes

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
                    lw=1.4, ls="--" if p.get("sigma2_kind") == "given" else "-", label=label if j == 0 else None)
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
    if q > 256:  # a hierarchy's thousands of units: its KL per group is in the latent groups figure and table
        return None
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


def plot_group_kl(results: dict, path: Path) -> Figure | None:
    """KL per latent group, one bar per policy (mean ± std over seeds): for studies of a hierarchical model."""
    import numpy as np

    rows = [(label, p["groups"]) for label, p in _training_groups(results) if len(p.get("groups") or []) > 1]
    if not rows:
        return None
    names = [g["name"] for g in rows[0][1]]
    fig = _figure(max(6.0, 1.2 * len(names) + 2), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    for i, (label, groups) in enumerate(rows):
        by_name = {g["name"]: g for g in groups}
        means = [(by_name.get(n) or {}).get("kl", {}).get("mean") for n in names]
        stds = [(by_name.get(n) or {}).get("kl", {}).get("std") or 0.0 for n in names]
        xs = np.arange(len(names)) + (i - (len(rows) - 1) / 2) * width
        ax.bar(xs, [np.nan if m is None else m for m in means], width, yerr=stds, capsize=2, label=label,
               color=PALETTE[i % len(PALETTE)])
    units = {g["name"]: g["units"] for g in rows[0][1]}
    ax.set_xticks(range(len(names)), [f"{n}\n({units[n]} units)" for n in names], fontsize=8)
    ax.set_ylabel("KL (nats per example)")
    ax.set_title("KL per latent group (top first; mean ± std over seeds)")
    ax.grid(True, axis="y", alpha=0.25)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)
    return Figure("group_kl", "KL per latent group", path,
                  "Each policy's KL in every latent group of the hierarchy (evaluation split), top group first; a "
                  "group with KL ≈ 0 and no active unit has collapsed to its prior.")


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
        plot_group_kl(results, figdir / "kl_per_group.png"),
        plot_curves(results, figdir / "curves.png"),
    ]
    return [f for f in figs if f is not None], _image_grids(results, Path(out), figdir)

