"""Run directories: where a new run goes, whether it may start there, and the log's history on resume."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from arelbo import runs
from arelbo.fileio import atomic_write_text
from arelbo.config import ConfigError, RunConfig

__all__ = ["new_run_dir", "check_run_dir", "clear_early_files", "truncate_metrics", "save_run_config",
           "config_owner"]

def new_run_dir(cfg: RunConfig, out=None, prefix: str | None = None) -> Path:
    """Decide the run directory (``out``, else ``cfg.out_dir/cfg.name`` with a generated name) and record it in
    ``cfg.out_dir``/``cfg.name``. Refused: an empty ``out``, a directory that already holds a run with a
    checkpoint (resume it instead), an existing directory of other files (see :func:`check_run_dir`)."""
    if out is not None:
        if not str(out).strip():
            raise ConfigError("--out is empty: give the run directory to create")
        run_dir = Path(out)
        if run_dir.name in ("", ".", ".."):
            run_dir = run_dir.resolve()
    else:
        if cfg.name is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            cfg.name = f"{prefix or cfg.data.name}-{cfg.objective.policy}-{stamp}"
        run_dir = Path(cfg.out_dir) / cfg.name
    cfg.out_dir, cfg.name = str(run_dir.parent), run_dir.name
    check_run_dir(run_dir)
    return run_dir


# What a run writes before its first checkpoint: removed when a run that died before it is started again.
_EARLY_FILES = ("config.yaml", "metrics.jsonl", "samples.png")
_EARLY_DIRS = ("tensorboard", runs.CHECKPOINT_DIR)


def _has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / runs.CHECKPOINT_DIR).glob("*.pt"))


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def save_run_config(run_dir: Path, cfg: RunConfig) -> None:
    """Write a run's ``config.yaml`` with its marker beside it (:data:`arelbo.runs.RUN_OWNER_FILE`: the sha256 of
    the text arelbo wrote). Only a config.yaml that the marker vouches for, unchanged, marks a folder as a run
    arelbo may start again (:func:`check_run_dir`). The marker goes first: a crash between the two writes leaves a
    config.yaml that does not match it, i.e. one that is refused, never one that is deleted."""
    import json

    from arelbo import __version__

    run_dir = Path(run_dir)
    text = cfg.to_yaml()
    marker = {"written_by": f"arelbo {__version__}", "file": "config.yaml",
              "config_sha256": _sha256(text.encode("utf-8"))}
    atomic_write_text(run_dir / runs.RUN_OWNER_FILE, json.dumps(marker, indent=2) + "\n")
    atomic_write_text(run_dir / "config.yaml", text)


def config_owner(run_dir: Path) -> str:
    """Whose ``run_dir/config.yaml`` is: "arelbo" (the marker vouches for it, unchanged), "changed" (arelbo wrote
    it, then it was edited) or "other" (no valid marker: the user's own file, or a run of an older version)."""
    import json

    run_dir = Path(run_dir)
    try:
        marker = json.loads((run_dir / runs.RUN_OWNER_FILE).read_text(encoding="utf-8"))
        expected = marker["config_sha256"] if isinstance(marker, dict) else None
    except (OSError, ValueError, KeyError):
        return "other"
    if not isinstance(expected, str):
        return "other"
    try:
        actual = _sha256((run_dir / "config.yaml").read_bytes())
    except OSError:
        return "other"
    return "arelbo" if actual == expected else "changed"


def check_run_dir(run_dir: Path) -> None:
    """Whether a new run may start in ``run_dir``: a missing or empty directory, or a run arelbo started there that
    stopped before its first checkpoint (it is started again: its config.yaml is the one arelbo wrote, unchanged,
    see :func:`save_run_config`). Refused (FileExistsError), touching nothing: a run with a checkpoint, a
    config.yaml arelbo did not write there or that was edited since, and a directory of other files."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} exists and is not a directory; choose another --out")
    if _has_checkpoint(run_dir):
        raise FileExistsError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out"
        )
    config = run_dir / "config.yaml"
    if config.is_file() or config.is_symlink():
        owner = config_owner(run_dir) if config.is_file() and not config.is_symlink() else "other"
        if owner == "arelbo":
            return  # a run that died before its first checkpoint: nothing in it to keep
        if owner == "changed":
            raise FileExistsError(
                f"{config} was changed after arelbo wrote it (the run there stopped before its first checkpoint), so "
                f"{run_dir} is not started over and nothing in it is touched: choose a new or empty directory for "
                f"--out (give the edited file with --config), or delete {run_dir} yourself to start over there"
            )
        raise FileExistsError(
            f"{run_dir} holds a config.yaml that arelbo did not write as a run's (no {runs.RUN_OWNER_FILE} marker "
            f"beside it: a file of your own, or a run of an older arelbo that stopped before its first checkpoint), "
            f"so it is not started over and nothing in it is touched: choose a new or empty directory for --out"
        )
    others = sorted(p.name for p in run_dir.iterdir() if p.name not in (runs.LOCK_FILE, runs.RUN_OWNER_FILE))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise FileExistsError(
            f"{run_dir} is an existing directory that is not a run (it holds {shown}); choose a new or empty "
            f"directory for --out"
        )


def clear_early_files(run_dir: Path) -> None:
    """Remove what a run that stopped before its first checkpoint wrote (called only once :func:`check_run_dir`
    has found the folder to be such a run)."""
    import shutil

    for name in _EARLY_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in _EARLY_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Forget records logged after the checkpoint (a killed run's tail, a partial last line), so the log is one
    consistent history. Records without an integer ``step`` cannot be placed: they are kept."""
    import json

    if not path.is_file():
        return

    def keep(r) -> bool:
        s = r.get("step") if isinstance(r, dict) else None
        if not isinstance(s, int) or isinstance(s, bool):
            return True
        return s < step if r.get("split") == "train" else s <= step

    kept = [r for r in runs.read_jsonl(path) if keep(r)]

    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

