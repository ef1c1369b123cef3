"""Checkpoint folders: completion markers, finding the latest complete one, and resume decisions.

The Trainer writes ``checkpoint-N`` in place; a crash can leave one half-written. We write a
``textclf.json`` (so the checkpoint can be evaluated alone) and then a ``COMPLETE`` marker, last.
A checkpoint without the marker is never resumed from; it is renamed aside, not deleted.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from textclf.errors import TextclfError

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def finalize(folder: Path, spec, tokenizer) -> None:
    """Make a Trainer checkpoint self-describing, then mark it complete."""
    spec.save(folder)
    tokenizer.save_pretrained(str(folder))
    (folder / MARKER).write_text("ok\n")


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).exists()


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders, by step."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def latest_complete(output_dir: Path) -> Path | None:
    complete = [p for p in checkpoint_folders(output_dir) if is_complete(p)]
    return complete[-1] if complete else None


def prepare_output_dir(output_dir: Path, resume: bool) -> Path | None:
    """Check the output folder can be written and return the checkpoint to resume from, if any.

    Incomplete checkpoints are renamed ``incomplete-checkpoint-N`` so nothing (the Trainer's
    rotation included) mistakes them for good ones. Raises TextclfError when the folder cannot be
    written, or holds checkpoints and ``resume`` is off (nothing already written is overwritten).
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TextclfError(f"{output_dir}: output folder cannot be written ({exc.strerror or exc})") from None
    main_process = os.environ.get("RANK", "0") == "0"  # with DeepSpeed, every rank calls this
    for folder in checkpoint_folders(output_dir) if main_process else []:
        if not is_complete(folder):
            aside = folder.with_name(f"incomplete-{folder.name}")
            log.warning("%s is incomplete (no %s marker): moved to %s, not resumed from", folder, MARKER, aside)
            folder.rename(aside)
    latest = latest_complete(output_dir)
    if latest and not resume:
        raise TextclfError(
            f"{output_dir}: already holds checkpoints ({latest.name}); pass resume=true to continue, "
            "or choose another output_dir or run_name"
        )
    if latest:
        log.info("resuming from %s", latest)
    return latest
