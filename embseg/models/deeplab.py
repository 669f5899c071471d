"""DeepLabV3+ (Chen et al., ECCV 2018): ASPP on the high-level features plus a decoder that
refines the result with the stride-4 low-level features.

Layout follows torchvision's ``deeplabv3.py``: small ``nn.Sequential`` blocks, the image
pooling branch upsampled back to the feature size, a 1x1 projection with dropout. The decoder
output (stride 4) is what the segmentation model's last conv turns into embeddings or logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
"""Atrous rates of the three 3x3 ASPP branches for each output stride (doubled at stride 8)."""


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """The DeepLab atrous rates for an output stride of 16 or 8."""
    if output_stride not in ASPP_RATES:
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    return ASPP_RATES[output_stride]


class ASPPConv(nn.Sequential):
    """3x3 atrous conv + BN + ReLU (one ASPP branch)."""

    def __init__(self, in_channels: int, out_channels: int, *, dilation: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))
        self.dilation = dilation


class ASPPPooling(nn.Sequential):
    """Image-level branch: global average pool, 1x1 conv + BN + ReLU, broadcast back.

    Its BN sees one value per channel and image, so a training batch of one image has no
    batch statistics (torchvision's version raises there). Such a batch (the last, partial
    batch of a stream; batch size 1 for a big backbone on a small GPU) is normalised with
    the running statistics instead, which it leaves unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pool, conv, norm, relu = self
        pooled = conv(pool(x))
        if self.training and pooled.shape[0] == 1:
            pooled = F.batch_norm(pooled, norm.running_mean, norm.running_var, norm.weight,
                                  norm.bias, training=False, eps=norm.eps)
        else:
            pooled = norm(pooled)
        return F.interpolate(relu(pooled), size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 branch, three atrous branches, image pooling."""

    def __init__(self, in_channels: int, *, rates: tuple[int, int, int], out_channels: int = 256,
                 dropout: float = 0.5) -> None:
        super().__init__()
        branches: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))]
        branches += [ASPPConv(in_channels, out_channels, dilation=rate) for rate in rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout))
        self.rates = tuple(rates)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    """ASPP + low-level fusion + the last 1x1 conv; returns stride-4 ``out_channels`` maps.

    ``out_channels`` is the embedding dimension d (embedding head) or the class count C
    (softmax head); upsampling to the input size is the model's job.

    ``normalize_output`` (for the embedding head) makes the last conv bias-free and follows
    it with a BatchNorm without affine parameters, so that every output channel has zero
    mean and unit variance over the batch. Why: the fused features are post-ReLU (all
    positive), so the plain last conv gives every pixel a large shared component (its
    response to the feature mean, plus the bias); after L2-normalisation all pixel
    embeddings then point nearly the same way (measured on the synthetic data: the mean of
    the unit embeddings reached norm 0.99 within 100 steps), and the few classes near that
    direction are the only ones the kNN loss ever sees. Standardising the d outputs removes
    the shared component; without affine parameters it cannot be learnt back.

    ``dropout`` is the ASPP projection's (0.5 as in torchvision's DeepLabV3).
    """

    def __init__(self, *, high_channels: int, low_channels: int, out_channels: int,
                 output_stride: int = 16, channels: int = 256, low_level_channels: int = 48,
                 normalize_output: bool = False, dropout: float = 0.5) -> None:
        super().__init__()
        self.aspp = ASPP(high_channels, rates=aspp_rates(output_stride), out_channels=channels,
                         dropout=dropout)
        self.low_level_proj = nn.Sequential(
            nn.Conv2d(low_channels, low_level_channels, 1, bias=False),
            nn.BatchNorm2d(low_level_channels),
            nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(
            nn.Conv2d(channels + low_level_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True))
        if normalize_output:
            self.classifier: nn.Module = nn.Sequential(
                nn.Conv2d(channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels, affine=False))
        else:
            self.classifier = nn.Conv2d(channels, out_channels, 1)
        _init_decoder(self)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        context = self.aspp(high)
        context = F.interpolate(context, size=low.shape[-2:], mode="bilinear",
                                align_corners=False)
        fused = self.fuse(torch.cat([context, self.low_level_proj(low)], dim=1))
        return self.classifier(fused)


def _init_decoder(module: nn.Module) -> None:
    """Kaiming-normal convs, unit BN, zero conv biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
