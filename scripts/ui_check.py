"""Check the MLflow UI in a real browser: train a tiny sweep and a zero-shot baseline into a temp store, serve it
with `mlflow ui`, open the pages a user would in headless Chromium, screenshot them and check what they show.

    .venv/bin/python scripts/ui_check.py [--output ui-check-results] [--docs_image docs/ui-run.png] [--keep]
    .venv/bin/python scripts/ui_check.py --store STORE --docs_experiment textclf-sst2 --docs_runs a,b --docs_image docs/ui-run.png

Writes <output>/*.png and <output>/ui_check.json and prints one line per check. Exits 1 if any check (or the
setup) failed, 2 if Chromium or Playwright cannot be had. The UI server is always stopped.

Why a browser: the MLflow UI is a React app, so an HTTP client sees an empty shell; only a rendered page
shows whether our run names, metric names, confusion matrix and misclassified table reach the user.
Chromium is Debian's (installed with apt-get when absent and we are root; Playwright's own browser download
does not work on our machines); Playwright's Python package drives it and is pip-installed when absent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google on this closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DATASET = "tinysent"
SWEEP_RUN, CHILD_RUN, BASELINE_RUN = f"{DATASET}-lora-sweep", f"{DATASET}-lora-seed0", f"{DATASET}-zero-shot"
TRAIN_ARGS = ["--seeds", "0,42", "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1",
              "--batch_size", "8", "--eval_batch_size", "16", "--max_length", "128", "--precision", "fp32",
              "--mode", "lora", "--learning_rate", "5e-3"]
PAGE_TIMEOUT_MS = 45_000


def log(message: str) -> None:
    print(message, flush=True)


def ensure_chromium() -> str | None:
    """Debian's Chromium, installed with apt-get when absent and we may; None when it cannot be had."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    log("installing Debian's chromium (apt-get) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        if subprocess.run(command, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            return None
    return CHROMIUM if os.path.exists(CHROMIUM) else None


def ensure_playwright() -> bool:
    """Playwright's Python package (only the driver; the browser is Debian's), pip-installed when absent."""
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        log("installing the playwright Python package (pip) ...")
        if subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "playwright"]).returncode != 0:
            return False
        importlib.invalidate_caches()
    try:
        importlib.import_module("playwright.sync_api")
        return True
    except ImportError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_runs(store: Path) -> None:
    """A two-seed LoRA sweep and the zero-shot baseline of a tiny random Llama, tracked in <store>/mlflow.db."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_llama, sentiment_rows, write_jsonl

    data = store / DATASET
    write_jsonl(data / "train.jsonl", sentiment_rows(48))
    write_jsonl(data / "dev.jsonl", sentiment_rows(16, 1000))
    write_jsonl(data / "test.jsonl", sentiment_rows(16, 2000))
    model = build_tiny_llama(store / "tiny-llama")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(store), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           # a sample per second, logged at once: the 20 s sweep has system metrics to show
           "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    common = ["--data_path", str(data), "--base_model", str(model)]
    for name, command in (("sweep", ["entrypoints.sweep", *common, *TRAIN_ARGS]),
                          ("baseline", ["entrypoints.baseline", *common])):
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", *command], cwd=store, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {result.returncode}):\n"
                               f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
        log(f"{name}: done in {time.monotonic() - started:.0f} s")


def tracking_uri(store: Path) -> str:
    return f"sqlite:///{store / 'mlflow.db'}"


def find_runs(store: Path) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(store))
    experiment = client.get_experiment_by_name(f"textclf-{DATASET}")
    if experiment is None:
        raise RuntimeError(f"no experiment textclf-{DATASET} in {tracking_uri(store)}")
    runs = {run.info.run_name: run.info.run_id for run in client.search_runs([experiment.experiment_id])}
    missing = [name for name in (SWEEP_RUN, CHILD_RUN, BASELINE_RUN) if name not in runs]
    if missing:
        raise RuntimeError(f"runs missing from the store: {missing} (found {sorted(runs)})")
    return {"experiment_id": experiment.experiment_id, **runs}


def start_ui(store: Path, port: int) -> subprocess.Popen:
    mlflow = REPO / ".venv" / "bin" / "mlflow"
    executable = str(mlflow) if mlflow.exists() else shutil.which("mlflow") or "mlflow"
    server = subprocess.Popen(
        [executable, "ui", "--backend-store-uri", tracking_uri(store), "--host", "127.0.0.1", "--port", str(port)],
        cwd=store, stdout=open(store / "mlflow-ui.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow ui exited {server.returncode}: {(store / 'mlflow-ui.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    stop_ui(server)
    raise RuntimeError(f"mlflow ui did not answer within 90 s: {(store / 'mlflow-ui.log').read_text()[-2000:]}")


def stop_ui(server: subprocess.Popen) -> None:
    """Stop the server and its workers (its own process group, started by us)."""
    if server.poll() is not None:
        return
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(timeout=5)


class Checks:
    def __init__(self) -> None:
        self.results: list[dict] = []

    def record(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append({"check": name, "ok": bool(ok), "detail": detail})
        log(f"{'PASS' if ok else 'FAIL'}  {name}{f'  ({detail})' if detail else ''}")
        return ok

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.results if not r["ok"]]


def wait_for_text(page, texts: list[str], timeout_ms: int = PAGE_TIMEOUT_MS) -> list[str]:
    """Wait until every text is in the rendered page; return those still missing at the deadline."""
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        body = page.inner_text("body")
        missing = [text for text in texts if text not in body]
        if not missing or time.monotonic() > deadline:
            return missing
        page.wait_for_timeout(500)


def chart_titles(page) -> set[str]:
    """The full metric names of the charts drawn (the card shows only the part after the section prefix)."""
    return set(page.eval_on_selector_all("[title]", "els => els.map(e => e.getAttribute('title'))"))


def load(page, url: str, texts: list[str]) -> list[str]:
    """Open url as a fresh page load (a hash-only change keeps the SPA's old artifact selection), close the
    assistant side panel, which takes a third of the width, and wait for texts."""
    page.goto("about:blank")
    page.goto(url)
    missing = wait_for_text(page, texts)
    if "MLflow Assistant" in page.inner_text("body"):
        close = page.locator("button[aria-label='Close']")
        if close.count():
            close.first.click()
    return missing


def check_texts(checks: Checks, name: str, texts: list[str], missing: list[str]) -> bool:
    return checks.record(f"{name}: shows {', '.join(texts)}", not missing, f"missing {missing}" if missing else "")


def runs_list(page, base: str, ids: dict, output: Path, checks: Checks) -> None:
    """The experiment's runs: the sweep parent expanded to its two seeds, beside the zero-shot baseline, with
    test metrics as columns."""
    # workflowType: the classic ML sidebar (Runs, Models) rather than the GenAI one
    load(page, f"{base}/#/experiments/{ids['experiment_id']}/runs?workflowType=machine_learning",
         [SWEEP_RUN, BASELINE_RUN])
    expander = page.locator("button[data-component-id*='runnamecellrenderer']")  # the parent row's [+]
    if expander.count() and CHILD_RUN not in page.inner_text("body"):
        expander.first.click()
        wait_for_text(page, [CHILD_RUN], 10_000)
    metrics = ["test/accuracy", "test/f1_macro"]
    show_metric_columns(page, metrics)
    widen_run_name_column(page)
    toggle = page.locator("button[aria-label='Toggle sidebar']")
    if toggle.count():  # room for the metric columns
        toggle.first.click()
    texts = [SWEEP_RUN, CHILD_RUN, f"{DATASET}-lora-seed42", BASELINE_RUN, *metrics]
    missing = wait_for_text(page, texts)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(output / "1-runs-list.png"))
    check_texts(checks, "1-runs-list", texts, missing)


def show_metric_columns(page, metrics: list[str]) -> None:
    """Add the metrics as columns of the runs list (the column picker, searched by name)."""
    try:
        page.get_by_test_id("column-selection-dropdown").first.click()
        search = page.get_by_placeholder("Search columns")
        for metric in metrics:
            search.fill(metric)
            item = page.get_by_text(metric, exact=True).last
            try:
                item.wait_for(timeout=5000)
            except Exception:  # noqa: BLE001 - the filtered group sometimes stays collapsed
                page.locator("[data-testid='column-selector-tree'] [class*='tree-switcher_close']").first.click()
                item.wait_for(timeout=5000)
            item.click()
            page.wait_for_timeout(300)
        page.keyboard.press("Escape")
    except Exception as error:  # noqa: BLE001 - the caller's check reports the missing columns
        log(f"could not add metric columns: {type(error).__name__}: {str(error).splitlines()[0]}")


def widen_run_name_column(page) -> None:
    """Drag the Run Name header's edge so the children's names are not cut to 'tinysent-lora-se...'."""
    try:
        header = page.locator(".ag-header-cell[col-id*='Run Name']").first.bounding_box()
        if not header:
            return
        x, y = header["x"] + header["width"] - 2, header["y"] + header["height"] / 2
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + 60, y, steps=5)
        page.mouse.up()
    except Exception as error:  # noqa: BLE001 - cosmetic only
        log(f"could not widen the run name column: {error}")


def browse(base: str, ids: dict, store: Path, output: Path, checks: Checks) -> None:
    from playwright.sync_api import sync_playwright

    experiment, child, parent = ids["experiment_id"], ids[CHILD_RUN], ids[SWEEP_RUN]
    child_url = f"{base}/#/experiments/{experiment}/runs/{child}"
    ml = "?workflowType=machine_learning"  # the classic ML sidebar (Runs, Models) rather than the GenAI one

    with tempfile.TemporaryDirectory(prefix="ui-check-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)

            def shot(name: str, settle_ms: int = 1500) -> None:
                page.wait_for_timeout(settle_ms)  # charts and images draw after the text arrives
                page.screenshot(path=str(output / f"{name}.png"))

            # 1. The runs list.
            runs_list(page, base, ids, output, checks)

            # 2. The sweep parent's page: finished, with its two child runs linked.
            texts = [SWEEP_RUN, "Finished", "Child runs", CHILD_RUN, f"{DATASET}-lora-seed42"]
            missing = load(page, f"{base}/#/experiments/{experiment}/runs/{parent}{ml}", texts)
            shot("2-sweep-parent")
            check_texts(checks, "2-sweep-parent", texts, missing)

            # 3. A child's model metrics, filtered to f1_macro: the eval curve over steps and the best value.
            missing = load(page, f"{child_url}/model-metrics{ml}", [CHILD_RUN, "Model metrics"])
            page.get_by_placeholder("Search metric charts").fill("f1_macro")
            deadline = time.monotonic() + PAGE_TIMEOUT_MS / 1000
            while not {"eval/f1_macro", "best/f1_macro"} <= chart_titles(page) and time.monotonic() < deadline:
                page.wait_for_timeout(500)
            shot("3-child-model-metrics", 2000)
            titles = chart_titles(page)
            missing += [name for name in ("eval/f1_macro", "best/f1_macro") if name not in titles]
            checks.record("3-child-model-metrics: charts eval/f1_macro and best/f1_macro", not missing,
                          f"missing {missing}" if missing else "")

            # 4. Its artifacts: test/confusion_matrix.png drawn at the logged PNG's own size.
            texts = ["test/confusion_matrix.png", "misclassified.json", "classification_report.json"]
            missing = load(page, f"{child_url}/artifactPath/test/confusion_matrix.png{ml}", texts)
            shot("4-child-confusion-matrix", 2500)
            check_texts(checks, "4-child-confusion-matrix", texts, missing)
            expected = png_size(store, child, "test/confusion_matrix.png")
            drawn = page.eval_on_selector_all(
                "img", "els => els.filter(e => e.complete).map(e => [e.naturalWidth, e.naturalHeight])")
            checks.record("4-child-confusion-matrix: the image is drawn", list(expected) in drawn,
                          f"logged PNG {expected[0]}x{expected[1]}; images on the page {drawn}")

            # 5. The misclassified rows, logged with mlflow.log_table: the UI shows them as a table.
            texts = ["test/misclassified.json", "text", "label", "predicted", "score", "prob_"]
            missing = load(page, f"{child_url}/artifactPath/test/misclassified.json{ml}", texts)
            shot("5-child-misclassified")
            check_texts(checks, "5-child-misclassified", texts, missing)

            # 6. System metrics, sampled every second during training.
            texts = [CHILD_RUN, "cpu_utilization_percentage", "system_memory_usage_megabytes"]
            missing = load(page, f"{child_url}/system-metrics{ml}", texts)
            shot("6-child-system-metrics", 3000)
            check_texts(checks, "6-child-system-metrics", texts, missing)

            # 7. The overview: status, parent run, and the metrics table filtered to the test scores.
            texts = [CHILD_RUN, "Finished", SWEEP_RUN, "test/accuracy", "test/f1_macro"]
            missing = load(page, child_url + ml, texts[:3])
            page.get_by_placeholder("Search metrics").fill("test/")
            missing += wait_for_text(page, texts[3:])
            shot("7-child-overview")
            check_texts(checks, "7-child-overview", texts, missing)
        finally:
            context.close()


def png_size(store: Path, run_id: str, artifact: str) -> tuple[int, int]:
    import mlflow
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=folder,
                                                   tracking_uri=tracking_uri(store))
        with Image.open(path) as image:
            return image.size


def docs_image(screenshot: Path, target: Path, width: int = 1200, height: int = 400) -> None:
    """The top `height` pixels of the runs list (header, toolbar, the runs with their test metrics), at most `width`
    wide."""
    from PIL import Image

    with Image.open(screenshot) as image:
        image = image.convert("RGB").crop((0, 0, image.width, min(image.height, height)))
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target, optimize=True)


def docs_picture(store: Path, experiment: str, runs: list[str], target: Path, output: Path) -> None:
    """The runs list of ``experiment`` in an existing store (real runs, for the README's picture), with test
    accuracy and macro F1 as columns, cropped to ``target``. Raises RuntimeError when a run name is not shown."""
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    found = MlflowClient(tracking_uri(store)).get_experiment_by_name(experiment)
    if found is None:
        raise RuntimeError(f"no experiment {experiment} in {tracking_uri(store)}")
    port = free_port()
    server = start_ui(store, port)
    try:
        with tempfile.TemporaryDirectory(prefix="ui-check-chromium-") as profile, sync_playwright() as p:
            context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                           args=CHROMIUM_ARGS, viewport={"width": 1600, "height": 1000})
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            load(page, f"http://127.0.0.1:{port}/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning",
                 runs[:1])
            show_metric_columns(page, ["test/accuracy", "test/f1_macro"])
            widen_run_name_column(page)
            toggle = page.locator("button[aria-label='Toggle sidebar']")
            if toggle.count():
                toggle.first.click()
            missing = wait_for_text(page, [*runs, "test/accuracy"])
            page.wait_for_timeout(1500)
            page.screenshot(path=str(output / "docs-runs-list.png"))
            context.close()
    finally:
        stop_ui(server)
    if missing:
        raise RuntimeError(f"the runs list does not show {missing}")
    docs_image(output / "docs-runs-list.png", target, height=560)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(REPO / "ui-check-results"), help="folder for screenshots and report")
    parser.add_argument("--store", default="", help="reuse this folder's mlflow.db (made by an earlier --keep run)")
    parser.add_argument("--keep", action="store_true", help="keep the temp store (its path is printed)")
    parser.add_argument("--port", type=int, default=0, help="UI port (default: a free one)")
    parser.add_argument("--docs_image", default="",
                        help="also write the runs list, cropped to the table and downscaled, here (docs/ui-run.png)")
    parser.add_argument("--docs_experiment", default="",
                        help="with --store and --docs_image: picture this experiment's runs list of a real store "
                             "instead of checking the tiny runs")
    parser.add_argument("--docs_runs", default="", help="comma-separated run names the picture must show")
    args = parser.parse_args(argv)

    started = time.monotonic()
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if not ensure_chromium():
        log(f"cannot check: {CHROMIUM} is absent and could not be installed")
        return 2
    if not ensure_playwright():
        log("cannot check: the playwright Python package is absent and could not be installed")
        return 2

    if args.docs_experiment:
        docs_picture(Path(args.store), args.docs_experiment, [r for r in args.docs_runs.split(",") if r],
                     Path(args.docs_image), output)
        log(f"wrote {args.docs_image}")
        return 0
    store = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="ui-check-store-"))
    checks, server = Checks(), None
    try:
        if not args.store:
            make_runs(store)
        ids = find_runs(store)
        port = args.port or free_port()
        server = start_ui(store, port)
        log(f"mlflow ui on http://127.0.0.1:{port} (store {store})")
        browse(f"http://127.0.0.1:{port}", ids, store, output, checks)
    except Exception as error:  # noqa: BLE001 - reported as a failed check, the server still stopped
        checks.record("setup and browsing", False, f"{type(error).__name__}: {error}")
    finally:
        if server is not None:
            stop_ui(server)
        if not args.store and not args.keep:
            shutil.rmtree(store, ignore_errors=True)
        elif args.keep:
            log(f"store kept: {store}")
    if args.docs_image and not checks.failed:
        docs_image(output / "1-runs-list.png", Path(args.docs_image))
        log(f"wrote {args.docs_image}")
    seconds = time.monotonic() - started
    report = {"passed": not checks.failed, "seconds": round(seconds, 1), "checks": checks.results}
    (output / "ui_check.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"{len(checks.results) - len(checks.failed)}/{len(checks.results)} checks passed in {seconds:.0f} s; "
        f"screenshots in {output}")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
