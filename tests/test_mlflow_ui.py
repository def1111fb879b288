"""`mlflow ui` as researchers use it, in a real browser.

The session's shared tiny study (conftest.py: two Table 2 rows, one scored at every checkpoint,
one diverged on purpose) is made with `dvc repro`; `mlflow ui` serves its store; headless Chromium, driven through the system's chromedriver with selenium,
then checks what a researcher looks for: the experiment's runs table lists the study's runs with
their FID / IS / NLL (the numbers of metrics/<E>.json), a run's page shows its description (its
Table 2 row) and metrics, and its artifact view shows the sample grid and the FID-over-training
figure.

Screenshots are kept in $TEST_ARTIFACTS (else pytest's temp folder, printed with -s); with
UPDATE_DOCS_SCREENSHOT=1 the runs table is also copied to docs/mlflow_runs.png (the screenshot
in docs/dvc.md).
Skipped when Chromium is not installed (`apt-get install chromium chromium-driver`; .ci/run
does this).
"""

from __future__ import annotations

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

import pytest

from helpers import PROJECT, env_for

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get "
                       "install chromium chromium-driver); needed to test mlflow ui in a browser"),
]

from conftest import STABLE_KEY as STABLE
from conftest import UNSTABLE_KEY as UNSTABLE

EXPERIMENTS = (STABLE, UNSTABLE)  # the shared study's runs: their names in MLflow

# MLflow 3 keeps a GenAI / "Model training" switch per browser (localStorage, default GenAI)
# and reads it from the URL first: this opens the experiment on its table of training runs.
ML = "workflowType=machine_learning"
WAIT_S = 90  # a cold page on a busy 2-core CI machine


# --------------------------------------------------------------------------------------------
# Fixtures: the study, the server, the browser
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("TEST_ARTIFACTS")
    path = Path(folder) / "mlflow_ui" if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def study(shared_study) -> Path:
    """The shared tiny study (conftest.py): eps_simple scored at every checkpoint, and
    mu_vlb_fixed diverged on purpose (an "unstable" run, as researchers meet them)."""
    return shared_study


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(study):
    port = _free_port()
    log = open(study / "mlflow_ui.log", "w")
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{study / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=study, env=env_for(study), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group: the server and its workers stop together
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("mlflow ui did not answer /health:\n"
                                     + (study / "mlflow_ui.log").read_text()[-4000:])
            time.sleep(1)
        yield url
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="module")
def browser():
    if CHROMEDRIVER is None:
        pytest.fail("Chromium is installed but chromedriver is not: apt-get install "
                    "chromium-driver (selenium must not download a driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--no-first-run", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def records(study, mlflow_ui):
    """The experiment id, and per run its metrics/<E>-<S>.json and MLflow run id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddpm-digits")
    runs = {r.info.run_name: r.info.run_id
            for r in client.search_runs([experiment.experiment_id])}
    metrics = {name: json.loads((study / "metrics" / f"{name}.json").read_text())
               for name in EXPERIMENTS}
    return experiment.experiment_id, metrics, runs


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def wait_for(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(
            lambda d: condition(d) or False)
    except TimeoutException:
        raise AssertionError(f"mlflow ui: {what} did not show within {timeout:g} s at "
                             f"{driver.current_url}; page text:\n"
                             f"{_body_text(driver)[:3000]}") from None


def open_page(driver, url: str) -> None:
    """Load `url` afresh (MLflow is a one-page app: a changed #fragment alone would not)."""
    driver.get("about:blank")
    driver.get(url)


def _body_text(driver) -> str:
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.TAG_NAME, "body").text
    except Exception:  # the page is still loading
        return ""


def close_assistant(driver) -> None:
    """MLflow 3.17 opens its assistant panel on the first visit: close it to see the page."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
        try:
            button.click()
        except Exception:  # hidden or gone meanwhile
            pass


def toggle_columns(driver, names: list[str]) -> None:
    """Tick (or untick) columns in the runs table's "Columns" menu, as a user does."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    button = wait_for(driver, lambda d: next(
        (b for b in d.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Columns"),
        None), "the Columns button")
    button.click()
    dialog = wait_for(driver, lambda d: next(iter(d.find_elements(By.CSS_SELECTOR,
                                                                  "[role=dialog]")), None),
                      "the Columns menu")
    for name in names:
        item = wait_for(driver, lambda d: next(iter(dialog.find_elements(
            By.CSS_SELECTOR, f'span[title="{name}"]')), None), f"column '{name}' in the menu")
        item.click()
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)


