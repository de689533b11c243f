"""Run directories: where a new run goes, whether it may start there, and the log's history on resume."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from arelbo import runs
from arelbo.fileio import atomic_write_text
from arelbo.config import ConfigError, RunConfig

__all__ = ["new_run_dir", "check_run_dir", "clear_early_files", "truncate_metrics"]

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


def check_run_dir(run_dir: Path) -> None:
    """Whether a new run may start in ``run_dir``: a missing or empty directory, or a run that stopped before
    its first checkpoint (it is started again). A run with a checkpoint and a directory of other files are
    refused (FileExistsError), so neither a run nor the user's files are overwritten."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} exists and is not a directory; choose another --out")
    if _has_checkpoint(run_dir):
        raise FileExistsError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out"
        )
    if (run_dir / "config.yaml").is_file():
        return  # a run that died before its first checkpoint: nothing in it to keep
    others = sorted(p.name for p in run_dir.iterdir() if p.name != runs.LOCK_FILE)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise FileExistsError(
            f"{run_dir} is an existing directory that is not a run (it holds {shown}); choose a new or empty "
            f"directory for --out"
        )


def clear_early_files(run_dir: Path) -> None:
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

