"""Policy specs: parse ``fixed:0.1``, ``learned:mle,lr=0.01``, ``two-stage``, ... into :class:`PolicySpec`; seeds and
number lists.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from arelbo.config import ConfigError
from arelbo.objectives.base import format_number


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
        from arelbo.objectives import POLICIES

        # options start empty: a policy's options never carry over from the base config's policy
        out = [f"objective.policy={json.dumps(self.policy)}",
               f"objective.options={json.dumps(self.objective.get('options', {}))}"]
        if getattr(POLICIES.get(self.policy), "needs_x_logvar", False):  # sigma2(z): the decoder's variance head
            out.append("model.variance_head=true")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SpecGrammar:
    """How a policy is written as ``NAME[:ARGS]`` in ``--policies``: ARGS are comma-separated items, a bare
    number sets ``option`` (the policy's first option unless the table below says otherwise; required when
    ``required``), a bare word of ``flags`` sets the options it maps to (in the number's slot), ``KEY=VALUE`` sets
    option ``keys[KEY]``. ``label_format`` names a spec with its number, ``what``/``example`` phrase errors,
    ``form`` shows the spec in help texts. The policy classes know nothing of this: it is the study's syntax."""

    option: str | None = None
    required: bool = False
    flags: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)
    label_format: str = ""
    what: str = ""
    example: str = "1"
    form: str = ""
    label_words: dict = field(default_factory=dict)  # a flag's text in the label (learned:mle -> "MLE init")


# The policies whose spec reads better than the derived default (first option as the number, no keys).
GRAMMAR: dict[str, dict[str, Any]] = {
    "fixed": dict(required=True, label_format="fixed σ²={}", what="sigma2", example="0.1", form="fixed:S (S > 0)"),
    "beta": dict(required=True, label_format="β-VAE β={}", what="value", example="4", form="beta:B (B > 0)"),
    "learned": dict(what="initial value", form="learned[:S0|mle][,lr=X]", flags={"mle": {"init_mle": True}},
                    keys={"lr": "log_sigma2_lr"}, label_words={"mle": "MLE init"}, label_format="init {}"),
    "ar-ema": dict(label_format="AR-ELBO EMA m={}", form="ar-ema[:M] (0 <= M < 1)"),
    "learned-conditional": dict(what="initial value", form="learned-conditional[:S0][,lr=X]",
                                keys={"lr": "log_sigma2_lr"}, label_format="learned σ²(z) init {}"),
    "ar-conditional": dict(what="the variance head's learning rate", form="ar-conditional[:LR]",
                           label_format="AR-ELBO conditional (head lr {})"),
    "ar-annealed": dict(what="the annealing steps", label_format="AR-ELBO annealed over {} steps",
                        form="ar-annealed[:N] (N >= 1 steps)"),
}
ALIASES = {"learned-fair": "learned:mle,lr=0.01"}  # the fair learned baseline: starts where AR-ELBO starts
FAIR_LEARNED = ALIASES["learned-fair"]  # what "learned-fair" stands for
# Policies whose label keeps the policy's name and lists the spec's items in brackets ("learned σ² (MLE init, lr 0.01)")
BRACKETED_LABELS = ("learned",)


def spec_grammar(name: str) -> SpecGrammar:
    """The spec grammar of registered policy ``name``: the table's entry over the default derived from its options."""
    from arelbo.objectives import POLICIES

    options = list(POLICIES[name].options())
    entry = dict(GRAMMAR.get(name, {}))
    entry.setdefault("option", options[0] if options else None)
    return SpecGrammar(**entry)


def spec_label(name: str, first: str | None = None, keyed: dict[str, str] | None = None) -> str:
    """The label of a parsed spec: ``first`` the text of its number or flag, ``keyed`` its KEY=VALUE items."""
    from arelbo.objectives import POLICIES

    g = spec_grammar(name)
    base = POLICIES[name].label or name
    if name in BRACKETED_LABELS:
        parts = [] if first is None else [g.label_words.get(first) or g.label_format.format(first)]
        parts += [f"{k} {v}" for k, v in (keyed or {}).items()]
        return base + (" (" + ", ".join(parts) + ")" if parts else "")
    label = base
    if first is not None:
        label = (g.label_format or f"{base} {g.option}={{}}").format(first)
    if keyed:
        label += " (" + ", ".join(f"{k} {v}" for k, v in keyed.items()) + ")"
    return label


