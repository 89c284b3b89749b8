"""Fit a model's familiarity detector and caption confidence, and measure them (issue 32).

    python -m train.assess --data /work/shared/data/flickr8k --outside /tmp/pkgphotos --out captioner/default_model

- Familiarity: the train photos' pooled CNN features, PCA-reduced to --dims, are the bank; a photo's distance is
  1 - its mean cosine similarity to its --k nearest train photos. The threshold is set on the dev photos: the
  distance that --flag of them exceed.
- The word probe (the confidence's second opinion): a linear classifier from the pooled feature to each word that at
  least --probe-min-photos train photos' references use, fitted on train.
- The neighbours (the confidence's third opinion): the train photos' references as word ids, and how many train
  photos use each n-gram (captioner.confidence.Neighbours); a caption is compared with the references of its photo's
  --knn nearest train photos.
- The prior (the confidence's fourth opinion): the train photos' mean backbone features, the "average photo"
  (captioner.confidence.Prior); pmi_content compares a caption's content words' log-probabilities with theirs there.
- Confidence: the dev captions (the CLI's defaults: greedy), their per-image CIDEr-D (pycocoevalcap, dev's own
  document frequencies), a logistic model from captioner.confidence.SIGNALS to "CIDEr-D >= GOOD_CIDER", fitted on
  dev. The numbers reported for it are cross-fitted (each dev photo scored by a model fitted on the other folds),
  so the reliability table is not the fit grading itself.
- Measured: the share of dev flagged, of the non-Flickr8k images flagged (train.outside's synthetic ones, plus every
  image under --outside), AUROC of confidence for poor captions (CIDEr-D < GOOD_CIDER), the least confident 20%'s
  mean CIDEr-D over the rest's, and the reliability table. --report writes them as JSON.

The statistics are written to --out/assessment.safetensors (captioner.familiarity.ASSESS_FILE), beside the model.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np
import torch


def pooled_features(model, images: list[str], cache: str) -> torch.Tensor:
    """(N, F) pooled backbone features, from the feature cache (the attention decoder's regions, averaged)."""
    from train.features import extract_features

    x = extract_features(model, images, cache, progress=False)
    return (x.float().mean(1) if x.dim() == 3 else x.float()).contiguous()


def fit_probe(pooled: torch.Tensor, references: Sequence[Sequence[str]], *, min_photos: int = 20, steps: int = 300,
              l2: float = 1e-3, seed: int = 0, root: bool = True):
    """The word probe (captioner.confidence.WordProbe) on train: targets are "a reference of the photo uses the word"
    for every content word at least `min_photos` photos' references use; with `root`, on the features' square roots."""
    from captioner.confidence import WordProbe, content_words
    from captioner.vocab import tokenize

    sets = [set(content_words([w for r in refs for w in tokenize(r)])) for refs in references]
    counts: dict[str, int] = {}
    for s in sets:
        for w in s:
            counts[w] = counts.get(w, 0) + 1
    words = tuple(sorted(w for w, c in counts.items() if c >= min_photos))
    if not words:
        raise ValueError(f"min_photos={min_photos}: no word is used by that many photos' references")
    index = {w: i for i, w in enumerate(words)}
    y = torch.zeros(len(sets), len(words))
    for i, s in enumerate(sets):
        for w in s:
            if w in index:
                y[i, index[w]] = 1
    inputs = pooled.float().clamp_min(0).sqrt() if root else pooled.float()
    mean, scale = inputs.mean(0), inputs.std(0).clamp_min(1e-6)
    x = (inputs - mean) / scale
    torch.manual_seed(seed)
    weight = torch.zeros(len(words), x.size(1), requires_grad=True)
    prior = y.mean(0).clamp(1e-4, 1 - 1e-4)
    bias = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight.T + bias, y) + l2 * weight.pow(2).sum() / len(words)
        loss.backward()
        opt.step()
    return WordProbe(words, weight.detach(), bias.detach(), mean, scale, root)


