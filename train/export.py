"""Export a training run's best model as a Hub-format folder with a model card.

    python -m train.export --run runs/flickr8k --out captioner/default_model
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from captioner.hub import MODEL_FILES
from captioner.lite0 import VARIANTS as LITE_VARIANTS
from captioner.model import Captioner
from train.backbones import weights_source
from train.checkpoint import trainer_state

CITATION = """M. Hodosh, P. Young and J. Hockenmaier (2013). "Framing Image Description as a Ranking Task: Data,
Models and Evaluation Metrics". Journal of Artificial Intelligence Research, 47, 853-899."""


def metrics_table(rows: dict) -> str:
    from train.evaluate import format_table

    return format_table(rows) if rows else "_not evaluated_"


def _train_config(run: Path) -> dict:
    """The settings a run was trained with (from its checkpoint), or {} where it has none."""
    return trainer_state(run).get("train_config", {})


def _runs(model, run: Path | None, train_config: dict) -> list[tuple[dict, list[dict]]]:
    """(train config, epochs in these weights) for each run behind the model, oldest first: a run started with
    --init continues the run whose best/ it started from."""
    chain, extra, tc = [], model.config.extra, train_config
    while run is not None:
        history = []
        if (run / "metrics.jsonl").exists():
            history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            shipped = extra.get("trained_epochs")  # the best epoch: later epochs are not in these weights
            history = [h for h in history if shipped is None or h["epoch"] <= shipped]
        chain.insert(0, (tc, history))
        init = None
        if extra.get("init"):  # a run's name (train.train.run_name), beside this run; older models stored a path
            init = next((p for p in (run.parent / extra["init"] / "best", Path(extra["init"])) if (p / "config.json").exists()), None)
        if init is None:
            break
        extra = json.loads((init / "config.json").read_text()).get("extra", {})
        run = init.parent
        tc = _train_config(run)
    return chain


def _stage(tc: dict, history: list[dict]) -> str:
    xe = sum(1 for h in history if h.get("phase") == "xe")
    scst = sum(1 for h in history if h.get("phase") == "scst")
    parts = []
    if xe:
        views = tc.get("augment_views") or 0
        planned = tc.get("epochs") or xe
        best_of = f" (the best of {planned})" if planned > xe else ""
        parts.append(f"{xe} epochs{best_of} of teacher forcing (AdamW, lr {tc.get('lr')}, batch {tc.get('batch_size')}, label smoothing "
                     f"{tc.get('label_smoothing')}, dropout {tc.get('dropout')}, "
                     + ("lr halved after each epoch without a new best dev CIDEr-D" if tc.get("lr_schedule") == "plateau"
                        else "cosine schedule") + f", gradient clipping {tc.get('grad_clip')}"
                     + (f"; each caption saw the plain image or one of {views} cached random-crop/mirror views" if views else "") + ")")
    if scst:
        k = tc.get("scst_top_k") or 0
        parts.append(f"{scst} epochs of self-critical sequence training (reward CIDEr-D, baseline the mean reward of the other "
                     f"{tc.get('scst_samples', 5) - 1} samples of the same image, lr {tc.get('scst_lr')}"
                     + (" decaying to 5% of itself on a cosine" if tc.get("scst_schedule") == "cosine" else "")
                     + (f", plus {tc['scst_xe_weight']} x the teacher-forcing loss" if tc.get("scst_xe_weight") else "")
                     + (f", samples drawn from the top {k} words" if k else "") + ")")
    tuned = (f", the CNN's last {tc['tune_top_stages']} stage(s) and head conv trained too (at {tc.get('tune_lr_scale')} x "
             f"the lr, on cached maps of the frozen stages below)") if tc.get("tune_top_stages") else ""
    minutes = sum(h.get("seconds", 0) for h in history) / 60
    threads = sorted({h["threads"] for h in history if "threads" in h})  # runs from before this field have none
    on = f" on {' or '.join(map(str, threads))} CPU thread{'s' if threads != [1] else ''}" if threads else ""
    precisions = sorted({h["precision"] for h in history if "precision" in h})
    on += f" in {' and '.join(precisions)} (autocast; float32 weights)" if precisions and precisions != ["fp32"] else ""
    return " then ".join(parts) + f"{tuned}: {minutes:.0f} minutes of epochs{on}" if parts else "no recorded epochs"


