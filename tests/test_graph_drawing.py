"""The layered drawing behind the run report's DAG and `beam-pipeline lineage --out`: no graphviz anywhere."""

from __future__ import annotations

import io
import random
import xml.etree.ElementTree as ET

import pytest

from beam_pipeline import graph_drawing as gd
from beam_pipeline import lineage

SVG = "{http://www.w3.org/2000/svg}"
TAXI = {  # consumer: [(producer, input name)], the example pipeline's channels
    "StatisticsGen": [("ExampleGen", "examples")],
    "SchemaGen": [("StatisticsGen", "statistics")],
    "ExampleValidator": [("StatisticsGen", "statistics"), ("SchemaGen", "schema")],
    "Transform": [("ExampleGen", "examples"), ("SchemaGen", "schema")],
    "Trainer": [("Transform", "transformed_examples"), ("Transform", "transform_graph"), ("SchemaGen", "schema")],
    "Evaluator": [("ExampleGen", "examples"), ("Trainer", "model")],
    "Pusher": [("Trainer", "model"), ("Evaluator", "blessing")],
}


def taxi_graph() -> tuple[list[gd.Node], list[gd.Edge]]:
    names = ["ExampleGen", *TAXI]
    nodes = [gd.Node(n, n, ("COMPLETE · 1.0s",), fill="#c8e6c9") for n in names]
    edges = [gd.Edge(p, c, label) for c, inputs in TAXI.items() for p, label in inputs]
    return nodes, edges


def random_dag(seed: int, size: int) -> tuple[list[gd.Node], list[gd.Edge]]:
    rng = random.Random(seed)
    nodes = [gd.Node(f"n{i}", f"node {i}" + "x" * rng.randrange(12), ("line",) * rng.randrange(3)) for i in range(size)]
    edges = [gd.Edge(f"n{i}", f"n{j}", rng.choice(["", "in", "a longer label"]))
             for j in range(size) for i in range(j) if rng.random() < 0.25]  # fmt: skip
    rng.shuffle(nodes)
    return nodes, edges


def overlapping(boxes: list[gd.Box]) -> list[tuple[gd.Box, gd.Box]]:
    return [
        (a, b)
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
        if not (a.x + a.w <= b.x or b.x + b.w <= a.x or a.y + a.h <= b.y or b.y + b.h <= a.y)
    ]


def parsed(svg_text: str) -> tuple[ET.Element, list[ET.Element], list[ET.Element]]:
    root = ET.fromstring(svg_text)
    return root, root.findall(f".//{SVG}g[@class='node']"), root.findall(f".//{SVG}g[@class='edge']")


def rect_of(node: ET.Element) -> gd.Box:
    rect = node.find(f"{SVG}rect")
    return gd.Box(*(float(rect.get(k)) for k in ("x", "y", "width", "height")))


def test_taxi_dag_svg_has_one_box_per_component_one_arrow_per_channel_and_flows_left_to_right():
    nodes, edges = taxi_graph()
    root, drawn_nodes, drawn_edges = parsed(gd.svg(nodes, edges, title="taxi"))
    assert root.tag == f"{SVG}svg" and root.get("aria-label") == "taxi"
    assert [n.get("data-node") for n in drawn_nodes] == [n.key for n in nodes]
    assert [(e.get("data-source"), e.get("data-target")) for e in drawn_edges] == [(e.source, e.target) for e in edges]
    for node, drawn in zip(nodes, drawn_nodes, strict=True):
        assert [t.text for t in drawn.iter(f"{SVG}text")] == [node.title, *node.lines]
    boxes = {n.get("data-node"): rect_of(n) for n in drawn_nodes}
    assert overlapping(list(boxes.values())) == []
    width, height = float(root.get("width")), float(root.get("height"))
    for box in boxes.values():
        assert 0 <= box.x and box.x + box.w <= width and 0 <= box.y and box.y + box.h <= height
    for edge, drawn in zip(edges, drawn_edges, strict=True):
        assert boxes[edge.source].x + boxes[edge.source].w < boxes[edge.target].x  # producers left of consumers
        line, head = drawn.findall(f"{SVG}path")
        start = line.get("d").split()[0]
        x, y = (float(v) for v in start[1:].split(","))
        source = boxes[edge.source]
        assert x == pytest.approx(source.x + source.w, abs=0.2) and source.y < y < source.y + source.h
        tip = [float(v) for v in head.get("d")[1:].split()[0].split(",")]  # the arrowhead touches the target
        target = boxes[edge.target]
        assert tip[0] == pytest.approx(target.x, abs=0.2) and target.y < tip[1] < target.y + target.h
        assert drawn.find(f"{SVG}text").text == edge.label
    assert "<script" not in gd.svg(nodes, edges) and "href" not in gd.svg(nodes, edges)


