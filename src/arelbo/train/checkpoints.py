"""Checkpoints in the run format of :mod:`arelbo.runs`: Lightning's IO plugin and the callbacks that write them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from arelbo import runs
from arelbo.fileio import atomic_write_bytes
from arelbo.train.errors import NonFiniteLossError
from arelbo.train.module import VAEModule

__all__ = ["RunCheckpointIO", "RunCheckpoint", "SnapshotCheckpoint"]

class RunCheckpointIO(CheckpointIO):
    """Lightning's checkpoint dicts written with :func:`arelbo.runs.save_checkpoint` (atomic) and read with
    ``weights_only=True``; also serves Lightning's own temporary files (plain state dicts)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if "model" in checkpoint and "config" in checkpoint:
            runs.save_checkpoint(path, checkpoint)
        else:
            import io

            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            atomic_write_bytes(path, buffer.getvalue())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


class RunCheckpoint(Checkpoint):
    """``last.pt`` every N epochs, every M steps and at the end, ``best.pt`` (a copy) when validation -ELBO
    improves. A checkpoint is written only from a finite state (:meth:`VAEModule.state_is_finite`); otherwise
    training stops with :class:`NonFiniteLossError` and the previous checkpoint stays the last good one.

    A step checkpoint is written right after its optimiser step (Lightning resumes such a state mid-epoch; the
    module records how many batches of the epoch are done so the data order continues at the next unseen
    batch). One due on the last batch of an epoch is written at the epoch end instead, after validation."""

    def __init__(self, run_dir, every_n_epochs: int = 1, save_best: bool = True, every_n_steps: int | None = None):
        self.dir = Path(run_dir) / runs.CHECKPOINT_DIR
        self.every_n_epochs, self.save_best = int(every_n_epochs), bool(save_best)
        self.every_n_steps = every_n_steps
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._saved_step: int | None = None
        self._pending = False  # a step checkpoint fell on an epoch's last batch: write it at the epoch end

    @property
    def state_key(self) -> str:
        return "RunCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch = state_dict.get("best"), state_dict.get("best_epoch")

    def _save(self, trainer: pl.Trainer, module: VAEModule, best: bool) -> None:
        module.check_finite()  # no state a non-finite step produced
        if not module.state_is_finite():
            last = self.dir / "last.pt"
            where = f"; the last good checkpoint is {last}" if last.is_file() else "; no checkpoint was written"
            raise NonFiniteLossError(
                f"non-finite model state at global step {trainer.global_step} (epoch {trainer.current_epoch}) with "
                f"policy {module.cfg.objective.policy!r}: the model diverged; training stopped{where}"
            )
        last = self.dir / "last.pt"
        trainer.save_checkpoint(last, weights_only=False)  # every process dumps; process 0 writes; then a barrier
        self._saved_step = trainer.global_step
        self._pending = False
        if best and trainer.is_global_zero:
            atomic_write_bytes(self.dir / "best.pt", last.read_bytes())

    def on_train_batch_end(self, trainer: pl.Trainer, module: VAEModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        due = bool(self.every_n_steps) and step % self.every_n_steps == 0
        due = due or (trainer.max_steps not in (None, -1) and step >= trainer.max_steps)
        if not due:
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            self._pending = True
        else:
            self._save(trainer, module, best=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, module: VAEModule) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.current.completed < trainer.num_training_batches:
            return  # stopped mid-epoch (max_steps): its step checkpoint is already written
        metric = None if module.last_val is None else module.last_val["neg_elbo"]
        improved = metric is not None and math.isfinite(metric) and (self.best is None or metric < self.best)
        if improved:
            self.best, self.best_epoch = float(metric), int(trainer.current_epoch)
        due = (trainer.current_epoch + 1) % self.every_n_epochs == 0 or self._pending
        if due or (improved and self.save_best):
            self._save(trainer, module, best=improved and self.save_best)

    def on_train_end(self, trainer: pl.Trainer, module: VAEModule) -> None:
        if self._saved_step != trainer.global_step:
            self._save(trainer, module, best=False)


class SnapshotCheckpoint(pl.Callback):
    """Keep ``checkpoints/step-<N>.pt`` (the format of ``last.pt``, written the same atomic way) right after the
    optimiser step that reaches each global step N of ``steps``: the states later evaluated to show metrics
    against training steps. Never overwritten by later steps; a resumed run writes the ones still ahead of it."""

    def __init__(self, run_dir, steps: Sequence[int]):
        self.dir = Path(run_dir) / runs.CHECKPOINT_DIR
        self.steps = frozenset(int(s) for s in steps)

    def on_train_batch_end(self, trainer: pl.Trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # already counts this batch's optimiser step
        if step in self.steps:
            module.check_finite()  # only a finite state is ever written
            trainer.save_checkpoint(self.dir / f"{runs.snapshot_name(step)}.pt", weights_only=False)

