"""The evaluation schema: one EvalConfig from which evaluate_run's options, the `arelbo eval` parser and the
studies' evaluation requests derive; checked on construction."""

import argparse

import pytest

from arelbo.config import ConfigError
from arelbo.evalconfig import EvalConfig
from arelbo.metrics import ACTIVE_UNIT_THRESHOLD


def parser():
    from arelbo.cli.eval import add_arguments

    p = argparse.ArgumentParser(prog="arelbo eval")
    add_arguments(p)
    return p


def parse(*argv):
    return EvalConfig.from_args(parser().parse_args(["RUN", *argv]))


def test_parser_defaults_are_the_schema_defaults():
    assert parse() == EvalConfig()
    assert EvalConfig().threshold == ACTIVE_UNIT_THRESHOLD == 0.01
    from arelbo import linear

    assert linear.ACTIVE_THRESHOLD == ACTIVE_UNIT_THRESHOLD  # one threshold, defined once


def test_every_field_round_trips_through_the_command_line():
    c = EvalConfig(which="step-20", split="val", n_samples=7, k=3, is_examples=0, smoothness_examples=5,
                   mi_examples=9, samplers="prior,two-stage", sampler_options={"two-stage": {"steps": 4, "hidden": [8]}},
                   batch_size=16, fid=False, feature_net="inception", kid=False, max_examples=100, fit_examples=50,
                   threshold=0.05, sq_err="mean", dequantize=True, seed=3, device="auto", data_root="/data",
                   refit_samplers=True)
    assert c.samplers == ["prior", "two-stage"]
    assert parse(*c.cli_args()) == c
    assert parse("--kid").kid is True and parse().kid is None
    # one flag name across commands (--checkpoint, as arelbo sample and compare); --which still works
    assert parse("--checkpoint", "last").which == parse("--which", "last").which == "last"


@pytest.mark.parametrize("kwargs, message", [
    ({"is_examples": -5}, "eval.is_examples must be >= 0, got -5"),
    ({"max_examples": 0}, "eval.max_examples must be >= 1, got 0"),
    ({"k": 0}, "eval.k must be >= 1"),
    ({"split": "dev"}, "eval.split 'dev' unknown; valid: train, val, test"),
    ({"n_samples": "many"}, "eval.n_samples must be int, got 'many'"),
    ({"threshold": -1.0}, "eval.threshold must be >= 0"),
    ({"sampler_options": {"gmm": 3}}, "eval.sampler_options.gmm must be a mapping"),
])
def test_bad_values_are_config_errors_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(**kwargs)


def test_evaluate_run_takes_the_config_or_its_fields_by_name(tmp_path):
    from arelbo.evaluate import evaluate_run

    with pytest.raises(TypeError, match=r"unknown evaluation option\(s\) \['n_sample'\]"):
        evaluate_run(tmp_path, n_sample=3)
    with pytest.raises(ConfigError, match="eval.is_examples must be >= 0"):
        evaluate_run(tmp_path, EvalConfig(), is_examples=-1)
