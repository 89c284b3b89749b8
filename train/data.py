"""Dataset loaders: one small function per format, all giving Samples (image path, captions, split).

Every loader returns ``(samples, report)``. Malformed lines/entries, missing image files and images
without captions are counted and named (first few) in the LoadReport: never silently dropped, never
fatal. Only a missing or unreadable top-level file/folder raises (FileNotFoundError / ValueError,
naming the path and what was expected). Captions are whitespace-stripped; an empty caption is
counted as malformed. Entirely blank lines in line-based files carry no data and are ignored.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, Sequence


@dataclass(frozen=True)
class Sample:
    image: str  # path to the image file
    captions: tuple[str, ...]  # the human references, as written
    split: str  # "train", "dev"/"val", "test", ...


@dataclass
class LoadReport:
    """What a loader skipped and why: counted and named (first few), never silent."""

    malformed: int = 0
    missing_images: int = 0
    no_captions: int = 0
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def note(self, kind: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples[kind]) < 5:
            self.examples[kind].append(what)

    def __str__(self) -> str:
        parts = []
        for kind in ("malformed", "missing_images", "no_captions"):
            n = getattr(self, kind)
            if n:
                parts.append(f"{n} {kind.replace('_', ' ')} (e.g. {', '.join(self.examples[kind][:3])})")
        return "; ".join(parts) if parts else "nothing skipped"


# ----------------------------------------------------------------------------- shared helpers


def _read_names(path: str) -> list[str]:
    with open(path, encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip()]


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; expected {what}")


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: folder not found; expected {what}")


def _first_existing(candidates: Sequence[str], isdir: bool = False) -> str | None:
    check = os.path.isdir if isdir else os.path.isfile
    return next((p for p in candidates if check(p)), None)


def _samples_for_split(names, split, image_dir, captions, report) -> list[Sample]:
    """Samples for the image names listed in one split file (Flickr8k-style layouts)."""
    samples = []
    for name in names:
        path = os.path.join(image_dir, name)
        if not captions.get(name):
            report.note("no_captions", name)
        elif not os.path.isfile(path):
            report.note("missing_images", name)
        else:
            samples.append(Sample(path, tuple(captions[name]), split))
    return samples


def _load_json(path: str, what: str):
    _require_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {what}") from None


def _caption(value) -> str | None:
    """A stripped non-empty caption, or None."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


# ----------------------------------------------------------------------------- Flickr8k, Kaggle layout


def load_flickr8k_kaggle(root: str, *, splits=("train", "dev")) -> tuple[list[Sample], LoadReport]:
    """Flickr8k in the Kaggle layout: Images/ + captions.txt (CSV, header image,caption) + Flickr_8k.<split>Images.txt."""
    report = LoadReport()
    captions_file = os.path.join(root, "captions.txt")
    _require_file(
        captions_file, "the Kaggle Flickr8k layout: Images/ + captions.txt (CSV with header image,caption)"
    )
    captions: dict[str, list[str]] = defaultdict(list)
    with open(captions_file, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)  # the csv module handles "quoted, captions" with commas inside
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
            raise ValueError(f"{root}/captions.txt: expected a CSV header 'image,caption', got {header!r}")
        for row in reader:
            if not row:  # blank line
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                report.note("malformed", f"line {reader.line_num}")
                continue
            captions[row[0].strip()].append(row[1].strip())
    image_dir = os.path.join(root, "Images")
    _require_dir(image_dir, "the Flickr8k images in Images/ next to captions.txt")
    samples = []
    for split in splits:
        split_file = os.path.join(root, f"Flickr_8k.{split}Images.txt")
        if not os.path.exists(split_file):
            raise FileNotFoundError(f"{split_file}: split file not found (splits available: train, dev, test)")
        samples += _samples_for_split(_read_names(split_file), split, image_dir, captions, report)
    return samples, report


# ----------------------------------------------------------------------------- Flickr8k, original layout

_TOKEN_KEY = re.compile(r"^(?P<name>.+)#\d+$")


