"""The multi-task road extractor: a shared encoder, a road-mask decoder and an orientation decoder.

Built from segmentation-models-pytorch parts (as the reference MultiTaskRoadExtractor
pairs a ResNet-34 encoder with two LinkNet decoders). No weights are downloaded:
``encoder_weights=None``; a local encoder checkpoint can be loaded by path.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from .errors import InputError

log = logging.getLogger(__name__)

ARCHS = {"linknet": "Linknet", "unet": "Unet"}


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "linknet"
    backbone: str = "resnet34"
    in_channels: int = 3
    n_classes: int = 1  # road classes, background excluded
    orientation_bins: int = 18

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MultiTaskRoadModel(nn.Module):
    """Returns ``(segmentation logits [B, 1+n_classes, H, W], orientation logits [B, 1+bins, H, W])``."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.arch not in ARCHS:
            raise ValueError(f"unknown architecture {spec.arch!r}; use one of {sorted(ARCHS)}")
        self.spec = spec
        make = getattr(smp, ARCHS[spec.arch])
        seg = make(encoder_name=spec.backbone, encoder_weights=None, in_channels=spec.in_channels, classes=spec.n_classes + 1)
        orient = make(encoder_name=spec.backbone, encoder_weights=None, in_channels=spec.in_channels, classes=spec.orientation_bins + 1)
        self.encoder = seg.encoder
        self.seg_decoder, self.seg_head = seg.decoder, seg.segmentation_head
        self.orient_decoder, self.orient_head = orient.decoder, orient.segmentation_head
        self.encoder_frozen = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        return self.seg_head(self.seg_decoder(features)), self.orient_head(self.orient_decoder(features))

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Road-mask logits only: classification needs no orientation, and this halves the decoding."""
        return self.seg_head(self.seg_decoder(self.encoder(x)))

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Freeze for real: no gradients, and BatchNorm statistics kept (eval mode) while frozen."""
        self.encoder_frozen = frozen
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> MultiTaskRoadModel:
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self


def load_encoder_checkpoint(model: MultiTaskRoadModel, path: str | Path) -> None:
    """Load encoder weights from a local file (e.g. ImageNet weights staged on the cluster).

    Accepts a plain encoder state dict, or a torchvision/timm ResNet state dict (the
    classifier ``fc.*`` keys are ignored).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "encoder checkpoint does not exist", "stage the weights file on the cluster and fix `training.encoder_checkpoint`")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, f"cannot be read as a PyTorch state dict ({exc})", "use a .pth file saved with torch.save(model.state_dict())") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("encoder."): v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    if unexpected or len(missing) == len(model.encoder.state_dict()):
        raise InputError(path, f"does not match the {model.spec.backbone} encoder (unexpected keys {unexpected[:3]}, {len(missing)} missing)", "use weights of the configured backbone")
    log.info("loaded encoder weights from %s (%d tensors missing)", path, len(missing))
