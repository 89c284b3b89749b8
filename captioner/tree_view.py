"""The search as the app draws it: a recorded search's Nodes (decode.Node, GenerationConfig.tree) as an SVG tree.

One column per step, one box per node (its word and its score), a line from each node to the hypothesis it
extends. Pruned and blocked nodes are faded, and each node's title says why it has its status (a hover shows it,
a tap selects the node and the page says it beside the tree); the final caption's path is highlighted. Guided
decoding's two groups are two bands, with the required word above; the node where a hypothesis took the required
word is starred. Drawn here, in Python, so that the page needs no front-end build; docs/search-tree.md explains it.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Sequence

from .decode import Node
from .processors import Ended, MinLength, NoRepeatNGram, OneSentence, Unsaid

COL_W = 112  # px between columns (steps)
NODE_W = 100
NODE_H = 32
ROW_H = 38
TOP = 22  # the step numbers
BAND = 18  # a guided band's label
LEFT = 4
RULES = {rule.__name__: rule.why for rule in (Unsaid, MinLength, OneSentence, NoRepeatNGram, Ended)}
STATUS_ORDER = {"chosen": 0, "kept": 0, "finished": 1, "pruned": 2, "blocked": 3}
EMPTY = ('<div class="tree-empty">Caption a photo with <em>beam</em> or <em>guided</em> decoding to see its search '
         'here: every hypothesis it weighed, step by step.</div>')
LEGEND = ('<div class="tree-legend"><span class="k">kept</span><span class="c">chosen: the caption</span>'
          '<span class="f">finished (&lt;EOS&gt;)</span><span class="p">pruned: outscored</span>'
          '<span class="b">blocked by a rule</span>{placed}</div><div class="tree-hint">Hover or tap a word for why it '
          'has its status; tap one, then <b>Re-decode from here</b> to continue from it.</div>')


@dataclass
class Growing:
    """A page request's search while it streams (app.handlers.Handlers._decode collects its nodes here as they come)."""

    nodes: list[Node] = field(default_factory=list)
    required: tuple[str, ...] = ()  # guided decoding: the words it requires (the bands' labels)

    def view(self) -> str:
        return render(self.nodes, required=self.required, final=False)


