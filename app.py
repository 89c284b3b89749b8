"""Captioner's Gradio app: drop a photo, watch its caption stream word by word, inspect and branch the decoding.

    python app.py [--model FOLDER_OR_REPO_ID] [--revision REV] [--host HOST] [--port PORT] [--share] [--threads N]
                  [--precision auto|fp32|bf16|int8] [--word-delay S]

Hugging Face Spaces runs `python app.py` (and sets GRADIO_SERVER_NAME/GRADIO_SERVER_PORT).
The app itself is the captioner.app package (layout, handlers, views, limits: captioner/app/__init__.py).
"""
from __future__ import annotations

import argparse
import os
import sys


def quiet_space_reloader() -> None:
    """On a Space (SYSTEM=spaces) Gradio starts a hot-reload watcher that needs Hugging Face's `spaces` package, which
    a Space has preinstalled. Where it is absent (a Space simulated elsewhere) the watcher's thread dies with a
    traceback while the app serves as usual: one line says so instead. (The package is not a requirement: its reload
    server listens on every interface.) Any other thread failure keeps its traceback."""
    import threading

    default = threading.excepthook

    def hook(args):
        if args.exc_type is RuntimeError and "`spaces` package is required" in str(args.exc_value):
            print("* Hot reloading is off: the `spaces` package Hugging Face installs on a Space is not installed "
                  "here (the app itself runs as usual)", file=sys.stderr, flush=True)
            return
        default(args)

    threading.excepthook = hook


def limit_malloc_arenas(n: int = 2) -> bool:
    """Let the server's threads share n glibc malloc arenas (the default allows 8 per core, and each arena keeps
    its own freed memory: measured, RSS went on growing over 100 captions; with 2 it stayed flat). What
    MALLOC_ARENA_MAX=n does, set from inside; returns False where the C library is not glibc."""
    from captioner.app.turns import libc

    try:
        return bool(libc().mallopt(-8, n))  # -8 = M_ARENA_MAX in glibc's malloc.h
    except AttributeError:  # macOS, musl, Windows: no glibc mallopt
        return False


# Half the cores by default: an OpenMP thread waits on a core someone else holds, so more threads lose badly on a
# shared machine and win little on an idle one (docs/performance.md, "Measurements behind the code"), and the rest is
# room for the app's own concurrent decodes (limits.CONCURRENCY requests in progress).
THREADS_HELP = ("torch threads (default: half the CPU cores, at least 1; give all the cores where the app has the machine "
                "to itself)")


def parser() -> argparse.ArgumentParser:
    from captioner.precision import add_precision_argument

    p = argparse.ArgumentParser(prog="python app.py", description="Serve the captioner's Gradio demo.")
    p.add_argument("--model", default=None, help="model folder or Hub repo id (default: $CAPTIONER_MODEL or the bundled model)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                   help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=os.environ.get("GRADIO_SERVER_PORT") or 7860,  # a bad $GRADIO_SERVER_PORT: a usage error
                   help="port (default: $GRADIO_SERVER_PORT or 7860)")
    p.add_argument("--share", action="store_true",
                   help="also serve it on a temporary public *.gradio.live link, through Gradio's share servers (default: off, "
                        "this machine only; not on Hugging Face Spaces, which are public already)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    add_precision_argument(p)
    p.add_argument("--word-delay", type=float, default=None,
                   help="seconds between streamed words, so streaming is visible (default 0.04; 0 = as fast as decoding goes)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    # No phoning home: both must be set before gradio / huggingface_hub are imported.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    # After every request Gradio may rebuild a pandas table of up to 10,000 past events, only for its monitoring
    # page, which this app does not use: never, so pandas (tens of MB) is never imported and no CPU goes to it.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**12))

    from captioner.hub import ModelLoadError
    from captioner.loading import load_model

    limit_malloc_arenas()  # before any server thread exists
    quiet_space_reloader()

    try:
        # The encoder in PyTorch unless $CAPTIONER_ENCODER_RUNTIME says otherwise: ONNX Runtime, faster for folders,
        # made the app's click to first word slower (216 against 174 and 316 against 226 ms) and its RSS 40-50 MB
        # larger in two runs (docs/performance.md, issue 35).
        model = load_model(args.model, revision=args.revision, precision=args.precision,
                           runtime=os.environ.get("CAPTIONER_ENCODER_RUNTIME") or "torch")
    except ModelLoadError as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # e.g. a config naming an unknown backbone: still one clear line, no traceback
        print(f"error: cannot load the model from {args.model or 'the default source'}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    from captioner.app import build_demo, configure_torch, launch_options
    from captioner.app.turns import release_freed_memory
    from captioner.formatting import model_label

    release_freed_memory(collect=True)

    threads = configure_torch(args.threads)
    label = model_label(model, args.model, args.revision)
    print(f"model: {label} ({len(model.vocab)} words); precision: {model.precision}; torch threads: {threads}", flush=True)
    demo = build_demo(model, label) if args.word_delay is None else build_demo(model, label, word_delay=max(0.0, args.word_delay))
    # quiet: Gradio's own start-up lines end with "To create a public link, set `share=True` in `launch()`", which
    # this command cannot do; these say the same with the flag that does.
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, quiet=True, prevent_thread_lock=True,
                **launch_options())
    print(f"* Running on local URL:  {demo.local_url}", flush=True)
    if demo.share_url:
        print(f"* Running on public URL: {demo.share_url} (temporary; anyone with the link can use it)", flush=True)
    elif not args.share:
        print("* For a temporary public link, start it with --share", flush=True)
    demo.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
