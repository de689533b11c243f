"""Run directories and checkpoints: self-describing, atomic, loadable with ``torch.load(weights_only=True)``.

A run directory holds ``config.yaml`` (the full resolved config), ``metrics.jsonl``, ``checkpoints/`` and, after
evaluation, ``metrics.json``. A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:

    {"format": 1, "config": <resolved config dict>, "data_shape": [C, H, W],
     "model": <state_dict>, "objective": <state_dict>, ...trainer state (optimizer, scheduler, rng, step)...}

so anything that consumes a run needs only its directory, and a checkpoint can never execute code on load.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from arelbo.fileio import atomic_write_bytes

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
# Written by arelbo beside a run's config.yaml (the sha256 of the text it wrote): what tells a run that stopped
# before its first checkpoint, which ``arelbo train --out`` may start again, from a folder of the user's own files.
RUN_OWNER_FILE = ".arelbo-run.json"


class RunInUseError(ValueError):
    """Another process is training in this run directory (the message names it)."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Atomically save a checkpoint dict (``format`` is added)."""
    import io

    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, overwritten, or a pickle that is more than tensors: never load it
        raise ValueError(
            f"checkpoint {path} is damaged or not an arelbo checkpoint ({type(err).__name__}); it was not loaded. "
            f"Use another checkpoint of the run (e.g. copy {CHECKPOINT_DIR}/best.pt over last.pt to resume from "
            f"there) or train the run again"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not an arelbo checkpoint (expected a dict with 'model' and 'config')")
    if ckpt.get("format", 0) > CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {ckpt['format']}; this arelbo reads up to {CHECKPOINT_FORMAT}")
    return ckpt


def check_run_directory(run_dir: str | os.PathLike) -> Path:
    """``run_dir`` as a Path, or an error that says what it is instead: missing, or a file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        if run_dir.exists():
            raise NotADirectoryError(f"{run_dir} is a file, not a run directory: give the folder that holds "
                                     f"config.yaml and {CHECKPOINT_DIR}/")
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    return run_dir


def checkpoint_path(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """``which``: "best", "last", or a file name (``step-500.pt``), always looked up in the run's
    ``checkpoints/`` only, never in the working directory; a path with a folder part (``./x.pt``,
    ``/data/x.pt``) is taken as that explicit path."""
    run_dir = Path(run_dir)
    check_run_directory(run_dir)
    which = str(which)
    if not which:
        raise ValueError("empty checkpoint name: use best, last, or a file in checkpoints/")
    if os.sep in which or (os.altsep and os.altsep in which):
        candidate = Path(which)
        if not candidate.is_file():
            raise FileNotFoundError(f"no checkpoint file {candidate}")
        return candidate
    if which in (".", ".."):
        raise ValueError(f"{which!r} is not a checkpoint name: use best, last, or a file in checkpoints/")
    name = which if which.endswith(".pt") else f"{which}.pt"
    path = run_dir / CHECKPOINT_DIR / name
    if not path.is_file() and which == "best":
        path = run_dir / CHECKPOINT_DIR / "last.pt"  # a run stopped before its first validation has no best yet
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {name!r} in {run_dir / CHECKPOINT_DIR}")
    return path


def snapshot_name(step: int) -> str:
    """The ``which`` name of the snapshot kept at global step ``step`` (``checkpoints/step-<step>.pt``)."""
    return f"step-{int(step)}"


def load_model(run_dir: str | os.PathLike, which: str = "best", map_location="cpu"):
    """Rebuild (model, loss_fn, checkpoint) from a run directory, in eval mode, with nothing but its files."""
    from arelbo.config import ModelConfig, ObjectiveConfig
    from arelbo.models import build_model

    ckpt = load_checkpoint(checkpoint_path(run_dir, which), map_location)
    cfg = ckpt["config"]
    model = build_model(ModelConfig(**cfg["model"]), ckpt["data_shape"])
    model.load_state_dict(ckpt["model"])
    loss_fn = ObjectiveConfig(**ObjectiveConfig.upgrade(cfg["objective"])).build()
    loss_fn.load_state_dict(ckpt.get("objective", {}))
    return model.eval(), loss_fn.eval(), ckpt


def run_holder(run_dir: str | os.PathLike) -> str | None:
    """Who trains in ``run_dir`` now (the holder :func:`run_lock` recorded), or None when nobody holds its lock:
    asked without taking the lock for longer than the question, and without creating a lock file."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        f = open(Path(run_dir) / LOCK_FILE, "r", encoding="utf-8")
    except OSError:  # no lock file (or no directory): nobody has trained here since
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return f.read().strip() or "another process"
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold ``run_dir``'s lock for the duration: one training process per run directory. The lock file names
    its holder (pid, host, start time) for the error another process gets; the operating system releases the
    lock when the holder exits, however it exits (kill -9 included). Without ``fcntl`` (Windows) no lock."""
    import socket
    from datetime import datetime

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    run_dir = Path(run_dir)
    f = os.fdopen(os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666), "r+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = f.read().strip() or "another process"
            raise RunInUseError(
                f"{run_dir} is in use by {holder}: wait until it ends (or stop it) before training or resuming "
                f"this run"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()} (since {datetime.now().isoformat(timespec='seconds')})\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
    finally:
        f.close()


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """One JSON object per line; appended and flushed so a killed run keeps every line it logged."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. An unterminated last line that is not valid JSON is what a process
    killed during an append leaves: it is skipped. Any other bad line is an error naming the file and line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # no newline after it: a partial write
                break
            raise ValueError(f"{path}, line {i + 1}: not valid JSON ({err.msg}); repair or delete that line") from None
    return records


# --------------------------------------------------------------------------------------------------------------
# Random-number-generator state, as weights_only-safe data (tensors, ints, floats, lists)


def rng_state() -> dict[str, Any]:
    """The state of every global generator a training step may touch: torch (CPU and CUDA), numpy, python."""
    import random

    import numpy as np

    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {"version": int(version), "state": list(py_state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device's generator only: every process of a data-parallel run draws the same global noise
        # from its own device, so rank 0's state (the one saved) is every rank's, restored on each rank's device.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where CUDA is in use)."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every device's state as the saving process saw them
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
                return
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda.cpu())


def training_finished(ckpt: dict[str, Any], cfg) -> bool:
    """Whether a checkpoint is the end of training for ``cfg`` (a RunConfig): max_steps reached or all epochs
    processed (a checkpoint written mid-epoch counts the epochs before it)."""
    step = int(ckpt.get("global_step", 0))
    if cfg.train.max_steps is not None and step >= cfg.train.max_steps:
        return True
    try:
        done = int(ckpt["loops"]["fit_loop"]["epoch_progress"]["total"]["processed"])
    except (KeyError, TypeError):
        done = int(ckpt.get("epoch", -1)) + 1
    return done >= cfg.train.epochs


def read_config(run_dir: str | os.PathLike):
    """The resolved :class:`arelbo.config.RunConfig` a run directory was trained with (its ``config.yaml``)."""
    from arelbo.config import RunConfig

    path = check_run_directory(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    return RunConfig.load(path)
