"""What a user can point ``evaluate`` and ``predict`` at, detected and loaded into a classifier.

- ``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/model``: an MLflow pyfunc model
- a folder written by ``save_classifier`` (``textclf.json`` + ``backbone/``)
- a Trainer checkpoint (``checkpoint-N`` with ``model.safetensors`` + ``textclf.json``)
- a DeepSpeed checkpoint (a ``global_stepN`` folder, or its parent holding ``latest``), consolidated here
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from textclf.components.model import BACKBONE_DIR, SPEC_FILE, TextClassifier, load_classifier, rebuild_from_state
from textclf.errors import TextclfError


@dataclass
class LoadedModel:
    model: TextClassifier
    tokenizer: object
    kind: str  # how it was found, said to the user


def load_model_source(reference: str) -> LoadedModel:
    """Detect what ``reference`` is and load it onto the device a loaded model predicts on (the GPU when there is
    one, as the pyfunc model does: textclf.serving.pyfunc.serving_device). Raises TextclfError when it is none of the
    known kinds."""
    loaded = _load(reference)
    from textclf.serving.pyfunc import serving_device

    loaded.model.to(serving_device())
    return loaded


def _load(reference: str) -> LoadedModel:
    if reference.startswith(("models:/", "runs:/")):
        import mlflow

        try:
            pyfunc = mlflow.pyfunc.load_model(reference)
        except mlflow.exceptions.MlflowException as exc:
            raise TextclfError(f"{reference}: cannot load MLflow model ({str(exc).splitlines()[0]})") from None
        predictor = pyfunc.unwrap_python_model().predictor
        return LoadedModel(predictor.model, predictor.encoder.tokenizer, "MLflow pyfunc model")
    path = Path(reference)
    if not path.exists():
        raise TextclfError(f"{reference}: no such model folder or MLflow model URI")
    if (path / SPEC_FILE).exists() and (path / BACKBONE_DIR).is_dir():
        model, tokenizer = load_classifier(path)
        return LoadedModel(model, tokenizer, "textclf model folder")
    if (path / SPEC_FILE).exists() and (path / "model.safetensors").exists():
        model, tokenizer = rebuild_from_state(path, path / "model.safetensors")
        return LoadedModel(model, tokenizer, "Trainer checkpoint")
    deepspeed_dir = path if (path / "latest").exists() else (path.parent if path.name.startswith("global_step") else None)
    if deepspeed_dir is not None and (deepspeed_dir / SPEC_FILE).exists():
        return _load_deepspeed_checkpoint(deepspeed_dir, path.name if path is not deepspeed_dir else None)
    raise TextclfError(
        f"{reference}: not a textclf model (expected a models:/ or runs:/ URI, a saved model folder with "
        f"{SPEC_FILE} and {BACKBONE_DIR}/, or a checkpoint folder with {SPEC_FILE} and model.safetensors)"
    )


def _load_deepspeed_checkpoint(folder: Path, tag: str | None) -> LoadedModel:
    """Consolidate ZeRO shards to fp32 with DeepSpeed's own tool, then load them into the model."""
    import tempfile

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    with tempfile.TemporaryDirectory() as tmp:
        state_file = Path(tmp) / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(state_file))
        model, tokenizer = rebuild_from_state(folder, state_file)
    return LoadedModel(model, tokenizer, f"DeepSpeed checkpoint ({tag or 'latest'}), consolidated to fp32")