def _spec_forms() -> list[str]:
    """The valid spec forms, from the registered policies (the aliases, and samplers with a first stage)."""
    from arelbo.objectives import POLICIES
    from arelbo.samplers import SAMPLERS

    forms = []
    for name in POLICIES:
        g = spec_grammar(name)
        opt = g.option
        form = g.form or (name if opt is None else f"{name}:{opt}" if g.required else f"{name}[:{opt}]")
        forms.append(form)
        forms.extend(alias for alias, full in ALIASES.items() if full.partition(":")[0] == name)
        for sname, scls in SAMPLERS.items():
            if scls.first_stage_policy == name:
                forms.append(sname + form[len(name):].split(" (")[0])
    return forms


def _grammar() -> str:
    return ", ".join(_spec_forms())


def parse_policy(text: str) -> PolicySpec:
    """Parse one policy spec (see the module docstring); errors name the spec and list the valid forms.

    ``NAME`` or ``NAME:VALUE`` for any registered policy (VALUE sets the option its :class:`SpecGrammar` names), or ``SAMPLER[:VALUE]``
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
    if name in ALIASES:  # short names, e.g. learned-fair = learned:mle,lr=0.01
        if sep:
            raise StudyError(f"policy {text!r}: {name} takes no argument (it is {ALIASES[name]}); "
                             f"write the full form for other values")
        name, sep, arg = ALIASES[name].partition(":")
    sampler, sampler_cls = "prior", None
    if name not in POLICIES and getattr(SAMPLERS.get(name), "first_stage_policy", None):
        sampler, sampler_cls = name, SAMPLERS[name]
        name = sampler_cls.first_stage_policy
    if name not in POLICIES:
        raise StudyError(f"unknown policy {text!r}; valid forms: {_grammar()}")
    cls = POLICIES[name]
    options, first, keyed = _spec_args(text, sampler_cls.name if sampler_cls else name, name, arg if sep else "")
    try:
        make_policy(name, **options)
    except ValueError as err:
        raise StudyError(f"policy {text!r}: {err}") from None
    parts = ([] if first is None else [first]) + [f"{k}={v}" for k, v in keyed.items()]
    train_slug = name + "".join("-" + q.replace("=", "") for q in parts)
    suffix = (":" + ",".join(parts)) if parts else ""
    label = spec_label(name, first, keyed)
    objective = {"policy": name, "options": options} if options else {"policy": name}
    if sampler_cls is not None:
        base = cls.label or cls.name
        label = sampler_cls.study_label + (label[len(base):] if label.startswith(base + " (") else
                                           "" if label == base else f" ({label})")
        return PolicySpec(sampler + suffix, sampler + train_slug[len(name):], label, name, objective, sampler,
                          train_slug, None, cls.sigma2_kind)
    # the spec's number is the constant sigma2 itself (fixed:S): the x axis of a sweep
    given = options.get("sigma2") if cls.sigma2_kind == "given" and spec_grammar(name).option == "sigma2" else None
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
    return value, format_number(value)


def _spec_args(text: str, shown: str, name: str, arg: str) -> tuple[dict, str | None, dict[str, str]]:
    """A spec's comma-separated arguments -> (policy options, text of its number or flag, {KEY: text})."""
    from arelbo.objectives import POLICIES

    valid = POLICIES[name].options()
    g = spec_grammar(name)
    options: dict[str, Any] = {}
    first: str | None = None
    keyed: dict[str, str] = {}
    what = g.what or g.option or "value"
    for item in (a.strip() for a in arg.split(",")) if arg else ():
        if not item:
            raise StudyError(f"policy {text!r}: empty argument; valid forms: {_grammar()}")
        key, eq, raw = item.partition("=")
        if eq:
            key, raw = key.strip(), raw.strip()
            if key not in g.keys:
                known = ", ".join(f"{k}=" for k in g.keys) or "none"
                raise StudyError(f"policy {text!r}: unknown argument {key!r}; {shown} takes {known}")
            if key in keyed:
                raise StudyError(f"policy {text!r}: {key} given twice")
            option = g.keys[key]
            options[option], keyed[key] = _spec_value(text, raw, f"the {key.replace('_', ' ')}", valid.get(option))
            continue
        if g.option is None and not g.flags:
            raise StudyError(f"policy {text!r}: {shown} takes no argument; valid forms: {_grammar()}")
        if first is not None:
            flags = " or ".join(g.flags)
            raise StudyError(f"policy {text!r}: give one {what}{f' (a number or {flags})' if flags else ''}, got two")
        if item in g.flags:
            options.update(g.flags[item])
            first = item
        else:
            options[g.option], first = _spec_value(text, item, what, valid.get(g.option))
    if first is None and g.required:
        raise StudyError(f"policy {text!r}: {shown} needs its {what}, e.g. {shown}:{g.example}")
    # keyed items in the class's order: equal specs have one canonical text
    keyed = {k: keyed[k] for k in g.keys if k in keyed}
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
    return parse_policies([f"{Fixed.name}:{format_number(s)}" for s in grid] + [r.spec for r in refs])
