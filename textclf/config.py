"""The whole run configuration as frozen dataclasses, the mode presets, and their validation.

A run is described once, here, and logged once (flattened to params and as ``config.json``).
Values left as ``None`` are filled from the preset of the chosen mode by :func:`build_config`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textclf.errors import TextclfError

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_DATASETS = ("sst2", "r8")
DEFAULT_BASE_MODEL = "ckpt/SmolLM2-135M-Instruct"
MODES = ("full", "lora")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HEADS = ("mlp", "linear")
POOLINGS = ("auto", "last", "mean")
DEFAULT_SEEDS = (0, 42, 123)
BEST_METRICS = ("f1_macro", "accuracy", "precision_macro", "recall_macro", "loss")

DEFAULT_PROMPT_TEMPLATE = (
    'Please carefully read the following reference text:"{text}", and determine which of the '
    "following categories it belongs to:{class_labels},answer:"
)

# Hyper-parameters of the original project, per mode. Every one is overridable.
MODE_PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(learning_rate=2e-5, batch_size=4, epochs=5.0, eval_steps=50, save_steps=100, head="mlp"),
    "lora": dict(learning_rate=5e-4, batch_size=8, epochs=8.0, eval_steps=100, save_steps=200, head="mlp"),
}


@dataclass(frozen=True)
class DataConfig:
    dataset: str | None = "sst2"  # a shipped dataset name; ignored when data_path is given
    data_path: str | None = None  # any folder holding train/dev/test files
    text_column: str | None = None  # column holding the text; None: detected (text, sentence, review, ...)
    label_column: str | None = None  # column holding the label; None: detected (label, category, ...)
    max_samples: int | None = None  # cap on train rows (validation/test are never capped silently)
    max_eval_samples: int | None = None  # explicit cap on validation rows (logged)
    max_test_samples: int | None = None  # explicit cap on test rows (logged)
    max_length: int = 512
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    validation_fraction: float = 0.15
    split_seed: int = 2024  # fixed: every training seed sees the same validation rows

    @property
    def name(self) -> str:
        """The dataset's name: the shipped name, or the data folder's name."""
        if self.data_path:
            path = Path(self.data_path).resolve()
            # data/datasets/<name>/data -> <name>
            return (path.parent.name if path.name == "data" else path.name).lower()
        return str(self.dataset)

    def resolved_path(self) -> Path:
        if self.data_path:
            return Path(self.data_path)
        return REPO_ROOT / "data" / "datasets" / str(self.dataset) / "data"


@dataclass(frozen=True)
class ModelConfig:
    base_model: str = DEFAULT_BASE_MODEL
    head: str = "mlp"
    head_dropout: float = 0.1
    pooling: str = "auto"  # auto: last token for decoders, mean for encoders
    calibration_samples: int = 128  # train rows used to standardize the head's input (0: off)
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass(frozen=True)
class TrainingConfig:
    learning_rate: float = 5e-4
    head_learning_rate: float | None = None  # the fresh head often wants more than the backbone; None: same
    batch_size: int = 8
    eval_batch_size: int = 32
    epochs: float = 8.0
    max_steps: int = -1
    max_train_minutes: float | None = None  # evaluate, save and stop once training has run this long
    eval_steps: int = 100
    save_steps: int = 200
    logging_steps: int = 10
    save_total_limit: int = 2
    metric_for_best: str = "f1_macro"
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0  # must be < 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    precision: str = "auto"
    group_by_length: bool = True
    calibrate: bool = True  # fit a softmax temperature on validation after training (textclf.calibration)


@dataclass(frozen=True)
class RunConfig:
    mode: str = "lora"
    seed: int = 42
    output_dir: str = "outputs"
    run_name: str | None = None
    register: bool = True  # register the model as a version of textclf-<dataset>
    resume: bool = True  # continue from the latest complete checkpoint in the output folder
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    @property
    def dataset_name(self) -> str:
        return self.data.name

    @property
    def experiment_name(self) -> str:
        return f"textclf-{self.dataset_name}"

    @property
    def default_run_name(self) -> str:
        return self.run_name or f"{self.dataset_name}-{self.mode}-seed{self.seed}"

    @property
    def run_output_dir(self) -> Path:
        return Path(self.output_dir) / self.default_run_name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def build_config(mode: str = "lora", **overrides: Any) -> RunConfig:
    """Build a validated config from a mode and flat overrides (``None`` means "use the preset").

    Flat keys are routed to the section that owns them, so the entry points can pass their click
    options straight through. Raises TextclfError on an unknown key or an invalid value.
    """
    if mode not in MODES:
        raise TextclfError(f"invalid mode {mode!r}: choose one of {', '.join(MODES)}")
    values = {**MODE_PRESETS[mode], **{k: v for k, v in overrides.items() if v is not None}}
    if "seed" in values:
        values["seed"] = parse_seed(values["seed"])
    sections: dict[type, dict[str, Any]] = {DataConfig: {}, ModelConfig: {}, TrainingConfig: {}}
    top: dict[str, Any] = {"mode": mode}
    top_fields = {f.name for f in dataclasses.fields(RunConfig)} - {"data", "model", "training"}
    for key, value in values.items():
        if key in top_fields:
            top[key] = value
            continue
        owner = next((cls for cls in sections if key in {f.name for f in dataclasses.fields(cls)}), None)
        if owner is None:
            raise TextclfError(f"unknown parameter {key!r}")
        sections[owner][key] = value
    if sections[DataConfig].get("data_path"):
        # data_path overrides dataset (MLproject always passes its default, sst2): a custom-data run must
        # not record the name of a shipped dataset it did not use.
        sections[DataConfig]["dataset"] = None
    config = RunConfig(
        **top,
        data=DataConfig(**sections[DataConfig]),
        model=ModelConfig(**sections[ModelConfig]),
        training=TrainingConfig(**sections[TrainingConfig]),
    )
    validate(config)
    return config


def run_config_from_dict(values: dict[str, Any]) -> RunConfig:
    """The inverse of ``RunConfig.to_dict`` (a config read back from config.json or a journal)."""
    sections = {"data": DataConfig, "model": ModelConfig, "training": TrainingConfig}
    return RunConfig(**{k: sections[k](**v) if k in sections else v for k, v in values.items()})


def parse_positive_int(name: str, value: Any) -> int:
    """A positive integer from an int, a float such as 100.0 or a string (MLproject passes both). Raises
    TextclfError naming the parameter."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number.is_integer() or number < 1:
        raise TextclfError(f"{name} must be a positive integer, got {value!r}")
    return int(number)


