"""Typed configuration: dataclasses validated on construction, YAML presets, and ``key=value`` overrides.

A run is described by one :class:`RunConfig` with four sections (``data``, ``model``, ``objective``, ``train``)
plus where the run goes (``out_dir``, ``name``). It is resolved in layers, each checked against the schema::

    defaults  <-  preset (YAML shipped in arelbo/presets/)  <-  --config FILE (YAML)  <-  --set a.b=value ...

Unknown keys at any level are errors that list the valid keys; values of the wrong type are errors that name the
key ("train.epochs must be int, got 'ten'"). ``RunConfig.to_dict`` / ``from_dict`` round-trip exactly, and every
run writes its resolved config as ``config.yaml`` in its run directory.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from arelbo.objectives import DEFAULT_POLICY, POLICIES, policy_options
from arelbo.schema import ConfigError, Section, coerce

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "TrainConfig",
    "RunConfig",
    "load_config",
    "list_presets",
    "preset_text",
    "parse_override",
    "apply_overrides",
    "read_yaml",
    "dump_yaml",
]


# --------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class DataConfig(Section):
    _section = "data"

    name: str = "mnist"  # a name in arelbo.data.DATASETS
    root: Optional[str] = None  # data folder (None: the dataset's default, e.g. MNIST's bundled copy)
    options: dict = field(default_factory=dict)  # dataset options, e.g. {crop: 140, size: 64} for celeba
    batch_size: int = 128  # GLOBAL training batch: split evenly across train.devices
    eval_batch_size: int = 1000  # validation batch per process (does not change any result)
    shuffle: bool = True  # training order: a permutation that depends only on (train.seed, epoch)
    drop_last: bool = True  # drop the last incomplete training batch of each epoch

    def validate(self) -> None:
        self._positive("batch_size", "eval_batch_size")


@dataclass
class ModelConfig(Section):
    _section = "model"

    arch: str = "conv"  # "conv" | "mlp" | "linear" | "hvae" (arelbo.models.ARCHITECTURES)
    latent_dim: int = 16  # the latent vector (hvae: the top group, the code ex-post samplers model)
    hidden: list[int] = field(default_factory=lambda: [32, 64, 128])  # conv channel widths or MLP layer widths
    kernel_size: int = 4
    stride: int = 2
    norm: str = "none"  # conv: none | batch | group | instance; mlp: none | batch | layer
    activation: str = "relu"
    out_activation: str = "sigmoid"  # decoder mean's squashing: sigmoid for images in [0, 1], none for real data
    bias: bool = False  # linear VAE only: affine encoder/decoder
    prior: str = "standard"  # p(z): standard | mog | vamp | flow (arelbo.models.priors.PRIORS)
    prior_options: dict = field(default_factory=dict)  # the prior's options, e.g. {components: 10} for mog/vamp
    layout: str = "7:8,14:4"  # hvae only: the groups below the top one, RES:CHANNELS top to bottom (arelbo.models.hvae)
    width: int = 32  # hvae only: channels of the residual stream
    blocks: int = 1  # hvae only: residual blocks per group and per encoder resolution
    variance_head: bool = False  # conv/mlp/hvae: the decoder also outputs log sigma^2(z) per element (*-conditional)

    def validate(self) -> None:
        from arelbo.models import ARCHITECTURES
        from arelbo.models.priors import PRIORS, prior_options

        if self.prior not in PRIORS:
            raise ConfigError(f"model.prior {self.prior!r} unknown; known: {', '.join(sorted(PRIORS))}")
        unknown = sorted(set(self.prior_options) - set(prior_options(self.prior)))
        if unknown:
            raise ConfigError(f"model.prior_options {unknown} not options of prior {self.prior!r}; valid: "
                              f"{', '.join(prior_options(self.prior)) or 'none'}")
        _check_prior_option_types(PRIORS[self.prior], self.prior_options)
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"model.arch {self.arch!r} unknown; known: {', '.join(ARCHITECTURES)}")
        if self.latent_dim < 1:
            raise ConfigError(f"model.latent_dim must be >= 1, got {self.latent_dim}")
        if self.arch != "linear" and (not self.hidden or min(self.hidden) < 1):
            raise ConfigError(f"model.hidden must be a non-empty list of positive widths, got {self.hidden}")
        if self.kernel_size < 1 or self.stride < 1:
            raise ConfigError("model.kernel_size and model.stride must be >= 1")
        from arelbo.models.vae import VARIANCE_HEAD_ARCHITECTURES

        if self.variance_head and self.arch not in VARIANCE_HEAD_ARCHITECTURES:
            raise ConfigError(f"model.variance_head: the {self.arch!r} decoder has no variance head; use model.arch "
                              f"{', '.join(VARIANCE_HEAD_ARCHITECTURES)}")
        if self.arch == "hvae":
            from arelbo.models.hvae import parse_layout

            try:
                parse_layout(self.layout, self.latent_dim)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if self.width < 4 or self.blocks < 1:
                raise ConfigError(f"model.width must be >= 4 and model.blocks >= 1, got {self.width}, {self.blocks}")


def _check_prior_option_types(cls: type, options: dict) -> None:
    """Each prior option of the type its constructor's default has (read as :mod:`arelbo.registry` reads policy and
    sampler options), so a wrong type is a one-line error naming the option, not one from deep inside the build:
    ``model.prior_options.components must be an integer (default 10), got 'many'``."""
    import inspect

    from arelbo.registry import _describe, _expected_type, _is_a

    params = inspect.signature(cls.__init__).parameters
    for key, value in options.items():
        param = params.get(key)
        if param is None:
            continue
        expected = _expected_type(param.default)
        if expected is not None and value is not None and not _is_a(value, expected):
            raise ConfigError(f"model.prior_options.{key} must be {_describe(expected)} (default "
                              f"{_default_text(param.default)}), got {value!r}")


def _default_text(default) -> str:
    """A default as a config would spell it: lists, not tuples (``hidden`` (128, 128) -> [128, 128])."""
    return repr(list(default)) if isinstance(default, tuple) else repr(default)


# Keys of the objective section before policy options moved to ``objective.options`` (saved runs are upgraded).
LEGACY_OBJECTIVE_KEYS = ("sigma2", "beta", "init_sigma2", "init_mle", "log_sigma2_lr", "momentum", "anneal_steps",
                         "anneal_from")


@dataclass
class ObjectiveConfig(Section):
    _section = "objective"

    policy: str = DEFAULT_POLICY  # a name in arelbo.objectives.POLICIES
    options: dict = field(default_factory=dict)  # the policy's options, e.g. {sigma2: 0.1} for fixed
    sigma2_floor: float = 1e-6

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"objective.policy {self.policy!r} unknown; known: {', '.join(sorted(POLICIES))}")
        self._positive("sigma2_floor")
        valid = policy_options(POLICIES[self.policy])
        for key in self.options:
            if key not in valid:
                raise ConfigError(f"objective.options.{key}: not an option of policy {self.policy!r}; "
                                  f"{_options_text(self.policy)}{_owners_text(key)}")
        # every option of the policy, defaults filled in: config.yaml says what was used
        resolved = {}
        for name, opt in valid.items():
            value = self.options.get(name, opt.default)
            try:
                resolved[name] = coerce(value, opt.type, f"objective.options.{name}")
            except TypeError:  # a type the schema does not check (e.g. a sequence): the constructor does
                resolved[name] = value
        self.options = resolved
        try:
            self.build()
        except ValueError as err:
            raise ConfigError(f"objective.options: {err} (policy {self.policy!r})") from None

    def policy_kwargs(self) -> dict:
        """The policy's constructor arguments: its options."""
        return dict(self.options)

    def build(self, check_finite: bool | str = "auto"):
        """The loss this section describes; ``check_finite`` as :class:`~arelbo.objectives.GaussianVAELoss`'s (its
        default: no device sync per call on accelerators, e.g. in a loop over a model from ``load_model``)."""
        from arelbo.objectives import GaussianVAELoss

        return GaussianVAELoss(self.policy, sigma2_floor=self.sigma2_floor, check_finite=check_finite, **self.options)

    @staticmethod
    def upgrade(d: dict) -> dict:
        """A saved objective section in the older flat form (``sigma2``, ``init_sigma2``, ... beside ``policy``)
        -> the current one: the keys the policy takes move into ``options``, the others are dropped."""
        if not isinstance(d, dict) or not any(k in d for k in LEGACY_OBJECTIVE_KEYS):
            return d
        d = dict(d)
        options = dict(d.get("options") or {})
        cls = POLICIES.get(d.get("policy", DEFAULT_POLICY))
        valid = policy_options(cls) if cls is not None else {}
        for key in LEGACY_OBJECTIVE_KEYS:
            if key in d:
                value = d.pop(key)
                if key in valid:
                    options.setdefault(key, value)
        d["options"] = options
        return d


