"""Config schema: presets, YAML files, --set overrides, strict keys and types, exact round trip."""

import math

import pytest
import yaml

from arelbo.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    list_presets,
    load_config,
    parse_override,
)

PRESETS = ["celeba64-conv", "linear-gaussian", "mnist-conv", "mnist-mlp"]


def test_presets_are_shipped_and_load():
    assert set(PRESETS) <= set(list_presets())
    for name in PRESETS:
        cfg = load_config(name)
        assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_preset_numbers():
    celeba = load_config("celeba64-conv")
    assert celeba.model.hidden == [128, 256, 512, 1024]
    assert (celeba.model.kernel_size, celeba.model.norm, celeba.model.latent_dim) == (4, "batch", 64)
    assert celeba.data.options == {"crop": 140, "size": 64}
    lin = load_config("linear-gaussian")
    assert lin.model.arch == "linear" and lin.model.latent_dim == 4
    assert len(lin.data.options["eigenvalues"]) == 8
    assert load_config("mnist-conv").model.hidden == [32, 64, 128]


def test_presets_build_their_models():
    from arelbo.models import build_model

    shapes = {"celeba64-conv": (3, 64, 64), "linear-gaussian": (8, 1, 1), "mnist-conv": (1, 28, 28), "mnist-mlp": (1, 28, 28)}
    for name, shape in shapes.items():
        model = build_model(load_config(name).model, shape)
        assert model.latent_dim == load_config(name).model.latent_dim


def test_round_trip_exact_through_yaml(tmp_path):
    cfg = load_config("mnist-conv", overrides=["train.lr=3e-4", "train.betas=[0.5, 0.9]", "data.options.limit=7",
                                               "train.limit_train_batches=0.25", "train.grad_clip=1.5", "name=x"])
    assert cfg.train.lr == 3e-4 and cfg.data.options == {"limit": 7} and cfg.train.limit_train_batches == 0.25
    path = tmp_path / "config.yaml"
    cfg.save(path)
    again = RunConfig.load(path)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert RunConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_layers_apply_in_order(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("train:\n  epochs: 3\n  lr: 2.0e-3\nobjective:\n  policy: fixed\n  options: {sigma2: 0.1}\n")
    cfg = load_config("mnist-conv", f, ["train.epochs=4"])
    assert cfg.train.epochs == 4 and cfg.train.lr == 2e-3  # --set beats the file, the file beats the preset
    assert cfg.objective.policy == "fixed" and cfg.objective.options == {"sigma2": 0.1}
    assert cfg.model.hidden == [32, 64, 128]  # untouched preset values stay


def test_override_values_are_yaml():
    assert parse_override("train.betas=[0.8, 0.99]") == (["train", "betas"], [0.8, 0.99])
    assert parse_override("train.max_steps=null") == (["train", "max_steps"], None)
    assert parse_override("data.shuffle=false") == (["data", "shuffle"], False)
    # YAML 1.1 reads 1e-3 as a string; float fields accept it
    assert load_config(overrides=["train.lr=1e-3"]).train.lr == 1e-3


def test_misspelt_key_top_level_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["trian.epochs=3"])
    msg = str(err.value)
    assert "'trian'" in msg and "data" in msg and "train" in msg and "objective" in msg


def test_misspelt_key_nested_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config("mnist-conv", overrides=["train.epoch=3"])
    msg = str(err.value)
    assert "train.epoch" in msg and "epochs" in msg and "max_steps" in msg and "lr" in msg


def test_misspelt_key_in_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  latent_dims: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(file=f)
    msg = str(err.value)
    assert "model.latent_dims" in msg and "latent_dim" in msg and "hidden" in msg and str(f) in msg
    f.write_text("modle:\n  latent_dim: 8\n")
    with pytest.raises(ConfigError, match="valid top-level keys: data, model"):
        load_config(file=f)


def test_misspelt_key_from_dict():
    d = RunConfig().to_dict()
    d["data"]["batchsize"] = 3
    with pytest.raises(ConfigError, match="valid keys in data: name, root"):
        RunConfig.from_dict(d)


