"""The evaluation request: one typed schema that :func:`arelbo.evaluate.evaluate_run`, the ``arelbo eval`` parser and
the studies' evaluation options all derive from.

:class:`EvalConfig` is checked on construction like the run config (wrong types and out-of-range values are
:class:`~arelbo.config.ConfigError`s naming the field). Each field's ``metadata`` says how it appears on the
command line, so :func:`add_arguments` builds the parser, :meth:`EvalConfig.from_args` reads it back and
:meth:`EvalConfig.cli_args` writes the same request as arguments (``from_args(parse(cli_args(c))) == c``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from arelbo.schema import ConfigError, Section
from arelbo.metrics.collapse import ACTIVE_UNIT_THRESHOLD

__all__ = ["EvalConfig", "add_arguments", "parse_sampler_options", "SPLITS", "SQ_ERR_MODES"]

SPLITS = ("train", "val", "test")
SQ_ERR_MODES = ("auto", "sample", "exact", "mean")


def _f(default, help: str, flags: tuple[str, ...] = (), **meta):
    """A field with its command-line form: ``flags`` (default ``--name-with-dashes``), ``help`` and extras."""
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kw, metadata={"help": help, "flags": flags, **meta})


@dataclass
class EvalConfig(Section):
    """What one evaluation of a run computes (see :func:`arelbo.evaluate.evaluate_run`)."""

    _section = "eval"

    which: str = _f("best", "checkpoint: best, last (written to metrics.json), or another file in checkpoints/, e.g. "
                    "step-2000 (written to metrics-step-2000.json) (default best)", ("--checkpoint", "--which"),
                    metavar="CHECKPOINT")
    split: str = _f("test", "evaluation split (default test)", choices=SPLITS)
    n_samples: int = _f(10000, "generated samples per sampler for FID (default 10000)")
    k: int = _f(100, "importance samples per example for the IS-NLL (default 100)")
    is_examples: Optional[int] = _f(1000, "evaluation examples for the IS-NLL (default 1000; 0: skip)")
    smoothness_examples: Optional[int] = _f(1000, "examples for decoder smoothness (default 1000)")
    mi_examples: Optional[int] = _f(10000, "examples whose aggregate posterior defines I(x;z) (default 10000)")
    samplers: list[str] = _f(lambda: ["prior", "gmm"], "comma-separated samplers: prior (the model's own prior), "
                             "gmm, flow, two-stage (default prior,gmm)", ("--sampler",), cli="list", metavar="LIST")
    sampler_options: dict = _f(dict, "a sampler option, e.g. gmm.n_components=20 or two-stage.steps=1000 "
                               "(repeatable)", ("--sampler-option",), cli="options", metavar="NAME.KEY=VALUE")
    batch_size: int = _f(500, "evaluation batch size (default 500)")
    fid: bool = _f(True, "skip FID (samplers are still fitted)")
    feature_net: Optional[str] = _f(None, "FID feature network (default: mnist-features for 1x28x28, else inception)",
                                    metavar="NAME")
    kid: Optional[bool] = _f(None, "also compute KID (default: when n-samples < 2048)")
    max_examples: Optional[int] = _f(None, "cap evaluation and sampler-fitting examples (quick runs)")
    fit_examples: Optional[int] = _f(None, "cap the training examples the samplers are fitted on")
    threshold: float = _f(ACTIVE_UNIT_THRESHOLD, f"active-unit threshold on Var(mu_j) (default {ACTIVE_UNIT_THRESHOLD})")
    sq_err: str = _f("auto", "how E_q||x - f(z)||^2 is computed for -ELBO and the ar sigma2 (default auto)",
                     choices=SQ_ERR_MODES)
    fid_repeats: int = _f(1, "FID of each sampler on N independent sample draws (mean/std: the sampling spread)",
                          metavar="N")
    fid_reconstruction: bool = _f(True, "skip the FID of the evaluation images' reconstructions (the floor for "
                                  "samplers)")
    dequantize: bool = _f(False, "score uniformly dequantised pixels (v + u - 1/2)/255 and report bits/dim (discrete)")
    seed: int = _f(0, "seed of every random stream of the evaluation (default 0)")
    device: str = _f("cpu", "cpu, cuda, cuda:N or auto (CUDA when available) (default cpu)", metavar="DEVICE")
    data_root: Optional[str] = _f(None, "override the dataset root recorded in the run's config", metavar="DIR")
    refit_samplers: bool = _f(False, "refit samplers even when a saved fit matches")

    def __post_init__(self):
        if isinstance(self.samplers, str):  # "prior,gmm"
            self.samplers = [s.strip() for s in self.samplers.split(",") if s.strip()]
        elif self.samplers is None:
            self.samplers = []
        elif isinstance(self.samplers, tuple):
            self.samplers = list(self.samplers)
        super().__post_init__()

    def validate(self) -> None:
        self._choice("split", SPLITS)
        self._choice("sq_err", SQ_ERR_MODES)
        for name, low in (("k", 1), ("batch_size", 1), ("n_samples", 0), ("fid_repeats", 1), ("is_examples", 0),
                          ("smoothness_examples", 0), ("mi_examples", 0), ("max_examples", 1), ("fit_examples", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"eval.{name} must be >= {low}, got {value}")
        self._positive("threshold", allow_zero=True)
        if not 0 <= self.seed < 2**32:  # every stream is seeded from it; scikit-learn takes seeds in [0, 2**32)
            raise ConfigError(f"eval.seed must be in [0, {2**32 - 1}], got {self.seed}")
        for name, opts in self.sampler_options.items():
            if not isinstance(opts, dict):
                raise ConfigError(f"eval.sampler_options.{name} must be a mapping of options, got {opts!r}")

    # ---- the same request in other forms

    def replace(self, **changes) -> EvalConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalConfig:
        """The config an ``arelbo eval`` namespace (built by :func:`add_arguments`) describes."""
        values = {}
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name)
            if f.metadata.get("cli") == "options":
                value = parse_sampler_options(value or [])
            values[f.name] = value
        return cls(**values)

    def cli_args(self) -> list[str]:
        """``arelbo eval`` arguments that parse back to this config (every value given explicitly)."""
        out: list[str] = []
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.metadata.get("cli")
            flag = _flags(f)[0]
            if kind == "list":
                out += [flag, ",".join(value)]
            elif kind == "options":
                out += [item for name, opts in value.items() for key, v in opts.items()
                        for item in (flag, f"{name}.{key}={v}")]
            elif _is_bool(f):
                if value is not None and value != f.default:
                    out.append(_bool_flag(f, value))
            elif value is not None:
                out += [flag, str(value)]
        return out


def _flags(f) -> tuple[str, ...]:
    return tuple(f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),))


def _is_bool(f) -> bool:
    return f.type in ("bool", "Optional[bool]", bool)


def _bool_flag(f, value: bool) -> str:
    name = f.name.replace("_", "-")
    return f"--{name}" if value else f"--no-{name}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``arelbo eval``'s options, one per :class:`EvalConfig` field, with its defaults and help."""
    for f in dataclasses.fields(EvalConfig):
        meta, kind = f.metadata, f.metadata.get("cli")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if _is_bool(f):
            if default is None:  # --kid / --no-kid, unset: the evaluation decides
                parser.add_argument(_bool_flag(f, True), dest=f.name, action="store_true", default=None,
                                    help=meta["help"])
                parser.add_argument(_bool_flag(f, False), dest=f.name, action="store_false")
            else:
                parser.add_argument(_bool_flag(f, not default), dest=f.name, action="store_false" if default else
                                    "store_true", default=default, help=meta["help"])
        elif kind == "list":
            parser.add_argument(*_flags(f), dest=f.name, default=",".join(default), metavar=meta.get("metavar"),
                                help=meta["help"])
        elif kind == "options":
            parser.add_argument(*_flags(f), dest=f.name, action="append", default=[], metavar=meta.get("metavar"),
                                help=meta["help"])
        else:
            tp = {"int": int, "Optional[int]": int, "float": float}.get(f.type, str)
            metavar = meta.get("metavar") or (None if meta.get("choices") else {int: "N", float: "X"}.get(tp, "VALUE"))
            parser.add_argument(*_flags(f), dest=f.name, type=tp, default=default, choices=meta.get("choices"),
                                metavar=metavar, help=meta["help"])


def parse_sampler_options(items) -> dict[str, dict[str, Any]]:
    """``["gmm.n_components=20", ...]`` -> {"gmm": {"n_components": 20}} (values read as YAML)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, sep, raw = item.partition("=")
        name, dot, key = head.rpartition(".")
        if not sep or not dot or not name or not key:
            raise ValueError(f"--sampler-option {item!r}: expected NAME.KEY=VALUE, e.g. gmm.n_components=20")
        out.setdefault(name, {})[key] = yaml.safe_load(raw)
    return out


def from_options(config: EvalConfig | None, options: dict[str, Any]) -> EvalConfig:
    """``config`` (default: the defaults) with ``options`` replacing fields; an unknown name is a TypeError."""
    config = config or EvalConfig()
    names = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown evaluation option(s) {unknown}; valid: {', '.join(sorted(names))}")
    if not options:
        return config
    return EvalConfig(**{**config.to_dict(), **options})  # checked and coerced on construction
