"""Run the benchmarks: markdown tables on stdout, everything in JSON.

    python -m benchmarks.run [--quick] [--model SRC] [--threads N] [--json PATH]
                             [--sections latency,batch,peers,app,train,decoders,precision,eyes] [--peer-scale full|tiny]

--model: a model folder or Hub repo id; "random" for the default architecture with random weights. Without it:
the bundled captioner/default_model, else runs/flickr8k/best, else random weights (said in the output).
--quick checks that everything runs (few repeats); its numbers are rough. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

SECTIONS = ("latency", "batch", "peers", "app", "train", "decoders", "precision", "eyes")
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"

# Targets of the issue "Fast on a laptop CPU, measured against the alternatives users would pick".
TARGETS = [
    # key, description, goal, comparison
    ("greedy_ms", "whole greedy caption (encoder included)", 30.0, "<="),
    ("first_word_ms", "time to first streamed word", 25.0, "<="),
    ("blip_x", "faster than BLIP-base, greedy (x)", 20.0, ">="),
    ("vitgpt2_x", "faster than ViT-GPT2, greedy (x)", 10.0, ">="),
    ("beam_over_greedy", "beam 3 / greedy (x)", 1.5, "<="),
    ("batch32_ips", "batch-32 throughput (images/s)", 100.0, ">="),
    ("app_cold_start_s", "app cold start to first page (s)", 6.0, "<="),
    ("app_rss_mb", "server memory after 100 captions (MB)", 700.0, "<="),
    ("app_rss_growth_mb", "server memory growth, 2nd half of the 100 captions (MB)", 20.0, "<="),
    ("attend_greedy_x", "attention decoder / Show-and-Tell, whole greedy caption (x)", 1.3, "<="),
    ("attend_first_word_x", "attention decoder / Show-and-Tell, first streamed word (x)", 1.2, "<="),
]


def _status(value, goal, op) -> str:
    if value is None:
        return "n/a"
    ok = value <= goal if op == "<=" else value >= goal
    return "pass" if ok else "MISS"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few repeats: checks the script works; numbers are rough")
    p.add_argument("--model", default=None, help="model folder or Hub repo id, or 'random' (default: bundled, else runs/flickr8k/best, else random)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results (default: benchmarks/results.json)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--attend-model", default=None,
                   help="decoders section: a trained attention model to time against --model (default: both random)")
    p.add_argument("--peer-scale", choices=["full", "tiny"], default="full", help="tiny: toy peer configs (smoke tests)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                   help="the precision sections 1-4 run the model at (default: auto, what the CLI and the app pick here)")
    args = p.parse_args(argv)
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    bad = set(sections) - set(SECTIONS)
    if bad:
        p.error(f"unknown section(s) {sorted(bad)}; expected some of {', '.join(SECTIONS)}")

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="TF32 acceleration")  # torch.backends.mkldnn.flags() on a CPU build
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from . import common
    from .common import Settings, log, md_table

    s = Settings.make(args.quick)
    t_start = time.perf_counter()
    machine = common.machine_facts()
    model, model_desc = common.load_bench_model(args.model, args.precision)
    log(f"model: {model_desc}")
    wd = common.workdir()
    images, image_source = common.sample_images(max(s.batch_images, 8), wd)
    big_jpeg = common.synthetic_jpeg(wd / "phone_4032x3024.jpg", (4032, 3024), seed=7)

    results: dict = {
        "machine": machine,
        "settings": {"quick": s.quick, "warmup": s.warmup, "repeat": s.repeat, "threads": torch.get_num_threads(),
                     "sections": sections, "peer_scale": args.peer_scale},
        "model": {"description": model_desc, "config": model.config.to_dict(), "params_m": round(sum(q.numel() for q in model.parameters()) / 1e6, 2)},
        "images": image_source,
        "sections": {},
    }
    out: list[str] = []

    def emit(text: str = "") -> None:
        out.append(text)
        print(text, flush=True)

    emit("# Captioner benchmarks" + (" (--quick: rough numbers)" if s.quick else ""))
    emit()
    emit(f"- machine: {machine['cpu']}, {machine['cores_available']} cores available ({machine['logical_cores']} logical), "
         f"{machine.get('memory_gb', '?')} GB; load average at start {machine.get('load_average_1m', '?')} "
         f"(> cores means other work shared the CPU)")
    emit(f"- torch {machine['torch']} (oneDNN {'on' if machine['onednn'] else 'off'}), {torch.get_num_threads()} threads; "
         f"timm {machine['timm']}; transformers {machine['transformers']}; gradio {machine['gradio']}; Python {machine['python']}")
    emit(f"- model: {model_desc}; {results['model']['params_m']} M parameters; precision {getattr(model, 'precision', 'fp32')} "
         f"(--precision {args.precision})")
    emit(f"- images: {image_source}; medians of {s.repeat} calls after {s.warmup} warm-up calls unless said otherwise; CPU only")
    ours_greedy = ours_first = ours_beam = None

    if "latency" in sections:
        from . import model_bench

        log("section 1: latency")
        sec = model_bench.latency(model, s, images[0], big_jpeg)
        results["sections"]["latency"] = sec
        ours_greedy = model_bench.lookup(sec, "whole caption, greedy (from image")
        ours_first = model_bench.lookup(sec, "time to first")
        ours_beam = model_bench.lookup(sec, "whole caption, beam 3")
        emit("\n## 1. Per-image latency (batch 1)\n")
        emit(md_table(["stage", "median ms", "min ms", "CPU ms", "n", "note"],
                      [[r["stage"], r["median_ms"], r["min_ms"], r["cpu_ms"], r["n"], r["note"]] for r in sec["rows"]]))

    if "batch" in sections:
        from . import model_bench

        log("section 2: batch throughput")
        sec = model_bench.throughput(model, s, images[: s.batch_images])
        results["sections"]["batch"] = sec
        emit("\n## 2. Batch throughput, greedy (caption_batch, CLI folder mode)\n")
        emit(md_table(["batch size", "images", "images/s", "ms/image"],
                      [[r["batch_size"], r["images"], r["images_per_s"], r["ms_per_image"]] for r in sec["rows"]]))
        emit(f"\n{sec['note']}")

    if "peers" in sections:
        from . import peers

        log("section 3: peers")
        x = torch.randn(3, model.config.image_size, model.config.image_size)
        from captioner.decode import caption

        ours = common.measure(lambda: caption(model, x), warmup=s.warmup, repeat=s.repeat)  # re-measured, same conditions as the peers
        sec = peers.run(model, s, ours.median_ms, scale=args.peer_scale, ours_label="current code")
        results["sections"]["peers"] = sec
        emit(f"\n## 3. Peers: exactly {sec['new_tokens']} new tokens each, random weights, same run\n")
        rows = [["ours: " + model.config.backbone + " + LSTM", results["model"]["params_m"], f"{model.config.image_size}", None,
                 round(ours.median_ms, 1), 1.0, None, None, "whole greedy caption incl. encoder (re-measured here)"]]
        for r in sec["rows"]:
            if "skipped" in r:
                rows.append([r["peer"], None, None, None, None, None, None, None, "skipped: " + r["skipped"]])
                continue
            rows.append([r["peer"], r["params_m"], r["input"], f"{r.get('greedy_tokens')}/{r.get('beam3_tokens')}", r.get("greedy_ms"),
                         r.get("greedy_x_ours"), r.get("beam3_ms"), r.get("beam3_x_ours"), r.get("error") or r["note"]])
        emit(md_table(["model", "params M", "input", "tokens greedy/beam", "greedy ms", "greedy x ours", "beam 3 ms", "beam 3 x ours", "note"], rows))
        emit(f"\n{sec['note']}")

    if "app" in sections:
        from . import app_bench

        log("section 4: app")
        model_dir = args.model if args.model and args.model != "random" else None
        if model_dir is None and not (common.ROOT / "captioner" / "default_model" / "model.safetensors").exists():
            model_dir = str(wd / "bench_model")  # the app gets the very model measured here
            model.save_pretrained(model_dir)
        sec = app_bench.run(s, model_dir, images[:4], threads=args.threads, precision=args.precision)
        results["sections"]["app"] = sec
        emit("\n## 4. App (python app.py, gradio_client on /caption)\n")
        if "skipped" in sec and "cold_start_s" not in sec:
            emit(f"skipped: {sec['skipped']}")
        else:
            keys = [("cold start to HTTP 200 on / (s)", "cold_start_s"), ("RSS after loading (MB)", "rss_after_load_mb"),
                    ("RSS after warm-up clicks (MB)", "rss_after_warmup_mb"),
                    (f"RSS after {sec.get('captions_for_memory', '?')} captions (MB)", "rss_after_many_mb"),
                    ("RSS growth over those captions (MB)", "rss_growth_mb"),
                    (f"RSS growth over the second half, captions {sec.get('captions_midway', '?')}-{sec.get('captions_for_memory', '?')} (MB)",
                     "rss_growth_second_half_mb"),
                    ("USS after loading / after the captions (MB; memory only the server holds)", "uss"),
                    ("click to first word, median (ms)", "click_to_first_word_ms"),
                    ("click to full caption, median (ms)", "click_to_full_caption_ms"), ("streamed outputs per caption", "streamed_outputs_per_caption"),
                    ("captions/s, 4 requests at once", "captions_per_s_4_at_once")]
            sec_view = dict(sec, uss=f"{sec.get('uss_after_load_mb')} / {sec.get('uss_after_many_mb')}")
            emit(md_table(["measure", "value"], [[k, sec_view.get(v)] for k, v in keys]))
            if "skipped" in sec:
                emit(f"\npartly skipped: {sec['skipped']}")
            if "+cu" in torch.__version__:
                emit(f"\ntorch {torch.__version__} is PyPI's CUDA build: RSS includes its CUDA libraries' pages (a CPU-only torch, "
                     "as on macOS/Windows, maps far less); USS is the memory the server alone holds")
            emit(f"\n{sec.get('command')}; clicks alternate images (the app caches the last image's encoder output per session); "
                 "the app spaces streamed words by its WORD_DELAY, which click-to-full-caption includes")

    if "train" in sections:
        from . import training

        log("section 5: training")
        trainee = model if model.precision == "fp32" else common.load_bench_model(args.model, "fp32")[0]  # training is float32
        sec = training.run(trainee, s, images[: 32 if not s.quick else 8], image_source)
        results["sections"]["train"] = sec
        emit("\n## 5. Training\n")
        emit(md_table(["stage", "images/s", "captions/s", "median ms", "note"],
                      [[r["stage"], r.get("images_per_s"), r.get("captions_per_s"), r["median_ms"], r["note"]] for r in sec["rows"]]))
        emit(f"\n{sec['note']}")

    if "decoders" in sections:
        from . import decoders

        log("section 7: the two decoders")
        attend = common.load_bench_model(args.attend_model)[0] if args.attend_model else None
        show_tell = common.load_bench_model(args.model)[0] if args.attend_model and model.config.decoder == "show-tell" else None
        sec = decoders.run(s, images[0], show_tell=show_tell, attend=attend)
        results["sections"]["decoders"] = sec
        weights = "trained weights" if attend is not None else "random weights, default sizes"
        emit(f"\n## 7. Show-and-Tell against the attention decoder ({weights}; exactly {sec['words']} words each, interleaved)\n")
        emit(md_table(["stage", "show-tell ms", "attend ms", "attend / show-tell", "n"],
                      [[r["stage"], r["show_tell_ms"], r["attend_ms"], r["ratio"], r["n"]] for r in sec["rows"]]))
        emit(f"\ndecoder parameters (M): {sec['decoder_params_m']}")

    if "precision" in sections:
        from . import precision

        log("section 6: precision")
        src = args.model if args.model and args.model != "random" else None
        trainee = model if model.precision == "fp32" else common.load_bench_model(args.model, "fp32")[0]
        sec = {"inference": precision.inference(src, s, images[: s.batch_images]), "training": precision.training(trainee, s)}
        results["sections"]["precision"] = sec
        inf = sec["inference"]
        emit(f"\n## 6. Precision (CPU: {', '.join(k for k, v in inf['cpu'].items() if v) or 'no bf16/VNNI/AMX'}; "
             f"auto = encoder {inf['auto'][0]}, decoder {inf['auto'][1]})\n")
        emit(md_table(["precision", "runs", "greedy ms (JPEG in)", "first word ms", "beam 3 ms", "beam 3 / greedy",
                       "batch 32 images/s", "same greedy captions as fp32"],
                      [[r["precision"], r["runs"], r["greedy_ms"], r["first_word_ms"], r["beam3_ms"],
                        round(r["beam3_ms"] / r["greedy_ms"], 2), r["batch32_ips"], r["same_captions"]] for r in inf["rows"]]))
        emit(f"\n{inf['note']}\n")
        emit(md_table(["training stage", "precision", "per s", "unit", "median ms"],
                      [[r["stage"], r["precision"], r["per_s"], r["unit"], r["median_ms"]] for r in sec["training"]["rows"]]))
        emit(f"\n{sec['training']['note']}")

    if "eyes" in sections:
        from . import eyes

        log("section 8: a bigger eye")
        base = model if model.precision == "fp32" else common.load_bench_model(args.model, "fp32")[0]  # swapped, then set
        sec = eyes.run(base, s, images[0])
        results["sections"]["eyes"] = sec
        emit(f"\n## 8. A bigger eye: Lite0, Lite1, Lite2 behind the model's decoder (exactly {sec['words']} words, interleaved; "
             f"{sec['threads']} threads; load average {machine.get('load_average_1m', '?')} at start, "
             f"{sec['load_average_1m_after']} after)\n")
        emit(md_table(["backbone", "side", "regions", "backbone M params", "conv GMACs (x Lite0)", "setting", "encoder ms",
                       "greedy caption ms", "decoding ms", "x Lite0 (same setting)", f"x today ({sec['today_ms']} ms)",
                       f"<= {sec['budget_x']}x"],
                      [[r["backbone"], r["side"], r["regions"], r["backbone_params_m"], f"{r['gmacs']} ({r['gmacs_x_lite0']}x)",
                        r["setting"], r["encoder_ms"],
                        r["caption_ms"], r["decoding_ms"], r["x_lite0_same_setting"], r["x_today"], "yes" if r["fits"] else "no"]
                       for r in sec["rows"]]))
        emit(f"\n{sec['note']}" + "".join(f"; {k} not measured: {why}" for k, why in sec["skipped"].items()))

    # ---------------------------------------------------------------- targets
    measured = {"greedy_ms": ours_greedy, "first_word_ms": ours_first,
                "beam_over_greedy": round(ours_beam / ours_greedy, 2) if ours_beam and ours_greedy else None}
    batch = results["sections"].get("batch", {}).get("rows", [])
    measured["batch32_ips"] = next((r["images_per_s"] for r in batch if r["batch_size"] == 32), None)
    peer_rows = results["sections"].get("peers", {}).get("rows", [])
    measured["blip_x"] = next((r.get("greedy_x_ours") for r in peer_rows if r["peer"].startswith("BLIP")), None)
    measured["vitgpt2_x"] = next((r.get("greedy_x_ours") for r in peer_rows if r["peer"].startswith("ViT-GPT2")), None)
    app = results["sections"].get("app", {})
    measured["app_cold_start_s"] = app.get("cold_start_s")
    measured["app_rss_mb"] = app.get("rss_after_many_mb")
    measured["app_rss_growth_mb"] = app.get("rss_growth_second_half_mb")
    dec = {r["stage"]: r["ratio"] for r in results["sections"].get("decoders", {}).get("rows", [])}
    measured["attend_greedy_x"] = dec.get("whole greedy caption (encoder included)")
    measured["attend_first_word_x"] = dec.get("time to first streamed word")

    rows, target_json = [], []
    for key, desc, goal, op in TARGETS:
        v = measured.get(key)
        rows.append([desc, f"{op} {goal:g}", v, _status(v, goal, op)])
        target_json.append({"key": key, "target": desc, "goal": goal, "op": op, "measured": v, "status": _status(v, goal, op)})
    results["targets"] = target_json
    emit("\n## Targets\n")
    emit(md_table(["target", "goal", "measured (current code)", ""], rows))
    results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    emit(f"\n(total benchmark time {results['elapsed_s']} s)")

    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