def escaped(text: str) -> str:
    """Text for a Markdown line: "<EOS>" shown as itself, not taken for a tag."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def path(node: Node, by_id: dict[int, Node]) -> list[Node]:
    """The hypothesis a node ends: its nodes from the first word to itself."""
    out = [node]
    while out[-1].parent is not None:
        out.append(by_id[out[-1].parent])
    return out[::-1]


def placed(node: Node, by_id: dict[int, Node]) -> bool:
    """Guided decoding: whether this node is where its hypothesis took the required word (entered group 1)."""
    return node.group == 1 and (node.parent is None or by_id[node.parent].group == 0)


def reason(node: Node, by_id: dict[int, Node], floors: dict | None = None, *, words: bool = True) -> str:
    """Why a node has its status, in words: the page's line when it is tapped, and without the hypothesis's `words`
    its title in the tree (a title of every node's whole hypothesis made a 60-step tree's page several times larger)."""
    said = f": “{' '.join(n.word for n in path(node, by_id))}”" if words else ""
    head = f"step {node.t + 1}{said} · score {node.score:.2f} (log-prob {node.logprob:.2f})"
    where = {1: " (with the required word)", 0: " (without the required word)"}.get(node.group, "") if words else ""
    why = {
        "chosen": "chosen: on the final caption's path",
        "kept": f"kept: among the best at this step{where}",
        "finished": f"finished: ended here with <EOS>, a candidate caption{where}",
        "pruned": f"pruned: outscored{where}",
        "blocked": f"blocked by {node.rule}: {RULES.get(node.rule, 'a decoding rule')}; this is its score before the rule",
    }[node.status]
    if node.status == "pruned" and floors and (node.t, node.group) in floors:
        why += f": the lowest kept scored {floors[node.t, node.group]:.2f}"
    if placed(node, by_id):
        why += " · ★ the required word is placed here"
    return f"{why} — {head}"


def floors(nodes: Sequence[Node]) -> dict:
    """(t, group) -> the lowest score kept at that step (what a pruned node lost to)."""
    out: dict = {}
    for n in nodes:
        if n.status in ("kept", "chosen") and n.word != "<EOS>":
            key = (n.t, n.group)
            out[key] = min(out.get(key, n.score), n.score)
    return out


def layout(nodes: Sequence[Node]) -> tuple[dict[int, tuple[int, int]], list[tuple[int, int, str]], int, int]:
    """Where each node goes: ({id: (x, y)}, guided bands [(y, group, label)], width, height). Columns are steps;
    within a column (and a band) kept nodes first, best first, then finished, pruned, blocked."""
    columns: dict[tuple[int, int | None], list[Node]] = {}
    for n in nodes:
        columns.setdefault((n.t, n.group), []).append(n)
    groups = sorted({n.group for n in nodes}, key=lambda g: -1 if g is None else -g)  # guided: group 1 first
    rows = {g: max((len(c) for (t, gg), c in columns.items() if gg == g), default=0) for g in groups}
    band_top, y, bands = {}, TOP, []
    for g in groups:
        if g is not None:
            bands.append((y, g))
            y += BAND
        band_top[g] = y
        y += rows[g] * ROW_H + (6 if g is not None else 0)
    where = {}
    for (t, g), col in columns.items():
        col.sort(key=lambda n: (STATUS_ORDER[n.status], -n.score, n.id))
        for i, n in enumerate(col):
            where[n.id] = (LEFT + t * COL_W, band_top[g] + i * ROW_H)
    steps = max((n.t for n in nodes), default=-1) + 1
    return where, bands, LEFT + steps * COL_W, y + 4


def _short(word: str, n: int = 13) -> str:
    return word if len(word) <= n else word[: n - 1] + "…"


def render(nodes: Sequence[Node] | None, *, required: Sequence[str] = (), note: str = "", final: bool = True) -> str:
    """The tree view's HTML: a legend, a note (guided: what was required and how it ended), and the SVG, in a box
    that scrolls sideways (and down) when the search is larger than the page. `final`: the search has ended (else the
    tree is still growing: no node is chosen yet)."""
    if not nodes:
        return EMPTY
    by_id = {n.id: n for n in nodes}
    where, bands, width, height = layout(nodes)
    lowest = floors(nodes)
    out = [f'<svg class="tree" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="group" aria-label="The search, step by step">']
    for t in range(max(n.t for n in nodes) + 1):
        out.append(f'<text class="step" x="{LEFT + t * COL_W + NODE_W // 2}" y="14">{t + 1}</text>')
    words = "/".join(required) or "the required word"
    for y, g in bands:  # (short: a label is as wide as a column)
        label = f"with {html.escape(_short(words, 16))}" if g == 1 else "without it"
        out.append(f'<text class="band" x="{LEFT}" y="{y + 13}">{label}</text>')
    edges: dict[str, list[str]] = {}  # status -> the lines to nodes of it, one <path> each (a few elements, not one a node)
    boxes = []
    for n in nodes:
        x, y = where[n.id]
        if n.parent is not None:
            px, py = where[n.parent]
            x0, y0, y1 = px + NODE_W, py + NODE_H // 2, y + NODE_H // 2
            mid = (x0 + x) // 2
            edges.setdefault(n.status, []).append(f"M{x0} {y0}C{mid} {y0} {mid} {y1} {x} {y1}")
        star = "★ " if placed(n, by_id) else ""
        title = html.escape(reason(n, by_id, lowest, words=False))
        boxes.append(f'<g class="n s-{n.status}{" placed" if star else ""}" data-node="{n.id}" tabindex="0" role="button" '
                     f'transform="translate({x} {y})"><title>{title}</title><rect width="{NODE_W}" height="{NODE_H}" rx="5"/>'
                     f'<text class="w" x="6" y="13">{star}{html.escape(_short(n.word))}</text>'
                     f'<text class="sc" x="6" y="27">{n.score:.2f}</text></g>')
    # chosen last: drawn over the others
    out += [f'<path class="e s-{status}" d="{"".join(edges[status])}"/>' for status in sorted(edges, key=lambda s: s == "chosen")]
    out += boxes
    out.append("</svg>")
    kept = sum(n.status in ("kept", "chosen") for n in nodes)
    state = "" if final else " (searching…)"
    summary = (f'<div class="tree-summary">{max(n.t for n in nodes) + 1} steps · {len(nodes)} hypotheses weighed, '
               f'{kept} kept{state}</div>')
    legend = LEGEND.format(placed='<span class="s">★ required word placed</span>' if bands else "")
    note_html = f'<div class="tree-note">{html.escape(note)}</div>' if note else ""
    return f'{legend}{summary}{note_html}<div class="tree-scroll">{"".join(out)}</div>'
