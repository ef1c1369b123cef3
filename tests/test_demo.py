"""The quick demo (`make train`) is a valid run configuration of what the README promises."""

import shlex
import subprocess
from pathlib import Path

from textclf.config import MINILM_BASE_MODEL, build_config

REPO = Path(__file__).resolve().parent.parent


def demo_parameters(*make_args: str) -> dict[str, str]:
    printed = subprocess.run(["make", "-n", "-s", "train", *make_args], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
    [command] = [line for line in printed.splitlines() if line.startswith("mlflow run")]
    words = shlex.split(command)
    return dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "-P")


def test_the_demo_trains_minilm_on_all_of_sst2_and_tests_on_the_full_split():
    from entrypoints.train import train

    # Parsed by the train command's own options (as `mlflow run` hands them over), then validated.
    arguments = [f"--{name}={value}" for name, value in demo_parameters().items()]
    params = train.make_context("train", arguments).params
    params.pop("debug")
    config = build_config(mode=params.pop("mode"), **params)
    assert (config.mode, config.model.base_model, config.dataset_name) == ("full", MINILM_BASE_MODEL, "sst2")
    assert config.data.max_samples is None and config.data.max_test_samples is None
    assert "{class_labels}" in config.data.prompt_template and not config.resume
    assert 0 < config.training.max_train_minutes <= 4  # leaves room for loading, testing and logging in 5 min


def test_the_demo_fits_at_most_two_epochs_to_its_budget():
    """How many epochs fit in 5 minutes depends on the CPU: the demo may run two, sized to its budget on the machine."""
    arguments = demo_parameters()
    assert float(arguments["epochs"]) == 2 and arguments["fit_to_budget"] == "true"
