"""Typed configuration: dataclasses validated on construction, YAML presets, and ``key=value`` overrides.

Only the model and objective sections live here so far; the pipeline adds its own sections beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from arelbo.objectives import POLICIES


@dataclass
class ModelConfig:
    arch: str = "conv"  # "conv" | "mlp" | "linear" (arelbo.models.ARCHITECTURES)
    latent_dim: int = 16
    hidden: list[int] = field(default_factory=lambda: [32, 64, 128])  # conv channel widths or MLP layer widths
    kernel_size: int = 4
    stride: int = 2
    norm: str = "none"  # conv: none | batch | group | instance; mlp: none | batch | layer
    activation: str = "relu"
    out_activation: str = "sigmoid"  # decoder mean's squashing: sigmoid for images in [0, 1], none for real data
    bias: bool = False  # linear VAE only: affine encoder/decoder

    def __post_init__(self):
        from arelbo.models import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            raise ValueError(f"model.arch {self.arch!r} unknown; known: {', '.join(ARCHITECTURES)}")
        if self.latent_dim < 1:
            raise ValueError(f"model.latent_dim must be >= 1, got {self.latent_dim}")
        if self.arch != "linear" and (not self.hidden or min(self.hidden) < 1):
            raise ValueError(f"model.hidden must be a non-empty list of positive widths, got {self.hidden}")
        if self.kernel_size < 1 or self.stride < 1:
            raise ValueError("model.kernel_size and model.stride must be >= 1")


@dataclass
class ObjectiveConfig:
    policy: str = "ar"  # a name in arelbo.objectives.POLICIES
    sigma2: float = 1.0  # "fixed" only
    beta: float = 1.0  # "beta" only
    init_sigma2: float = 1.0  # "learned" only
    momentum: float = 0.99  # "ar-ema" only
    sigma2_floor: float = 1e-6

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"objective.policy {self.policy!r} unknown; known: {', '.join(sorted(POLICIES))}")
        if not self.sigma2_floor > 0:
            raise ValueError(f"objective.sigma2_floor must be > 0, got {self.sigma2_floor}")

    def policy_kwargs(self) -> dict:
        """The arguments this config's policy takes (the others are ignored by design, so one config serves all)."""
        import inspect

        wanted = set(inspect.signature(POLICIES[self.policy].__init__).parameters) - {"self", "floor"}
        return {k: getattr(self, k) for k in wanted}

    def build(self, check_finite: bool = True):
        from arelbo.objectives import GaussianVAELoss

        return GaussianVAELoss(self.policy, sigma2_floor=self.sigma2_floor, check_finite=check_finite, **self.policy_kwargs())
