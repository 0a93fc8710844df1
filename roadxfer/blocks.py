"""Network parts shared by the smp-based models and the reference LinkNet-34: an encoder that freezes for real, and the side network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import InputError


class FreezableEncoder(nn.Module):
    """An ``encoder`` that can be frozen for real: no gradients, BatchNorm statistics kept."""

    encoder: nn.Module
    encoder_frozen: bool = False
    encoder_trainable: tuple[str, ...] = ()
    _encoder_learning: tuple[nn.Module, ...] = ()  # parts of a frozen encoder that still learn (train mode, gradients)

    def freeze_encoder(self, frozen: bool = True, *, train_bn: bool = False, trainable: Sequence[str] = ()) -> None:
        """Freeze (or release) the encoder; ``train_bn`` keeps its BatchNorm layers learning, as fastai's ``freeze`` does.

        With ``train_bn`` the frozen encoder's convolutions keep their weights while its
        BatchNorm scales, shifts and statistics adapt to the new imagery and samples.
        ``trainable`` names encoder stages (its children, e.g. ``conv1``, ``bn1``,
        ``layer1``) that keep learning while the rest is frozen.
        """
        stages = dict(self.encoder.named_children())
        unknown = [s for s in trainable if s not in stages]
        if unknown:
            raise InputError(None, f"encoder stage(s) {unknown} not in this model's encoder", f"choose among {list(stages)}")
        self.encoder_frozen = frozen
        self.encoder_trainable = tuple(trainable) if frozen else ()
        bns = [m for m in self.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if frozen and train_bn else []
        self._encoder_learning = (*bns, *(stages[s] for s in self.encoder_trainable))
        released = {id(p) for m in self._encoder_learning for p in m.parameters()}
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen or id(p) in released)
        self.train(self.training)

    def train(self, mode: bool = True) -> FreezableEncoder:
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
            for m in self._encoder_learning if mode else ():
                m.train()
        return self


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SideNetwork(nn.Module):
    """A small trainable CNN beside a frozen encoder ("side-tuning", Zhang et al., ECCV 2020).

    Three stages of two 3x3 convolutions (``channels``, 2x and 4x as many) read the image;
    the first brings it to 1/``first_stride`` of the resolution (2: the skips of the smp
    models at 1/2, 1/4, 1/8; 4: the reference LinkNet's at 1/4, 1/8, 1/16), the others halve
    it. Each stage's features are added to one of the encoder's skip features through a 1x1
    convolution that starts at zero, so a model with a fresh side network computes exactly
    what its pretrained model did, and the encoder's weights and features stay untouched:
    the side network is there to learn the fine, local cues of the new roads (faint light
    lines) that features trained on paved roads do not carry.
    """

    def __init__(self, in_channels: int, channels: int, skip_channels: Sequence[int], *, first_stride: int = 2) -> None:
        super().__init__()
        if first_stride not in (2, 4):
            raise ValueError(f"first_stride must be 2 or 4, not {first_stride}")
        widths = (channels, 2 * channels, 4 * channels)
        self.stages = nn.ModuleList()
        cin = in_channels
        for i, w in enumerate(widths):
            extra = [_conv_bn_relu(w, w, 2)] if i == 0 and first_stride == 4 else []
            self.stages.append(nn.Sequential(_conv_bn_relu(cin, w, 2), *extra, _conv_bn_relu(w, w)))
            cin = w
        self.merge = nn.ModuleList(nn.Conv2d(w, c, 1) for w, c in zip(widths, skip_channels, strict=True))
        for conv in self.merge:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The three ``skips`` (finest first) with the side's features added."""
        out = []
        for skip, stage, merge in zip(skips, self.stages, self.merge, strict=True):
            x = stage(x)
            out.append(skip + merge(x))
        return out
