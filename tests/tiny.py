"""A tiny random captioner for fast tests (no downloads: timm's `test_efficientnet` is built with random weights)."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn

WORDS = ["<PAD>", "<SOS>", "<EOS>", "<UNK>", "a", "dog", "runs", "."]
BACKBONE = "test_efficientnet"  # a few thousand parameters; timm builds it offline (pretrained=False)


def tiny_config(**overrides):
    from captioner import CaptionerConfig

    fields = dict(
        backbone=BACKBONE,
        embed_size=16,
        hidden_size=16,
        vocab_size=len(WORDS),
        image_size=32,
        dropout=0.0,
        max_len=5,
    )
    fields.update(overrides)
    return CaptionerConfig(**fields)


def tiny_model(seed: int = 0, **overrides):
    """A Captioner with random weights drawn from `seed` (same seed -> same weights), in eval mode."""
    import torch

    from captioner import Captioner, Vocabulary

    torch.manual_seed(seed)
    model = Captioner(tiny_config(**overrides), Vocabulary(WORDS))
    return model.eval()


def attend_model(seed: int = 0, *, imagenet_head: bool = True, **overrides):
    """A tiny attention-decoder Captioner (image_size 64: a 2 x 2 grid of regions) whose attention visibly moves from
    word to word, with an ImageNet head whose labels differ (random: the classes mean nothing). The random backbone's
    features are tiny (about 1e-3), so its region projection and attention scores are scaled up: untouched, every
    step would weigh every region 1/N and every heatmap would look the same."""
    import torch

    fields = dict(decoder="attend", image_size=64, max_len=8)
    fields.update(overrides)
    model = tiny_model(seed, imagenet_head=imagenet_head, **fields)
    with torch.no_grad():
        model.decoder.regions.weight.mul_(1000)
        model.decoder.key.weight.mul_(5)
        model.decoder.query.weight.mul_(5)
        model.decoder.head.bias[2] -= 2.0  # <EOS> less likely: captions of several words
        if model.encoder.classifier is not None:
            g = torch.Generator().manual_seed(seed)
            model.encoder.classifier.weight.copy_(torch.randn(model.encoder.classifier.weight.shape, generator=g) * 300)
    return model


def fingerprint(model) -> str:
    """A hash of every weight's name and exact bytes, to compare two models across processes."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def decoder_probe(model) -> list[float]:
    """Logits of one decoder step on a fixed input: a functional check that loaded weights behave like the originals."""
    import torch

    with torch.inference_mode():
        features = model.encoder.from_backbone(torch.ones(2, model.encoder.backbone.num_features))  # a fixed image
        logits, state = model.decoder.start(features)
        logits, _ = model.decoder.step(torch.tensor([4, 5]), state)  # "a", "dog"
    return [round(float(v), 6) for v in logits.flatten()]


def photo(seed: int = 0):
    """A 40x30 photo of random pixels, the same for the same seed: the mechanics tests' input."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (30, 40, 3), dtype=np.uint8))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for serving the app in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endless_model_dir(folder, max_len: int):
    """Save a tiny model whose <EOS> never wins (every caption has max_len words) into `folder`; returns it."""
    import torch

    m = tiny_model(seed=1, max_len=max_len)
    with torch.no_grad():
        m.decoder.head.bias[2] = -20
    m.save_pretrained(folder)
    return folder


def app_env(**extra) -> dict:
    """The environment for running app.py in a subprocess: this one, less any GRADIO_/CAPTIONER_ settings (but the
    encoder cache's folder, a temporary one in tests)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "CAPTIONER_")) or k == "CAPTIONER_CACHE"}
    env.update(extra)
    return env


def start_app(model_dir, *args: str, timeout: float = 120, env: dict | None = None, port_from_env: bool = False):
    """Run `python app.py --model model_dir --port PORT ARGS` on a free port; returns (process, url) once a client
    connects. model_dir None: no --model; `env`: added to app_env(); port_from_env: the port is given as
    $GRADIO_SERVER_PORT instead of --port.

    Output goes to a pipe: read it with process.communicate() after terminate()."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from gradio_client import Client

    port = free_port()
    argv = (["--model", str(model_dir)] if model_dir is not None else []) + ([] if port_from_env else ["--port", str(port)])
    proc = subprocess.Popen([sys.executable, "app.py", *argv, *args],
                            cwd=Path(__file__).resolve().parents[1],
                            env=app_env(**(env or {}), **({"GRADIO_SERVER_PORT": str(port)} if port_from_env else {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            Client(url, verbose=False)
            return proc, url
        except Exception:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.5)


@contextlib.contextmanager
def serve_demo(model, label: str, **build_kw):
    """The app's Blocks served in this process on a free port of 127.0.0.1; yields its URL, closes it after."""
    from captioner.app import build_demo, launch_options

    demo = build_demo(model, label, **build_kw)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **launch_options())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


