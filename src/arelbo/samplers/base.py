"""The sampler interface and its registry: ``fit(model, loader)`` once, then ``sample(n, generator)`` codes."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Iterable

import torch
from torch import Tensor

from arelbo.registry import build, register

__all__ = ["LatentSampler", "SAMPLERS", "register_sampler", "make_sampler", "standard_normal", "SAMPLER_FORMAT"]

SAMPLER_FORMAT = 1


class LatentSampler:
    """Base class. ``fit(model, train_loader)`` then ``sample(n, generator) -> (n, q)`` latent codes (float32, CPU).

    ``config()`` returns the constructor arguments (so ``make_sampler(name, **config)`` rebuilds it) and
    ``state_dict()`` the fitted state.
    """

    name: ClassVar[str] = ""
    # set on samplers that define a study method of their own: the policy its first stage trains with
    first_stage_policy: ClassVar[str | None] = None
    study_label: ClassVar[str] = ""
    # the scale of the prior standard deviations of the latent groups below the code (hierarchical models), when
    # decoded: 1, the model's own p(z_l | z_<l); the prior sampler's temperature option sets it for itself
    temperature: float = 1.0

    def __init__(self):
        self.latent_dim: int | None = None
        self.fit_info: dict[str, Any] = {}
        self.val_loader: Iterable | None = None
        self._codes: dict = {}

    # -- interface
    def fit(self, model, loader: Iterable, max_examples: int | None = None, progress: bool | str = False,
            val_loader: Iterable | None = None, codes: dict | None = None) -> "LatentSampler":
        """Fit on the training data ``loader``; ``val_loader`` (held-out data, optional) is where samplers that
        choose something (a component count, when to stop) judge it (``self.val_loader`` in ``_fit``).

        ``codes``: a dict shared by the samplers fitted on the same model and loaders, where :meth:`encode` keeps
        the posteriors it computed (an evaluation encodes the training split once, not once per sampler)."""
        self.latent_dim = int(model.code_dim)
        self.val_loader = val_loader
        self._codes = {} if codes is None else codes
        try:
            self._fit(model, loader, max_examples, progress)
        finally:
            self.val_loader, self._codes = None, {}
        return self

    def encode(self, model, loader: Iterable, max_examples: int | None = None,
               progress: bool | str = False) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of the code samplers model, for every example of ``loader`` (``encode_dataset``), computed
        once per loader within the ``codes`` dict given to :meth:`fit`."""
        from arelbo.metrics.collapse import encode_dataset

        key = (id(loader), max_examples)
        if key not in self._codes:
            self._codes[key] = encode_dataset(model, loader, max_examples, progress)
        return self._codes[key]

    def _fit(self, model, loader, max_examples, progress) -> None:
        pass

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def fitted(self) -> bool:
        return self.latent_dim is not None

    def _check_fitted(self):
        if not self.fitted:
            raise ValueError(f"sampler {self.name!r} is not fitted: call fit(model, train_loader) or load a state first")

    def config(self) -> dict[str, Any]:
        params = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {p: getattr(self, p) for p in params}

    def state_dict(self) -> dict[str, Any]:
        return {"latent_dim": self.latent_dim, "fit_info": dict(self.fit_info)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.latent_dim = None if state.get("latent_dim") is None else int(state["latent_dim"])
        self.fit_info = dict(state.get("fit_info", {}))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args}{', unfitted' if not self.fitted else ''})"


SAMPLERS: dict[str, type[LatentSampler]] = {}


def register_sampler(cls: type[LatentSampler]) -> type[LatentSampler]:
    return register(SAMPLERS, cls, "sampler")


def make_sampler(name: str, **kwargs) -> LatentSampler:
    """Build a registered sampler by name; unknown names and arguments are errors that list what is valid."""
    return build(SAMPLERS, name, kwargs, kind="sampler", long_kind="sampler", plural="samplers")


def standard_normal(n: int, q: int, generator: torch.Generator | None) -> Tensor:
    return torch.randn(n, q, generator=generator, device=generator.device if generator is not None else "cpu").cpu()


