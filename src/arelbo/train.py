"""Training: a Lightning module around (VAE, GaussianVAELoss), built from a :class:`arelbo.config.RunConfig`.

This is the only module of the package that imports a training framework. What it adds to the pure-PyTorch core:

* **Logging.** Every ``train.log_every_n_steps`` steps: loss, mse (distortion / D), distortion (per-sample sum of
  squared errors), rate (KL), sigma2, -ELBO and lr. Every epoch on the validation set: -ELBO in nats and bits/dim,
  mse, KL and KL per latent dimension (standard prior; a learnable prior's KL is its one-sample Monte-Carlo
  estimate and has no per-dimension split), active units (Cov_x(mu_j) > 0.01) and the sigma2 the -ELBO used: the
  policy's own held-out rule (:meth:`arelbo.objectives.DecoderVariance.held_out_sigma2`, e.g. ``ar`` the MLE on
  the whole validation set, ``fixed`` its constant), through the same :class:`arelbo.metrics.ELBOAccumulator` as
  ``arelbo eval``. Records go to ``metrics.jsonl`` (one JSON object
  per line with ``split``, ``step``, ``epoch``) and to TensorBoard (``tensorboard/``), values averaged over
  processes.
* **Checkpoints** in the package's own format (:mod:`arelbo.runs`: atomic writes, ``torch.load(weights_only=True)``,
  ``runs.load_model(run_dir)``): ``checkpoints/last.pt`` every N epochs and at the end, ``checkpoints/best.pt`` by
  validation -ELBO, and ``checkpoints/step-<N>.pt`` at each of ``train.snapshot_steps``. They carry Lightning's loop/optimiser/scheduler state plus the objective's state and every RNG.
* **Exact resume** (:func:`resume`): the data order is a function of (seed, epoch) only, the reparameterisation
  noise comes from the restored global RNG, validation noise from its own (seed, epoch) generator, so
  "2 epochs" and "1 epoch, stop, resume to 2" give identical parameters.
* **Data parallel** (``train.devices > 1``): ``data.batch_size`` is the global batch. Each process takes its
  contiguous slice of every global batch and the slice of the global batch's noise, so together with the ``ar``
  policies' all-reduced sums, DDP training reproduces single-process training on the same global batch
  (up to float summation order). Batch norm uses the global batch's statistics
  (:class:`arelbo.models.batchnorm.GlobalBatchNorm`, any device) unless ``train.sync_batchnorm`` is false.
* **NaN/inf guard** without a host sync per step: every step records, on the device, the first non-finite loss;
  the record is read on logging steps, before validation and before every checkpoint
  (:meth:`VAEModule.check_finite`), which raises :class:`NonFiniteLossError` naming the step and epoch of the
  first bad loss. So the stop may come a few steps late, but ``last.pt`` is always the last finite state.
* **Speed**: in-memory data live on the accelerator (uint8, copied once; each batch is an index gather and a
  conversion there), so no batch is copied from the host; memory-mapped datasets stream through the
  DataLoader (workers, pinned memory). Optional ``train.channels_last`` and ``train.compile``.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from arelbo import runs
from arelbo.config import ConfigError, RunConfig
from arelbo.metrics.collapse import ACTIVE_UNIT_THRESHOLD
from arelbo.models import build_model
from arelbo.models.batchnorm import convert_batchnorm

__all__ = [
    "VAEModule",
    "NonFiniteLossError",
    "TrainingInterrupted",
    "EpochSampler",
    "fit",
    "resume",
    "new_run_dir",
    "load_splits",
    "benchmark_steps",
]

RUN_DIR_ENV = "ARELBO_RUN_DIR"  # lets processes re-launched by the "ddp" strategy find their run directory


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the global step and epoch."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (or another interrupt Lightning caught): the run stopped early and can be resumed."""


def _seed_for(*parts: int) -> int:
    """A 63-bit seed from integers, without collisions between nearby tuples like (seed, epoch)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------------------------
# Data


class EpochSampler(Sampler[int]):
    """Training order for one process: epoch e's order depends only on (seed, e), so resuming needs no state.

    The dataset is cut into global batches of ``global_batch`` samples (a permutation when shuffling); this
    process yields its contiguous 1/world slice of each one, in order, so a DataLoader with ``batch_size =
    global_batch // world`` gives every process its share of the same global batch. An incomplete last batch
    is dropped (``drop_last``) or trimmed to a multiple of ``world`` so every process sees the same batch count.
    """

    def __init__(self, n: int, global_batch: int, shuffle: bool, seed: int, drop_last: bool, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ConfigError(f"data.batch_size {global_batch} must be divisible by train.devices {world}")
        self.n, self.global_batch, self.shuffle, self.seed = int(n), int(global_batch), bool(shuffle), int(seed)
        self.drop_last, self.rank, self.world = bool(drop_last), int(rank), int(world)
        self.epoch = 0
        self.skip_batches = 0  # batches of the next epoch already trained on (mid-epoch resume); used once


    def set_epoch(self, epoch: int) -> None:  # called by Lightning before each epoch
        self.epoch = int(epoch)

    def _batch_sizes(self) -> list[int]:
        full, rest = divmod(self.n, self.global_batch)
        sizes = [self.global_batch] * full
        rest -= rest % self.world
        if rest and not self.drop_last:
            sizes.append(rest)
        return sizes

    def __len__(self) -> int:
        return sum(self._batch_sizes()) // self.world

    def __iter__(self):
        skip, self.skip_batches = self.skip_batches, 0
        if self.shuffle:
            g = torch.Generator().manual_seed(_seed_for(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()  # host indices, read once per epoch
        else:
            order = range(self.n)
        start = 0
        for i, size in enumerate(self._batch_sizes()):
            local = size // self.world
            if i >= skip:
                yield from order[start + self.rank * local : start + (self.rank + 1) * local]
            start += size


class ShardSampler(Sampler[int]):
    """Evaluation: process r of w reads the contiguous r-th w-th of the data, in order (no padding)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.lo, self.hi = n * rank // world, n * (rank + 1) // world

    def __len__(self) -> int:
        return self.hi - self.lo

    def __iter__(self):
        return iter(range(self.lo, self.hi))


