"""Fitted samplers saved and loaded (``torch.load(weights_only=True)``), and codes decoded into images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from arelbo.samplers.base import SAMPLER_FORMAT, LatentSampler, make_sampler

__all__ = ["save_sampler", "load_sampler", "to_uint8", "decode_samples"]


def save_sampler(sampler: LatentSampler, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Atomically save {format, name, config, state, extra} (loadable with weights_only=True)."""
    import io

    from arelbo.fileio import atomic_write_bytes

    sampler._check_fitted()
    buffer = io.BytesIO()
    torch.save({"format": SAMPLER_FORMAT, "name": sampler.name, "config": sampler.config(),
                "state": sampler.state_dict(), "extra": dict(extra or {})}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_sampler(path: str | os.PathLike) -> tuple[LatentSampler, dict[str, Any]]:
    """(fitted sampler, extra) from :func:`save_sampler`'s file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sampler file at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or overwritten (or more than tensors): never loaded
        raise ValueError(f"sampler file {path} is damaged ({type(err).__name__}) and was not loaded") from None
    if not isinstance(blob, dict) or "name" not in blob or "state" not in blob:
        raise ValueError(f"{path} is not an arelbo sampler file")
    if blob.get("format", 0) > SAMPLER_FORMAT:
        raise ValueError(f"{path} has sampler format {blob['format']}; this arelbo reads up to {SAMPLER_FORMAT}")
    sampler = make_sampler(blob["name"], **blob.get("config", {}))
    sampler.load_state_dict(blob["state"])
    return sampler, blob.get("extra", {})


def to_uint8(x: Tensor) -> Tensor:
    """Float images in [0, 1] (clamped) -> uint8 levels, rounded."""
    return (x.clamp(0, 1) * 255.0).round_().to(torch.uint8)


def decode_samples(
    model,
    sampler: LatentSampler,
    n: int,
    generator: torch.Generator | None = None,
    batch_size: int = 500,
    as_uint8: bool = False,
    progress: bool | str = False,
) -> Tensor:
    """n decoder means f(z) with z from the sampler, in batches under inference mode, on the CPU.

    The generator draws the latent codes in one call (and, for a hierarchical model, the seed of the groups below
    the code, drawn per example), so the images depend only on its seed, not on batch_size.
    ``as_uint8`` quantises to 8-bit levels as each batch is produced (saves memory for large image sets).
    """
    z = sampler.sample(n, generator)
    try:
        ref = next(model.parameters())
        device, dtype = ref.device, ref.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    below = None  # the latent groups below the sampler's code (hierarchical models), drawn per example
    if len(getattr(model, "latent_shapes", ())) > 1:
        from arelbo.models.outputs import SplitNoise

        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device if generator else "cpu"))
        below = SplitNoise(torch.Generator().manual_seed(seed), n, device)
    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=progress if isinstance(progress, str) else "decoding", unit="ex", leave=False)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            code = z[start : start + batch_size].to(device=device, dtype=dtype)
            x = model.decode_code(code, None if below is None else below.rows(start), sampler.temperature).float().cpu()
            out.append(to_uint8(x) if as_uint8 else x)
            if bar is not None:
                bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    return torch.cat(out) if out else torch.empty(0)

