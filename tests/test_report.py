"""Study reports: a tiny image study (28x28 npz, FID with the MNIST feature net) end to end through the CLI, the
self-contained HTML (parsed: balanced tags, every image a data: URI, nothing external, text escaped), CelebA
through the same commands (generated JPEGs and the 32 real sample images, no FID), the linear picture, and the page
in headless Chromium: its tables, decoded images and no JS errors (slow; skipped without chromium, failed under CI)."""

import base64
import copy
import html
import json
import math
import os
import re
import shlex
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lightning")
pytest.importorskip("matplotlib")

from arelbo.cli import main  # noqa: E402
from arelbo.report import format_cell, paired_tables, render_html, table_rows  # noqa: E402
from conftest import shared_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def _sets(*items):
    return [a for item in items for a in ("--set", item)]


QUICK_EVAL = ["--is-examples", "8", "--k", "4", "--two-stage-steps", "20", "--eval-examples", "0", "--quiet"]


@pytest.fixture(scope="module")
def image_study(tmp_path_factory):
    """fixed:1, fixed:0.01, ar and two-stage (sharing learned's run) x seeds 0, 1 on 28x28 uint8 images."""
    tmp = tmp_path_factory.mktemp("image-study")
    mp = pytest.MonkeyPatch()
    mp.setenv("ARELBO_CACHE_DIR", str(tmp / "cache"))  # FID reference features: not into the home folder
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    blobs = [np.exp(-((xx - rng.uniform(6, 22)) ** 2 + (yy - rng.uniform(6, 22)) ** 2) / rng.uniform(8, 30))
             for _ in range(150)]
    images = (np.stack(blobs) * 255).astype(np.uint8)
    np.savez(tmp / "blobs.npz", train=images[:100], val=images[100:120], test=images[120:])
    out = tmp / "study"
    argv = ["compare", "--preset", "mnist-conv", "--policies", "fixed:1,fixed:0.01,ar,two-stage", "--seeds", "0,1",
            "--out", str(out), "--epochs", "1", "--steps-per-epoch", "3", "--eval-samples", "24",
            *_sets("data.name=npz", f"data.root={tmp / 'blobs.npz'}", "data.batch_size=16", "data.eval_batch_size=20",
                   "model.hidden=[8,16]", "model.latent_dim=4", "train.log_every_n_steps=1"),
            "--set", "train.n_samples=0", *QUICK_EVAL]
    try:
        assert main(argv) == 0
        yield out
    finally:
        mp.undo()


