"""EfficientNet-Lite0/1/2 feature extractors: timm's headless `tf_efficientnet_lite0/1/2`, reimplemented in plain PyTorch.

EfficientNet-Lite (Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs", arXiv:1905.11946; the Lite variants:
https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite) is EfficientNet-B0 without
squeeze-excite, with ReLU6 and a fixed stem (32) and head (1280).

Why it exists: `import timm` pulls in torchvision and torch._dynamo, seconds and ~200 MB at start-up, for one model.
This module computes what `timm.create_model("tf_efficientnet_lite0", num_classes=0)` computes, with the same
module names, state-dict keys, shapes, order and weight init, so checkpoints saved from timm's model load unchanged.
Lite1 and Lite2 are the same network scaled as timm scales it (`build(name)`): wider stages (Lite2) and more blocks in
every stage but the first and the last; the stem (32) and head (1280) stay fixed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# One row per stage, as timm's arch_def: (repeats, kernel, stride of the first block, expansion, out channels).
STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the tf_ weights were trained with (PyTorch's default is 1e-5)


@dataclass(frozen=True)
class LiteVariant:
    """How a Lite variant scales Lite0 (timm's channel_multiplier, depth_multiplier) and the side it was trained at."""

    width: float
    depth: float
    image_size: int


VARIANTS = {
    "tf_efficientnet_lite0": LiteVariant(1.0, 1.0, 224),
    "tf_efficientnet_lite1": LiteVariant(1.0, 1.1, 240),
    "tf_efficientnet_lite2": LiteVariant(1.1, 1.2, 260),
}


def round_channels(chs: int, width: float, divisor: int = 8) -> int:
    """timm's round_channels: chs * width to the nearest multiple of 8, never more than 10% below it."""
    v = chs * width
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def scaled_stages(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """STAGES scaled as timm's decode_arch_def(fix_first_last=True) and round_channels do: repeats rounded up
    (ceil, in the same float arithmetic), except the first and last stage's single block."""
    last = len(STAGES) - 1
    return [(r if i in (0, last) else int(math.ceil(r * depth)), k, s, e, round_channels(c, width))
            for i, (r, k, s, e, c) in enumerate(STAGES)]


class Conv2dSame(nn.Conv2d):
    """Conv with TensorFlow 'SAME' padding for strided convs: the padding depends on the input size and any odd
    pixel goes bottom/right, which no fixed symmetric padding reproduces."""

    def __init__(self, chs_in: int, chs_out: int, kernel: int, stride: int, groups: int = 1):
        super().__init__(chs_in, chs_out, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):  # W, then H
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def conv(chs_in: int, chs_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """'SAME' conv: at stride 1 with an odd kernel it is fixed symmetric padding, so a plain (faster) nn.Conv2d."""
    if stride > 1:
        return Conv2dSame(chs_in, chs_out, kernel, stride, groups)
    return nn.Conv2d(chs_in, chs_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False)


class BatchNormAct(nn.BatchNorm2d):
    """Batch norm then ReLU6 (or nothing), one module like timm's BatchNormAct2d: its state dict is a plain batch
    norm's, and the `act` attribute is what stays when the norm is folded into the conv before it."""

    def __init__(self, channels: int, act: bool = True):
        super().__init__(channels, eps=BN_EPS)
        self.act: nn.Module = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class DepthwiseSeparable(nn.Module):
    """The first block (expansion 1): depthwise conv, ReLU6, pointwise linear projection."""

    def __init__(self, chs_in: int, chs_out: int, kernel: int, stride: int):
        super().__init__()
        self.has_skip = stride == 1 and chs_in == chs_out
        self.conv_dw = conv(chs_in, chs_in, kernel, stride, groups=chs_in)
        self.bn1 = BatchNormAct(chs_in)
        self.conv_pw = conv(chs_in, chs_out, 1)
        self.bn2 = BatchNormAct(chs_out, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return y + x if self.has_skip else y


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excite: pointwise expansion, depthwise conv, pointwise linear projection."""

    def __init__(self, chs_in: int, chs_out: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = chs_in * expansion  # always a multiple of 8 here, so timm's make_divisible changes nothing
        self.has_skip = stride == 1 and chs_in == chs_out
        # Registration order = timm's construction order, which both the default init's RNG draws and the
        # conv-then-norm pairing of batch-norm folding rely on.
        self.conv_pw = conv(chs_in, mid, 1)
        self.bn1 = BatchNormAct(mid)
        self.conv_dw = conv(mid, mid, kernel, stride, groups=mid)
        self.bn2 = BatchNormAct(mid)
        self.conv_pwl = conv(mid, chs_out, 1)
        self.bn3 = BatchNormAct(chs_out, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return y + x if self.has_skip else y  # no drop path: timm's is off unless asked for (drop_path_rate=0)


class EfficientNetLite(nn.Module):
    """(B, 3, H, W) -> (B, 1280) globally average-pooled features, as timm's headless tf_efficientnet_lite* with
    this width and depth multiplier (Lite0: 1.0, 1.0)."""

    num_features = 1280

    def __init__(self, width: float = 1.0, depth: float = 1.0) -> None:
        super().__init__()
        self.conv_stem = conv(3, 32, 3, stride=2)
        self.bn1 = BatchNormAct(32)
        # timm's builder makes and drops a squeeze-excite of two 8->8 convs here (an API probe). Making the same
        # draws keeps a seeded build, and whatever is built after it (projection, decoder), identical to timm's.
        for _ in range(2):
            nn.Conv2d(8, 8, 1)
        stages, chs = [], 32
        for i, (repeats, kernel, stride, expansion, chs_out) in enumerate(scaled_stages(width, depth)):
            blocks: list[nn.Module] = []
            for j in range(repeats):
                s = stride if j == 0 else 1
                blocks.append(DepthwiseSeparable(chs, chs_out, kernel, s) if i == 0 else InvertedResidual(chs, chs_out, kernel, s, expansion))
                chs = chs_out
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = conv(chs, self.num_features, 1)
        self.bn2 = BatchNormAct(self.num_features)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's TensorFlow-style init (normal, fan-out, per group; BN 1 and 0), in the same order, so a seeded
        build draws the same weights as timm's."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1280, H/32, W/32): the last feature map, before pooling (as timm's forward_features)."""
        return self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.forward_features(x), 1).flatten(1)  # timm's 'avg' global pool


class EfficientNetLite0(EfficientNetLite):
    """timm's headless tf_efficientnet_lite0 (the bundled model's backbone)."""

    def __init__(self) -> None:
        super().__init__(1.0, 1.0)


def build(name: str) -> EfficientNetLite:
    """The headless backbone timm names `name` (a key of VARIANTS), with timm's random init."""
    if name not in VARIANTS:
        raise ValueError(f"backbone {name!r}: captioner.lite0 builds {', '.join(VARIANTS)}")
    if name == "tf_efficientnet_lite0":
        return EfficientNetLite0()
    v = VARIANTS[name]
    return EfficientNetLite(v.width, v.depth)