def test_three_inputs_from_two_producers_enter_at_distinct_points():
    nodes, edges = taxi_graph()
    placed = gd.layout(nodes, edges)
    into_trainer = [route[-1] for edge, route in placed.routes if edge.target == "Trainer"]
    assert len(into_trainer) == 3 and len(set(into_trainer)) == 3


@pytest.mark.parametrize("seed", range(12))
def test_random_dags_never_overlap_and_are_drawn_the_same_every_time(seed):
    nodes, edges = random_dag(seed, size=4 + seed * 2)
    placed = gd.layout(nodes, edges)
    assert set(placed.boxes) == {n.key for n in nodes}
    assert overlapping(list(placed.boxes.values())) == []
    for edge, route in placed.routes:
        assert placed.boxes[edge.source].x < placed.boxes[edge.target].x
        for x, y in route:
            assert 0 <= x <= placed.width and 0 <= y <= placed.height
            inside = [k for k, b in placed.boxes.items() if b.x < x < b.x + b.w and b.y < y < b.y + b.h]
            assert inside == [], f"edge {edge} passes through {inside}"
    assert gd.svg(nodes, edges) == gd.svg(nodes, edges)
    assert len(parsed(gd.svg(nodes, edges))[2]) == len(edges)


def test_a_cycle_is_still_drawn_with_every_edge_and_an_unknown_node_is_an_error():
    nodes = [gd.Node(k, k) for k in "abc"]
    placed = gd.layout(nodes, [gd.Edge("a", "b"), gd.Edge("b", "c"), gd.Edge("c", "a")])
    assert len(placed.routes) == 3 and overlapping(list(placed.boxes.values())) == []
    with pytest.raises(ValueError, match="graph edge 'a' -> 'z': no node 'z'"):
        gd.layout(nodes, [gd.Edge("a", "z")])
    with pytest.raises(ValueError, match="node 'a' is given twice"):
        gd.layout([*nodes, gd.Node("a", "again")], [])


def test_text_fits_its_box_in_the_font_the_png_uses():
    """Boxes are sized by the text measured in DejaVu Sans (matplotlib's and CI's font): the glyphs fit."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath

    for text in ("ExampleValidator", "transformed_examples", "ModelEvaluation #12", "WWWWMMMM", "iiiilll"):
        for size, weight in ((gd.TITLE_SIZE, "bold"), (gd.LINE_SIZE, "normal")):
            drawn = TextPath((0, 0), text, size=size, prop=FontProperties(family="DejaVu Sans", weight=weight))
            assert drawn.get_extents().width <= gd.text_width(text, size, bold=weight == "bold"), (text, weight)


def test_png_shows_the_boxes_in_their_colours():
    from PIL import Image

    nodes, edges = taxi_graph()
    nodes[3] = gd.Node(nodes[3].key, nodes[3].title, nodes[3].lines, fill="#ffcdd2")  # one FAILED
    data = gd.png(nodes, edges, scale=1.0)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    placed = gd.layout(nodes, edges)
    assert image.size == (round(placed.width), round(placed.height))
    for node in nodes:
        box = placed.boxes[node.key]
        colour = tuple(int(node.fill[i : i + 2], 16) for i in (1, 3, 5))
        # a point inside the box, below its text lines: the fill colour, give or take antialiasing
        pixel = image.getpixel((int(box.x + 4), int(box.y + box.h - 4)))
        assert all(abs(a - b) <= 6 for a, b in zip(pixel, colour, strict=True)), (node.key, pixel, colour)
    assert data == gd.png(nodes, edges, scale=1.0)


@pytest.mark.slow
def test_real_lineage_draws_artifacts_and_executions(model_store, tmp_path):
    graph = lineage.lineage(model_store["store"], model_store["a"]["model"], num_hops=4, direction="both")
    _, drawn_nodes, drawn_edges = parsed(graph.svg())
    assert sorted(n.get("data-node") for n in drawn_nodes) == sorted(n["node"] for n in graph.nodes)
    assert sorted((e.get("data-source"), e.get("data-target")) for e in drawn_edges) == sorted(
        (e["source"], e["target"]) for e in graph.edges
    )
    assert overlapping([rect_of(n) for n in drawn_nodes]) == []
    by_key = {n.get("data-node"): n for n in drawn_nodes}
    model = by_key[f"artifact:{model_store['a']['model']}"]
    assert model.find(f"{SVG}rect").get("fill") == lineage.ROOT_COLOR  # the artifact asked about stands out
    trainer = by_key[f"execution:{model_store['a']['trainer_execution']}"]
    assert trainer.find(f"{SVG}rect").get("fill") == lineage.STATE_COLORS["COMPLETE"]
    assert graph.render(str(tmp_path / "g.svg")) == str(tmp_path / "g.svg")
    assert open(tmp_path / "g.svg", encoding="utf-8").read() == graph.svg()
    with open(graph.render(str(tmp_path / "g.png")), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
