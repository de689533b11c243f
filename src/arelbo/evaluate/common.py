"""What the evaluation stages share: where results go, per-metric random streams, JSON-safe values."""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

__all__ = ["METRICS_FILE", "METRICS_FORMAT", "SAMPLER_DIR", "FINAL_CHECKPOINTS", "generator", "clean", "metrics_file",
           "sampler_file", "resolve_device", "checkpoint_stem", "spread", "dequantized", "check_writable"]

METRICS_FILE = "metrics.json"
METRICS_FORMAT = 1
SAMPLER_DIR = "samplers"


def generator(seed: int, tag: str):
    import torch

    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(tag.encode())) % (2**63))


def clean(value):
    """JSON-safe: NaN/inf -> None, tensors -> lists/floats, tuples -> lists."""
    import torch

    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value



FINAL_CHECKPOINTS = ("best", "last")  # evaluated into metrics.json; any other checkpoint into metrics-<stem>.json


def checkpoint_stem(which: str) -> str | None:
    """None for best/last, else the checkpoint's file stem (``step-2000`` for checkpoints/step-2000.pt)."""
    return None if which in FINAL_CHECKPOINTS else Path(str(which)).stem


def metrics_file(run_dir, which: str = "best") -> Path:
    """Where ``arelbo eval --checkpoint WHICH`` writes: ``metrics.json`` for best/last (one final evaluation per run),
    ``metrics-<stem>.json`` for another checkpoint (e.g. the snapshot ``step-2000``), so they sit side by side."""
    stem = checkpoint_stem(which)
    return Path(run_dir) / (METRICS_FILE if stem is None else f"metrics-{stem}.json")


def sampler_file(run_dir, name: str, which: str = "best") -> Path:
    """Where ``arelbo eval`` saves a run's fitted ``name`` sampler (with the checkpoint key it was fitted for):
    ``samplers/NAME.pt`` for best/last, ``samplers/<stem>/NAME.pt`` for another checkpoint (a snapshot's fit must
    not replace the final one's)."""
    stem = checkpoint_stem(which)
    base = Path(run_dir) / SAMPLER_DIR
    return (base if stem is None else base / stem) / f"{name}.pt"


def check_writable(run_dir, which: str = "best") -> None:
    """Before any work: an evaluation that writes puts its metrics file into ``run_dir`` and fitted samplers into
    ``run_dir/samplers/`` (:func:`metrics_file`, :func:`sampler_file`); a folder of those it cannot write into is
    an error now, not after the work (read-only runs are evaluated with ``--no-write``)."""
    run_dir = Path(run_dir)
    folders = [run_dir, run_dir / SAMPLER_DIR, sampler_file(run_dir, "any", which).parent]
    for folder in dict.fromkeys(folders):
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{folder} is not writable, and the evaluation writes {metrics_file(run_dir, which).name} "
                             f"into {run_dir} and its fitted samplers into {run_dir / SAMPLER_DIR}: make it writable, "
                             f"or evaluate without writing (arelbo eval --no-write; evaluate_run(..., write=False))")


def resolve_device(device: str) -> str:
    """``auto``: CUDA when available, else CPU; anything else as given, once checked to exist here (a device that
    does not is a setting to change, said before any work is done)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, mps, auto): {err}") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()}
    if not available.get(dev.type, lambda: True)():
        raise ValueError(f"--device {device}: no {dev.type} device is available here; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return str(device)



def spread(values) -> dict:
    vals = [float(v) for v in values]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return {"fids": vals, "mean": mean, "std": std, "n": len(vals)}



def dequantized(data, generator):
    """uint8 images -> float (v + u - 1/2) / 255 with u ~ U[0, 1) drawn with ``generator``."""
    import torch

    u = torch.rand(data.shape, generator=generator, dtype=torch.float32)
    return (data.to(torch.float32) + u - 0.5).div_(255.0)


