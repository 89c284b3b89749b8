"""Issue 35's rows, the new path beside the old one, measured in one process and interleaved call by call:

  before  PyTorch eager encoder (fused, channels_last), torch's dynamic int8 decoder (batch-dependent, so batches
          decoded image by image) and `caption()` through the inspector's stream of records
  after   the encoder in ONNX Runtime (captioner/runtime.py; PyTorch where absent), the batch-invariant int8 decoder
          (captioner/int8.py), whole batches decoded together, `caption()` without records

    python -m benchmarks.folders [--model SRC] [--threads 2] [--photos 96] [--quick] [--json out.json]

Rows: a decoder step (batch 1 and 32), first word, a greedy caption from a JPEG file, the seed's design
(InceptionV3@299 + LSTM, random weights, 16 words) on the same input, batch 32 photos/s, 96 photos batched against
one at a time, the CLI on a folder of 96 (a subprocess, cold start included), load time (cold start) and peak RSS
of a process that loads the model and captions 8 photos. Times are medians; a shared machine moves them, the ratios
within one row much less.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .common import ROOT, log, measure_interleaved

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"


def _photos(n: int) -> list[str]:
    names = (FLICKR / "Flickr_8k.devImages.txt").read_text().split()[:n] if (FLICKR / "Images").is_dir() else []
    if len(names) == n:
        return [str(FLICKR / "Images" / x) for x in names]
    import numpy as np
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="bench-photos-"))
    out = []
    for i in range(n):  # synthetic JPEGs where Flickr8k is absent
        p = folder / f"{i:03d}.jpg"
        Image.fromarray((np.random.RandomState(i).rand(375, 500, 3) * 255).astype("uint8")).save(p, quality=90)
        out.append(str(p))
    return out


def _old_decoder(model):
    """The decoder as it was: torch's dynamic quantization of the same layers."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = ("cell", "query", "gate") if model.decoder.uses_grid else ("head",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(model.decoder, {n: per_channel_dynamic_qconfig for n in names}, inplace=True)
    return model


def _child(code: str, env: dict | None = None) -> dict:
    """Run `code` in a fresh interpreter (cold start, RSS); it prints one JSON line last."""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, **(env or {})})
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


