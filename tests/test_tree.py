"""The recorded search (GenerationConfig.tree, issue 34): beam and guided decoding as a tree of nodes, greedy and
sampling as one path; its properties on tiny models and on the bundled one, the CLI's --tree, and the tree view."""
import collections
import json
import math

import pytest
import torch
from conftest import ROOT

from captioner.decode import Node, SearchStep, Step, final, last, stream
from tiny import WORDS, photo, scripted_model, tiny_model

DECODERS = ["show-tell", "attend"]
DOG = WORDS.index("dog")
DEFAULT_MODEL = ROOT / "captioner" / "default_model"
STATUSES = {"kept", "pruned", "finished", "blocked", "chosen"}


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def model_of(decoder, seed=0, **kw):
    m = tiny_model(seed, decoder=decoder, max_len=kw.pop("max_len", 8), **kw)
    m.decoder.head.bias[2] -= 1.5  # <EOS> rarer: captions run several words
    return m


def guided_model(decoder="show-tell", seed=1, dog_bias=-4.0):
    """As test_guided's: the ImageNet head sure of dog classes, the decoder rarely saying "dog"."""
    m = tiny_model(seed, decoder=decoder, imagenet_head=True, max_len=8)
    m.decoder.head.bias[2] -= 1.0
    m.decoder.head.bias[DOG] += dog_bias
    m.encoder.classifier.bias[list(range(151, 269))] = 10.0
    return m


def check_tree(last: Step, beam_size: int, eos: int) -> list:
    """The properties every recorded search holds (the issue's "done when"); returns the nodes as JSON records."""
    nodes = [n.record() for n in last.tree]  # as the CLI and the download write them
    return check_records(nodes, last.tokens, beam_size, eos)


def check_records(nodes: list[dict], tokens, beam_size: int, eos: int) -> list:
    assert nodes and [n["id"] for n in nodes] == list(range(len(nodes)))
    by_id = {n["id"]: n for n in nodes}
    for n in nodes:
        assert n["status"] in STATUSES, n
        assert (n["rule"] is not None) == (n["status"] == "blocked"), n
        parent = by_id.get(n["parent"])
        assert (n["parent"] is None) == (n["t"] == 0), n
        if parent is not None:
            assert parent["t"] == n["t"] - 1 and parent["status"] in ("kept", "chosen") and parent["token"] != eos, n
    # The chosen path spells the caption: one node per step from the first word, each the parent of the next.
    chosen = sorted((n for n in nodes if n["status"] == "chosen"), key=lambda n: n["t"])
    assert [n["t"] for n in chosen] == list(range(len(chosen)))
    assert all(b["parent"] == a["id"] for a, b in zip(chosen, chosen[1:])) and chosen[0]["parent"] is None
    words = [n["token"] for n in chosen]
    if words[-1] == eos:
        words = words[:-1]
    assert tuple(words) == tuple(tokens)
    # Per step and group: no more than the beam size kept, and every pruned node scored below every kept one.
    steps = collections.defaultdict(list)
    for n in nodes:
        steps[n["t"], n["group"]].append(n)
    for (t, group), at in steps.items():
        kept = [n["score"] for n in at if n["status"] in ("kept", "chosen") and n["token"] != eos]
        pruned = [n["score"] for n in at if n["status"] == "pruned"]
        assert len(kept) <= beam_size, (t, group, kept)
        if pruned:
            assert len(kept) == beam_size and max(pruned) <= min(kept), (t, group, pruned, kept)
        blocked = [n["score"] for n in at if n["status"] == "blocked"]
        assert len(blocked) <= beam_size
        if blocked and len(kept) == beam_size:  # shown only when, before its rule, it would have made the beam
            assert min(blocked) >= min(kept) - 1e-6 * abs(min(kept)) or t == 0
    return nodes


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_beam_tree_properties(decoder, beam_size):
    m = model_of(decoder)
    for seed in range(3):
        out = final(m, photo(seed), strategy="beam", beam_size=beam_size, tree=True)
        nodes = check_tree(out, beam_size, m.vocab.eos_id)
        assert {n["group"] for n in nodes} == {None}
        statuses = collections.Counter(n["status"] for n in nodes)
        if beam_size > 1:
            assert statuses["pruned"] and statuses["kept"], statuses  # a search, not a path
        # Recording changes nothing about the search.
        plain = final(m, photo(seed), strategy="beam", beam_size=beam_size)
        assert plain.tree is None and dataclasses_equal(plain, out)


