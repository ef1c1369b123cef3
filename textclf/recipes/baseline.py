"""The zero-shot baseline: the base language model, untrained, asked the training prompt.

Each text is wrapped in the same prompt as in training (``PromptEncoder``: same template, same
``{class_labels}``, same truncation) and every class name ``c`` is scored by the log-probability the
model gives to ``c``'s tokens right after the prompt, ``log p(c | prompt) = sum_j log p(t_j | prompt, t_<j)``.
A softmax over these scores gives ``p(c) / sum_c' p(c')``: the model's distribution restricted to the
class names. The sum is not length-normalized: it is the probability of the whole name, and dividing by
the token count would favour long names whose later tokens are near-certain once the first is chosen.

Class names are scored with a leading space (``answer: Positive``). GPT-2-style BPE tokenizers
(SmolLM2, Llama 3, Qwen) attach the space to the word that follows (``ĠPositive``), the form in which
a word occurs inside running text; without it the model would have to glue the word to the colon,
an unusual continuation, and the scores would partly measure the spacing convention. The tokens are
taken as they follow the prompt (the prompt's tokens, then the rest), so a tokenizer that merges across
the boundary is handled too.

Cost: one forward pass per length-sorted batch over the prompts, reading the next-token log-probs at
each prompt's last token, which scores every class name that is one token (all of SST-2's with SmolLM2,
six of R8's eight). A longer name gets one more, short pass per batch over its remaining tokens,
reusing the prompts' key/value cache. Logits are computed only where they are read, never over the
whole vocabulary at every position.

The model is a ``torch.nn.Module`` with a ``spec`` and class logits like the trained ``TextClassifier``,
so :class:`textclf.serving.inference.Predictor` batches it, and its pyfunc exposes a ``predictor``: ``evaluate``,
``predict`` and serving take it like any trained model.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from textclf.components.encoding import format_prompt, prepare_tokenizer
from textclf.components.evaluation import classification_metrics
from textclf.components.model import ENCODER_TYPES, ClassifierSpec, load_tokenizer, resolve_model_path
from textclf.config import DEFAULT_BASE_MODEL, DEFAULT_PROMPT_TEMPLATE, SHIPPED_DATASETS, DataConfig
from textclf.errors import TextclfError
from textclf.serving.pyfunc import DEFAULT_BATCH_SIZE, TextClassifierPyfunc

MODE = "zero-shot"
SPEC_FILE = "zero_shot.json"  # not textclf.json: this folder is a plain causal LM, not a trained classifier
ANSWER_PREFIX = " "  # what separates "answer:" from the class name (see the module docstring)


class ZeroShotClassifier(nn.Module):
    """A causal LM whose "logits" are ``log p(class name | prompt)``, one per class."""

    def __init__(self, lm: nn.Module, spec: ClassifierSpec, class_tokens: Sequence[Sequence[int]]):
        super().__init__()
        self.lm = lm
        self.spec = spec
        self.class_tokens = [list(tokens) for tokens in class_tokens]
        self.register_buffer("first_tokens", torch.tensor([t[0] for t in self.class_tokens]), persistent=False)
        decoder = lm.base_model
        # transformers 5.x renamed past_key_values to cache (the old name is deprecated, not yet removed).
        self._cache_kw = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> SequenceClassifierOutput:
        """Prompts padded on the right (``pad_batch``): each one's last real token is at ``mask.sum() - 1``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return SequenceClassifierOutput(logits=self.class_log_probs(input_ids, attention_mask))

    def class_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        decoder, head = self.lm.base_model, self.lm.get_output_embeddings()
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        lengths = attention_mask.sum(dim=1)
        extend = any(len(tokens) > 1 for tokens in self.class_tokens)
        cache = None
        if extend:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.lm.config)
        kwargs = {self._cache_kw: cache} if extend else {}
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=extend, **kwargs).last_hidden_state
        next_token = torch.log_softmax(head(hidden[rows, lengths - 1]).float(), dim=-1)
        scores = next_token[:, self.first_tokens]
        for c, tokens in enumerate(self.class_tokens):
            if len(tokens) > 1:
                scores[:, c] += self._rest_of_name(decoder, head, cache, attention_mask, lengths, tokens)
        return scores

    def _rest_of_name(self, decoder, head, cache, attention_mask, lengths, tokens: list[int]) -> torch.Tensor:
        """``sum_{j>=2} log p(t_j | prompt, t_<j)``: feed ``t_1 .. t_{k-1}`` after the cached prompts.

        The cache holds the padded prompts; the mask hides their padding and the positions continue
        each prompt's own length, so this equals a forward over the unpadded prompt + name. The cache
        is cropped back afterwards for the next class."""
        batch, n = attention_mask.shape[0], len(tokens) - 1
        device = attention_mask.device
        fed = torch.tensor(tokens[:-1], device=device).expand(batch, n)
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, n)], dim=1)
        positions = lengths[:, None] + torch.arange(n, device=device)[None, :]
        hidden = decoder(input_ids=fed, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_kw: cache}).last_hidden_state
        cache.crop(-n)
        log_probs = torch.log_softmax(head(hidden).float(), dim=-1)
        wanted = torch.tensor(tokens[1:], device=device).expand(batch, n)
        return log_probs.gather(2, wanted[..., None]).squeeze(-1).sum(dim=1)


