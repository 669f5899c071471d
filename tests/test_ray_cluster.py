"""The dataset-rebuild flow on a real multi-node Ray cluster, through ``ray_address``.

The cluster (``ray.cluster_utils.Cluster``: a head without CPUs and two 1-CPU nodes) lives in a
subprocess (tests/cluster_rebuild.py), since this process already holds the session's local
Ray. Its shards must be byte-identical to a single-node build of the same inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prefect_fixtures import REPO_ROOT

from embseg.synth import generate_synthetic
from flows.rebuild import dataset_rebuild

pytestmark = pytest.mark.slow

SHARD_SIZE = 6


def _outputs(out: Path) -> dict[str, bytes]:
    """Every shard's bytes, by split and name."""
    return {str(p.relative_to(out)): p.read_bytes()
            for p in sorted(out.glob("*/*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))}


def _manifest_rows(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / split / "manifest.parquet").to_pylist()


def test_rebuild_on_a_multi_node_cluster_matches_a_single_node_build(prefect_server, ray_local,
                                                                   tmp_path):
    synth = generate_synthetic(tmp_path / "synth", images=14, val_images=5, lvis_classes=8,
                               seed=5, size=64)
    params = {
        "splits": [
            {"split": "train", "lvis": str(synth.lvis_train), "coco_stuff": [str(synth.stuff_train)]},
            {"split": "val", "lvis": str(synth.lvis_val), "coco_stuff": [str(synth.stuff_val)]},
        ],
        "images": str(synth.images_root), "shard_size": SHARD_SIZE,
    }
    cluster_out = tmp_path / "cluster"
    params_path = tmp_path / "params.json"
    params_path.write_text(json.dumps({**params, "out": str(cluster_out)}))
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "cluster_rebuild.py"),
                           str(params_path)], cwd=REPO_ROOT, env=prefect_server.env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["nodes"] == 3
    assert {s: r["status"] for s, r in report["result"].items()} == {"train": "rebuilt",
                                                                     "val": "rebuilt"}
    # the flow's own view of the Ray it ran on: the cluster's three nodes, not a local Ray
    # (one node) that a wrong join could have started with this machine's 2 CPUs
    assert f"Ray: 2 CPUs on 3 node(s) ({report['address']})" in done.stdout + done.stderr

    single_out = tmp_path / "single"
    single = dataset_rebuild(**params, out=single_out)  # the session's one-node local Ray
    assert {s: r["input_hash"] for s, r in single.items()} == \
        {s: r["input_hash"] for s, r in report["result"].items()}
    cluster_shards, single_shards = _outputs(cluster_out), _outputs(single_out)
    assert sorted(cluster_shards) == ["train/train-000000.tar", "train/train-000001.tar",
                                      "train/train-000002.tar", "val/val-000000.tar"]
    assert cluster_shards == single_shards
    for split in ("train", "val"):
        assert _manifest_rows(cluster_out, split) == _manifest_rows(single_out, split)
        assert (cluster_out / split / "classes.parquet").read_bytes() == \
            (single_out / split / "classes.parquet").read_bytes()
