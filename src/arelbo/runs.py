"""Run directories and checkpoints: self-describing, atomic, loadable with ``torch.load(weights_only=True)``.

A run directory holds ``config.yaml`` (the full resolved config), ``metrics.jsonl``, ``checkpoints/`` and, after
evaluation, ``metrics.json``. A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts:

    {"format": 1, "config": <resolved config dict>, "data_shape": [C, H, W],
     "model": <state_dict>, "objective": <state_dict>, ...trainer state (optimizer, scheduler, rng, step)...}

so anything that consumes a run needs only its directory, and a checkpoint can never execute code on load.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the permissions open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


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
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not an arelbo checkpoint (expected a dict with 'model' and 'config')")
    if ckpt.get("format", 0) > CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {ckpt['format']}; this arelbo reads up to {CHECKPOINT_FORMAT}")
    return ckpt


def checkpoint_path(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """``which``: "best", "last", or a file name / path inside ``checkpoints/``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    candidate = Path(which)
    if candidate.suffix == ".pt" and candidate.is_file():
        return candidate
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


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """One JSON object per line; appended and flushed so a killed run keeps every line it logged."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
        state["cuda"] = list(torch.cuda.get_rng_state_all())
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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def read_config(run_dir: str | os.PathLike):
    """The resolved :class:`arelbo.config.RunConfig` a run directory was trained with (its ``config.yaml``)."""
    from arelbo.config import RunConfig

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    return RunConfig.load(path)
