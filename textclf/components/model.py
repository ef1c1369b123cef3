"""The classifier: a pretrained base model, pooling, a classification head, and optional LoRA.

A saved model folder describes itself (``textclf.json``: label names, prompt template, max length,
pooling, head, base model reference, LoRA settings, the folder's ``format_version``; ``training_config.json``:
the whole configuration of the run that trained it) next to its tokenizer, backbone weights and head weights,
so it predicts offline with nothing else on disk, and says how it was made.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from textclf.config import REPO_ROOT, ModelConfig
from textclf.errors import TextclfError

log = logging.getLogger(__name__)

SPEC_FILE = "textclf.json"
# The run's RunConfig.to_dict(), as the run logs it to MLflow. Not config.json: tools that open a folder read that
# name as a Hugging Face model config.
RUN_CONFIG_FILE = "training_config.json"
LEGACY_RUN_CONFIG_FILE = "config.json"
# The layout of a model folder or checkpoint, written into textclf.json:
#   1: textclf.json without format_version, and no run configuration (folders written before either existed);
#   2: textclf.json holds format_version, and the run's configuration sits beside it as config.json when a training
#      run wrote the folder;
#   3: that configuration is training_config.json;
#   4: textclf.json holds base_layers (the base model's lowest layers the classifier keeps).
# Loading accepts every version up to this one.
FORMAT_VERSION = 4
HEAD_FILE = "head.safetensors"
BACKBONE_DIR = "backbone"
ADAPTER_DIR = "adapter"
ENCODER_TYPES = {
    "bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "xlm-roberta", "albert", "mpnet",
    "camembert", "modernbert", "xlnet",
}
DEFAULT_LORA_TARGETS = ModelConfig().lora_targets


@dataclass
class ClassifierSpec:
    """Everything needed to rebuild a classifier and its inputs, saved as ``textclf.json``."""

    label_names: list[str]
    prompt_template: str
    max_length: int
    pooling: str
    head: str
    head_dropout: float
    hidden_size: int
    base_model: str
    mode: str
    lora: dict[str, Any] | None = None
    base_layers: int = 0  # the base model's lowest layers kept (0: all); a saved backbone has only those
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path, run_config: dict[str, Any] | None = None) -> None:
        """Write ``textclf.json`` (this spec and the folder's FORMAT_VERSION) and, given the run's
        configuration (``RunConfig.to_dict()``), ``training_config.json``."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SPEC_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}, indent=2,
                                                   ensure_ascii=False))
        if run_config is not None:
            (folder / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: Path) -> "ClassifierSpec":
        """The spec of a folder of any format version up to FORMAT_VERSION (one without ``format_version`` is
        version 1). Raises TextclfError when ``textclf.json`` is missing or comes from a newer textclf."""
        path = folder / SPEC_FILE
        if not path.exists():
            raise TextclfError(f"{folder}: not a textclf model ({SPEC_FILE} is missing)")
        values = json.loads(path.read_text())
        version = values.pop("format_version", 1)
        if version > FORMAT_VERSION:
            raise TextclfError(f"{folder}: written in format version {version} by a newer textclf; this one reads "
                               f"versions up to {FORMAT_VERSION}")
        return cls(**values)


def load_run_config(folder: Path) -> dict[str, Any] | None:
    """The configuration of the run that wrote ``folder`` (``training_config.json``, or ``config.json`` in a folder
    of format version 2), or None for a folder written before folders carried it (format version 1) or by
    something other than a training run."""
    for name in (RUN_CONFIG_FILE, LEGACY_RUN_CONFIG_FILE):
        path = folder / name
        if path.exists():
            values = json.loads(path.read_text())
            if {"mode", "data", "model", "training"} <= set(values):  # not a Hugging Face model config
                return values
    return None


