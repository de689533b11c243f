"""Image grids as PNG files with numpy and Pillow (no torchvision): ``make_grid``, ``save_png``, ``stack_labelled``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["make_grid", "save_png", "stack_labelled", "to_uint8_images"]


def to_uint8_images(images) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] (torch or numpy; clipped) -> (N, H, W, C) uint8 with C in {1, 3}."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    a = np.asarray(images, dtype=np.float32)
    if a.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {a.shape}")
    n, c, h, w = a.shape
    if c not in (1, 3) or h < 2 or w < 2:
        raise ValueError(f"cannot draw samples of shape {(c, h, w)} as images (need 1 or 3 channels and H, W >= 2)")
    a = np.nan_to_num(a, nan=0.0)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images, nrow: int | None = None, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile N images into a grid of ``nrow`` per row (default: about square): (H', W', C) uint8, C in {1, 3}."""
    tiles = to_uint8_images(images)
    n, h, w, c = tiles.shape
    if n == 0:
        raise ValueError("no images to tile")
    ncol = nrow or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncol)
    grid = np.full((padding + nrows * (h + padding), padding + ncol * (w + padding), c), pad_value, np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = tiles[i]
    return grid


def _to_rgb(grid: np.ndarray) -> np.ndarray:
    return np.repeat(grid, 3, axis=2) if grid.shape[2] == 1 else grid


def check_png_path(path, flag: str = "--out") -> None:
    """Refuse, before any work, an output path that is a folder or lies under a file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give a file name, e.g. {path / 'samples.png'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
            break


def save_png(grid: np.ndarray, path) -> Path:
    """Write an (H, W, C) uint8 array as PNG (atomically), creating the folder."""
    import io

    from PIL import Image

    from arelbo.fileio import atomic_write_bytes

    path = Path(path)
    image = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def stack_labelled(grids: Sequence[np.ndarray], labels: Sequence[str], horizontal: bool = True, scale: int = 1,
                   gap: int = 12, label_height: int = 16) -> np.ndarray:
    """Place grids side by side (or one above the other), each under a text label, on a white RGB canvas."""
    from PIL import Image, ImageDraw

    if len(grids) != len(labels):
        raise ValueError("one label per grid")
    grids = [_to_rgb(g) for g in grids]
    if scale > 1:
        grids = [np.kron(g, np.ones((scale, scale, 1), np.uint8)) for g in grids]
    cells = [(g.shape[0] + label_height, g.shape[1]) for g in grids]
    if horizontal:
        height = max(h for h, _ in cells) + 2 * gap
        width = sum(w for _, w in cells) + gap * (len(cells) + 1)
    else:
        height = sum(h for h, _ in cells) + gap * (len(cells) + 1)
        width = max(w for _, w in cells) + 2 * gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = y = gap
    for grid, label in zip(grids, labels):
        draw.text((x, y + 2), label, fill=(0, 0, 0))
        canvas.paste(Image.fromarray(grid), (x, y + label_height))
        if horizontal:
            x += grid.shape[1] + gap
        else:
            y += grid.shape[0] + label_height + gap
    return np.asarray(canvas)
