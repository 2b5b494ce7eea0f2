"""Small built-in architectures (``interptool:NAME``) used by the concept-world demo.

They are ResNet-shaped (``stem``, ``layer1``..``layer4``, ``fc``) so that the layer names users
know from torchvision/timm ResNets (``layer3``, ``layer4``) mean the same thing here. The
teacher is wider and deeper than the student, as ResNet-34 is to ResNet-18 in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        # in-place ReLU on purpose: real ResNets use it, and the hooks/attribution must cope.
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ConceptWorldNet(nn.Module):
    """A compact ResNet for 64-128 px inputs: stride-2 stem, four stages (strides 1, 2, 2, 1)."""

    def __init__(
        self,
        widths: Sequence[int],
        blocks: Sequence[int],
        num_classes: int = 10,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        strides = (1, 2, 2, 1)
        c_in = widths[0]
        for i, (w, n, s) in enumerate(zip(widths, blocks, strides), start=1):
            layers = [_BasicBlock(c_in, w, s)] + [_BasicBlock(w, w, 1) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*layers))
            c_in = w
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cw_teacher(num_classes: int = 10, in_chans: int = 3) -> ConceptWorldNet:
    return ConceptWorldNet((24, 48, 96, 192), (2, 2, 2, 2), num_classes, in_chans)


def cw_student(num_classes: int = 10, in_chans: int = 3) -> ConceptWorldNet:
    return ConceptWorldNet((16, 32, 64, 128), (1, 1, 1, 1), num_classes, in_chans)


# name -> constructor(num_classes, in_chans)
ZOO: dict[str, Callable[..., nn.Module]] = {"cw-teacher": cw_teacher, "cw-student": cw_student}

# Preprocessing of the built-in nets (concept-world images are 64 px by default).
ZOO_PREPROCESSING: dict[str, dict] = {
    name: dict(
        input_size=(3, 64, 64),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="center",
    )
    for name in ZOO
}