def fit_neighbours(vocab, references: Sequence[Sequence[str]], *, k: int = 10, max_words: int = 30):
    """captioner.confidence.Neighbours from the train photos' references (in the familiarity bank's order): their
    words as the model's vocabulary ids (punctuation and unknown words left out) and the n-grams' photo counts."""
    from captioner.confidence import Neighbours, _ngrams
    from captioner.vocab import tokenize

    most = max(len(refs) for refs in references)
    ids = torch.zeros(len(references), most, max_words, dtype=torch.int16)
    df: dict[tuple[int, ...], int] = {}
    for i, refs in enumerate(references):
        grams = set()
        for j, ref in enumerate(refs):
            row = [vocab.stoi[w] for w in tokenize(ref) if any(c.isalpha() for c in w) and w in vocab.stoi][:max_words]
            ids[i, j, : len(row)] = torch.tensor(row, dtype=torch.int16)
            grams.update(g for n in range(1, 5) for g in _ngrams(row, n))
        for g in grams:
            df[g] = df.get(g, 0) + 1
    return Neighbours(ids, {g: c for g, c in df.items() if c > 1}, k)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-2) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(mean, scale, weight, bias) of an L2-regularised logistic regression on standardised x (N, D); NaN at the mean."""
    mean = np.nanmean(x, 0)
    scale = np.nanstd(x, 0)
    scale[scale <= 0] = 1.0
    z = np.nan_to_num((x - mean) / scale)
    xt, yt = torch.tensor(z, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * w.pow(2).sum() / len(yt)
        loss.backward()
        return loss

    opt.step(closure)
    return mean, scale, w.detach().numpy(), float(b.detach())


def predict(params, x: np.ndarray) -> np.ndarray:
    mean, scale, w, b = params
    z = np.nan_to_num((x - mean) / scale)
    return 1 / (1 + np.exp(-(z @ w + b)))


def cross_fitted(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Each row's prediction from a logistic model fitted on the other folds."""
    order = np.random.default_rng(seed).permutation(len(y))
    out = np.empty(len(y))
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        out[test] = predict(fit_logistic(x[train], y[train]), x[test])
    return out


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive's score > a negative's), ties counted half (the Mann-Whitney statistic)."""
    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    s = score[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n1, n0 = positive.sum(), (~positive).sum()
    if not n1 or not n0:
        raise ValueError(f"auroc needs both classes: {n1} positive, {n0} negative")
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def least_confident_ratio(confidence: np.ndarray, cider: np.ndarray, share: float = 0.2) -> float:
    """Mean CIDEr-D of the least confident `share` of captions over the rest's."""
    k = int(round(len(cider) * share))
    order = np.argsort(confidence, kind="mergesort")
    return float(cider[order[:k]].mean() / cider[order[k:]].mean())


def reliability(confidence: np.ndarray, good: np.ndarray, edges=(0, 0.2, 0.4, 0.6, 0.8, 1.0001)) -> list[dict]:
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        m = (confidence >= lo) & (confidence < hi)
        rows.append({"bin": f"{lo:.1f}-{min(hi, 1):.1f}", "captions": int(m.sum()),
                     "mean_confidence": float(confidence[m].mean()) if m.any() else None,
                     "good": float(good[m].mean()) if m.any() else None})
    return rows


