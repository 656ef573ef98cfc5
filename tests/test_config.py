"""Tests for md4.config: presets, dotted overrides with type coercion, YAML files, errors, round trip."""

import dataclasses

import pytest
import yaml

from md4.config import Config, ModelConfig, TrainConfig, from_dict, load_config, preset_names
from md4.errors import UserError


# ---- presets ----------------------------------------------------------------------------------


def test_presets_are_listed_and_all_load():
    names = preset_names()
    assert {"tiny", "text8"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert isinstance(cfg, Config)
        assert cfg.model.dim % cfg.model.heads == 0, name


def test_text8_preset_has_the_papers_hyperparameters():
    cfg = load_config("text8")
    assert cfg.method == "md4" and cfg.schedule == "linear"
    assert cfg.data.corpus == "text8" and cfg.data.length == 256
    assert (cfg.model.layers, cfg.model.dim, cfg.model.heads) == (12, 768, 12)
    assert cfg.model.time_cond is True
    t = cfg.train
    assert (t.batch_size, t.lr, t.warmup, t.ema) == (512, 3e-4, 2000, 0.9999)
    assert t.weight_decay == 0.0 and t.beta2 == 0.999


def test_tiny_preset_is_small():
    cfg = load_config("tiny")
    assert cfg.data.length <= 64 and cfg.model.dim <= 64 and cfg.model.layers <= 2 and cfg.train.steps <= 50


def test_demo_preset_if_present():
    if "demo" not in preset_names():
        pytest.skip("no demo preset")
    cfg = load_config("demo")
    assert cfg.data.corpus == "shakespeare"
    assert cfg.train.steps > load_config("tiny").train.steps


def test_no_config_gives_the_dataclass_defaults():
    assert load_config() == Config()
    assert load_config(None, []) == Config()


# ---- overrides --------------------------------------------------------------------------------


def test_dotted_overrides_and_type_coercion():
    cfg = load_config("tiny", ["model.layers=3", "train.lr=3e-4", "train.ema=0", "model.glu=false",
                               "model.time_cond=true", "data.corpus=/some/file.txt", "train.steps=7",
                               "model.mlp_ratio=3", "schedule=cosine"])
    assert cfg.model.layers == 3 and type(cfg.model.layers) is int
    assert cfg.train.lr == 3e-4 and type(cfg.train.lr) is float  # YAML 1.1 reads "3e-4" as a string
    assert cfg.train.ema == 0.0 and type(cfg.train.ema) is float
    assert cfg.model.mlp_ratio == 3.0 and type(cfg.model.mlp_ratio) is float
    assert cfg.model.glu is False and cfg.model.time_cond is True
    assert cfg.data.corpus == "/some/file.txt" and cfg.train.steps == 7
    assert cfg.schedule == "cosine"
    # untouched keys keep the preset's values
    assert cfg.model.dim == load_config("tiny").model.dim


@pytest.mark.parametrize("text, expected", [("1e-3", 1e-3), ("3.0e-4", 3e-4), ("2", 2.0), ("0.5", 0.5), ("1E-2", 0.01)])
def test_float_spellings(text, expected):
    assert load_config("tiny", [f"train.lr={text}"]).train.lr == expected


def test_string_field_keeps_text_and_bools_become_lowercase():
    assert load_config("tiny", ["train.bf16=true"]).train.bf16 == "true"
    assert load_config("tiny", ["train.device=cpu"]).train.device == "cpu"
    # a value that looks like a number stays text for a str field
    assert load_config("tiny", ["data.corpus=123"]).data.corpus == "123"


def test_later_override_wins():
    assert load_config("tiny", ["train.steps=5", "train.steps=9"]).train.steps == 9


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.foo=1", ["model.foo"]),
        ("foo.bar=1", ["foo"]),  # unknown section
        ("bogus=1", ["bogus"]),
        ("train.lr=abc", ["train.lr", "float"]),
        ("model.layers=2.5", ["model.layers", "int"]),
        ("model.layers=true", ["model.layers", "int"]),
        ("model.glu=maybe", ["model.glu", "bool"]),
        ("model.glu=1", ["model.glu", "bool"]),
        ("train.steps=", ["train.steps"]),
        ("train.steps", ["key=value"]),  # no "="
        ("model=3", ["model"]),  # a section given a scalar
        ("train.log_every=0", ["train.log_every", "at least 1"]),  # would divide by zero
        ("train.ckpt_every=-5", ["train.ckpt_every", "at least 1"]),
        ("model.heads=0", ["model.heads", "at least 1"]),
        ("data.length=0", ["data.length", "at least 1"]),
        ("train.batch_size=0", ["train.batch_size", "at least 1"]),
        ("train.steps=0", ["train.steps", "at least 1"]),
        ("train.lr=1e39", ["train.lr", "(0, 1e+30]"]),  # overflowed inside AdamW before
        ("train.lr=-1", ["train.lr"]),
        ("train.lr=nan", ["train.lr"]),
        ("train.ema=1", ["train.ema", "[0, 1)"]),
        ("train.beta2=1.5", ["train.beta2"]),
        ("train.warmup=-3", ["train.warmup"]),
        ("train.grad_clip=-1", ["train.grad_clip"]),
        ("train.min_lr_ratio=2", ["train.min_lr_ratio"]),
        ("model.dropout=1", ["model.dropout"]),
        ("model.mlp_ratio=0", ["model.mlp_ratio"]),
        ("sample.steps=0", ["sample.steps", "at least 1"]),
        ("sample.grid=foo", ["sample.grid", "uniform, cosine"]),
    ],
)
def test_bad_overrides_are_user_errors(override, words):
    with pytest.raises(UserError) as e:
        load_config("tiny", [override])
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".")
    for w in words:
        assert w in msg


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(UserError, match="nope") as e:
        load_config("nope")
    assert "tiny" in str(e.value)


