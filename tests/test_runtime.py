"""The encoder's runtime (captioner.runtime): ONNX Runtime where installed, PyTorch where not, and never a graph made
from other weights than the model's own."""
import sys

import pytest
import torch

from captioner import runtime
from captioner.loading import load_model

needs_ort = pytest.mark.skipif(not runtime.available(), reason="onnxruntime or onnx not installed")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "encoders"


def _saved(tmp_path, seed=0, name="m"):
    from tiny import attend_model

    attend_model(seed).save_pretrained(tmp_path / name)
    return tmp_path / name


def _features(model, seed=0):
    x = torch.randn(3, 3, model.config.image_size, model.config.image_size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model.encoder.backbone_features(x)


@needs_ort
def test_onnx_runtime_gives_the_features_pytorch_gives(tmp_path, cache):
    folder = _saved(tmp_path)
    onnx, plain = load_model(folder, precision="fp32", runtime="onnx"), load_model(folder, precision="fp32", runtime="torch")
    assert (onnx.encoder.runtime, plain.encoder.runtime) == ("onnx", "torch")
    assert load_model(folder, precision="fp32", runtime="auto").encoder.runtime == "onnx"  # installed: auto takes it
    torch.testing.assert_close(_features(onnx), _features(plain), rtol=1e-4, atol=1e-5)
    assert len(list(cache.glob("*.onnx"))) == 1  # exported once, found again by the second load


def test_pytorch_is_the_fallback_where_the_runtime_is_absent(tmp_path, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert not runtime.available()
    folder = _saved(tmp_path)
    model = load_model(folder, precision="fp32")  # auto
    assert model.encoder.runtime == "torch"
    assert _features(model).shape[0] == 3
    assert not cache.exists()  # nothing exported
    with pytest.raises(ImportError):
        load_model(folder, precision="fp32", runtime="onnx")  # asked for by name: an error, not a silent fallback
    monkeypatch.setenv("CAPTIONER_ENCODER_RUNTIME", "tensorrt")
    with pytest.raises(ValueError, match="'tensorrt'"):
        load_model(folder)


@needs_ort
def test_a_stale_cached_graph_is_never_used(tmp_path, cache):
    """New weights get a graph of their own: the cache is keyed by a hash of the weights, and a file that claims the
    name of these weights but was made from others (copied over by hand, say) is exported again, not used."""
    old_folder, new_folder = _saved(tmp_path, 0, "old"), _saved(tmp_path, 1, "new")
    old = load_model(old_folder, precision="fp32", runtime="onnx")
    (old_graph,) = cache.glob("*.onnx")
    new = load_model(new_folder, precision="fp32", runtime="onnx")
    new_torch = load_model(new_folder, precision="fp32", runtime="torch")
    graphs = sorted(cache.glob("*.onnx"))
    assert len(graphs) == 2 and old_graph in graphs
    expected = _features(new_torch)
    assert not torch.allclose(_features(old), expected, atol=1e-4)  # the two models' features differ: a mix-up would show
    torch.testing.assert_close(_features(new), expected, rtol=1e-4, atol=1e-5)
    # the stale graph put where the new weights' graph should be
    (new_graph,) = [g for g in graphs if g != old_graph]
    new_graph.write_bytes(old_graph.read_bytes())
    again = load_model(new_folder, precision="fp32", runtime="onnx")
    torch.testing.assert_close(_features(again), expected, rtol=1e-4, atol=1e-5)
    assert new_graph.read_bytes() != old_graph.read_bytes()  # and the cache was mended
    # a weight changed in place, as after loading other weights: a new hash
    with torch.no_grad():
        model = load_model(new_folder, precision="fp32", runtime="torch")
        digest = runtime.weights_hash(model.encoder.backbone, 64)
        next(model.encoder.backbone.parameters()).add_(1e-3)
        assert runtime.weights_hash(model.encoder.backbone, 64) != digest


@needs_ort
def test_a_model_on_onnx_runtime_can_be_deep_copied(tmp_path, cache):
    """The benchmarks copy loaded models; the copy shares the (immutable) session and gives the same features."""
    import copy

    model = load_model(_saved(tmp_path), precision="fp32", runtime="onnx")
    twin = copy.deepcopy(model)
    assert twin.encoder.runtime == "onnx"
    torch.testing.assert_close(_features(twin), _features(model), rtol=0, atol=0)
