"""The report's numbers: cells (mean ± std), the results table, paired differences, the curve rows."""

from __future__ import annotations

import math

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


def group_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of each hierarchical policy's latent groups: units, active units and KL (mean ± std over
    seeds), and in how many seeds the group collapsed (no active unit); rows = [] when no policy has several."""
    header = ["policy", "group", "units", "active units", "KL (nats)", "collapsed in"]
    rows = []
    for p in results["policies"]:
        groups = p.get("groups") or []
        if len(groups) < 2:
            continue
        for g in groups:
            rows.append([p["label"], g["name"], str(g["units"]), format_cell(g["active_units"], 3),
                         format_cell(g["kl"], 3), f"{g['collapsed_seeds']} of {g['n']} seeds"])
    return header, rows


def failures(results: dict) -> list[tuple[str, int, str]]:
    return [(p["label"], c["seed"], c.get("error") or c["status"]) for p in results["policies"] for c in p["cells"]
            if c["status"] != "done"]