LOAD_AND_CAPTION = """
import json, sys, time, torch
torch.set_num_threads({threads})
t = time.perf_counter()
from captioner.loading import load_model
from captioner.decode import caption_batch
m = load_model({src!r}, runtime={runtime!r})
loaded = time.perf_counter() - t
caption_batch(m, {photos!r})
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps(dict(load_s=loaded, runtime=m.encoder.runtime, precision=m.precision,
                      peak_rss_mb=int(status["VmHWM"].split()[0]) / 1024, rss_mb=int(status["VmRSS"].split()[0]) / 1024)))
"""  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child would report its parent's peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.folders", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--photos", type=int, default=96)
    p.add_argument("--quick", action="store_true", help="few repeats: checks that it runs")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warmup, repeat = (1, 3) if args.quick else (3, 15)

    from captioner.decode import caption, caption_batch, final, generate_batch
    from captioner.generation import GenerationConfig
    from captioner.loading import DEFAULT_MODEL, load_model
    from captioner.preprocess import preprocess, preprocess_batch

    src = args.model or str(DEFAULT_MODEL)
    photos = _photos(args.photos)
    log(f"model {src}, {len(photos)} photos, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    after = load_model(src, precision="auto")
    before = load_model(src, precision="fp32", runtime="torch")
    if after.precision != "fp32":
        before = _old_decoder(before)  # auto's int8 decoder, as it was
        before.precision = after.precision
    fp32 = load_model(src, precision="fp32", runtime="torch")
    rows: list[dict] = []

    def row(what, b, a, unit="ms", note=""):
        ratio = (b / a if unit == "ms" else a / b) if a and b else None
        rows.append(dict(what=what, before=b, after=a, unit=unit, ratio=ratio, note=note))
        log(f"  {what}: before {b:.2f} {unit}, after {a:.2f} {unit}")

    config = GenerationConfig()
    jpeg = photos[0]
    with torch.inference_mode():
        x = preprocess(jpeg, after.config).unsqueeze(0)
        feats = {k: m.encode(preprocess_batch(photos[:32], m.config)) for k, m in (("before", before), ("after", after))}
        for b in sorted({1, min(32, len(photos))}):
            f = {k: v.select(slice(0, b)) for k, v in feats.items()}
            states = {"fp32": fp32.decoder.start(feats["before"].select(slice(0, b)))[1]}
            states.update({k: m.decoder.start(f[k])[1] for k, m in (("before", before), ("after", after))})
            tok = torch.full((b,), 4)
            st = measure_interleaved({k: (lambda k=k, m=m: m.decoder.step(tok, states[k]))
                                      for k, m in (("fp32", fp32), ("before", before), ("after", after))},
                                     warmup=warmup, repeat=repeat * 4)
            row(f"decoder step, batch {b}", st["before"].median_ms, st["after"].median_ms,
                note=f"float32: {st['fp32'].median_ms:.2f} ms")
        st = measure_interleaved({"before": lambda: before.decoder.start(before.encode(x)),
                                  "after": lambda: after.decoder.start(after.encode(x))}, warmup=warmup, repeat=repeat)
        row("first word (encoder + start, from the image tensor)", st["before"].median_ms, st["after"].median_ms)
        st = measure_interleaved({"before": lambda: before.encode(x), "after": lambda: after.encode(x)},
                                 warmup=warmup, repeat=repeat)
        row("encoder, batch 1", st["before"].median_ms, st["after"].median_ms,
            note=f"after: {after.encoder.runtime}")

    def old_caption(path):  # caption() as it was: the stream of records, drained
        out = final(before, path, config)
        return out.text if out else ""

    from .peers import build_inception

    _, seed_run, _, seed_note, _ = build_inception(after, "full" if not args.quick else "smoke")
    st = measure_interleaved({"before": lambda: old_caption(jpeg), "after": lambda: caption(after, jpeg),
                              "seed": lambda: seed_run(1)}, warmup=warmup, repeat=repeat)
    row("greedy caption, JPEG file to text", st["before"].median_ms, st["after"].median_ms)
    seed_ms = st["seed"].median_ms
    rows.append(dict(what="the seed's design, greedy (tensor in, 16 words)", before=seed_ms, after=seed_ms, unit="ms",
                     ratio=None, note=f"{seed_note}; ours vs it: before {seed_ms / st['before'].median_ms:.1f}x, "
                                      f"after {seed_ms / st['after'].median_ms:.1f}x faster"))
    log(f"  seed: {seed_ms:.1f} ms: before {seed_ms / st['before'].median_ms:.1f}x, after {seed_ms / st['after'].median_ms:.1f}x")

    def old_batch(paths):  # caption_batch as it was for an int8 decoder: encoder batched, decoding image by image
        with torch.inference_mode():
            f = before.encode(preprocess_batch(paths, before.config))
            return [before.vocab.decode(generate_batch(before, f.select(slice(i, i + 1)), GenerationConfig(max_len=20))[0].tolist())
                    for i in range(len(paths))]

    reps = dict(warmup=1, repeat=2 if args.quick else 5)
    st = measure_interleaved({"before": lambda: old_batch(photos[:32]), "after": lambda: caption_batch(after, photos[:32])}, **reps)
    k = len(photos[:32])
    row(f"caption_batch, {k} photos", k * 1e3 / st["before"].median_ms, k * 1e3 / st["after"].median_ms, unit="photos/s")
    n = len(photos)
    reps = dict(warmup=0, repeat=1 if args.quick else 3)
    st = measure_interleaved({"batched": lambda: caption_batch(after, photos),
                              "one at a time": lambda: [caption(after, p) for p in photos],
                              "before batched": lambda: [x for i in range(0, n, 32) for x in old_batch(photos[i:i + 32])],
                              "before one at a time": lambda: [old_caption(p) for p in photos]}, **reps)
    rate = {k: n * 1e3 / v.median_ms for k, v in st.items()}
    row(f"{n} photos batched / one at a time", rate["before batched"] / rate["before one at a time"],
        rate["batched"] / rate["one at a time"], unit="x", note=f"after: {rate['batched']:.1f} against "
        f"{rate['one at a time']:.1f} photos/s; before: {rate['before batched']:.1f} against {rate['before one at a time']:.1f}")
    same = caption_batch(after, photos) == [caption(after, p) for p in photos]
    rows.append(dict(what=f"{n} batch captions identical to one-at-a-time (after)", before=None, after=int(same) * n,
                     unit="photos", ratio=None, note="all" if same else "NOT all"))
    # each against float32 with the same encoder runtime: a caption at a near-tie moves with the encoder's last digits
    fp32_after = load_model(src, precision="fp32")
    same_before = sum(a == b for a, b in zip(caption_batch(fp32, photos[:100]), caption_batch(before, photos[:100])))
    same_after = sum(a == b for a, b in zip(caption_batch(fp32_after, photos[:100]), caption_batch(after, photos[:100])))
    rows.append(dict(what="greedy captions identical to float32's", before=same_before, after=same_after,
                     unit=f"of {min(100, n)}", ratio=None, note=after.precision))

    # CLI on a folder, and cold start and RSS, each in a fresh process
    folder = Path(tempfile.mkdtemp(prefix="bench-folder-"))
    for i, p in enumerate(photos):
        os.symlink(p, folder / f"{i:03d}{Path(p).suffix}")
    cache = tempfile.mkdtemp(prefix="bench-cache-")
    cli = {}
    for label, env in (("onnx cold", {"CAPTIONER_CACHE": cache}), ("torch", {"CAPTIONER_ENCODER_RUNTIME": "torch"}),
                       ("onnx", {"CAPTIONER_CACHE": cache})):  # the first exports the graph, the second finds it
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "captioner", str(folder), "--model", src, "--json"], cwd=ROOT, check=True,
                       capture_output=True, env={**os.environ, **env, "OMP_NUM_THREADS": str(args.threads)})
        cli[label] = time.perf_counter() - t
    row(f"CLI on a folder of {n}, wall time (load included)", cli["torch"], cli["onnx"], unit="s",
        note=f"before: PyTorch encoder (the decoder is the new one in both); onnx exporting first: {cli['onnx cold']:.1f} s")
    rows[-1]["ratio"] = cli["torch"] / cli["onnx"]
    code = lambda runtime: LOAD_AND_CAPTION.format(threads=args.threads, src=src, runtime=runtime, photos=photos[:8])  # noqa: E731
    empty = tempfile.mkdtemp(prefix="bench-cold-")
    torch_run = _child(code("torch"))
    cold = _child(code("onnx"), {"CAPTIONER_CACHE": empty})  # exports the graph
    warm = _child(code("onnx"), {"CAPTIONER_CACHE": empty})  # finds it
    assert (torch_run["runtime"], warm["runtime"]) == ("torch", "onnx"), (torch_run, warm)
    rows.append(dict(what="load_model (cold start)", before=torch_run["load_s"], after=warm["load_s"], unit="s", ratio=None,
                     note=f"onnx with an empty cache (export): {cold['load_s']:.1f} s"))
    rows.append(dict(what="peak RSS, load + 8 captions", before=torch_run["peak_rss_mb"], after=warm["peak_rss_mb"], unit="MB",
                     ratio=None, note=f"onnx exporting: {cold['peak_rss_mb']:.0f} MB"))
    rows.append(dict(what="RSS after load + 8 captions", before=torch_run["rss_mb"], after=warm["rss_mb"], unit="MB",
                     ratio=None, note=""))

    print(f"\n## Issue 35: before and after ({args.threads} threads, model {src}, load average at the start "
          f"{os.getloadavg()[0]:.1f})\n")
    print("| what | before | after | unit | ratio | note |\n| --- | --- | --- | --- | --- | --- |")
    fmt = lambda v: "" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    for r in rows:
        print(f"| {r['what']} | {fmt(r['before'])} | {fmt(r['after'])} | {r['unit']} | "
              f"{'' if r['ratio'] is None else format(r['ratio'], '.2f') + 'x'} | {r['note']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "threads": args.threads, "model": src}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
