"""Seed sweeps: one parent run, one nested child run per seed, and the aggregates across seeds."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from textclf.components import checkpoints  # noqa: E402
from textclf.config import DEFAULT_SEEDS, RunConfig, parse_seed  # noqa: E402
from textclf.errors import TextclfError  # noqa: E402
from textclf.recipes.training import run_training  # noqa: E402
from textclf.records import tracking  # noqa: E402

log = logging.getLogger(__name__)
SWEEP_RECORD = "finished_sweep.json"


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
    already_finished: bool = False  # recognised from an earlier sweep: nothing was trained now


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
    name = base.run_name or f"{base.dataset_name}-{base.mode}-sweep"
    # Each seed trains in <output_dir>/<sweep name>/<child run name>: never in the folder a plain `train` of
    # the same seed uses, so neither overwrites the other's model and test report.
    children_dir = str(Path(base.output_dir) / name)
    sweep_recipe = checkpoints.recipe(base, seeds=",".join(map(str, seeds)))
    record_path = Path(children_dir) / SWEEP_RECORD
    if record_path.exists():
        record = json.loads(record_path.read_text())
        changed = checkpoints.differences(record["recipe"], sweep_recipe)
        if changed:
            raise TextclfError(f"{children_dir}: holds sweep {record['parent_run_id']} made with other parameters "
                               f"({'; '.join(changed)}); choose another run_name or output_dir")
        log.info("%s: sweep already finished as parent run %s; nothing to train", children_dir, record["parent_run_id"])
        tracking.discard_attached_run(f"{children_dir} had already finished as sweep {record['parent_run_id']}")
        return SweepResult(record["parent_run_id"], pd.DataFrame(record["table"]), {}, record["aggregates"],
                           already_finished=True)
    tags = {"dataset": base.dataset_name, "mode": base.mode, "seeds": ",".join(map(str, seeds)),
            "base_model": base.model.base_model, "sweep": "parent", "output_dir": str(Path(children_dir).resolve())}
    tracking.end_dead_runs(tags["output_dir"])  # a parent whose process was killed with kill -9
    with tracking.tracked_run(base.experiment_name, name, tags) as parent:
        tracking.log_config(base)
        mlflow.log_param("sweep.seeds", ",".join(map(str, seeds)))
        rows, failed = [], {}
        for seed in seeds:
            config = dataclasses.replace(base, seed=seed, run_name=None, output_dir=children_dir)
            try:
                result = run_training(config, nested=True, extra_tags={"sweep_parent": parent.info.run_id})
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
    if not failed:  # a sweep with a failed seed is not finished: a rerun trains that seed
        checkpoints.write_json(record_path, {"recipe": sweep_recipe, "parent_run_id": parent.info.run_id,
                                             "table": table.to_dict(orient="records"), "aggregates": aggregates})
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
