"""Feature extractors for DeepLabV3+: ResNet-50/101, MobileNetV2 and a tiny CPU network.

Every backbone returns ``{"low": stride-4 features, "high": stride-``output_stride``
features}`` and exposes ``low_channels``, ``high_channels`` and ``output_stride``. The
ResNet and MobileNetV2 modules use torchvision's parameter names (``conv1.weight``,
``layer1.0.conv1.weight``, ``features.3.conv.1.0.weight``, ...), so a torchvision-format state
dict saved on disk loads with :func:`load_backbone_weights`. Nothing is ever downloaded.

The output stride is reached the DeepLab way: the last stride-2 stages are replaced by
dilated convolutions (rate 2, then 4), keeping the receptive field of the pretrained net.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from embseg.errors import EmbsegError

BACKBONES = ("tiny", "mobilenetv2", "resnet50", "resnet101")
IGNORED_WEIGHT_PREFIXES = ("fc.", "classifier.")
"""Classification-head keys of torchvision state dicts: not part of a segmentation backbone."""


def _dilated_stages(output_stride: int) -> tuple[bool, bool, bool]:
    """Which of the last three stride-2 stages become dilated for an output stride of 8/16."""
    if output_stride == 16:
        return (False, False, True)
    if output_stride == 8:
        return (False, True, True)
    raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")


# --------------------------------------------------------------------------- ResNet


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), torchvision layout and names."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, *, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk (no pooling/fc) with torchvision's replace-stride-with-dilation rule."""

    def __init__(self, *, layers: tuple[int, int, int, int], output_stride: int = 16) -> None:
        super().__init__()
        self.output_stride = output_stride
        self._in_channels = 64
        self._dilation = 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        dilate = _dilated_stages(output_stride)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(256, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(512, layers[3], stride=2, dilate=dilate[2])
        self.low_channels = 64 * Bottleneck.expansion
        self.high_channels = 512 * Bottleneck.expansion
        _init_conv_bn(self)

    def _make_layer(self, width: int, blocks: int, *, stride: int = 1, dilate: bool = False
                    ) -> nn.Sequential:
        """One stage; a dilated stage keeps stride 1 and multiplies the dilation instead."""
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out_channels = width * Bottleneck.expansion
        downsample = None
        if stride != 1 or self._in_channels != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))
        blocks_list = [Bottleneck(self._in_channels, width, stride=stride,
                                  dilation=previous_dilation, downsample=downsample)]
        self._in_channels = out_channels
        blocks_list += [Bottleneck(out_channels, width, dilation=self._dilation)
                        for _ in range(1, blocks)]
        return nn.Sequential(*blocks_list)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return {"low": low, "high": high}


# --------------------------------------------------------------------------- MobileNetV2


class ConvBNReLU6(nn.Sequential):
    """Conv + BN + ReLU6, named ``0``/``1``/``2`` like torchvision's Conv2dNormActivation."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                 stride: int = 1, dilation: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise (strided or dilated), 1x1 linear."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, expand_ratio: int,
                 dilation: int = 1) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, dilation=dilation, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


MOBILENETV2_SETTINGS = (
    # expand ratio t, channels c, repeats n, stride s (torchvision / the paper's table 2)
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
MOBILENETV2_LOW_LEVEL_END = 4
"""``features[:4]`` ends at stride 4 (24 channels): the decoder's low-level input."""


