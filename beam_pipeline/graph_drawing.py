"""Small directed graphs (a run's DAG, a lineage) laid out in layers and drawn as SVG or PNG, no graphviz.

The layout is the classic layered one, computed here in plain Python and fully deterministic (ties
always break by the order nodes and edges were given): layers by longest path, long edges split at
every layer they cross, barycentre sweeps against crossings, then per layer the vertical positions
closest to the neighbours' that keep every box apart. Data flows left to right.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import io
import itertools
from collections.abc import Sequence
from xml.sax.saxutils import escape, quoteattr

TITLE_SIZE = 12.0
LINE_SIZE = 11.0
LABEL_SIZE = 10.0
LINE_HEIGHT = 15.0
PAD_X, PAD_Y = 10.0, 7.0
NODE_GAP = 18.0  # vertical space between two boxes of a layer
MIN_LAYER_GAP = 56.0
MARGIN = 12.0
PORT_GAP = 13.0
ARROW = 9.0
EDGE_COLOR = "#607d8b"
STROKE = "#546e7a"
BACKGROUND = "#ffffff"
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
_SWEEPS = 12


@dataclasses.dataclass(frozen=True)
class Node:
    """One box: a bold title, smaller lines under it, a fill colour; `note` draws an artifact's folded corner."""

    key: str
    title: str
    lines: tuple[str, ...] = ()
    fill: str = "#eeeeee"
    note: bool = False
    emphasis: bool = False
    tooltip: str = ""
    href: str = ""  # the box links there (a web view's page of that execution or artifact)


@dataclasses.dataclass(frozen=True)
class Edge:
    source: str
    target: str
    label: str = ""


@dataclasses.dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float


@dataclasses.dataclass
class Layout:
    """Boxes by node key (top-left corner, size) and per edge its waypoints, source port to target port."""

    width: float
    height: float
    boxes: dict[str, Box]
    routes: list[tuple[Edge, list[tuple[float, float]]]]


