"""Running a study: each run's state read from its directory, then train, resume, evaluate or reuse it (in process or
as ``python -m arelbo.cli`` subprocesses).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from arelbo.config import ConfigError, RunConfig
from arelbo.runs import RunInUseError, run_holder, training_finished
from arelbo.study.specs import PLAN_DIR, RUN_MARKER, StudyError
from arelbo.study.plan import EvalOptions, PlannedRun, StudyPlan


# --------------------------------------------------------------------------------------------------------------
# Run state


def _comparable(cfg: dict) -> dict:
    d = dict(cfg)
    d.pop("out_dir", None)
    d.pop("name", None)
    return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} (existing) vs {b!r} (planned)"]


def _read_marker(run_dir: Path) -> dict:
    path = run_dir / RUN_MARKER
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_marker(run_dir: Path, **updates) -> dict:
    from arelbo.fileio import atomic_write_text

    marker = _read_marker(run_dir)
    history = marker.get("history", [])
    if "event" in updates:
        history.append(updates.pop("event"))
    marker.update(updates, history=history)
    atomic_write_text(run_dir / RUN_MARKER, json.dumps(marker, indent=2) + "\n")
    return marker


def _metrics_match(metrics: dict, run: PlannedRun, opts: EvalOptions, ckpt_file: Path, metrics_file: Path,
                   which: str | None = None) -> str | None:
    """None when a metrics file answers this study's evaluation request (of checkpoint ``which``, default the
    study's), else why it does not."""
    which = which or opts.checkpoint
    try:
        p = metrics["protocol"]
        if metrics["checkpoint"]["which"] != which:
            return f"evaluated at checkpoint {metrics['checkpoint']['which']!r}, the study asks for {which!r}"
        missing = [s for s in run.samplers if s not in (p.get("samplers") or {})]
        if missing:
            return f"no evaluation of sampler(s) {', '.join(missing)}"
        if int(p["fid"]["n_samples"]) != opts.n_samples:
            return f"{p['fid']['n_samples']} samples per sampler, the study asks for {opts.n_samples}"
        disabled = str(p["fid"].get("skipped") or "").startswith("disabled")
        if disabled == opts.fid:
            return "FID " + ("skipped" if disabled else "computed") + " there, the study asks otherwise"
        if p.get("max_examples") != opts.max_examples or p.get("split") != opts.split:
            return "a different evaluation split or example cap"
        if int(p["fid"].get("repeats", 1)) != opts.fid_repeats:
            return f"FID on {p['fid'].get('repeats', 1)} sample draw(s), the study asks for {opts.fid_repeats}"
        if bool(p["fid"].get("reconstruction", False)) != opts.fid_reconstruction:
            return "reconstruction FID " + ("missing" if opts.fid_reconstruction else "present") + ", asked otherwise"
        if bool((p.get("dequantize") or {}).get("on")) != opts.dequantize:
            return "dequantisation " + ("off" if opts.dequantize else "on") + " there, the study asks otherwise"
        if int(p["is_nll"]["k"]) != opts.k:
            return f"IS-NLL with K={p['is_nll']['k']}, the study asks for K={opts.k}"
        for name, wanted in opts.sampler_options(run.samplers).items():
            have = (p["samplers"][name].get("config") or {})
            changed = [k for k, v in wanted.items() if have.get(k) != v]
            if changed:
                return f"sampler {name} fitted with other {', '.join(changed)}"
    except (KeyError, TypeError, ValueError) as err:
        return f"unreadable metrics.json ({type(err).__name__}: {err})"
    if ckpt_file.is_file() and ckpt_file.stat().st_mtime > metrics_file.stat().st_mtime:
        return "the checkpoint is newer than metrics.json"
    return None


def run_device(cfg: RunConfig) -> str:
    """The device a run's evaluation uses: the one it trained on (train.accelerator; auto: CUDA when present)."""
    return {"cpu": "cpu", "gpu": "cuda"}.get(cfg.train.accelerator, "auto")


