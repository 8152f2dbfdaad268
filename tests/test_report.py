"""The static run report and model pages, rendered by headless Chromium the way a person opens them."""

from __future__ import annotations

import os
import shutil
import subprocess
import xml.etree.ElementTree as ET

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import pytest
from click.testing import CliRunner

from beam_pipeline import graph_drawing, lineage, queries, report
from beam_pipeline.cli import main
from beam_pipeline.errors import MetadataError
from tests import _fixtures_metadata as fm
from tests.helpers import needs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = needs(CHROMIUM, "chromium not installed (apt-get install chromium)")
SVG = "{http://www.w3.org/2000/svg}"
SECTIONS = ("pipeline", "statistics", "schema", "anomalies", "evaluation", "blessing", "push")


def chromium(page: str, tmp_path, *, screenshot: str | None = None) -> str:
    """The DOM Chromium built from `page` (a file on disk, opened with no server and no network)."""
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,2200",
    ]  # fmt: skip
    args.append(f"--screenshot={screenshot}" if screenshot else "--dump-dom")
    done = subprocess.run([*args, f"file://{os.path.abspath(page)}"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def channels(executions) -> set[tuple[str, str, str]]:
    """(producer, consumer, input name) for every input a component read from another one in the run."""
    produced_by = {aid: row.component_id for row in executions.itertuples() for aid in row.outputs.values()}
    return {
        (produced_by[aid], row.component_id, name)
        for row in executions.itertuples()
        for name, ids in row.inputs.items()
        for aid in ids
        if aid in produced_by
    }


def dag_of(page: str) -> ET.Element:
    """The run report's DAG: the one `<svg>` in the pipeline section, parsed as XML."""
    section = page.split('id="pipeline"')[1].split('id="statistics"')[0]
    assert section.count("<svg") == 1, section[:2000]
    return ET.fromstring(section[section.index("<svg") : section.index("</svg>") + len("</svg>")])


@pytest.mark.slow
def test_run_report_draws_one_box_per_component_and_one_edge_per_channel_without_graphviz(model_store, tmp_path):
    run_a = model_store["runs"][0]
    executions = queries.run_executions(model_store["store"], model_store["pipeline"], run_a)
    path = report.write_run_report(model_store["store"], model_store["pipeline"], run_a, str(tmp_path / "report"))
    svg = dag_of(open(path, encoding="utf-8").read())
    nodes = svg.findall(f".//{SVG}g[@class='node']")
    assert sorted(n.get("data-node") for n in nodes) == sorted(executions["component_id"])
    for node, row in zip(nodes, executions.itertuples(), strict=True):
        texts = [t.text for t in node.iter(f"{SVG}text")]
        assert texts[0] == row.component_id and row.state in texts[-1]
        assert node.find(f"{SVG}rect").get("fill") == lineage.STATE_COLORS[row.state]
    edges = {(e.get("data-source"), e.get("data-target"), e.find(f"{SVG}text").text)
             for e in svg.findall(f".//{SVG}g[@class='edge']")}  # fmt: skip
    assert len(svg.findall(f".//{SVG}g[@class='edge']")) == len(edges) == len(channels(executions))
    assert edges == channels(executions)
    assert ("Trainer", "Evaluator", "model") in edges and ("Evaluator", "Pusher", "blessing") in edges
    boxes = [tuple(float(n.find(f"{SVG}rect").get(k)) for k in ("x", "y", "width", "height")) for n in nodes]
    for i, (x1, y1, w1, h1) in enumerate(boxes):
        for x2, y2, w2, h2 in boxes[i + 1 :]:
            assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1, "overlapping boxes"
    assert "graphviz" not in open(path, encoding="utf-8").read()


@needs_chromium
@pytest.mark.slow
def test_full_run_report_shows_every_section(model_store, tmp_path):
    run_a = model_store["runs"][0]
    path = report.write_run_report(model_store["store"], model_store["pipeline"], run_a, str(tmp_path / "report"))
    assert path == str(tmp_path / "report" / "index.html")
    dom = chromium(path, tmp_path)
    for section in SECTIONS:
        assert f'id="{section}"' in dom
    assert "<svg" in dom  # the DAG, inline
    for component in ("ExampleGen", "StatisticsGen", "SchemaGen", "ExampleValidator", "Trainer", "Evaluator", "Pusher"):
        assert component in dom
    assert "COMPLETE" in dom and "not in this run" not in dom
    assert "Split train" in dom and "Split eval" in dom and "trip_start_hour" in dom
    assert "payment_type" in dom  # schema table
    assert "Sliced by trip_start_hour" in dom and "data:image/png;base64," in dom
    assert "BLESSED" in dom and "PUSHED" in dom
    assert os.path.join(os.path.dirname(model_store["root"]), "serving") in dom
    for remote in ('src="http', "src='http", '<link href="http', "url(http", "<script"):
        assert remote not in dom  # nothing fetched from a network: the page works from disk alone
    # The one outside link: this run's page in `beam-pipeline ui` on its default port (a link, not a fetch).
    assert f'href="http://127.0.0.1:8080/runs/{model_store["pipeline"]}/{run_a}"' in dom
    dag = dag_of(dom)  # Chromium's DOM holds the drawing itself, every component a box
    assert {n.get("data-node") for n in dag.findall(f".//{SVG}g[@class='node']")} >= {"ExampleGen", "Pusher"}
    shot = str(tmp_path / "report.png")
    chromium(path, tmp_path, screenshot=shot)
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert_dag_painted(shot, model_store, run_a)


def assert_dag_painted(shot: str, model_store: dict, run_id: str) -> None:
    """The screenshot shows the boxes: most of their area in the COMPLETE green, spread across the page."""
    from PIL import Image

    executions = queries.run_executions(model_store["store"], model_store["pipeline"], run_id)
    placed = graph_drawing.layout(*report.dag_drawing(executions))
    complete = [placed.boxes[c] for c, s in zip(executions["component_id"], executions["state"], strict=True)
                if s == "COMPLETE"]  # fmt: skip
    green = tuple(int(lineage.STATE_COLORS["COMPLETE"][i : i + 2], 16) for i in (1, 3, 5))
    image = Image.open(shot).convert("RGB")
    scale = min(1.0, image.width * 0.9 / placed.width)  # the page may shrink a wide drawing to fit
    xs = [x for x in range(image.width) for y in range(0, image.height, 4) if image.getpixel((x, y)) == green]
    drawn = len(xs) * 4  # every 4th row sampled
    assert drawn >= 0.5 * scale**2 * sum(b.w * b.h for b in complete), (drawn, len(complete))
    assert max(xs) - min(xs) >= 0.5 * scale * placed.width  # the boxes spread across, not a badge alone


@needs_chromium
@pytest.mark.slow
def test_cached_data_only_run_says_what_is_not_in_it(model_store, tmp_path):
    cached_run = model_store["runs"][2]
    out = CliRunner().invoke(
        main,
        ["report", cached_run, "--pipeline", model_store["pipeline"], "--out", str(tmp_path / "r"),
         "--metadata-uri", model_store["store"]],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    dom = chromium(out.output.strip(), tmp_path)
    components = dom.split('id="pipeline"')[1].split('id="statistics"')[0]
    assert "CACHED" in components and "COMPLETE" not in components
    for absent in ("Evaluation: not in this run", "Blessing: not in this run", "Push: not in this run"):
        assert absent in dom
    assert "Split train" in dom  # the cached statistics still show


@needs_chromium
@pytest.mark.slow
def test_model_pages_render_stats_side_by_side_and_sliced_metrics(model_store, tmp_path):
    a, b = model_store["a"]["model"], model_store["b"]["model"]
    runner = CliRunner()
    stats = runner.invoke(main, ["model-stats", str(a), str(b), "--out", str(tmp_path / "stats.html"),
                                 "--pipeline-root", model_store["root"]])  # fmt: skip
    assert stats.exit_code == 0, stats.output
    dom = chromium(stats.output.strip(), tmp_path)
    assert f"Training data of models {a} (lhs) vs {b} (rhs)" in dom
    assert 'id="split-train"' in dom and 'id="split-eval"' in dom
    assert "lhs mean" in dom and "rhs mean" in dom and "L-inf" in dom
    one = report.write_model_stats_html(model_store["store"], [a], str(tmp_path / "one.html"))
    assert "fare" in chromium(one, tmp_path)

    metrics = runner.invoke(main, ["model-metrics", str(a), "--slice", "trip_start_hour", "--out",
                                   str(tmp_path / "m.html"), "--pipeline-root", model_store["root"]])  # fmt: skip
    assert metrics.exit_code == 0, metrics.output
    dom = chromium(metrics.output.strip().splitlines()[-1], tmp_path)
    assert "Sliced by trip_start_hour" in dom and "trip_start_hour=23" in dom and "data:image/png;base64," in dom
    assert "blessed" in dom


def test_failed_run_report_names_the_failure_and_what_never_ran(tmp_path):
    """A store written through the API alone (no Beam): one component completed, the next one failed."""
    from ml_metadata.proto import metadata_store_pb2 as mlmd_pb2

    from beam_pipeline.artifacts import EXAMPLES, Artifact
    from beam_pipeline.metadata import MetadataStore

    store = MetadataStore(str(tmp_path / "metadata.sqlite"))
    contexts = store.run_contexts("p", "r1")
    gen = store.start_execution(
        "ExampleGen", "ExampleGen", pipeline_name="p", run_id="r1", config={"splits": {"train": 1}}, cache_key="",
        contexts=contexts,
    )  # fmt: skip
    examples = Artifact(EXAMPLES, str(tmp_path / "examples"), {"split_names": ["train"], "row_counts": {"train": 3}})
    store.finish_execution(gen, state=mlmd_pb2.Execution.COMPLETE, inputs={}, outputs={"examples": examples},
                           contexts=contexts)  # fmt: skip
    stats = store.start_execution("StatisticsGen", "StatisticsGen", pipeline_name="p", run_id="r1", config={},
                                  cache_key="", contexts=contexts)  # fmt: skip
    store.finish_execution(stats, state=mlmd_pb2.Execution.FAILED, inputs={}, outputs={}, contexts=contexts,
                           error="InputDataError: column 'fare' is not a number")  # fmt: skip
    path = report.write_run_report(store, "p", "r1", str(tmp_path / "report"))
    html = open(path).read()
    assert 'class="state state-FAILED">FAILED' in html
    assert "column &#39;fare&#39; is not a number" in html
    assert "examples #" in html
    for absent in ("Statistics", "Schema", "Anomalies", "Evaluation", "Blessing", "Push"):
        assert f"{absent}: not in this run." in html
    with pytest.raises(MetadataError, match="no run 'r2' of pipeline 'p'"):
        report.write_run_report(store, "p", "r2", str(tmp_path / "other"))


@needs_chromium
@pytest.mark.slow
def test_real_model_half_is_found_through_lineage_and_reported(tmp_path):
    """Real Transform, Trainer, Evaluator, Pusher: stats reach the model through Transform, metrics are sliced."""
    from beam_pipeline import Pipeline, launcher, queries
    from transforms.evaluator import Evaluator, binary_classification_eval_config
    from transforms.pusher import Pusher
    from transforms.trainer import Trainer
    from transforms.transform import Transform

    module = os.path.join(fm.ROOT, "examples", "chicago_taxi", "taxi_utils.py")
    base = fm.taxi_pipeline(str(tmp_path / "root"), fm.sample_csv(str(tmp_path / "data.csv"), rows=1500))
    gen, _, schema_gen, _ = base.components
    transform = Transform(examples=gen.outputs.examples, schema=schema_gen.outputs.schema, module_file=module)
    trainer = Trainer(
        examples=transform.outputs.transformed_examples,
        transform_graph=transform.outputs.transform_graph,
        schema=schema_gen.outputs.schema,
        module_file=module,
        train_steps=20,
        eval_steps=5,
    )
    evaluator = Evaluator(
        examples=gen.outputs.examples,
        model=trainer.outputs.model,
        eval_config=binary_classification_eval_config("tips_xf", slice_features=["trip_start_hour"]),
    )
    pusher = Pusher(model=trainer.outputs.model, blessing=evaluator.outputs.blessing,
                    serving_model_dir=str(tmp_path / "serving"))  # fmt: skip
    pipeline = Pipeline("taxi_full", str(tmp_path / "root"), [*base.components, transform, trainer, evaluator, pusher])
    result = launcher.run(pipeline, ["--direct_num_workers=1"])
    model = result.artifact("Trainer", "model")

    data = queries.training_data(result.metadata_uri, model.id)
    assert data.examples.id == result.artifact("ExampleGen", "examples").id  # raw data, reached through Transform
    assert data.statistics.id == result.artifact("StatisticsGen", "statistics").id
    metrics = queries.model_metrics(result.metadata_uri, model.id, "trip_start_hour")
    assert {"auc", "binary_accuracy", "example_count"} <= set(metrics.columns) and len(metrics) > 10
    assert os.path.isdir(queries.model_run(result.metadata_uri, model.id).uri)
    assert queries.model_outcome(result.metadata_uri, model.id)["blessed"] is not None

    path = report.write_run_report(result.metadata_uri, "taxi_full", result.run_id, str(tmp_path / "report"))
    dom = chromium(path, tmp_path)
    assert "not in this run" not in dom
    for text in ("Transform", "Trainer", "Sliced by trip_start_hour", "ModelBlessing #", "PushedModel #"):
        assert text in dom
