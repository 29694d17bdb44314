"""ResNet (He et al., 2016) in torchvision's layout and key names, with any stage widths and stem.

The blocks are torchvision's own `BasicBlock` and `Bottleneck`, so the ImageNet members load
torchvision's weight files as they are and the channel graph sees exactly torchvision's network.
"""
from __future__ import annotations

import torch
from torch import nn


def _block(kind: str) -> type[nn.Module]:
    # Imported on first use: `import torchvision` costs seconds (it loads torch._dynamo), paid by
    # every short job otherwise.
    from torchvision.models.resnet import BasicBlock, Bottleneck
    return {"basic": BasicBlock, "bottleneck": Bottleneck}[kind]


class ResNet(nn.Module):
    """Stem, four stages of residual blocks, global average pooling, classifier.

    `stem="imagenet"`: 7x7/2 conv + 3x3/2 max-pool (torchvision); `stem="small"`: one 3x3 conv with
    `stem_stride` and no pooling, for 28x28 and 32x32 inputs.
    """

    def __init__(self, *, block: str, blocks_per_stage: tuple[int, ...], widths: tuple[int, ...],
                 stem_width: int, stem: str = "imagenet", stem_stride: int = 2,
                 stage_strides: tuple[int, ...] = (1, 2, 2, 2), in_channels: int = 3, num_classes: int = 1000):
        super().__init__()
        cls = _block(block)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 3, stem_stride, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        c_in = stem_width
        for i, (n, width, stride) in enumerate(zip(blocks_per_stage, widths, stage_strides)):
            layers = []
            for j in range(n):
                s = stride if j == 0 else 1
                down = None
                if s != 1 or c_in != width * cls.expansion:
                    down = nn.Sequential(nn.Conv2d(c_in, width * cls.expansion, 1, s, bias=False),
                                         nn.BatchNorm2d(width * cls.expansion))
                layers.append(cls(c_in, width, s, down))
                c_in = width * cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
