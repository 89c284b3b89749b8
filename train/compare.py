"""Captions of two or more models side by side, on photos chosen before training: read them, not only the scores.

    python -m train.compare --models captioner/default_model runs/e2e/best --outside /tmp/outside

Three sets, the same for every model and every run (issue 33):
- the example photos (examples/*.jpg);
- 20 dev photos: every 50th of the dev split's list, fixed before any training;
- up to 20 photos that are not Flickr8k scenes, from the folders given with --outside (for example the images that
  scikit-image, scikit-learn and matplotlib ship: docs/familiarity.md says how to unpack them), in name order.
Each model captions as the CLI does by default (greedy, the model's own precision plan). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dev_photos(data: Path, n: int = 20, every: int = 50) -> list[Path]:
    """Every `every`th photo of the dev list, the first `n` of them: a choice that no training run can influence."""
    names = [line.strip() for line in (data / "Flickr_8k.devImages.txt").read_text().splitlines() if line.strip()]
    return [data / "Images" / name for name in names[::every][:n]]


def outside_photos(folders: list[Path], n: int = 20) -> list[Path]:
    """The first `n` photos under the folders, in file-name order (train.outside.package_photos lists each folder)."""
    from train.outside import package_photos

    return sorted({p for f in folders for p in package_photos(f).values()}, key=lambda p: p.name)[:n]


def caption_all(src: str, photos: list[Path]) -> list[str]:
    from captioner import load_model
    from captioner.decode import caption_batch

    model = load_model(src)
    return caption_batch(model, [str(p) for p in photos])


def table(sets: dict[str, list[Path]], models: list[str], captions: dict[str, list[str]]) -> str:
    lines = ["| set | photo | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    i = 0
    for name, photos in sets.items():
        for p in photos:
            lines.append(f"| {name} | {p.name} | " + " | ".join(captions[m][i] for m in models) + " |")
            i += 1
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="model folders or Hub ids, in the table's column order")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flickr8k"), help="Flickr8k folder")
    p.add_argument("--outside", nargs="*", default=[], help="folders of photos that are not Flickr8k scenes")
    args = p.parse_args(argv)
    data = Path(args.data)
    if not (data / "Flickr_8k.devImages.txt").exists():
        print(f"{data}: no Flickr_8k.devImages.txt; pass --data FLICKR8K_FOLDER", file=sys.stderr)
        return 2
    sets = {"example": sorted((ROOT / "examples").glob("*.jpg")), "dev": dev_photos(data),
            "outside": outside_photos([Path(f) for f in args.outside])}
    photos = [p for group in sets.values() for p in group]
    captions = {m: caption_all(m, photos) for m in args.models}
    print(table(sets, args.models, captions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
