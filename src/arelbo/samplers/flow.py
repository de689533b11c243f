"""``flow``: a masked autoregressive flow (zuko MAF) fitted to the training codes by maximum likelihood."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from arelbo.samplers.base import LatentSampler, register_sampler, standard_normal

__all__ = ["FlowSampler"]


@register_sampler
class FlowSampler(LatentSampler):
    """A masked autoregressive flow (zuko MAF) fitted to the training codes by maximum likelihood.

    The codes are standardised (mean and scale kept) and Adam trains on them in minibatches of ``batch_size``; after
    each epoch the negative log-likelihood of held-out codes is measured and the best state is kept; training stops
    after ``patience`` epochs without improvement or ``max_epochs``. Held-out codes: those of the ``val_loader``
    given to :meth:`fit` (the validation split), else a seeded ``val_fraction`` of the training codes, which are
    then not trained on. ``codes``: ``"mean"`` (mu(x), as the GMM sampler) or ``"sample"`` (z ~ q(z|x),
    redrawn each epoch: the aggregate posterior). ``seed`` drives initialisation, split, batches and noise; the
    global RNG is left untouched.
    """

    name = "flow"

    def __init__(self, transforms: int = 4, hidden: Sequence[int] = (128, 128), codes: str = "mean",
                 max_epochs: int = 100, patience: int = 10, batch_size: int = 512, lr: float = 1e-3,
                 val_fraction: float = 0.1, seed: int = 0):
        super().__init__()
        if codes not in ("sample", "mean"):
            raise ValueError(f"codes must be 'sample' or 'mean', got {codes!r}")
        if transforms < 1 or not hidden or min(hidden) < 1:
            raise ValueError(f"need transforms >= 1 and positive hidden widths, got {transforms}, {hidden}")
        if max_epochs < 1 or patience < 1 or batch_size < 1 or not lr > 0 or not 0 < val_fraction < 1:
            raise ValueError("need max_epochs >= 1, patience >= 1, batch_size >= 1, lr > 0, 0 < val_fraction < 1")
        self.transforms, self.hidden, self.codes = int(transforms), [int(h) for h in hidden], codes
        self.max_epochs, self.patience, self.batch_size = int(max_epochs), int(patience), int(batch_size)
        self.lr, self.val_fraction, self.seed = float(lr), float(val_fraction), int(seed)
        self.flow = None
        self.shift: Tensor | None = None  # (q,) code mean
        self.scale: Tensor | None = None  # (q,) code standard deviation

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["hidden"] = list(cfg["hidden"])
        return cfg

    def _build(self, latent_dim: int):
        from arelbo.models.priors import build_maf

        self.flow = build_maf(latent_dim, self.transforms, self.hidden, identity=True)

    def _fit(self, model, loader, max_examples, progress) -> None:
        mu, logvar = self.encode(model, loader, max_examples, progress and "flow: encoding")
        val = None
        if self.val_loader is not None:
            val = self.encode(model, self.val_loader, None, progress and "flow: encoding held-out data")
        self.fit_codes(mu, logvar, progress=progress, val=val)

    def fit_codes(self, mu: Tensor, logvar: Tensor | None = None, progress: bool | str = False,
                  val: tuple[Tensor, Tensor | None] | None = None) -> "FlowSampler":
        """Fit to codes (N, q) directly (``logvar`` needed for codes='sample'); ``val``: held-out (mu, logvar)
        for early stopping (default: a ``val_fraction`` of these codes)."""
        import copy

        mu = mu.detach().float().cpu()
        if mu.dim() != 2 or mu.shape[0] < 2:
            raise ValueError(f"need (N, q) codes with N >= 2, got {tuple(mu.shape)}")
        std = None
        if self.codes == "sample":
            if logvar is None:
                raise ValueError("codes='sample' needs the posterior log-variances")
            std = (0.5 * logvar.detach().float().cpu()).exp()
        n, q = mu.shape
        self.latent_dim = q
        self.shift = mu.mean(0)
        self.scale = mu.std(0).clamp_min(1e-6)
        gen = torch.Generator().manual_seed(self.seed)

        def codes(idx, m=mu, s=std):
            u = m[idx] if s is None else m[idx] + s[idx] * torch.randn(len(idx), q, generator=gen)
            return (u - self.shift) / self.scale

        if val is None:
            perm = torch.randperm(n, generator=gen)
            n_val = min(n - 1, max(1, round(self.val_fraction * n)))
            val_idx, train_idx = perm[:n_val], perm[n_val:]
            val_codes = codes(val_idx)  # drawn once: the same held-out set every epoch
            held_out = f"{self.val_fraction:g} of the training codes"
        else:
            val_mu = val[0].detach().float().cpu()
            val_std = None if std is None else (0.5 * val[1].detach().float().cpu()).exp()
            n_val, train_idx = val_mu.shape[0], torch.arange(n)
            val_codes = codes(torch.arange(n_val), val_mu, val_std)
            held_out = "held-out codes"
        best, best_epoch, best_state, history = float("inf"), -1, None, []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._build(q)
        opt = torch.optim.Adam(self.flow.parameters(), lr=self.lr)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_epochs, desc="flow: training", leave=False)
        epoch = 0
        with torch.enable_grad():
            for epoch in range(self.max_epochs):
                self.flow.train()
                order = train_idx[torch.randperm(len(train_idx), generator=gen)]
                for start in range(0, len(order), self.batch_size):
                    loss = -self.flow().log_prob(codes(order[start : start + self.batch_size])).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                self.flow.eval()
                with torch.no_grad():
                    val_nll = float(-self.flow().log_prob(val_codes).mean())
                history.append(val_nll)
                if bar is not None:
                    bar.update(1)
                if val_nll < best:
                    best, best_epoch, best_state = val_nll, epoch, copy.deepcopy(self.flow.state_dict())
                elif epoch - best_epoch >= self.patience:
                    break
        if bar is not None:
            bar.close()
        if best_state is not None:
            self.flow.load_state_dict(best_state)
        self.flow.eval()
        # held-out NLL of the codes on their own scale: the standardisation's log-Jacobian added back
        log_scale = float(self.scale.log().sum())
        self.fit_info = {"num_codes": int(len(train_idx)), "num_held_out": int(n_val), "held_out": held_out,
                         "epochs": epoch + 1, "best_epoch": best_epoch + 1,
                         "held_out_nll": best + log_scale if best_state is not None else None,
                         "stopped_early": epoch + 1 < self.max_epochs}
        return self

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        self._check_fitted()
        u = standard_normal(n, self.latent_dim, generator)
        with torch.inference_mode():
            z = self.flow().transform.inv(u)
        return (z * self.scale + self.shift).float()

    def log_prob(self, z: Tensor) -> Tensor:
        """(N,) log density of the fitted flow at codes z (N, q), on the codes' own scale."""
        self._check_fitted()
        with torch.no_grad():
            return self.flow().log_prob((z.float() - self.shift) / self.scale) - self.scale.log().sum()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "flow": None if self.flow is None else self.flow.state_dict(),
                "shift": self.shift, "scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state.get("flow") is not None:
            self._build(self.latent_dim)
            self.flow.load_state_dict(state["flow"])
            self.flow.eval()
        self.shift, self.scale = state.get("shift"), state.get("scale")