# ---- YAML files -------------------------------------------------------------------------------


def test_yaml_file_config(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("data: {corpus: x.txt, length: 16}\nmodel:\n  dim: 48\n  heads: 3\ntrain: {lr: 2.0e-3, steps: 3}\n")
    cfg = load_config(str(path), ["train.steps=4"])
    assert cfg.data == dataclasses.replace(cfg.data, corpus="x.txt", length=16)
    assert (cfg.model.dim, cfg.model.heads) == (48, 3)
    assert cfg.model.layers == ModelConfig().layers  # default for what the file leaves out
    assert cfg.train.lr == 2e-3 and cfg.train.steps == 4
    assert cfg.train.warmup == TrainConfig().warmup


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


@pytest.mark.parametrize(
    "content, words",
    [
        ("model: {dim: 64\n", ["not valid YAML"]),
        ("model:\n  dim: 64\n bad indent: 1\n", ["not valid YAML"]),
        ("- a\n- b\n", ["mapping"]),
        ("model: {dim: 64, nonsense: 1}\n", ["model.nonsense"]),
        ("model: 5\n", ["model", "mapping"]),
        ("train: {lr: fast}\n", ["train.lr"]),
    ],
)
def test_bad_yaml_files_are_user_errors(tmp_path, content, words):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(UserError) as e:
        load_config(str(path))
    for w in words:
        assert w in str(e.value)
    assert path.read_text() == content  # never touched


def test_missing_yaml_file(tmp_path):
    with pytest.raises(UserError, match="missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))


# ---- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "text8"])
def test_round_trip_through_dict_and_yaml(name):
    cfg = load_config(name, ["model.layers=3", "train.lr=1e-3"])
    assert from_dict(Config, cfg.to_dict()) == cfg
    # what a run folder's config.yaml holds loads back to the same config
    assert from_dict(Config, yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))) == cfg


def test_saved_config_yaml_loads_as_a_config_file(tmp_path):
    cfg = load_config("tiny", ["train.steps=3"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert load_config(str(path)) == cfg
