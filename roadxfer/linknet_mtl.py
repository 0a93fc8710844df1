"""The reference tool's multi-task road extractor: LinkNet-34 with a road and an orientation branch.

Written from the published design (Batra et al., CVPR 2019, "Improved Road Connectivity
by Joint Learning of Orientation and Segmentation") and checked against a package saved
by the reference library (``tests/data/arcgis-mtre-linknet34``): its state dict loads
with ``strict=True`` into this module, key for key, and the logits agree. Two details
of the reference network, measured against that package, differ from the paper's code:

* each decoder block adds its skip connection *after* its last ReLU (as here);
* the final classifier of both branches has LeakyReLU(0.2) between its three layers.

When a chip side is not a multiple of 32, a decoder block's output is resized to its
skip's size (nearest neighbour) before the addition, as the reference does.

Input: raw pixel values 0-255 as float (the reference feeds its road model unscaled
pixels, whatever its ``.emd`` says about ImageNet normalisation). Outputs: road logits
``[B, 1 + n_classes, H, W]`` and orientation logits ``[B, bins + 1, H, W]`` where channel
``k < bins`` is the direction ``[k, k+1) x 360/bins`` degrees clockwise from the +x
axis on screen, and the last channel is "no road" (the reference's layout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet34

from .blocks import FreezableEncoder, SideNetwork

if TYPE_CHECKING:
    from .model import ModelSpec

FILTERS = (64, 128, 256, 512)
BACKBONES = {"resnet34": resnet34, "resnet18": resnet18}


class DecoderBlock(nn.Module):
    """1x1 conv to C/4, 3x3 transposed conv (x2 upsampling), 1x1 conv to ``out``; BN + ReLU after each."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin // 4
        self.conv1 = nn.Conv2d(cin, mid, 1)
        self.norm1 = nn.BatchNorm2d(mid)
        self.deconv2 = nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1)
        self.norm2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1)
        self.norm3 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.deconv2(x)))
        return F.relu(self.norm3(self.conv3(x)))


def _up_add(decoded: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    if decoded.shape[-2:] != skip.shape[-2:]:
        decoded = F.interpolate(decoded, size=skip.shape[-2:], mode="nearest")
    return decoded + skip


class LinkNet34MTL(FreezableEncoder):
    """Shared ResNet encoder (``encoder.0`` ... ``encoder.7``), road decoders and ``o_`` orientation decoders."""

    # Output layers that depend on the classes or the orientation bins (re-initialised when those differ).
    SEG_HEAD = ("finalconv3.",)
    ORIENT_HEAD = ("o_finalconv3.",)

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.backbone not in BACKBONES:
            raise ValueError(f"backbone {spec.backbone!r} is not available for linknet34_mtl; use one of {sorted(BACKBONES)}")
        self.spec = spec
        resnet = BACKBONES[spec.backbone](weights=None)
        if spec.in_channels != 3:
            resnet.conv1 = nn.Conv2d(spec.in_channels, 64, 7, stride=2, padding=3, bias=False)
        # conv1, bn1, relu, maxpool, layer1..layer4: the reference's `encoder.0` ... `encoder.7`.
        self.encoder = nn.Sequential(*list(resnet.children())[:8])
        for prefix, n_out in (("", spec.n_classes + 1), ("o_", spec.orientation_bins + 1)):
            for i, (cin, cout) in enumerate(zip(FILTERS[::-1], (256, 128, 64, 64))):
                setattr(self, f"{prefix}decoder{4 - i}", DecoderBlock(cin, cout))
            setattr(self, f"{prefix}finaldeconv1", nn.ConvTranspose2d(FILTERS[0], 32, 3, stride=2))
            setattr(self, f"{prefix}finalconv2", nn.Conv2d(32, 32, 3))
            setattr(self, f"{prefix}finalconv3", nn.Conv2d(32, n_out, 2, padding=1))
        self.encoder_frozen = False
        # Ours, not the reference's (its packages have none): a side network beside the encoder.
        self.side = SideNetwork(spec.in_channels, spec.side_channels, FILTERS[:3], first_stride=4) if spec.side_channels else None

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of layer1..layer4 (strides 4, 8, 16, 32), with the side network's added to the first three."""
        h = self.encoder[:4](x)
        feats = []
        for layer in self.encoder[4:]:
            h = layer(h)
            feats.append(h)
        if self.side is not None:
            feats = [*self.side(x, feats[:3]), feats[3]]
        return feats

    def _branch(self, prefix: str, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        e1, e2, e3, e4 = feats
        d = _up_add(getattr(self, f"{prefix}decoder4")(e4), e3)
        d = _up_add(getattr(self, f"{prefix}decoder3")(d), e2)
        d = _up_add(getattr(self, f"{prefix}decoder2")(d), e1)
        d = getattr(self, f"{prefix}decoder1")(d)
        f = F.leaky_relu(getattr(self, f"{prefix}finaldeconv1")(d), 0.2)
        f = F.leaky_relu(getattr(self, f"{prefix}finalconv2")(f), 0.2)
        f = getattr(self, f"{prefix}finalconv3")(f)
        if f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="nearest")
        return f

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encode(x)
        size = tuple(x.shape[-2:])
        return self._branch("", feats, size), self._branch("o_", feats, size)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        return self._branch("", self.encode(x), tuple(x.shape[-2:]))
