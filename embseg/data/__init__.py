"""Reading WebDataset shards for training and evaluation.

Shards are ``<split>-NNNNNN.tar`` with one sample per image (``jpg`` = the original image
bytes, ``seg.png`` = the uint16 label map, ``json`` = metadata), with ``classes.parquet`` and
``manifest.parquet`` beside them. They may be a local folder, a brace pattern, ``pipe:``
commands or URLs (``http(s)://``, ``s3://``, ``gs://``). Two loaders sit on top:

- :func:`train_loader`: endless, shuffled, augmented batches (the paper's random scale
  0.5-2.0, random crop padded with ignore, horizontal flip, ImageNet normalisation) whose
  order is a pure function of the run seed and the step, so a resumed run sees exactly the
  batches an uninterrupted one would have;
- :func:`eval_loader`: one pass, full images, no augmentation.

Bad samples (an unreadable, truncated or unreachable shard, a sample that does not decode, a
label of the wrong size or with ids above C, shards missing samples their manifest lists)
either stop the job with an :class:`~embseg.errors.EmbsegError` naming the shard and the key
(``on_bad_sample="fail"``) or are skipped, counted and logged with shard, key and reason
(``"skip"``).

The modules, in the order data flows through them:

- :mod:`embseg.data.sources`: what ``--shards`` names: the shard list, the files beside it;
- :mod:`embseg.data.reading`: one shard read with WebDataset into samples and bad items;
- :mod:`embseg.data.streams`: the deterministic item order of each logical stream;
- :mod:`embseg.data.decode`: decoding, the augmentation, normalisation, targets;
- :mod:`embseg.data.train_stream`: the training loader and its resumable state;
- :mod:`embseg.data.eval_stream`: the evaluation loader;
- :mod:`embseg.data.throughput`: the loader benchmark of ``embseg bench``.

The names below are the loaders' public API, importable from ``embseg.data``.
"""

from embseg.data.decode import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SCALE_RANGE,
    augment,
    decode_image,
    decode_label,
    label_to_target,
    normalize_image,
)
from embseg.data.eval_stream import EvalBatch, EvalBatches, eval_loader
from embseg.data.reading import BadItem, read_shard
from embseg.data.sources import (
    ShardSource,
    list_shards,
    manifest_keys,
    read_num_classes,
    read_vocabulary,
    shard_location,
    shard_source,
)
from embseg.data.streams import BAD_SAMPLE_POLICIES
from embseg.data.throughput import _export_loose_files, loader_throughput
from embseg.data.train_stream import (
    LoaderState,
    StreamPosition,
    TrainBatch,
    TrainBatches,
    train_loader,
)

__all__ = [
    "BAD_SAMPLE_POLICIES", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "SCALE_RANGE",
    "BadItem", "EvalBatch", "EvalBatches", "LoaderState", "ShardSource", "StreamPosition",
    "TrainBatch", "TrainBatches", "_export_loose_files", "augment", "decode_image",
    "decode_label", "eval_loader", "label_to_target", "list_shards", "loader_throughput",
    "manifest_keys", "normalize_image", "read_num_classes", "read_shard", "read_vocabulary",
    "shard_location", "shard_source", "train_loader",
]