@functools.cache
def text_width(text: str, size: float, bold: bool = False) -> float:
    """`text`'s width at font `size` (px) in DejaVu Sans, which matplotlib ships (so the PNG uses it) and
    CI installs for Chromium; the fallbacks (Helvetica, Arial) are narrower, so a box sized by it fits."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    prop = FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal", size=size)
    width, _, _ = TextToPath().get_text_width_height_descent(text, prop, ismath=False)
    return width * 1.03


def _box_size(node: Node) -> tuple[float, float]:
    width = max([text_width(node.title, TITLE_SIZE, bold=True)] + [text_width(line, LINE_SIZE) for line in node.lines])
    return width + 2 * PAD_X + (8.0 if node.note else 0.0), (1 + len(node.lines)) * LINE_HEIGHT + 2 * PAD_Y


def _check(nodes: Sequence[Node], edges: Sequence[Edge]) -> None:
    keys: set[str] = set()
    for node in nodes:
        if node.key in keys:
            raise ValueError(f"graph node {node.key!r} is given twice")
        keys.add(node.key)
    for edge in edges:
        for end in (edge.source, edge.target):
            if end not in keys:
                raise ValueError(f"graph edge {edge.source!r} -> {edge.target!r}: no node {end!r}")
        if edge.source == edge.target:
            raise ValueError(f"graph edge {edge.source!r} -> {edge.target!r} is a loop")


def _acyclic(keys: list[str], edges: Sequence[Edge]) -> list[tuple[str, str]]:
    """The edges as (from, to) for layering, with those closing a cycle reversed (found by DFS in order)."""
    out: dict[str, list[str]] = {k: [] for k in keys}
    for e in edges:
        out[e.source].append(e.target)
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    back: set[tuple[str, str]] = set()
    for root in keys:
        if root in state:
            continue
        stack = [(root, iter(out[root]))]
        state[root] = 1
        while stack:
            node, successors = stack[-1]
            nxt = next(successors, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                back.add((node, nxt))
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(out[nxt])))
    return [(e.target, e.source) if (e.source, e.target) in back else (e.source, e.target) for e in edges]


def _layers(keys: list[str], pairs: list[tuple[str, str]]) -> dict[str, int]:
    """Longest-path layers; a node nothing feeds sits just before its first consumer, not at the far left."""
    index = {k: i for i, k in enumerate(keys)}
    preds: dict[str, list[str]] = {k: [] for k in keys}
    succs: dict[str, list[str]] = {k: [] for k in keys}
    for s, t in pairs:
        preds[t].append(s)
        succs[s].append(t)
    waiting = {k: len(preds[k]) for k in keys}
    ready = [(index[k], k) for k in keys if waiting[k] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, k = heapq.heappop(ready)
        order.append(k)
        for t in succs[k]:
            waiting[t] -= 1
            if waiting[t] == 0:
                heapq.heappush(ready, (index[t], t))
    layer: dict[str, int] = {}
    for k in order:
        layer[k] = max((layer[p] + 1 for p in preds[k]), default=0)
    for k in reversed(order):
        if not preds[k] and succs[k]:
            layer[k] = min(layer[t] for t in succs[k]) - 1
    low = min(layer.values(), default=0)
    return {k: v - low for k, v in layer.items()}


def _crossings(upper: list[str], lower: list[str], segments: list[tuple[str, str]]) -> int:
    pos_u = {k: i for i, k in enumerate(upper)}
    pos_l = {k: i for i, k in enumerate(lower)}
    between = [(pos_u[a], pos_l[b]) for a, b in segments if a in pos_u and b in pos_l]
    return sum(1 for i, (a1, b1) in enumerate(between) for a2, b2 in between[i + 1 :] if (a1 - a2) * (b1 - b2) < 0)


def _order(rows: list[list[str]], segments: list[tuple[str, str]]) -> list[list[str]]:
    """Reorder each layer by the mean position of its neighbours, sweeping both ways; keep the best seen."""
    preds: dict[str, list[str]] = {}
    succs: dict[str, list[str]] = {}
    for a, b in segments:
        succs.setdefault(a, []).append(b)
        preds.setdefault(b, []).append(a)

    def total(candidate: list[list[str]]) -> int:
        return sum(_crossings(candidate[i], candidate[i + 1], segments) for i in range(len(candidate) - 1))

    best, best_count = [list(r) for r in rows], total(rows)
    current = [list(r) for r in rows]
    for sweep in range(_SWEEPS):
        down = sweep % 2 == 0
        indices = range(1, len(current)) if down else range(len(current) - 2, -1, -1)
        for i in indices:
            neighbour_row = current[i - 1] if down else current[i + 1]
            position = {k: p for p, k in enumerate(neighbour_row)}
            links = preds if down else succs
            keyed = []
            for p, k in enumerate(current[i]):
                found = [position[n] for n in links.get(k, []) if n in position]
                keyed.append((sum(found) / len(found) if found else float(p), p, k))
            current[i] = [k for _, _, k in sorted(keyed)]
        count = total(current)
        if count < best_count:
            best, best_count = [list(r) for r in current], count
        if best_count == 0:
            break
    return best


def _isotonic(targets: list[float], offsets: list[float]) -> list[float]:
    """Positions y_i closest (least squares) to `targets` with y_{i+1} - y_i >= the gap the offsets encode."""
    blocks: list[list[float]] = []  # [mean, weight]
    for target, offset in zip(targets, offsets, strict=True):
        blocks.append([target - offset, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, weight = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * weight) / (blocks[-1][1] + weight),
                          blocks[-1][1] + weight]  # fmt: skip
    flat = [mean for mean, weight in blocks for _ in range(int(weight))]
    return [z + offset for z, offset in zip(flat, offsets, strict=True)]


def layout(nodes: Sequence[Node], edges: Sequence[Edge]) -> Layout:
    """Place every node and route every edge; raises ValueError for an edge to an unknown node."""
    _check(nodes, edges)
    keys = [n.key for n in nodes]
    sizes = {n.key: _box_size(n) for n in nodes}
    ends: dict[tuple[str, str], int] = {}
    for e in edges:
        ends[(e.source, "out")] = ends.get((e.source, "out"), 0) + 1
        ends[(e.target, "in")] = ends.get((e.target, "in"), 0) + 1
    for (k, _), count in ends.items():  # room for every port on a side, a label above each
        sizes[k] = (sizes[k][0], max(sizes[k][1], (count + 1) * PORT_GAP))
    pairs = _acyclic(keys, edges)
    layer = _layers(keys, pairs)

    # Split every edge into one segment per layer gap, through a dummy point in each layer it crosses.
    chains: list[list[str]] = []
    for number, (edge, (a, b)) in enumerate(zip(edges, pairs, strict=True)):
        chain = [a] + [f"\0{number}:{i}" for i in range(layer[a] + 1, layer[b])] + [b]
        for i, dummy in enumerate(chain[1:-1], start=layer[a] + 1):
            layer[dummy] = i
            sizes[dummy] = (0.0, 8.0)
        chains.append(chain if (edge.source, edge.target) == (a, b) else chain[::-1])
    segments = [(c[i], c[i + 1]) if layer[c[i]] < layer[c[i + 1]] else (c[i + 1], c[i])
                for c in chains for i in range(len(c) - 1)]  # fmt: skip
    rows: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for k in keys + [d for c in chains for d in c[1:-1]]:
        rows[layer[k]].append(k)
    rows = _order(rows, segments)

    # x: one column per layer, as wide as its widest box; gaps wide enough for the labels drawn in them.
    label_room = [0.0] * len(rows)
    for edge, chain in zip(edges, chains, strict=True):
        if edge.label:
            gap = min(layer[chain[-2]], layer[chain[-1]])
            label_room[gap] = max(label_room[gap], text_width(edge.label, LABEL_SIZE) + 24.0)
    column_x, x = [], MARGIN
    for i, row in enumerate(rows):
        column_x.append(x)
        x += max(sizes[k][0] for k in row) + max(MIN_LAYER_GAP, label_room[i])
    column_w = [max(sizes[k][0] for k in row) for row in rows]

    # y: centres stacked top-down, then pulled toward their neighbours' centres, order and gaps kept.
    neighbours: dict[str, list[str]] = {}
    for a, b in segments:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    centre: dict[str, float] = {}
    offsets_of: list[list[float]] = []
    for row in rows:
        offsets, y = [], 0.0
        for j, k in enumerate(row):
            if j:
                y += sizes[row[j - 1]][1] / 2 + NODE_GAP + sizes[k][1] / 2
            offsets.append(y)
        offsets_of.append(offsets)
        for k, off in zip(row, offsets, strict=True):
            centre[k] = off
    for sweep in range(8):
        order = range(len(rows)) if sweep % 2 == 0 else range(len(rows) - 1, -1, -1)
        for i in order:
            targets = []
            for k in rows[i]:
                near = [centre[n] for n in neighbours.get(k, [])]
                targets.append(sum(near) / len(near) if near else centre[k])
            for k, y in zip(rows[i], _isotonic(targets, offsets_of[i]), strict=True):
                centre[k] = y
    top = min(centre[k] - sizes[k][1] / 2 for k in centre) if centre else 0.0
    boxes: dict[str, Box] = {}
    points: dict[str, tuple[float, float, float]] = {}  # dummy: column left, column right, y
    for i, row in enumerate(rows):
        for k in row:
            w, h = sizes[k]
            y = centre[k] - h / 2 - top + MARGIN
            if k.startswith("\0"):
                points[k] = (column_x[i], column_x[i] + column_w[i], y + h / 2)
            else:
                boxes[k] = Box(column_x[i] + (column_w[i] - w) / 2, y, w, h)
    width = max((b.x + b.w for b in boxes.values()), default=0.0) + MARGIN
    height = max((b.y + b.h for b in boxes.values()), default=0.0)
    height = max([height] + [p[2] + 4 for p in points.values()]) + MARGIN

    # Ports: a box's outgoing edges leave its right side spread by where they head, incoming enter the left.
    def toward(chain: list[str], i: int) -> float:
        k = chain[i]
        return points[k][2] if k in points else boxes[k].y + boxes[k].h / 2

    outgoing: dict[str, list[tuple[float, int]]] = {}
    incoming: dict[str, list[tuple[float, int]]] = {}
    for number, chain in enumerate(chains):
        first, last = chain[0], chain[-1]
        if layer[first] <= layer[last]:
            outgoing.setdefault(first, []).append((toward(chain, 1), number))
            incoming.setdefault(last, []).append((toward(chain, -2), number))
        else:  # drawn against the flow: it leaves the left side and enters the right one
            incoming.setdefault(first, []).append((toward(chain, 1), number))
            outgoing.setdefault(last, []).append((toward(chain, -2), number))
    port: dict[tuple[int, str], tuple[float, float]] = {}
    for side, table in (("out", outgoing), ("in", incoming)):
        for k, ends in table.items():
            box = boxes[k]
            x = box.x + box.w if side == "out" else box.x
            for rank, (_, number) in enumerate(sorted(ends)):
                port[(number, k)] = (x, box.y + box.h * (rank + 1) / (len(ends) + 1))
    routes = []
    for number, (edge, chain) in enumerate(zip(edges, chains, strict=True)):
        forward = layer[chain[0]] <= layer[chain[-1]]
        waypoints = [port[(number, chain[0])]]
        for k in chain[1:-1]:
            left, right, y = points[k]
            waypoints += [(left, y), (right, y)] if forward else [(right, y), (left, y)]
        waypoints.append(port[(number, chain[-1])])
        routes.append((edge, waypoints))
    return Layout(width, height, boxes, routes)


def _edge_path(waypoints: list[tuple[float, float]]) -> tuple[list[tuple[str, list[tuple[float, float]]]], tuple]:
    """Path commands (straight across a column, a horizontal-tangent curve across a gap) and the arrowhead."""
    *body, (tx, ty) = waypoints
    direction = 1.0 if tx >= body[-1][0] else -1.0
    end = (tx - direction * ARROW, ty)
    points = [*body, end]
    commands: list[tuple[str, list[tuple[float, float]]]] = [("M", [points[0]])]
    for (ax, ay), (bx, by) in itertools.pairwise(points):
        if ay == by:
            commands.append(("L", [(bx, by)]))
        else:
            dx = (bx - ax) / 2
            commands.append(("C", [(ax + dx, ay), (bx - dx, by), (bx, by)]))
    head = ((tx, ty), (end[0], ty - ARROW / 2), (end[0], ty + ARROW / 2))
    return commands, head


def _label_at(waypoints: list[tuple[float, float]]) -> tuple[float, float, str]:
    """Just above the arrowhead, next to the input it names: x, baseline y and the SVG text-anchor."""
    (ax, _), (bx, by) = waypoints[-2], waypoints[-1]
    if bx >= ax:
        return bx - ARROW - 3, by - 3, "end"
    return bx + ARROW + 3, by - 3, "start"


def _text_top(box: Box, node: Node) -> float:
    """Where the text block starts: centred in a box that may be taller than its text."""
    return box.y + (box.h - (1 + len(node.lines)) * LINE_HEIGHT) / 2


def _fold(box: Box) -> list[tuple[list[tuple[float, float]], str, str]]:
    """Polygons with fill and stroke colours: the background over the corner, then the folded-down flap."""
    fx, fy = box.x + box.w, box.y
    cut = [(fx - 8, fy - 1.5), (fx + 1.5, fy - 1.5), (fx + 1.5, fy + 8)]
    return [(cut, BACKGROUND, "none"), ([(fx - 8, fy), (fx, fy + 8), (fx - 8, fy + 8)], "#cfd8dc", STROKE)]


def _f(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def svg(nodes: Sequence[Node], edges: Sequence[Edge], title: str = "") -> str:
    """The graph as a standalone `<svg>` element (no scripts, no external references)."""
    placed = layout(nodes, edges)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{_f(placed.width)}" '
        f'height="{_f(placed.height)}" viewBox="0 0 {_f(placed.width)} {_f(placed.height)}" role="img" '
        f"aria-label={quoteattr(title)} font-family={quoteattr(FONT)}>",
    ]
    if title:
        out.append(f"<title>{escape(title)}</title>")
    out.append(f'<rect class="background" width="100%" height="100%" fill="{BACKGROUND}"/>')
    out.append('<g class="edges">')
    for edge, waypoints in placed.routes:
        commands, head = _edge_path(waypoints)
        d = " ".join(c + " ".join(f"{_f(x)},{_f(y)}" for x, y in pts) for c, pts in commands)
        out.append(f'<g class="edge" data-source={quoteattr(edge.source)} data-target={quoteattr(edge.target)}>')
        out.append(
            f"<title>{escape(f'{edge.source} → {edge.target}' + (f': {edge.label}' if edge.label else ''))}</title>"
        )
        out.append(f'<path d="{d}" fill="none" stroke="{EDGE_COLOR}" stroke-width="1.3"/>')
        out.append(f'<path d="M{" L".join(f"{_f(x)},{_f(y)}" for x, y in head)} Z" fill="{EDGE_COLOR}"/>')
        if edge.label:
            lx, ly, anchor = _label_at(waypoints)
            out.append(
                f'<text x="{_f(lx)}" y="{_f(ly)}" font-size="{_f(LABEL_SIZE)}" text-anchor="{anchor}" '
                f'fill="#455a64" stroke="#ffffff" stroke-width="3" paint-order="stroke">{escape(edge.label)}</text>'
            )
        out.append("</g>")
    out.append('</g><g class="nodes">')
    for node in nodes:
        box = placed.boxes[node.key]
        if node.href:
            out.append(f"<a href={quoteattr(node.href)}>")
        out.append(f'<g class="node" data-node={quoteattr(node.key)}>')
        out.append(f"<title>{escape(node.tooltip or node.title)}</title>")
        out.append(
            f'<rect x="{_f(box.x)}" y="{_f(box.y)}" width="{_f(box.w)}" height="{_f(box.h)}" '
            f'rx="{0 if node.note else 6}" fill="{node.fill}" stroke="{STROKE}" '
            f'stroke-width="{2 if node.emphasis else 1}"/>'
        )
        if node.note:  # the folded corner of a document: cut it off, then draw the fold
            for corner, fill, stroke in _fold(box):
                path = " L".join(f"{_f(x)},{_f(y)}" for x, y in corner)
                out.append(f'<path d="M{path} Z" fill="{fill}" stroke="{stroke}" stroke-width="0.8"/>')
        cx = box.x + (box.w - (8.0 if node.note else 0.0)) / 2
        for i, (text, size, weight) in enumerate(
            [(node.title, TITLE_SIZE, "bold")] + [(line, LINE_SIZE, "normal") for line in node.lines]
        ):
            y = _text_top(box, node) + LINE_HEIGHT * (i + 0.5)
            out.append(
                f'<text x="{_f(cx)}" y="{_f(y)}" font-size="{_f(size)}" font-weight="{weight}" text-anchor="middle" '
                f'dominant-baseline="central" fill="{"#212121" if i == 0 else "#37474f"}">{escape(text)}</text>'
            )
        out.append("</g>")
        if node.href:
            out.append("</a>")
    out.append("</g></svg>")
    return "\n".join(out)


def png(nodes: Sequence[Node], edges: Sequence[Edge], scale: float = 2.0) -> bytes:
    """The same drawing as a PNG, through matplotlib's Agg renderer (no system library or binary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, PathPatch, Polygon
    from matplotlib.path import Path

    placed = layout(nodes, edges)
    pt = 0.72  # one layout pixel in points at dpi 100 * scale on a figure of width/100 inches
    fig = plt.figure(figsize=(placed.width / 100, placed.height / 100), dpi=100 * scale)
    try:
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, placed.width)
        ax.set_ylim(placed.height, 0)
        ax.axis("off")
        codes = {"M": Path.MOVETO, "L": Path.LINETO, "C": Path.CURVE4}
        for edge, waypoints in placed.routes:
            commands, head = _edge_path(waypoints)
            vertices, kinds = [], []
            for command, pts in commands:
                vertices += pts
                kinds += [codes[command]] * len(pts)
            ax.add_patch(PathPatch(Path(vertices, kinds), fill=False, edgecolor=EDGE_COLOR, linewidth=1.3 * pt))
            ax.add_patch(Polygon(head, closed=True, facecolor=EDGE_COLOR, edgecolor="none"))
            if edge.label:
                lx, ly, anchor = _label_at(waypoints)
                ha = "right" if anchor == "end" else "left"
                ax.text(lx, ly, edge.label, fontsize=LABEL_SIZE * pt, ha=ha, va="baseline", color="#455a64",
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.85})  # fmt: skip
        for node in nodes:
            box = placed.boxes[node.key]
            style = "square,pad=0" if node.note else "round,pad=0,rounding_size=6"
            ax.add_patch(FancyBboxPatch((box.x, box.y), box.w, box.h, boxstyle=style, facecolor=node.fill,
                                        edgecolor=STROKE, linewidth=(2 if node.emphasis else 1) * pt))  # fmt: skip
            if node.note:
                for corner, fill, stroke in _fold(box):
                    ax.add_patch(Polygon(corner, closed=True, facecolor=fill, edgecolor=stroke, linewidth=0.8 * pt))
            cx = box.x + (box.w - (8.0 if node.note else 0.0)) / 2
            lines = [(node.title, TITLE_SIZE, "bold")] + [(line, LINE_SIZE, "normal") for line in node.lines]
            for i, (text, size, weight) in enumerate(lines):
                ax.text(cx, _text_top(box, node) + LINE_HEIGHT * (i + 0.5), text, fontsize=size * pt, fontweight=weight,
                        ha="center", va="center", color="#212121" if i == 0 else "#37474f")  # fmt: skip
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100 * scale, facecolor=BACKGROUND, metadata={"Software": None})
    finally:
        plt.close(fig)
    return buffer.getvalue()
