"""Small, deliberately over-parameterised residual CNN for 1x28x28 MNIST.

It is the bundled sample model for channel pruning: every conv is followed by
BatchNorm, and the residual shortcuts tie channels together across layers, so
it exercises the coupled-channel handling of the pruner.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE: tuple[int, int, int, int] = (1, 1, 28, 28)
NUM_CLASSES = 10
# Normalisation applied to raw 0-255 pixels: (pixel / 255 - MEAN) / STD.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
STAGE_CHANNELS: tuple[int, ...] = (32, 64, 128)


def input_shape() -> tuple[int, int, int, int]:
    """Return the (N, C, H, W) shape of one example input batch."""
    return INPUT_SHAPE


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, ReLU after the add."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            # Projection shortcut only where shapes change; identity otherwise.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class MnistNet(nn.Module):
    """Stem conv, three single-block stages (32/64/128 ch), GAP, linear head."""

    def __init__(
        self,
        channels: tuple[int, ...] = STAGE_CHANNELS,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_ch = channels[0]
        for i, out_ch in enumerate(channels):
            # Stage 1 keeps 28x28; later stages halve the resolution.
            stages.append(BasicBlock(in_ch, out_ch, stride=1 if i == 0 else 2))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.flatten(self.pool(x)))


def build_mnist_net() -> nn.Module:
    """Factory used as ``samples.mnist_net:build_mnist_net`` (random init)."""
    return MnistNet()
