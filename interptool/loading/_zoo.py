"""Small built-in architectures (``interptool:NAME``) used by the concept-world demo.

They are ResNet-shaped (``stem``, ``layer1``..``layer4``, ``fc``) so that the layer names users
know from torchvision/timm ResNets (``layer3``, ``layer4``) mean the same thing here.

* ``cw-teacher`` / ``cw-student``: the original demo pair (concept-world version 1, 64 px);
  the teacher is wider and deeper than the student.
* ``cw2-resnet34`` / ``cw2-resnet18``: the reproduction study's nets (concept-world version 2,
  48 px, ``examples/kd_reproduction/``): torchvision's ResNet-34 and ResNet-18 block layouts
  (BasicBlock ``[3, 4, 6, 3]`` and ``[2, 2, 2, 2]``, stage strides 1, 2, 2, 2) at a quarter of
  the width (16-32-64-128 channels), with a 3x3 stride-2 stem and no max-pool, because the
  images are 48 px instead of 224: at 48 px ``layer3`` is 6x6 and ``layer4`` 3x3. As in the
  paper, teacher and student differ in depth only.
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
    """A compact ResNet for small inputs: 3x3 stride-2 stem, four stages of BasicBlocks.

    Args:
        widths: channels of ``layer1``..``layer4``. blocks: BasicBlocks per stage.
        strides: stride of each stage's first block; (1, 2, 2, 1) for the version 1 demo
            nets, (1, 2, 2, 2) (torchvision's) for the ``cw2-*`` nets.
    """

    def __init__(
        self,
        widths: Sequence[int],
        blocks: Sequence[int],
        num_classes: int = 10,
        in_chans: int = 3,
        strides: Sequence[int] = (1, 2, 2, 1),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
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


def cw2_resnet18(num_classes: int = 12, in_chans: int = 3) -> ConceptWorldNet:
    """ResNet-18 layout (BasicBlock [2, 2, 2, 2]) at base width 16: the study's student."""
    return ConceptWorldNet((16, 32, 64, 128), (2, 2, 2, 2), num_classes, in_chans, (1, 2, 2, 2))


def cw2_resnet34(num_classes: int = 12, in_chans: int = 3) -> ConceptWorldNet:
    """ResNet-34 layout (BasicBlock [3, 4, 6, 3]) at base width 16: the study's teacher."""
    return ConceptWorldNet((16, 32, 64, 128), (3, 4, 6, 3), num_classes, in_chans, (1, 2, 2, 2))


# name -> constructor(num_classes, in_chans)
ZOO: dict[str, Callable[..., nn.Module]] = {
    "cw-teacher": cw_teacher, "cw-student": cw_student,
    "cw2-resnet18": cw2_resnet18, "cw2-resnet34": cw2_resnet34,
}
# Input side each net was trained at: version 1 sets are drawn at 64 px, the study's
# version 2 sets at 48 px.
ZOO_INPUT_SIDE = {"cw-teacher": 64, "cw-student": 64, "cw2-resnet18": 48, "cw2-resnet34": 48}

# Preprocessing of the built-in nets.
ZOO_PREPROCESSING: dict[str, dict] = {
    name: dict(
        input_size=(3, ZOO_INPUT_SIDE[name], ZOO_INPUT_SIDE[name]),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="center",
    )
    for name in ZOO
}
