"""The Lightning module: (VAE, GaussianVAELoss) from a RunConfig, its logging, NaN guard and validation."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from arelbo import runs
from arelbo.config import ConfigError, RunConfig
from arelbo.metrics.collapse import ACTIVE_UNIT_THRESHOLD
from arelbo.models import build_model
from arelbo.models.batchnorm import convert_batchnorm
from arelbo.models.outputs import SplitNoise, generator_noise
from arelbo.train.data import EpochSampler, ShardSampler, load_splits, seed_for
from arelbo.train.errors import NonFiniteLossError

__all__ = ["VAEModule"]

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
        self.loss_fn.attach(self.model)  # e.g. the variance head's initial value (a resume loads over it)
        self.splits = splits
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.num_elements = math.prod(self.data_shape)
        self.last_val: dict[str, Any] | None = None
        self._resume_rng: dict | None = None
        self._resuming = False
        self._resume_skip = 0  # batches of the interrupted epoch already trained on (a mid-epoch checkpoint)
        self._val_acc = None  # arelbo.metrics.ELBOAccumulator during validation
        self._val_mu: Tensor | None = None
        self._val_noise: SplitNoise | None = None
        self._val_offset = 0
        self._resident: dict[str, Tensor] = {}  # split -> its uint8 samples on the accelerator
        self._bad_step: Tensor | None = None  # device: global step of the first non-finite loss since the last check
        self._bad_loss: Tensor | None = None  # device: that loss
        self._unchecked: dict[int, tuple[int, int]] = {}  # host: step -> (epoch, batch) since the last check
        self.bar_values: dict[str, float] = {}  # last logged values, for the progress bar (host floats)
        self.skipped_updates = 0  # updates skipped by train.skip_grad_norm since the run began

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
            mode = None if t.compile_mode == "default" else t.compile_mode
            for part in self.model.children():
                part.compile(mode=mode)
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
            generator=torch.Generator().manual_seed(seed_for(self.cfg.train.seed, 1)),
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
        head = getattr(self.model, "variance_head", None)
        head_params = [] if head is None else [p for p in head.parameters() if p.requires_grad]
        own = prior_ids | {id(p) for p in head_params}
        decay = [p for p in self.model.parameters() if p.requires_grad and id(p) not in own]
        groups = [{"params": decay, "lr": t.lr, "weight_decay": t.weight_decay}]
        if head_params:  # the decoder's variance head: the policy may give it its own learning rate
            groups.append({"params": head_params, "lr": t.lr, "weight_decay": t.weight_decay,
                           **self.loss_fn.policy.head_optimizer_options()})
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
        fused = {"fused": True} if t.fused_optimizer else {}  # else torch's default (foreach on GPUs)
        optimizer = cls(self._param_groups(), lr=t.lr, betas=tuple(t.betas), **fused)
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

    def _noise(self, like: Tensor) -> Tensor:
        """This process's slice of the global batch's noise (so N processes draw what 1 process would)."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        b = like.shape[0]
        eps = torch.randn(b * world, *like.shape[1:], device=like.device, dtype=like.dtype)
        return eps[rank * b : (rank + 1) * b]

    def _all_reduce(self, t: Tensor, op=None) -> Tensor:
        if self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = t.clone()
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x = self._inputs(batch, "train")
        warmup = self.cfg.train.kl_warmup_steps
        if warmup:
            self.loss_fn.kl_weight = min(1.0, (self.global_step + 1) / warmup)
        out = self.loss_fn(x, self.model(x, noise=self._noise))
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
            if self.cfg.train.kl_warmup_steps:
                record["kl_weight"] = self.loss_fn.kl_weight
            if self.cfg.train.skip_grad_norm is not None:
                record["skipped_updates"] = self.skipped_updates
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
        g = torch.Generator().manual_seed(seed_for(self.cfg.train.seed, 4))  # never the global RNG
        training = self.model.training
        self.model.eval()
        try:
            output = self.model(x, noise=generator_noise(g))
        finally:
            self.model.train(training)
        values = [output.x_hat, *(t for grp in output.groups for t in (grp.mu, grp.logvar, (0.5 * grp.logvar).exp()))]
        return all(bool(torch.isfinite(t).all()) for t in values)

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

            seed = seed_for(self.cfg.train.seed, 3)
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

        self._val_acc = ELBOAccumulator(per_sample_floor=self.loss_fn.policy.floor)
        units = sum(math.prod(s) for s in self.model.latent_shapes.values())
        self._val_mu = torch.zeros(2, units, dtype=torch.float64, device=self.device)  # sums of mu and mu^2
        # Noise for the whole validation set from a (seed, epoch) generator, indexed by sample: the result does
        # not depend on the number of processes, and validation never touches the global RNG (exact resume).
        g = torch.Generator().manual_seed(seed_for(self.cfg.train.seed, self.current_epoch, 2))
        self._val_noise = SplitNoise(g, len(self.splits.val), self.device)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        x = self._inputs(batch, "val")
        start = self._val_offset + batch_idx * self.cfg.data.eval_batch_size
        output = self.model(x, noise=self._val_noise.rows(start))
        diff = x.flatten(1).double() - output.x_hat.flatten(1).double()
        # each group's rate: closed-form KL per unit, or a learnable prior's one-sample Monte-Carlo estimate
        self._val_acc.update_output(diff * diff, output)
        if len(output.groups) > 1:  # active units: every group at its posterior mean given the groups above
            output = self.model(x, sample=False)
        mu = torch.cat([g.mu.double().flatten(1) for g in output.groups], 1)
        self._val_mu += torch.stack([mu.sum(0), mu.pow(2).sum(0)])

    def on_validation_epoch_end(self) -> None:
        acc = self._val_acc
        d, shapes = self.num_elements, self.model.latent_shapes
        # a process with no validation batch contributes zeros to the sums
        acc.start_empty(d, sum(math.prod(s) for s in shapes.values()), tuple(shapes), not self.model.closed_form_rate,
                        self.device)
        acc.reduce(self._all_reduce)
        mu_sums = self._all_reduce(self._val_mu)
        n = acc.num_examples
        if n == 0:
            return
        # the policy's own held-out rule, the one ``arelbo eval`` applies to the test split
        res = acc.result(self.loss_fn.policy)
        nelbo = res.neg_elbo
        per_sample = res.sigma2 is None and not self.loss_fn.policy.needs_x_logvar  # sigma2(z): its mean
        s2 = acc.per_sample_sigma2_mean if per_sample else res.sigma2_mean
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
            "active_units_per_group": self._per_group(var_mu > ACTIVE_UNIT_THRESHOLD),
            # KL per dimension exists only for a factorised prior with closed-form KL (README: Priors)
            "kl_per_dim": None if res.kl_per_dim is None else [float(v) for v in res.kl_per_dim],
            "kl_per_group": res.rate_per_group,
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

    def _per_group(self, active: Tensor) -> dict[str, int]:
        """Active units of each latent group from the per-unit mask (groups flattened in order)."""
        out, start = {}, 0
        for name, shape in self.model.latent_shapes.items():
            units = math.prod(shape)
            out[name] = int(active[start : start + units].sum())
            start += units
        return out

    # ---- checkpoint contents (the format of arelbo.runs)

    def on_before_optimizer_step(self, optimizer) -> None:
        """``train.skip_grad_norm``: an update whose gradient norm (before any clipping) exceeds it, or is not
        finite, is skipped, as VDVAE does: every gradient is dropped, so the optimiser leaves the parameters and its
        moments as they are. One host sync per step while the option is on."""
        limit = self.cfg.train.skip_grad_norm
        if limit is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params]))
        if not bool(torch.isfinite(norm)) or float(norm) > limit:
            for p in params:
                p.grad = None
            self.skipped_updates += 1

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.pop("state_dict")
        checkpoint["model"] = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
        checkpoint["objective"] = {k[8:]: v for k, v in state.items() if k.startswith("loss_fn.")}
        checkpoint["config"] = self.cfg.to_dict()
        checkpoint["data_shape"] = list(self.data_shape)
        checkpoint["policy"] = self.cfg.objective.policy
        checkpoint["rng"] = runs.rng_state()
        checkpoint["val"] = self.last_val
        checkpoint["skipped_updates"] = int(self.skipped_updates)
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
        self.skipped_updates = int(checkpoint.get("skipped_updates", 0))
        self._resuming = True
        self._resume_skip = int(checkpoint.get("epoch_batches_done", 0))