class FeatureScaler(nn.Module):
    """Per-dimension standardization of the pooled features, with statistics measured once.

    Decoder hidden states carry a few "massive activation" dimensions (in SmolLM2 |x| reaches 45
    while the median per-dimension std is 0.2) that are nearly constant across inputs; a freshly
    initialized head sees mostly those and learns slowly. Measured on cached SmolLM2 features of
    SST-2: an MLP head reached 48% test accuracy after 25 steps on raw features and 66% on
    standardized ones. The statistics are buffers: saved, loaded and applied at prediction time.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.register_buffer("shift", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(hidden_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.shift) / self.scale

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> None:
        self.shift.copy_(features.mean(0))
        self.scale.copy_(features.std(0).clamp(min=1e-3) if len(features) > 1 else torch.ones_like(self.scale))


class MLPHead(nn.Sequential):
    """standardize -> hidden -> 512 -> 256 -> classes with ReLU and dropout, Xavier-uniform weights,
    zero biases. No dropout on the pooled input: dropping a massive-activation dimension swamps the
    logits with noise."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__(
            FeatureScaler(hidden_size),
            nn.Linear(hidden_size, 512), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(512, 256), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(256, num_labels),
        )
        for layer in self:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)


class LinearHead(nn.Sequential):
    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__(FeatureScaler(hidden_size), nn.Dropout(dropout), nn.Linear(hidden_size, num_labels))
        nn.init.xavier_uniform_(self[2].weight)
        nn.init.zeros_(self[2].bias)