def table_cells(driver) -> dict[str, dict[str, str]]:
    """{run name: {column id: text}} of the runs table (ag-grid rows split in pinned parts)."""
    cells = driver.execute_script("""
        const out = [];
        document.querySelectorAll('[role=row][row-index] [role=gridcell][col-id]').forEach(c =>
            out.push([c.closest('[role=row]').getAttribute('row-index'),
                      c.getAttribute('col-id'), c.innerText]));
        return out;""")
    rows: dict[str, dict[str, str]] = {}
    for index, column, text in cells:
        rows.setdefault(index, {})[column] = text.strip()
    by_name = {}
    for row in rows.values():
        name = row.get("attributes.`Run Name`", "").splitlines()
        if name:
            by_name[name[-1]] = row
    return by_name


def screenshot(driver, folder: Path, name: str) -> Path:
    path = folder / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_runs_table_lists_the_study_runs_with_fid_is_and_nll(browser, mlflow_ui, records,
                                                             artifacts):
    experiment_id, metrics, _ = records
    open_page(browser, f"{mlflow_ui}/#/experiments/{experiment_id}?{ML}")
    wait_for(browser, lambda d: all(n in _body_text(d) for n in EXPERIMENTS),
             "the study's runs")
    assert f"/experiments/{experiment_id}/runs" in browser.current_url  # the runs table
    close_assistant(browser)
    # the study's description (the experiment's mlflow.note.content) heads the page
    assert "DDPM study (Ho, Jain & Abbeel 2020)" in _body_text(browser)

    # make room, then show the metrics a researcher compares
    toggle_columns(browser, ["Dataset", "Source", "Models", "fid", "is_mean", "nll_bpd",
                             "Description"])
    shown = ("metrics.`fid`", "metrics.`is_mean`", "metrics.`nll_bpd`")
    rows = wait_for(browser, lambda d: (lambda r: r if all(
        c in r.get(STABLE, {}) for c in shown) and UNSTABLE in r else None)(table_cells(d)),
        "the fid / is_mean / nll_bpd columns")
    assert "tables" in rows  # the study run holding Tables 1 and 2
    for column, key in zip(shown, ("fid", "is_mean", "nll_bpd")):
        assert float(rows[STABLE][column]) == pytest.approx(metrics[STABLE][key], rel=1e-6), key
        assert rows[UNSTABLE].get(column, "-") in ("-", "")  # diverged: no scores
    for name in EXPERIMENTS:
        assert rows[name]["attributes.`Description`"].startswith("Table 2 row:")
    path = screenshot(browser, artifacts, "mlflow_runs.png")
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        (PROJECT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(path, PROJECT / "docs" / "mlflow_runs.png")


def test_run_page_shows_its_table2_row_and_metrics(browser, mlflow_ui, records, artifacts):
    experiment_id, metrics, runs = records
    run_page = f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{runs[STABLE]}"
    open_page(browser, f"{run_page}?{ML}")
    text = wait_for(browser, lambda d: (lambda t: t if "nll_bpd_se" in t and
                                        "Table 2 row" in t else None)(_body_text(d)),
                    "the run's overview")
    close_assistant(browser)
    assert "Table 2 row: ε prediction (ours), ||ε̃ − ε_θ||² (L_simple)" in text
    lines = text.splitlines()
    shown = {key: lines[lines.index(key) + 1] for key in ("fid", "is_mean", "nll_bpd",
                                                          "best_checkpoint_step", "train_loss")
             if key in lines}  # the metrics table: a name, then its value
    for key in ("fid", "is_mean", "nll_bpd", "best_checkpoint_step"):
        assert float(shown[key]) == pytest.approx(metrics[STABLE][key], rel=1e-6), key
    assert "train_loss" in shown
    screenshot(browser, artifacts, "mlflow_run.png")


@pytest.mark.parametrize("artifact,source", [
    ("samples/grid.png", f"samples/{STABLE}/grid.png"),
    ("samples/progressive.png", f"samples/{STABLE}/progressive.png"),
    (f"fid_over_training/{STABLE}.png", f"plots/fid_over_training/{STABLE}.png"),
])
def test_artifact_view_shows_the_figures(browser, mlflow_ui, records, artifacts, study,
                                         artifact, source):
    from PIL import Image

    experiment_id, _, runs = records
    open_page(browser, f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{runs[STABLE]}"
                       f"/artifacts/{artifact}?{ML}")
    width, height = Image.open(study / source).size
    wait_for(browser, lambda d: d.execute_script(  # the figure itself, decoded by the browser
        "return Array.from(document.images).some(i => i.complete && "
        "i.naturalWidth === arguments[0] && i.naturalHeight === arguments[1])", width, height),
        f"the image {artifact} ({width} x {height})")
    close_assistant(browser)
    assert artifact in _body_text(browser)  # the artifact tree's path header
    screenshot(browser, artifacts, f"mlflow_artifact_{Path(artifact).stem}.png")
