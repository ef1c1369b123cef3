"""`search`: an Optuna study whose trials are nested textclf runs. Real Optuna, a real MLflow store, the tiny
Llama; the worker tests start real processes (and a real PostgreSQL for the several-machines case)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from conftest import REPO
from entrypoints.search import search
from test_mlproject import mlflow_env
from textclf.distributed.zero3 import free_port

TINY = ["--logging_steps", "1", "--batch_size", "8", "--eval_batch_size", "16", "--max_length", "128",
        "--precision", "fp32", "--mode", "lora", "--eval_steps", "2", "--save_steps", "2", "--max_steps", "4",
        "--standardization_samples", "16"]
SPACE = "learning_rate=log(1e-3,1e-2);lora_r=choice(4,8)"


def tiny_args(dataset: Path, model: str, *extra: str) -> list[str]:
    return ["--data_path", str(dataset), "--base_model", model, *TINY, *extra]


def journal(tmp_path: Path, study: str) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(tmp_path / "outputs" / study / "optuna.journal")))
    return optuna.load_study(study_name=study, storage=storage)


def runs_by_role() -> tuple[list, list]:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = [r for r in runs if r.data.tags.get("search") == "parent"]
    trials = [r for r in runs if "trial" in r.data.tags]
    return parents, trials


def search_env(tmp_path: Path) -> dict[str, str]:
    env = mlflow_env(mlflow.get_tracking_uri())
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    return env


def start_search(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "entrypoints.search", *args], cwd=tmp_path,
                            env=env or search_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_refused_space_starts_nothing(mlflow_store, tmp_path, monkeypatch):
    """Unknown, unsearchable or out-of-range parameters: one line, exit 2, before any study or run exists; the
    run `mlflow run` created ends FAILED with the reason."""
    client = MlflowClient()
    attached = client.create_run(client.create_experiment("textclf-sst2")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", attached)
    cases = {"learning_rate=log(1e-5,1e-3);dropout_rate=uniform(0,0.5)": "unknown parameter 'dropout_rate'",
             "warmup_ratio=uniform(0,1.5)": "warmup_ratio must be in [0, 1), got 1.5",
             "lora_r=choice(0,8)": "lora_r must be a positive integer, got 0",
             "mode=choice(full,big)": "invalid mode 'big'",
             "save_steps=choice(150,300)": "save_steps (150) must be a multiple of eval_steps (100)",
             "metric_for_best=choice(loss,accuracy)": "metric_for_best cannot be searched"}
    for space, reason in cases.items():
        result = CliRunner().invoke(search, ["--space", space, "--n_trials", "2"])
        assert result.exit_code == 2, (space, result.output)
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and reason in lines[0], (space, result.output)
        assert "Traceback" not in result.output
    grid = CliRunner().invoke(search, ["--space", SPACE, "--sampler", "grid"])
    assert grid.exit_code == 2 and "learning_rate=log(0.001,0.01) is continuous" in grid.output
    both = CliRunner().invoke(search, ["--space", SPACE, "--learning_rate", "1e-4"])
    assert both.exit_code == 2 and "learning_rate is both set (0.0001) and searched" in both.output
    assert not (tmp_path / "outputs").exists()
    run = client.get_run(attached)
    assert run.info.status == "FAILED" and "unknown parameter 'dropout_rate'" in run.data.tags["error"]
    assert [r.info.run_id for r in mlflow.search_runs(search_all_experiments=True, output_format="list")] == [attached]


def test_space_files_and_defaults_are_checked_like_inline_text(tmp_path):
    from textclf.errors import TextclfError
    from textclf.recipes.search_space import DEFAULT_SPACES, parse_space

    path = tmp_path / "space.yaml"
    path.write_text("learning_rate: log(1e-5, 1e-3)\nlora_r: [8, 16, 64]\nwarmup_ratio: {low: 0, high: 0.2}\n"
                    "gradient_checkpointing: [true, false]\n")
    space = parse_space(str(path), "lora")
    assert str(space) == ("learning_rate=log(1e-05,0.001); lora_r=choice(8,16,64); warmup_ratio=uniform(0,0.2); "
                          "gradient_checkpointing=choice(true,false)")
    assert str(parse_space(str(space), "lora")) == str(space)  # the canonical form reads back the same
    for mode in DEFAULT_SPACES:
        assert parse_space("", mode).names
    path.write_text("lora_r: {low: 8, high: 4}\n")
    with pytest.raises(TextclfError, match=r"lora_r: low \(8\) must be below high \(4\)"):
        parse_space(str(path), "lora")


def test_a_retry_takes_its_trials_place_and_a_trial_past_n_trials_is_surplus():
    """The counting behind n_trials, on a real in-memory study: a failed-and-retried trial holds one place (its
    retry's), and of two trials started at once for the last place, the lower number runs."""
    from textclf.recipes.search_study import SURPLUS, is_surplus, retry, tally

    study = optuna.create_study()
    study.enqueue_trial({"x": 1.0})
    first = study.ask({"x": optuna.distributions.FloatDistribution(0, 2)})
    study.tell(first, 1.0)
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 2)})
    study.tell(dead, state=optuna.trial.TrialState.FAIL)  # as recover_dead_trials does
    retry(study, study.trials[dead.number])
    assert (tally(study).counted, tally(study).waiting) == (1, 1)
    again = study.ask()  # takes the waiting retry first
    assert study.trials[again.number].system_attrs["retry_history"] == [dead.number]
    racing = study.ask()  # another worker, at the same moment, for what it saw as the last place
    assert not is_surplus(study, again.number, n_trials=2)  # the retry holds trial 1's place
    assert is_surplus(study, racing.number, n_trials=2)
    racing.set_user_attr(SURPLUS, True)
    study.tell(racing, state=optuna.trial.TrialState.FAIL)
    study.tell(again, 0.5)
    counts = tally(study)
    assert (counts.counted, counts.complete, counts.failed, counts.running) == (2, 2, 0, 0)


