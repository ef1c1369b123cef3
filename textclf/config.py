"""The whole run configuration as frozen dataclasses, the mode presets, and their validation.

A run is described once, here, and logged once (flattened to params and as ``config.json``). Each parameter is a
field declared with its help, default or per-mode preset and allowed values (see textclf/parameters.py); the click
options, their checks and MLproject are derived from these declarations. Values left as ``None`` are filled from
the preset of the chosen mode by :func:`build_config`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textclf.errors import TextclfError
from textclf.parameters import FRACTION, NON_NEGATIVE, POSITIVE, Parameter, Range, check_fields, param, parameters_of

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_DATASETS = ("sst2", "r8")
DEFAULT_BASE_MODEL = "ckpt/SmolLM2-135M-Instruct"
MINILM_BASE_MODEL = "ckpt/all-MiniLM-L6-v2"  # the quick demo's encoder (make install copies it there)
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

DEFAULT_MODE = "lora"

def preset(help: str, *, full: Any, lora: Any, **allowed: Any) -> Any:
    """A parameter whose default is the chosen mode's preset (hyper-parameters of the original project); the
    dataclass default is the default mode's, for a section built without :func:`build_config`."""
    values = {"full": full, "lora": lora}
    return param(values[DEFAULT_MODE], help, presets=values, **allowed)


# Each run parameter is declared once, below, with param() or preset(): the click options, their --help, the
# range and choice checks and the MLproject parameters are derived from these fields (textclf/parameters.py).
# After adding or changing one, run `make mlproject`. Fields without help are not parameters.
# A new parameter's default must reproduce what textclf did before it existed: folders written then lack it in
# their recipe and still resume while it is at its default (textclf.components.checkpoints.differences).