def dataclasses_equal(a: Step, b: Step) -> bool:
    import dataclasses

    return dataclasses.replace(a, tree=None) == dataclasses.replace(b, tree=None)


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_greedy_and_sampling_give_one_path(strategy):
    m = model_of("attend")
    kw = dict(seed=4, temperature=1.5) if strategy == "sample" else {}
    records = list(stream(m, photo(), strategy=strategy, tree=True, **kw))
    out = last(iter(records))
    assert all(n.status == "chosen" for n in out.tree)
    check_tree(out, 1, m.vocab.eos_id)
    assert [n.logprob for n in out.tree][: len(out.tokens)] == pytest.approx([s.logprob for s in out.caption_steps()])
    # One SearchStep per word (and one for a final <EOS>), each with its one node, in order.
    searched = [r for r in records if isinstance(r, SearchStep)]
    assert [n for r in searched for n in r.nodes] == list(out.tree)
    assert [r for r in records if isinstance(r, Step)][-1] is records[-1]
    assert final(m, photo(), strategy=strategy, **kw).text == out.text


def test_the_stream_grows_the_tree_step_by_step():
    m = model_of("show-tell")
    records = list(stream(m, photo(1), strategy="beam", beam_size=3, tree=True))
    searched = [r for r in records if isinstance(r, SearchStep)]
    out = records[-1]
    assert isinstance(out, Step) and out.stop is not None
    assert [r.t for r in searched] == list(range(len(searched)))
    streamed = [n for r in searched for n in r.nodes]
    assert [n.id for n in streamed] == [n.id for n in out.tree]
    # While streaming no node is chosen yet; at the end only statuses change, to "chosen".
    assert all(n.status != "chosen" for n in streamed)
    for a, b in zip(streamed, out.tree):
        assert a == b or (dataclasses_replace(a, status="chosen") == b and a.status in ("kept", "finished"))
    # Without tree=True: only Step records, as before.
    assert all(isinstance(r, Step) for r in stream(m, photo(1), strategy="beam", beam_size=3))


def dataclasses_replace(node: Node, **kw) -> Node:
    import dataclasses

    return dataclasses.replace(node, **kw)


def test_a_blocked_word_names_its_rule():
    """A scripted model that wants to say "a dog" twice: no_repeat_ngram=2 blocks the second "dog", and the tree
    shows it, blocked by NoRepeatNGram, scored above the words that were kept."""
    a, dog, runs, dot, eos = (WORDS.index(w) for w in ("a", "dog", "runs", ".", "<EOS>"))
    table = {1: {a: 0.9, runs: 0.1}, a: {dog: 0.9, runs: 0.1}, dog: {a: 0.8, runs: 0.2},
             runs: {dot: 0.6, a: 0.4}, dot: {eos: 1.0}}
    m = scripted_model(table, max_len=6)
    out = final(m, photo(), strategy="beam", beam_size=2, tree=True)
    nodes = check_tree(out, 2, eos)
    blocked = [n for n in nodes if n["status"] == "blocked"]
    assert any(n["word"] == "dog" and n["rule"] == "NoRepeatNGram" for n in blocked), blocked
    repeat = next(n for n in blocked if n["word"] == "dog" and n["rule"] == "NoRepeatNGram")
    path = [repeat["word"]]
    at = repeat
    while at["parent"] is not None:
        at = nodes[at["parent"]]
        path.append(at["word"])
    assert path[::-1][-4:] == ["a", "dog", "a", "dog"]
    kept = [n["score"] for n in nodes if n["t"] == repeat["t"] and n["status"] in ("kept", "chosen") and n["word"] != "<EOS>"]
    assert repeat["score"] > min(kept)
    assert "a dog a dog" not in out.text


@pytest.mark.parametrize("decoder", DECODERS)
def test_guided_tree_shows_both_groups_and_where_the_word_was_placed(decoder):
    m = guided_model(decoder)
    out = final(m, photo(), strategy="guided", guide_margin=math.inf, beam_size=3, tree=True)
    assert out.constraint.met is True and out.constraint.used == "dog"
    nodes = check_tree(out, 3, m.vocab.eos_id)
    assert {n["group"] for n in nodes} == {0, 1}
    # A hypothesis enters group 1 by taking a required word; the chosen path does so where the caption uses it.
    by_id = {n["id"]: n for n in nodes}
    for n in nodes:
        parent = by_id.get(n["parent"])
        if n["group"] == 1 and (parent is None or parent["group"] == 0):
            assert n["word"] == "dog", n
        if parent is not None and parent["group"] == 1:
            assert n["group"] == 1, n
    placed = [n for n in nodes if n["status"] == "chosen" and n["group"] == 1 and
              (n["parent"] is None or by_id[n["parent"]]["group"] == 0)]
    assert len(placed) == 1 and placed[0]["t"] == out.tokens.index(DOG)