def per_image_cider(captions: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
    from pycocoevalcap.cider.cider import Cider

    from train.evaluate import score_tokens

    res = {i: [score_tokens(c) or "<empty>"] for i, c in enumerate(captions)}
    gts = {i: [score_tokens(r) for r in refs] for i, refs in enumerate(references)}
    return np.asarray(Cider().compute_score(gts, res)[1], dtype=float)


def outside_images(folder: str | None) -> dict[str, object]:
    """name -> PIL image: train.outside's synthetic set, plus the photos under `folder`."""
    from captioner.preprocess import ImageError, open_image
    from train.outside import package_photos, synthetic

    out: dict[str, object] = dict(synthetic())
    if folder:
        for name, path in package_photos(folder).items():
            try:
                out[name] = open_image(str(path))
            except ImageError:
                continue
    return out


def main(argv=None) -> int:
    from captioner.confidence import DEFAULT_SIGNALS
    from train.subjects import split_arguments

    p = argparse.ArgumentParser(prog="python -m train.assess", description=__doc__.split("\n\n")[0])
    split_arguments(p, split="dev", cache="/tmp/captioner-features", split_help="where thresholds are set and confidence calibrated")
    p.add_argument("--train-split", default="train")
    p.add_argument("--out", default=None, help="model folder to write assessment.safetensors into (default: write nothing)")
    p.add_argument("--outside", default=None, help="a folder of non-Flickr8k images, measured with the synthetic ones")
    p.add_argument("--dims", type=int, default=256, help="dimensions of the familiarity space (and the neighbours')")
    p.add_argument("--k", type=int, default=10, help="nearest train photos averaged")
    p.add_argument("--flag", type=float, default=0.04, help="share of the dev photos the threshold flags")
    p.add_argument("--knn", type=int, default=10, help="nearest train photos whose references give the knn_ signals")
    p.add_argument("--signals", default=",".join(DEFAULT_SIGNALS),
                   help="comma-separated captioner.confidence.SIGNALS the calibration uses")
    p.add_argument("--probe-min-photos", type=int, default=20)
    p.add_argument("--report", default=None, help="write the measurements here as JSON")
    args = p.parse_args(argv)

    from captioner.confidence import GOOD_CIDER, SIGNALS, Assessor, Calibration, Prior, knn_signals, signals
    from captioner.decode import caption_batch
    from captioner.familiarity import degenerate, fit, save, threshold_for
    from captioner.generation import GenerationConfig
    from captioner.loading import load_model
    from captioner.preprocess import preprocess
    from train.data import load_dataset

    torch.manual_seed(0)
    model = load_model(args.model)
    train, _ = load_dataset(args.data, splits=(args.train_split,))
    dev, _ = load_dataset(args.data, splits=(args.split,))
    dev = dev[: args.limit] if args.limit else dev
    print(f"features: {len(train)} {args.train_split} and {len(dev)} {args.split} photos", file=sys.stderr)
    train_x = pooled_features(model, [s.image for s in train], args.cache)
    dev_x = pooled_features(model, [s.image for s in dev], args.cache)

    det = fit(train_x, dims=args.dims, k=args.k)
    dev_d = det.distance(dev_x)
    threshold = threshold_for(dev_d, args.flag)
    from dataclasses import replace

    det = replace(det, threshold=threshold, about={"fitted_on": f"{args.train_split}, {len(train)} photos",
                                                   "threshold_set_on": f"{args.split}, {len(dev)} photos",
                                                   "dev_flagged": round(float((dev_d > threshold).float().mean()), 4),
                                                   "dims": args.dims})
    images = outside_images(args.outside)
    with torch.inference_mode():
        xs = torch.stack([preprocess(img, model.config) for img in images.values()])
        out_x = torch.cat([model.encoder.backbone_features(xs[i : i + 16]) for i in range(0, len(xs), 16)]).float()
        out_x = out_x.mean(1) if out_x.dim() == 3 else out_x
    out_d = det.distance(out_x)
    rules = [degenerate(img) for img in images.values()]
    out_flag = [(d > threshold) or bool(r) for d, r in zip(out_d.tolist(), rules)]
    print(f"familiarity: threshold {threshold:.4f}; dev flagged {float((dev_d > threshold).float().mean()):.1%}; "
          f"non-Flickr8k flagged {sum(out_flag)}/{len(out_flag)} (by distance alone {int((out_d > threshold).sum())}, "
          f"by rule {sum(bool(r) for r in rules)})", file=sys.stderr)
    dev_auroc_fam = auroc(torch.cat([dev_d, out_d]).numpy(), np.r_[np.zeros(len(dev_d)), np.ones(len(out_d))])

    probe = fit_probe(train_x, [s.captions for s in train], min_photos=args.probe_min_photos)
    print(f"word probe: {len(probe.words)} words", file=sys.stderr)
    neighbours = fit_neighbours(model.vocab, [s.captions for s in train], k=args.knn)
    print(f"neighbours: {len(neighbours.df)} n-grams of 2+ train photos", file=sys.stderr)

    # Dev captions with the CLI's defaults, their records, their quality
    model_features = model.encoder.eval()
    from train.features import extract_features

    grid = extract_features(model, [s.image for s in dev], args.cache, progress=False)
    train_grid = extract_features(model, [s.image for s in train], args.cache, progress=False)  # half precision
    prior = Prior(train_grid.mean(0, dtype=torch.float32))  # (N, F) or (F,), with no float32 copy of every photo
    with torch.inference_mode():
        feats = model_features.from_backbone(grid.float())
    lasts = caption_batch(model, config=GenerationConfig(num_alternatives=0), features=feats, steps=True)
    captions = [last.text if last is not None else "" for last in lasts]
    cider = per_image_cider(captions, [s.captions for s in dev])
    good = cider >= GOOD_CIDER
    names = tuple(n for n in args.signals.split(",") if n)
    bad = [n for n in names if n not in SIGNALS]
    if bad:
        raise ValueError(f"--signals {bad}: expected some of {', '.join(SIGNALS)}")
    rows = []
    for i, last in enumerate(lasts):
        steps = last.caption_steps() if last is not None else ()
        v = signals([s.prob for s in steps], [s.word for s in steps], dev_x[i],
                    None if feats.labels is None else feats.labels[i], probe, float(dev_d[i]),
                    knn_signals(det, neighbours, dev_x[i], steps), prior.logprobs(model, [s.token for s in steps]))
        rows.append([v[n] for n in SIGNALS])
    every = np.asarray(rows, dtype=float)
    x = every[:, [SIGNALS.index(n) for n in names]]
    crossed = cross_fitted(x, good.astype(float))
    mean, scale, w, b = fit_logistic(x, good.astype(float))
    calibration = Calibration(names, tuple(map(float, mean)), tuple(map(float, scale)), tuple(map(float, w)), b,
                              {"fitted_on": f"{args.split}, {len(dev)} captions (greedy)", "good": f"CIDEr-D >= {GOOD_CIDER}"})
    only_lp = cross_fitted(x[:, [names.index("mean_logprob")]], good.astype(float)) if "mean_logprob" in names else None
    report = {
        "dev_photos": len(dev), "train_photos": len(train), "threshold": threshold,
        "dev_flagged": float((dev_d > threshold).float().mean()),
        "outside_images": len(out_flag), "outside_flagged": sum(out_flag) / len(out_flag),
        "outside_missed": [n for n, f in zip(images, out_flag) if not f],
        "familiarity_auroc_dev_vs_outside": dev_auroc_fam,
        "dev_greedy_cider_mean": float(cider.mean()), "poor_share": float((~good).mean()),
        "confidence_auroc_poor": auroc(-crossed, ~good), "least_confident_20_ratio": least_confident_ratio(crossed, cider),
        "mean_logprob_auroc_poor": auroc(-x[:, names.index("mean_logprob")], ~good) if "mean_logprob" in names else None,
        "mean_logprob_ratio": least_confident_ratio(x[:, names.index("mean_logprob")], cider) if "mean_logprob" in names else None,
        "mean_logprob_calibrated_auroc": auroc(-only_lp, ~good) if only_lp is not None else None,
        "per_signal_auroc_poor": {n: auroc(-np.nan_to_num(every[:, j], nan=np.nanmean(every[:, j])), ~good)
                                  for j, n in enumerate(SIGNALS) if not np.isnan(every[:, j]).all()},
        "reliability_crossfitted": reliability(crossed, good),
        "calibration": calibration.record(),
    }
    print(json.dumps({k: v for k, v in report.items() if k not in ("calibration",)}, indent=1))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump({**report, "captions": captions, "cider": cider.tolist(), "confidence_crossfitted": crossed.tolist(),
                       "distance": dev_d.tolist(), "outside": dict(zip(images, out_d.tolist()))}, f, indent=1)
    if args.out:
        conf = {"calibration": calibration.record(), "probe_words": list(probe.words), "probe_root": probe.root,
                "knn": neighbours.record()}
        path = save(args.out, det, conf, {**probe.tensors(), **neighbours.tensors(), **prior.tensors()})
        Assessor.read(args.out)  # what was written must load
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
