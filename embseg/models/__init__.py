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
BACKBONE_LR_FACTOR = 0.1
"""The backbone trains at this fraction of the base learning rate (DeepLab practice)."""

DECODER_WIDTHS = {"tiny": (96, 24)}
"""(ASPP/decoder channels, low-level projection channels) per backbone; default (256, 48).

The tiny CPU backbone gets a narrower head so that a CPU training run takes minutes; the
real backbones use the paper's widths.
"""


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
        if self.head_type == "embedding":
            table = torch.empty(self.num_classes, self.embed_dim).uniform_(-1.0, 1.0)
            self.class_embeddings = nn.Parameter(table)
        else:
            self.register_parameter("class_embeddings", None)

    def forward(self, images: Tensor) -> Tensor:
        features = self.backbone(images)
        out = self.decoder(features["low"], features["high"])
        out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
        if self.head_type == "embedding":
            return F.normalize(out.float(), dim=1)
        return out

    def normalized_class_embeddings(self) -> Tensor:
        """The (C, d) class table, each row L2-normalised (float32), as used by loss/predict."""
        if self.class_embeddings is None:
            raise ValueError("the softmax head has no class embeddings")
        return F.normalize(self.class_embeddings.float(), dim=1)

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
            total = F.cross_entropy(logits, target.long(), ignore_index=-1)
        return total, {"loss": float(total.detach()), "ce": float(total.detach())}

    def predict(self, output: Tensor) -> Tensor:
        """(B, H, W) long class indices ``0..C-1`` from ``forward``'s output."""
        with torch.no_grad():
            if self.head_type == "embedding":
                return ess.predict(output.float(), self.normalized_class_embeddings())
            return output.argmax(dim=1)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: backbone at ``lr * 0.1``, the rest (ASPP, decoder, head, class
        table) at ``lr``. Each group also carries ``name`` and ``lr_factor``."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in backbone}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        return [
            {"params": backbone, "lr": lr * BACKBONE_LR_FACTOR, "lr_factor": BACKBONE_LR_FACTOR,
             "name": "backbone"},
            {"params": head, "lr": lr, "lr_factor": 1.0, "name": "head"},
        ]


def _check_model_args(*, backbone: str, head: str, num_classes: int, embed_dim: int, k: int,
                      temperature: float, margin: float, output_stride: int) -> None:
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
    }
    values = {"backbone": backbone, "head": head, "num_classes": num_classes,
              "embed_dim": embed_dim, "k": k, "temperature": temperature, "margin": margin,
              "output_stride": output_stride}
    for name, (ok, wanted) in problems.items():
        if not ok:
            raise EmbsegError(f"model setting {name}={values[name]!r}: must be {wanted}")


def build_model(*, backbone: str = "tiny", head: str = "embedding", num_classes: int,
                embed_dim: int = 32, output_stride: int = 16, backbone_weights: Path | None = None,
                k: int = 7, temperature: float = 20.0, margin: float = 0.2) -> SegmentationModel:
    """DeepLabV3+ with the given backbone and head for ``num_classes`` classes.

    ``backbone_weights`` is a local torchvision-format state dict for the backbone (nothing is
    downloaded); ``k``, ``temperature`` and ``margin`` parametrise the ESS loss. The returned
    model's ``config`` holds every other argument, so ``build_model(**model.config)``
    rebuilds it.
    """
    _check_model_args(backbone=backbone, head=head, num_classes=num_classes,
                      embed_dim=embed_dim, k=k, temperature=temperature, margin=margin,
                      output_stride=output_stride)
    config = {"backbone": backbone, "head": head, "num_classes": int(num_classes),
              "embed_dim": int(embed_dim), "output_stride": int(output_stride), "k": int(k),
              "temperature": float(temperature), "margin": float(margin)}
    trunk = build_backbone(name=backbone, output_stride=output_stride)
    if backbone_weights is not None:
        load_backbone_weights(trunk, Path(backbone_weights))
    channels, low_level_channels = DECODER_WIDTHS.get(backbone, (256, 48))
    decoder = DeepLabV3PlusDecoder(
        high_channels=trunk.high_channels, low_channels=trunk.low_channels,
        out_channels=embed_dim if head == "embedding" else num_classes,
        output_stride=output_stride, channels=channels, low_level_channels=low_level_channels)
    return SegmentationModel(backbone=trunk, decoder=decoder, config=config)


__all__ = ["BACKBONES", "HEADS", "SegmentationModel", "build_model", "load_backbone_weights"]