def test_guided_fallback_tree_chooses_the_group_without_the_word():
    m = guided_model(seed=1, dog_bias=-4.0)
    out = final(m, photo(), strategy="guided", guide_margin=0.0, beam_size=3, tree=True)
    if out.constraint.met is not False:  # the precondition: this model's caption with "dog" is far less likely
        pytest.fail(f"the fixture no longer falls back: {out.constraint.describe()}")
    nodes = check_tree(out, 3, m.vocab.eos_id)
    assert {n["group"] for n in nodes} == {0, 1}
    assert {n["group"] for n in nodes if n["status"] == "chosen"} == {0}
    assert DOG not in out.tokens


@pytest.mark.slow  # three runs of the CLI, a Python start each
def test_cli_tree_json(tmp_path):
    from test_cli import run_cli

    m = model_of("show-tell", max_len=6)
    m.save_pretrained(tmp_path / "model")
    photo(0).save(tmp_path / "p.png")
    r = run_cli(tmp_path / "p.png", "--model", tmp_path / "model", "--strategy", "beam", "--json", "--tree")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    want = final(m, photo(0).convert("RGB"), strategy="beam", max_len=6)
    assert rec["caption"] == want.text
    check_records(rec["tree"], want.tokens, 3, m.vocab.eos_id)
    assert "steps" not in rec  # --tree alone adds only the tree
    r = run_cli(tmp_path / "p.png", "--model", tmp_path / "model", "--strategy", "beam", "--json")
    assert "tree" not in json.loads(r.stdout)
    r = run_cli(tmp_path / "p.png", "--model", tmp_path / "model", "--strategy", "beam", "--tree")
    assert r.returncode == 0 and "search  1:" in r.stdout and "+" in r.stdout


@pytest.fixture(scope="module")
def real():
    from captioner.loading import load_model

    assert (DEFAULT_MODEL / "model.safetensors").exists(), "the default model must ship in captioner/default_model"
    return load_model()


@pytest.mark.parametrize("name", ["cat.jpg", "cameraman.jpg", "rocket.jpg"])
def test_real_model_trees(real, name):
    img = ROOT / ("examples" if name == "cat.jpg" else "tests/data") / name
    beam = final(real, str(img), strategy="beam", beam_size=3, tree=True)
    check_tree(beam, 3, real.vocab.eos_id)
    assert beam.text == final(real, str(img), strategy="beam", beam_size=3).text
    guided = final(real, str(img), strategy="guided", beam_size=3, tree=True)
    nodes = check_tree(guided, 3, real.vocab.eos_id)
    if guided.constraint.words:
        assert {n["group"] for n in nodes} == {0, 1}
        chosen_groups = {n["group"] for n in nodes if n["status"] == "chosen"}
        assert (1 in chosen_groups) == bool(guided.constraint.met)


# ---------------------------------------------------------------- the app: the tree view, picking a node, re-decoding


@pytest.fixture
def app(tmp_path):
    """(Handlers of a tiny model, a photo's path)."""
    from captioner.app import Handlers

    m = model_of("attend", seed=2)
    path = tmp_path / "photo.png"
    photo(3).save(path)
    return Handlers(m, word_delay=0), str(path)


def page_of(events) -> dict:
    page = {}
    for update in events:
        page.update(update)
    return page