def load_splits(cfg: RunConfig):
    from arelbo.data import load_dataset

    return load_dataset(cfg.data.name, cfg.data.root, **cfg.data.options)


# --------------------------------------------------------------------------------------------------------------
# The Lightning module


class VAEModule(pl.LightningModule):
    """(VAE, GaussianVAELoss) from a RunConfig. ``splits`` (an :class:`arelbo.data.Splits`) is loaded from the
    config when not given; it is never pickled (spawned processes load their own)."""

    def __init__(self, cfg: RunConfig, data_shape: Sequence[int], splits=None, run_dir=None):
        super().__init__()
        self.cfg = cfg
        self.data_shape = tuple(int(s) for s in data_shape)
        self.model = build_model(cfg.model, self.data_shape)
        # the trainer guards the loss itself (one check per step), so the per-call input checks are off
        self.loss_fn = cfg.objective.build(check_finite=False)
        self.splits = splits
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.num_elements = math.prod(self.data_shape)
        self.last_val: dict[str, Any] | None = None
        self._resume_rng: dict | None = None
        self._resuming = False
        self._resume_skip = 0  # batches of the interrupted epoch already trained on (a mid-epoch checkpoint)
        self._val_acc = None  # arelbo.metrics.ELBOAccumulator during validation
        self._val_mu: Tensor | None = None
        self._val_eps: Tensor | None = None
        self._val_offset = 0
        self._resident: dict[str, Tensor] = {}  # split -> its uint8 samples on the accelerator
        self._bad_step: Tensor | None = None  # device: global step of the first non-finite loss since the last check
        self._bad_loss: Tensor | None = None  # device: that loss
        self._unchecked: dict[int, tuple[int, int]] = {}  # host: step -> (epoch, batch) since the last check
        self.bar_values: dict[str, float] = {}  # last logged values, for the progress bar (host floats)

    def __getstate__(self):
        state = super().__getstate__()
        state["splits"] = None  # do not ship the dataset to spawned processes
        return state

    # ---- data

    def setup(self, stage: str) -> None:
        if self.splits is None:
            self.splits = load_splits(self.cfg)
        if tuple(self.splits.shape) != self.data_shape:
            raise ValueError(f"data shape {tuple(self.splits.shape)} differs from the model's {self.data_shape}")
        if stage == "fit" and self.trainer.world_size > 1 and self.cfg.train.sync_batchnorm:
            self.model = convert_batchnorm(self.model)

    def configure_model(self) -> None:
        t = self.cfg.train
        if t.channels_last and len(self.data_shape) == 3:
            self.model.to(memory_format=torch.channels_last)
        if t.compile and not getattr(self, "_compiled", False):
            # compile the parts in place: parameter names (and so checkpoints) stay those of the plain model
            for part in self.model.children():
                part.compile()
            self._compiled = True

    def _on_device(self, data: Tensor) -> bool:
        """Whether this split is copied to the accelerator once (see ``train.data_on_device``)."""
        from arelbo.data import is_mapped

        wanted = self.cfg.train.data_on_device
        if wanted is not None:
            return bool(wanted)
        if self.device.type == "cpu" or is_mapped(data):
            return False  # on the CPU the data already are where the model is; mapped data stream from disk
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return data.nelement() * data.element_size() <= free // 2
        return True

    def _loader(self, data: Tensor, sampler: Sampler, batch_size: int, split: str) -> DataLoader:
        from arelbo.data import ImageTensorDataset, IndexDataset, collate_identity

        if self._on_device(data):
            # once: the uint8 samples go to the accelerator; the loader only yields the batch's indices (the same
            # sampler, so the same order, resume and sharding), gathered and converted on the device
            if split not in self._resident:
                self._resident[split] = data.to(self.device)
            dataset, workers = IndexDataset(len(data)), 0
        else:
            self._resident.pop(split, None)
            dataset, workers = ImageTensorDataset(data), self.cfg.train.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_identity,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.device.type == "cuda" or self.cfg.train.accelerator == "gpu",
            # its own generator: creating an iterator must not draw from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(_seed_for(self.cfg.train.seed, 1)),
        )

    def _inputs(self, batch: Tensor, split: str) -> Tensor:
        """The float batch: gathered from the resident samples when the loader yields indices."""
        from arelbo.data import to_float

        data = self._resident.get(split)
        x = batch if data is None else to_float(data[batch])
        if self.cfg.train.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train_dataloader(self) -> DataLoader:
        d, t = self.cfg.data, self.cfg.train
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = EpochSampler(len(self.splits.train), d.batch_size, d.shuffle, t.seed, d.drop_last, rank, world)
        sampler.skip_batches, self._resume_skip = self._resume_skip, 0
        if len(sampler) == 0:
            raise ConfigError(
                f"the training split has {len(self.splits.train)} samples, fewer than one batch of "
                f"data.batch_size={d.batch_size}; lower the batch size or set data.drop_last=false"
            )
        return self._loader(self.splits.train, sampler, d.batch_size // world, "train")

    def val_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = ShardSampler(len(self.splits.val), rank, world)
        self._val_offset = sampler.lo
        return self._loader(self.splits.val, sampler, self.cfg.data.eval_batch_size, "val")

    # ---- optimisation

    def _param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups and their settings from the config (to build the optimiser, and to
        put the config back into a restored one on resume)."""
        t = self.cfg.train
        prior_ids = {id(p) for p in self.model.prior.parameters()}
        decay = [p for p in self.model.parameters() if p.requires_grad and id(p) not in prior_ids]
        groups = [{"params": decay, "lr": t.lr, "weight_decay": t.weight_decay}]
        # a learnable prior's parameters: never weight-decayed (decay would pull the prior towards a point mass at 0)
        prior_params = [p for p in self.model.prior.parameters() if p.requires_grad]
        if prior_params:
            groups.append({"params": prior_params, "lr": t.lr, "weight_decay": 0.0})
        objective_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        if objective_params:  # e.g. the "learned" policy's log sigma2: never weight-decayed, maybe its own lr
            groups.append({"params": objective_params, "lr": t.lr, "weight_decay": 0.0,
                           **self.loss_fn.policy.optimizer_options()})
        return groups

    def configure_optimizers(self):
        t = self.cfg.train
        cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        optimizer = cls(self._param_groups(), lr=t.lr, betas=tuple(t.betas))
        if t.schedule == "none" and t.warmup_steps == 0:
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, cosine = t.warmup_steps, t.schedule == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _noise(self, mu: Tensor) -> Tensor:
        """This process's slice of the global batch's noise (so N processes draw what 1 process would)."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        b = mu.shape[0]
        eps = torch.randn(b * world, mu.shape[1], device=mu.device, dtype=mu.dtype)
        return eps[rank * b : (rank + 1) * b]

    def _all_reduce(self, t: Tensor, op=None) -> Tensor:
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = t.clone()
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x = self._inputs(batch, "train")
        mu, logvar = self.model.encode(x)
        z = mu + self._noise(mu) * (0.5 * logvar).exp()
        x_hat = self.model.decode(z)
        out = self.loss_fn(x, x_hat, mu, logvar, rate=self.model.rate(mu, logvar, z))  # rate None: closed form
        step, world = self.global_step, self.trainer.world_size
        self._record_finite(out.loss, batch_idx)  # no host sync: read at the next check
        if step % self.cfg.train.log_every_n_steps == 0:
            values = torch.stack([
                out.loss.detach().float(),
                out.distortion.detach().float().mean() / out.num_elements,
                out.distortion.detach().float().mean(),
                out.rate.detach().float().mean(),
                out.sigma2_mean.float(),
                out.neg_elbo.detach().float(),
                self._bad_flag(),
            ])
            v = self._all_reduce(values).tolist()  # sums over processes (last entry: any non-finite); one sync
            if v[-1] > 0:
                self._raise_non_finite()
            self._unchecked.clear()
            names = ("loss", "mse", "distortion", "rate", "sigma2", "neg_elbo")
            record = {name: value / world for name, value in zip(names, v)}
            record["bits_per_dim"] = record["neg_elbo"] / (out.num_elements * math.log(2.0))
            record["lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
            self._write("train", record)
            self.bar_values = {"loss": record["loss"], "sigma2": record["sigma2"]}
        return out.loss

    # ---- the NaN/inf guard

    def _record_finite(self, loss: Tensor, batch_idx: int) -> None:
        """Remember (on the device) the step of the first non-finite loss since the last check."""
        loss = loss.detach().float()
        if self._bad_step is None or self._bad_step.device != loss.device:
            self._bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_loss = torch.zeros((), device=loss.device)
        new = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step = torch.where(new, self.global_step, self._bad_step)
        self._bad_loss = torch.where(new, loss, self._bad_loss)
        self._unchecked[int(self.global_step)] = (int(self.current_epoch), int(batch_idx))

    def _bad_flag(self) -> Tensor:
        if self._bad_step is None:
            return torch.zeros((), device=self.device)
        return (self._bad_step >= 0).float()

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a training loss since the last check was NaN or inf.

        One host sync (and, with several processes, one all-reduce: every process must call it at the same
        point). Called on logging steps, before validation and before every checkpoint is written, so a
        checkpoint never holds the state a non-finite step produced."""
        if not self._unchecked:
            return
        if float(self._all_reduce(self._bad_flag().reshape(1))[0]) > 0:
            self._raise_non_finite()
        self._unchecked.clear()

    def _raise_non_finite(self) -> None:
        step_t = torch.where(self._bad_step >= 0, self._bad_step, torch.iinfo(torch.long).max).reshape(1)
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            step_t = self._all_reduce(step_t, dist.ReduceOp.MIN)  # the first bad step over all processes
        step = int(step_t[0])
        epoch, batch_idx = self._unchecked.get(step, (self.current_epoch, -1))
        local = int(self._bad_step) == step
        value = f"{float(self._bad_loss)}" if local else "nan or inf"
        last = self.run_dir / runs.CHECKPOINT_DIR / "last.pt" if self.run_dir else None
        where = f"; the last good checkpoint is {last}" if last is not None and last.is_file() else ""
        late = f", detected at step {self.global_step}" if self.global_step != step else ""
        raise NonFiniteLossError(
            f"non-finite loss ({value}) at global step {step} (epoch {epoch}, batch {batch_idx}) with policy "
            f"{self.cfg.objective.policy!r}: training stopped{late}{where}"
        )

    @torch.no_grad()
    def state_is_finite(self) -> bool:
        """Whether the current state may become a checkpoint: every parameter, buffer and optimiser tensor is
        finite and the model encodes and decodes a few validation (else training) examples to finite values
        (finite weights can still overflow, e.g. a posterior log-variance of 587)."""
        tensors = [*self.model.state_dict().values(), *self.loss_fn.state_dict().values()]
        for opt in self.trainer.optimizers if self._trainer is not None else ():
            tensors += [v for state in opt.state.values() for v in state.values() if isinstance(v, Tensor)]
        if not all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
            return False
        from arelbo.data import ImageTensorDataset

        data = self.splits.val if len(self.splits.val) else self.splits.train
        x = ImageTensorDataset(data).__getitems__(list(range(min(16, len(data))))).to(self.device)
        g = torch.Generator().manual_seed(_seed_for(self.cfg.train.seed, 4))  # never the global RNG
        training = self.model.training
        self.model.eval()
        try:
            mu, logvar = self.model.encode(x)
            std = (0.5 * logvar).exp()
            x_hat = self.model.decode(mu + torch.randn(mu.shape, generator=g).to(mu) * std)
        finally:
            self.model.train(training)
        return all(bool(torch.isfinite(t).all()) for t in (mu, logvar, std, x_hat))

    def _write(self, split: str, record: dict[str, Any]) -> None:
        """One record into metrics.jsonl and TensorBoard (process 0 only)."""
        if not self.trainer.is_global_zero:
            return
        full = {"split": split, "step": int(self.global_step), "epoch": int(self.current_epoch), **record}
        if self.run_dir is not None:
            runs.append_jsonl(self.run_dir / "metrics.jsonl", full)
        scalars = {f"{split}/{k}": float(v) for k, v in record.items() if isinstance(v, (int, float))}
        for logger in self.loggers:
            logger.log_metrics(scalars, step=int(self.global_step))

    # ---- validation

    def teardown(self, stage: str) -> None:
        # The last hook a process started by ddp_spawn runs before it exits: destroy its process group here, or
        # gloo's threads can abort it during interpreter shutdown (SIGABRT, "terminate called without an active
        # exception") after training has finished. Processes that go on after fit (script launch) keep theirs.
        import multiprocessing

        if multiprocessing.parent_process() is not None and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def on_train_start(self) -> None:
        # Every process starts the noise stream from the same point, whatever happened before (model init in
        # one process, a re-seed in spawned ones); a resumed run replaces it with the saved state at its first step.
        if not self._resuming:
            import random

            seed = _seed_for(self.cfg.train.seed, 3)
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
        else:
            self._apply_optimizer_settings()

    def _apply_optimizer_settings(self) -> None:
        """Put the config's lr, betas and weight decay into the restored optimiser (and lr schedule), so that a
        resume with ``--set train.lr=...`` trains with what config.yaml says. Unchanged values are set to what
        they already are (bit for bit: the schedule's own formula), so an exact resume stays exact."""
        optimizer = self.trainer.optimizers[0]
        configs = self.trainer.lr_scheduler_configs
        scheduler = configs[0].scheduler if configs else None
        for i, (group, wanted) in enumerate(zip(optimizer.param_groups, self._param_groups())):
            group["betas"] = tuple(self.cfg.train.betas)
            for key, value in wanted.items():
                if key not in ("params", "lr"):
                    group[key] = value
            if scheduler is None:
                group["lr"] = wanted["lr"]
            else:
                scheduler.base_lrs[i] = group["initial_lr"] = wanted["lr"]
                group["lr"] = wanted["lr"] * scheduler.lr_lambdas[i](scheduler.last_epoch)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._resume_rng is not None:  # the first step after a resume continues the saved generators
            runs.set_rng_state(self._resume_rng)
            self._resume_rng = None

    def on_train_epoch_start(self) -> None:
        self.last_val = None

    def on_validation_epoch_start(self) -> None:
        self.check_finite()  # never validate (or then checkpoint) a state a non-finite step produced
        from arelbo.metrics.likelihood import ELBOAccumulator

        q = self.model.latent_dim
        self._val_acc = ELBOAccumulator(per_sample_floor=self.loss_fn.policy.floor)
        self._val_mu = torch.zeros(2, q, dtype=torch.float64, device=self.device)  # sums of mu and mu^2
        # Noise for the whole validation set from a (seed, epoch) generator, indexed by sample: the result does
        # not depend on the number of processes, and validation never touches the global RNG (exact resume).
        g = torch.Generator().manual_seed(_seed_for(self.cfg.train.seed, self.current_epoch, 2))
        self._val_eps = torch.randn(len(self.splits.val), q, generator=g).to(self.device)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        x = self._inputs(batch, "val")
        mu, logvar = self.model.encode(x)
        start = self._val_offset + batch_idx * self.cfg.data.eval_batch_size
        eps = self._val_eps[start : start + x.shape[0]].to(mu.dtype)
        z = mu + eps * (0.5 * logvar).exp()
        x_hat = self.model.decode(z)
        diff = x.flatten(1).double() - x_hat.flatten(1).double()
        # rate None: the prior's KL is in closed form (per dimension); else its one-sample Monte-Carlo estimate
        self._val_acc.update(diff * diff, mu, logvar, self.model.rate(mu, logvar, z))
        self._val_mu += torch.stack([mu.double().sum(0), mu.double().pow(2).sum(0)])

    def on_validation_epoch_end(self) -> None:
        acc = self._val_acc
        d, q = self.num_elements, self.model.latent_dim
        if acc.num_examples == 0:  # this process had no validation batch: contribute zeros to the sums
            dev = self.device
            acc.update(torch.zeros(0, d, dtype=torch.float64, device=dev), torch.zeros(0, q, device=dev),
                       torch.zeros(0, q, device=dev),
                       None if self.model.prior.closed_form_kl else torch.zeros(0, dtype=torch.float64, device=dev))
        acc.reduce(self._all_reduce)
        mu_sums = self._all_reduce(self._val_mu)
        n = acc.num_examples
        if n == 0:
            return
        # the policy's own held-out rule, the one ``arelbo eval`` applies to the test split
        res = acc.result(self.loss_fn.policy)
        nelbo = res.neg_elbo
        s2 = acc.per_sample_sigma2_mean if res.sigma2 is None else res.sigma2_mean
        distortion, kl = res.distortion, res.rate
        sums = {"mu": mu_sums[0], "mu2": mu_sums[1]}
        var_mu = (sums["mu2"] / n - (sums["mu"] / n).pow(2)).clamp_min(0)
        record = {
            "neg_elbo": nelbo,
            "bits_per_dim": nelbo / (d * math.log(2.0)),
            "mse": distortion / d,
            "distortion": distortion,
            "kl": kl,
            "sigma2": s2,
            "active_units": int((var_mu > ACTIVE_UNIT_THRESHOLD).sum().item()),
            # KL per dimension exists only for a factorised prior with closed-form KL (README: Priors)
            "kl_per_dim": None if res.kl_per_dim is None else [float(v) for v in res.kl_per_dim],
            "var_mu": [float(v) for v in var_mu.tolist()],
            "n": int(n),
        }
        if not all(math.isfinite(v) for v in (nelbo, distortion, kl, s2)):
            last = self.run_dir / runs.CHECKPOINT_DIR / "last.pt" if self.run_dir else None
            where = f"; the last good checkpoint is {last}" if last is not None and last.is_file() else ""
            raise NonFiniteLossError(
                f"non-finite validation -ELBO ({nelbo}) after global step {self.global_step} (epoch "
                f"{self.current_epoch}) with policy {self.cfg.objective.policy!r}: the model diverged; training "
                f"stopped{where}"
            )
        self.last_val = record
        self._write("val", record)
        # already global values: the sync only keeps Lightning's epoch-level bookkeeping consistent
        self.log("val_nelbo", nelbo, prog_bar=True, logger=False, sync_dist=True)
        self.log("val_au", float(record["active_units"]), prog_bar=True, logger=False, sync_dist=True)

    # ---- checkpoint contents (the format of arelbo.runs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.pop("state_dict")
        checkpoint["model"] = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
        checkpoint["objective"] = {k[8:]: v for k, v in state.items() if k.startswith("loss_fn.")}
        checkpoint["config"] = self.cfg.to_dict()
        checkpoint["data_shape"] = list(self.data_shape)
        checkpoint["policy"] = self.cfg.objective.policy
        checkpoint["rng"] = runs.rng_state()
        checkpoint["val"] = self.last_val
        # batches of the current epoch done: > 0 for a checkpoint written right after a step (between the
        # step's processing and its completion in Lightning's count); 0 at an epoch end, where the next starts
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        checkpoint["epoch_batches_done"] = int(progress.processed) if progress.processed > progress.completed else 0
        checkpoint["saved_at"] = datetime.now().isoformat(timespec="seconds")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" not in checkpoint:
            checkpoint["state_dict"] = {
                **{f"model.{k}": v for k, v in checkpoint["model"].items()},
                **{f"loss_fn.{k}": v for k, v in checkpoint.get("objective", {}).items()},
            }
        self._resume_rng = checkpoint.get("rng")
        self._resuming = True
        self._resume_skip = int(checkpoint.get("epoch_batches_done", 0))


# --------------------------------------------------------------------------------------------------------------
# Checkpoint IO and callback


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
            runs.atomic_write_bytes(path, buffer.getvalue())

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
            runs.atomic_write_bytes(self.dir / "best.pt", last.read_bytes())

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


# --------------------------------------------------------------------------------------------------------------
# Running


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


def _clear_early_files(run_dir: Path) -> None:
    import shutil

    for name in _EARLY_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in _EARLY_DIRS:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def check_environment(cfg: RunConfig) -> None:
    """Settings that depend on this machine, checked before anything is written."""
    t = cfg.train
    _check_precision(t)
    if t.accelerator == "gpu":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == 0:
            raise ConfigError("train.accelerator=gpu but no GPU is available here; use train.accelerator=cpu or auto")
        if t.devices > available:
            raise ConfigError(f"train.devices={t.devices} but only {available} GPU(s) are available")
    if cfg.data.batch_size % t.devices:
        raise ConfigError(f"data.batch_size {cfg.data.batch_size} must be divisible by train.devices {t.devices}")


def prepare(cfg: RunConfig, splits=None):
    """Validate everything that can be validated before a run directory is created or changed: the machine,
    the data (loaded here; returned), the model and objective (built once), the batch count."""
    check_environment(cfg)
    if splits is None:
        splits = load_splits(cfg)
    build_model(cfg.model, splits.shape)
    cfg.objective.build()
    d = cfg.data
    if len(EpochSampler(len(splits.train), d.batch_size, d.shuffle, cfg.train.seed, d.drop_last)) == 0:
        raise ConfigError(
            f"the training split has {len(splits.train)} samples, fewer than one batch of "
            f"data.batch_size={d.batch_size}; lower the batch size or set data.drop_last=false"
        )
    return splits


def _strategy(t):
    from lightning.pytorch.strategies import DDPStrategy

    if t.devices == 1:
        if t.strategy != "auto":
            warnings.warn(f"train.strategy={t.strategy} ignored with train.devices=1", stacklevel=2)
        return "auto"
    gpu = t.accelerator == "gpu" or (t.accelerator == "auto" and torch.cuda.is_available())
    start = "popen" if t.strategy == "ddp" else "spawn"
    return DDPStrategy(start_method=start, process_group_backend="nccl" if gpu else "gloo")


def _progress_bar():
    """Lightning's bar showing the last logged loss and sigma2 (host floats): reading a device value on every step
    would cost a host sync per step."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    class ProgressBar(TQDMProgressBar):
        def get_metrics(self, trainer, pl_module):
            return {**super().get_metrics(trainer, pl_module), **getattr(pl_module, "bar_values", {})}

    return ProgressBar()


def _tensorboard_available() -> bool:
    import importlib

    for name in ("tensorboard", "tensorboardX"):
        try:
            importlib.import_module(name)
            return True
        except ImportError:
            pass
    return False


def _check_precision(t) -> None:
    gpu = t.accelerator == "gpu" or (t.accelerator == "auto" and torch.cuda.is_available())
    if t.precision == "16-mixed" and not gpu:
        raise ConfigError(
            "train.precision=16-mixed (float16 with loss scaling) needs a CUDA GPU; on this device use "
            "train.precision=bf16-mixed or 32"
        )


def build_trainer(cfg: RunConfig, run_dir: Path, progress: bool = True, callbacks: Sequence = ()) -> pl.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    t = cfg.train
    _check_precision(t)
    accelerator = {"auto": "auto", "cpu": "cpu", "gpu": "gpu"}[t.accelerator]
    loggers = []
    if _tensorboard_available():
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard", default_hp_metric=False))
    else:
        warnings.warn("TensorBoard events are not written (neither tensorboard nor tensorboardX is installed: "
                      "pip install tensorboard); metrics.jsonl holds every record", stacklevel=2)
    return pl.Trainer(
        accelerator=accelerator,
        devices=t.devices,
        strategy=_strategy(t),
        precision={"32": "32-true"}.get(t.precision, t.precision),
        max_epochs=t.epochs,
        max_steps=-1 if t.max_steps is None else t.max_steps,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        gradient_clip_val=t.grad_clip,
        gradient_clip_algorithm="norm",
        log_every_n_steps=t.log_every_n_steps,
        num_sanity_val_steps=0,
        sync_batchnorm=False,  # VAEModule.setup converts batch norm itself (GlobalBatchNorm: any device)
        use_distributed_sampler=False,  # our samplers shard by (rank, world) themselves
        enable_progress_bar=progress,
        enable_model_summary=progress,
        callbacks=[RunCheckpoint(run_dir, t.checkpoint_every_n_epochs, t.save_best, t.checkpoint_every_n_steps),
                   *([SnapshotCheckpoint(run_dir, t.snapshot_steps)] if t.snapshot_steps else []),
                   *([_progress_bar()] if progress else []), *callbacks],
        plugins=[RunCheckpointIO()],
        logger=loggers or False,
        default_root_dir=str(run_dir),
        deterministic=False,
    )


def _quiet_lightning(progress: bool) -> None:
    import logging

    for pattern in (
        ".*does not have many workers.*",
        ".*smaller than the logging interval.*",
        ".*GPU available but not used.*",
        ".*`isinstance.treespec, LeafSpec.` is deprecated.*",
        ".*resuming from a checkpoint that ended before the epoch ended.*",  # ours resume mid-epoch exactly
    ):
        warnings.filterwarnings("ignore", pattern)
    if not progress:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _is_launched_child() -> bool:
    """True in the extra processes the "ddp" (popen) strategy launches by re-running the command."""
    return os.environ.get(RUN_DIR_ENV) is not None and int(os.environ.get("LOCAL_RANK", "0")) > 0


def _save_sigint():
    import signal
    import threading

    return signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None


def _restore_sigint(handler) -> None:
    import signal

    if handler is not None:
        signal.signal(signal.SIGINT, handler)


def _run(cfg: RunConfig, run_dir: Path, splits, ckpt_path, progress: bool, callbacks) -> Path:
    _quiet_lightning(progress)
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    if splits is None:
        splits = load_splits(cfg)  # spawned processes load their own copy (the module never pickles its data)
    module = VAEModule(cfg, splits.shape, splits, run_dir)
    trainer = build_trainer(cfg, run_dir, progress, callbacks)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    sigint = _save_sigint()
    try:
        trainer.fit(module, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    except SystemExit:
        if not trainer.interrupted:  # Lightning turns Ctrl-C into sys.exit(1) after its graceful shutdown
            raise
    except Exception as err:
        # spawned processes report their exceptions as text: surface a NaN stop as the same error type
        if type(err).__name__ == "ProcessRaisedException" and NonFiniteLossError.__name__ in str(err):
            line = next(ln for ln in str(err).splitlines() if NonFiniteLossError.__name__ in ln)
            raise NonFiniteLossError(line.split(": ", 1)[-1]) from None
        raise
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        _restore_sigint(sigint)  # Lightning ignores SIGINT after a Ctrl-C; give the caller its handler back
    if trainer.interrupted:
        raise TrainingInterrupted(
            f"training interrupted at global step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"continue with: arelbo train --resume {run_dir}"
        )
    if not _is_launched_child() and trainer.is_global_zero:
        _write_samples(run_dir, cfg.train.n_samples, cfg.train.seed)
    return run_dir


def _write_samples(run_dir: Path, n: int, seed: int) -> None:
    from arelbo.imagegrid import make_grid, save_png

    if n <= 0:
        return
    model, _, _ = runs.load_model(run_dir, "last")
    if len(model.shape) != 3 or model.shape[0] not in (1, 3) or min(model.shape[1:]) < 2:
        return  # not images (e.g. Gaussian vectors)
    g = torch.Generator().manual_seed(seed)
    save_png(make_grid(model.sample(n, generator=g)), run_dir / "samples.png")


def fit(cfg: RunConfig, run_dir=None, *, splits=None, progress: bool = True, callbacks: Sequence = (),
        prefix: str | None = None) -> Path:
    """Train a new run from ``cfg`` into ``run_dir`` (default: ``cfg.out_dir/cfg.name``); returns the run dir.

    Everything that can be checked is checked before the directory is created (:func:`prepare`); a directory
    left by a run that stopped before its first checkpoint is started again. The run directory is locked
    while training (:func:`arelbo.runs.run_lock`).
    ``splits``: an already loaded :class:`arelbo.data.Splits` (else loaded from ``cfg.data``).
    ``callbacks``: extra Lightning callbacks (tests use them to interrupt a run).
    """
    _check_precision(cfg.train)  # before a run directory is made
    if _is_launched_child():
        run_dir = Path(os.environ[RUN_DIR_ENV])
        return _run(RunConfig.load(run_dir / "config.yaml"), run_dir, splits, None, progress, callbacks)
    splits = prepare(cfg, splits)
    run_dir = new_run_dir(cfg, run_dir, prefix)
    run_dir.mkdir(parents=True, exist_ok=True)
    with runs.run_lock(run_dir):
        check_run_dir(run_dir)  # again, now that no other process can start here
        _clear_early_files(run_dir)
        cfg.save(run_dir / "config.yaml")
        return _run(cfg, run_dir, splits, None, progress, callbacks)


def _resume_path(run_dir: Path) -> Path:
    path = run_dir / runs.CHECKPOINT_DIR / "last.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"nothing to resume in {run_dir}: no {runs.CHECKPOINT_DIR}/last.pt (the run stopped before its first "
            f"checkpoint); start it again with: arelbo train --config {run_dir / 'config.yaml'} --out {run_dir}"
        )
    return path


RESUMABLE_SECTIONS = ("train",)
# train.* settings a resume cannot apply to the restored state, with the reason (the others are applied)
NOT_RESUMABLE = {
    "seed": "the data order and noise of the steps already taken came from it",
    "optimizer": "the restored optimiser state belongs to the saved optimiser",
    "precision": "the restored state (and loss scaling) was trained at the saved precision",
}


def check_resume(saved: RunConfig, cfg: RunConfig, ckpt: dict, ckpt_path: Path) -> None:
    """Refuse a resume that could not do what ``cfg`` says, before anything is written."""
    for key, why in NOT_RESUMABLE.items():
        old, new = getattr(saved.train, key), getattr(cfg.train, key)
        if old != new:
            raise ConfigError(f"--set train.{key}={new}: cannot change when resuming ({why}); the run keeps "
                              f"{key}={old} (train a new run for another value)")
    mid_epoch = int(ckpt.get("epoch_batches_done", 0)) > 0
    if mid_epoch and saved.train.limit_train_batches != cfg.train.limit_train_batches:
        raise ConfigError("train.limit_train_batches cannot change when resuming from a checkpoint in the middle of "
                          "an epoch (the epoch's length is fixed); resume without it")
    if runs.training_finished(ckpt, cfg):
        step = int(ckpt.get("global_step", 0))
        raise ConfigError(
            f"nothing to resume: {ckpt_path} is at step {step} (epoch {ckpt.get('epoch')}), already the end for "
            f"train.epochs={cfg.train.epochs}, train.max_steps={cfg.train.max_steps}; raise train.epochs (or "
            f"train.max_steps) to train further"
        )


class _StartResumed(pl.Callback):
    """Record a resume once it really starts: the log forgets what came after the checkpoint, config.yaml
    takes the resumed settings (process 0 only)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, step: int):
        self.run_dir, self.cfg, self.step = Path(run_dir), cfg, int(step)

    def on_train_start(self, trainer, module) -> None:
        if trainer.is_global_zero:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            self.cfg.save(self.run_dir / "config.yaml")


def resume(run_dir, overrides: Sequence[str] = (), *, splits=None, progress: bool = True,
           callbacks: Sequence = ()) -> Path:
    """Continue the run in ``run_dir`` from ``checkpoints/last.pt`` exactly where it stopped (mid-epoch too),
    to the configured number of epochs or steps. ``overrides`` (``train.*`` only, e.g. ``train.epochs=20``,
    ``train.lr=1e-4``) are applied to the restored state, or refused (:data:`NOT_RESUMABLE`); config.yaml
    changes only once the resumed training starts."""
    from arelbo.config import apply_overrides, parse_override

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"cannot resume: run directory {run_dir} does not exist")
    saved = runs.read_config(run_dir)
    for text in overrides:
        path, _ = parse_override(text)
        if path[0] not in RESUMABLE_SECTIONS:
            raise ConfigError(f"--set {text}: only train.* settings may change when resuming a run")
    cfg = RunConfig.from_dict(apply_overrides(saved.to_dict(), overrides)) if overrides else saved
    if _is_launched_child():  # a process the "ddp" launch started: the first process holds the lock and writes
        return _run(cfg, run_dir, splits, _resume_path(run_dir), progress, callbacks)
    with runs.run_lock(run_dir):
        ckpt_path = _resume_path(run_dir)
        ckpt = runs.load_checkpoint(ckpt_path)
        check_resume(saved, cfg, ckpt, ckpt_path)
        splits = prepare(cfg, splits)
        if list(splits.shape) != list(ckpt.get("data_shape", splits.shape)):
            raise ValueError(f"the data now have shape {tuple(splits.shape)}, the run was trained on "
                             f"{tuple(ckpt['data_shape'])}: check data.root in {run_dir / 'config.yaml'}")
        start = _StartResumed(run_dir, cfg, int(ckpt.get("global_step", 0)))
        return _run(cfg, run_dir, splits, ckpt_path, progress, [start, *callbacks])


class _StepTimer(pl.Callback):
    """Wall time from the start of step ``first`` to the end of step ``first + n - 1`` (data loading, logging and
    framework overhead between steps included)."""

    def __init__(self, first: int, n: int):
        self.first, self.n = first, n
        self.t0: float | None = None
        self.seconds: float | None = None

    @staticmethod
    def _now(module) -> float:
        if module.device.type == "cuda":  # count queued kernels in the steps that launched them
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.first:
            self.t0 = self._now(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.first + self.n and self.t0 is not None:  # global_step already incremented
            self.seconds = self._now(module) - self.t0


def benchmark_steps(cfg: RunConfig, splits, steps: int, warmup: int = 5) -> float:
    """Seconds per training step of this pipeline (Lightning loop, logging, NaN guard; no validation) on ``cfg``'s
    model, objective and batch size, timed over ``steps`` steps after ``warmup``; for benchmarks/bench_train.py."""
    import shutil
    import tempfile

    from arelbo.config import apply_overrides

    overrides = [f"train.max_steps={warmup + steps}", "train.epochs=1000", "train.limit_val_batches=0",
                 "train.n_samples=0", "name=null"]
    cfg = RunConfig.from_dict(apply_overrides(cfg.to_dict(), overrides))
    timer = _StepTimer(warmup, steps)
    tmp = Path(tempfile.mkdtemp(prefix="arelbo-bench-"))
    try:
        fit(cfg, tmp / "run", splits=splits, progress=False, callbacks=[timer])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if timer.seconds is None:
        raise RuntimeError(f"benchmark did not reach step {warmup + steps}")
    return timer.seconds / steps


def _truncate_metrics(path: Path, step: int) -> None:
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

    runs.atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
