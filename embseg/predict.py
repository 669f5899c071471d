"""Prediction on image files or shard samples: label maps and pictures to judge them by eye.

For each image ``<stem>`` (the file's stem, or the sample's key for shards):

- ``<stem>_triptych.png``: image | ground truth (shard samples only) | prediction side by
  side, with the legend of the classes shown; small images are enlarged by an integer factor
  to at least 512 px on the long side (nearest neighbour, so panels align pixel for pixel);
- ``<stem>_labels.png`` (uint16 class ids at the image's own size, the dataset's label-map
  format), ``<stem>_color.png`` (one fixed colour per class id), ``<stem>_overlay.png`` (the
  colours blended over the image) and ``<stem>_legend.png`` (the legend alone).

Images are read by content and never EXIF-transposed, like the training data: the maps follow
the stored pixel grid. Shard samples come through the evaluation loader, so the prediction
is exactly the one ``embseg eval`` scores.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from embseg.data import IMAGENET_MEAN, IMAGENET_STD, decode_image, eval_loader, normalize_image
from embseg.errors import EmbsegError
from embseg.evaluate import load_model, resolve_device, segment, shard_vocabulary
from embseg.fileio import write_atomically

OVERLAY_ALPHA = 0.5
LEGEND_CLASSES = 12
MIN_LONG_SIDE = 512
"""Small images are enlarged until their long side is at least this (in pixels)."""
MARGIN = 12
GAP = 12
FONT_SIZE = 15
LEGEND_WIDTH = 560
BACKGROUND = (255, 255, 255)


def palette(class_ids: np.ndarray) -> np.ndarray:
    """A fixed RGB colour (uint8) per class id; 0 (unlabelled) is black.

    The colour is a hash of the id alone, so a class has the same colour in every image,
    run and vocabulary size; channels stay in 48..255 so no class looks unlabelled.
    """
    ids = np.asarray(class_ids, dtype=np.uint64)
    mixed = (ids * np.uint64(0x9E3779B1) + np.uint64(0x7F4A7C15)) & np.uint64(0xFFFFFFFF)
    mixed ^= mixed >> np.uint64(15)
    mixed = (mixed * np.uint64(0x2C1B3C6D)) & np.uint64(0xFFFFFFFF)
    channels = np.stack([(mixed >> np.uint64(shift)) & np.uint64(0xFF) for shift in (0, 8, 16)],
                        axis=-1)
    colours = (48 + channels * np.uint64(207) // np.uint64(255)).astype(np.uint8)
    colours[ids == 0] = 0
    return colours


def colourise(label: np.ndarray) -> np.ndarray:
    """RGB image (H, W, 3) of a class-id map (H, W)."""
    ids, inverse = np.unique(label, return_inverse=True)
    return palette(ids)[inverse.reshape(label.shape)]


def overlay(image: np.ndarray, coloured: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The colourised map blended over the image (unlabelled pixels show the image)."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * coloured.astype(np.float32)
    return np.where(coloured.any(axis=-1, keepdims=True), blended, image).round().astype(np.uint8)


def class_shares(label: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """Classes in a label map, largest first: id, name, pixels, fraction."""
    ids, counts = np.unique(label, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [{"id": int(ids[i]), "name": names[int(ids[i]) - 1] if ids[i] > 0 else "unlabeled",
             "pixels": int(counts[i]), "fraction": float(counts[i] / label.size)}
            for i in order]


def upscale_factor(height: int, width: int, *, min_long_side: int = MIN_LONG_SIDE) -> int:
    """Integer factor that brings the long side to at least ``min_long_side`` (1 if it is)."""
    return max(1, math.ceil(min_long_side / max(height, width)))


def _enlarge(array: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling (H, W, ...) by an integer factor: each pixel becomes a block."""
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def legend_rows(prediction: np.ndarray, truth: np.ndarray | None,
                names: list[str]) -> list[dict[str, Any]]:
    """The classes a picture shows, largest first (by the larger of its two pixel shares).

    One dict per class: ``id``, ``name``, ``predicted`` and ``truth`` (fractions of the image;
    ``truth`` is None without ground truth). Unlabelled ground truth (id 0, black) is listed
    too, so that the black areas of the ground-truth panel are explained.
    """
    predicted = {row["id"]: row for row in class_shares(prediction, names)}
    actual = {row["id"]: row for row in class_shares(truth, names)} if truth is not None else {}
    ids = sorted(set(predicted) | set(actual), key=lambda c: (
        -max(predicted.get(c, {}).get("fraction", 0.0), actual.get(c, {}).get("fraction", 0.0)),
        c))
    return [{"id": c, "name": (predicted.get(c) or actual[c])["name"],
             "predicted": predicted.get(c, {}).get("fraction", 0.0),
             "truth": actual.get(c, {}).get("fraction", 0.0) if truth is not None else None}
            for c in ids]