class MobileNetV2(nn.Module):
    """MobileNetV2 ``features`` (width 1.0) with dilation instead of the last strides."""

    def __init__(self, *, output_stride: int = 16) -> None:
        super().__init__()
        self.output_stride = output_stride
        _dilated_stages(output_stride)
        features: list[nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
        in_channels, current_stride, dilation = 32, 2, 1
        for expand_ratio, channels, repeats, stride in MOBILENETV2_SETTINGS:
            previous_dilation = dilation
            if current_stride * stride > output_stride:
                dilation *= stride
                stride = 1
            current_stride *= stride
            for index in range(repeats):
                features.append(InvertedResidual(
                    in_channels, channels, stride=stride if index == 0 else 1,
                    expand_ratio=expand_ratio,
                    dilation=previous_dilation if index == 0 else dilation))
                in_channels = channels
        features.append(ConvBNReLU6(in_channels, 1280, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.low_channels = 24
        self.high_channels = 1280
        _init_conv_bn(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        low = self.features[:MOBILENETV2_LOW_LEVEL_END](x)
        high = self.features[MOBILENETV2_LOW_LEVEL_END:](low)
        return {"low": low, "high": high}


# --------------------------------------------------------------------------- tiny


class ConvBNReLU(nn.Sequential):
    """3x3 conv + BN + ReLU (the tiny backbone's only building block)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1,
                 dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation,
                      dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True))


class TinyBackbone(nn.Module):
    """A ~0.4M-parameter plain conv net for CPU tests and the demo.

    Stride-4 low-level features (32 channels, enough for colour and fine texture) and
    stride-16 (or 8, dilated) high-level features (128 channels).
    """

    def __init__(self, *, output_stride: int = 16) -> None:
        super().__init__()
        self.output_stride = output_stride
        dilated = _dilated_stages(output_stride)
        dilation_8 = 2 if dilated[1] else 1
        self.stem = nn.Sequential(ConvBNReLU(3, 16, stride=2), ConvBNReLU(16, 32, stride=2),
                                  ConvBNReLU(32, 32))
        self.stage8 = nn.Sequential(ConvBNReLU(32, 64, stride=2), ConvBNReLU(64, 64))
        self.stage16 = nn.Sequential(
            ConvBNReLU(64, 96, stride=1 if dilated[1] else 2, dilation=1),
            ConvBNReLU(96, 128, dilation=dilation_8),
            ConvBNReLU(128, 128, dilation=2 * dilation_8))
        self.low_channels = 32
        self.high_channels = 128
        _init_conv_bn(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        low = self.stem(x)
        return {"low": low, "high": self.stage16(self.stage8(low))}


# --------------------------------------------------------------------------- builders


def _init_conv_bn(module: nn.Module) -> None:
    """Kaiming-normal convs and unit BN (torchvision's init), for training from scratch."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_backbone(*, name: str, output_stride: int = 16) -> nn.Module:
    """A backbone by name (one of :data:`BACKBONES`) at output stride 8 or 16."""
    _dilated_stages(output_stride)
    if name == "tiny":
        return TinyBackbone(output_stride=output_stride)
    if name == "mobilenetv2":
        return MobileNetV2(output_stride=output_stride)
    if name == "resnet50":
        return ResNet(layers=(3, 4, 6, 3), output_stride=output_stride)
    if name == "resnet101":
        return ResNet(layers=(3, 4, 23, 3), output_stride=output_stride)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def _read_state_dict(path: Path) -> Mapping[str, Tensor]:
    """A state dict from disk, tensors only (``weights_only=True``), or EmbsegError."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EmbsegError(f"{path}: backbone weights file not found") from None
    except Exception as exc:  # unpickling errors have many types; all mean "not weights"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmbsegError(f"{path}: not a readable state dict ({first_line})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(
            isinstance(key, str) and isinstance(value, Tensor) for key, value in loaded.items()):
        raise EmbsegError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return loaded


def _key_list(keys: set[str], limit: int = 5) -> str:
    """A short, sorted rendering of a key set for an error message."""
    ordered = sorted(keys)
    more = f" (+{len(ordered) - limit} more)" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load a local torchvision-format state dict into ``backbone`` (in place).

    Classification-head keys (``fc.*``, ``classifier.*``) are ignored, and so are absent
    ``num_batches_tracked`` buffers (older checkpoints lack them); any other missing or
    unexpected key, or a shape mismatch, raises EmbsegError naming the file and the keys.
    """
    path = Path(path)
    given = {key: value for key, value in _read_state_dict(path).items()
             if not key.startswith(IGNORED_WEIGHT_PREFIXES)}
    expected = backbone.state_dict()
    missing = {key for key in expected.keys() - given.keys()
               if not key.endswith("num_batches_tracked")}
    unexpected = set(given.keys() - expected.keys())
    if missing or unexpected:
        parts = [f"missing keys: {_key_list(missing)}" if missing else "",
                 f"unexpected keys: {_key_list(unexpected)}" if unexpected else ""]
        raise EmbsegError(f"{path}: backbone weights do not fit {type(backbone).__name__}; "
                          + "; ".join(part for part in parts if part))
    wrong_shape = {key for key, value in given.items() if value.shape != expected[key].shape}
    if wrong_shape:
        raise EmbsegError(f"{path}: backbone weights have the wrong shape for keys: "
                          f"{_key_list(wrong_shape)}")
    backbone.load_state_dict(given, strict=False)