def class_continuations(tokenizer: PreTrainedTokenizerBase, template: str, label_names: Sequence[str]) -> list[list[int]]:
    """Each class name's token ids as they follow the prompt (after ``ANSWER_PREFIX``).

    Read off ``tokenize(prompt + " " + name)`` past the prompt's own tokens; when the tokenizer
    merges across that boundary (or appends an end token), the name is tokenized alone instead.
    Raises TextclfError for a name that gives no tokens."""
    prompt = format_prompt(template, "", label_names)
    prefix = tokenizer(prompt)["input_ids"]
    continuations = []
    for name in label_names:
        full = tokenizer(prompt + ANSWER_PREFIX + name)["input_ids"]
        if full[: len(prefix)] == prefix and len(full) > len(prefix):
            tokens = full[len(prefix):]
        else:
            tokens = tokenizer(ANSWER_PREFIX + name, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise TextclfError(f"class name {name!r} gives no tokens with this tokenizer")
        continuations.append(list(tokens))
    return continuations


def check_decoder(base_model: str) -> str:
    """The resolved model path, when it is a decoder with a language-model head. Raises TextclfError otherwise."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    path = resolve_model_path(base_model)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise TextclfError(f"{base_model}: cannot load a model config ({str(exc).splitlines()[0]})") from None
    kind = config.model_type
    # BERT-like models also have "causal LM" classes in transformers, with an untrained head: refuse them by type.
    if kind in ENCODER_TYPES or getattr(config, "is_encoder_decoder", False) or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise TextclfError(
            f"{base_model}: the zero-shot baseline needs a decoder language model with a next-token head "
            f"(SmolLM2, Llama, Qwen, GPT-2); this is a {kind} encoder, which can only be fine-tuned (textclf train)"
        )
    return path


def load_lm(path: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise TextclfError(f"{path}: cannot load a causal language model ({str(exc).splitlines()[0]})") from None
    if lm.get_output_embeddings() is None:
        raise TextclfError(f"{path}: the model has no language-model head")
    return lm.eval()


def build_zero_shot(
    base_model: str, label_names: Sequence[str], prompt_template: str, max_length: int, dataset: str | None = None
) -> tuple[ZeroShotClassifier, PreTrainedTokenizerBase]:
    """Load the base model as a zero-shot classifier over ``label_names``. Raises TextclfError for an
    encoder, a folder that is not a model, or a prompt that leaves no room for text."""
    path = check_decoder(base_model)
    tokenizer = prepare_tokenizer(load_tokenizer(path))
    tokens = class_continuations(tokenizer, prompt_template, label_names)
    lm = load_lm(path)
    spec = ClassifierSpec(
        label_names=list(label_names), prompt_template=prompt_template, max_length=max_length, pooling="last",
        head="lm", head_dropout=0.0, hidden_size=lm.config.hidden_size, base_model=base_model, mode=MODE,
        extra={"dataset": dataset, "class_tokens": tokens, "answer_prefix": ANSWER_PREFIX, "scoring": "sum_log_prob"},
    )
    return ZeroShotClassifier(lm, spec, tokens), tokenizer


def save_zero_shot(model: ZeroShotClassifier, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """A self-contained folder: the base model (weights, config), its tokenizer and ``zero_shot.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(model.spec), indent=2, ensure_ascii=False))