def test_a_trial_evaluated_n_times_reports_its_kth_evaluation_as_step_k():
    from transformers import TrainerControl, TrainerState

    from textclf.recipes.search_study import PruningCallback

    # Trials fitted to the same minutes with `evaluations` evaluate at steps of their own: the pruner compares them
    # by evaluation instead (the Trainer logs each evaluation before calling back).
    study = optuna.create_study(direction="maximize")
    for by_evaluation, steps in ((True, {1: 0.6, 2: 0.7}), (False, {137: 0.6, 301: 0.7})):
        trial, state = study.ask(), TrainerState()
        callback = PruningCallback(trial, "f1_macro", by_evaluation=by_evaluation)
        for step, value in ((137, 0.6), (301, 0.7)):
            state.global_step = step
            state.log_history += [{"loss": 0.1, "step": step}, {"eval_f1_macro": value, "step": step}]
            callback.on_evaluate(None, state, TrainerControl(), metrics={"eval_f1_macro": value})
        assert study.trials[-1].intermediate_values == steps


@pytest.mark.slow
def test_seeds_score_a_configuration_by_their_mean(mlflow_store, tmp_path, tiny_dataset, tiny_llama):
    result = CliRunner().invoke(search, tiny_args(tiny_dataset, tiny_llama, "--space", "lora_r=choice(4,8)",
                                                  "--n_trials", "1", "--seeds", "0,1", "--learning_rate", "3e-3"),
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    trial = journal(tmp_path, "tinysent-lora-search").trials[0]
    _, runs = runs_by_role()
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1"] and {r.data.tags["trial"] for r in runs} == {"0"}
    scores = {r.info.run_id: r.data.metrics["best/f1_macro"] for r in runs}
    assert trial.value == pytest.approx(sum(scores.values()) / 2)
    (version,) = MlflowClient().search_model_versions("name = 'textclf-tinysent'")
    assert scores[version.run_id] == max(scores.values())


@pytest.mark.slow
def test_pruning_stops_a_worse_trial_that_still_logs_a_complete_run(mlflow_store, tmp_path, tiny_dataset, tiny_llama,
                                                                     monkeypatch):
    """Scripted validation scores make it deterministic: the first trial scores 0.9 at each evaluation, the
    second 0.1, below the median of the finished ones at its first evaluation: the median pruner stops it at
    step 2 of 4. Its run still ends FINISHED with its curve up to there, test report and model, tagged pruned;
    the best (first) trial's model is the one registered."""
    import textclf.recipes.training as training

    real, scores = training.make_compute_metrics, iter([0.9, 0.1])

    def scripted(*args, **kwargs):
        compute, score = real(*args, **kwargs), next(scores)

        def metrics(prediction):
            return {**compute(prediction), "f1_macro": score}
        return metrics

    monkeypatch.setattr(training, "make_compute_metrics", scripted)
    result = CliRunner().invoke(search, tiny_args(tiny_dataset, tiny_llama, "--space", SPACE, "--n_trials", "2",
                                                  "--pruner", "median", "--pruner_startup_trials", "1"),
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = journal(tmp_path, "tinysent-lora-search")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    assert study.trials[1].intermediate_values == {2: 0.1}
    parents, trials = runs_by_role()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_trial = {r.data.tags["trial"]: r for r in trials}
    client = MlflowClient()
    for number, state, steps in (("0", "complete", [2, 4]), ("1", "pruned", [2])):
        run = by_trial[number]
        assert run.info.status == "FINISHED" and run.data.tags["trial_state"] == state
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/f1_macro")] == steps
        assert "test/accuracy" in run.data.metrics and "test" in {a.path for a in client.list_artifacts(run.info.run_id)}
    pruned_model = mlflow.pyfunc.load_model(study.trials[1].user_attrs["textclf.runs"][0]["model_uri"])
    assert len(pruned_model.predict(["a gem of a film"])) == 1
    parent = parents[0]
    assert parent.data.tags["best_trial"] == "0" and parent.data.metrics["search/best_f1_macro"] == 0.9
    assert parent.data.metrics["search/trials_pruned"] == 1
    assert {"search/trials.json", "search/optimization_history.png", "search/objective_by_param.png",
            "search/best_trial.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    versions = client.search_model_versions("name = 'textclf-tinysent'")
    assert [(v.tags["study"], v.tags["trial"], v.run_id) for v in versions] == [
        ("tinysent-lora-search", "0", by_trial["0"].info.run_id)]
    assert "pruned" in result.output.split("trials:")[1].splitlines()[0]


@pytest.mark.slow
def test_grid_runs_every_combination_and_a_rerun_continues_then_recognises_the_finished_study(
        mlflow_store, tmp_path, tiny_dataset, tiny_llama):
    """mode x seed as a grid (the original project's grid in one command): two trials, then the same command with
    more n_trials continues the study to its four combinations under the same parent run; once more, it is
    recognised as finished and nothing runs."""
    def run(n_trials: str):
        args = tiny_args(tiny_dataset, tiny_llama, "--sampler", "grid", "--space", "mode=choice(full,lora);seed=choice(0,1)",
                         "--n_trials", n_trials, "--learning_rate", "1e-3")
        result = CliRunner().invoke(search, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    run("2")
    parents, trials = runs_by_role()
    assert len(parents) == 1 and len(trials) == 2
    run("10")  # at most the grid's 4 combinations
    parents_after, trials = runs_by_role()
    assert [p.info.run_id for p in parents_after] == [parents[0].info.run_id]
    assert parents_after[0].info.status == "FINISHED"
    assert parents_after[0].data.params["search.n_trials"] == "2"  # MLflow keeps a param; the rerun's is a tag
    assert parents_after[0].data.tags["search.n_trials.resumed"] == "4"
    combinations = sorted((r.data.tags["mode"], r.data.tags["seed"]) for r in trials)
    assert combinations == [("full", "0"), ("full", "1"), ("lora", "0"), ("lora", "1")]
    assert all(r.data.tags["trial_state"] == "complete" for r in trials)
    study = journal(tmp_path, "tinysent-search")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    MlflowClient().set_model_version_tag("textclf-tinysent", "1", "dataset_digest", "0ther")  # data changed since
    again = run("10")
    assert "already finished" in again.output  # not a refusal of data that no trial of it will train on
    other = CliRunner().invoke(search, tiny_args(tiny_dataset, tiny_llama, "--sampler", "grid", "--space",
                                                 "mode=choice(full,lora);seed=choice(0,1)", "--learning_rate", "2e-3"))
    assert other.exit_code == 2 and "training.learning_rate: 0.001 -> 0.002" in other.output, other.output
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == 5
    assert len(journal(tmp_path, "tinysent-search").trials) == 4


@pytest.mark.slow
def test_two_workers_on_one_machine_share_the_study_under_one_parent(mlflow_store, tmp_path, tiny_dataset, tiny_llama):
    """`--workers 2`: a second process joins the study; every trial runs once (none lost, none twice), all are
    children of the one parent run, and both processes trained some."""
    done = start_search(tmp_path, *tiny_args(tiny_dataset, tiny_llama, "--space", SPACE, "--n_trials", "6",
                                             "--pruner", "none", "--workers", "2"))
    output, _ = done.communicate(timeout=600)
    assert done.returncode == 0, output[-3000:]
    study = journal(tmp_path, "tinysent-lora-search")
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    parents, trials = runs_by_role()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(int(r.data.tags["trial"]) for r in trials) == list(range(6))
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in trials)
    assert len({r.data.tags["textclf.pid"] for r in trials}) == 2, "the second worker ran no trial"


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_ended_and_its_trial_retried_by_the_next_start(
        mlflow_store, tmp_path, tiny_dataset, tiny_llama):
    """kill -9 during trial 0 (after its first checkpoint): the same command again ends the dead trial's run
    KILLED, fails it in the study, retries it (resuming from that checkpoint), and takes over the parent run:
    n_trials counts the retry once, and no run is left RUNNING."""
    args, process = search_at_its_first_checkpoint(tmp_path, tiny_dataset, tiny_llama)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    result = CliRunner().invoke(search, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = journal(tmp_path, "tinysent-lora-search")
    states = {t.number: t.state.name for t in study.trials}
    assert states == {0: "FAIL", 1: "COMPLETE", 2: "COMPLETE"}
    retry = study.trials[1]
    assert retry.system_attrs["retry_history"] == [0] and retry.params == study.trials[0].params
    parents, trials = runs_by_role()
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_trial = {r.data.tags["trial"]: r for r in trials}
    assert by_trial["0"].info.status == "KILLED" and by_trial["0"].data.tags["trial_state"] == "failed"
    assert by_trial["1"].info.status == "FINISHED" and by_trial["1"].data.tags["retry_of"] == "0"
    resumed = Path(by_trial["1"].data.tags["resumed_from"])  # checkpoint-2 unless the kill came a step late
    assert resumed.parent.name == "tinysent-lora-search-trial0" and int(resumed.name.split("-")[1]) < 8
    assert all(r.info.status != "RUNNING" for r in trials + parents)
    assert parents[0].data.metrics["search/trials_retried"] == 1


def search_at_its_first_checkpoint(tmp_path, tiny_dataset, tiny_llama) -> tuple[list[str], subprocess.Popen]:
    """A two-trial search of 8 steps each, started as a process, once trial 0 has written checkpoint-2."""
    args = tiny_args(tiny_dataset, tiny_llama, "--space", SPACE, "--n_trials", "2", "--pruner", "none")
    args[args.index("--max_steps") + 1] = "8"
    process = start_search(tmp_path, *args)
    wait_for_checkpoint(process, tmp_path / "outputs" / "tinysent-lora-search" / "tinysent-lora-search-trial0" /
                        "checkpoint-2" / "COMPLETE")
    return args, process


def wait_for_checkpoint(process: subprocess.Popen, marker: Path) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"no {marker}"
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_ends_the_trial_and_the_parent_killed_and_queues_the_trial_again(mlflow_store, tmp_path, tiny_dataset,
                                                                                 tiny_llama):
    args, process = search_at_its_first_checkpoint(tmp_path, tiny_dataset, tiny_llama)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, output[-3000:]
    parents, trials = runs_by_role()
    assert [(r.data.tags["trial"], r.info.status, r.data.tags["trial_state"]) for r in trials] == [("0", "KILLED", "failed")]
    assert [p.info.status for p in parents] == ["KILLED"]
    study = journal(tmp_path, "tinysent-lora-search")
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    assert study.trials[1].system_attrs["retry_history"] == [0]


def start_postgres(folder: Path) -> tuple[str, callable]:
    """PostgreSQL on a free loopback port with database `optuna`, run as an unprivileged user when we are root
    (as scripts/server.sh does). Returns the storage URL and a function that stops it."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    pg_bin = Path(os.environ.get("PG_BIN") or (found[-1] if found else "/usr/lib/postgresql/15/bin"))
    if not (pg_bin / "initdb").exists():
        pytest.fail(f"PostgreSQL is not installed ({pg_bin}/initdb): apt-get install -y postgresql", pytrace=False)
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = "textclf-pg"
        if subprocess.run(["id", "-u", user], capture_output=True).returncode:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True)
        shutil.chown(folder, user)
        prefix = ["runuser", "-u", user, "--"]
    port, data = free_port(), folder / "pg"
    subprocess.run([*prefix, str(pg_bin / "initdb"), "-D", str(data), "-U", "textclf", "--auth=trust"],
                   check=True, capture_output=True)
    (data / "postgresql.conf").open("a").write("listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n")
    subprocess.run([*prefix, str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(folder / "pg.log"), "-o", f"-p {port}",
                    "-w", "-t", "60", "start"], check=True, capture_output=True)
    subprocess.run([str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "textclf", "optuna"], check=True)

    def stop() -> None:
        subprocess.run([*prefix, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True)

    return f"postgresql+psycopg://textclf@127.0.0.1:{port}/optuna", stop


@pytest.mark.slow
def test_two_machines_share_a_study_in_postgresql(mlflow_store, tmp_path, tiny_dataset, tiny_llama):
    """Two processes started at once, each in its own working folder (as on two machines), with the same study
    name and a PostgreSQL storage: one creates the study and the parent run, the other joins; every trial runs
    once, under that one parent."""
    folder = Path(tempfile.mkdtemp(prefix="textclf-optuna-pg-"))  # outside pytest's mode-700 folders
    folder.chmod(0o755)
    url, stop = start_postgres(folder)
    try:
        args = tiny_args(tiny_dataset, tiny_llama, "--space", SPACE, "--n_trials", "4", "--pruner", "none",
                         "--storage", url, "--study", "shared")
        machines = [tmp_path / "machine-a", tmp_path / "machine-b"]
        processes = []
        for machine in machines:
            machine.mkdir()
            processes.append(start_search(machine, *args))
        outputs = [p.communicate(timeout=600)[0] for p in processes]
        assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
        study = optuna.load_study(study_name="shared", storage=url)
        assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
        assert all(t.state.name == "COMPLETE" for t in study.trials)
        parents, trials = runs_by_role()
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert sorted(int(r.data.tags["trial"]) for r in trials) == [0, 1, 2, 3]
        assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
        assert sum("worker of study shared" in o for o in outputs) == 1  # the other owned the parent
        assert {Path(r.data.tags["output_dir"]).parts[-4] for r in trials} == {"machine-a", "machine-b"}
    finally:
        stop()
        shutil.rmtree(folder, ignore_errors=True)