def parse_seed(value: Any) -> int:
    """An integer seed from an int or a string such as "42" (MLproject passes strings)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TextclfError(f"invalid seed {value!r}: use an integer in [0, 2**32)") from None
    if not number.is_integer():
        raise TextclfError(f"invalid seed {value!r}: use an integer in [0, 2**32)")
    return int(number)


def validate(config: RunConfig) -> None:
    """Refuse combinations that cannot run, each with a message naming the parameter."""
    data, model, training = config.data, config.model, config.training
    if not data.data_path and data.dataset not in SHIPPED_DATASETS:
        raise TextclfError(
            f"unknown dataset {data.dataset!r}: choose one of {', '.join(SHIPPED_DATASETS)} or pass data_path"
        )
    if not isinstance(config.seed, int) or isinstance(config.seed, bool) or not 0 <= config.seed < 2**32:
        raise TextclfError(f"invalid seed {config.seed!r}: use an integer in [0, 2**32)")
    for name in ("max_samples", "max_eval_samples", "max_test_samples"):
        value = getattr(data, name)
        if value is not None and value <= 0:
            raise TextclfError(f"{name} must be a positive integer, got {value}")
    if data.max_length < 16:
        raise TextclfError(f"max_length must be at least 16, got {data.max_length}")
    if "{text}" not in data.prompt_template:
        raise TextclfError("prompt_template must contain the placeholder {text}")
    if not 0 < data.validation_fraction < 1:
        raise TextclfError(f"validation_fraction must be in (0, 1), got {data.validation_fraction}")
    if model.head not in HEADS:
        raise TextclfError(f"invalid head {model.head!r}: choose one of {', '.join(HEADS)}")
    if model.pooling not in POOLINGS:
        raise TextclfError(f"invalid pooling {model.pooling!r}: choose one of {', '.join(POOLINGS)}")
    if training.metric_for_best not in BEST_METRICS:
        raise TextclfError(f"invalid metric_for_best {training.metric_for_best!r}: choose one of {', '.join(BEST_METRICS)}")
    if training.precision not in PRECISIONS:
        raise TextclfError(f"invalid precision {training.precision!r}: choose one of {', '.join(PRECISIONS)}")
    for name in ("batch_size", "eval_batch_size", "eval_steps", "save_steps", "logging_steps",
                 "save_total_limit", "gradient_accumulation_steps"):
        if getattr(training, name) <= 0:
            raise TextclfError(f"{name} must be a positive integer, got {getattr(training, name)}")
    if training.save_steps % training.eval_steps:
        raise TextclfError(
            f"save_steps ({training.save_steps}) must be a multiple of eval_steps ({training.eval_steps}) "
            "so that the best checkpoint can be kept"
        )
    for name in ("learning_rate", "head_learning_rate"):
        value = getattr(training, name)
        if value is not None and value <= 0:
            raise TextclfError(f"{name} must be positive, got {value}")
    _check_range("warmup_ratio", training.warmup_ratio, 0, 1, "[0, 1)")
    _check_range("head_dropout", model.head_dropout, 0, 1, "[0, 1)")
    _check_range("lora_dropout", model.lora_dropout, 0, 1, "[0, 1)")
    if training.weight_decay < 0:
        raise TextclfError(f"weight_decay must be >= 0, got {training.weight_decay}")
    if model.calibration_samples < 0:
        raise TextclfError(f"calibration_samples must be >= 0 (0: off), got {model.calibration_samples}")
    for name in ("lora_r", "lora_alpha"):
        if getattr(model, name) <= 0:
            raise TextclfError(f"{name} must be a positive integer, got {getattr(model, name)}")
    if training.epochs < 0:
        raise TextclfError(f"epochs must be >= 0, got {training.epochs}")
    if training.max_train_minutes is not None and training.max_train_minutes <= 0:
        raise TextclfError(f"max_train_minutes must be positive, got {training.max_train_minutes}")
    if training.epochs <= 0 and training.max_steps <= 0:
        raise TextclfError("set epochs > 0 or max_steps > 0")


def _check_range(name: str, value: float, low: float, high: float, shown: str) -> None:
    """``low <= value < high``, else one line naming the parameter and the allowed range."""
    if not low <= value < high:
        raise TextclfError(f"{name} must be in {shown}, got {value}")


def flatten(config: RunConfig, max_length: int = 500) -> dict[str, str]:
    """Flatten the config to MLflow params (``section.key``), each value at most ``max_length`` chars.

    Top-level fields go under ``run.``: ``mlflow run`` logs its raw entry-point parameters (``mode``,
    ``seed``, ...) under bare names, and MLflow refuses to change a logged value. A longer value (a
    custom prompt template) is cut with a marker; the full value is in config.json.
    """
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
            return
        text = str(value)
        flat[prefix] = text if len(text) <= max_length else text[: max_length - 14] + "...[truncated]"

    sections = ("data", "model", "training")
    config_dict = config.to_dict()
    walk("", {"run": {k: v for k, v in config_dict.items() if k not in sections},
              **{k: config_dict[k] for k in sections}})
    return flat
