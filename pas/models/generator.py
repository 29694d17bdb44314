"""CycleGAN's ResNet-block generator and PatchGAN discriminator (Zhu et al., 2017), in its layout.

Generator: reflection-padded 7x7 stem, two stride-2 3x3 convs, N residual blocks at a quarter of
the resolution, two stride-2 3x3 transposed convs back up, a reflection-padded 7x7 conv and tanh;
instance norm (no affine parameters) and ReLU after every conv but the last. `separable=True` gives
the Mobile-ResNet generator of GAN Compression (Li et al., 2020), whose residual blocks replace each
3x3 conv by a depth-wise 3x3 conv, instance norm and a point-wise conv: the generator PaS compresses
in the paper.

With no pooling, skip convs or grouped convs in the way, every conv of the generator is searchable
by the generic channel graph: the residual trunk is one group (the down-sampling conv's output and
every block's output are added together), each block's inner conv is its own group, and so are the
two down- and two up-sampling convs. The stem, whose output nothing else ties, is searched too; the
last conv writes the image and keeps its width.

MACs at 256x256 (the paper's and CycleGAN's setting), as the project counts them (a transposed conv
by its input pixels, pas.macs): 49.55 G for the 9-block ResNet generator with 64 base filters; GAN
Compression reports 56.8 G, counting the two transposed convs at their output size (4x).
"""
from __future__ import annotations

from torch import nn


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels)  # CycleGAN's: no affine parameters, no running statistics


class SeparableConv(nn.Module):
    """Depth-wise 3x3 conv, instance norm, point-wise conv (GAN Compression's separable conv)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, groups=channels, bias=True)
        self.norm = _norm(channels)
        self.pointwise = nn.Conv2d(channels, out_channels, 1, bias=True)

    def forward(self, x):
        return self.pointwise(self.norm(self.depthwise(x)))


class ResnetBlock(nn.Module):
    """x + (pad, conv, norm, ReLU, pad, conv, norm)(x); `separable`: each conv a SeparableConv."""

    def __init__(self, channels: int, *, separable: bool = False, hidden: int | None = None):
        super().__init__()
        hidden = hidden or channels

        def conv(c_in, c_out):
            return SeparableConv(c_in, c_out) if separable else nn.Conv2d(c_in, c_out, 3, bias=True)
        self.body = nn.Sequential(nn.ReflectionPad2d(1), conv(channels, hidden), _norm(hidden), nn.ReLU(True),
                                  nn.ReflectionPad2d(1), conv(hidden, channels), _norm(channels))

    def forward(self, x):
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's `resnet_{N}blocks` generator (`separable`: Mobile-ResNet) for `in_channels` images
    to `out_channels` images of the same size (a multiple of 4)."""

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, filters: int = 64, blocks: int = 9,
                 separable: bool = False):
        super().__init__()
        f = filters
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, f, 7, bias=True), _norm(f), nn.ReLU(True)]
        for i in range(2):  # down-sampling
            c = f * 2 ** i
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=True), _norm(2 * c), nn.ReLU(True)]
        layers += [ResnetBlock(4 * f, separable=separable) for _ in range(blocks)]
        for i in range(2):  # up-sampling
            c = f * 4 // 2 ** i
            layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=True),
                       _norm(c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(f, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class PatchDiscriminator(nn.Module):
    """CycleGAN's PatchGAN: 4x4 convs, `layers` of them at stride 2, LeakyReLU(0.2), instance norm
    after all but the first and the last; one real/fake logit per patch. `layers=3` is the 70x70
    PatchGAN for 256x256 images; small images take fewer."""

    def __init__(self, *, in_channels: int = 3, filters: int = 64, layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(in_channels, filters, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        c = filters
        for i in range(1, layers + 1):
            out = filters * min(2 ** i, 8)
            seq += [nn.Conv2d(c, out, 4, stride=2 if i < layers else 1, padding=1), _norm(out),
                    nn.LeakyReLU(0.2, True)]
            c = out
        seq += [nn.Conv2d(c, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*seq)

    def forward(self, x):
        return self.model(x)