def _options_text(policy: str) -> str:
    names = list(policy_options(POLICIES[policy]))
    return f"its options: {', '.join(names)}" if names else "it takes no options"


def _owners_text(key: str) -> str:
    owners = [name for name, cls in POLICIES.items() if key in policy_options(cls)]
    return f" ({key} is an option of: {', '.join(owners)})" if owners else ""


def _legacy_hint(section: str, key: str) -> str:
    """For an unknown objective key that is a policy option: where it lives now."""
    if section != "objective" or not any(key in policy_options(cls) for cls in POLICIES.values()):
        return ""
    return f"; policy options live under objective.options (e.g. --set objective.options.{key}=...)"


OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("none", "cosine")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu")
STRATEGIES = ("auto", "ddp", "ddp_spawn")


@dataclass
class TrainConfig(Section):
    _section = "train"

    epochs: int = 10
    max_steps: Optional[int] = None  # stop after this many optimiser steps (None: run all epochs)
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0  # model weights only (never the objective's parameters)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "none"  # none (constant) | cosine (to 0 at the last step); both after warmup_steps
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps
    grad_clip: Optional[float] = None  # clip the gradient norm (None: off)
    skip_grad_norm: Optional[float] = None  # skip an update whose gradient norm exceeds this, as VDVAE (None: off)
    kl_warmup_steps: int = 0  # the rate's weight in the loss rises linearly to 1 over these steps (0: off)
    seed: int = 0  # model init, noise and data order
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed
    devices: int = 1  # processes (CPU) or GPUs; > 1 is data-parallel (DDP, gloo on CPU, nccl on GPU)
    accelerator: str = "auto"  # auto | cpu | gpu
    strategy: str = "auto"  # auto (ddp_spawn when devices > 1) | ddp (script launch, e.g. torchrun) | ddp_spawn
    sync_batchnorm: bool = True  # devices > 1: batch-norm statistics of the global batch (= one process); false: per process
    num_workers: int = 0  # DataLoader workers (in-memory data: 0 is fastest; memory-mapped data: a few read ahead)
    data_on_device: Optional[bool] = None  # copy in-memory data to the accelerator once (None: on GPUs, if it fits)
    channels_last: bool = False  # conv nets: channels-last memory format (often faster convolutions on GPUs)
    compile: bool = False  # torch.compile the encoder and decoder (pays a compile time at the start)
    compile_mode: str = "default"  # with compile: default | reduce-overhead (CUDA graphs: fewer launches) | max-autotune
    fused_optimizer: bool = False  # Adam/AdamW's update as one fused kernel (fewer launches; float-rounding differences)
    log_every_n_steps: int = 50  # training-step records in metrics.jsonl and TensorBoard
    checkpoint_every_n_epochs: int = 1  # write checkpoints/last.pt every N epochs (and always at the end)
    checkpoint_every_n_steps: Optional[int] = 1000  # also every N optimiser steps (a killed run loses < N); null: off
    save_best: bool = True  # keep checkpoints/best.pt, the lowest validation -ELBO
    snapshot_steps: list[int] = field(default_factory=list)  # also keep checkpoints/step-<N>.pt at these steps
    limit_train_batches: Optional[Union[int, float]] = None  # int: batches per epoch; float: fraction
    limit_val_batches: Optional[Union[int, float]] = None
    n_samples: int = 64  # prior samples written to samples.png at the end (0: none)

    def validate(self) -> None:
        self._choice("optimizer", OPTIMIZERS)
        self._choice("schedule", SCHEDULES)
        self._choice("precision", PRECISIONS)
        self._choice("accelerator", ACCELERATORS)
        self._choice("strategy", STRATEGIES)
        self._choice("compile_mode", COMPILE_MODES)
        self._positive("epochs", "lr", "devices", "log_every_n_steps", "checkpoint_every_n_epochs")
        self._positive("weight_decay", "warmup_steps", "num_workers", "n_samples", "kl_warmup_steps", allow_zero=True)
        self._positive("max_steps", "grad_clip", "checkpoint_every_n_steps", "skip_grad_norm")
        if self.seed < 0:
            raise ConfigError(f"train.seed must be >= 0, got {self.seed}")
        self._positive("limit_train_batches", "limit_val_batches", allow_zero=True)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("limit_train_batches", "limit_val_batches"):
            value = getattr(self, name)
            if isinstance(value, float) and value > 1.0:
                raise ConfigError(f"train.{name} as a fraction must be <= 1.0, got {value} (use an int for batches)")
        if self.limit_train_batches == 0:
            raise ConfigError("train.limit_train_batches must be > 0")
        if any(s < 1 for s in self.snapshot_steps):
            raise ConfigError(f"train.snapshot_steps must be global steps >= 1, got {self.snapshot_steps}")
        self.snapshot_steps = sorted(set(self.snapshot_steps))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "objective": ObjectiveConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs"  # run directory = out_dir/name (unless given explicitly, e.g. --out)
    name: Optional[str] = None  # None: <preset or dataset>-<policy>-<timestamp>, filled in when the run starts

    def __post_init__(self):
        for key, cls in SECTIONS.items():
            if not isinstance(getattr(self, key), cls):
                raise ConfigError(f"{key} must be a {cls.__name__} section")
        self.out_dir = coerce(self.out_dir, str, "out_dir")
        self.name = coerce(self.name, Optional[str], "name")
        if not self.out_dir.strip():
            raise ConfigError("out_dir must not be empty (use . for the current directory)")
        if self.name is not None and (self.name.strip() in ("", ".", "..") or "/" in self.name or "\\" in self.name):
            raise ConfigError(f"name {self.name!r} must be a plain folder name inside out_dir (no '/', '..' or '')")
        need = getattr(POLICIES.get(self.objective.policy), "min_batch", 1)
        if self.data.batch_size < need:  # caught here, not at the first training step
            raise ConfigError(f"data.batch_size={self.data.batch_size}: objective.policy {self.objective.policy!r} "
                              f"estimates sigma2 from at least {need} samples per batch; use a larger batch")
        reads_head = getattr(POLICIES.get(self.objective.policy), "needs_x_logvar", False)
        if reads_head and not self.model.variance_head:
            raise ConfigError(f"objective.policy {self.objective.policy!r} needs the decoder's log-variance: set "
                              f"model.variance_head: true (--set model.variance_head=true)")
        if self.model.variance_head and not reads_head:  # an untrained head (and unused parameters under DDP)
            readers = ", ".join(n for n, c in POLICIES.items() if getattr(c, "needs_x_logvar", False))
            raise ConfigError(f"model.variance_head: objective.policy {self.objective.policy!r} does not read the "
                              f"decoder's log-variance, its head would stay untrained; use {readers}, or set "
                              f"model.variance_head=false")

    def to_dict(self) -> dict:
        """Plain nested dict (YAML/JSON-able, weights_only-safe); ``from_dict(to_dict(c)) == c``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "RunConfig":
        """Strict: every key must be in the schema (the error lists the valid ones), every value of its type."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
        check_keys(d, source)
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in SECTIONS:
                kwargs[key] = SECTIONS[key](**(value or {}))
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    def save(self, path) -> None:
        from arelbo.fileio import atomic_write_text

        atomic_write_text(path, self.to_yaml())

    @classmethod
    def load(cls, path) -> "RunConfig":
        """A saved run's config (``config.yaml``); saved configs of older versions are upgraded."""
        data = read_yaml(path)
        try:
            return cls.from_saved(data, source=str(path))
        except ConfigError as err:  # name the file to fix, beside the key (once)
            if str(path) in str(err):
                raise
            raise ConfigError(f"{path}: {err}") from None

    @classmethod
    def from_saved(cls, d: dict, source: str = "config") -> "RunConfig":
        """:meth:`from_dict` for configs written by a run (older layouts upgraded, e.g. flat policy options)."""
        if isinstance(d, dict) and isinstance(d.get("objective"), dict):
            d = {**d, "objective": ObjectiveConfig.upgrade(d["objective"])}
        return cls.from_dict(d, source)