def test_wrong_types():
    with pytest.raises(ConfigError, match="train.epochs must be int, got 'ten'"):
        load_config(overrides=["train.epochs=ten"])
    with pytest.raises(ConfigError, match="train.lr must be float"):
        load_config(overrides=["train.lr=fast"])
    with pytest.raises(ConfigError, match="data.shuffle must be bool"):
        load_config(overrides=["data.shuffle=1"])
    with pytest.raises(ConfigError, match=r"model.hidden\[1\] must be int"):
        load_config(overrides=["model.hidden=[8, x]"])
    with pytest.raises(ConfigError, match="data.options must be a mapping"):
        load_config(overrides=["data.options=3"])
    with pytest.raises(ConfigError, match="train.epochs must be int"):
        TrainConfig(epochs=True)  # bools are not numbers
    with pytest.raises(ConfigError, match="must be > 0"):
        load_config(overrides=["train.epochs=0"])


def test_bad_choices():
    with pytest.raises(ConfigError, match="unknown; known: ar, ar-annealed, ar-conditional, ar-diagonal"):
        load_config(overrides=["objective.policy=ar-elbo"])
    with pytest.raises(ConfigError, match="train.precision '8' unknown; valid: 32, bf16-mixed, 16-mixed"):
        load_config(overrides=["train.precision='8'"])
    with pytest.raises(ConfigError, match="train.optimizer"):
        load_config(overrides=["train.optimizer=sgd"])


def test_unknown_preset_lists_known_presets():
    with pytest.raises(ConfigError) as err:
        load_config("mnist-cnn")
    msg = str(err.value)
    assert "mnist-cnn" in msg and all(p in msg for p in PRESETS)


def test_sections_and_options_need_keys():
    with pytest.raises(ConfigError, match="is a section"):
        apply_overrides({}, ["train=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="not a mapping"):
        apply_overrides({}, ["train.epochs.x=3"])
    assert apply_overrides({}, ["data.options.crop=120"]) == {"data": {"options": {"crop": 120}}}


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(file=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(file=bad)


def test_direct_construction_is_checked_too():
    assert DataConfig(batch_size=64).batch_size == 64
    assert math.isclose(TrainConfig(lr=1).lr, 1.0) and isinstance(TrainConfig(lr=1).lr, float)
    with pytest.raises(ConfigError):
        ModelConfig(arch="transformer")
    with pytest.raises(ConfigError, match="fraction"):
        TrainConfig(limit_train_batches=1.5)
    assert TrainConfig(limit_train_batches=3).limit_train_batches == 3


def test_saved_configs_of_the_flat_objective_layout_are_upgraded(tmp_path):
    """Runs saved before policy options moved under objective.options still load; new input stays strict."""
    d = RunConfig().to_dict()
    d["objective"] = {"policy": "fixed", "sigma2": 0.1, "beta": 1.0, "init_sigma2": 1.0, "momentum": 0.99,
                      "sigma2_floor": 1e-6}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(d))
    cfg = RunConfig.load(path)
    assert cfg.objective.policy == "fixed" and cfg.objective.options == {"sigma2": 0.1}
    d["objective"]["policy"] = "ar-ema"
    assert RunConfig.from_saved(d).objective.options == {"momentum": 0.99}
    with pytest.raises(ConfigError, match=r"unknown key objective.sigma2.*objective.options.sigma2"):
        RunConfig.from_dict(d)


def test_a_policy_that_needs_more_samples_per_batch_is_refused_at_config_time():
    """ar-diagonal's sigma2 is one per pixel over the batch: a batch of one is refused before any training."""
    with pytest.raises(ConfigError, match="data.batch_size=1: objective.policy 'ar-diagonal' estimates sigma2 from at "
                                          "least 2 samples per batch"):
        load_config("linear-gaussian", overrides=["objective.policy=ar-diagonal", "data.batch_size=1"])
    assert load_config("linear-gaussian", overrides=["objective.policy=ar-diagonal", "data.batch_size=2"])
    assert load_config("linear-gaussian", overrides=["objective.policy=ar", "data.batch_size=1"])
