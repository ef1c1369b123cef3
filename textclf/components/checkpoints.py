"""Output folders: checkpoint completion markers, what each checkpoint was trained with, and the
decision a start makes for a folder (start fresh, resume a checkpoint, or recognise a finished run).

The Trainer writes ``checkpoint-N`` in place; a crash can leave one half-written. We write a
``textclf.json`` (so the checkpoint can be evaluated alone) and the run's whole configuration
(``training_config.json``), as a saved model folder has them, the run's recipe (``run_config.json``: the parameters
that must match to resume), and then a ``COMPLETE`` marker, last. A checkpoint without the marker is never
resumed from; it is renamed aside, not deleted. A checkpoint resumes only into the recipe that wrote it,
and a folder whose run finished (``finished_run.json``) is never trained again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textclf.config import MODES, PARAM_VALUE_LIMIT, TRUNCATED, RunConfig, build_config, flatten
from textclf.distributed.ranks import is_main_process
from textclf.errors import TextclfError

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
RECIPE_FILE = "run_config.json"
FINISHED_FILE = "finished_run.json"
FORMAT_VERSION = 1  # of run_config.json and finished_run.json (textclf.json has its own: model.FORMAT_VERSION)
WEIGHTS_FILE = "model.safetensors"  # what the Trainer names a checkpoint's weights
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Parameters that name or steer the run without changing what a training step computes: a checkpoint
# written under one value resumes under another (a new time budget, a new register choice, ...).
NOT_PART_OF_RECIPE = {"run.output_dir", "run.run_name", "run.register", "run.resume", "training.max_train_minutes",
                      "training.eval_batch_size"}


def recipe(config: RunConfig, **extra: Any) -> dict[str, str]:
    """What determines a run's training: its flattened config (less NOT_PART_OF_RECIPE) and ``extra``
    (engine, world size, data digests), every value as a string so that a JSON round trip compares equal.
    Values are whole, not cut to MLflow's param limit: two prompts that differ past it are two recipes."""
    out = {k: v for k, v in flatten(config, max_length=None).items() if k not in NOT_PART_OF_RECIPE}
    out.update({k: str(v) for k, v in extra.items()})
    return out


def recipe_of(config: RunConfig, splits, precision: str, deepspeed: dict | None,
              world_size: int | None = None) -> dict[str, str]:
    """What determines the training in this folder: parameters, engine, precision and the data's content
    (``splits``: the run's textclf.components.data.LabeledSplits). ``world_size`` defaults to this process's (the launcher,
    before its processes exist, passes it)."""
    engine = {"engine": "trainer", "world_size": 1}
    if deepspeed is not None:
        engine = {"engine": "deepspeed", "world_size": world_size or os.environ.get("WORLD_SIZE", "1"),
                  "deepspeed_config": json.dumps(deepspeed, sort_keys=True)}
    # A content hash per split: a checkpoint never resumes onto other rows under the same parameters.
    digests = {f"data.digest.{name}": digest for name, digest in splits.digests().items()}
    return recipe(config, resolved_precision=precision, **engine, **digests)


# Parameters renamed since a recipe may have been written (old name -> new name): compared under the new name.
RENAMED = {"model.calibration_samples": "model.standardization_samples"}


def differences(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """``name: recorded -> current`` for every parameter that differs, sorted.

    A parameter the recorded recipe lacks (added to textclf after it was written) is unchanged while it is at
    its default: the code that wrote the recipe behaved as that default does."""
    recorded = {RENAMED.get(k, k): v for k, v in recorded.items()}
    defaults = _parameter_defaults(current.get("run.mode"))
    keys = sorted(set(recorded) | set(current))
    return [f"{k}: {_short(recorded.get(k, '(unset)'))} -> {_short(current.get(k, '(unset)'))}"
            for k in keys if not _same(recorded.get(k, defaults.get(k)), current.get(k))]


def _same(recorded: str | None, current: str | None) -> bool:
    """Whether a recorded value is the current one. Recipes written before textclf compared whole values hold
    long values cut as MLflow params are (``...[truncated]``): those match on what was kept, as they always did."""
    if recorded is not None and current is not None and recorded.endswith(TRUNCATED) and len(recorded) == PARAM_VALUE_LIMIT:
        return current.startswith(recorded[: -len(TRUNCATED)])
    return recorded == current


@functools.lru_cache(maxsize=None)
def _parameter_defaults(mode: str | None) -> dict[str, str]:
    """Every run parameter at its default for ``mode`` (its preset), as a recipe records it."""
    return flatten(build_config(mode), max_length=None) if mode in MODES else {}


def _short(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def finalize(folder: Path, spec, run_recipe: dict[str, str], run_config: dict[str, Any] | None = None) -> None:
    """Make a Trainer checkpoint self-describing (model spec, the run's configuration, recipe), then mark it
    complete. The tokenizer is already there: the Trainer saves its collator's tokenizer with the weights."""
    spec.save(folder, run_config)
    write_json(folder / RECIPE_FILE, {"format_version": FORMAT_VERSION, "recipe": run_recipe})
    (folder / MARKER).write_text("ok\n")


def write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and rename: a reader never sees half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(partial, path)


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).exists()


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders, by step."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def step_of(checkpoint: Path) -> int:
    """The training step a ``checkpoint-N`` folder holds."""
    return int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))


def latest_complete(output_dir: Path) -> Path | None:
    complete = [p for p in checkpoint_folders(output_dir) if is_complete(p)]
    return complete[-1] if complete else None


def checkpoint_recipe(folder: Path) -> dict[str, str] | None:
    path = folder / RECIPE_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())["recipe"]