def snapshot_checkpoints(run: PlannedRun) -> list[tuple[int, Path]]:
    """(step, file) of the kept snapshots of ``train.snapshot_steps`` that exist (a run shorter than a planned
    snapshot step has no such file)."""
    from arelbo.runs import CHECKPOINT_DIR, snapshot_name

    out = []
    for step in run.config.train.snapshot_steps:
        f = run.run_dir / CHECKPOINT_DIR / f"{snapshot_name(step)}.pt"
        if f.is_file():
            out.append((int(step), f))
    return out


def pending_evaluations(run: PlannedRun, opts: EvalOptions) -> list[tuple[str, str]]:
    """(which, why) for each checkpoint of a trained run whose metrics file is missing or not what is asked: the
    final one (``opts.checkpoint``, metrics.json) and, with ``opts.snapshots``, every kept snapshot."""
    from arelbo.evaluate import metrics_file
    from arelbo.runs import snapshot_name

    d = run.run_dir
    wanted = [(opts.checkpoint, d / "checkpoints" / f"{opts.checkpoint}.pt")]
    if opts.snapshots:
        wanted += [(snapshot_name(step), f) for step, f in snapshot_checkpoints(run)]
    out = []
    for which, ckpt_file in wanted:
        if which == "best" and not ckpt_file.is_file():
            ckpt_file = d / "checkpoints" / "last.pt"
        mfile = metrics_file(d, which)
        if not mfile.is_file():
            out.append((which, f"{mfile.name} missing"))
            continue
        try:
            metrics = json.loads(mfile.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            out.append((which, f"{mfile.name} unreadable ({err})"))
            continue
        why = _metrics_match(metrics, run, opts, ckpt_file, mfile, which)
        if why:
            out.append((which, f"{mfile.name}: {why}" if which != opts.checkpoint else why))
    return out


def run_state(run: PlannedRun, opts: EvalOptions) -> tuple[str, str]:
    """(state, detail) of a planned run from its directory alone.

    States: ``new`` (train it), ``restart`` (a config but no checkpoint: interrupted before its first one; start
    again), ``resume`` (a checkpoint short of the end), ``evaluate`` (trained, metrics.json missing or not what
    is asked), ``done`` (reuse), ``failed`` (a previous attempt failed; see study-run.json), ``busy`` (another
    process, e.g. a second study sharing --runs-dir, is training it now: left alone).
    Raises :class:`StudyError` when the directory holds a run with a different config.
    """
    from arelbo.runs import load_checkpoint

    d = run.run_dir
    holder = run_holder(d)
    if holder:
        return "busy", f"in use by {holder}"
    cfg_file = d / "config.yaml"
    if not cfg_file.is_file():
        if (d / "checkpoints").exists():
            raise StudyError(f"{d} has checkpoints but no config.yaml: not a run this study can continue; "
                             f"move it away or choose another --out")
        return "new", "no run yet"
    try:
        existing = RunConfig.load(cfg_file).to_dict()
    except (ConfigError, OSError) as err:
        why = str(err) if str(cfg_file) in str(err) else f"{cfg_file} cannot be read ({err})"
        raise StudyError(f"{why}; move {d} away or choose another --out") from None
    diff = _diff(_comparable(existing), _comparable(run.config.to_dict()))
    if diff:
        raise StudyError(f"{d} holds a run with a different config than this study plans ({'; '.join(diff[:5])}"
                         f"{'; ...' if len(diff) > 5 else ''}); choose another --out (or --runs-dir), or remove it")
    marker = _read_marker(d)
    if marker.get("status") == "failed":
        return "failed", str(marker.get("error", "failed"))
    last = d / "checkpoints" / "last.pt"
    if not last.is_file():
        return "restart", "interrupted before its first checkpoint"
    try:
        ckpt = load_checkpoint(last)
    except Exception as err:  # a truncated file cannot happen with atomic writes, but be clear if it does
        raise StudyError(f"{last} cannot be read ({err}); remove {d} to retrain it") from None
    if not training_finished(ckpt, run.config):
        return "resume", f"stopped at step {ckpt.get('global_step')} (epoch {ckpt.get('epoch')})"
    pending = pending_evaluations(run, opts)
    if pending:
        if not (d / "metrics.json").is_file():
            return "evaluate", "trained, not evaluated"
        return "evaluate", "; ".join(why for _, why in pending)
    return "done", "trained and evaluated"


# --------------------------------------------------------------------------------------------------------------
# Running


class StudyInterrupted(RuntimeError):
    """Ctrl-C (or a training interrupt): the study stopped; running the same command again resumes it."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


STUDY_FILE = "study.json"


def is_study_dir(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds a study: the ``study.json`` a study writes first (:func:`write_plan`)."""
    path = Path(out) / STUDY_FILE
    try:
        d = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("kind") in ("compare", "sweep") and isinstance(d.get("runs"), list)


def _check_folder_path(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise StudyError(f"{flag} {path} is a file, not a folder: choose another {flag}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StudyError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
            break


def check_study_dirs(plan: StudyPlan) -> None:
    """Before anything is trained or written: ``--out`` is new, empty, or a study's folder (its study.json), never
    a folder of the user's own files (a study writes results.json, report.md, report.html and figures/ there);
    ``--out`` and ``--runs-dir`` are folders (or can be made)."""
    _check_folder_path(plan.out, "--out")
    _check_folder_path(plan.runs_dir, "--runs-dir")
    if not plan.out.is_dir() or is_study_dir(plan.out):
        return
    others = sorted(p.name for p in plan.out.iterdir())
    if plan.runs_dir.resolve().parent == plan.out.resolve():
        # a study stopped before its study.json holds at most its runs folder (nothing of the user's)
        others = [n for n in others if not (n == plan.runs_dir.name and not any(plan.runs_dir.iterdir()))]
    if others:
        shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
        raise StudyError(f"--out {plan.out} is not a study folder (no {STUDY_FILE}) and holds other files ({shown}): "
                         f"a study writes results.json, report.md and report.html there, so it does not use it; "
                         f"choose a new or empty folder for --out")


def write_plan(plan: StudyPlan, status: str, extra: dict | None = None) -> Path:
    from arelbo.fileio import atomic_write_text

    plan.out.mkdir(parents=True, exist_ok=True)
    d = plan.to_dict()
    d.update({"status": status, "updated": _now(), **(extra or {})})
    path = plan.out / STUDY_FILE
    atomic_write_text(path, json.dumps(d, indent=2) + "\n")
    return path


def _run_in_process(run: PlannedRun, state: str, opts: EvalOptions, progress: bool, callbacks, splits_cache: dict,
                    log: Callable[[str], None]) -> dict:
    """Train/resume (as needed) then evaluate one run in this process; returns timings."""
    from arelbo.evaluate import evaluate_run
    from arelbo.train import fit, load_splits, resume

    timings: dict[str, float] = {}
    if state in ("new", "restart", "resume"):
        key = json.dumps(run.config.data.__dict__, sort_keys=True, default=str)
        if key not in splits_cache:
            splits_cache.clear()  # keep one dataset in memory
            splits_cache[key] = load_splits(run.config)
        splits = splits_cache[key]
        t0 = time.perf_counter()
        if state == "resume":
            resume(run.run_dir, splits=splits, progress=progress, callbacks=callbacks)
        else:  # "restart": fit starts the run again only if its config.yaml is the one arelbo wrote there
            cfg = RunConfig.from_dict(run.config.to_dict())
            fit(cfg, run.run_dir, splits=splits, progress=progress, callbacks=callbacks)
        timings["train_seconds"] = time.perf_counter() - t0
        _write_marker(run.run_dir, event={"action": state, "seconds": round(timings["train_seconds"], 1), "at": _now()})
    t0 = time.perf_counter()
    device = run_device(run.config)
    for which, _ in pending_evaluations(run, opts):
        evaluate_run(run.run_dir, **opts.evaluate_kwargs(run.samplers, which, device), progress=False)
    timings["eval_seconds"] = time.perf_counter() - t0
    return timings


def _package_path() -> str:
    return str(Path(__file__).resolve().parents[2])  # src/


def _run_subprocess(run: PlannedRun, state: str, opts: EvalOptions, plan: StudyPlan, threads: int,
                    log: Callable[[str], None]) -> dict:
    """The same as :func:`_run_in_process` through ``python -m arelbo.cli train/eval`` (for --jobs N)."""
    from arelbo.fileio import atomic_write_text

    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([_package_path(), *filter(None, [env.get("PYTHONPATH")])])
    cli = [sys.executable, "-m", "arelbo.cli"]
    timings: dict[str, float] = {}
    run.run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run.run_dir.parent / f"{run.name}.log"

    def call(args: list[str], what: str) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"\n$ {' '.join(args)}\n")
            f.flush()
            proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, env=env)
        if proc.returncode == 130:
            raise StudyInterrupted(f"{run.name}: {what} interrupted")
        if proc.returncode != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{what} exited with {proc.returncode}: {' | '.join(tail)} (log: {log_path})")

    if state in ("new", "restart", "resume"):
        t0 = time.perf_counter()
        if state == "resume":
            call([*cli, "train", "--resume", str(run.run_dir), "--quiet"], "training")
        else:  # "restart" too: `arelbo train --out` starts again only a run arelbo wrote there
            cfg_path = plan.out / PLAN_DIR / f"{run.name}.yaml"
            atomic_write_text(cfg_path, run.config.to_yaml())
            call([*cli, "train", "--config", str(cfg_path), "--out", str(run.run_dir), "--quiet"], "training")
        timings["train_seconds"] = time.perf_counter() - t0
        _write_marker(run.run_dir, event={"action": state, "seconds": round(timings["train_seconds"], 1), "at": _now()})
    t0 = time.perf_counter()
    device = run_device(run.config)
    for which, _ in pending_evaluations(run, opts):
        call([*cli, "eval", str(run.run_dir), *opts.cli_args(run.samplers, which, device)], f"evaluation of {which}")
    timings["eval_seconds"] = time.perf_counter() - t0
    return timings


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_study(plan: StudyPlan, *, jobs: int = 1, progress: bool = True, retry_failed: bool = False,
              train_callbacks: Sequence = (), report: bool = True, log: Callable[[str], None] = print) -> dict:
    """Bring every planned run to ``done`` (train / resume / evaluate as its state requires), then aggregate into
    ``results.json`` and (``report``) write ``report.md`` / ``report.html``. Returns the results dict.

    ``jobs`` > 1: that many runs side by side, each as ``python -m arelbo.cli train`` then ``eval`` subprocesses
    with ``cores // jobs`` torch threads; 1 (default): one after the other in this process.
    ``train_callbacks``: Lightning callbacks for in-process training (tests interrupt runs with them).
    Ctrl-C stops the study (:class:`StudyInterrupted`); the same call again continues it.
    """
    from arelbo.study.aggregate import collect_results  # (aggregate reads the runs' markers)

    from concurrent.futures import ThreadPoolExecutor, as_completed

    from arelbo.train import TrainingInterrupted

    if jobs < 1:
        raise StudyError(f"--jobs must be >= 1, got {jobs}")
    t_start = time.perf_counter()
    check_study_dirs(plan)
    states = {r.name: run_state(r, plan.eval) for r in plan.runs}  # raises before anything is written
    plan.out.mkdir(parents=True, exist_ok=True)
    if retry_failed:
        for r in plan.runs:
            if states[r.name][0] == "failed":
                _write_marker(r.run_dir, status="retrying", error=None)
                states[r.name] = run_state(r, plan.eval)
    write_plan(plan, "running", {"started": _now()})
    width = max(len(r.name) for r in plan.runs)
    log(f"study: {len(plan.policies)} policies x {len(plan.seeds)} seed(s) = {len(plan.runs)} training run(s) "
        f"in {plan.runs_dir} ({plan.scale.name} scale, jobs={jobs})")
    for r in plan.runs:
        state, detail = states[r.name]
        action = {"new": "train", "restart": "train again", "resume": "resume", "evaluate": "evaluate",
                  "done": "reuse", "failed": "skip (failed before; --retry-failed)",
                  "busy": "skip (in use)"}[state]
        log(f"  {r.name:<{width}}  {action:<12} {detail}")
    todo = [r for r in plan.runs if states[r.name][0] not in ("done", "failed", "busy")]
    busy = {r.name: states[r.name][1] for r in plan.runs if states[r.name][0] == "busy"}
    threads = max(1, _cores() // jobs)
    failures: dict[str, str] = {}

    def work(run: PlannedRun) -> tuple[PlannedRun, dict]:
        state = states[run.name][0]
        holder = run_holder(run.run_dir)  # taken since the study started: never restart or resume under it
        if holder:
            raise RunInUseError(f"{run.run_dir} is in use by {holder}")
        if jobs == 1:
            return run, _run_in_process(run, state, plan.eval, progress, train_callbacks, splits_cache, log)
        return run, _run_subprocess(run, state, plan.eval, plan, threads, log)

    splits_cache: dict = {}
    done_count = 0

    def finished(run: PlannedRun, timings: dict) -> None:
        nonlocal done_count
        done_count += 1
        _write_marker(run.run_dir, status="done", error=None, **{k: round(v, 1) for k, v in timings.items()})
        parts = [f"{k.split('_')[0]} {v:.0f} s" for k, v in timings.items()]
        log(f"[{done_count}/{len(todo)}] {run.name}: {', '.join(parts)} (study {time.perf_counter() - t_start:.0f} s)")

    def failed(run: PlannedRun, err: BaseException) -> None:
        nonlocal done_count
        done_count += 1
        msg = f"{type(err).__name__}: {err}"
        if isinstance(err, RunInUseError):  # not this run's failure: another process has it; no marker
            busy[run.name] = str(err)
            log(f"[{done_count}/{len(todo)}] {run.name}: skipped ({err}); run the study again once it is free")
            return
        failures[run.name] = msg
        if run.run_dir.is_dir():
            _write_marker(run.run_dir, status="failed", error=msg, event={"action": "failed", "error": msg, "at": _now()})
        log(f"[{done_count}/{len(todo)}] {run.name}: FAILED ({msg})")

    try:
        if jobs == 1:
            for run in todo:
                log(f"== {run.name} ({states[run.name][0]})")
                try:
                    finished(*work(run))
                except (TrainingInterrupted, KeyboardInterrupt, StudyInterrupted) as err:
                    if run.run_dir.is_dir():
                        _write_marker(run.run_dir, status="interrupted",
                                      event={"action": f"{states[run.name][0]} (interrupted)", "at": _now()})
                    raise StudyInterrupted(str(err)) from err
                except Exception as err:  # noqa: BLE001 - one bad run must not stop the others; it is recorded
                    failed(run, err)
        else:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = {pool.submit(work, r): r for r in todo}
                try:
                    for fut in as_completed(futures):
                        try:
                            finished(*fut.result())
                        except StudyInterrupted:
                            raise
                        except Exception as err:  # noqa: BLE001
                            failed(futures[fut], err)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    except (StudyInterrupted, KeyboardInterrupt) as err:
        write_plan(plan, "interrupted", {"interrupted": _now()})
        raise StudyInterrupted(f"study interrupted ({err}); run the same command again to continue where it stopped") from None
    results = collect_results(plan, wall_seconds=time.perf_counter() - t_start)
    failed_before = {c["run"]: c.get("error") or "failed" for p in results["policies"] for c in p["cells"]
                     if c["status"] == "failed" and c["run"] not in failures}
    if (failures or failed_before) and not any(p["n_done"] for p in results["policies"]):
        # nothing to report: say why (the first failure) instead of writing an empty results.json and report
        write_plan(plan, "failed runs", {"finished": _now(), "failures": {**failed_before, **failures}})
        name, msg = next(iter(failures.items())) if failures else next(iter(failed_before.items()))
        n = len(failures) + len(failed_before)
        more = f"; {n - 1} more failed (see {plan.out / STUDY_FILE})" if n > 1 else ""
        retry = "" if failures else " (failed in an earlier invocation; --retry-failed tries again)"
        raise StudyError(f"every run of the study failed, so nothing was reported (no results.json or report): "
                         f"{name}: {msg}{retry}{more}")
    from arelbo.fileio import atomic_write_text

    atomic_write_text(plan.out / "results.json", json.dumps(results, indent=2) + "\n")
    if report:
        from arelbo.report import write_report

        write_report(results, plan.out)
    if busy:
        log(f"{len(busy)} run(s) in use by another process, left out: {', '.join(busy)}; run the same command "
            f"again once they are free")
    write_plan(plan, "failed runs" if failures else "incomplete (runs in use)" if busy else "complete",
               {"finished": _now()})
    return results
