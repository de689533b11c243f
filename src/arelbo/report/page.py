"""report.md and the self-contained report.html: the study's text, table, notes and figures, from results alone."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from arelbo.report.figures import Figure, make_figures
from arelbo.report.tables import curve_rows, failures, group_rows, paired_tables, table_rows

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


GROUPS_TEXT = ("Per latent group of the hierarchy (top first): active units (Var_x(μ_j) > 0.01, each group at its "
               "posterior mean given the groups above at theirs) and KL (nats per example), mean ± std over seeds; a "
               "group collapsed when none of its units is active.")


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
    gheader, grows = group_rows(results)
    if grows:
        lines += ["", "## Latent groups", "", GROUPS_TEXT, "",
                  "| " + " | ".join(esc(h) for h in gheader) + " |", "|" + " --- |" * len(gheader)]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in grows]
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
    gheader, grows = group_rows(results)
    if grows:
        parts.append(f"<p>{e(GROUPS_TEXT)}</p>")
    cheader, crows = curve_rows(results)
    for key, heading, header_, rows_ in [("groups", "Latent groups", gheader, grows), *paired_tables(results),
                                         ("curve", "Against training steps", cheader, crows)]:
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
    from arelbo.fileio import atomic_write_text

    out = Path(out)
    figures, grids = make_figures(results, out)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, render_markdown(results, figures, grids, out))
    atomic_write_text(html_path, render_html(results, figures, grids))
    return md_path, html_path


