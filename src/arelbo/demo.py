"""``arelbo demo``: AR-ELBO against the classic sigma^2 = 1 on MNIST, in a few minutes on a laptop CPU.

Trains the ``mnist-conv`` model twice on the same data, seed and step budget, once with the ``ar`` policy and once
with fixed sigma^2 = 1, then writes into the output folder:

    ar/, fixed-sigma2-1/   the two run directories (config.yaml, metrics.jsonl, checkpoints/, samples.png);
                           ar/samplers/gmm.pt: the Gaussian-mixture sampler fitted to AR-ELBO's training codes
    samples.png            labelled side by side: AR-ELBO's prior samples, AR-ELBO's samples through its GMM
                           sampler (the way to generate with it), sigma^2 = 1's prior samples
    summary.md             per policy: MSE, KL, active units, final sigma^2, -ELBO (nats, bits/dim)

With sigma^2 = 1 on images in [0, 1] the KL term dominates and almost every latent unit is switched off
(posterior collapse); AR-ELBO's sigma^2 follows the reconstruction error down and keeps the units active.
"""

from __future__ import annotations

import time
from pathlib import Path

PRESET = "mnist-conv"
# The demo's training budget (both runs share it): 4 x 300 steps of batch 64 at Adam lr 3e-3. Measured on a
# 2-core CPU: AR-ELBO is at MSE ~0.011 with all 16 units strongly active (Cov_x(mu_j) > 1) after 600 steps
# whatever the lr; with sigma^2 = 1 the units the data do not support decay only slowly towards the 0.01
# threshold (after 600 steps at lr 1e-3 they are still at 0.02-0.1, so both runs would count 16 "active"
# units), and lr 3e-3 makes them decay about three times faster, so the step budget shows the collapse.
DEMO_BATCH = 64
DEMO_STEPS_PER_EPOCH = 300
DEMO_EPOCHS = 4
DEMO_LR = 3e-3
# AR-ELBO's generation sampler: a 10-component GMM (the samplers' default) on the posterior means of the first
# 10000 training images (encoding them and the EM fit: 3.4 s measured on a busy 2-core CPU).
DEMO_GMM_COMPONENTS = 10
DEMO_GMM_CODES = 10000
RUNS = (
    ("ar", "AR-ELBO (ar)", ["objective.policy=ar"]),
    ("fixed-sigma2-1", "fixed sigma^2 = 1", ["objective.policy=fixed", "objective.options.sigma2=1.0"]),
)


def demo_configs(epochs=DEMO_EPOCHS, steps_per_epoch=DEMO_STEPS_PER_EPOCH, batch_size=DEMO_BATCH, seed=0,
                 data_root=None, overrides=(), lr=DEMO_LR):
    """The two RunConfigs of the demo: (folder name, label, config) for ar and for fixed sigma^2 = 1."""
    from arelbo.config import load_config

    common = [
        f"train.epochs={epochs}",
        f"data.batch_size={batch_size}",
        f"train.lr={lr!r}",
        f"train.seed={seed}",
        "train.log_every_n_steps=25",
        *([f"train.limit_train_batches={steps_per_epoch}"] if steps_per_epoch else []),
        *([f"data.root={data_root}"] if data_root else []),
    ]
    return [(folder, label, load_config(PRESET, overrides=[*common, *extra, *overrides])) for folder, label, extra in RUNS]


def _final_val(run_dir: Path) -> dict:
    from arelbo.runs import read_jsonl

    val = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "val"]
    if not val:
        raise RuntimeError(f"{run_dir} has no validation record")
    return val[-1]


