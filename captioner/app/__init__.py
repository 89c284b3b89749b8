"""The served Gradio app, one job per module (the library, `import captioner`, never imports this package or Gradio).

- `layout`: the Gradio Blocks and the wiring of their events (build_demo, launch_options);
- `handlers`: one function per event, the same for the page and the API;
- `views`: a decode's records as the page shows them (tables, highlighted words, heatmaps, the inspector);
- `session`: what a browser session holds (its encoded photo, its finished decode) and when it expires;
- `limits`: what a request is held to (sizes, counts, each client's share of the queue), and reading an upload;
- `middleware`: the ASGI middleware that refuses oversized or stalled requests and uploads before a handler runs;
- `turns`: the CPU scheduler (FairShare) and giving freed memory back;
- `errors`: every failure as a message;
- `downloads`: the files offered for download.

Decoding settings are parsed by captioner.setting_values, beside GenerationConfig and its LIMITS.
"""
from .handlers import APP_DEFAULTS, Handlers
from .layout import build_demo, launch_options
from .turns import configure_torch

__all__ = ["APP_DEFAULTS", "Handlers", "build_demo", "configure_torch", "launch_options"]
