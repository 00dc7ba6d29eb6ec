"""The Wide ResNet classifier of Deep GEO (Zagoruyko & Komodakis 2016, pre-activation), as the official Keras code
builds it (``ninatu/anomaly_detection`` ``deep_geo/networks.py``, from Golan & El-Yaniv's code; ``shared/METHODS.md``
§6), in torch.

WRN-``depth``-``widen``: a 3x3 convolution to 16 channels, three groups of ``(depth - 4) / 6`` pre-activation basic
blocks at widths ``16 k``, ``32 k``, ``64 k`` (k = ``widen``) and strides 1, 2, 2, then batch norm, ReLU, an 8 x 8
average pooling (stride 8), flatten and a linear layer to the classes (the softmax is left to the loss). A basic
block: BN-ReLU, conv3x3 (stride s), BN-ReLU, dropout, conv3x3; the shortcut is the block's input when the widths
match, else a 1x1 convolution (stride s) of the first BN-ReLU's output. Convolutions have no bias and He-normal
weights (std sqrt(2 / fan_in)); the linear layer's weights are uniform in ±1/sqrt(fan_in), its bias 0 (Keras'
defaults as the official code sets them); batch norm: Keras momentum 0.9 (torch 0.1), eps 1e-5, weight 1, bias 0.
On 64 px tiles the last group is 16 x 16 px, pooled to 2 x 2: 4 x 64 k features (2,048 for WRN-16-8). The flatten
order (channels first, not Keras' channels last) only permutes the linear layer's inputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Keras' batch-norm momentum 0.9 (running = 0.9 running + 0.1 batch) in torch's convention, and its epsilon.
BN_MOMENTUM, BN_EPS = 0.1, 1e-5
#: Side of the final average pooling window (and its stride), in px of the last group's feature map.
POOL_PX = 8


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    """Pre-activation basic block: (B, cin, H, W) -> (B, cout, H / stride, W / stride)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1, self.conv1 = _bn(cin), _conv(cin, cout, 3, stride)
        self.bn2, self.conv2 = _bn(cout), _conv(cout, cout, 3)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = None if cin == cout and stride == 1 else _conv(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(self.dropout(torch.relu(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` (module docstring): (B, 3, S, S) float32 -> (B, ``num_classes``) logits, S a multiple
    of 32 (S / 4 px after the two stride-2 groups must hold whole 8 px pooling windows). ValueError for a depth that
    is not 6 n + 4 (n >= 1) or a width factor below 1."""

    def __init__(self, depth: int, widen: int, num_classes: int, image_size: int = 64, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet's depth must be 6 n + 4 with n >= 1 (10, 16, 22, ...), got {depth}")
        if widen < 1:
            raise ValueError(f"the width factor must be >= 1, got {widen}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = _conv(3, widths[0], 3)
        layers, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2), strict=True):
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1, dropout))
                cin = cout
        self.groups = nn.Sequential(*layers)
        self.bn = _bn(cin)
        self.pool = nn.AvgPool2d(POOL_PX)
        self.features = cin * (image_size // 4 // POOL_PX) ** 2
        self.fc = nn.Linear(self.features, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        bound = 1.0 / math.sqrt(self.features)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.groups(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))
