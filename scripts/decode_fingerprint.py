"""Captions of the first N Flickr8k dev photos with the bundled model, greedy, beam 3 and guided, with every word's
probability: run before and after a change to decoding, and compare the two JSON files (a refactor changes no output).

    python scripts/decode_fingerprint.py OUT.json [--data ../shared/data/flickr8k] [--n 200]
    cmp before.json after.json

Each photo is encoded once (in batches of --batch-size) and decoded from its features; compare runs with the same
--batch-size, since the float32 encoder's last digits depend on the batch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's captioner, not an installed one
from captioner import Captioner
from captioner.decode import caption_batch, final
from captioner.generation import GenerationConfig
from captioner.preprocess import open_image, preprocess_batch

STRATEGIES = {"greedy": GenerationConfig(strategy="greedy"), "beam3": GenerationConfig(strategy="beam", beam_size=3),
              "guided": GenerationConfig(strategy="guided", beam_size=3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "../shared/data/flickr8k"))
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=20)
    args = p.parse_args()
    data = Path(args.data)
    names = (data / "Flickr_8k.devImages.txt").read_text().split()[: args.n]
    model = Captioner.from_pretrained()
    out: dict = {"precision": model.precision, "photos": {}}
    with torch.inference_mode():
        for start in range(0, len(names), args.batch_size):
            part = names[start : start + args.batch_size]
            features = model.encode(preprocess_batch([open_image(data / "Images" / n) for n in part], model.config))
            batched = caption_batch(model, config=STRATEGIES["greedy"], features=features)  # generate_batch's path
            for i, name in enumerate(part):
                one = features.select(slice(i, i + 1))
                rec = {"greedy_batched": batched[i]}
                for key, config in STRATEGIES.items():
                    last = final(model, config=config, features=one)
                    steps = last.caption_steps() if last is not None else ()
                    rec[key] = {"caption": last.text if last is not None else "", "stop": last and last.stop,
                                "probs": [s.prob for s in steps], "logprobs": [s.logprob for s in steps],
                                "eos_probs": [s.eos_prob for s in steps],
                                "constraint": None if last is None or last.constraint is None else last.constraint.record()}
                out["photos"][name] = rec
            print(f"{start + len(part)}/{len(names)}", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
