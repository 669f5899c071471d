"""Decoding and augmenting one sample: plain numpy / PIL, used by the loaders and by predict.

Labels follow the stored pixel grid: images are decoded by content (a PNG under a ``.jpg``
name decodes) and never EXIF-transposed; grayscale, CMYK, palette and alpha images become RGB.
Label ids ``1..C`` become targets ``0..C-1``; unlabelled (0) and padding become ``-1``.
The training augmentation is the paper's: random scale 0.5-2.0, random crop padded with
ignore, horizontal flip, then ImageNet normalisation.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = -1
"""Target value of unlabelled and padded pixels."""

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

SCALE_RANGE = (0.5, 2.0)
"""Random rescaling range of the training augmentation (the paper's)."""

_LABEL_MODES = {"I;16", "I;16L", "I;16B", "I", "L", "P"}


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 array (H, W, 3) of encoded image bytes, decoded by content, never transposed.

    The stored pixel grid is kept as is (no EXIF orientation): label maps follow it.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8).copy()


def decode_label(data: bytes) -> np.ndarray:
    """Class-id array (H, W) int32 of a single-channel label PNG (uint16 by the format)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode not in _LABEL_MODES:
            raise ValueError(f"label image has mode {img.mode}, expected a single-channel map")
        return np.asarray(img).astype(np.int32)


_NORMALIZED_VALUES = ((np.arange(256, dtype=np.float32)[None, :] / 255.0
                      - IMAGENET_MEAN[:, None]) / IMAGENET_STD[:, None])
"""(3, 256) float32: ``(v / 255 - mean[c]) / std[c]`` for every uint8 value v of channel c."""


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """ImageNet-normalised float32 tensor (3, H, W) of an RGB uint8 array (H, W, 3).

    ``(image / 255 - mean) / std`` in float32, looked up per channel from a 256-entry table
    (the same float32 operations, done once per value instead of per pixel) straight into
    the channel-first layout.
    """
    height, width = image.shape[:2]
    out = np.empty((3, height, width), dtype=np.float32)
    for channel in range(3):
        np.take(_NORMALIZED_VALUES[channel], image[:, :, channel], out=out[channel])
    return torch.from_numpy(out)


def label_to_target(label: np.ndarray) -> torch.Tensor:
    """Targets (H, W) int64: class id c -> c - 1, unlabelled 0 -> -1 (ignore)."""
    target = label.astype(np.int64) - 1
    target[label <= 0] = IGNORE_INDEX
    return torch.from_numpy(target)


def augment(image: np.ndarray, label: np.ndarray, *, crop_size: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's training augmentation on an aligned image/label pair.

    Random scale in [0.5, 2.0] (bilinear image, nearest label, same pixel-centre mapping),
    padding to at least ``crop_size`` (image with the mean colour, label with 0: the
    caller normalises padding to exactly 0 and ignore), a random
    ``crop_size`` square crop and a horizontal flip with probability 0.5. Returns the image
    (uint8), the label (int32, class ids) and a validity mask (False on padding) so the caller
    can mark padding as ignore.
    """
    height, width = label.shape
    scale = rng.uniform(*SCALE_RANGE)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    label = np.asarray(Image.fromarray(np.asarray(label, dtype=np.int32)).resize(
        (new_w, new_h), Image.NEAREST))
    pad_h, pad_w = max(crop_size, new_h), max(crop_size, new_w)
    top = int(rng.integers(0, pad_h - crop_size + 1))
    left = int(rng.integers(0, pad_w - crop_size + 1))
    # the crop window of the padded image, built directly (never the whole padded image):
    # its part inside the rescaled image, the rest padding
    rows = max(0, min(crop_size, new_h - top))
    cols = max(0, min(crop_size, new_w - left))
    crop_image = np.empty((crop_size, crop_size, 3), dtype=np.uint8)
    crop_image[:] = np.round(IMAGENET_MEAN * 255).astype(np.uint8)
    crop_label = np.zeros((crop_size, crop_size), dtype=np.int32)
    valid = np.zeros((crop_size, crop_size), dtype=bool)
    crop_image[:rows, :cols] = image[top:top + rows, left:left + cols]
    crop_label[:rows, :cols] = label[top:top + rows, left:left + cols]
    valid[:rows, :cols] = True
    if rng.random() < 0.5:
        return (np.ascontiguousarray(crop_image[:, ::-1]),
                np.ascontiguousarray(crop_label[:, ::-1]), np.ascontiguousarray(valid[:, ::-1]))
    return crop_image, crop_label, valid


def augmented_tensors(image: np.ndarray, label: np.ndarray, *, crop_size: int,
                      rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented, normalised image (3,S,S) and target (S,S); padding is 0 and ignore."""
    image, label, valid = augment(image, label, crop_size=crop_size, rng=rng)
    padding = torch.from_numpy(~valid)
    tensor = normalize_image(image).masked_fill_(padding, 0.0)  # broadcast over channels
    target = label_to_target(label).masked_fill_(padding, IGNORE_INDEX)
    return tensor, target


def decode_sample(sample: dict[str, Any], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and label of a raw shard sample; ValueError with the reason when it is bad."""
    for part in ("jpg", "seg.png"):
        if part not in sample:
            raise ValueError(f"sample has no '{part}' member")
    try:
        image = decode_image(sample["jpg"])
    except Exception as exc:
        raise ValueError(f"image does not decode ({exc})") from None
    try:
        label = decode_label(sample["seg.png"])
    except Exception as exc:
        raise ValueError(f"label map does not decode ({exc})") from None
    if label.shape != image.shape[:2]:
        raise ValueError(f"label map is {label.shape[1]}x{label.shape[0]} but the image is "
                         f"{image.shape[1]}x{image.shape[0]}")
    if label.size and int(label.max()) > num_classes:
        raise ValueError(f"label id {int(label.max())} exceeds the {num_classes} classes")
    return image, label
