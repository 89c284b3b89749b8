"""Issue 30: the holes a hostile client found around issue 24's bounds, each reproduced against the app served on
127.0.0.1: image modes the pixel limit did not see, routes around the queue, one client filling the queue, uploads
left on disk, session state lost silently, /branch edge cases, URL inputs and multipart tricks."""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from captioner import Captioner
from captioner.preprocess import ImageError, open_image
from tiny import endless_model_dir, serve_demo, start_app

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

MAX_LEN = 6


def preprocess_module():
    return sys.modules["captioner.preprocess"]  # `captioner.preprocess` the attribute is the function of that name


# ---------------------------------------------------------------- image modes

# kind -> (the mode Pillow opens it in, the bytes a pixel that mode takes decoded, the RGB it should caption as)
MODES = {
    "16-bit PNG": ("I;16", 2, (156, 156, 156)),  # 40000 of 65535
    "32-bit TIFF": ("I", 4, (117, 117, 117)),  # 30000 of 65535
    "float TIFF": ("F", 4, (200, 200, 200)),
    "palette PNG with transparency": ("P", 1, (255, 255, 255)),  # all transparent: over white
    "CMYK TIFF": ("CMYK", 4, (255, 0, 0)),
    "CMYK JPEG": ("CMYK", 4, (255, 0, 0)),
    "animated GIF": ("P", 1, (255, 0, 0)),  # the first frame
    "multi-page TIFF": ("RGB", 4, (255, 0, 0)),  # the first page
    "RGBA PNG": ("RGBA", 4, (0, 0, 255)),
    "LA PNG": ("LA", 4, (100, 100, 100)),
}


def suffix(kind: str) -> str:
    return next(s for s in ("png", "tif", "jpg", "gif") if s.upper() in kind.replace("TIFF", "TIF").replace("JPEG", "JPG"))


