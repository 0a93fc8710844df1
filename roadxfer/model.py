"""The multi-task road extractor: a shared encoder, a road-mask decoder and an orientation decoder.

Two families: ``linknet``/``unet`` are built from segmentation-models-pytorch parts;
``linknet34_mtl`` is the reference tool's own network (:mod:`roadxfer.linknet_mtl`),
whose state dict is the reference's, key for key. No weights are downloaded
(``encoder_weights=None``); a local encoder checkpoint can be loaded by path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from .blocks import FreezableEncoder, SideNetwork
from .errors import InputError
from .linknet_mtl import LinkNet34MTL
from .spec import ARCHS, REFERENCE_ARCH, ModelSpec, raw_pixel_scaling  # noqa: F401  (the model's spec, imported from here too)

log = logging.getLogger(__name__)

def undirected_log_probs(logits: torch.Tensor, *, reference_layout: bool) -> torch.Tensor:
    """Log-probabilities over (no road, direction bins over 180 degrees) from a model's orientation logits.

    For the reference layout, P(theta) + P(theta + 180) is the probability of the undirected
    direction theta, so a road learnt in either direction scores the same.
    """
    logp = F.log_softmax(logits.float(), 1)
    if not reference_layout:
        return logp
    k = (logits.shape[1] - 1) // 2
    directions = torch.logaddexp(logp[:, :k], logp[:, k : 2 * k])
    return torch.cat([logp[:, 2 * k :], directions], 1)


def build_model(spec: ModelSpec) -> nn.Module:
    """The network of a spec: the reference architecture or an smp-based one."""
    if spec.arch == REFERENCE_ARCH:
        return LinkNet34MTL(spec)
    return MultiTaskRoadModel(spec)


class MultiTaskRoadModel(FreezableEncoder):
    """Returns ``(segmentation logits [B, 1+n_classes, H, W], orientation logits [B, 1+bins, H, W])``."""

    SEG_HEAD = ("seg_head.",)
    ORIENT_HEAD = ("orient_head.",)

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.arch not in ARCHS:
            raise ValueError(f"unknown architecture {spec.arch!r}; use one of {sorted([*ARCHS, REFERENCE_ARCH])}")
        self.spec = spec
        make = getattr(smp, ARCHS[spec.arch])
        seg = make(encoder_name=spec.backbone, encoder_weights=None, in_channels=spec.in_channels, classes=spec.n_classes + 1)
        orient = make(encoder_name=spec.backbone, encoder_weights=None, in_channels=spec.in_channels, classes=spec.orientation_bins + 1)
        self.encoder = seg.encoder
        self.seg_decoder, self.seg_head = seg.decoder, seg.segmentation_head
        self.orient_decoder, self.orient_head = orient.decoder, orient.segmentation_head
        self.encoder_frozen = False
        # Outside the encoder, so a frozen encoder leaves it learning.
        self.side = SideNetwork(spec.in_channels, spec.side_channels, self.encoder.out_channels[1:4]) if spec.side_channels else None

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's features, with the side network's added where there is one."""
        features = self.encoder(x)  # the input, then 1/2, 1/4, 1/8, 1/16, 1/32
        if self.side is not None:
            features = [features[0], *self.side(x, features[1:4]), *features[4:]]
        return features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.seg_head(self.seg_decoder(features)), self.orient_head(self.orient_decoder(features))

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Road-mask logits only: classification needs no orientation, and this halves the decoding."""
        return self.seg_head(self.seg_decoder(self.features(x)))


def read_state_dict(path: Path, what: str = "a PyTorch state dict") -> dict[str, torch.Tensor]:
    """Tensors only: ``weights_only=True`` refuses any pickled object instead of running it.

    Accepts a plain state dict or one wrapped as ``{"state_dict": ...}`` (Lightning, timm).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, f"cannot be read as {what} ({str(exc).splitlines()[0]})",
                         "use weights saved with torch.save(model.state_dict()); a file that holds other objects is refused, never run") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "is not a state dict of tensors", "use weights saved with torch.save(model.state_dict())")
    return state


# torchvision ResNet children as the reference's Sequential encoder numbers them.
_SEQUENTIAL_RESNET = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


def encoder_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a torchvision/timm ResNet (or encoder-only) state dict as ``model.encoder`` names them."""
    state = {k.removeprefix("encoder."): v for k, v in state.items() if not k.startswith("fc.")}
    if getattr(model, "spec", None) is not None and model.spec.arch == REFERENCE_ARCH:
        renamed = {}
        for k, v in state.items():
            head, _, rest = k.partition(".")
            renamed[f"{_SEQUENTIAL_RESNET.get(head, head)}.{rest}"] = v
        state = renamed
    return state


def load_encoder_checkpoint(model: nn.Module, path: str | Path) -> int:
    """Load encoder weights from a local file (e.g. ImageNet weights staged on the cluster).

    Accepts a plain encoder state dict, or a torchvision/timm ResNet state dict (the
    classifier ``fc.*`` keys are ignored). Returns the number of tensors loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "encoder checkpoint does not exist", "stage the weights file on the cluster and fix `training.encoder_checkpoint`")
    state = encoder_state(model, read_state_dict(path))
    own = model.encoder.state_dict()
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong_shape:
        raise InputError(path, f"does not match the {model.spec.backbone} encoder ({wrong_shape[0]} has shape {tuple(state[wrong_shape[0]].shape)}, the encoder's is {tuple(own[wrong_shape[0]].shape)})", "use weights of the configured backbone")
    # nn.Module's own loader: segmentation-models-pytorch's encoders override it and return None.
    missing, unexpected = nn.Module.load_state_dict(model.encoder, state, strict=False)
    if unexpected or missing:  # a partial encoder (e.g. ResNet-18 weights for a ResNet-34) is refused too
        raise InputError(path, f"does not match the {model.spec.backbone} encoder ({len(unexpected)} unexpected keys such as {list(unexpected)[:2]}, {len(missing)} missing such as {list(missing)[:2]})", "use weights of the configured backbone")
    log.info("loaded %d encoder tensors from %s", len(own), path)
    return len(own)
