"""Shards from wherever users keep them: the --shards forms, and the loaders reading shards
over a real HTTP server, a real S3-compatible server (moto) and a GCS emulator
(fake-gcs-server) on 127.0.0.1, through ``pipe:`` commands, with the faults of a local folder
(truncated shard, a connection dropped mid-shard, a missing shard) named by URL and key."""

from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from shardutil import colour_sample, write_shards

from embseg.data import eval_loader, shard_source, train_loader
from embseg.data.sources import beside_folder, manifest_keys, read_num_classes, source_label
from embseg.errors import EmbsegError

C = 6
KEYS = [f"{i:012d}" for i in range(9)]  # shards of 3: train-000000 .. train-000002

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """Three shards of three 16x16 (and 24x16) samples, with classes and manifest."""
    directory = tmp_path_factory.mktemp("src") / "train"
    samples = [colour_sample(i, height=16 + 8 * (i % 2), width=16, num_classes=C)
               for i in range(9)]
    write_shards(directory, samples, num_classes=C, shard_size=3)
    return directory


def _copy(local: Path, target: Path, *, manifest: bool = True) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for path in local.iterdir():
        if manifest or path.name != "manifest.parquet":
            shutil.copy(path, target / path.name)
    return target


def _eval_keys_and_images(shards, **kw) -> tuple[list[str], list[torch.Tensor]]:
    keys, images = [], []
    for batch in eval_loader(shards, num_classes=C, batch_size=2, **kw):
        keys += batch.keys
        images += list(batch.image)
    return keys, images


def _train_batches(shards, n: int = 5, **kw) -> list:
    loader = train_loader(shards, num_classes=C, batch_size=2, crop_size=16, seed=4,
                          shuffle_buffer=4, **kw)
    try:
        return [next(loader) for _ in range(n)]
    finally:
        loader.close()


def _same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys and torch.equal(x.image, y.image) and torch.equal(x.label, y.label)


def _cut_inside(shard: Path, member: str) -> bytes:
    """The shard's bytes cut 20 bytes into the data of ``member``."""
    with tarfile.open(shard) as tar:
        offset = tar.getmember(member).offset_data
    return shard.read_bytes()[:offset + 20]


# --------------------------------------------------------------------------- the forms


def test_forms_of_shards_and_what_beside_means(local, tmp_path):
    folder = shard_source(local)
    assert folder.names == ("train-000000.tar", "train-000001.tar", "train-000002.tar")
    assert folder.beside == str(local)
    pattern = shard_source(f"{local}/train-{{000000..000001}}.tar")
    assert pattern.urls == (f"{local}/train-000000.tar", f"{local}/train-000001.tar")
    assert pattern.beside == str(local)
    joined = shard_source(f"{local}/train-000002.tar::{local}/train-000000.tar")
    assert joined.names == ("train-000002.tar", "train-000000.tar")  # the order given
    pipe = shard_source(f"pipe:cat {local}/train-{{000000..000002}}.tar")
    assert pipe.urls[1] == f"pipe:cat {local}/train-000001.tar"
    assert pipe.names == folder.names and pipe.beside == str(local)
    curl = "pipe:curl -s https://host/d/v/train-000004.tar | cat"
    assert beside_folder(curl) == "https://host/d/v"  # the last word ending in .tar
    assert shard_source(curl).names == ("train-000004.tar",)
    assert beside_folder("pipe:./make-shard --seed 3") is None
    assert beside_folder("s3://bucket/p/val/") == "s3://bucket/p/val"
    assert beside_folder(f"file://{local}") == str(local)
    assert source_label("s3://bucket/p/val-{000000..000003}.tar") == "p"
    assert source_label("https://host/shards/val") == "val" and source_label(local) == "train"
    with pytest.raises(EmbsegError, match="share one folder"):
        shard_source(f"{local}/train-000000.tar::{tmp_path}/train-000001.tar")
    with pytest.raises(EmbsegError, match="does not exist"):
        shard_source(tmp_path / "missing")
    assert read_num_classes(f"pipe:cat {local}/train-000000.tar") == C
    assert manifest_keys(pattern)["train-000001.tar"] == KEYS[3:6]