def mode_file(kind: str, path, size: tuple[int, int]):
    """A flat image of `kind` (MODES): a few hundred kB on disk at 40 MP, however much it takes decoded."""
    if kind == "16-bit PNG":
        Image.new("I;16", size, 40000).save(path, "PNG")
    elif kind == "32-bit TIFF":
        Image.new("I", size, 30000).save(path, "TIFF", compression="tiff_deflate")
    elif kind == "float TIFF":
        Image.new("F", size, 200.0).save(path, "TIFF", compression="tiff_deflate")
    elif kind == "palette PNG with transparency":
        img = Image.new("P", size, 3)
        img.putpalette([0, 0, 0] * 3 + [200, 0, 0] + [0, 0, 0] * 252)
        img.save(path, "PNG", transparency=3)
    elif kind in ("CMYK TIFF", "CMYK JPEG"):
        img = Image.new("CMYK", size, (0, 255, 255, 0))
        img.save(path, *(("TIFF",) if "TIFF" in kind else ("JPEG",)), **({"compression": "tiff_deflate"} if "TIFF" in kind else {}))
    elif kind in ("animated GIF", "multi-page TIFF"):
        frames = [Image.new("RGB", size, c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
        extra = {"compression": "tiff_deflate"} if "TIFF" in kind else {}
        frames[0].save(path, "GIF" if "GIF" in kind else "TIFF", save_all=True, append_images=frames[1:], **extra)
    elif kind == "RGBA PNG":
        Image.new("RGBA", size, (0, 0, 255, 255)).save(path, "PNG")
    elif kind == "LA PNG":
        Image.new("LA", size, (100, 255)).save(path, "PNG")
    else:
        raise ValueError(f"kind={kind!r}")
    return path


@pytest.mark.parametrize("kind", list(MODES))
def test_every_image_mode_is_shrunk_in_its_own_mode_or_refused_by_its_decoded_size(kind, tmp_path, monkeypatch):
    """Each mode, at 1500 x 1200 with the limits scaled down to match: reduced before it is converted (to the same
    colours a full-size conversion gives), and refused with the size and the limit named when decoding it would
    take more than MAX_DECODED_BYTES (which the test works out from the mode's bytes a pixel)."""
    pp = preprocess_module()
    mode, per_pixel, rgb = MODES[kind]
    path = mode_file(kind, tmp_path / f"photo.{suffix(kind)}", (1500, 1200))
    with Image.open(path) as img:
        assert img.mode == mode, img.mode
    monkeypatch.setattr(pp, "ORDINARY_PIXELS", 1_000_000)
    monkeypatch.setattr(pp, "KEEP_SHORT_SIDE", 300)
    img = open_image(path)
    assert img.mode == "RGB" and img.size == (375, 300), (img.mode, img.size)  # 1200 // 300 = 4 times smaller
    assert all(abs(a - b) <= 3 for a, b in zip(img.getpixel((200, 150)), rgb)), img.getpixel((200, 150))
    decoded = 1500 * 1200 * per_pixel
    monkeypatch.setattr(pp, "MAX_DECODED_BYTES", decoded - 1)
    with pytest.raises(ImageError, match=rf"1500x1200 pixels in mode {mode} would take {decoded / 2**20:.0f} MB to decode "
                                         rf"\(limit {(decoded - 1) / 2**20:.0f} MB\)"):
        open_image(path)
    monkeypatch.setattr(pp, "MAX_DECODED_BYTES", decoded)
    assert open_image(path).size == (375, 300)


# ---------------------------------------------------------------- app.py in a subprocess, its RSS measured


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return endless_model_dir(tmp_path_factory.mktemp("attack_model"), MAX_LEN)


@pytest.fixture(scope="module")
def model(model_dir):
    return Captioner.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def app_process(model_dir):
    proc, url = start_app(model_dir, "--threads", "1", "--word-delay", "0")
    yield proc, url
    proc.terminate()
    proc.communicate(timeout=30)


def rss(proc) -> int:
    return psutil.Process(proc.pid).memory_info().rss


def peak_rss_growth(proc, fn) -> tuple[object, float]:
    """fn() run while the server's RSS is sampled every 20 ms -> (its result, the peak growth in MB)."""
    before = rss(proc)
    peak = [before]
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(fn)
        while not job.done():
            peak.append(rss(proc))
            time.sleep(0.02)
        result = job.result()
    return result, (max(peak) - before) / 2**20


@pytest.mark.slow
def test_no_image_mode_raises_the_servers_rss_by_300_mb(app_process, tmp_path):
    """Reproduction 1: at 40 MP (6,324 x 6,324), a 16-bit PNG took +1,015 MB, a float TIFF +1,175 MB and a palette PNG
    with transparency +617 MB, each in one /caption. Now every mode is shrunk before it is converted: each request,
    one photo or all of them in one /caption_files, stays under 300 MB."""
    proc, url = app_process
    side = 6324
    client = Client(url, verbose=False)
    warm = mode_file("RGBA PNG", tmp_path / "warm.png", (side, side))
    client.predict(handle_file(str(warm)), api_name="/caption")  # what one caption of a huge photo allocates anyway
    paths, grew = [], {}
    for i, kind in enumerate(MODES):
        path = mode_file(kind, tmp_path / f"photo{i}.{suffix(kind)}", (side, side))
        decoded_mb = side * side * MODES[kind][1] / 2**20
        assert path.stat().st_size < 2 * 2**20 and decoded_mb >= 38, (kind, path.stat().st_size)  # small file, big decode
        paths.append(path)
        out, grew[kind] = peak_rss_growth(proc, lambda: client.predict(handle_file(str(path)), api_name="/caption"))
        assert out[0], (kind, out)
    (table, _), grew["all in one /caption_files"] = peak_rss_growth(
        proc, lambda: client.predict([handle_file(str(p)) for p in paths], api_name="/caption_files"))
    print("peak RSS growth (MB):", {k: round(v) for k, v in grew.items()})
    assert [r[1] != "" and r[2] == "" for r in table["data"]] == [True] * len(MODES), table["data"]
    assert max(grew.values()) < 300, grew