def load_zero_shot(folder: str | Path) -> tuple[ZeroShotClassifier, PreTrainedTokenizerBase]:
    """Load a folder written by :func:`save_zero_shot`. Raises TextclfError if it is not one."""
    folder = Path(folder)
    if not (folder / SPEC_FILE).exists():
        raise TextclfError(f"{folder}: not a zero-shot baseline model ({SPEC_FILE} is missing)")
    spec = ClassifierSpec(**json.loads((folder / SPEC_FILE).read_text()))
    tokenizer = prepare_tokenizer(load_tokenizer(str(folder)))
    return ZeroShotClassifier(load_lm(str(folder)), spec, spec.extra["class_tokens"]), tokenizer


class ZeroShotPyfunc(TextClassifierPyfunc):
    """The baseline as an MLflow pyfunc: same input handling and output frame as a trained model
    (``predict`` is inherited); ``predictor`` is a :class:`textclf.serving.inference.Predictor` like theirs."""

    def load_context(self, context) -> None:
        from textclf.serving.inference import Predictor

        model, tokenizer = load_zero_shot(context.artifacts["model_dir"])
        self.predictor = Predictor(model, tokenizer, batch_size=DEFAULT_BATCH_SIZE)


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """What a baseline run scores; the data fields mean what they mean in training (``DataConfig``)."""

    dataset: str | None = "sst2"
    data_path: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    base_model: str = DEFAULT_BASE_MODEL
    max_test_samples: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_length: int = 512
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    run_name: str | None = None
    register: bool = False  # a baseline is a reference, not a candidate champion

    @property
    def data(self) -> DataConfig:
        return DataConfig(
            dataset=None if self.data_path else self.dataset, data_path=self.data_path or None,
            text_column=self.text_column or None, label_column=self.label_column or None,
            max_test_samples=self.max_test_samples, max_length=self.max_length, prompt_template=self.prompt_template,
        )

    def validate(self) -> None:
        """Raises TextclfError naming the first bad parameter."""
        if not self.data_path and self.dataset not in SHIPPED_DATASETS:
            raise TextclfError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(SHIPPED_DATASETS)} "
                               "or pass data_path")
        if self.max_test_samples is not None and self.max_test_samples <= 0:
            raise TextclfError(f"max_test_samples must be a positive integer, got {self.max_test_samples}")
        if self.batch_size <= 0:
            raise TextclfError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.max_length < 16:
            raise TextclfError(f"max_length must be at least 16, got {self.max_length}")
        if "{text}" not in self.prompt_template:
            raise TextclfError("prompt_template must contain the placeholder {text}")


@dataclasses.dataclass
class BaselineResult:
    run_id: str
    test_metrics: dict[str, float]
    validation_metrics: dict[str, float]
    model_uri: str
    registered_version: str | None
    seconds: float