TOP_LEVEL = [f.name for f in dataclasses.fields(RunConfig)]


def _valid_keys(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


def check_keys(d: dict, source: str = "config") -> None:
    """Raise ConfigError on any key not in the schema (top level and inside every section)."""
    for key, value in d.items():
        if key not in TOP_LEVEL:
            raise ConfigError(f"{source}: unknown key {key!r}; valid top-level keys: {', '.join(TOP_LEVEL)}")
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} must be a mapping of settings, got {value!r}")
            valid = _valid_keys(key)
            for sub in value:
                if sub not in valid:
                    raise ConfigError(f"{source}: unknown key {key}.{sub}; valid keys in {key}: {', '.join(valid)}"
                                      f"{_legacy_hint(key, sub)}")


# --------------------------------------------------------------------------------------------------------------
# YAML, presets, overrides


def read_yaml(path) -> dict:
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: give the path of a YAML file (e.g. {path / 'config.yaml'})")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def dump_yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=120)


def _preset_dir():
    from importlib.resources import files

    return files("arelbo") / "presets"


def list_presets() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    resource = _preset_dir() / f"{name}.yaml"
    if not resource.is_file():
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return resource.read_text(encoding="utf-8")


def _load_preset(name: str) -> dict:
    import yaml

    data = yaml.safe_load(preset_text(name)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name!r} is not a mapping")
    return data


