"""How every failure reaches the user: as a message that says what went wrong, never Gradio's `{"error": null}`.

`PhotoError` (the page empties the photo box), `user_error` (a gr.Error shown as it is, without a traceback),
`bad_setting` (the library's ValueError about a decoding setting, as the app says it) and `ServedBlocks` (gr.Blocks
whose unexpected failures become messages; it also installs the session store and the per-client limits).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import gradio as gr
from gradio.exceptions import InvalidPathError
from gradio.state_holder import StateHolder

from ..setting_values import shown
from .session import SessionStates

if TYPE_CHECKING:
    from .limits import ClientLimits

# What every control that needs a session's caption says when the server no longer has it (the page still shows it).
EXPIRED = "This caption has expired on the server (it keeps each caption for a while after its last use): caption the photo again."


class PhotoError(gr.Error):
    """A photo that cannot be captioned (not an image, damaged, too large): the page empties the photo box."""

    def __init__(self, message: str):
        super().__init__(message, title="Cannot caption this image", print_exception=False)


def user_error(message: str, title: str | None = None) -> gr.Error:
    """A gr.Error the page shows as it is (and an API client gets as its message), with no traceback in the log."""
    return gr.Error(message, title=title, print_exception=False) if title else gr.Error(message, print_exception=False)


def bad_setting(e: ValueError) -> gr.Error:
    """A decoding setting refused (setting_values' or decode.stream's ValueError, which names the value) as the app says it."""
    return gr.Error(f"bad decoding setting: {e}", title="Bad decoding setting", print_exception=False)




def remote_path(value: Any, depth: int = 0) -> str | None:
    """The first file of an API call's inputs (FileData dicts, in lists for several files) whose "path" is a URL
    (http://, https://, ...), or None. A data: URL is not one: limits.read_upload decodes it within its limit."""
    if depth > 4:
        return None
    if isinstance(value, dict):
        path = value.get("path")
        if isinstance(path, str) and re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", path):
            return path
        return None
    if isinstance(value, (list, tuple)):
        return next((url for v in value if (url := remote_path(v, depth + 1))), None)
    return None



class ServedBlocks(gr.Blocks):
    """gr.Blocks whose failures all reach an API client as a message. With show_error=False (the app's: no internal
    detail leaks to the page) Gradio sends the text of a gr.Error only, and `{"error": null}` for anything else, such
    as its own check that a call sent every input. Here:
    - settings left out at the end of an API call's `data` take their defaults (as the named /call/v2 route does);
    - a file path that was never uploaded, or any other exception, becomes a gr.Error that says what went wrong (the
      traceback is logged on the server)."""

    client_limits: ClientLimits | None = None  # set before .queue(): each client's share of the queue
    controls: dict | None = None  # the decoding settings' controls, by GenerationConfig field (layout.build_demo)

    # Gradio's app creates a StateHolder and hands it to the Blocks (StateHolder.set_blocks); both use that one
    # object, so it is made a SessionStates where it is handed over (same fields, other rules), before any request.
    @property
    def state_holder(self):
        try:
            return self.__dict__["_state_holder"]
        except KeyError:
            raise AttributeError("state_holder") from None

    @state_holder.setter
    def state_holder(self, holder):
        if type(holder) is StateHolder:
            holder.__class__ = SessionStates
        self.__dict__["_state_holder"] = holder

    def queue(self, *args, **kwargs):
        out = super().queue(*args, **kwargs)
        if self.client_limits is not None:
            self.client_limits.install(self._queue)
        return out

    async def process_api(self, block_fn, inputs, *args, **kwargs):
        fn = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
        if not kwargs.get("iterator") and inputs is not None and len(inputs) < len(fn.inputs):
            given = iter(inputs)  # what Gradio does for a call that sent every input but the states (skip_api)
            inputs = [None if getattr(block, "skip_api", False) else next(given, None) for block in fn.inputs]
        if inputs is not None and (url := remote_path(inputs)):
            # Gradio would fetch it (no size limit, and from wherever it points) before the handler runs: refused first.
            raise gr.Error(f"the image sent is the URL {shown(url, 40)}, which this app does not fetch; give the photo as a "
                           "file upload (POST /gradio_api/upload, then its {\"path\": ...}) or as a data: URL",
                           title="URL not fetched", print_exception=False)
        try:
            return await super().process_api(fn, inputs, *args, **kwargs)
        except gr.Error:
            raise
        except InvalidPathError as e:
            raise gr.Error(f"{e} Upload the file first (POST /gradio_api/upload) and pass the path it returns, or send "
                           "the image as a data: URL.", title="File not uploaded", print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the one place that turns the unexpected into a message
            import traceback

            traceback.print_exc()
            name = f"/{fn.api_name}" if getattr(fn, "api_name", None) else "this request"
            if type(e).__name__ in ("ValidationError", "ComponentProcessingError"):  # Gradio's checks of an input's type
                raise gr.Error(f"{name}: a value sent is not of the kind this endpoint takes; the app's API page (\"Use via "
                               "API\" at its foot) gives each parameter's type", title="Bad request", print_exception=False) from None
            raise gr.Error(f"{name} failed on the server ({type(e).__name__}); check the values sent (the API page lists "
                           "them) and try again", title="Server error", print_exception=False) from None

