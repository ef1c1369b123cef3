"""Seed sweeps: one parent run, one nested child run per seed, and the aggregates across seeds."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from textclf import tracking  # noqa: E402
from textclf.config import DEFAULT_SEEDS, RunConfig, parse_seed  # noqa: E402
from textclf.errors import TextclfError, TrainingInterrupted  # noqa: E402
from textclf.training import run_training  # noqa: E402

log = logging.getLogger(__name__)


def parse_seeds(text: str | None) -> list[int]:
    """"0,42,123" -> [0, 42, 123]; empty -> the default seeds. Raises TextclfError on a bad or repeated seed."""
    if not text:
        return list(DEFAULT_SEEDS)
    seeds = [parse_seed(part.strip()) for part in str(text).split(",") if part.strip()]
    if len(set(seeds)) != len(seeds):
        raise TextclfError(f"seeds repeat: {text}")
    if not seeds:
        raise TextclfError("seeds is empty")
    return seeds


@dataclass
class SweepResult:
    parent_run_id: str
    table: pd.DataFrame  # one row per seed that finished
    failed: dict[int, str] = field(default_factory=dict)
    aggregates: dict[str, float] = field(default_factory=dict)


def aggregate(table: pd.DataFrame) -> dict[str, float]:
    """mean, std (sample std, ddof=1; 0 for a single seed), min and max of every metric column."""
    out: dict[str, float] = {}
    for column in table.columns:
        if column in ("seed", "run_id"):
            continue
        values = table[column].astype(float).to_numpy()
        name = column.replace("/", "_")
        out[f"{name}_mean"] = float(values.mean())
        out[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[f"{name}_min"] = float(values.min())
        out[f"{name}_max"] = float(values.max())
    return out


def run_sweep(base: RunConfig, seeds: list[int]) -> SweepResult:
    """Train ``base`` once per seed as nested runs of one parent run, then aggregate.

    A seed that fails ends its child FAILED; the others still run and are aggregated. Raises
    TextclfError when every seed failed; an interrupt stops the whole sweep (runs end KILLED).
    """
    name = f"{base.dataset_name}-{base.mode}-sweep"
    tags = {"dataset": base.dataset_name, "mode": base.mode, "seeds": ",".join(map(str, seeds)),
            "base_model": base.model.base_model, "sweep": "parent"}
    with tracking.tracked_run(base.experiment_name, name, tags) as parent:
        tracking.log_config(base)
        mlflow.log_param("sweep.seeds", ",".join(map(str, seeds)))
        rows, failed = [], {}
        for seed in seeds:
            config = dataclasses.replace(base, seed=seed, run_name=None)
            try:
                result = run_training(config, nested=True, extra_tags={"sweep_parent": parent.info.run_id})
            except (TrainingInterrupted, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - one seed's failure must not stop the others
                failed[seed] = f"{type(exc).__name__}: {exc}"
                log.error("seed %s failed: %s", seed, failed[seed])
                continue
            rows.append({"seed": seed, "run_id": result.run_id,
                         **{f"best/{k}": v for k, v in result.best_metrics.items() if k != "step"},
                         **{f"test/{k}": v for k, v in result.test_metrics.items()}})
        if failed:
            mlflow.set_tag("failed_seeds", ",".join(map(str, failed)))
            mlflow.log_dict({str(k): v for k, v in failed.items()}, "sweep/failed_seeds.json")
        if not rows:
            raise TextclfError(f"every seed failed: {failed}")
        table = pd.DataFrame(rows)
        aggregates = aggregate(table)
        tracking.log_metrics({f"sweep/{k}": v for k, v in aggregates.items()})
        mlflow.log_table(table, "sweep/seeds.json")
        _log_validation_curves([row["run_id"] for row in rows], [row["seed"] for row in rows], base.training.metric_for_best)
        return SweepResult(parent.info.run_id, table, failed, aggregates)


def _log_validation_curves(run_ids: list[str], seeds: list[int], metric: str) -> None:
    client = mlflow.MlflowClient()
    fig, ax = plt.subplots(figsize=(6, 4))
    for run_id, seed in zip(run_ids, seeds):
        history = sorted(client.get_metric_history(run_id, f"eval/{metric}"), key=lambda m: m.step)
        ax.plot([m.step for m in history], [m.value for m in history], marker="o", label=f"seed {seed}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {metric}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "validation_curves.png"
        fig.savefig(path, dpi=100)
        mlflow.log_artifact(str(path), artifact_path="sweep")
    plt.close(fig)