def load_flickr8k_token(root: str, *, splits=("train", "dev")) -> tuple[list[Sample], LoadReport]:
    """Flickr8k as originally distributed: Flickr8k.token.txt ("name.jpg#n<TAB>caption" per line),
    images in Flicker8k_Dataset/ (sic) or Images/, split files Flickr_8k.<split>Images.txt;
    the text files may sit in root or in root/Flickr8k_text/."""
    report = LoadReport()
    text_dirs = (root, os.path.join(root, "Flickr8k_text"))
    token_file = _first_existing([os.path.join(d, "Flickr8k.token.txt") for d in text_dirs])
    if token_file is None:
        raise FileNotFoundError(
            f"{root}: no Flickr8k.token.txt in it or in Flickr8k_text/; expected the original Flickr8k "
            "layout (Flickr8k.token.txt with 'name.jpg#n<TAB>caption' lines)"
        )
    image_dir = _first_existing(
        [os.path.join(root, d) for d in ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")], isdir=True
    )
    if image_dir is None:
        raise FileNotFoundError(f"{root}: no image folder; expected Flicker8k_Dataset/ or Images/ in it")
    captions: dict[str, list[str]] = defaultdict(list)
    with open(token_file, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            key, tab, text = line.partition("\t")
            m = _TOKEN_KEY.match(key.strip())
            caption = _caption(text)
            if not tab or m is None or caption is None:
                report.note("malformed", f"line {lineno}")
                continue
            captions[m["name"]].append(caption)
    samples = []
    for split in splits:
        name = f"Flickr_8k.{split}Images.txt"
        split_file = _first_existing([os.path.join(d, name) for d in text_dirs])
        if split_file is None:
            raise FileNotFoundError(
                f"{os.path.join(root, name)}: split file not found (looked in {root} and {text_dirs[1]}; "
                "splits available: train, dev, test)"
            )
        samples += _samples_for_split(_read_names(split_file), split, image_dir, captions, report)
    return samples, report


# ----------------------------------------------------------------------------- Karpathy split JSON


def load_karpathy(
    json_path: str, image_root: str, *, splits=("train", "val"), restval_as_train: bool = True
) -> tuple[list[Sample], LoadReport]:
    """Karpathy split JSON (dataset_flickr8k/flickr30k/coco.json). Image path is
    image_root/filepath/filename when the entry has a filepath, else image_root/filename.
    With restval_as_train, "restval" entries are labelled (and selected as) "train"."""
    what = 'a Karpathy split JSON: {"images": [{"filename", "split", "sentences": [{"raw"}, ...]}, ...]}'
    data = _load_json(json_path, what)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: no 'images' list; expected {what}")
    _require_dir(image_root, "the folder holding the images named in the Karpathy JSON")
    report = LoadReport()
    samples = []
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(entry, dict):
            report.note("malformed", f"{where}: not an object")
            continue
        filename, split, sentences = entry.get("filename"), entry.get("split"), entry.get("sentences", [])
        filepath = entry.get("filepath") or ""
        if not isinstance(filename, str) or not filename.strip():
            report.note("malformed", f"{where}: no filename")
            continue
        if not isinstance(split, str) or not split.strip():
            report.note("malformed", f"{where}: no split")
            continue
        if not isinstance(sentences, list) or not isinstance(filepath, str):
            report.note("malformed", f"{where}: sentences is not a list or filepath is not a string")
            continue
        split = split.strip()
        if restval_as_train and split == "restval":
            split = "train"
        if split not in splits:
            continue
        name = os.path.join(filepath.strip(), filename.strip()) if filepath.strip() else filename.strip()
        caps = []
        for j, sentence in enumerate(sentences):
            caption = _caption(sentence.get("raw")) if isinstance(sentence, dict) else None
            if caption is None:
                report.note("malformed", f"{where}.sentences[{j}]: no raw caption")
            else:
                caps.append(caption)
        path = os.path.join(image_root, name)
        if not caps:
            report.note("no_captions", name)
        elif not os.path.isfile(path):
            report.note("missing_images", name)
        else:
            samples.append(Sample(path, tuple(caps), split))
    return samples, report


# ----------------------------------------------------------------------------- COCO captions


def load_coco(annotations_json: str, image_dir: str, split: str) -> tuple[list[Sample], LoadReport]:
    """COCO caption annotations (captions_train2017.json / captions_val2017.json); every Sample gets `split`."""
    what = 'COCO caption annotations: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}'
    data = _load_json(annotations_json, what)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
        data.get("annotations"), list
    ):
        raise ValueError(f"{annotations_json}: no 'images' and 'annotations' lists; expected {what}")
    _require_dir(image_dir, "the COCO image folder (e.g. train2017/) for these annotations")
    report = LoadReport()
    files: dict = {}  # image id -> file name, in file order
    for i, image in enumerate(data["images"]):
        image_id = image.get("id") if isinstance(image, dict) else None
        file_name = image.get("file_name") if isinstance(image, dict) else None
        if not isinstance(image_id, (int, str)) or not isinstance(file_name, str) or not file_name.strip():
            report.note("malformed", f"images[{i}]: needs an id and a file_name")
        elif image_id in files:
            report.note("malformed", f"images[{i}]: duplicate id {image_id!r}")
        else:
            files[image_id] = file_name.strip()
    captions: dict = defaultdict(list)
    for k, ann in enumerate(data["annotations"]):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        caption = _caption(ann.get("caption")) if isinstance(ann, dict) else None
        if caption is None:
            report.note("malformed", f"annotations[{k}]: no caption")
        elif not isinstance(image_id, (int, str)) or image_id not in files:
            report.note("malformed", f"annotations[{k}]: image_id {image_id!r} not in images")
        else:
            captions[image_id].append(caption)
    samples = []
    for image_id, name in files.items():
        path = os.path.join(image_dir, name)
        if not captions[image_id]:
            report.note("no_captions", name)
        elif not os.path.isfile(path):
            report.note("missing_images", name)
        else:
            samples.append(Sample(path, tuple(captions[image_id]), split))
    return samples, report


# ----------------------------------------------------------------------------- dispatcher

FORMATS = ("flickr8k", "flickr8k-token", "karpathy", "coco")


def detect_format(path: str) -> str:
    """Guess the format from the files present: a Flickr8k folder, or a Karpathy/COCO JSON by its name."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "captions.txt")):
            return "flickr8k"
        if any(os.path.isfile(os.path.join(path, d, "Flickr8k.token.txt")) for d in ("", "Flickr8k_text")):
            return "flickr8k-token"
    base = os.path.basename(path)
    if base.startswith("dataset_") and base.endswith(".json"):
        return "karpathy"
    if base.startswith("captions_") and base.endswith(".json"):
        return "coco"
    raise ValueError(
        f"{path}: cannot tell the dataset format; expected a folder with captions.txt (Kaggle Flickr8k) or "
        "Flickr8k.token.txt, a dataset_*.json (Karpathy) or captions_*.json (COCO), or pass fmt= one of "
        f"{', '.join(FORMATS)}"
    )


def load_dataset(
    path: str, fmt: str | None = None, *, image_root: str | None = None, splits=None, split: str | None = None,
    restval_as_train: bool = True,
) -> tuple[list[Sample], LoadReport]:
    """Load `path` (a Flickr8k folder, or a Karpathy/COCO JSON file) with the loader for `fmt`
    (detected from the files when None). JSON formats need image_root; COCO's split defaults to the
    one in the file name (captions_val2017.json -> "val")."""
    fmt = fmt or detect_format(path)
    kw = {} if splits is None else {"splits": tuple(splits)}
    if fmt == "flickr8k":
        return load_flickr8k_kaggle(path, **kw)
    if fmt == "flickr8k-token":
        return load_flickr8k_token(path, **kw)
    if fmt not in ("karpathy", "coco"):
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if image_root is None:
        raise ValueError(f"{path}: the {fmt} format needs image_root= (the folder holding the images)")
    if fmt == "karpathy":
        return load_karpathy(path, image_root, restval_as_train=restval_as_train, **kw)
    if split is None:
        m = re.match(r"captions_([a-z]+)", os.path.basename(path))
        if m is None:
            raise ValueError(f"{path}: cannot tell the COCO split from the file name; pass split=")
        split = m[1]
    return load_coco(path, image_root, split)


# ----------------------------------------------------------------------------- batching


def collate_captions(batch_of_id_lists, pad_id: int = 0):
    """Pad token-id sequences into a LongTensor (T, B), sequence-first, T = the longest sequence."""
    import torch

    seqs = [torch.as_tensor(ids, dtype=torch.long).reshape(-1) for ids in batch_of_id_lists]
    out = torch.full((max((len(s) for s in seqs), default=0), len(seqs)), pad_id, dtype=torch.long)
    for j, s in enumerate(seqs):
        out[: len(s), j] = s
    return out


def bucket_batches(
    lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0, *, pool_batches: int = 100
) -> Iterator[list[int]]:
    """Yield index lists (each index once) grouping similar lengths, to reduce padding.

    shuffle=False: indices sorted by length (stable), cut into batches in order.
    shuffle=True: indices shuffled, cut into pools of pool_batches * batch_size, each pool sorted by
    length and cut into batches, then the batches shuffled. Deterministic for a given seed
    (pass e.g. seed + epoch for a new order each epoch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    if not shuffle:
        order.sort(key=lambda i: lengths[i])
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]
        return
    rng = random.Random(seed)
    rng.shuffle(order)
    pool = batch_size * max(1, pool_batches)
    batches = []
    for p in range(0, len(order), pool):
        chunk = sorted(order[p : p + pool], key=lambda i: lengths[i])
        batches += [chunk[s : s + batch_size] for s in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    yield from batches
