"""The encoder's backbone in ONNX Runtime, where it is installed: faster than PyTorch eager at batch 1 (docs/performance.md),
with PyTorch as the fallback wherever it is not.

The graph is always made from the model's own weights: exported from the fused inference backbone at load, and
cached on disk under a name that is a hash of those weights (and of the input size and the exporter's versions), so
a cached graph can only ever be found by the weights it was made from. The hash is also written into the graph and
checked when it is read back, so a file renamed or overwritten by hand is never used either: it is exported again.

`runtime`: "auto" (ONNX Runtime when onnxruntime and onnx import, else PyTorch), "onnx" (the same, but an error
where it cannot be had), "torch". $CAPTIONER_ENCODER_RUNTIME sets the default; $CAPTIONER_CACHE the cache folder
(default ~/.cache/captioner).
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

RUNTIMES = ("auto", "onnx", "torch")
HASH_KEY = "captioner.weights_sha256"  # the graph's metadata entry that names the weights it was made from


def resolve(runtime: str | None) -> str:
    runtime = runtime or os.environ.get("CAPTIONER_ENCODER_RUNTIME") or "auto"
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r}: choose one of {', '.join(RUNTIMES)}")
    return runtime


def available() -> bool:
    """True where both the runtime and the exporter's dependency are installed (looked up, not imported: importing
    onnx costs a start that finds its graph in the cache)."""
    from importlib.util import find_spec

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return find_spec("onnx") is not None  # torch.onnx.export needs it


def cache_dir() -> Path:
    return Path(os.environ.get("CAPTIONER_CACHE") or Path.home() / ".cache" / "captioner") / "encoders"


def weights_hash(module: nn.Module, image_size: int) -> str:
    """sha256 of every tensor (name, shape, dtype, bytes) of `module`, the input size and the versions that shape the
    graph: a change to any weight is a new name."""
    import onnxruntime

    h = hashlib.sha256(f"{image_size}|torch {torch.__version__}|ort {onnxruntime.__version__}".encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Regions(nn.Module):
    """The backbone's last map as regions (B, N, F), or its pooled feature (B, F): what Encoder.backbone_features gives."""

    def __init__(self, backbone: nn.Module, spatial: bool):
        super().__init__()
        self.backbone, self.spatial = backbone, spatial

    def forward(self, x):
        return self.backbone.forward_features(x).flatten(2).transpose(1, 2) if self.spatial else self.backbone(x)


def _export(module: nn.Module, image_size: int, digest: str) -> bytes:
    import warnings

    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(module.eval(), (torch.zeros(1, 3, image_size, image_size),), buf, input_names=["images"],
                          output_names=["features"], dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                          opset_version=17, dynamo=False)
    graph = onnx.load_from_string(buf.getvalue())
    graph.metadata_props.add(key=HASH_KEY, value=digest)
    return graph.SerializeToString()


class OnnxBackbone:
    """A callable like the fused backbone wrapper: float32 (B, 3, S, S) -> features, through an ONNX Runtime session."""

    def __init__(self, data: bytes, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No arena: it keeps the largest batch's activations for the life of the process (RSS).
        options.enable_cpu_mem_arena = False
        # No spinning: idle workers would busy-wait after each call, taking the cores from the decoder that runs next.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.digest = self.session.get_modelmeta().custom_metadata_map.get(HASH_KEY)  # the weights it was made from

    def __deepcopy__(self, memo) -> "OnnxBackbone":
        return self  # a session is immutable and safe to share between threads: a copied model shares it

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().contiguous().cpu().numpy()
        return torch.from_numpy(self.session.run(None, {"images": x})[0])


def onnx_backbone(backbone: nn.Module, image_size: int, spatial: bool, *, folder: Path | None = None) -> OnnxBackbone:
    """The ONNX Runtime version of `backbone` (the fused float32 inference copy), from the cache when a graph made
    from these very weights is there (the hash stamped in it, read back by the runtime itself, must match), else
    exported now and cached (best effort: a read-only cache only costs the export at every start). Raises
    ImportError where onnxruntime is missing, or onnx when an export is needed."""
    import onnxruntime  # noqa: F401

    module = _Regions(backbone, spatial).eval()
    digest = weights_hash(module, image_size) + ("s" if spatial else "p")
    folder = folder or cache_dir()
    path = folder / f"{digest}.onnx"
    threads = torch.get_num_threads()
    if path.is_file():
        try:
            cached = OnnxBackbone(path.read_bytes(), threads)
            if cached.digest == digest:
                return cached
        except Exception:  # a truncated or foreign file: not a graph of ours
            pass
    # Nothing cached, or a graph that is not of these weights, whatever its name says: export it now.
    data = _export(module, image_size, digest)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as f:
            f.write(data)
        os.replace(f.name, path)  # atomic: a reader sees the old file or the whole new one
    except OSError:  # a read-only cache: the export is repeated at the next start
        pass
    made = OnnxBackbone(data, threads)
    if made.digest != digest:
        raise RuntimeError(f"the exported encoder graph carries weights hash {made.digest!r}, not {digest!r}")
    return made