class Checker(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.imgs, self.refs, self.text = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("href", "src", "action", "data"):
            if key in a and tag != "img":
                self.refs.append((tag, key, a[key]))
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.errors.append(f"<{tag}> not allowed in a self-contained report")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def check_html(text: str) -> Checker:
    c = Checker()
    c.feed(text)
    c.close()
    assert not c.errors, c.errors
    assert not c.stack, f"unclosed tags: {c.stack}"
    assert text.startswith("<!DOCTYPE html>")
    for src in c.imgs:
        assert src.startswith("data:image/png;base64,"), src[:80]
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    for tag, key, value in c.refs:
        assert value.startswith("#"), f"external reference <{tag} {key}={value!r}>"
    assert "url(" not in text and "@import" not in text  # no CSS-loaded assets either
    return c


def test_image_study_writes_results_figures_and_reports(image_study):
    out = image_study
    for name in ("study.json", "results.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    by = {p["spec"]: p for p in res["policies"]}
    assert list(by) == ["fixed:1", "fixed:0.01", "ar", "two-stage"]
    assert sorted(p.name for p in (out / "runs").iterdir() if p.is_dir()) == [
        "ar-s0", "ar-s1", "fixed-0.01-s0", "fixed-0.01-s1", "fixed-1-s0", "fixed-1-s1", "learned-s0", "learned-s1"]
    for p in by.values():
        assert p["n_done"] == 2
        fid = p["aggregate"]["fid"]
        assert fid["n"] == 2 and fid["mean"] > 0 and fid["std"] is not None and math.isfinite(fid["std"])
        assert p["cells"][0]["fid_protocol"]["feature_net"] == "mnist-features"
    assert by["two-stage"]["cells"][0]["run"] == "learned-s0"
    assert by["two-stage"]["aggregate"]["fid"] != by["fixed:1"]["aggregate"]["fid"]
    assert res["sweep"]["sigma2"] == [0.01, 1.0] and res["sweep"]["references"][0]["spec"] == "ar"
    # the reconstruction floor is paired like the samplers' FIDs: AR-ELBO minus the other policy, seed by seed
    rec = next(r for r in res["paired"]["rows"] if r["policy"] == "fixed:1" and r["key"] == "fid_reconstruction")
    assert rec["differences"] == pytest.approx([a["values"]["fid_reconstruction"] - b["values"]["fid_reconstruction"]
                                                for a, b in zip(by["ar"]["cells"], by["fixed:1"]["cells"])], rel=1e-12)
    assert rec["n"] == 2 and rec["lower_is_better"] is True
    figs = out / "figures"
    for name in ("fid.png", "sweep.png", "sigma2.png", "kl_per_dim.png", "samples-two-stage.png",
                 "reconstructions-ar.png"):
        assert (figs / name).read_bytes().startswith(PNG_MAGIC), name
    md = (out / "report.md").read_text()
    assert "| policy | seeds | FID |" in md and "| AR-ELBO |" in md and "![Oversmoothing sweep](figures/sweep.png)" in md
    # notes for what this study has: FID columns and the two-stage policy
    assert "- FID: the policy's own sampler" in md and "- two-stage: the learned-σ² run" in md
    for link in (line.split("](", 1)[1].split(")", 1)[0] for line in md.splitlines() if "](" in line):
        assert (out / link).is_file(), link
    study = json.loads((out / "study.json").read_text())
    assert study["status"] == "complete" and study["command"].startswith("arelbo compare --preset mnist-conv")
    assert study["base_config"]["model"]["hidden"] == [8, 16]


def test_report_html_is_self_contained_and_valid(image_study):
    text = (image_study / "report.html").read_text()
    c = check_html(text)
    # 4 figures + samples and reconstructions for 4 policies
    assert len(c.imgs) == 4 + 2 * 4
    body = " ".join(c.text)
    assert "AR-ELBO" in body and "two-stage VAE [two-stage sampler]" in body
    assert len(text) < 3_000_000


def test_report_only_rebuilds_and_rerun_reuses(image_study, capsys):
    """--report-only writes the report from the runs there; a rerun of the study changes no run file."""
    out = image_study
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    res = json.loads((out / "results.json").read_text())
    argv = shlex.split(json.loads((out / "study.json").read_text())["command"])[1:]
    assert main([*argv, "--report-only"]) == 0
    assert json.loads((out / "results.json").read_text())["policies"] == res["policies"]
    assert main(argv) == 0
    assert "reuse" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    assert after == before


def test_html_escapes_all_text(image_study):
    res = json.loads((image_study / "results.json").read_text())
    res["command"] = "arelbo compare --set x='<script>alert(1)</script>' & \"more\""
    res["policies"][0]["label"] = "<b>bold</b>"
    text = render_html(res, [], [])
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>bold</b>" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text
    check_html(text)


def test_format_cell():
    assert format_cell({"mean": 12.3456, "std": 0.71, "n": 3, "values": [1, 2, 3]}) == "12.35 ± 0.71"
    assert format_cell({"mean": 4.0, "std": None, "n": 1, "values": [4]}) == "4"
    assert format_cell({"mean": -1234.56, "std": 10.0, "n": 2, "values": [1, 2]}) == "-1235 ± 10"
    assert format_cell({"mean": 2e-5, "std": None, "n": 1, "values": [1]}) == "2.000e-05"
    assert format_cell({"mean": 3.0, "std": None, "n": 1, "values": [3, None]}) == "3 (n=1)"
    assert format_cell({"mean": None, "std": None, "n": 0, "values": []}) == "n/a"


# ---------------------------------------------------------------------------------------------- CelebA


def _generated_celeba(root: Path, n: int = 12) -> Path:
    from PIL import Image

    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:218, :178]
    for i in range(n):
        face = np.exp(-((xx - 89) ** 2 / 2500 + (yy - 110) ** 2 / 4000))[..., None] * rng.uniform(80, 255, 3)
        img = np.clip(face + rng.normal(0, 20, (218, 178, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "img_align_celeba" / f"{i + 1:06d}.jpg", quality=90)
    return root


def test_sweep_figure_has_a_panel_only_for_metrics_the_study_computed(image_study, tmp_path):
    """A study run with --no-fid has no FID values: its sweep figure gets no empty FID panel."""
    from arelbo.report import plot_sweep
    from arelbo.report.figures import _panels_with_values

    res = json.loads((image_study / "results.json").read_text())
    panels = [("FID", [("fid", "-", ""), ("fid_gmm", ":", "")]), ("active units", [("active_units", "-", "")])]
    assert [t for t, _ in _panels_with_values(res["sweep"], panels)] == ["FID", "active units"]
    no_fid = copy.deepcopy(res)
    for holder in [no_fid["sweep"]["curves"], *no_fid["sweep"]["references"]]:
        for key in ("fid", "fid_gmm"):
            aggs = holder.get(key)
            for agg in (aggs if isinstance(aggs, list) else [aggs] if aggs else []):
                agg["mean"] = None
    assert [t for t, _ in _panels_with_values(no_fid["sweep"], panels)] == ["active units"]
    one_curve = copy.deepcopy(res)  # GMM sampler not evaluated: the FID panel keeps the prior sampler's curve only
    one_curve["sweep"]["curves"].pop("fid_gmm", None)
    for ref in one_curve["sweep"]["references"]:
        ref.pop("fid_gmm", None)
    assert [[c[0] for c in cs] for _, cs in _panels_with_values(one_curve["sweep"], panels)] == [["fid"], ["active_units"]]
    fig = plot_sweep(no_fid, tmp_path / "sweep.png")
    assert fig is not None and (tmp_path / "sweep.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("source", ["generated", "real-sample"])
def test_celeba_preset_through_compare_without_fid(tmp_path, source):
    """celeba64-conv on a user's CelebA folder: plan -> train -> eval (--no-fid) -> report, the FID column n/a
    with its reason. The real sample folder is read-only: the decoded-image cache goes under tmp_path."""
    if source == "generated":
        root = _generated_celeba(tmp_path / "celeba")
    else:
        root = shared_data("celeba-sample")
    out = tmp_path / "study"
    argv = ["compare", "--preset", "celeba64-conv", "--policies", "fixed:1,ar", "--out", str(out), "--epochs", "1",
            "--steps-per-epoch", "2", "--no-fid",
            *_sets(f"data.root={root}", f"data.options={{crop: 140, size: 16, cache_dir: {tmp_path / 'cache'}}}",
                   "data.batch_size=4", "data.eval_batch_size=8", "model.hidden=[8,16]", "model.latent_dim=4",
                   "train.log_every_n_steps=1", "train.n_samples=16"),
            *QUICK_EVAL]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "celeba"
    for p in res["policies"]:
        assert p["n_done"] == 1 and p["aggregate"]["fid"]["mean"] is None
        assert p["unavailable"]["fid"] == "disabled (--no-fid)"
        assert p["aggregate"]["active_units"]["mean"] is not None
    header, rows, notes = table_rows(res)
    assert rows[0][header.index("FID")] == "n/a [1]" and notes == ["disabled (--no-fid)"]
    html_text = (out / "report.html").read_text()
    check_html(html_text)
    assert "n/a [1]" in html_text and "disabled (--no-fid)" in html_text
    assert (out / "figures" / "samples-ar.png").is_file() and not (out / "figures" / "fid.png").exists()
    assert (out / "runs" / "ar-s0" / "samples.png").is_file()
    if source == "real-sample":
        assert any((tmp_path / "cache").iterdir())  # the cache went where we said, not into the read-only folder


# ---------------------------------------------------------------------------------------------- linear picture


def test_linear_plot_theory_matches_trained(tmp_path):
    from arelbo.linear import ppca_sigma2
    from arelbo.report import linear_active_units_curve, plot_linear_active_units

    eigs = [5.0, 3.0, 1.5, 0.8, 0.5, 0.3, 0.2, 0.1]
    curve = linear_active_units_curve(eigs, 4, n=1000, seed=0, sigma2_grid=[0.3, 0.7, 1.2, 2.5, 4.0, 8.0], steps=20)
    lam = np.asarray(curve["eigenvalues"])
    theory = [int(np.sum(lam[:4] * 0.99 > s)) for s in curve["sigma2"]]
    assert curve["trained_active"] == theory == [4, 4, 3, 2, 1, 0]
    assert curve["ar_sigma2"] == pytest.approx(curve["ppca_sigma2"], rel=1e-6)
    assert curve["ppca_sigma2"] == pytest.approx(ppca_sigma2(lam, 4)) and curve["ar_active"] == 4
    path = plot_linear_active_units(curve, tmp_path / "linear.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_linear_cli_plot(tmp_path, capsys):
    path = tmp_path / "lin.png"
    assert main(["linear", "--eigenvalues", "4,2,1,0.5,0.25", "--latent-dim", "2", "--n", "200", "--steps", "10",
                 "--fixed-sigma2", "1", "--fa-factors", "1", "--mc-steps", "0", "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert path.read_bytes().startswith(PNG_MAGIC) and f"wrote {path}" in out and "vs pPCA" in out


# ---------------------------------------------------------------------------------------------- headless browser

BROWSER_CHECK_ID = "arelbo-browser-check"
# Injected first into a copy of the page: records uncaught errors, failed resources, unhandled rejections and
# console.error from the start, and once the page has loaded writes what a reader sees (the tables' rendered text and
# boxes, every image's state and decoded pixels) as JSON into <pre id=BROWSER_CHECK_ID>.
BROWSER_CHECK_JS = """(function () {
  var errors = [], map = function (xs, f) { return Array.prototype.map.call(xs, f); };
  var str = function (x) { try { return String((x && x.stack) || x); } catch (e) { return "?"; } };
  window.addEventListener("error", function (ev) {
    var t = ev.target;
    if (t && t !== window && t.tagName) {
      errors.push("resource failed to load: <" + t.tagName.toLowerCase() + " " + String(t.src || t.href || "").slice(0, 60) + ">");
    } else {
      errors.push("uncaught error: " + (ev.message || str(ev.error)));
    }
  }, true);
  window.addEventListener("unhandledrejection", function (ev) { errors.push("unhandled rejection: " + str(ev.reason)); });
  var consoleError = console.error;
  console.error = function () {
    errors.push("console.error: " + map(arguments, str).join(" "));
    return consoleError.apply(console, arguments);
  };
  var box = function (el) { var r = el.getBoundingClientRect(); return [r.width, r.height]; };
  var cells = function (row) { return map(row.cells, function (c) { return c.innerText; }); };
  // Each image drawn into a canvas of its natural size and read back: a synchronous, complete decode (the async
  // img.decode() would settle after --dump-dom has already dumped the page). painted: the share of pixels with alpha.
  var painted = function (img) {
    if (!img.complete || !img.naturalWidth || !img.naturalHeight) { return 0; }
    try {
      var c = document.createElement("canvas"), g = c.getContext("2d");
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      g.drawImage(img, 0, 0);
      var px = g.getImageData(0, 0, c.width, c.height).data, n = 0;
      for (var i = 3; i < px.length; i += 4) { if (px[i] > 0) { n += 1; } }
      return n / (px.length / 4);
    } catch (e) { errors.push("drawing <img alt=" + img.alt + "> failed: " + str(e)); return 0; }
  };
  window.addEventListener("load", function () {
    var result = {
      title: document.title, errors: errors,
      h1: map(document.querySelectorAll("h1"), function (h) { return h.innerText; }),
      tables: map(document.querySelectorAll("table"), function (t) {
        var el = t.parentElement.classList.contains("tablewrap") ? t.parentElement : t;
        while (el && el.tagName !== "H2") { el = el.previousElementSibling; }
        return {cls: t.className, heading: el ? el.id : null, box: box(t),
                header: t.tHead && t.tHead.rows.length ? cells(t.tHead.rows[0]) : [],
                rows: t.tBodies.length ? map(t.tBodies[0].rows, cells) : []};
      }),
      images: map(document.images, function (img) {
        return {alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth,
                naturalHeight: img.naturalHeight, painted: painted(img), box: box(img)};
      })
    };
    var pre = document.createElement("pre");
    pre.id = "%s";
    pre.textContent = JSON.stringify(result);
    document.body.appendChild(pre);
  });
})();""" % BROWSER_CHECK_ID


def find_chromium() -> str:
    """chromium on PATH, or a skip saying why; under CI=true a missing chromium is a failure (.ci/run installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "chromium is not installed (Debian package `chromium`; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (required under CI=true)")
        pytest.skip(message)
    return path


def render_in_chromium(chromium: str, page_html: str, tmp: Path, screenshot: Path | None = None) -> dict:
    """Load a copy of ``page_html``, the check script injected at the start of its <head> (after its charset), in
    headless Chromium; return what the script saw once the page had loaded (BROWSER_CHECK_JS)."""
    head = re.search(r'<head>\s*(<meta charset="utf-8">)?', page_html)
    assert head, "no <head> to inject the check script into"
    page = tmp / "page-checked.html"
    page.write_text(page_html[:head.end()] + f"\n<script>{BROWSER_CHECK_JS}</script>\n" + page_html[head.end():],
                    encoding="utf-8")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
           "--virtual-time-budget=10000", "--window-size=1280,2400"]
    if screenshot is not None:
        cmd.append(f"--screenshot={screenshot}")
    proc = subprocess.run([*cmd, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(rf'<pre id="{BROWSER_CHECK_ID}">(.*?)</pre>', proc.stdout, re.S)
    assert found, ("the check never reported (page not loaded in the virtual-time budget?): "
                   f"DOM tail {proc.stdout[-500:]!r}; stderr tail {proc.stderr[-1500:]}")
    return json.loads(html.unescape(found.group(1)))


def _words(rows: list[list[str]]) -> list[list[str]]:
    return [[" ".join(str(c).split()) for c in row] for row in rows]


def assert_reader_sees(seen: dict, page_html: str, results: dict) -> None:
    """The page as the browser rendered it: no errors, the results and paired-difference (claims) tables with the
    study's rows, every other table filled, every <img> decoded at its PNG's size and laid out."""
    assert seen["errors"] == [], seen["errors"]
    title = ("Oversmoothing sweep" if results["kind"] == "sweep" else "Policy comparison") + f": {results['dataset']}"
    assert seen["title"] == title and seen["h1"] == [title]
    header, rows, _ = table_rows(results)
    expected = {"results": (header, rows), **{key: (h, r) for key, _, h, r in paired_tables(results)}}
    tables = [t for t in seen["tables"] if t["cls"] == "results"]
    assert [t["heading"] for t in tables][:len(expected)] == list(expected)
    for t in tables:
        assert t["box"][0] > 0 and t["box"][1] > 0, f"table under #{t['heading']} is not laid out: {t['box']}"
        assert t["rows"] and all(len(r) == len(t["header"]) for r in t["rows"]), t
        if t["heading"] in expected:
            h, r = expected[t["heading"]]
            assert _words([t["header"]]) == _words([h]), t["heading"]
            assert _words(t["rows"]) == _words(r), t["heading"]
    grids = [t for t in seen["tables"] if t["cls"] == "grids"]
    assert len(grids) == 1 and len(grids[0]["rows"]) == len(results["policies"]), grids
    srcs = re.findall(r'<img src="([^"]*)"', page_html)
    assert srcs and len(seen["images"]) == len(srcs)
    for img, src in zip(seen["images"], srcs):
        assert img["complete"] and img["naturalWidth"] > 0 and img["naturalHeight"] > 0, img
        assert img["painted"] > 0.99, img  # decoded to the last row: the figures and grids are opaque PNGs
        assert img["box"][0] > 0 and img["box"][1] > 0, img
        png = base64.b64decode(src.split(",", 1)[1])
        assert (img["naturalWidth"], img["naturalHeight"]) == struct.unpack(">II", png[16:24]), img


@pytest.mark.slow
def test_report_renders_in_headless_chromium(image_study, tmp_path):
    """report.html in a real browser: what a reader sees (assert_reader_sees), and a screenshot that is not blank."""
    chromium = find_chromium()
    page_html = (image_study / "report.html").read_text(encoding="utf-8")
    results = json.loads((image_study / "results.json").read_text())
    assert paired_tables(results), "the study should have paired differences to show"
    shot = tmp_path / "report.png"
    seen = render_in_chromium(chromium, page_html, tmp_path, screenshot=shot)
    assert_reader_sees(seen, page_html, results)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (2400, 1280)
    assert (img < 128).mean() > 0.01  # text, tables and plots were drawn (not a blank page)
    assert len(np.unique(img)) > 32


def test_sigma2_figure_skips_log_records_without_a_step(image_study, tmp_path):
    """A metrics.jsonl record without `step` (a hand-edited or foreign log) is left out of the sigma2 figure,
    as the aggregation leaves it out, instead of a KeyError that stops the report."""
    import shutil

    from arelbo.report import plot_sigma2_trajectories

    out = tmp_path / "study"
    shutil.copytree(image_study, out)
    results = json.loads((out / "results.json").read_text())
    logs = sorted((out / "runs").rglob("metrics.jsonl"))
    assert logs
    with open(logs[0], "a") as f:
        f.write(json.dumps({"split": "train", "sigma2": 0.5}) + "\n")
    assert plot_sigma2_trajectories(results, out, tmp_path / "sigma2.png") is not None