@pytest.mark.filterwarnings("ignore:node 999")  # the refused re-decode's gr.Warning
def test_the_page_draws_the_search_and_re_decodes_from_a_pruned_node(app):
    from captioner.app.views import on_page
    from captioner.tree_view import path as node_path

    h, img = app
    page = page_of(on_page(h.caption, clear_first=True)(img, strategy="beam", beam_size=3))
    decoding = page["decoding"]
    assert decoding.tree and page["tree"].count("data-node=") == len(decoding.tree)
    check_tree(decoding.steps[-1], 3, h.model.vocab.eos_id)
    # The download carries the tree.
    from captioner.formatting import decode_record

    record = decode_record(decoding.steps[-1], model="tiny", precision="fp32")
    assert record["tree"] == [n.record() for n in decoding.tree]
    # Every node's title says why it has its status; pruned ones say what they lost to.
    pruned = [n for n in decoding.tree if n.status == "pruned" and n.t >= 1]
    assert pruned and "pruned: outscored" in page["tree"] and "the lowest kept scored" in page["tree"]
    node = pruned[0]
    picked = h.pick(decoding, node.id)
    words = [n.word for n in node_path(node, {n.id: n for n in decoding.tree})]
    assert picked["pick"] == node.id and picked["slider"].value == min(node.t, len(decoding.steps) - 1) + 1
    assert "pruned" in picked["tree_info"] and " ".join(words) in picked["tree_info"]
    # Re-decode from here, no word picked: the caption continues from the node's hypothesis.
    new = page_of(on_page(h.redecode, clear_first=False)(decoding, picked["slider"].value, None, page["cache"], node.id, strategy="beam", beam_size=3))
    tokens = tuple(n.token for n in node_path(node, {n.id: n for n in decoding.tree}))
    assert new["decoding"].tokens[: len(tokens)] == tokens and new["decoding"].prefix == tokens
    want = final(h.model, img, strategy="beam", beam_size=3, prefix=tokens, max_len=h.model.config.max_len)
    assert new["caption"] == want.text and new["decoding"].tree  # the new search, drawn
    # A picked word wins over a picked node; an unknown node is refused by name.
    alt = decoding.steps[1].alternatives[-1]
    redone = page_of(on_page(h.redecode, clear_first=False)(decoding, 2, alt.token, page["cache"], node.id, strategy="beam", beam_size=3))
    assert redone["decoding"].prefix == (*decoding.tokens[:1], alt.token)
    assert "node 999" in h.pick(decoding, 999)["tree_info"]
    failed = page_of(on_page(h.redecode, clear_first=False)(decoding, 1, None, page["cache"], 999, strategy="beam"))
    assert "node 999" in failed["status"]["value"]


def test_the_guided_view_shows_both_groups_and_the_note(app):
    h, img = app
    m = guided_model("attend")
    from captioner.app import Handlers
    from captioner.app.views import on_page

    h = Handlers(m, word_delay=0)
    page = page_of(on_page(h.caption, clear_first=True)(img, strategy="guided", beam_size=3))
    c = page["decoding"].steps[-1].constraint
    assert c.words == ("dog",)
    assert "with dog" in page["tree"] and "without it" in page["tree"] and "★" in page["tree"]
    import html

    assert c.describe().startswith('guided: required "dog"')
    assert html.escape(c.describe()) in page["tree"]  # the note: what was required and how it ended


def test_render_large_search_stays_bounded():
    """Beam 10 over 60 words (the app's largest search): every node drawn once, inside its box's size."""
    from captioner.tree_view import layout, render

    m = model_of("show-tell", max_len=60)
    m.decoder.head.bias[2] = -30  # never ends: all 60 steps
    out = final(m, photo(), strategy="beam", beam_size=10, tree=True)
    assert max(n.t for n in out.tree) == 59  # 60 steps
    check_tree(out, 10, m.vocab.eos_id)
    html = render(out.tree)
    assert html.count("data-node=") == len(out.tree)
    where, _, width, height = layout(out.tree)
    assert len(set(where.values())) == len(where)  # no two nodes in one place
    assert max(x for x, _ in where.values()) < width and max(y for _, y in where.values()) < height


@pytest.mark.slow  # a few hundred decodes, even with --quick
def test_the_tree_benchmark_runs(tmp_path, capsys):
    """benchmarks/tree.py --quick on a tiny model: its table has every row (the times are not checked)."""
    from benchmarks import tree as bench

    model_of("show-tell", max_len=8).save_pretrained(tmp_path / "model")
    threads = torch.get_num_threads()
    try:  # (main sets the app's torch threads)
        assert bench.main(["--quick", "--no-browser", "--model", str(tmp_path / "model"), "--json", str(tmp_path / "r.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for row in ("beam 3, one caption", "guided 3, one caption", "guided 10 x 60 words, decoding", "draw the final tree"):
        assert row in out, out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert all(r["on_ms"] > 0 for r in rows)
