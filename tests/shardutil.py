"""Small shards in the documented format, written directly by the tests.

Samples: ``<key>.jpg`` (encoded image bytes), ``<key>.seg.png`` (uint16 label map),
``<key>.json`` (metadata); ``classes.parquet`` and ``manifest.parquet`` beside the shards.
The images are colour-coded: every class id has one palette colour, so a label can be checked
against the pixel colour after any geometric augmentation.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image

from embseg.vocab import VocabClass, Vocabulary


def palette(num_classes: int) -> np.ndarray:
    """Distinct, well separated RGB colours for ids 0..num_classes (0 = unlabelled, black)."""
    rng = np.random.default_rng(1234)
    colours = rng.integers(40, 256, size=(num_classes + 1, 3)).astype(np.uint8)
    colours[0] = 0
    return colours


def block_label(height: int, width: int, num_classes: int, rng: np.random.Generator,
                block: int = 8, unlabelled: float = 0.1) -> np.ndarray:
    """A label map of constant blocks with random class ids (some unlabelled)."""
    rows, cols = -(-height // block), -(-width // block)
    ids = rng.integers(1, num_classes + 1, size=(rows, cols))
    ids[rng.random((rows, cols)) < unlabelled] = 0
    return np.kron(ids, np.ones((block, block), dtype=np.int64))[:height, :width].astype(np.uint16)


def encode_image(image: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def encode_label(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def colour_sample(key: int, *, height: int, width: int, num_classes: int, seed: int = 0,
                  fmt: str = "PNG") -> dict:
    """A sample whose pixel colour is palette[label] (lossless PNG bytes under ``jpg``)."""
    rng = np.random.default_rng([seed, key])
    label = block_label(height, width, num_classes, rng)
    image = palette(num_classes)[label]
    return make_sample(key, encode_image(image, fmt), label)


def make_sample(key: int, image_bytes: bytes, label: np.ndarray) -> dict:
    classes = sorted(int(c) for c in np.unique(label) if c)
    meta = {"image_id": key, "height": int(label.shape[0]), "width": int(label.shape[1]),
            "file_name": f"{key:012d}.jpg", "n_lvis": 0, "n_stuff": 0, "classes": classes}
    return {"__key__": f"{key:012d}", "jpg": image_bytes, "seg.png": encode_label(label),
            "json": json.dumps(meta).encode()}


def make_vocabulary(num_classes: int) -> Vocabulary:
    """Classes ``class_1..class_C`` cycling LVIS rare / common / frequent and stuff."""
    frequencies = ["r", "c", "f", None]
    classes = []
    for class_id in range(1, num_classes + 1):
        frequency = frequencies[(class_id - 1) % 4]
        stuff = frequency is None
        classes.append(VocabClass(id=class_id, name=f"class_{class_id}",
                                  source="coco_stuff" if stuff else "lvis",
                                  lvis_id=None if stuff else class_id,
                                  coco_stuff_id=100 + class_id if stuff else None,
                                  frequency=frequency, synonyms=(f"class_{class_id}",)))
    return Vocabulary(classes=tuple(classes))


def write_classes(directory: Path, num_classes: int) -> Path:
    """``DIR/classes.parquet`` of :func:`make_vocabulary`."""
    path = Path(directory) / "classes.parquet"
    make_vocabulary(num_classes).write_parquet(path)
    return path


def _sample_classes(sample: dict) -> list[int]:
    """The class ids a sample's metadata lists (the manifest's ``class_ids``), [] without."""
    try:
        return [int(c) for c in json.loads(sample["json"])["classes"]]
    except (KeyError, TypeError, ValueError):
        return []


def write_shards(directory: Path, samples: list[dict], *, num_classes: int, split: str = "train",
                 shard_size: int = 1000, manifest: bool = True) -> list[Path]:
    """Write ``samples`` as ``<split>-NNNNNN.tar`` shards plus classes/manifest parquet files."""
    directory.mkdir(parents=True, exist_ok=True)
    write_classes(directory, num_classes)
    shards, rows = [], []
    for start in range(0, len(samples), shard_size):
        path = directory / f"{split}-{start // shard_size:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for sample in samples[start:start + shard_size]:
                writer.write(sample)
                rows.append({"key": sample["__key__"], "shard": path.name, "status": "ok",
                             "reason": None, "class_ids": _sample_classes(sample)})
        shards.append(path)
    if manifest:
        pq.write_table(pa.Table.from_pylist(rows), directory / "manifest.parquet")
    return shards


def make_checkpoint(path: Path, num_classes: int, *, head: str = "embedding",
                    seed: int = 0) -> Path:
    """A checkpoint of an untrained tiny model for :func:`make_vocabulary` (no training run)."""
    import torch

    from embseg.checkpoint import new_payload, save_checkpoint, vocabulary_record
    from embseg.models import build_model

    torch.manual_seed(seed)
    vocab = make_vocabulary(num_classes)
    model = build_model(backbone="tiny", head=head, num_classes=num_classes)
    payload = new_payload(step=0, model=model.state_dict(), model_config=dict(model.config),
                          vocabulary=vocabulary_record(vocab),
                          class_table_hash=vocab.content_hash())
    return save_checkpoint(payload, path)


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


NEAR_TIE = 1e-5
"""A pixel whose best two class scores are closer than this may go either way between
:func:`reference_labels` (float64, one image at a time) and embseg (float32, batched)."""


def reference_labels(model: torch.nn.Module, image: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Class indices 0..C-1 (H, W) by the documented rule, in plain torch: ImageNet-normalise,
    zero-pad (the mean colour) bottom/right to a multiple of the output stride, run the model,
    crop back to [:H, :W], nearest class embedding (or argmax of the logits); and the mask of
    near-tie pixels (:data:`NEAR_TIE`)."""
    stride = int(model.config["output_stride"])
    height, width = image.shape[:2]
    x = torch.from_numpy(((image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)).float()
    padded = torch.zeros(1, 3, height + (-height) % stride, width + (-width) % stride)
    padded[0, :, :height, :width] = x
    with torch.no_grad():
        output = model(padded)[0, :, :height, :width].double()
    if model.config["head"] != "softmax":
        table = torch.nn.functional.normalize(model.class_embeddings.detach().double(), dim=1)
        output = torch.einsum("dhw,cd->chw", output, table)
    top = output.topk(2, dim=0).values
    return output.argmax(0).numpy(), (top[0] - top[1] < NEAR_TIE).numpy()
