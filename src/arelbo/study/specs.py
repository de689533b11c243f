"""Policy specs: parse ``fixed:0.1``, ``learned:mle,lr=0.01``, ``two-stage``, ... into :class:`PolicySpec`; seeds and
number lists.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from arelbo.config import ConfigError
from arelbo.objectives import Learned


RESULTS_FORMAT = 1
DEFAULT_POLICIES = ("fixed:1", "fixed:0.1", "fixed:0.01", "learned", "two-stage", "ar", "ar-diagonal",
                    "ar-per-sample", "ar-ema")
DEFAULT_SWEEP_SIGMA2 = (1.0, 0.1, 0.01, 0.001, 0.0001)
RUN_MARKER = "study-run.json"  # per run: what the study did to it (timings, failures)
PLAN_DIR = "plan"  # DIR/plan/<run>.yaml: the resolved config each run is trained with


class StudyError(ConfigError):
    """A problem with a study's specification or its output folder that the user can fix."""


# --------------------------------------------------------------------------------------------------------------
# Policy specs


def _num(value: float) -> str:
    """Canonical text of a float: shortest round-trip repr, without a trailing '.0' (1.0 -> '1', 1e-05 -> '1e-05')."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class PolicySpec:
    """One objective policy of a study, parsed from a spec string such as ``fixed:0.1``."""

    spec: str  # canonical spec ("fixed:0.1"); equal specs mean the same cell
    slug: str  # file-name form ("fixed-0.1")
    label: str  # for tables and plots ("fixed sigma2=0.1")
    policy: str  # arelbo.objectives policy name
    objective: dict  # objective.* settings: {"policy": name, "options": {...}} (no options: {"policy": name})
    sampler: str  # the sampler that generates for FID: "prior" or a sampler with a first stage ("two-stage")
    train_slug: str  # the training run this cell uses (= slug, except two-stage -> its learned run)
    sigma2: float | None = None  # the constant sigma2 of a given-sigma2 policy set by its spec (fixed:S), for sweeps
    sigma2_kind: str = "estimated"  # the policy's DecoderVariance.sigma2_kind: "estimated", "given" or "learned"

    def overrides(self) -> list[str]:
        # options start empty: a policy's options never carry over from the base config's policy
        return [f"objective.policy={json.dumps(self.policy)}",
                f"objective.options={json.dumps(self.objective.get('options', {}))}"]

    def to_dict(self) -> dict:
        return asdict(self)


def _spec_forms() -> list[str]:
    """The valid spec forms, from the registered policies (their aliases, and samplers with a first stage)."""
    from arelbo.objectives import POLICIES
    from arelbo.samplers import SAMPLERS

    forms = []
    for name, cls in POLICIES.items():
        opt = cls.spec_option
        form = cls.spec_form or (name if opt is None else f"{name}:{opt}" if cls.spec_required else f"{name}[:{opt}]")
        forms.append(form)
        forms.extend(cls.spec_aliases)
        for sname, scls in SAMPLERS.items():
            if scls.first_stage_policy == name:
                forms.append(sname + form[len(name):].split(" (")[0])
    return forms


def _grammar() -> str:
    return ", ".join(_spec_forms())


FAIR_LEARNED = Learned.spec_aliases["learned-fair"]  # what "learned-fair" stands for


def parse_policy(text: str) -> PolicySpec:
    """Parse one policy spec (see the module docstring); errors name the spec and list the valid forms.

    ``NAME`` or ``NAME:VALUE`` for any registered policy (VALUE sets its ``spec_option``), or ``SAMPLER[:VALUE]``
    for a sampler with a first stage of its own (``two-stage``: the ``learned[:VALUE]`` run, its own sampler).
    """
    from arelbo.objectives import POLICIES, make_policy
    from arelbo.samplers import SAMPLERS

    if not isinstance(text, str) or not text.strip():
        raise StudyError(f"empty policy spec; valid forms: {_grammar()}")
    spec = text.strip().lower()
    name, sep, arg = spec.partition(":")
    name, arg = name.strip(), arg.strip()
    if sep and not arg:
        raise StudyError(f"policy {text!r}: nothing after ':'; valid forms: {_grammar()}")
    for cls in POLICIES.values():  # short names, e.g. learned-fair = learned:mle,lr=0.01
        if name in cls.spec_aliases:
            if sep:
                raise StudyError(f"policy {text!r}: {name} takes no argument (it is {cls.spec_aliases[name]}); "
                                 f"write the full form for other values")
            name, sep, arg = cls.spec_aliases[name].partition(":")
            break
    sampler, sampler_cls = "prior", None
    if name not in POLICIES and getattr(SAMPLERS.get(name), "first_stage_policy", None):
        sampler, sampler_cls = name, SAMPLERS[name]
        name = sampler_cls.first_stage_policy
    if name not in POLICIES:
        raise StudyError(f"unknown policy {text!r}; valid forms: {_grammar()}")
    cls = POLICIES[name]
    options, first, keyed = _spec_args(text, sampler_cls.name if sampler_cls else name, cls, arg if sep else "")
    try:
        make_policy(name, **options)
    except ValueError as err:
        raise StudyError(f"policy {text!r}: {err}") from None
    parts = ([] if first is None else [first]) + [f"{k}={v}" for k, v in keyed.items()]
    train_slug = name + "".join("-" + q.replace("=", "") for q in parts)
    suffix = (":" + ",".join(parts)) if parts else ""
    label = cls.spec_label(first, keyed)
    objective = {"policy": name, "options": options} if options else {"policy": name}
    if sampler_cls is not None:
        base = cls.label or cls.name
        label = sampler_cls.study_label + (label[len(base):] if label.startswith(base + " (") else
                                           "" if label == base else f" ({label})")
        return PolicySpec(sampler + suffix, sampler + train_slug[len(name):], label, name, objective, sampler,
                          train_slug, None, cls.sigma2_kind)
    # the spec's number is the constant sigma2 itself (fixed:S): the x axis of a sweep
    given = options.get("sigma2") if cls.sigma2_kind == "given" and cls.spec_option == "sigma2" else None
    return PolicySpec(name + suffix, train_slug, label, name, objective, "prior", train_slug, given, cls.sigma2_kind)


def _spec_value(text: str, raw: str, what: str, option) -> tuple[Any, str]:
    """A spec's number for ``option`` (a PolicyOption): (value, canonical text); ints must be whole numbers."""
    try:
        value = float(raw)
    except ValueError:
        raise StudyError(f"policy {text!r}: {what} must be a number, got {raw!r}") from None
    if option is not None and option.type is int:
        if not value.is_integer():
            raise StudyError(f"policy {text!r}: {what} must be a whole number, got {raw}")
        return int(value), str(int(value))
    return value, _num(value)