def model_card(model, run: Path | None, final: dict, train_config: dict, repo_hint: str) -> str:
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    chain = _runs(model, run, train_config)
    tc = chain[0][0] or train_config  # the first run built the vocabulary
    data = tc.get("data", "?")
    built = "timm's architecture; `captioner/lite0.py` builds it without timm" if c.backbone in LITE_VARIANTS else "timm"
    weights = f"ImageNet weights\n  from {weights_source(c.backbone)}" if tc.get("pretrained", True) else "randomly initialised (no ImageNet weights)"
    stages = "\n".join(f"- Run {i + 1}: {_stage(t, h)}." for i, (t, h) in enumerate(chain))
    tuned = [t["tune_top_stages"] for t, _ in chain if t.get("tune_top_stages")]
    if c.decoder == "attend":
        score = ("Xu's score, w . tanh(key + query), of a query from the state\n  and each region's key" if c.attention_score == "mlp"
                 else "a scaled dot product of a query from the state\n  with each region's key")
        decoder = (f"soft attention (Show, Attend and Tell, Xu et al. 2015): at every word the LSTM state ({c.hidden_size} "
                   f"hidden)\n  weighs the backbone's {c.image_size // 32}x{c.image_size // 32} spatial regions, each projected "
                   f"to {c.region_size or c.embed_size} ({score}, size {c.attention_size}); the gated "
                   f"weighted sum enters the LSTM with the previous word (embedding {c.embed_size});\n  initial state from "
                   f"the pooled image vector; linear to {c.vocab_size} words. Each word's attention weights are in its\n"
                   f"  decoding record (the app draws them as a heatmap).")
    else:
        decoder = (f"word embedding ({c.embed_size}), {c.num_layers}-layer LSTM ({c.hidden_size} hidden), linear to\n"
                   f"  {c.vocab_size} words. The image feature is the LSTM's input at t=0, `<SOS>` at t=1, then the caption's words.")
    frozen = (f"Frozen during training, except its last {max(tuned)} stage(s) and head conv (see Training)." if tuned
              else "Frozen during training.")
    return f"""---
library_name: captioner
pipeline_tag: image-to-text
license: other
license_name: research-and-demo
tags: [image-captioning, image-to-text, lstm, {"show-attend-and-tell" if c.decoder == "attend" else "show-and-tell"}, efficientnet]
datasets: [flickr8k]
---
# Captioner: EfficientNet-Lite0 + LSTM, trained on Flickr8k

A small {"Show, Attend and Tell" if c.decoder == "attend" else "Show-and-Tell"} image captioner ({n_params / 1e6:.1f} M parameters)
for fast captioning on a laptop CPU, with a
decoder that streams its choices one word at a time (see the `captioner` project and its Gradio app).

## Architecture
- **Encoder**: `{c.backbone}` ({built}), {weights}, global-pooled, then Linear -> ReLU -> Dropout
  to {c.embed_size} dims. {frozen}
- **Decoder**: {decoder}
- **Preprocessing** (stored in `config.json`): {c.image_size}x{c.image_size}, resize policy `{c.resize}`, mean {list(c.mean)},
  std {list(c.std)}.

## Training
- Data: Flickr8k (`{data}`), official **train** split (6,000 images x 5 captions); model selection on the
  **dev** split (1,000 images). The test split was not used.
{stages}
- On cached encoder features, CPU. Vocabulary: the {c.vocab_size - 4} words seen at least {tc.get('min_freq')} times
  in the training captions (spaCy tokenisation, lower case), plus `<PAD>`, `<SOS>`, `<EOS>`, `<UNK>`.

## Results (Flickr8k dev split, corpus-level pycocoevalcap scores, 5 references per image)
{metrics_table(final)}

Decoding: greedy, and beam search (length penalty 1.0). `distinct` is the share of distinct captions over the
1,000 dev images. Hypotheses and references are tokenised the same way (spaCy, punctuation removed).

## Intended use and limitations
- A research and demonstration model: captions for everyday photos like Flickr8k's (people, dogs, sports,
  outdoor scenes). Outside that domain (documents, art, medical images, close-ups of objects) it guesses
  with the words it knows, often wrongly; it has no notion of text in images.
- It can be confidently wrong and can repeat biases of its training captions (for example about gender or age).
  Do not use it for decisions about people or for accessibility where accuracy matters.
- One small model{"" if c.decoder == "attend" else ", no attention"}: captions are short and generic compared with large captioning transformers.

## How to use
```python
from captioner import Captioner
from captioner.decode import caption, stream
model = Captioner.from_pretrained("{repo_hint}")  # a local folder or a Hub repo id (revision="..." to pin)
print(caption(model, "photo.jpg", strategy="beam", beam_size=3))
for step in stream(model, "photo.jpg"):           # one record per word, with top-k alternatives
    print(step.word, round(step.prob, 2), [a.word for a in step.alternatives])
```
Files: `config.json` (hyperparameters and preprocessing), `model.safetensors` (weights), `vocab.json`.

## Data terms and citation
The photos of Flickr8k come from Flickr and belong to their owners; the corpus is distributed for research use.
This model is therefore for research and demonstration use. If you use it, cite the corpus:

> {CITATION}
"""


def _halve(weights: Path) -> None:
    """Store the floating-point weights in float16 (half the download and the repository's size); loading casts them
    back to the model's float32, so only the weights' rounding changes, not the arithmetic."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(weights), metadata={"format": "pt"})


def export(run: Path, out: Path, *, repo_hint: str = "path/to/model", half: bool = False) -> Path:
    best = run / "best"
    model = Captioner.from_pretrained(best)
    final = json.loads((run / "final_metrics.json").read_text()) if (run / "final_metrics.json").exists() else {}
    train_config = _train_config(run)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in MODEL_FILES:
        shutil.copy2(best / f, tmp / f)
    if half:
        _halve(tmp / "model.safetensors")
    (tmp / "README.md").write_text(model_card(model, run, final, train_config, repo_hint))
    if (run / "plot.png").exists():
        shutil.copy2(run / "plot.png", tmp / "training.png")
    Captioner.from_pretrained(tmp)  # the exported folder must load before it replaces anything
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description="Export a run's best model with a model card.")
    p.add_argument("--run", required=True, help="training run folder (holds best/, metrics.jsonl, final_metrics.json)")
    p.add_argument("--out", required=True, help="destination folder (replaced)")
    p.add_argument("--repo-hint", default="captioner/default_model", help="the source shown in the card's usage example")
    p.add_argument("--half", action="store_true", help="store the weights in float16 (loaded back as float32): half the size")
    args = p.parse_args(argv)
    try:
        path = export(Path(args.run), Path(args.out), repo_hint=args.repo_hint, half=args.half)
    except Exception as e:  # noqa: BLE001 - a CLI reports, the traceback helps nobody here
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