HEAD_CLASSES = {"mlp": MLPHead, "linear": LinearHead}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Last non-padding token (decoders) or mean over real tokens (encoders), both read off the mask.

    The last real position is the highest index whose mask is 1, which holds for left and right padding.
    """
    mask = attention_mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(attention_mask)
    last = (positions * attention_mask).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class TextClassifier(nn.Module):
    """Base model + pooling + head. Returns logits; with ``labels``, also the cross-entropy loss."""

    def __init__(self, backbone: nn.Module, spec: ClassifierSpec):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        head_class = HEAD_CLASSES[spec.head]
        self.head = head_class(spec.hidden_size, len(spec.label_names), spec.head_dropout)
        # The HF convention: the label map lives in the model config too.
        config = self.config
        config.id2label = dict(enumerate(spec.label_names))
        config.label2id = {name: i for i, name in enumerate(spec.label_names)}

    @property
    def config(self):
        return base_of(self.backbone).config

    def forward(self, input_ids=None, attention_mask=None, labels=None, **_: Any) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.head(self.pooled(hidden, attention_mask))
        loss = None
        if labels is not None:
            # float32 loss under bf16 autocast: the softmax of few classes is cheap and stays exact.
            loss = nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool(hidden, attention_mask, self.spec.pooling).to(self.head[-1].weight.dtype)

    @torch.no_grad()
    def standardize_head_inputs(self, batches) -> int:
        """Fit the head's feature standardization on pooled features of a few training batches.

        Call before training, on the frozen starting model. Returns the number of rows used.
        """
        was_training = self.training
        self.eval()
        features = []
        for batch in batches:
            hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            features.append(self.pooled(hidden, batch["attention_mask"]).float())
        self.head[0].fit(torch.cat(features))
        self.train(was_training)
        return sum(len(f) for f in features)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        base = base_of(self.backbone)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs.get("use_reentrant") is False and any(not parameter.requires_grad for parameter in base.parameters()):
            # transformers makes the embeddings' output require grad for checkpointing, which only reentrant
            # checkpointing needs: with frozen_layers or lora_layers (or LoRA's frozen lower projections), backward
            # would then run (and recompute) layers that nothing below trains.
            base.disable_input_require_grads()


def base_of(backbone: nn.Module) -> nn.Module:
    """The plain transformers model under a PEFT wrapper (or the backbone itself)."""
    get_base = getattr(backbone, "get_base_model", None)
    return get_base() if get_base else backbone


def resolve_model_path(name_or_path: str) -> str:
    """A local folder (absolute, relative to the working folder, or to the repo) or a hub id.

    Raises TextclfError when a path-like name does not exist or is not a model folder.
    """
    for candidate in (Path(name_or_path), REPO_ROOT / name_or_path):
        if candidate.is_dir():
            if (candidate / SPEC_FILE).exists():  # a trained model (version 2's config.json is a run's configuration)
                raise TextclfError(f"{candidate}: not a Hugging Face model folder but a trained textclf model "
                                   f"(its base model: {ClassifierSpec.load(candidate).base_model})")
            if not (candidate / "config.json").exists():
                raise TextclfError(f"{candidate}: not a Hugging Face model folder (config.json is missing)")
            return str(candidate)
    # Hub ids are `name` (gpt2) or `owner/name` (meta-llama/Llama-3.2-1B-Instruct); any other name
    # that is not a folder was meant as a path, and a missing path is the user's mistake to report.
    looks_local = (
        name_or_path.startswith((".", "/", "~", "ckpt")) or "\\" in name_or_path or name_or_path.count("/") > 1
    )
    if looks_local:
        hint = " (run `make install` to create the default model)" if "SmolLM2" in name_or_path else ""
        raise TextclfError(f"{name_or_path}: base model folder does not exist{hint}")
    return name_or_path  # offline or unknown, it fails in load_tokenizer/load_backbone with a TextclfError


def default_pooling(model_type: str) -> str:
    return "mean" if model_type in ENCODER_TYPES else "last"


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise TextclfError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None


def load_backbone(path: str, dtype: torch.dtype = torch.float32, layers: int = 0) -> nn.Module:
    """The base model without its LM head; with ``layers``, only its lowest ``layers`` transformer layers.
    Raises TextclfError when it cannot be loaded."""
    try:
        if not layers:
            return AutoModel.from_pretrained(path, dtype=dtype)
        return load_lowest_layers(path, dtype, layers)
    except (OSError, ValueError, KeyError) as exc:
        raise TextclfError(f"{path}: cannot load a base model ({str(exc).splitlines()[0]})") from None


def load_lowest_layers(path: str, dtype: torch.dtype, layers: int) -> nn.Module:
    """The base model built with ``layers`` transformer layers (transformers' ``num_hidden_layers``), the weights
    of the layers above left unused: a classifier may read a middle layer's features, which for SmolLM2 on SST-2
    separate the classes better than the last layer's (docs/benchmarks.md), at a fraction of the compute.

    transformers reports every weight it did not use as a warning, which here lists each weight of the dropped
    layers: that report is kept quiet and read here instead. A weight of the layers kept that the folder lacks is an
    error; other missing weights (an encoder's unused pooler) are warned about, as transformers would have.
    """
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(path)
    depth = getattr(config, "num_hidden_layers", None)
    if not depth:
        raise TextclfError(f"base_layers={layers}: {path} does not declare its number of layers (num_hidden_layers)")
    if layers > depth:
        raise TextclfError(f"base_layers={layers}: {path} has {depth} transformer layers")
    config.num_hidden_layers = layers
    for name, value in list(vars(config).items()):
        # Per-layer settings (layer_types, mlp_layer_types: attention or MLP kind of each layer) follow the depth;
        # transformers checks them only when the config is saved, after training.
        if "layer" in name and isinstance(value, list) and len(value) == depth:
            setattr(config, name, value[:layers])
    if hasattr(config, "validate_layer_type"):
        config.validate_layer_type()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        backbone, info = AutoModel.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    except RuntimeError as exc:  # a size mismatch or conversion error, whose report was silenced above
        raise TextclfError(f"base_layers={layers}: {path} did not load ({str(exc).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    kept_layer = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
    missing = sorted(info["missing_keys"])
    lacking = [key for key in missing if (match := kept_layer.search(key)) and int(match.group(1)) < layers]
    if lacking:
        raise TextclfError(f"base_layers={layers}: {path} lacks weights of the layers kept ({', '.join(lacking[:3])})")
    if missing:
        log.warning("%s: weights not in the folder, newly initialized: %s", path, ", ".join(missing[:5]))
    log.info("base_layers=%d: the lowest %d of the base model's %d transformer layers", layers, layers, depth)
    return backbone


def resolve_lora_targets(backbone: nn.Module, requested: str) -> list[str]:
    """The modules LoRA adapts. The default (Llama's seven projections) is every linear layer of the transformer
    blocks, by name: the same seven in a Llama, their equivalents in other families (BERT's query/key/value/dense).
    Found here rather than with PEFT's ``all-linear``, which refuses ``layers_to_transform`` (``lora_layers``).

    Raises TextclfError listing the model's linear layers when explicit targets are absent.
    """
    linear_names = {name.rsplit(".", 1)[-1] for name, module in backbone.named_modules() if isinstance(module, nn.Linear)}
    if requested == DEFAULT_LORA_TARGETS:
        in_blocks = {name.rsplit(".", 1)[-1] for layer in transformer_layers(backbone)
                     for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
        return sorted(in_blocks or linear_names)
    wanted = [t.strip() for t in requested.split(",") if t.strip()]
    missing = [t for t in wanted if t not in linear_names]
    if missing:
        raise TextclfError(f"LoRA targets absent from the model: {', '.join(missing)} (its linear layers: "
                           f"{', '.join(sorted(linear_names))})")
    return wanted


def apply_lora(backbone: nn.Module, config: ModelConfig) -> tuple[nn.Module, dict[str, Any]]:
    """PEFT's LoRA on the targets, on every layer or on the top ``config.lora_layers`` (PEFT's
    ``layers_to_transform``). Raises TextclfError when targets are absent or the model has too few layers."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_lora_targets(backbone, config.lora_targets)
    lora = dict(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets)
    layers = transformer_layers(backbone)
    if config.lora_layers > len(layers):
        raise TextclfError(f"lora_layers={config.lora_layers}: the model has {len(layers)} transformer layers")
    if 0 < config.lora_layers < len(layers):
        lora["layers_to_transform"] = list(range(len(layers) - config.lora_layers, len(layers)))
        # The layer list's own name ("layers", "layer"): PEFT's default pattern needs a prefix before it.
        lora["layers_pattern"] = next(name for name, module in backbone.named_modules() if module is layers).split(".")[-1]
    return get_peft_model(backbone, LoraConfig(bias="none", **lora)), lora


def transformer_layers(backbone: nn.Module) -> nn.ModuleList | list:
    """The backbone's transformer blocks, bottom first: its ModuleList of ``num_hidden_layers`` modules, as every
    transformers encoder and decoder has it (empty when there is none)."""
    depth = getattr(backbone.config, "num_hidden_layers", None)
    return next((module for module in backbone.modules()
                 if isinstance(module, nn.ModuleList) and depth and len(module) == depth), [])


def freeze_lower_layers(backbone: nn.Module, count: int) -> int:
    """Freeze what the backbone computes below its transformer layer ``count``: the embeddings and the lowest
    ``count`` layers. Backward then stops at that layer (no gradients below it, no optimizer state for those
    weights). Returns the number of parameters frozen. Raises TextclfError when the model has too few layers.

    Written by hand (neither transformers nor PEFT freezes by depth): the layers are the backbone's ModuleList
    of ``num_hidden_layers`` blocks, and every parameter registered before the first one of layer ``count``
    (embeddings, their norm) is below it, as in every transformers encoder and decoder.
    """
    layers = transformer_layers(backbone)
    if not layers:
        raise TextclfError(f"frozen_layers={count}: cannot find the layers of this {backbone.config.model_type} model")
    if count >= len(layers):
        raise TextclfError(f"frozen_layers={count}: the model has {len(layers)} layers; at least its top one must train")
    first_trained = next(layers[count].parameters())
    frozen = 0
    for parameter in backbone.parameters():
        if parameter is first_trained:
            break
        parameter.requires_grad_(False)
        frozen += getattr(parameter, "ds_numel", parameter.numel())  # ZeRO-3 partitions leave numel() 0
    log.info("frozen: the embeddings and the lowest %d of %d layers (%.1fM parameters)", count, len(layers), frozen / 1e6)
    return frozen


def build_classifier(
    config: ModelConfig, mode: str, label_names: list[str], prompt_template: str, max_length: int
) -> tuple[TextClassifier, PreTrainedTokenizerBase]:
    """Load the base model and tokenizer, and put a fresh head (and LoRA adapters in lora mode) on it.

    Seed the RNGs before calling: the head's initial weights come from them. Raises TextclfError.
    """
    path = resolve_model_path(config.base_model)
    tokenizer = load_tokenizer(path)
    backbone = load_backbone(path, layers=config.base_layers)
    model_type = backbone.config.model_type
    pooling = default_pooling(model_type) if config.pooling == "auto" else config.pooling
    lora = None
    if mode == "lora":
        backbone, lora = apply_lora(backbone, config)
    elif config.frozen_layers:
        freeze_lower_layers(backbone, config.frozen_layers)
    spec = ClassifierSpec(
        label_names=list(label_names), prompt_template=prompt_template, max_length=max_length, pooling=pooling,
        head=config.head, head_dropout=config.head_dropout, hidden_size=backbone.config.hidden_size,
        base_model=config.base_model, mode=mode, lora=lora, base_layers=config.base_layers,
    )
    return TextClassifier(backbone, spec), tokenizer


def frozen_base_keys(model: TextClassifier) -> set[str]:
    """State-dict keys of the base model's frozen parameters: under LoRA, every backbone weight but the adapters."""
    return {f"backbone.{name}" for name, parameter in model.backbone.named_parameters(remove_duplicate=False)
            if not parameter.requires_grad}


def trained_state(model: TextClassifier) -> dict[str, torch.Tensor]:
    """The part of the state dict that training changes, which is what a checkpoint must hold.

    Under LoRA that is the adapters, the head and the head's scaler buffers: the frozen backbone is
    the base model's, unchanged, and reloads from there (for the 135M default it is 540 of a
    checkpoint's 620 MB). Full fine-tuning changes every weight: the whole state dict.
    """
    state = model.state_dict()
    if not model.spec.lora:
        return state
    frozen = frozen_base_keys(model)
    return {key: value for key, value in state.items() if key not in frozen}


def load_trained_state(model: TextClassifier, state_file: Path) -> None:
    """Load a checkpoint's ``model.safetensors`` (whole, or only :func:`trained_state`) into ``model``,
    whose frozen weights are the base model's.

    Raises TextclfError when the file holds a key the model lacks, or lacks one that is not a frozen
    base weight (a checkpoint of another model, or a trained weight missing).
    """
    loaded = model.load_state_dict(load_file(str(state_file)), strict=False)
    missing = sorted(set(loaded.missing_keys) - frozen_base_keys(model))
    if missing or loaded.unexpected_keys:
        problems = [f"{label} {', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"
                    for label, keys in (("missing", missing), ("unknown", loaded.unexpected_keys)) if keys]
        raise TextclfError(f"{state_file}: does not fit the model ({'; '.join(problems)})")


def rebuild_from_state(folder: Path, state_file: Path) -> tuple[TextClassifier, PreTrainedTokenizerBase]:
    """Rebuild a classifier from a spec and a Trainer checkpoint's state dict (``model.safetensors``): the
    whole model, or under LoRA only what training changed (the frozen weights come from the base model)."""
    spec = ClassifierSpec.load(folder)
    path = resolve_model_path(spec.base_model)
    tokenizer = load_tokenizer(str(folder)) if (folder / "tokenizer_config.json").exists() else load_tokenizer(path)
    backbone = load_backbone(path, layers=spec.base_layers)
    if spec.lora:
        from peft import LoraConfig, get_peft_model

        backbone = get_peft_model(backbone, LoraConfig(bias="none", **spec.lora))
    model = TextClassifier(backbone, spec)
    load_trained_state(model, state_file)
    return model.eval(), tokenizer


def save_classifier(model: TextClassifier, tokenizer: PreTrainedTokenizerBase, folder: Path,
                    run_config: dict[str, Any] | None = None) -> None:
    """Write a self-contained model folder (with ``training_config.json``, given the run's ``RunConfig.to_dict()``).
    LoRA adapters are saved alone too, then merged into the backbone.

    Merging happens in place (the model keeps working and gives the same outputs); the written
    backbone is a plain transformers model, so loading needs neither PEFT nor the base model.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if model.spec.lora:
        model.backbone.save_pretrained(str(folder / ADAPTER_DIR))
        model.backbone = model.backbone.merge_and_unload()
    model.backbone.save_pretrained(str(folder / BACKBONE_DIR))
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(folder / HEAD_FILE))
    tokenizer.save_pretrained(str(folder))
    model.spec.save(folder, run_config)


def load_classifier(folder: str | os.PathLike) -> tuple[TextClassifier, PreTrainedTokenizerBase]:
    """Load a folder written by :func:`save_classifier`, of any format version (see FORMAT_VERSION). Raises
    TextclfError if it is not one."""
    folder = Path(folder)
    spec = ClassifierSpec.load(folder)
    backbone = load_backbone(str(folder / BACKBONE_DIR))
    model = TextClassifier(backbone, spec)
    model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    tokenizer = load_tokenizer(str(folder))
    return model.eval(), tokenizer