def _spec_args(text: str, shown: str, cls, arg: str) -> tuple[dict, str | None, dict[str, str]]:
    """A spec's comma-separated arguments -> (policy options, text of its number or flag, {KEY: text})."""
    valid = cls.options()
    options: dict[str, Any] = {}
    first: str | None = None
    keyed: dict[str, str] = {}
    what = cls.spec_what or cls.spec_option or "value"
    for item in (a.strip() for a in arg.split(",")) if arg else ():
        if not item:
            raise StudyError(f"policy {text!r}: empty argument; valid forms: {_grammar()}")
        key, eq, raw = item.partition("=")
        if eq:
            key, raw = key.strip(), raw.strip()
            if key not in cls.spec_keys:
                known = ", ".join(f"{k}=" for k in cls.spec_keys) or "none"
                raise StudyError(f"policy {text!r}: unknown argument {key!r}; {shown} takes {known}")
            if key in keyed:
                raise StudyError(f"policy {text!r}: {key} given twice")
            option = cls.spec_keys[key]
            options[option], keyed[key] = _spec_value(text, raw, f"the {key.replace('_', ' ')}", valid.get(option))
            continue
        if cls.spec_option is None and not cls.spec_flags:
            raise StudyError(f"policy {text!r}: {shown} takes no argument; valid forms: {_grammar()}")
        if first is not None:
            flags = " or ".join(cls.spec_flags)
            raise StudyError(f"policy {text!r}: give one {what}{f' (a number or {flags})' if flags else ''}, got two")
        if item in cls.spec_flags:
            options.update(cls.spec_flags[item])
            first = item
        else:
            options[cls.spec_option], first = _spec_value(text, item, what, valid.get(cls.spec_option))
    if first is None and cls.spec_required:
        raise StudyError(f"policy {text!r}: {shown} needs its {what}, e.g. {shown}:{cls.spec_example}")
    # keyed items in the class's order: equal specs have one canonical text
    keyed = {k: keyed[k] for k in cls.spec_keys if k in keyed}
    return options, first, keyed


def parse_policies(items: str | Iterable[str]) -> list[PolicySpec]:
    """A comma-separated string (or list of specs) -> specs in order, duplicates (same canonical spec) dropped."""
    if isinstance(items, str):
        items = items.split(",")
    out: dict[str, PolicySpec] = {}
    for item in items:
        if not str(item).strip():
            continue
        p = parse_policy(str(item))
        out.setdefault(p.spec, p)
    if not out:
        raise StudyError(f"no policies given; valid forms: {_grammar()}")
    return list(out.values())


def parse_seeds(text: str | Iterable[int]) -> list[int]:
    """``"0,1,2"`` or ``"0-2"`` (or a list) -> sorted unique non-negative ints."""
    if isinstance(text, str):
        seeds: list[int] = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            try:
                if m:
                    lo, hi = int(m.group(1)), int(m.group(2))
                    if hi < lo:
                        raise StudyError(f"seed range {part!r} is empty")
                    seeds.extend(range(lo, hi + 1))
                else:
                    seeds.append(int(part))
            except ValueError:
                raise StudyError(f"--seeds: {part!r} is not a seed (use e.g. 0,1,2 or 0-2)") from None
    else:
        seeds = [int(s) for s in text]
    if not seeds or any(s < 0 for s in seeds):
        raise StudyError(f"--seeds needs one or more non-negative integers, got {text!r}")
    return sorted(set(seeds))


def parse_floats(text: str | Iterable[float], what: str = "--sigma2") -> list[float]:
    values = text.replace(",", " ").split() if isinstance(text, str) else list(text)
    try:
        out = [float(v) for v in values]
    except ValueError:
        raise StudyError(f"{what}: expected numbers separated by commas, got {text!r}") from None
    if not out or any(not (math.isfinite(v) and v > 0) for v in out):
        raise StudyError(f"{what}: expected one or more positive numbers, got {text!r}")
    return out


def sweep_policies(sigma2: Iterable[float], reference: str | Iterable[str] = "ar") -> list[PolicySpec]:
    """The sweep's policy list: ``fixed:S`` for every S (largest first), then the reference policies."""
    from arelbo.objectives import Fixed

    grid = sorted(set(float(s) for s in sigma2), reverse=True)
    refs = parse_policies(reference) if reference else []
    return parse_policies([f"{Fixed.name}:{_num(s)}" for s in grid] + [r.spec for r in refs])