def summary_markdown(rows, command: str, wall_s: float) -> str:
    from arelbo.runs import read_config

    m = read_config(rows[0]["run_dir"]).model
    q, net = m.latent_dim, f"{m.arch} {'-'.join(map(str, m.hidden))}, norm {m.norm}"
    lines = [
        "# arelbo demo: AR-ELBO vs fixed sigma^2 = 1 on MNIST",
        "",
        f"Model `{PRESET}` ({net}, {q} latent units); both runs share data order, seed, steps",
        "and optimiser settings.",
        "Metrics on the 5000-image validation split after the last epoch; -ELBO uses the policy's sigma^2",
        "(for `ar`: sigma^2 estimated on the validation set, i.e. its MSE). -ELBO and bits/dim are those of the",
        "continuous density of pixels scaled to [0, 1], so they go negative once sigma^2 is small (lower is better).",
        "",
        "| policy | MSE | KL (nats) | active units | final sigma^2 | -ELBO (nats) | bits/dim | steps | train time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        v = r["val"]
        lines.append(
            f"| {r['label']} | {v['mse']:.4f} | {v['kl']:.2f} | {v['active_units']} / {len(v['kl_per_dim'])} | "
            f"{v['sigma2']:.4g} | {v['neg_elbo']:.1f} | {v['bits_per_dim']:.4f} | {v['step']} | {r['seconds']:.0f} s |"
        )
    lines += ["", f"Cov_x(mu_j) of the {q} latent units, largest first (active: > 0.01):", ""]
    for r in rows:
        cov = sorted(r["val"]["var_mu"], reverse=True)
        lines.append(f"- {r['label']}: " + ", ".join(f"{c:.2g}" for c in cov))
    ar, fixed = rows[0]["val"], rows[1]["val"]
    verdict = "more" if ar["active_units"] > fixed["active_units"] else "NOT more"
    gmm = rows[0].get("gmm") or {}
    lines += [
        "",
        f"AR-ELBO keeps {ar['active_units']} latent units active against {fixed['active_units']} with sigma^2 = 1 "
        f"({verdict} active units), with sigma^2 = {ar['sigma2']:.4g} found by the model instead of fixed at 1.",
        "",
        "Samples (`samples.png`, decoder means): left, AR-ELBO with z ~ N(0, I); middle, AR-ELBO with z from a "
        f"{gmm.get('n_components', DEMO_GMM_COMPONENTS)}-component Gaussian mixture fitted to the posterior means "
        f"of {gmm.get('num_codes', DEMO_GMM_CODES)} training images (`ar/samplers/gmm.pt`, fitted in "
        f"{gmm.get('seconds', 0):.0f} s; `arelbo sample {rows[0]['run_dir']} --sampler gmm --checkpoint last` draws "
        "more); right, sigma^2 = 1 with z ~ N(0, I). With a small sigma^2 the codes AR-ELBO uses need not fill "
        "N(0, I): the mixture samples where the codes are, so it is the sampler to generate with.",
        "",
        "Active unit: Cov_x(E_q[z_j]) > 0.01 over the validation set. The run folders hold each model's config, "
        "metrics.jsonl and checkpoints.",
        "",
        f"Command: `{command}` (total wall time {wall_s:.0f} s).",
        "",
    ]
    return "\n".join(lines)


# Written into the demo's folder before it trains: what lets --overwrite replace that folder's demo files, and only
# in a folder the demo wrote (a samples.png or summary.md of the user's own is never replaced).
DEMO_MARKER = ".arelbo-demo.json"
SUMMARY_TITLE = "# arelbo demo:"


def check_demo_dir(out: Path) -> None:
    """``--out`` must be a folder, or a path where one can be made: said before anything is loaded or trained."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder: choose another --out")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
            break


def written_by_demo(out: Path) -> bool:
    """Whether ``out`` is a folder the demo wrote: its marker, or (demos written before the marker) its summary.md
    opening with the demo's title."""
    import json

    out = Path(out)
    try:
        marker = json.loads((out / DEMO_MARKER).read_text(encoding="utf-8"))
        if isinstance(marker, dict) and str(marker.get("written_by", "")).startswith("arelbo demo"):
            return True
    except (OSError, ValueError):
        pass
    try:
        with open(out / "summary.md", encoding="utf-8") as f:
            return f.readline().startswith(SUMMARY_TITLE)
    except (OSError, UnicodeDecodeError):
        return False


def _write_marker(out: Path, command: str) -> None:
    import json
    from datetime import datetime

    from arelbo import __version__
    from arelbo.fileio import atomic_write_text

    marker = {"written_by": f"arelbo demo ({__version__})", "command": command,
              "started": datetime.now().isoformat(timespec="seconds")}
    atomic_write_text(out / DEMO_MARKER, json.dumps(marker, indent=2) + "\n")


def run_demo(out="runs/demo", epochs=DEMO_EPOCHS, steps_per_epoch=DEMO_STEPS_PER_EPOCH, batch_size=DEMO_BATCH,
             seed=0, data_root=None, overrides=(), overwrite=False, progress=True, command="arelbo demo", splits=None,
             lr=DEMO_LR):
    """Train both models, write samples.png and summary.md into ``out``; returns the summary rows."""
    import shutil

    from arelbo.data import load_dataset
    from arelbo.imagegrid import stack_labelled
    from arelbo.fileio import atomic_write_text
    from arelbo.grids import sample_grid
    from arelbo.train import fit

    t_start = time.perf_counter()
    out = Path(out)
    check_demo_dir(out)
    configs = demo_configs(epochs, steps_per_epoch, batch_size, seed, data_root, overrides, lr)
    owned = [out / folder for folder, _, _ in configs] + [out / "samples.png", out / "summary.md"]
    present = [p for p in owned if p.exists() or p.is_symlink()]
    if present:
        if not written_by_demo(out):
            names = ", ".join(p.name for p in present)
            raise FileExistsError(f"{out} holds {names}, which arelbo demo did not write there (no {DEMO_MARKER}): "
                                  f"not replaced{' even with --overwrite' if overwrite else ''}; choose another --out")
        if not overwrite:
            raise FileExistsError(f"{out} already holds a demo; pass --overwrite to replace it or choose another --out")
        for p in present:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_marker(out, command)
    if splits is None:
        splits = load_dataset("mnist", data_root)
    rows = []
    for folder, label, cfg in configs:
        print(f"== training {label} -> {out / folder}", flush=True)
        t0 = time.perf_counter()
        run_dir = fit(cfg, out / folder, splits=splits, progress=progress)
        rows.append({"folder": folder, "label": label, "run_dir": run_dir, "seconds": time.perf_counter() - t0,
                     "val": _final_val(run_dir)})
    rows[0]["gmm"] = fit_demo_gmm(rows[0]["run_dir"], splits, seed)
    grids = [sample_grid(r["run_dir"], n=64, seed=seed, nrow=8, checkpoint="last") for r in rows]
    labels = [f"{r['label']}: sigma^2={r['val']['sigma2']:.3g}, AU {r['val']['active_units']}, prior" for r in rows]
    grids.insert(1, sample_grid(rows[0]["run_dir"], n=64, seed=seed, nrow=8, checkpoint="last", sampler="gmm"))
    labels.insert(1, f"{rows[0]['label']}: GMM sampler ({rows[0]['gmm']['n_components']} components)")
    from arelbo.imagegrid import save_png

    save_png(stack_labelled(grids, labels, horizontal=True, scale=2), out / "samples.png")
    wall = time.perf_counter() - t_start
    text = summary_markdown(rows, command, wall)
    atomic_write_text(out / "summary.md", text)
    print()
    print(text)
    print(f"wrote {out / 'summary.md'} and {out / 'samples.png'}")
    return rows


def fit_demo_gmm(run_dir: Path, splits, seed: int = 0) -> dict:
    """Fit AR-ELBO's GMM sampler on its first DEMO_GMM_CODES training codes and save it where ``arelbo eval``
    would (``samplers/gmm.pt``, keyed to checkpoints/last.pt), so ``arelbo sample --sampler gmm`` finds it."""
    from arelbo.data import make_loader
    from arelbo.evaluate import sampler_file
    from arelbo.metrics.features import sha256_file
    from arelbo.runs import checkpoint_path, load_model
    from arelbo.samplers import make_sampler, save_sampler

    t0 = time.perf_counter()
    model, _, _ = load_model(run_dir, "last")
    train = splits.train[:DEMO_GMM_CODES]
    gmm = make_sampler("gmm", n_components=min(DEMO_GMM_COMPONENTS, int(train.shape[0])), seed=seed)
    gmm.fit(model, make_loader(train, 500, shuffle=False))
    seconds = time.perf_counter() - t0
    ckpt = checkpoint_path(run_dir, "last")
    key = {"checkpoint": ckpt.name, "checkpoint_sha256": sha256_file(ckpt), "options": gmm.config(),
           "fit_split": "train", "fit_examples": int(train.shape[0])}
    save_sampler(gmm, sampler_file(run_dir, "gmm", "last"), extra={"key": key, "fit_seconds": round(seconds, 3)})
    return {"n_components": gmm.n_components, "num_codes": int(train.shape[0]), "seconds": seconds}
