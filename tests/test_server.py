"""textclf against a team tracking server: PostgreSQL + `mlflow server --app-name basic-auth --serve-artifacts`,
started by scripts/server.sh (what `make server` runs) on free loopback ports in a temp folder.

Users: admin; alice (MANAGE on experiment and registered model textclf-tinysent); bob (READ on both).
Every command runs as a subprocess in its own client folder, as a user would run it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from conftest import REPO, sentiment_rows, wait_until_answers, write_jsonl
from test_mlproject import mlflow_env
from textclf.distributed.zero3 import free_port
from textclf.errors import TextclfError
from textclf.records.server_errors import redact, refusal_error

TINY = ["--logging_steps", "1", "--batch_size", "8", "--eval_batch_size", "16", "--max_length", "128",
        "--precision", "fp32", "--mode", "lora", "--learning_rate", "5e-3", "--eval_steps", "2", "--save_steps", "2",
        "--max_steps", "4", "--standardization_samples", "16"]
EXPERIMENT = MODEL = "textclf-tinysent"
PASSWORDS = {"admin": "admin-secret-pw-0001", "alice": "alice-secret-pw-0002", "bob": "bob-secret-pw-00003"}


@dataclass
class TeamServer:
    uri: str
    folder: Path
    experiment_id: str

    @property
    def artifacts(self) -> Path:
        return self.folder / "artifacts"

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


@contextlib.contextmanager
def logged_in(user: str, password: str | None = None):
    """MLflow's client reads the credentials from the environment at each request."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ["MLFLOW_TRACKING_USERNAME"] = user
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password or PASSWORDS[user]
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def server_script(command: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "server.sh"), command], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def team_server() -> TeamServer:
    pg_bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not pg_bins and not os.environ.get("PG_BIN"):
        pytest.fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): the team-server tests need "
                    "it: apt-get install -y postgresql (or set PG_BIN)", pytrace=False)
    # Not under pytest's basetemp (mode 700): PostgreSQL's unprivileged user must reach its data folder.
    folder = Path(tempfile.mkdtemp(prefix="textclf-server-"))
    folder.chmod(0o755)
    env = {**os.environ, "SERVER_DIR": str(folder), "PG_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()),
           "MLFLOW_ADMIN_PASSWORD": PASSWORDS["admin"], "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow")}
    try:
        started = server_script("start", env)
        assert started.returncode == 0, started.stdout + started.stderr
        uri = f"http://127.0.0.1:{env['MLFLOW_PORT']}"
        again = server_script("start", env)  # idempotent
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
        with logged_in("admin"):
            from mlflow.server import get_app_client

            auth = get_app_client("basic-auth", tracking_uri=uri)
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            experiment_id = client.create_experiment(EXPERIMENT)
            client.create_registered_model(MODEL)
            for user, permission in (("alice", "MANAGE"), ("bob", "READ")):
                auth.create_user(user, PASSWORDS[user])
                auth.grant_user_permission(user, "experiment", experiment_id, permission)
                auth.grant_user_permission(user, "registered_model", MODEL, permission)
        yield TeamServer(uri, folder, experiment_id)
    finally:
        stopped = server_script("stop", env)
        shutil.rmtree(folder, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "tinysent"
    write_jsonl(folder / "train.jsonl", sentiment_rows(48))
    write_jsonl(folder / "dev.jsonl", sentiment_rows(16, 1000))
    write_jsonl(folder / "test.jsonl", sentiment_rows(16, 2000))
    return folder


def client_env(server: TeamServer, user: str, password: str | None = None) -> dict[str, str]:
    env = mlflow_env(server.uri)
    env.update({"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password or PASSWORDS[user],
                "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    return env


def command(server: TeamServer, cwd: Path, user: str, entry: str, *args: str, password: str | None = None):
    """`python -m entrypoints.<entry> ARGS` as ``user`` in the client folder ``cwd``, started in the background."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", f"entrypoints.{entry}", *args], cwd=cwd,
                            env=client_env(server, user, password), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def finish(*processes: subprocess.Popen, timeout: float = 600) -> list[Done]:
    done = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=timeout)
        done.append(Done(process.returncode, stdout, stderr))
    return done


def error_lines(done: Done) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]


def train_args(dataset: Path, tiny_llama: str, *extra: str) -> list[str]:
    return ["--data_path", str(dataset), "--base_model", tiny_llama, *TINY, *extra]


def assert_only_outputs_written(cwd: Path) -> None:
    assert sorted(p.name for p in cwd.iterdir()) in ([], ["outputs"]), sorted(cwd.iterdir())
    assert not list(cwd.rglob("mlruns")) and not list(cwd.rglob("mlflow.db"))


@dataclass
class Workload:
    clients: list[Path]
    runs: dict[str, object]  # run name -> Run, as the server has it
    promotions: list[Done]


@pytest.fixture(scope="module")
def workload(team_server, dataset, tiny_llama, tmp_path_factory) -> Workload:
    """Three trainings and a sweep of two seeds by alice, all at once, each in its own client folder;
    then two promotions at once."""
    root = tmp_path_factory.mktemp("clients")
    clients = [root / f"train{seed}" for seed in (1, 2, 3)] + [root / "sweep"]
    processes = [command(team_server, clients[i], "alice", "train", *train_args(dataset, tiny_llama, "--seed", str(seed)))
                 for i, seed in enumerate((1, 2, 3))]
    processes.append(command(team_server, clients[3], "alice", "sweep", "--seeds", "4,5",
                             *train_args(dataset, tiny_llama)))
    for done in finish(*processes):
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    promotions = finish(*[command(team_server, root / f"promote{i}", "alice", "promote", "--dataset", "tinysent")
                          for i in range(2)])
    with logged_in("admin"):
        found = team_server.client().search_runs([team_server.experiment_id], max_results=100)
    return Workload(clients, {run.data.tags["mlflow.runName"]: run for run in found}, promotions)


def test_refusals_become_one_line_without_passwords(monkeypatch):
    """No server needed: MLflow's 401/403 exceptions become TextclfError naming server and user."""
    import mlflow

    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://carol:hunter2-secret@10.0.0.5:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-secret")
    denied = MlflowException("API request to endpoint /api/2.0/mlflow/runs/create failed with error code 403 != 200. "
                             "Response body: 'Permission denied'", error_code=mlflow.exceptions.get_error_code(403))
    assert refusal_error(RuntimeError("not a refusal")) is None
    try:
        raise RuntimeError("while logging") from denied
    except RuntimeError as wrapped:
        error = refusal_error(wrapped)
    assert isinstance(error, TextclfError)
    assert str(error).startswith("permission denied by the tracking server at http://carol:***@10.0.0.5:5000 for user "
                                 "carol: HTTP 403 on /api/2.0/mlflow/runs/create")
    wrong = MlflowException("API request to endpoint /api/2.0/mlflow/experiments/search failed with error code "
                            "401 != 200.", error_code=mlflow.exceptions.get_error_code(401))
    assert "refused the login of user carol" in str(refusal_error(wrong))
    assert "hunter2" not in str(error) + str(refusal_error(wrong))
    assert refusal_error(MlflowException("no such run", error_code=mlflow.exceptions.get_error_code(404))) is None
    assert redact("token hunter2-secret in https://u:p@h/x") == "token *** in https://u:***@h/x"


@pytest.mark.slow
def test_trainings_and_a_sweep_at_once_finish_with_every_metric_and_file(team_server, workload):
    names = {f"tinysent-lora-seed{seed}" for seed in (1, 2, 3, 4, 5)}
    assert names | {"tinysent-lora-sweep"} == set(workload.runs)
    with logged_in("admin"):
        client = team_server.client()
        for name in names:
            run = workload.runs[name]
            assert run.info.status == "FINISHED" and run.info.user_id == "alice", name
            assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
            # no metric lost: every step's, both evaluations', and the final ones
            for key in ("train/loss", "train/learning_rate", "train/samples_per_second"):
                assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4], (name, key)
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/f1_macro")) == [2, 4], name
            assert {"test/accuracy", "best/f1_macro", "train/runtime_seconds"} <= set(run.data.metrics), name
        parent = workload.runs["tinysent-lora-sweep"]
        assert parent.info.status == "FINISHED" and "sweep/best_f1_macro_mean" in parent.data.metrics
        children = {r.data.tags["mlflow.runName"] for r in workload.runs.values()
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert children == {"tinysent-lora-seed4", "tinysent-lora-seed5"}
        assert len(client.search_model_versions(f"name = '{MODEL}'")) == 5  # one per training
    # the files reached the server's artifact store, through the server; nothing beside the clients but outputs/
    stored = [p.relative_to(team_server.artifacts).as_posix() for p in team_server.artifacts.rglob("*") if p.is_file()]
    for name in names:
        run_id = workload.runs[name].info.run_id
        assert any(run_id in path and path.endswith("test/classification_report.json") for path in stored), name
    assert sum(path.endswith("/MLmodel") for path in stored) == 5, sorted(stored)[:20]
    assert sum(path.endswith("/textclf.json") for path in stored) == 5
    for client_folder in workload.clients:
        assert_only_outputs_written(client_folder)


@pytest.mark.slow
def test_two_promotions_at_once_leave_one_consistent_champion(team_server, workload):
    assert [done.returncode for done in workload.promotions] == [0, 0], [d.stderr[-2000:] for d in workload.promotions]
    with logged_in("admin"):
        client = team_server.client()
        versions = client.search_model_versions(f"name = '{MODEL}'")
        champion = client.get_model_version_by_alias(MODEL, "champion")
    best = sorted(versions, key=lambda v: (-float(v.tags["validation_f1_macro"]), int(v.version)))[0]
    assert champion.version == best.version
    assert all(f"version {best.version} is" in done.stdout for done in workload.promotions)


@pytest.mark.slow
def test_evaluate_predict_and_serve_the_champion_from_the_server(team_server, workload, dataset, tmp_path):
    cwd = tmp_path / "client"
    champion = "models:/textclf-tinysent@champion"
    source = tmp_path / "texts.jsonl"
    write_jsonl(source, [{"text": "a wonderful , moving film"}, {"text": "a dull , boring mess"}])
    evaluated, predicted = finish(
        command(team_server, cwd, "alice", "evaluate", "--model_uri", champion, "--data_path", str(dataset)),
        command(team_server, cwd, "bob", "predict", "--model", champion, "--input", str(source),
                "--output", str(tmp_path / "predictions.jsonl")))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    with logged_in("admin"):
        evaluations = team_server.client().search_runs([team_server.experiment_id],
                                                       filter_string="tags.entry_point = 'evaluate'")
    assert len(evaluations) == 1 and evaluations[0].info.status == "FINISHED"
    assert "test/accuracy" in evaluations[0].data.metrics
    expected = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]

    port = free_port()
    serving = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", champion, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=client_env(team_server, "bob"), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/ping", serving, 180, "mlflow models serve")
        body = json.dumps({"dataframe_records": [{"text": row["text"]} for row in expected]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    finally:
        serving.terminate()
        serving.wait(timeout=30)
    assert [row["label"] for row in answer] == [row["label"] for row in expected]
    assert_only_outputs_written(cwd)


@pytest.mark.slow
def test_refusals_by_the_server_are_one_line_and_leave_nothing(team_server, workload, dataset, tiny_llama,
                                                               tmp_path):
    """bob (READ) cannot train into the experiment or move champion; a wrong password is refused."""
    with logged_in("admin"):
        client = team_server.client()
        before_runs = {r.info.run_id for r in client.search_runs([team_server.experiment_id], max_results=100)}
        before_versions = {v.version for v in client.search_model_versions(f"name = '{MODEL}'")}
        champion = client.get_model_version_by_alias(MODEL, "champion").version
        client.delete_registered_model_alias(MODEL, "champion")  # so that bob's promote has an alias to set
    try:
        trained, promoted, wrong = finish(
            command(team_server, tmp_path / "bob", "bob", "train", *train_args(dataset, tiny_llama, "--seed", "8")),
            command(team_server, tmp_path / "bob", "bob", "promote", "--dataset", "tinysent", "--no-stage"),
            command(team_server, tmp_path / "alice", "alice", "promote", "--dataset", "tinysent",
                    password="not-her-password1"))
    finally:
        with logged_in("admin"):
            aliases = client.get_registered_model(MODEL).aliases
            client.set_registered_model_alias(MODEL, "champion", champion)
    for done, user in ((trained, "bob"), (promoted, "bob")):
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
        (line,) = error_lines(done)
        assert line.startswith(f"error: permission denied by the tracking server at {team_server.uri} for user {user}:")
    assert wrong.returncode == 2, wrong.stderr[-3000:]
    (line,) = error_lines(wrong)
    assert line.startswith(f"error: the tracking server at {team_server.uri} refused the login of user alice")
    for done in (trained, promoted, wrong):
        output = done.stdout + done.stderr
        assert PASSWORDS["bob"] not in output and "not-her-password1" not in output and "Traceback" not in output
    assert "champion" not in aliases  # bob moved nothing
    with logged_in("admin"):
        assert {r.info.run_id for r in client.search_runs([team_server.experiment_id], max_results=100)} == before_runs
        assert {v.version for v in client.search_model_versions(f"name = '{MODEL}'")} == before_versions


@pytest.mark.slow
def test_promote_with_registry_stages_works_on_postgresql(team_server, workload, tmp_path):
    (done,) = finish(command(team_server, tmp_path, "alice", "promote", "--dataset", "tinysent"))
    assert done.returncode == 0, done.stderr[-3000:]
    with logged_in("admin"):
        production = [v.version for v in team_server.client().search_model_versions(f"name = '{MODEL}'")
                      if v.current_stage == "Production"]
        assert production == [team_server.client().get_model_version_by_alias(MODEL, "champion").version]