def run_baseline(config: BaselineConfig) -> BaselineResult:
    """Score the test split zero-shot and log it as run ``<dataset>-zero-shot`` of ``textclf-<dataset>``:
    params, ``test/*`` metrics and artifacts as a trained run has them, and the pyfunc model ``model``.
    With ``register``, the validation split is scored too and the model registered with its
    ``validation_*`` tags, so ``promote`` can rank it against trained versions.

    Everything that can be refused (parameters, data, an encoder base model) is checked before the
    run starts. Raises TextclfError."""
    import time

    import mlflow

    from textclf.components.data import load_splits
    from textclf.records import tracking
    from textclf.records.registry import data_tags, register_version, registered_model_name
    from textclf.serving.inference import Predictor
    from textclf.serving.pyfunc import log_model

    config.validate()
    data = config.data
    splits = load_splits(data)
    if splits.test is None:
        raise TextclfError(f"{data.resolved_path()}: no test split to score the baseline on")
    dataset = data.name
    if config.register:
        tracking.check_registrable(dataset, splits.dataset_digest)
    model, tokenizer = build_zero_shot(config.base_model, splits.label_names, config.prompt_template,
                                       config.max_length, dataset)
    predictor = Predictor(model, tokenizer, batch_size=config.batch_size, progress=True)
    tags = {"dataset": dataset, "base_model": config.base_model, "baseline": MODE, "mode": MODE,
            "entry_point": "baseline"}
    run_name = config.run_name or f"{dataset}-{MODE}"
    with tracking.tracked_run(f"textclf-{dataset}", run_name, tags) as run:
        # Named as in a trained run's config (data.*, model.*), so the UI compares them column by column; and
        # not the bare names that `mlflow run` logs its raw -P values under (MLflow refuses a changed value).
        mlflow.log_params({
            "run.mode": MODE, "data.dataset": data.dataset, "data.data_path": data.data_path,
            "data.text_column": data.text_column, "data.label_column": data.label_column,
            "data.max_test_samples": data.max_test_samples, "data.max_length": data.max_length,
            "data.prompt_template": _cap(data.prompt_template), "data.label_names": _cap(json.dumps(splits.label_names)),
            "data.rows.test": len(splits.test), "model.base_model": _cap(config.base_model),
            "baseline.batch_size": config.batch_size, "baseline.scoring": model.spec.extra["scoring"],
            "baseline.answer_prefix": json.dumps(ANSWER_PREFIX),
            "baseline.class_tokens": _cap(json.dumps(dict(zip(splits.label_names, model.class_tokens)))),
        })
        if splits.notes:
            mlflow.log_text("\n".join(splits.notes) + "\n", "data_notes.txt")
        source = str(data.resolved_path())
        tracking.log_dataset(splits.test, source, f"{dataset}-test", "test")
        texts, labels = splits.test["text"].tolist(), splits.test["label"].tolist()
        started = time.perf_counter()
        probabilities = predictor.predict_proba(texts)
        seconds = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            test_metrics = tracking.log_test_results(Path(tmp), texts, labels, probabilities, splits.label_names)
        tracking.log_metrics({"test/runtime_seconds": seconds, "test/samples_per_second": len(texts) / max(seconds, 1e-9)})
        validation_metrics: dict[str, float] = {}
        if config.register:
            mlflow.log_param("data.rows.validation", len(splits.validation))
            scored = predictor.predict_proba(splits.validation["text"].tolist())
            validation_metrics = classification_metrics(splits.validation["label"].tolist(), scored.argmax(axis=1),
                                                        len(splits.label_names))
            tracking.log_metrics({f"eval/{k}": v for k, v in validation_metrics.items()}, step=0)
        with tempfile.TemporaryDirectory() as tmp:
            save_zero_shot(model, tokenizer, Path(tmp) / "model")
            model_uri = log_model(Path(tmp) / "model", splits.label_names, texts, python_model=ZeroShotPyfunc())
        version = None
        if config.register:
            tags = {"mode": MODE, "baseline": MODE, "base_model": config.base_model, "validation_metric": "f1_macro",
                    **data_tags(splits)}
            version = register_version(run.info.run_id, model_uri, registered_model_name(dataset), tags,
                                       validation_metrics, test_metrics)
        run_id = run.info.run_id
    return BaselineResult(run_id, test_metrics, validation_metrics, model_uri, version, seconds)


def _cap(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[: limit - 14] + "...[truncated]"
