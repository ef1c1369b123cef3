"""A run parameter is declared once (textclf/config.py): its click option, --help, checks and MLproject entry
follow from that declaration."""

from __future__ import annotations

import importlib.util

import click
import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO
from entrypoints.train import train
from textclf.config import DataConfig, build_config, run_parameters
from textclf.errors import TextclfError

TRAINING_ENTRY_POINTS = ("train", "sweep", "train_deepspeed")


def load_generator():
    spec = importlib.util.spec_from_file_location("mlproject", REPO / "scripts" / "mlproject.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mlproject() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]


def option(command: click.Command, name: str) -> click.Option:
    return next(param for param in command.params if param.name == name)


def parsed(argv: list[str]) -> dict:
    """The training options `train` receives from this command line (without running it)."""
    params = train.make_context("train", argv).params
    params.pop("debug")
    return params


def test_the_committed_mlproject_is_the_generated_one():
    assert (REPO / "MLproject").read_text() == load_generator().render(), "MLproject is stale: run `make mlproject`"


def test_a_parameter_declared_once_is_a_click_option_with_its_help_and_range(mlflow_store):
    [declared] = [p for p in run_parameters() if p.name == "warmup_ratio"]
    warmup = option(train, "warmup_ratio")
    assert warmup.help == f"{declared.help} [default: 0.0; 0<=x<1]"
    assert isinstance(warmup.type, click.ParamType) and warmup.type.name == "float"
    result = CliRunner().invoke(train, ["--warmup_ratio", "1"])
    assert result.exit_code == 2 and "error: warmup_ratio must be in [0, 1), got 1.0" in result.output
    for entry_point in TRAINING_ENTRY_POINTS:
        assert mlproject()[entry_point]["parameters"]["warmup_ratio"] == {"type": "float", "default": 0.0}

    max_length = option(train, "max_length")
    assert max_length.help.endswith("[default: 512; x>=16]") and max_length.metavar == "INTEGER"
    with pytest.raises(TextclfError, match="max_length must be >= 16, got 8"):
        build_config(max_length=8)


def test_a_preset_parameter_shows_its_presets_and_is_left_empty_in_mlproject():
    assert option(train, "learning_rate").help == "peak learning rate [preset: full 2e-05, lora 0.0005; x>0]"
    assert mlproject()["train"]["parameters"]["learning_rate"] == {"type": "string", "default": ""}
    empty = parsed(["--learning_rate", "", "--mode", "full"])
    assert empty["learning_rate"] is None
    assert build_config(**empty).training.learning_rate == 2e-5


def test_choices_are_shown_and_refused_in_one_line(mlflow_store):
    assert option(train, "precision").metavar == "[auto|fp32|bf16|fp16]"
    result = CliRunner().invoke(train, ["--pooling", "first"])
    assert result.exit_code == 2 and "error: invalid pooling 'first': choose one of auto, last, mean" in result.output


def test_integer_options_take_the_floats_mlflow_passes():
    params = parsed(["--max_steps", "100.0", "--lora_r", "8"])
    assert params["max_steps"] == 100 and isinstance(params["max_steps"], int) and params["lora_r"] == 8
    with pytest.raises(click.BadParameter, match="'2.5' is not an integer"):
        train.make_context("train", ["--max_steps", "2.5"])


@pytest.mark.parametrize("as_float", [False, True], ids=["as written", "as floats"])
def test_mlproject_defaults_build_the_default_config(as_float):
    """What `mlflow run` passes when no -P is given is the config the command builds with no option at all: the
    MLproject defaults are the declared ones. ``as_float`` passes numbers as mlflow.projects.run(parameters=
    {"max_length": 512.0}) does."""
    for entry_point in ("train", "train_deepspeed"):
        argv = []
        for name, spec in mlproject()[entry_point]["parameters"].items():
            if name in {p.name for p in run_parameters()}:
                value = float(spec["default"]) if as_float and spec["type"] == "float" else spec["default"]
                argv += [f"--{name}", str(value)]
        assert build_config(**parsed(argv)) == build_config()


def test_mlflow_types_follow_the_declarations():
    """A fixed number is `float`; only a default that follows the mode, or None, is the string ""."""
    for declared in run_parameters():
        spec = mlproject()["train"]["parameters"][declared.name]
        if declared.follows_mode or declared.default is None:
            assert spec == {"type": "string", "default": ""}, declared.name
        elif declared.kind in (int, float):
            assert spec == {"type": "float", "default": declared.default}, declared.name
        elif declared.kind is bool:
            assert spec == {"type": "string", "default": str(declared.default).lower()}, declared.name
        else:
            assert spec == {"type": "string", "default": declared.default}, declared.name


@pytest.mark.parametrize("declared", [p for p in run_parameters() if p.range is not None], ids=lambda p: p.name)
def test_every_declared_range_is_enforced(declared):
    below = declared.range.low if declared.range.low_open else declared.range.low - 1
    with pytest.raises(TextclfError, match=f"^{declared.name} must be "):
        build_config(**{declared.name: below})


def test_a_field_that_is_not_a_parameter_is_still_checked():
    from textclf.parameters import check_fields

    assert "validation_fraction" not in {p.name for p in run_parameters()}
    with pytest.raises(TextclfError, match=r"validation_fraction must be in \(0, 1\), got 1.0"):
        check_fields(DataConfig(validation_fraction=1.0))
