"""Dataset loaders (each format on small files written here), padding collate and length bucketing."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from train.data import (
    LoadReport,
    Sample,
    bucket_batches,
    collate_captions,
    detect_format,
    load_coco,
    load_dataset,
    load_flickr8k_kaggle,
    load_flickr8k_token,
    load_karpathy,
)

REAL_FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"

COMMA_CAPTION = 'A dog named "Rex, the brave" runs , fast .'  # comma inside quotes, kept as written


def make_images(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 3), (40 * k, 100, 200)).save(folder / name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def counts(report: LoadReport) -> tuple[int, int, int]:
    return report.malformed, report.missing_images, report.no_captions


# ----------------------------------------------------------------------------- Kaggle Flickr8k


def kaggle_root(tmp_path: Path) -> Path:
    root = tmp_path / "flickr8k"
    make_images(root / "Images", "a.jpg", "b.jpg", "c.jpg", "nocap.jpg")
    write(
        root / "captions.txt",
        "image,caption\n"
        "a.jpg,A dog runs .\n"
        'a.jpg,"A dog named ""Rex, the brave"" runs , fast ."\n'  # CSV-quoted, commas inside
        "b.jpg,  A cat sits .  \n"
        "this line has no comma\n"  # line 5: one field
        "b.jpg,   \n"  # line 6: empty caption
        "\n"  # blank: ignored
        "gone.jpg,A ghost caption .\n"  # image file missing
        "c.jpg,A bird flies .\n",
    )
    write(root / "Flickr_8k.trainImages.txt", "a.jpg\ngone.jpg\nnocap.jpg\n")
    write(root / "Flickr_8k.devImages.txt", "b.jpg\n\n")
    write(root / "Flickr_8k.testImages.txt", "c.jpg\n")
    return root


def test_kaggle_loader(tmp_path):
    root = kaggle_root(tmp_path)
    samples, report = load_flickr8k_kaggle(str(root))
    images = root / "Images"
    assert samples == [
        Sample(str(images / "a.jpg"), ("A dog runs .", COMMA_CAPTION), "train"),
        Sample(str(images / "b.jpg"), ("A cat sits .",), "dev"),
    ]
    assert counts(report) == (2, 1, 1)
    assert dict(report.examples) == {
        "malformed": ["line 5", "line 6"],
        "missing_images": ["gone.jpg"],
        "no_captions": ["nocap.jpg"],
    }
    assert "2 malformed" in str(report)


def test_kaggle_other_splits_and_errors(tmp_path):
    root = kaggle_root(tmp_path)
    samples, report = load_flickr8k_kaggle(str(root), splits=("test",))
    assert samples == [Sample(str(root / "Images" / "c.jpg"), ("A bird flies .",), "test")]
    assert counts(report) == (2, 0, 0)  # malformed lines are counted whatever the splits

    with pytest.raises(FileNotFoundError, match="Flickr_8k.valImages.txt"):
        load_flickr8k_kaggle(str(root), splits=("val",))
    write(root / "captions.txt", "name,text\na.jpg,A dog .\n")
    with pytest.raises(ValueError, match="image,caption"):
        load_flickr8k_kaggle(str(root))
    (root / "captions.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"captions\.txt.*expected"):
        load_flickr8k_kaggle(str(root))


# ----------------------------------------------------------------------------- original Flickr8k (token file)

TOKEN_TEXT = (
    "a.jpg#0\tA dog runs .\n"
    f"a.jpg#1\t{COMMA_CAPTION}\n"
    "b.jpg#0\t  A cat sits .  \n"
    "b.jpg#1 no tab on this line\n"  # line 4: malformed
    "b.jpg\tNo caption number .\n"  # line 5: malformed
    "b.jpg#2\t   \n"  # line 6: empty caption
    "\n"  # blank: ignored
    "gone.jpg#0\tA ghost caption .\n"  # image file missing
    "c.jpg#0\tA bird flies .\n"
)


@pytest.mark.parametrize("text_dir", ["", "Flickr8k_text"])
@pytest.mark.parametrize("image_dir", ["Flicker8k_Dataset", "Images"])
def test_token_loader(tmp_path, text_dir, image_dir):
    root = tmp_path / "Flickr8k"
    make_images(root / image_dir, "a.jpg", "b.jpg", "c.jpg", "nocap.jpg")
    write(root / text_dir / "Flickr8k.token.txt", TOKEN_TEXT)
    write(root / text_dir / "Flickr_8k.trainImages.txt", "a.jpg\ngone.jpg\nnocap.jpg\n")
    write(root / text_dir / "Flickr_8k.devImages.txt", "b.jpg\n")
    write(root / text_dir / "Flickr_8k.testImages.txt", "c.jpg\n")

    samples, report = load_flickr8k_token(str(root))
    images = root / image_dir
    assert samples == [
        Sample(str(images / "a.jpg"), ("A dog runs .", COMMA_CAPTION), "train"),
        Sample(str(images / "b.jpg"), ("A cat sits .",), "dev"),
    ]
    assert counts(report) == (3, 1, 1)
    assert dict(report.examples) == {
        "malformed": ["line 4", "line 5", "line 6"],
        "missing_images": ["gone.jpg"],
        "no_captions": ["nocap.jpg"],
    }
    samples, _ = load_flickr8k_token(str(root), splits=("test",))
    assert samples == [Sample(str(images / "c.jpg"), ("A bird flies .",), "test")]


def test_token_loader_errors(tmp_path):
    root = tmp_path / "Flickr8k"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match="Flickr8k.token.txt"):
        load_flickr8k_token(str(root))
    write(root / "Flickr8k.token.txt", TOKEN_TEXT)
    with pytest.raises(FileNotFoundError, match="Flicker8k_Dataset"):
        load_flickr8k_token(str(root))
    make_images(root / "Images", "a.jpg")
    with pytest.raises(FileNotFoundError, match="Flickr_8k.trainImages.txt"):
        load_flickr8k_token(str(root))


# ----------------------------------------------------------------------------- Karpathy split JSON


def karpathy_files(tmp_path: Path) -> tuple[Path, Path]:
    image_root = tmp_path / "coco"
    make_images(image_root, "train2014/a.jpg", "b.jpg", "val2014/c.jpg", "nocap.jpg", "t.jpg")

    def sents(*raws):
        return [{"raw": r, "tokens": r.lower().split()} for r in raws]

    data = {
        "images": [
            {"filepath": "train2014", "filename": "a.jpg", "split": "train",
             "sentences": sents("A dog runs .", COMMA_CAPTION, "   ")},  # sentences[2]: empty
            {"filename": "b.jpg", "split": "restval", "sentences": sents("  A cat sits .  ")},
            {"filepath": "val2014", "filename": "c.jpg", "split": "val", "sentences": sents("A bird flies .")},
            {"filename": "gone.jpg", "split": "train", "sentences": sents("A ghost caption .")},
            {"filename": "nocap.jpg", "split": "train", "sentences": []},
            {"split": "train", "sentences": sents("No file name .")},  # images[5]: malformed
            "not an object",  # images[6]: malformed
            {"filename": "t.jpg", "split": "test", "sentences": sents("A tree .")},
        ]
    }
    json_path = write(tmp_path / "dataset_coco.json", json.dumps(data))
    return json_path, image_root


def test_karpathy_loader(tmp_path):
    json_path, root = karpathy_files(tmp_path)
    samples, report = load_karpathy(str(json_path), str(root))
    assert samples == [
        Sample(str(root / "train2014" / "a.jpg"), ("A dog runs .", COMMA_CAPTION), "train"),
        Sample(str(root / "b.jpg"), ("A cat sits .",), "train"),  # restval -> train
        Sample(str(root / "val2014" / "c.jpg"), ("A bird flies .",), "val"),
    ]
    assert counts(report) == (3, 1, 1)
    assert dict(report.examples) == {
        "malformed": [
            "images[0].sentences[2]: no raw caption",
            "images[5]: no filename",
            "images[6]: not an object",
        ],
        "missing_images": ["gone.jpg"],
        "no_captions": ["nocap.jpg"],
    }


def test_karpathy_restval_kept_and_test_split(tmp_path):
    json_path, root = karpathy_files(tmp_path)
    samples, _ = load_karpathy(str(json_path), str(root), splits=("restval", "test"), restval_as_train=False)
    assert samples == [
        Sample(str(root / "b.jpg"), ("A cat sits .",), "restval"),
        Sample(str(root / "t.jpg"), ("A tree .",), "test"),
    ]
    samples, _ = load_karpathy(str(json_path), str(root), splits=("train",), restval_as_train=False)
    assert [Path(s.image).name for s in samples] == ["a.jpg"]


def test_karpathy_errors(tmp_path):
    json_path, root = karpathy_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_karpathy(str(tmp_path / "nope.json"), str(root))
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_karpathy(str(json_path), str(tmp_path / "no_such_dir"))
    bad = write(tmp_path / "bad.json", '{"images": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_karpathy(str(bad), str(root))
    wrong = write(tmp_path / "wrong.json", '{"annotations": []}')
    with pytest.raises(ValueError, match="'images' list"):
        load_karpathy(str(wrong), str(root))


# ----------------------------------------------------------------------------- COCO captions


def coco_files(tmp_path: Path) -> tuple[Path, Path]:
    image_dir = tmp_path / "val2017"
    make_images(image_dir, "000001.jpg", "000002.jpg", "nocap.jpg")
    data = {
        "info": {},
        "images": [
            {"id": 1, "file_name": "000001.jpg", "width": 4, "height": 3},
            {"id": 2, "file_name": "000002.jpg"},
            {"id": 3, "file_name": "gone.jpg"},
            {"id": 4, "file_name": "nocap.jpg"},
            {"file_name": "noid.jpg"},  # images[4]: malformed
        ],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "A dog runs ."},
            {"image_id": 2, "id": 11, "caption": "  A cat sits .\n"},
            {"image_id": 1, "id": 12, "caption": COMMA_CAPTION},
            {"image_id": 99, "id": 13, "caption": "Unknown image ."},  # annotations[3]: malformed
            {"image_id": 2, "id": 14, "caption": "   "},  # annotations[4]: malformed
            {"image_id": 3, "id": 15, "caption": "A ghost caption ."},
        ],
    }
    return write(tmp_path / "annotations" / "captions_val2017.json", json.dumps(data)), image_dir


def test_coco_loader(tmp_path):
    json_path, image_dir = coco_files(tmp_path)
    samples, report = load_coco(str(json_path), str(image_dir), "val")
    assert samples == [
        Sample(str(image_dir / "000001.jpg"), ("A dog runs .", COMMA_CAPTION), "val"),
        Sample(str(image_dir / "000002.jpg"), ("A cat sits .",), "val"),
    ]
    assert counts(report) == (3, 1, 1)
    assert dict(report.examples) == {
        "malformed": [
            "images[4]: needs an id and a file_name",
            "annotations[3]: image_id 99 not in images",
            "annotations[4]: no caption",
        ],
        "missing_images": ["gone.jpg"],
        "no_captions": ["nocap.jpg"],
    }


def test_coco_errors(tmp_path):
    json_path, image_dir = coco_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="captions_train2017.json"):
        load_coco(str(tmp_path / "captions_train2017.json"), str(image_dir), "train")
    with pytest.raises(FileNotFoundError, match="train2017"):
        load_coco(str(json_path), str(tmp_path / "train2017"), "train")
    wrong = write(tmp_path / "wrong.json", '{"images": []}')
    with pytest.raises(ValueError, match="'annotations'"):
        load_coco(str(wrong), str(image_dir), "val")


# ----------------------------------------------------------------------------- dispatcher


def test_load_dataset_detects_and_dispatches(tmp_path):
    kaggle = kaggle_root(tmp_path)
    assert detect_format(str(kaggle)) == "flickr8k"
    assert load_dataset(str(kaggle)) == load_flickr8k_kaggle(str(kaggle))
    assert load_dataset(str(kaggle), splits=["test"])[0][0].split == "test"

    token = tmp_path / "orig"
    make_images(token / "Flicker8k_Dataset", "a.jpg")
    write(token / "Flickr8k_text" / "Flickr8k.token.txt", "a.jpg#0\tA dog .\n")
    write(token / "Flickr8k_text" / "Flickr_8k.trainImages.txt", "a.jpg\n")
    assert detect_format(str(token)) == "flickr8k-token"
    samples, _ = load_dataset(str(token), splits=("train",))
    assert samples == [Sample(str(token / "Flicker8k_Dataset" / "a.jpg"), ("A dog .",), "train")]

    kjson, kroot = karpathy_files(tmp_path)
    assert load_dataset(str(kjson), image_root=str(kroot)) == load_karpathy(str(kjson), str(kroot))
    samples, _ = load_dataset(str(kjson), image_root=str(kroot), splits=("restval",), restval_as_train=False)
    assert [s.split for s in samples] == ["restval"]

    cjson, cdir = coco_files(tmp_path)
    samples, _ = load_dataset(str(cjson), image_root=str(cdir))  # split "val" from the file name
    assert [s.split for s in samples] == ["val", "val"]
    renamed = cjson.rename(cjson.with_name("my_caps.json"))
    samples, _ = load_dataset(str(renamed), fmt="coco", image_root=str(cdir), split="val")
    assert len(samples) == 2


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the dataset format"):
        load_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_dataset(str(tmp_path), fmt="flickr30k")
    with pytest.raises(ValueError, match="image_root"):
        load_dataset(str(tmp_path / "dataset_flickr8k.json"))
    with pytest.raises(ValueError, match="split="):
        load_dataset(str(tmp_path / "caps.json"), fmt="coco", image_root=str(tmp_path))


# ----------------------------------------------------------------------------- collate and bucketing


def test_collate_captions_pads_sequence_first():
    out = collate_captions([[1, 2, 3], [4], [5, 6]])
    assert out.dtype == torch.long and out.shape == (3, 3)
    assert out.tolist() == [[1, 4, 5], [2, 0, 6], [3, 0, 0]]
    out = collate_captions([torch.tensor([7, 8]), [9]], pad_id=-1)
    assert out.tolist() == [[7, 9], [8, -1]]
    assert collate_captions([[], [1]]).tolist() == [[0, 1]]
    assert collate_captions([]).shape == (0, 0)


def test_bucket_batches_cover_every_index_and_are_deterministic():
    rng = random.Random(1)
    lengths = [rng.randint(3, 30) for _ in range(1003)]
    a = list(bucket_batches(lengths, 16, shuffle=True, seed=5, pool_batches=8))
    assert a == list(bucket_batches(lengths, 16, shuffle=True, seed=5, pool_batches=8))
    assert a != list(bucket_batches(lengths, 16, shuffle=True, seed=6, pool_batches=8))
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    assert sorted(len(b) for b in a)[1:] == [16] * (len(a) - 1)  # only one short batch
    assert len(a) == -(-len(lengths) // 16)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    order = list(range(len(lengths)))
    random.Random(5).shuffle(order)
    unbucketed = [order[s : s + 16] for s in range(0, len(order), 16)]
    assert padding(a) < padding(unbucketed) / 4

    b = list(bucket_batches(lengths, 16, shuffle=False))
    flat = [i for batch in b for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)
    assert b == list(bucket_batches(lengths, 16, shuffle=False, seed=99))
    assert list(bucket_batches([], 4)) == []
    with pytest.raises(ValueError):
        next(bucket_batches(lengths, 0))


# ----------------------------------------------------------------------------- the real Flickr8k


def test_real_flickr8k_kaggle():
    if not REAL_FLICKR8K.is_dir():
        pytest.skip(f"real Flickr8k not present at {REAL_FLICKR8K} (shared data folder absent)")
    samples, report = load_flickr8k_kaggle(str(REAL_FLICKR8K))
    assert counts(report) == (0, 0, 0) and not any(report.examples.values())
    assert str(report) == "nothing skipped"
    splits = [s.split for s in samples]
    assert (splits.count("train"), splits.count("dev"), len(samples)) == (6000, 1000, 7000)
    assert all(len(s.captions) == 5 and all(s.captions) for s in samples)
    assert all(os.path.isfile(s.image) for s in samples[:50])
    assert len({s.image for s in samples}) == 7000
    # about 6% of captions hold a comma and are CSV-quoted: parsed whole, no stray quotes left
    # (some captions legitimately contain quotes, e.g. 'a sign that says , " The Rescue . "')
    with_comma = [c for s in samples for c in s.captions if "," in c]
    assert len(with_comma) > 1500 and not any(c.startswith('"') and c.endswith('"') for c in with_comma)
    by_name = {os.path.basename(s.image): s.captions for s in samples}
    assert "A person on a bike wearing a red helmet , riding down a street ." in by_name["218342358_1755a9cce1.jpg"]