def test_object_store_without_its_fsspec_implementation_is_one_clear_error():
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed: gs:// is readable here")
    for spec in ("gs://bucket/shards/train", "gs://bucket/p/train-{000000..000003}.tar"):
        with pytest.raises(EmbsegError, match=r"^gs://bucket/.*: cannot read gs:// URLs .*"
                                              r"pip install 'embseg\[s3\]' .*'embseg\[gcs\]'"):
            shard_source(spec)


def test_pipe_pattern_and_folder_give_the_same_batches(local):
    reference = _train_batches(local)
    _same_batches(_train_batches(f"pipe:cat {local}/train-{{000000..000002}}.tar"), reference)
    _same_batches(_train_batches(f"{local}/train-{{000000..000002}}.tar"), reference)
    keys, images = _eval_keys_and_images(f"pipe:cat {local}/train-{{000000..000002}}.tar")
    local_keys, local_images = _eval_keys_and_images(local)
    assert keys == local_keys == KEYS
    assert all(torch.equal(a, b) for a, b in zip(images, local_images, strict=True))


def test_pipe_command_that_fails_names_the_command_and_key(local):
    missing = f"pipe:cat {local}/train-000007.tar"  # cat exits 1; beside is still {local}
    with pytest.raises(EmbsegError, match=r"cat .*train-000007\.tar, key \?: unreadable tar "
                                          r"\(the pipe command exited with status 1\)"):
        list(eval_loader(missing, num_classes=C))


# --------------------------------------------------------------------------- HTTP


def test_http_folder_and_pattern_read_like_the_local_folder(local, served):
    _copy(local, served.path)
    folder = shard_source(served.url)  # HTTP cannot list: the manifest's shard list
    assert folder.urls == tuple(served.url_of(n) for n in shard_source(local).names)
    keys, images = _eval_keys_and_images(served.url, num_workers=2)
    local_keys, local_images = _eval_keys_and_images(local, num_workers=2)
    assert sorted(keys) == KEYS and keys == local_keys
    assert all(torch.equal(a, b) for a, b in zip(images, local_images, strict=True))
    _same_batches(_train_batches(f"{served.url}/train-{{000000..000002}}.tar", num_workers=2),
                  _train_batches(local, num_workers=2))
    assert ("GET", None) in served.server.requested(served.path / "train-000001.tar")


def test_repeat_factor_sampling_reads_the_manifest_beside_http_shards(local, served):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(local / "manifest.parquet").to_pylist()
    for index, row in enumerate(rows):
        row["class_ids"] = [1, 5] if index < 2 else [1]  # f(5) = 2/9: two images repeated
    _copy(local, served.path)
    pq.write_table(pa.Table.from_pylist(rows), served.path / "manifest.parquet")
    here = _copy(served.path, served.path.parent / f"{served.path.name}-local")
    options = {"repeat_threshold": 1.0, "num_workers": 0}
    remote = _train_batches(served.url, n=8, **options)
    _same_batches(remote, _train_batches(here, n=8, **options))
    plain = _train_batches(here, n=8, num_workers=0)
    assert [b.keys for b in remote] != [b.keys for b in plain]  # the factors changed them
    served.fail("manifest.parquet", 404)
    with pytest.raises(EmbsegError, match=r"manifest\.parquet: not found; repeat-factor"):
        train_loader(f"{served.url}/train-{{000000..000002}}.tar", num_classes=C, batch_size=2,
                     crop_size=16, repeat_threshold=1.0)


