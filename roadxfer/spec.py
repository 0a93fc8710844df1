"""What a model is, without torch: its architecture, backbone, bands, classes, direction bins and side network.

The report and the torch-free steps read packages through this; :mod:`roadxfer.model` builds the network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ARCHS = {"linknet": "Linknet", "unet": "Unet"}
REFERENCE_ARCH = "linknet34_mtl"  # the reference tool's MultiTaskRoadExtractor (LinkNet, ResNet-34)


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "linknet"
    backbone: str = "resnet34"
    in_channels: int = 3
    n_classes: int = 1  # road classes, background excluded
    orientation_bins: int = 18  # direction bins: over 180 degrees (ours) or 360 (reference layout)
    side_channels: int = 0  # width of a trainable side network beside the encoder (SideNetwork); 0: none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def reference_layout(self) -> bool:
        """Orientation as the reference has it: bins over 360 degrees clockwise, "no road" last."""
        return self.arch == REFERENCE_ARCH

    @property
    def raw_input(self) -> bool:
        """The reference network takes unscaled 0-255 pixels; ours take normalised ones."""
        return self.arch == REFERENCE_ARCH


def raw_pixel_scaling(bands: int) -> tuple[list[float], list[float]]:
    """Normalisation (mean, std on the 0-1 scale) that turns 0-1 inputs back into raw 0-255 values."""
    return [0.0] * bands, [1.0 / 255.0] * bands
