"""Per-sample cost of reading shards: embseg's former hand-written tar reader (commit 877678f,
``embseg/data.py: read_shard``) against today's WebDataset-based ``embseg.data.read_shard``,
side by side in one process, rounds alternating which goes first.

    python benchmarks/tar_reader_compare.py [--samples 2000] [--size 128] [--rounds 7]

Writes the shards once (JPEG image, uint16 PNG label, JSON per sample, 100 samples per
shard, as the build writes them) into a temporary folder and reads them from the page
cache: only the reader's own work is timed (no decoding).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

OLD_COMMIT = "877678f"
REPO = Path(__file__).resolve().parents[1]


def old_module(tmp: Path):
    """The former embseg/data.py, loaded from git history."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:embseg/data.py"],
                            check=True, capture_output=True, text=True).stdout
    path = tmp / "embseg_data_877678f.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("embseg_data_877678f", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_shards(folder: Path, samples: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    shards = []
    for start in range(0, samples, 100):
        path = folder / f"train-{start // 100:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for key in range(start, min(samples, start + 100)):
                smooth = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
                image = Image.fromarray(smooth).resize((size, size), Image.BILINEAR)
                label = np.kron(rng.integers(0, 1300, size=(size // 16, size // 16)),
                                np.ones((16, 16), dtype=np.int64)).astype(np.uint16)
                jpg, png = io.BytesIO(), io.BytesIO()
                image.save(jpg, format="JPEG", quality=90)
                Image.fromarray(label).save(png, format="PNG")
                writer.write({"__key__": f"{key:012d}", "jpg": jpg.getvalue(),
                              "seg.png": png.getvalue(),
                              "json": json.dumps({"image_id": key}).encode()})
        shards.append(path)
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pipeline", action="store_true",
                        help="time the whole training loader (read + decode + augment, "
                             "crop 256, batch 8, in-process) instead of the reader alone")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from embseg.data import BadItem, read_shard, train_loader

    with tempfile.TemporaryDirectory(prefix="tar-reader-") as tmp:
        shards = write_shards(Path(tmp), args.samples, args.size)
        from embseg.vocab import VocabClass, Vocabulary

        Vocabulary(classes=tuple(VocabClass(id=i, name=f"c{i}", source="lvis", lvis_id=i,
                                            coco_stuff_id=None, frequency="f", synonyms=())
                                 for i in range(1, 1301))).write_parquet(
            Path(tmp) / "classes.parquet")
        old = old_module(Path(tmp))
        readers = {"hand-written (877678f)": old.read_shard, "webdataset": read_shard}
        if args.pipeline:
            readers = {"hand-written (877678f)": old.train_loader, "webdataset": train_loader}
        mb = sum(p.stat().st_size for p in shards) / 1e6

        def run_pipeline(loader_fn) -> float:
            loader = loader_fn(Path(tmp), num_classes=1300, batch_size=8, crop_size=256,
                               num_workers=0, shuffle_buffer=64)
            next(loader)
            started, batches = time.perf_counter(), args.samples // 8
            for _ in range(batches):
                next(loader)
            loader.close()
            return (time.perf_counter() - started) / (batches * 8) * 1e3

        def run(reader) -> float:
            if args.pipeline:
                return run_pipeline(reader)
            started, count = time.perf_counter(), 0
            for shard in shards:
                count += sum(not isinstance(item, BadItem) and "jpg" in item
                             for item in reader(str(shard) if reader is read_shard else shard))
            assert count == args.samples, count
            return (time.perf_counter() - started) / count * 1e3

        for reader in readers.values():  # warm the page cache and imports
            run(reader)
        times: dict[str, list[float]] = {name: [] for name in readers}
        names = list(readers)
        for round_ in range(args.rounds):
            for name in (names if round_ % 2 == 0 else names[::-1]):
                times[name].append(run(readers[name]))
        print(f"{args.samples} samples of {args.size} px ({mb / args.samples * 1e3:.1f} kB each, "
              f"{len(shards)} shards), {args.rounds} rounds; load {os.getloadavg()[0]:.2f}")
        for name, values in times.items():
            print(f"  {name:24s} median {statistics.median(values):.3f} ms/sample "
                  f"(min {min(values):.3f}, max {max(values):.3f})")
        old, new = (statistics.median(times[n]) for n in names)
        ratios = [b / a for a, b in zip(times[names[0]], times[names[1]], strict=True)]
        print(f"  webdataset - hand-written: {new - old:+.3f} ms/sample; ratio "
              f"{statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