def is_last_step(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is the last step of its schedule (the process died after it, before finishing)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"] >= state["max_steps"]


def finished_run(output_dir: Path) -> dict[str, Any] | None:
    """The record of the run that finished in this folder, or None."""
    path = output_dir / FINISHED_FILE
    return json.loads(path.read_text()) if path.exists() else None


def record_finished(output_dir: Path, run_recipe: dict[str, str], **details: Any) -> None:
    """Mark the folder's run finished (run id, model URI, version, metrics), so a rerun trains nothing."""
    write_json(output_dir / FINISHED_FILE, {"format_version": FORMAT_VERSION, "recipe": run_recipe, **details})


# What a checkpoint holds only so that training can continue from it. ZeRO-3's ``global_step*/`` shards
# are not among them: their ``*_optim_states.pt`` also hold the only fp32 copy of the weights, which
# evaluating a ``global_stepN`` folder consolidates (textclf.serving.sources).
RESUME_ONLY_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")


def drop_resume_state(output_dir: Path) -> None:
    """Delete the optimizer, scheduler, scaler and RNG state of a finished run's checkpoints.

    A finished folder is never trained again (``plan_output_dir`` recognises ``finished_run.json``), so this
    state only takes room: under LoRA the Adam moments are twice the adapters' size. The weights, the
    spec and the trainer state stay, so that each checkpoint can still be evaluated. Call after
    ``record_finished``: a run that dies before it keeps everything it needs to resume.
    """
    freed = 0
    for folder in checkpoint_folders(output_dir):
        for pattern in RESUME_ONLY_FILES:
            for path in folder.glob(pattern):
                freed += path.stat().st_size
                path.unlink()
    log.info("%s: removed the finished run's optimizer and scheduler state from its checkpoints (%.1f MB freed)",
             output_dir, freed / 1e6)


def has_resume_state(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` still holds what resuming needs: the scheduler (the Trainer writes ``scheduler.pt``
    under both engines; :func:`drop_resume_state` deletes it) and the optimizer (the Trainer's ``optimizer.pt``,
    or DeepSpeed's ``global_step*`` folder, which is kept)."""
    optimizer = (checkpoint / "optimizer.pt").exists() or any(checkpoint.glob("global_step*"))
    return optimizer and (checkpoint / "scheduler.pt").exists()


@dataclass
class FolderPlan:
    resume_from: Path | None = None  # the checkpoint to continue from
    finished: dict[str, Any] | None = None  # the finished run's record: nothing to train


def ensure_writable(output_dir: Path) -> None:
    """Raises TextclfError when the folder cannot be created or written. Each process probes with its own
    file: under DeepSpeed every rank calls this at once, and a shared probe name races."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TextclfError(f"{output_dir}: output folder cannot be written ({exc.strerror or exc})") from None


def plan_output_dir(output_dir: Path, resume: bool, run_recipe: dict[str, str],
                    main_process: bool | None = None) -> FolderPlan:
    """Decide what a start does with its output folder.

    - a finished run made with the same recipe: nothing to train (``finished``);
    - a complete checkpoint made with the same recipe and ``resume``: continue from it;
    - no checkpoint: start fresh.
    Incomplete checkpoints are renamed ``incomplete-checkpoint-N`` (only by the main process).
    Raises TextclfError, naming the differing parameters, when the folder holds a run or checkpoint of
    another recipe; and when it holds checkpoints or a finished run and ``resume`` is off (nothing
    already written is overwritten).
    """
    ensure_writable(output_dir)
    finished = finished_run(output_dir)
    if finished is not None:
        changed = differences(finished["recipe"], run_recipe)
        if changed:
            raise TextclfError(
                f"{output_dir}: holds finished run {finished.get('run_id')} made with other parameters "
                f"({'; '.join(changed)}); choose another run_name or output_dir"
            )
        if not resume:
            raise TextclfError(f"{output_dir}: holds finished run {finished.get('run_id')}; pass resume=true to "
                               "recognise it, or choose another run_name or output_dir")
        return FolderPlan(finished=finished)
    if main_process is None:
        main_process = is_main_process()  # with DeepSpeed, every rank calls this
    for folder in checkpoint_folders(output_dir) if main_process else []:
        if not is_complete(folder):
            aside = folder.with_name(f"incomplete-{folder.name}")
            if aside.exists():  # the same step failed to save before
                aside = folder.with_name(f"incomplete-{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("%s is incomplete (no %s marker): moved to %s, not resumed from", folder, MARKER, aside)
            folder.rename(aside)
    latest = latest_complete(output_dir)
    if latest is None:
        return FolderPlan()
    if not resume:
        raise TextclfError(
            f"{output_dir}: already holds checkpoints ({latest.name}); pass resume=true to continue, "
            "or choose another output_dir or run_name"
        )
    recorded = checkpoint_recipe(latest)
    if recorded is None:
        raise TextclfError(f"{latest}: records no training parameters ({RECIPE_FILE} is missing), so it cannot be "
                           "resumed safely; choose another run_name or output_dir")
    changed = differences(recorded, run_recipe)
    if changed:
        raise TextclfError(f"{latest}: was written with other parameters ({'; '.join(changed)}); rerun with the "
                           "same parameters to resume it, or choose another run_name or output_dir")
    if not is_last_step(latest) and not has_resume_state(latest):
        # The Trainer would silently start a fresh optimizer and warm-up: not the training that was recorded.
        raise TextclfError(f"{latest}: its optimizer and scheduler state were removed when its run finished (the "
                           f"folder's {FINISHED_FILE} is gone), so it cannot continue as it would have; choose "
                           "another run_name or output_dir")
    log.info("resuming from %s", latest)
    return FolderPlan(resume_from=latest)
