"""`train_deepspeed` entry point: the `train` recipe on several processes with DeepSpeed ZeRO-3."""

from __future__ import annotations

import os
import time

import click

from entrypoints.common import COMMAND_SETTINGS, debug_option, setup_logging, training_options, user_errors
from textclf.process.allocator import restart_under_jemalloc


@click.command(name="train_deepspeed", context_settings=COMMAND_SETTINGS)
@click.option("--num_procs", type=float, default=2, help="processes on this machine (one per GPU; on CPU, 1 or 2 with gloo)")
@click.option("--num_nodes", type=float, default=1, help="machines taking part; start this command on each of them")
@click.option("--node_rank", type=float, default=0, help="this machine's rank, 0 to num_nodes-1 (0 talks to MLflow)")
@click.option("--master_addr", default="127.0.0.1", help="address of the node_rank 0 machine, reachable from all")
@click.option("--master_port", type=float, default=0, help="a free port on the node_rank 0 machine (0: pick one; "
              "required with num_nodes > 1)")
@click.option("--offload", default="none", help="none or cpu: offload optimizer state and parameters to CPU")
@click.option("--deepspeed_config", default="", help="a DeepSpeed JSON file that replaces the built config")
@click.option("--worker", is_flag=True, hidden=True, help="set by the launcher in each process")
@training_options
@debug_option
def train_deepspeed(num_procs: float, num_nodes: float, node_rank: float, master_addr: str, master_port: float,
                    offload: str, deepspeed_config: str, worker: bool, debug: bool, **params) -> None:
    """Launch NUM_PROCS processes on each of NUM_NODES machines that train with ZeRO-3; global rank 0 logs one
    MLflow run and the consolidated model."""
    setup_logging()
    # MLproject passes numbers as floats
    num_procs, num_nodes, node_rank, master_port = int(num_procs), int(num_nodes), int(node_rank), int(master_port)
    with user_errors(debug):
        from entrypoints.train import report
        from textclf.components import checkpoints
        from textclf.components.data import load_splits
        from textclf.components.trainer import resolve_precision
        from textclf.config import build_config
        from textclf.distributed.zero3 import Nodes, build_deepspeed_config, launch
        from textclf.errors import TextclfError, TrainingInterrupted
        from textclf.recipes.training import already_finished, run_training
        from textclf.records import tracking

        mode = params.pop("mode") or "lora"
        config = build_config(mode=mode, **params)
        deepspeed = build_deepspeed_config(resolve_precision(config.training.precision), offload, deepspeed_config or None)
        if worker:
            run_training(config, deepspeed=deepspeed,
                         extra_tags={"deepspeed": "zero3", "world_size": os.environ.get("WORLD_SIZE", "1"),
                                     "offload": offload})
            return
        # Refuse bad data, and a folder of another recipe, once, before any process starts; and recognise a
        # finished run without starting any.
        nodes = Nodes(num_nodes, node_rank, master_addr, master_port)
        splits = load_splits(config.data)
        run_recipe = checkpoints.recipe_of(config, splits, resolve_precision(config.training.precision), deepspeed,
                               num_procs * num_nodes)
        plan = checkpoints.plan_output_dir(config.run_output_dir, config.resume, run_recipe, main_process=nodes.is_main)
        if plan.finished is not None:
            result = already_finished(plan.finished, config.run_output_dir)
            if nodes.is_main:
                tracking.discard_attached_run(f"{config.run_output_dir} had already finished as run {result.run_id}")
            report(result)
            return
        started_ms = int(time.time() * 1000)
        forwarded = [f"--{name}={value}" for name, value in {**params, "mode": mode}.items() if value is not None]
        forwarded += [f"--offload={offload}", f"--deepspeed_config={deepspeed_config}"] + (["--debug"] if debug else [])
        try:
            code = launch(num_procs, forwarded, nodes)
        except TrainingInterrupted:
            if nodes.is_main:
                # Rank 0 ends the run KILLED; if torchrun had to SIGKILL it first, the run is ended here.
                tracking.end_dead_runs(str(config.run_output_dir.resolve()), since_ms=started_ms,
                                       reason="was interrupted and stopped before it could end its run")
                if tracking.attached_run_id():
                    # `mlflow run` would mark it FAILED: rank 0 is not its child.
                    from textclf.records.project_run import finish_after_mlflow_run

                    finish_after_mlflow_run(tracking.attached_run_id(), status="KILLED")
            raise
        if not nodes.is_main:  # only the node of global rank 0 talks to MLflow; `mlflow run` made a run here too
            tracking.discard_attached_run(f"node {node_rank}: the run of node 0 holds this training")
            if code != 0:
                raise TextclfError(f"DeepSpeed training failed on node {node_rank} (exit code {code})")
            click.echo(f"DeepSpeed training finished on node {node_rank}; node 0 logged the run")
            return
        if code != 0:
            failed = tracking.end_dead_runs(
                str(config.run_output_dir.resolve()), status="FAILED", ended=("KILLED",), since_ms=started_ms,
                reason=f"stopped: a DeepSpeed process failed (launcher exit code {code})")
            raise TextclfError(f"DeepSpeed training failed on at least one of {num_procs} processes (exit code {code})"
                               + (f"; run {', '.join(failed)} marked FAILED" if failed else ""))
        click.echo(f"DeepSpeed training finished on {num_procs} processes" + (f" x {num_nodes} nodes" if num_nodes > 1 else ""))


if __name__ == "__main__":
    restart_under_jemalloc()
    train_deepspeed()
