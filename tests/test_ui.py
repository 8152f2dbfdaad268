"""`beam-pipeline ui` in a real browser (Playwright driving Debian's Chromium) on a store of two real taxi runs."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading

import pytest
from starlette.testclient import TestClient

from beam_pipeline import queries
from beam_pipeline.ui.app import create_app
from tests.conftest import ROOT
from tests.helpers import needs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = needs(CHROMIUM, "chromium not installed (apt-get install chromium)")
# Screenshots the browser test keeps, for a person to look at after the run (CI keeps the directory).
SHOTS = os.environ.get("BEAM_PIPELINE_TEST_ARTIFACTS", os.path.join(ROOT, "test-artifacts", "ui"))


@pytest.fixture(scope="module")
def ui_server(model_store):
    """The `ui` command as a user starts it, on a free port; its first line says where."""
    command = [sys.executable, "-m", "beam_pipeline", "ui", "--pipeline-root", model_store["root"], "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=120)
    except queue.Empty:
        process.kill()
        raise AssertionError(f"ui printed nothing in 120 s; stderr: {process.stderr.read()[-3000:]}") from None
    assert line.startswith("beam-pipeline ui: http://127.0.0.1:"), line
    url = line.split()[2].rstrip("/")
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(60_000)
    yield tab
    context.close()


def _shot(page, name: str) -> None:
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


@pytest.mark.slow
@needs_chromium
def test_runs_run_execution_and_the_trainer_table_show_what_ml_metadata_holds(ui_server, page, model_store):
    store = queries.open_store(model_store["store"])
    page.goto(ui_server + "/")
    rows = page.locator("#runs tbody tr")
    assert rows.count() == len(model_store["runs"]) == 3
    shown = {row.get_attribute("data-run") for row in rows.all()}
    assert shown == set(model_store["runs"])
    expected = queries.runs(store).set_index("run_id")
    run_a = model_store["runs"][0]
    row = page.locator(f'#runs tr[data-run="{run_a}"]')
    assert row.locator(".state").inner_text() == expected.loc[run_a, "state"]
    _shot(page, "runs")

    # Filtering by state: the cached re-run alone.
    page.select_option("select[name=state]", "CACHED")
    page.click("button[type=submit]")
    assert [r.get_attribute("data-run") for r in page.locator("#runs tbody tr").all()] == [model_store["runs"][2]]

    # A run: its DAG, each box a link; the Trainer's box opens its execution.
    page.goto(ui_server + "/")
    page.click(f'#runs tr[data-run="{run_a}"] a')
    page.wait_for_selector(".dag svg")
    boxes = page.locator(".dag svg g.node")
    assert boxes.count() == len(queries.run_executions(store, model_store["pipeline"], run_a))
    _shot(page, "run")
    trainer = model_store["a"]["trainer_execution"]
    page.locator(f'.dag svg a[href="/executions/{trainer}"]').click()
    page.wait_for_selector("#config")
    assert page.locator("h1").inner_text() == f"Trainer · execution #{trainer}"
    config = dict(
        zip(
            page.locator("#config td:nth-child(1)").all_inner_texts(),
            page.locator("#config td:nth-child(2)").all_inner_texts(),
            strict=True,
        )
    )
    assert config["train_steps"] == str(model_store["train_steps"][0])
    assert page.locator(f'a[href="/artifacts/{model_store["a"]["model"]}"]').count() == 1
    _shot(page, "execution")

    # All Trainer runs as a table with its configuration columns, sortable.
    page.goto(ui_server + "/types/Trainer")
    headers = page.locator("#executions th").all_inner_texts()
    steps_column = headers.index("train_steps")
    page.locator("#executions th").nth(steps_column).click()  # ascending
    steps = [int(t) for t in page.locator(f"#executions td:nth-child({steps_column + 1})").all_inner_texts()]
    assert steps == sorted(model_store["train_steps"])
    page.locator("#executions th").nth(steps_column).click()  # descending
    steps = [int(t) for t in page.locator(f"#executions td:nth-child({steps_column + 1})").all_inner_texts()]
    assert steps == sorted(model_store["train_steps"], reverse=True)
    _shot(page, "trainer_runs")


@pytest.mark.slow
@needs_chromium
def test_a_model_its_metrics_lineage_statistics_and_the_compare_view(ui_server, page, model_store):
    store = queries.open_store(model_store["store"])
    model_a, model_b = model_store["a"]["model"], model_store["b"]["model"]
    outcome = queries.model_outcome(store, model_a)
    page.goto(f"{ui_server}/models/{model_a}")
    assert page.locator("#blessed").inner_text() == ("yes" if outcome["blessed"] else "no")
    overall = queries.model_metrics(store, model_a)
    overall = overall[overall["slice"] == queries.OVERALL].iloc[0]
    headers = page.locator("#overall th").all_inner_texts()
    cells = page.locator("#overall td").all_inner_texts()
    shown = dict(zip(headers, cells, strict=True))
    assert float(shown["auc"]) == pytest.approx(float(overall["auc"]), abs=1e-4)
    assert int(shown["example_count"]) == int(overall["example_count"])
    sliced = queries.model_metrics(store, model_a, "trip_start_hour")
    assert page.locator("#sliced tbody tr").count() == len(sliced)
    assert page.locator(".plot svg.chart").count() >= 3  # a bar chart per metric
    _shot(page, "model")

    # TensorBoard on the model's training logs, started by the UI: the button lands on its page.
    page.click("#tensorboard")
    page.wait_for_function("document.title.includes('TensorBoard')", timeout=120_000)
    assert page.url.startswith("http://127.0.0.1:") and not page.url.startswith(ui_server)
    page.go_back()
    page.goto(f"{ui_server}/models/{model_a}")

    # Compare with model B: the configuration and code differences of the diff.
    page.select_option("#compare-with", str(model_b))
    page.click("#compare")
    page.wait_for_selector("text=Configuration")
    text = page.locator("main").inner_text()
    assert "train_steps" in text and "hidden_units" in text
    _shot(page, "compare")

    # The training statistics' lineage: fewer boxes with fewer hops.
    page.goto(f"{ui_server}/artifacts/{model_store['a']['statistics']}?hops=1")
    near = page.locator(".lineage svg g.node").count()
    page.fill("input[name=hops]", "4")
    page.click("form.inline button")
    page.wait_for_url("**hops=4**")
    assert page.locator(".lineage svg g.node").count() > near
    _shot(page, "lineage")

    # Statistics: TFDV's numbers and a chart per feature, run B's data overlaid on run A's.
    page.click("#statistics-link")
    page.wait_for_selector(".features")
    stats = queries.read_statistics(queries.get_artifact(store, model_store["a"]["statistics"]))
    train = stats["train"].datasets[0]
    assert page.locator(".features .numbers").count() == len(train.features)
    stats_a, stats_b = model_store["a"]["statistics"], model_store["b"]["statistics"]
    page.select_option("select[name=compare_split]", "eval")  # train vs eval of the same data
    page.click("form.inline button")
    page.wait_for_url("**compare_split=eval**")
    series = set(page.locator("svg.histogram rect.bucket").evaluate_all("els => els.map(e => e.dataset.series)"))
    assert series == {f"#{stats_a} train", f"#{stats_a} eval"}
    _shot(page, "statistics_train_eval")
    page.select_option("select[name=compare_split]", "")
    page.select_option("select[name=compare]", str(stats_b))  # model A's data vs model B's
    page.click("form.inline button")
    page.wait_for_url(f"**compare={stats_b}**")
    series = set(page.locator("svg.histogram rect.bucket").evaluate_all("els => els.map(e => e.dataset.series)"))
    assert series == {f"#{stats_a} train", f"#{stats_b} train"}
    _shot(page, "statistics_overlay")


def test_bad_requests_get_a_clear_page_and_a_4xx(model_store, tmp_path):
    client = TestClient(create_app(model_store["store"]), raise_server_exceptions=True)
    unknown = client.get("/executions/999999")
    assert unknown.status_code == 404 and "no execution 999999" in unknown.text
    assert client.get("/artifacts/abc").status_code == 400
    assert client.get("/artifacts/999999").status_code == 404
    assert client.get(f"/artifacts/{model_store['a']['model']}/statistics").status_code == 404  # not statistics
    assert client.get("/types/NoSuchComponent").status_code == 404
    assert client.get("/runs/chicago_taxi/no-such-run").status_code == 404
    assert client.get(f"/artifacts/{model_store['a']['statistics']}?hops=99").status_code == 400
    assert client.get("/models/1").status_code == 404  # an Examples artifact, not a model
    no_slice = client.get(f"/models/{model_store['a']['model']}?slice=nope")
    assert no_slice.status_code == 404 and "no slices by &#39;nope&#39;" in no_slice.text
    missing = TestClient(create_app(str(tmp_path / "nothing.sqlite"))).get("/")
    assert missing.status_code == 404 and "no ML Metadata store at" in missing.text
    assert not (tmp_path / "nothing.sqlite").exists()  # read only: nothing was created
    cli = subprocess.run(
        [sys.executable, "-m", "beam_pipeline", "ui", "--pipeline-root", str(tmp_path / "none"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 1 and "no ML Metadata store at" in cli.stderr