def draw_legend(rows: list[dict[str, Any]], *, width: int, title: str | None = None,
                font_size: int = FONT_SIZE, limit: int = LEGEND_CLASSES) -> np.ndarray:
    """RGB legend (white background) ``width`` px wide: a colour patch per class, its name,
    id and pixel shares, in as many columns as fit; the first ``limit`` rows, then a line
    saying how many more classes the picture has."""
    font = _font(font_size)
    more = len(rows) - limit
    rows = rows[:limit]
    line = font_size + 8
    labels = [f"{row['name']} ({row['id']}): "
              + (f"truth {100 * row['truth']:.1f}%, " if row["truth"] is not None else "")
              + f"predicted {100 * row['predicted']:.1f}%" for row in rows]
    patch = font_size
    column = max([int(font.getlength(text)) for text in labels] + [100]) + patch + 3 * MARGIN
    columns = max(1, (width - MARGIN) // column)
    header = line if title else 0
    height = header + line * (math.ceil(len(rows) / columns) + (more > 0)) + MARGIN
    legend = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(legend)
    if title:
        draw.text((MARGIN, 2), title, fill=(0, 0, 0), font=font)
    for index, (row, text) in enumerate(zip(rows, labels, strict=True)):
        x = MARGIN + (index % columns) * column
        y = header + (index // columns) * line + 4
        colour = tuple(int(v) for v in palette(np.array([row["id"]]))[0])
        draw.rectangle([x, y, x + patch - 1, y + patch - 1], fill=colour, outline=(0, 0, 0))
        draw.text((x + patch + MARGIN // 2, y - 2), text, fill=(0, 0, 0), font=font)
    if more > 0:
        draw.text((MARGIN, height - MARGIN - line + 2), f"... and {more} more classes, each "
                  f"smaller (all in predictions.json)", fill=(90, 90, 90), font=font)
    return np.asarray(legend)


@dataclass(frozen=True)
class Triptych:
    """A side-by-side picture and where its parts are: ``panels`` maps a panel's name to its
    box (x0, y0, x1, y1; x1/y1 exclusive), ``scale`` is the panels' integer upscaling factor
    and ``legend_top`` the row where the legend starts."""

    picture: np.ndarray
    panels: dict[str, tuple[int, int, int, int]]
    scale: int
    legend_top: int


def triptych(image: np.ndarray, prediction: np.ndarray, names: list[str], *,
             truth: np.ndarray | None = None, title: str = "",
             min_long_side: int = MIN_LONG_SIDE) -> Triptych:
    """image | ground truth (when given) | prediction, side by side, with their legend below.

    Small images are enlarged by an integer factor so the long side is at least
    ``min_long_side``, every panel by nearest neighbour: each pixel becomes a block (of its
    exact class colour in the maps), so the panels align pixel for pixel and show what the
    model saw, not a smoothed version of it.
    """
    height, width = prediction.shape
    scale = upscale_factor(height, width, min_long_side=min_long_side)
    size = (width * scale, height * scale)
    panels = [("image", _enlarge(image, scale))]
    if truth is not None:
        panels.append(("ground truth", _enlarge(colourise(truth), scale)))
    panels.append(("prediction", _enlarge(colourise(prediction), scale)))
    font = _font(FONT_SIZE)
    title_height = FONT_SIZE + 12 + (FONT_SIZE + 8 if title else 0)
    total_width = 2 * MARGIN + len(panels) * size[0] + (len(panels) - 1) * GAP
    legend = draw_legend(legend_rows(prediction, truth, names), width=total_width)
    legend_top = title_height + size[1] + MARGIN
    picture = Image.new("RGB", (total_width, legend_top + legend.shape[0]), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    if title:
        draw.text((MARGIN, 4), title, fill=(0, 0, 0), font=font)
    boxes = {}
    for index, (name, panel) in enumerate(panels):
        x = MARGIN + index * (size[0] + GAP)
        draw.text((x, title_height - FONT_SIZE - 8), name, fill=(0, 0, 0), font=font)
        picture.paste(Image.fromarray(panel), (x, title_height))
        boxes[name] = (x, title_height, x + size[0], title_height + size[1])
    picture.paste(Image.fromarray(legend), (0, legend_top))
    return Triptych(picture=np.asarray(picture), panels=boxes, scale=scale,
                    legend_top=legend_top)


def _save_png(array: np.ndarray, path: Path) -> None:
    write_atomically(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _write_outputs(image: np.ndarray, label: np.ndarray, names: list[str], *, out: Path,
                   stem: str, title: str, truth: np.ndarray | None = None) -> dict[str, Any]:
    """The PNGs of one image; returns their paths by kind and the triptych's panel boxes."""
    kinds = ("labels", "color", "overlay", "legend", "triptych")
    files = {kind: out / f"{stem}_{kind}.png" for kind in kinds}
    coloured = colourise(label)
    _save_png(label, files["labels"])
    _save_png(coloured, files["color"])
    _save_png(overlay(image, coloured), files["overlay"])
    rows = legend_rows(label, truth, names)
    _save_png(draw_legend(rows, width=LEGEND_WIDTH, title=title), files["legend"])
    picture = triptych(image, label, names, truth=truth, title=title)
    _save_png(picture.picture, files["triptych"])
    return {**{kind: str(path) for kind, path in files.items()},
            "panels": {name: list(box) for name, box in picture.panels.items()},
            "scale": picture.scale}


def _read_images(images: list[Path]) -> list[np.ndarray]:
    """Every input decoded first, so a bad path stops the job before any work is done."""
    decoded = []
    for path in images:
        path = Path(path)
        if not path.is_file():
            raise EmbsegError(f"{path}: image file not found")
        try:
            decoded.append(decode_image(path.read_bytes()))
        except Exception as exc:
            raise EmbsegError(f"{path}: not a readable image ({exc})") from None
    return decoded


def _output_stems(images: list[Path]) -> list[str]:
    """Output name per input: its stem, made unique by a counter when stems repeat."""
    stems, seen = [], {}
    for path in images:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def _predict_one(model: torch.nn.Module, normalised: torch.Tensor, *,
                 device: torch.device) -> np.ndarray:
    """Class ids 1..C (uint16) of one normalised image (3, H, W)."""
    prediction = segment(model, normalised[None], device=device)[0]
    return (prediction.numpy() + 1).astype(np.uint16)


def _write_index(out: Path, payload: dict[str, Any], results: list[dict[str, Any]]) -> None:
    index = out / "predictions.json"
    write_atomically(index, lambda p: p.write_text(json.dumps(
        {"checkpoint": payload["path"], "step": payload.get("step"), "predictions": results},
        indent=2) + "\n"))


def predict_images(checkpoint: Path, images: list[Path], out: Path, *,
                   device: str = "cpu") -> list[dict[str, Any]]:
    """Segment each image file with the checkpoint's model; write its pictures into ``out``.

    Returns one dict per image: ``image``, ``labels``, ``color``, ``overlay``, ``legend``,
    ``triptych`` (paths as strings), ``panels`` (the triptych's panel boxes), ``scale`` and
    ``classes`` (id, name, pixels, fraction; largest first). Also writes
    ``out/predictions.json`` with the same list.
    """
    torch_device = resolve_device(device)
    decoded = _read_images(images)
    model, payload, vocab = load_model(Path(checkpoint), device=torch_device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for path, stem, image in zip(images, _output_stems(images), decoded, strict=True):
        label = _predict_one(model, normalize_image(image), device=torch_device)
        files = _write_outputs(image, label, vocab.names, out=out, stem=stem,
                               title=Path(path).name)
        results.append({"image": str(path), **files,
                        "classes": class_shares(label, vocab.names)})
    _write_index(out, payload, results)
    return results


def denormalize_image(normalised: torch.Tensor) -> np.ndarray:
    """The RGB uint8 image (H, W, 3) of :func:`embseg.data.normalize_image`'s output.

    Exact: the float32 round trip moves a value by far less than 0.5 before rounding.
    """
    values = normalised.numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


def predict_shards(checkpoint: Path, shards: Path, out: Path, *, count: int = 4,
                   device: str = "cpu") -> list[dict[str, Any]]:
    """Segment the first ``count`` samples of a shard folder; triptychs with their ground truth.

    Samples come through :func:`embseg.data.eval_loader` (bad samples fail, naming shard and
    key), so the prediction is the one evaluation scores. Returns what
    :func:`predict_images` returns, with ``key`` instead of ``image`` and ``truth_classes``.
    """
    if count < 1:
        raise EmbsegError(f"--count {count}: predict at least one sample")
    torch_device = resolve_device(device)
    shards = Path(shards)
    model, payload, vocab = load_model(Path(checkpoint), device=torch_device)
    if vocab.content_hash() != shard_vocabulary(shards).content_hash():
        raise EmbsegError(f"{payload['path']}: trained on class table {vocab.content_hash()} but "
                          f"{shards / 'classes.parquet'} differs: its ground truth means "
                          f"other classes")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for batch in eval_loader(shards, num_classes=vocab.num_classes, batch_size=1):
        if len(results) == count:
            break
        (key,) = batch.keys
        image = denormalize_image(batch.image[0])
        truth = (batch.label[0].numpy() + 1).clip(min=0).astype(np.uint16)  # ignore -1 -> 0
        label = _predict_one(model, batch.image[0], device=torch_device)
        files = _write_outputs(image, label, vocab.names, out=out, stem=key,
                               title=f"{shards.name} {key}", truth=truth)
        results.append({"key": key, "shards": str(shards), **files,
                        "classes": class_shares(label, vocab.names),
                        "truth_classes": class_shares(truth, vocab.names)})
    _write_index(out, payload, results)
    return results


def cli_predict(args: argparse.Namespace) -> int:
    """``embseg predict``: print, per image, its triptych and its largest classes."""
    if bool(args.images) == (args.shards is not None):
        raise EmbsegError("embseg predict: give image files, or --shards DIR for samples with "
                          "their ground truth (not both)")
    if args.images:
        results = predict_images(args.checkpoint, args.images, args.out, device=args.device)
    else:
        results = predict_shards(args.checkpoint, args.shards, args.out, count=args.count,
                                 device=args.device)
    for result in results:
        top = ", ".join(f"{c['name']} {100 * c['fraction']:.1f}%" for c in result["classes"][:3])
        print(f"{result.get('image') or result['key']}: {result['triptych']} [{top}]")
    print(f"index: {Path(args.out) / 'predictions.json'}")
    return 0
