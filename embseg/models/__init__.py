"""DeepLabV3+ segmentation models with the embedding (ESS) head or the softmax baseline.

``build_model(...)`` returns a :class:`SegmentationModel`; ``build_model(**model.config)``
rebuilds the same architecture (checkpoints store ``config``, the trainer and evaluator
rebuild from it). Devices are the caller's business: nothing here calls ``.cuda()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embseg import ess
from embseg.errors import EmbsegError
from embseg.models.backbones import BACKBONES, build_backbone, load_backbone_weights
from embseg.models.deeplab import DeepLabV3PlusDecoder

HEADS = ("embedding", "softmax")
ASPP_DROPOUT = 0.5
"""Default dropout of the ASPP projection (torchvision's DeepLabV3)."""
BACKBONE_LR_FACTOR = 0.1
"""The backbone trains at this fraction of the base learning rate by default (DeepLab
practice for pretrained backbones; a backbone trained from scratch wants 1.0)."""

KERNEL_MAX_ELEMENTS = 2**31 - 1
"""Most logits one cross-entropy kernel call is given (see :func:`softmax_cross_entropy`)."""

DECODER_WIDTHS = {"tiny": (96, 24)}
"""(ASPP/decoder channels, low-level projection channels) per backbone; default (256, 48).

The tiny CPU backbone gets a narrower head so that a CPU training run takes minutes; the
real backbones use the paper's widths.
"""


def softmax_cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -1,
                          max_elements: int = KERNEL_MAX_ELEMENTS) -> Tensor:
    """Mean cross-entropy of (B, C, H, W) ``logits`` over the pixels whose ``target`` is not
    ``ignore_index``: ``F.cross_entropy``, in parts of at most ``max_elements`` logits.

    Why parts: the softmax baseline at the paper's setting (16 x 1,284 x 513 x 513) holds
    5.4e9 logits, and PyTorch's CUDA kernels for a spatial cross-entropy have computed
    offsets in 32 bits (the NLLLoss2d backward did until mid-2026, pytorch/pytorch#190139:
    an illegal memory access past 2**31 - 1 elements). A batch that fits in one call, every
    CPU batch of this project, takes the one plain call; larger ones are split into groups
    of samples, and a sample too large on its own into bands of rows, and the per-part sums
    are divided by the labelled-pixel count (the same mean). Give float32 (or float64) logits,
    as the model does: a half-precision sum over a part's pixels overflows.

    Layout: channels-last logits (the model's, see :meth:`SegmentationModel.forward`) are
    given to ``F.cross_entropy`` as their (pixels, C) row view, without a copy; PyTorch's
    CPU kernels are faster on rows than on the spatial (B, C, H, W) form (forward + backward
    at 8 x 1,289 x 64 x 64: 0.20 s vs 0.38 s). Other layouts take the spatial call.
    """
    if logits.numel() <= max_elements:
        return _cross_entropy(logits, target, ignore_index=ignore_index, reduction="mean")
    _, classes, height, width = logits.shape
    if classes * width > max_elements:
        raise ValueError(f"one row of logits ({classes} classes x {width} pixels) is over "
                         f"{max_elements} elements")
    samples = max(1, max_elements // (classes * height * width))
    rows = min(height, max_elements // (classes * width))
    total = logits.new_zeros(())
    for sample_logits, sample_target in zip(logits.split(samples), target.split(samples),
                                            strict=True):
        for part_logits, part_target in zip(sample_logits.split(rows, dim=2),
                                            sample_target.split(rows, dim=1), strict=True):
            total = total + _cross_entropy(part_logits, part_target,
                                           ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum()


def _cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int, reduction: str
                   ) -> Tensor:
    """One ``F.cross_entropy`` call: on the pixel-row view of channels-last logits (a view:
    every sample group and row band of a channels-last tensor is channels-last too), else on
    the spatial form."""
    if logits.is_contiguous(memory_format=torch.channels_last):
        rows = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
        return F.cross_entropy(rows, target.reshape(-1), ignore_index=ignore_index,
                               reduction=reduction)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


class SegmentationModel(nn.Module):
    """Backbone + DeepLabV3+ decoder + output head, with its own loss and prediction rule.

    ``forward`` returns, at input resolution, L2-normalised (B, d, H, W) pixel embeddings
    (embedding head) or (B, C, H, W) logits (softmax head). ``loss`` and ``predict`` take
    that output; targets are ``0..C-1`` with -1 for unlabelled pixels.
    """

    def __init__(self, *, backbone: nn.Module, decoder: DeepLabV3PlusDecoder,
                 config: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.config = dict(config)
        self.head_type: str = config["head"]
        self.num_classes: int = int(config["num_classes"])
        self.embed_dim: int = int(config["embed_dim"])
        self.k: int = int(config["k"])
        self.temperature: float = float(config["temperature"])
        self.margin: float = float(config["margin"])
        self.embed_bn: bool = bool(config.get("embed_bn", False))
        if self.head_type == "embedding":
            table = torch.empty(self.num_classes, self.embed_dim).uniform_(-1.0, 1.0)
            self.class_embeddings = nn.Parameter(table)
        else:
            self.register_parameter("class_embeddings", None)

    def forward(self, images: Tensor) -> Tensor:
        features = self.backbone(images)
        out = self.decoder(features["low"], features["high"])
        if self.head_type == "softmax":
            # Logits are upsampled and kept channels-last (pixel-major): PyTorch's CPU
            # bilinear kernel is an order of magnitude slower on (B, C, H, W)-contiguous
            # input with many channels (8 x 1,289 x 16 x 16 -> 64 x 64: 1.04 s vs 0.065 s),
            # and the loss reads channels-last logits as pixel rows without a copy
            # (softmax_cross_entropy).
            out = out.contiguous(memory_format=torch.channels_last)
        out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
        if self.head_type == "embedding":
            return F.normalize(out.float(), dim=1)
        return out

    def normalized_class_embeddings(self) -> Tensor:
        """The (C, d) class table, each row L2-normalised (float32), as used by loss/predict."""
        if self.class_embeddings is None:
            raise ValueError("the softmax head has no class embeddings")
        return ess.normalize_rows(self.class_embeddings.float())

    def loss(self, output: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Training loss of ``forward``'s output and its parts as floats (for logging).

        Embedding head: ``ess_loss`` (k, temperature of the model) + ``margin_penalty``.
        Softmax head: cross-entropy. Always computed in float32 (autocast off); -1 ignored.
        """
        with torch.autocast(device_type=output.device.type, enabled=False):
            if self.head_type == "embedding":
                return self._ess_loss(output.float(), target)
            return self._softmax_loss(output.float(), target)

    def _ess_loss(self, emb: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        class_emb = self.normalized_class_embeddings()
        knn_loss = ess.ess_loss(emb, target, class_emb, k=self.k, temperature=self.temperature,
                                ignore_index=-1)
        penalty = ess.margin_penalty(class_emb, self.margin)
        total = knn_loss + penalty
        return total, {"loss": float(total.detach()), "ess": float(knn_loss.detach()),
                       "margin": float(penalty.detach())}

    @staticmethod
    def _softmax_loss(logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, float]]:
        if not bool((target != -1).any()):
            total = logits.sum() * 0.0
        else:
            total = softmax_cross_entropy(logits, target.long(), ignore_index=-1)
        return total, {"loss": float(total.detach()), "ce": float(total.detach())}

    def predict(self, output: Tensor) -> Tensor:
        """(B, H, W) long class indices ``0..C-1`` from ``forward``'s output."""
        with torch.no_grad():
            if self.head_type == "embedding":
                return ess.predict(output.float(), self.normalized_class_embeddings())
            return output.argmax(dim=1)

    def param_groups(self, lr: float, *, backbone_lr_mult: float = BACKBONE_LR_FACTOR,
                     class_lr_mult: float = 1.0) -> list[dict[str, Any]]:
        """Optimizer groups: backbone at ``lr * backbone_lr_mult``, the rest (ASPP, decoder,
        head) at ``lr``; the class table at ``lr * class_lr_mult``, in a third group of its
        own when that multiplier is not 1 (else with the head). Each group also carries
        ``name`` and ``lr_factor``.

        Why a class-table multiplier: the table is used L2-normalised, so the gradient that
        reaches a raw row is scaled by ``1 / ||row||`` and its angular step by
        ``1 / ||row||^2``. Rows drawn uniformly from ``[-1, 1]^d`` have ``||row||^2 ~ d / 3``
        (about 11 at d = 32) and grow as SGD steps add orthogonal components, so at the
        shared learning rate the class embeddings turn an order of magnitude slower than the
        network's own weights.
        """
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        excluded = {id(p) for p in backbone}
        table = []
        if self.class_embeddings is not None and class_lr_mult != 1.0:
            table = [self.class_embeddings] if self.class_embeddings.requires_grad else []
            excluded.add(id(self.class_embeddings))
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in excluded]
        groups = [
            {"params": backbone, "lr": lr * backbone_lr_mult, "lr_factor": backbone_lr_mult,
             "name": "backbone"},
            {"params": head, "lr": lr, "lr_factor": 1.0, "name": "head"},
        ]
        if table:
            groups.append({"params": table, "lr": lr * class_lr_mult,
                           "lr_factor": class_lr_mult, "name": "class_table"})
        return groups


def _check_model_args(*, backbone: str, head: str, num_classes: int, embed_dim: int, k: int,
                      temperature: float, margin: float, output_stride: int,
                      dropout: float = ASPP_DROPOUT) -> None:
    """EmbsegError naming the option when a model setting is out of range."""
    problems = {
        "backbone": (backbone in BACKBONES, f"one of {', '.join(BACKBONES)}"),
        "head": (head in HEADS, f"one of {', '.join(HEADS)}"),
        "num_classes": (num_classes >= 1, "at least 1"),
        "embed_dim": (embed_dim >= 1, "at least 1"),
        "k": (k >= 1, "at least 1"),
        "temperature": (temperature > 0, "positive"),
        "margin": (margin >= 0, "zero or positive"),
        "output_stride": (output_stride in (8, 16), "8 or 16"),
        "dropout": (0 <= dropout < 1, "in [0, 1)"),
    }
    values = {"backbone": backbone, "head": head, "num_classes": num_classes,
              "embed_dim": embed_dim, "k": k, "temperature": temperature, "margin": margin,
              "output_stride": output_stride, "dropout": dropout}
    for name, (ok, wanted) in problems.items():
        if not ok:
            raise EmbsegError(f"model setting {name}={values[name]!r}: must be {wanted}")


def build_model(*, backbone: str = "tiny", head: str = "embedding", num_classes: int,
                embed_dim: int = 32, output_stride: int = 16, backbone_weights: Path | None = None,
                k: int = 7, temperature: float = 20.0, margin: float = 0.2,
                embed_bn: bool = False, dropout: float = ASPP_DROPOUT) -> SegmentationModel:
    """DeepLabV3+ with the given backbone and head for ``num_classes`` classes.

    ``backbone_weights`` is a local torchvision-format state dict for the backbone (nothing is
    downloaded); ``k``, ``temperature`` and ``margin`` parametrise the ESS loss. ``embed_bn``
    (embedding head only) standardises the last conv's d outputs with a parameter-free
    BatchNorm before upsampling and L2-normalisation (see
    :class:`~embseg.models.deeplab.DeepLabV3PlusDecoder`). The trainer turns it on by
    default; here the plain head is the default and ``config`` records ``embed_bn`` only when
    it is on, so that configs written before the option existed rebuild their own
    architecture. ``dropout`` is the ASPP projection's dropout probability (recorded, for the
    same reason, only when it is not the default 0.5). The returned model's ``config`` holds
    every other argument, so ``build_model(**model.config)`` rebuilds it.
    """
    _check_model_args(backbone=backbone, head=head, num_classes=num_classes,
                      embed_dim=embed_dim, k=k, temperature=temperature, margin=margin,
                      output_stride=output_stride, dropout=dropout)
    config = {"backbone": backbone, "head": head, "num_classes": int(num_classes),
              "embed_dim": int(embed_dim), "output_stride": int(output_stride), "k": int(k),
              "temperature": float(temperature), "margin": float(margin)}
    if embed_bn and head == "embedding":  # recorded only when on: plain configs stay as before
        config["embed_bn"] = True
    if float(dropout) != ASPP_DROPOUT:
        config["dropout"] = float(dropout)
    trunk = build_backbone(name=backbone, output_stride=output_stride)
    if backbone_weights is not None:
        load_backbone_weights(trunk, Path(backbone_weights))
    channels, low_level_channels = DECODER_WIDTHS.get(backbone, (256, 48))
    decoder = DeepLabV3PlusDecoder(
        high_channels=trunk.high_channels, low_channels=trunk.low_channels,
        out_channels=embed_dim if head == "embedding" else num_classes,
        output_stride=output_stride, channels=channels, low_level_channels=low_level_channels,
        normalize_output=config.get("embed_bn", False), dropout=float(dropout))
    return SegmentationModel(backbone=trunk, decoder=decoder, config=config)


__all__ = ["BACKBONES", "HEADS", "SegmentationModel", "build_model", "load_backbone_weights"]