def test_train_a_few_steps_and_evaluate_from_http(local, served, tmp_path):
    from embseg.cli import main
    from embseg.evaluate import evaluate
    from embseg.train import TrainConfig, train

    _copy(local, served.path)
    result = train(TrainConfig(shards=f"{served.url}/train-{{000000..000002}}.tar",
                               val_shards=served.url, out=tmp_path / "run", steps=3,
                               batch_size=2, crop_size=16, num_workers=0, checkpoint_every=3,
                               no_progress=True))
    assert result.step == 3 and result.metrics["val_miou"] is not None
    remote = evaluate(result.last_checkpoint, served.url, num_workers=0)
    here = evaluate(result.last_checkpoint, local, num_workers=0)
    assert remote.n_images == here.n_images == len(KEYS) and remote.n_bad_samples == 0
    assert remote.miou == here.miou and remote.shards == served.url
    assert main(["eval", "--checkpoint", str(result.last_checkpoint), "--shards",
                 served.url, "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "per_class.csv").exists()
    from embseg.predict import predict_shards

    pictures = predict_shards(result.last_checkpoint, served.url, tmp_path / "pred", count=2)
    assert [p["key"] for p in pictures] == KEYS[:2]  # with ground truth from the HTTP shards


def test_http_faults_name_the_url_and_the_key(local, served):
    shards = _copy(local, served.path)
    middle = served.url_of("train-000001.tar")
    # a truncated shard: the cut is inside the label map of its second sample
    (shards / "train-000001.tar").write_bytes(
        _cut_inside(local / "train-000001.tar", f"{KEYS[4]}.seg.png"))
    with pytest.raises(EmbsegError, match=rf"shard {middle}, key {KEYS[4]}: unreadable tar "
                                          r"\(unexpected end of data\)"):
        list(eval_loader(served.url, num_classes=C))
    skipping = eval_loader(served.url, num_classes=C, on_bad_sample="skip")
    assert [k for b in skipping for k in b.keys] == KEYS[:4] + KEYS[6:]  # not the cut one
    assert skipping.bad_samples == 1 and middle in skipping.skipped[0]

    # the server closes the connection mid-shard (its headers promised the whole file)
    shutil.copy(local / "train-000001.tar", shards / "train-000001.tar")
    served.drop_after("train-000001.tar", (local / "train-000001.tar").stat().st_size // 2)
    with pytest.raises(EmbsegError, match=rf"shard {middle}, key 00000000000[345]: unreadable "
                                          r"tar \(the connection closed before the end of the "
                                          r"file \(curl exit 18\)\)"):
        list(eval_loader(served.url, num_classes=C))

    # a missing shard: HTTP 404, named with the first key the manifest lists for it
    served.fail("train-000001.tar", 404)
    with pytest.raises(EmbsegError, match=rf"shard {middle}, key {KEYS[3]}: unreadable tar "
                                          r"\(HTTP 404 Not Found \(curl exit 22\)\); 3 sample"):
        list(eval_loader(served.url, num_classes=C))
    skipping = eval_loader(served.url, num_classes=C, on_bad_sample="skip")
    assert [k for b in skipping for k in b.keys] == KEYS[:3] + KEYS[6:]
    assert skipping.bad_samples == 1 and "404" in skipping.skipped[0]
    training = train_loader(served.url, num_classes=C, batch_size=2, crop_size=16,
                            num_workers=0, on_bad_sample="fail")
    with pytest.raises(EmbsegError, match=rf"shard {middle}, key {KEYS[3]}: .*HTTP 404"):
        for _ in range(5):
            next(training)


def test_http_without_manifest_warns_and_cut_at_boundary_fails_on_the_drop(local, served,
                                                                           caplog):
    _copy(local, served.path, manifest=False)
    pattern = f"{served.url}/train-{{000000..000002}}.tar"
    with caplog.at_level(logging.WARNING, logger="embseg.data.sources"):
        keys, _ = _eval_keys_and_images(pattern)
    assert keys == KEYS
    assert any("manifest.parquet: not found" in r.message and "cannot be detected" in r.message
               for r in caplog.records)
    with pytest.raises(EmbsegError, match="cannot be listed"):
        shard_source(served.url)  # an HTTP folder without a manifest has no shard list
    # a connection dropped exactly between two samples: the tar alone reads as complete and
    # shorter, curl's exit status still says the transfer failed
    shard = local / "train-000002.tar"
    with tarfile.open(shard) as tar:
        boundary = tar.getmember(f"{KEYS[7]}.jpg").offset
    served.drop_after("train-000002.tar", boundary)
    with pytest.raises(EmbsegError, match=r"train-000002\.tar, key .*connection closed"):
        list(eval_loader(pattern, num_classes=C))


# ------------------------------------------------------- object stores (moto S3, GCS emulator)


def _upload(local: Path, fs, prefix: str, *, skip: tuple[str, ...] = ()) -> None:
    for path in sorted(local.iterdir()):
        if path.name not in skip:
            fs.pipe(f"{prefix}/{path.name}", path.read_bytes())


STORES = [pytest.param("s3_bucket", " (NoSuchKey)", id="s3"),
          pytest.param("gcs_bucket", "", id="gcs")]
"""The object stores the tests run (moto's S3, the GCS emulator), with what each adds to a
missing shard's reason."""


@pytest.mark.parametrize(("store", "missing"), STORES)
def test_object_store_folder_reads_like_the_local_folder(local, store, missing, request):
    bucket = request.getfixturevalue(store)
    fs = bucket.server.filesystem()
    prefix = f"{bucket.url}/shards/train"
    _upload(local, fs, prefix)
    fs.pipe(f"{prefix}/.train-000009.tar.tmp", b"partial")  # never listed
    source = shard_source(prefix)
    assert source.urls == tuple(f"{prefix}/{n}" for n in shard_source(local).names)
    assert source.beside == prefix
    assert read_num_classes(prefix) == C and manifest_keys(prefix)["train-000002.tar"] == KEYS[6:]
    assert _eval_keys_and_images(prefix)[0] == KEYS
    _same_batches(_train_batches(prefix, num_workers=2), _train_batches(local, num_workers=2))
    pattern = f"{prefix}/train-{{000000..000002}}.tar"
    _same_batches(_train_batches(pattern), _train_batches(local))


@pytest.mark.parametrize(("store", "missing"), STORES)
def test_object_store_faults_name_the_url_and_the_key(local, store, missing, request):
    bucket = request.getfixturevalue(store)
    fs = bucket.server.filesystem()
    prefix = f"{bucket.url}/train"
    _upload(local, fs, prefix, skip=("train-000002.tar",))
    fs.pipe(f"{prefix}/train-000001.tar",
            _cut_inside(local / "train-000001.tar", f"{KEYS[3]}.jpg"))
    pattern = f"{prefix}/train-{{000000..000002}}.tar"
    with pytest.raises(EmbsegError, match=rf"shard {prefix}/train-000001.tar, key {KEYS[3]}: "
                                          r"unreadable tar \(unexpected end of data\)"):
        list(eval_loader(pattern, num_classes=C))
    skipping = eval_loader(pattern, num_classes=C, on_bad_sample="skip")
    assert [k for b in skipping for k in b.keys] == KEYS[:3]
    assert skipping.bad_samples == 2
    assert any(f"{prefix}/train-000002.tar, key {KEYS[6]}: unreadable tar (shard not found"
               f"{missing})" in s for s in skipping.skipped)
    with pytest.raises(EmbsegError, match="elsewhere: shard folder does not exist"):
        shard_source(f"{bucket.url}/elsewhere")
    assert np.isfinite(read_num_classes(pattern))
    fs.rm_file(f"{prefix}/classes.parquet")
    with pytest.raises(EmbsegError, match=rf"{prefix}/classes.parquet: not found"):
        read_num_classes(pattern)