def _merge(base: dict, layer: dict) -> dict:
    """Recursive merge: mappings merge key by key (sections and data.options), everything else is replaced."""
    out = dict(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4). The value is read as YAML (``[1, 2]``, ``null``, ``true``)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from err
    return path, value


def apply_overrides(d: dict, overrides) -> dict:
    """Apply ``section.key=value`` strings to a config dict; unknown keys are errors listing the valid ones."""
    d = _merge({}, d)
    for text in overrides or ():
        path, value = parse_override(text)
        top = path[0]
        if top not in TOP_LEVEL:
            raise ConfigError(f"--set {text}: unknown key {top!r}; valid top-level keys: {', '.join(TOP_LEVEL)}")
        if top not in SECTIONS:
            if len(path) != 1:
                raise ConfigError(f"--set {text}: {top} is a value, not a section")
            d[top] = value
            continue
        if len(path) == 1:
            raise ConfigError(f"--set {text}: {top} is a section; set one of its keys: {', '.join(_valid_keys(top))}")
        key = path[1]
        if key not in _valid_keys(top):
            raise ConfigError(f"--set {text}: unknown key {top}.{key}; valid keys in {top}: {', '.join(_valid_keys(top))}"
                              f"{_legacy_hint(top, key)}")
        section = d.setdefault(top, {}) or {}
        d[top] = section
        if len(path) == 2:
            section[key] = value
            continue
        # deeper: only free-form mappings (data.options) have sub-keys
        is_mapping = typing.get_type_hints(SECTIONS[top])[key] is dict
        target = section.get(key, {} if is_mapping else None)
        if not is_mapping or not isinstance(target, dict):
            raise ConfigError(f"--set {text}: {top}.{key} is not a mapping")
        target = dict(target)
        section[key] = target
        for part in path[2:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {text}: {'.'.join(path[:-1])} is not a mapping")
        target[path[-1]] = value
    return d


def load_config(preset: str | None = None, file=None, overrides=()) -> RunConfig:
    """Resolve a run config: defaults <- preset <- YAML file <- ``--set`` overrides (each layer schema-checked)."""
    d: dict = {}
    if preset is not None:
        layer = _load_preset(preset)
        check_keys(layer, f"preset {preset!r}")
        d = _merge(d, layer)
    if file is not None:
        layer = read_yaml(file)
        check_keys(layer, f"config file {file}")
        d = _merge(d, layer)
    d = apply_overrides(d, overrides)
    return RunConfig.from_dict(d)