# ---------------------------------------------------------------- a tiny model whose captions differ per photo
# Every random tiny model above gives every photo the same caption (its LSTM's own dynamics drown the tiny image
# features), so a test of order, batching or isolation built on one would pass with the captions shuffled. This one
# is trained, in a second or so, to tell a few distinct photos apart: each photo has its own caption. Tests that use
# it first assert that the captions they expect are all different, so a fixture that stopped telling the photos
# apart would fail them loudly instead of letting them pass vacuously.

DISTINCT_COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (240, 240, 240), (15, 15, 15), (230, 210, 20)]


def distinct_photos(n: int = 6, size: int = 40):
    """N photos (PIL, RGB) that differ in colour and pattern: solid colours, every other one with a stripe."""
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        img = Image.new("RGB", (size, size), DISTINCT_COLOURS[i % len(DISTINCT_COLOURS)])
        if i % 2:
            ImageDraw.Draw(img).rectangle([0, size // 3, size, size // 2], fill=DISTINCT_COLOURS[(i + 3) % len(DISTINCT_COLOURS)])
        out.append(img)
    return out


def _distinct_targets(n: int) -> list[list[int]]:
    """N different token sequences (<SOS> ... <EOS>) over the tiny vocabulary's words (a, dog, runs, .)."""
    import itertools

    words = list(range(4, len(WORDS)))
    seqs = [list(p) for k in (3, 2, 4) for p in itertools.permutations(words, k)]
    return [[1, *seqs[i * 5 % len(seqs)], 2] for i in range(n)]


def distinct_model(decoder: str = "show-tell", n: int = 6, *, steps: int = 250, seed: int = 0):
    """A tiny Captioner trained (decoder and projection; the random backbone frozen) to give each of
    distinct_photos(n) its own caption. Returns (model in eval mode, photos)."""
    import torch

    from captioner.model import caption_loss
    from captioner.preprocess import preprocess_batch

    photos = distinct_photos(n)
    fields = dict(max_len=8) if decoder == "show-tell" else dict(decoder="attend", image_size=64, max_len=8)
    model = tiny_model(seed, **fields)
    with torch.no_grad():  # the random backbone's features are tiny (about 1e-3): start the projections at their scale
        model.encoder.proj.weight.mul_(1000)
        if decoder == "attend":
            model.decoder.regions.weight.mul_(1000)
        features = model.encoder.backbone_features(preprocess_batch(photos, model.config))
    targets = _distinct_targets(n)
    width = max(map(len, targets))
    captions = torch.tensor([t + [0] * (width - len(t)) for t in targets]).T  # (T, B), <PAD> after <EOS>
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.03)
    # One thread: these ops are tiny, and with two threads every op waits for both, which on a busy machine made
    # the 250 steps take minutes instead of about a second.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():  # a session fixture may first be built inside a test's no_grad
            for _ in range(steps):
                opt.zero_grad()
                loss = caption_loss(model.forward_features(features, captions), captions)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), photos


def assert_all_different(captions, what: str = "the fixture's captions") -> None:
    """The precondition of every order, batch and isolation test: swapped captions must be tellable apart."""
    captions = list(captions)
    assert len(set(captions)) == len(captions), f"{what} are not all different, so the test could not fail: {captions}"


# ---------------------------------------------------------------- a scripted decoder (a test double)
# A decoder whose next-word distribution depends only on the previous word, from a table: it implements the seam
# (model.Decoder: start, step, state.select) so that a search can be tested on a distribution written down in full.


class BigramState:
    attention = None

    def __init__(self, last):
        self.last = last  # (B,) the previous token of each row

    def select(self, index):
        return BigramState(self.last.index_select(0, index))


class BigramDecoder(nn.Module):
    uses_grid = False

    def __init__(self, table: dict[int, dict[int, float]], vocab_size: int):
        """table: previous token (1 = <SOS> at the start) -> {next token: probability}; the rest get ~0."""
        super().__init__()
        self.logits = torch.full((vocab_size, vocab_size), -30.0)
        for prev, nxt in table.items():
            for tok, p in nxt.items():
                self.logits[prev, tok] = float(torch.tensor(p).log())

    def start(self, features):
        return self.step(torch.full((len(features),), 1, dtype=torch.long), None)

    def step(self, tokens, state):
        return self.logits[tokens].clone(), BigramState(tokens)


def scripted_model(table: dict[int, dict[int, float]], max_len: int = 6):
    """A tiny Captioner whose decoder is a BigramDecoder over WORDS (its encoder runs, its features are ignored)."""
    m = tiny_model(0, max_len=max_len)
    m.decoder = BigramDecoder(table, len(WORDS))
    return m


def rescore(model, image=None, tokens: Sequence[int] = (), *, features=None,
            num_alternatives: int = 5) -> list:
    """The Step records of a given caption (probabilities and alternatives at every word): its tokens forced, then
    <EOS>, through decode.stream."""
    from captioner.decode import stream

    eos = model.vocab.eos_id
    return list(stream(model, image, features=features, prefix=[*tokens, eos], max_len=len(tokens) + 1,
                       num_alternatives=num_alternatives))