@dataclass(frozen=True)
class DataConfig:
    # Choices are checked in validate (only without data_path): a declared choice would refuse every custom folder.
    dataset: str | None = param("sst2", "shipped dataset: sst2 or r8")
    data_path: str | None = param(None, "folder with train/dev/test files (json, jsonl, parquet, csv); overrides "
                                  "dataset")
    text_column: str | None = param(None, "name of the text column (default: detected: text, sentence, review, ...)")
    label_column: str | None = param(None, "name of the label column (default: detected: label, category, class, ...)")
    # Validation and test rows are never capped silently: their caps are explicit and logged.
    max_samples: int | None = param(None, "cap on training rows", range=POSITIVE)
    max_eval_samples: int | None = param(None, "cap on validation rows (logged)", range=POSITIVE)
    max_test_samples: int | None = param(None, "cap on test rows (logged)", range=POSITIVE)
    max_length: int = param(512, "max tokens per prompt; the text is cut, never the template", range=Range(16))
    prompt_template: str = param(DEFAULT_PROMPT_TEMPLATE, "prompt with {text} and {class_labels}")
    # Not a parameter (every run carves the same 15% validation split), but its range is checked all the same.
    validation_fraction: float = field(default=0.15, metadata={"range": Range(0, 1, low_open=True)})
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
    base_model: str = param(DEFAULT_BASE_MODEL, "local Hugging Face folder or hub id")
    base_layers: int = param(0, "keep only the base model's lowest N transformer layers (0: all): the layers above "
                             "are not built, so each step costs about N/depth of the whole model's",
                             range=NON_NEGATIVE)
    head: str = preset("classification head", full="mlp", lora="mlp", choices=HEADS)
    head_dropout: float = param(0.1, "dropout in the head", range=FRACTION)
    pooling: str = param("auto", "auto: last token (decoders), mean (encoders)", choices=POOLINGS)
    standardization_samples: int = param(128, "train rows that standardize the head's input features (0: off)",
                                     range=NON_NEGATIVE)
    frozen_layers: int = param(0, "full mode: freeze the embeddings and the lowest N transformer layers, so backward "
                               "stops above them (faster steps; 0 trains every layer)", range=NON_NEGATIVE)
    lora_r: int = param(64, "LoRA rank", range=POSITIVE)
    lora_alpha: int = param(16, "LoRA alpha", range=POSITIVE)
    lora_dropout: float = param(0.1, "LoRA dropout", range=FRACTION)
    lora_targets: str = param("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "comma-separated module names")
    lora_layers: int = param(0, "LoRA adapters on the top N transformer layers only, so backward stops below them "
                             "(0: every layer)", range=NON_NEGATIVE)


@dataclass(frozen=True)
class TrainingConfig:
    learning_rate: float = preset("peak learning rate", full=2e-5, lora=5e-4, range=POSITIVE)
    # The fresh head often wants more than the backbone.
    head_learning_rate: float | None = param(None, "peak learning rate of the classification head (default: "
                                             "learning_rate)", range=POSITIVE)
    batch_size: int = preset("training batch size per device", full=4, lora=8, range=POSITIVE)
    eval_batch_size: int = param(32, "evaluation batch size", range=POSITIVE)
    epochs: float = preset("training epochs", full=5.0, lora=8.0, range=NON_NEGATIVE)
    max_steps: int = param(-1, "stop after this many steps (overrides epochs when > 0)")
    max_train_minutes: float | None = param(None, "time budget: evaluate, save and stop once training has run this "
                                            "long", range=POSITIVE)
    fit_to_budget: bool = param(False, "with max_train_minutes: time the steps while training and end the run where "
                                "the budget does, evaluations included (epochs/max_steps: the most it may run), "
                                "with the learning-rate warm-up and decay sized to that length")
    eval_steps: int = preset("evaluate every N steps", full=50, lora=100, range=POSITIVE)
    evaluations: int = param(0, "evaluate and save this many times, evenly over the run and at its last step, "
                             "in place of eval_steps and save_steps (0: every eval_steps); with fit_to_budget, over "
                             "the steps the budget holds", range=NON_NEGATIVE)
    # Saved at every evaluation by default: only a saved step can be selected as the best checkpoint, so a step
    # evaluated but not saved could show the best score on the curves and still not be the model a run keeps.
    save_steps: int | None = param(None, "checkpoint every N steps, a multiple of eval_steps (default: eval_steps, "
                                   "so that every evaluated step can be selected)", range=POSITIVE)
    logging_steps: int = param(10, "log train metrics every N steps", range=POSITIVE)
    early_stopping_patience: int = param(0, "stop once this many evaluations in a row have not improved "
                                         "metric_for_best (0: never)", range=NON_NEGATIVE)
    save_total_limit: int = param(2, "checkpoints kept (the best one always survives)", range=POSITIVE)
    metric_for_best: str = param("f1_macro", "validation metric that selects the best checkpoint",
                                 choices=BEST_METRICS)
    weight_decay: float = param(0.0, "AdamW weight decay", range=NON_NEGATIVE)
    warmup_ratio: float = param(0.0, "fraction of steps for learning-rate warmup", range=FRACTION)
    gradient_accumulation_steps: int = param(1, "micro-batches per optimizer step", range=POSITIVE)
    gradient_checkpointing: bool = param(False, "recompute activations to save memory")
    precision: str = param("auto", "auto: bf16 where fast, else fp32", choices=PRECISIONS)
    group_by_length: bool = param(True, "batch rows of similar length together")
    calibrate: bool = param(True, "fit a temperature on validation after training so that scores are calibrated")


@dataclass(frozen=True)
class RunConfig:
    mode: str = param(DEFAULT_MODE, "what trains: every weight (full) or LoRA adapters (lora), each with the head",
                      choices=MODES)
    # Read as text: parse_seed, in build_config, says what is wrong with a seed that is not an integer.
    seed: int = param(42, "training seed, an integer (0, 42 and 123 are the sweep's defaults)", cli_type=str)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output_dir: str = param("outputs", "checkpoints and the final model go to <output_dir>/<run_name>/")
    run_name: str | None = param(None, "default <dataset>-<mode>-seed<seed>")
    register: bool = param(True, "register the model as a version of textclf-<dataset> in the MLflow model registry")
    resume: bool = param(True, "continue from the latest complete checkpoint of the output folder")

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


def run_parameters() -> list[Parameter]:
    """Every run parameter, as declared above: one click option and one MLproject parameter each."""
    return parameters_of(RunConfig)


# Hyper-parameters of the original project, per mode, as declared with preset(). Every one is overridable.
MODE_PRESETS: dict[str, dict[str, Any]] = {
    mode: {p.name: p.presets[mode] for p in run_parameters() if p.follows_mode} for mode in MODES
}


def build_config(mode: str = DEFAULT_MODE, **overrides: Any) -> RunConfig:
    """Build a validated config from a mode and flat overrides (``None`` means "use the preset").

    Flat keys are routed to the section that owns them, so the entry points can pass their click
    options straight through. Raises TextclfError on an unknown key or an invalid value.
    """
    if mode not in MODES:
        raise TextclfError(f"invalid mode {mode!r}: choose one of {', '.join(MODES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("evaluations") and {"eval_steps", "save_steps"} & set(given):
        raise TextclfError("evaluations=N evaluates and saves a run N times in place of eval_steps and save_steps: "
                           "pass one or the other")
    values = {**MODE_PRESETS[mode], **given}
    if "seed" in values:
        values["seed"] = parse_seed(values["seed"])
    values.setdefault("save_steps", values["eval_steps"])
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
    """Refuse values and combinations that cannot run, each with one line naming the parameter.

    Ranges and choices come from the field declarations (textclf.parameters.check_fields); what involves
    several fields, or a message of its own, is checked here."""
    data, training = config.data, config.training
    if not data.data_path and data.dataset not in SHIPPED_DATASETS:
        raise TextclfError(
            f"unknown dataset {data.dataset!r}: choose one of {', '.join(SHIPPED_DATASETS)} or pass data_path"
        )
    if not isinstance(config.seed, int) or isinstance(config.seed, bool) or not 0 <= config.seed < 2**32:
        raise TextclfError(f"invalid seed {config.seed!r}: use an integer in [0, 2**32)")
    check_fields(config)  # before the checks below: save_steps % eval_steps needs eval_steps > 0
    if "{text}" not in data.prompt_template:
        raise TextclfError("prompt_template must contain the placeholder {text}")
    if training.save_steps % training.eval_steps:
        raise TextclfError(
            f"save_steps ({training.save_steps}) must be a multiple of eval_steps ({training.eval_steps}) "
            "so that the best checkpoint can be kept"
        )
    if training.fit_to_budget and not training.max_train_minutes:
        raise TextclfError("fit_to_budget sizes the run to max_train_minutes: set max_train_minutes too")
    if training.epochs <= 0 and training.max_steps <= 0:
        raise TextclfError("set epochs > 0 or max_steps > 0")
    if config.model.lora_layers and config.mode != "lora":
        raise TextclfError(f"lora_layers applies to mode=lora (use frozen_layers in mode=full); got mode={config.mode}")
    if config.model.frozen_layers and config.mode != "full":
        raise TextclfError(f"frozen_layers applies to mode=full (LoRA already freezes the base model); got mode={config.mode}")
    base_layers = config.model.base_layers
    for name in ("lora_layers", "frozen_layers"):
        if base_layers and getattr(config.model, name) > base_layers:
            raise TextclfError(f"{name}={getattr(config.model, name)}: base_layers={base_layers} keeps only "
                               f"{base_layers} transformer layers")


# Each logged param value is cut to 500 characters: the MLflow installed here stores up to 6000, but remote
# tracking stores (servers on older MLflow versions) still enforce 500 and refuse the whole batch of params.
PARAM_VALUE_LIMIT = 500
TRUNCATED = "...[truncated]"  # ends a value cut to PARAM_VALUE_LIMIT


def flatten(config: RunConfig, max_length: int | None = PARAM_VALUE_LIMIT) -> dict[str, str]:
    """Flatten the config to MLflow params (``section.key``), each value at most ``max_length`` chars (None:
    whole values, to compare configurations).

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
        flat[prefix] = text if max_length is None or len(text) <= max_length else text[: max_length - len(TRUNCATED)] + TRUNCATED

    sections = ("data", "model", "training")
    config_dict = config.to_dict()
    walk("", {"run": {k: v for k, v in config_dict.items() if k not in sections},
              **{k: config_dict[k] for k in sections}})
    return flat
