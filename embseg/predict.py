"""Prediction on image files: label maps, colourised maps, overlays and legends.

For each image ``<stem>``: ``<stem>_labels.png`` (uint16 class ids, the dataset's label-map
format), ``<stem>_color.png`` (one fixed colour per class id), ``<stem>_overlay.png`` (the
colours blended over the image) and ``<stem>_legend.png`` (the largest classes with their
names and pixel shares). Images are read by content and never EXIF-transposed, like the
training data: the maps follow the stored pixel grid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from embseg.data import decode_image, normalize_image
from embseg.errors import EmbsegError
from embseg.evaluate import load_model, resolve_device, segment
from embseg.fileio import write_atomically

OVERLAY_ALPHA = 0.5
LEGEND_CLASSES = 12


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


def draw_legend(shares: list[dict[str, Any]], path: Path, *, title: str,
                limit: int = LEGEND_CLASSES) -> None:
    """A legend PNG (matplotlib): colour patch, name, id and pixel share of the top classes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    top = shares[:limit]
    handles = [Patch(facecolor=palette(np.array([row["id"]]))[0] / 255.0, edgecolor="black",
                     label=f"{row['name']} ({row['id']}): {100 * row['fraction']:.1f}%")
               for row in top]
    figure = plt.figure(figsize=(4.5, 0.35 * len(top) + 0.8))
    figure.legend(handles=handles, loc="center", frameon=False, title=title)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def _save_png(array: np.ndarray, path: Path) -> None:
    write_atomically(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _write_outputs(image: np.ndarray, label: np.ndarray, shares: list[dict[str, Any]], *,
                   out: Path, stem: str, title: str) -> dict[str, str]:
    """The four PNGs of one image; returns their paths by kind."""
    files = {kind: out / f"{stem}_{kind}.png" for kind in ("labels", "color", "overlay", "legend")}
    coloured = colourise(label)
    _save_png(label, files["labels"])
    _save_png(coloured, files["color"])
    _save_png(overlay(image, coloured), files["overlay"])
    write_atomically(files["legend"], lambda tmp: draw_legend(shares, tmp, title=title))
    return {kind: str(path) for kind, path in files.items()}


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


def predict_images(checkpoint: Path, images: list[Path], out: Path, *,
                   device: str = "cpu") -> list[dict[str, Any]]:
    """Segment each image with the checkpoint's model; write the maps, overlay and legend.

    Returns one dict per image: ``image``, ``labels``, ``color``, ``overlay``, ``legend``
    (paths as strings) and ``classes`` (id, name, pixels, fraction; largest first).
    Also writes ``out/predictions.json`` with the same list.
    """
    torch_device = resolve_device(device)
    decoded = _read_images(images)
    model, payload, vocab = load_model(Path(checkpoint), device=torch_device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for path, stem, image in zip(images, _output_stems(images), decoded, strict=True):
        prediction = segment(model, normalize_image(image)[None], device=torch_device)[0]
        label = (prediction.numpy() + 1).astype(np.uint16)
        shares = class_shares(label, vocab.names)
        files = _write_outputs(image, label, shares, out=out, stem=stem, title=Path(path).name)
        results.append({"image": str(path), **files, "classes": shares})
    index = out / "predictions.json"
    write_atomically(index, lambda p: p.write_text(json.dumps(
        {"checkpoint": payload["path"], "step": payload.get("step"), "predictions": results},
        indent=2) + "\n"))
    return results


def cli_predict(args: argparse.Namespace) -> int:
    """``embseg predict``: print, per image, the files written and its largest classes."""
    results = predict_images(args.checkpoint, args.images, args.out, device=args.device)
    for result in results:
        top = ", ".join(f"{c['name']} {100 * c['fraction']:.1f}%" for c in result["classes"][:3])
        print(f"{result['image']}: {result['color']} {result['overlay']} {result['legend']} "
              f"[{top}]")
    print(f"index: {Path(args.out) / 'predictions.json'}")
    return 0
