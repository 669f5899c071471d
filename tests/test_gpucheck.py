"""``embseg gpu-check``: its data, both parts end to end (on the CPU here), its pass/fail lines."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from blocker import blocking_sitecustomize
from shardutil import colour_sample, write_shards

from embseg import gpucheck
from embseg.cli import main
from embseg.gpucheck import CheckSettings, DataSettings, checks, run_check

C = 6
TINY = CheckSettings(
    demo_data=DataSettings(images=6, val_images=2, lvis_classes=3, size=32),
    demo_train=(("embed_dim", 8), ("k", 3), ("steps", 6), ("batch_size", 4),
                ("crop_size", 32), ("lr", 0.05), ("num_workers", 0), ("seed", 0)),
    paper_data=DataSettings(images=4, val_images=0, lvis_classes=3, size=32),
    paper_train=(("backbone", "tiny"), ("output_stride", 16), ("embed_dim", 8), ("k", 3),
                 ("steps", 3), ("batch_size", 2), ("crop_size", 40), ("lr", 0.01),
                 ("num_workers", 0), ("seed", 0)),
    paper_warmup_steps=1)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def check_data(tmp_path_factory) -> Path:
    """The layout ``prepare`` writes, from hand-made shards (no Ray needed)."""
    root = tmp_path_factory.mktemp("gpu-check-data")
    samples = [colour_sample(i, height=36, width=36, num_classes=C) for i in range(12)]
    write_shards(root / "demo" / "train", samples[:8], num_classes=C, shard_size=4)
    write_shards(root / "demo" / "val", samples[8:], num_classes=C, split="val")
    write_shards(root / "paper" / "train", samples[:6], num_classes=C)
    return root


def test_demo_settings_are_the_pipeline_defaults():
    pipeline = pytest.importorskip("flows.pipeline")
    defaults = {name: parameter.default for name, parameter in
                inspect.signature(pipeline.pipeline.fn).parameters.items()}
    settings = CheckSettings()
    assert dict(settings.demo_train) == {name: defaults[name] for name in dict(
        settings.demo_train)}
    data = settings.demo_data
    assert (data.images, data.val_images, data.lvis_classes, data.size) == (
        defaults["synthetic_images"], defaults["synthetic_val_images"],
        defaults["synthetic_lvis_classes"], defaults["synthetic_size"])
    paper = dict(CheckSettings().paper_train)
    assert (paper["backbone"], paper["batch_size"], paper["crop_size"],
            paper["output_stride"]) == ("resnet101", 16, 513, 16)


def test_both_parts_run_and_write_their_files(check_data, tmp_path):
    lines: list[str] = []
    result = run_check(check_data, tmp_path, device="cpu", settings=TINY, log=lines.append)
    assert [row["head"] for row in result["demo"]] == ["embedding", "softmax"]
    assert [row["head"] for row in result["paper"]] == ["embedding", "softmax"]
    for row in result["demo"]:
        assert row["steps"] == 6 and row["trained"] and row["error"] is None
        # the "device" is the CPU here: both evaluations are the same computation
        assert row["val_miou_device"] == row["val_miou_cpu"] is not None
        assert row["peak_cuda_bytes"] is None
    for row in result["paper"]:
        assert row["steps"] == 3 and row["classes"] == C and row["trained"]
        assert row["images_per_second_median"] > 0
    # two files: the lent machine returns at most eight, and the bench writes three more
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    stored = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [len(row["losses"]) for row in stored["demo"] + stored["paper"]] == [6, 6, 3, 3]
    assert len(stored["paper"][0]["images_per_second"]) == 3
    assert stored["checks"] == [{"check": n, "passed": ok, "value": d}
                                for n, ok, d in checks(result)]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "PASS: demo embedding: device and CPU evaluations within 1 point" in markdown
    assert "PASS: paper softmax: every step trained at C=6, losses finite (3/3 steps" in markdown
    assert len(lines) == 4


def test_run_needs_neither_ray_nor_prefect_nor_the_annotation_apis(check_data, tmp_path):
    """What the lent GPU machine lacks (it gets WebDataset as a carried wheel)."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        blocking_sitecustomize({"ray", "prefect", "pycocotools", "lvis", "fastapi"}))
    script = f"""
from dataclasses import replace
from pathlib import Path
try:
    import prefect  # noqa: F401
    raise SystemExit("the blocker is not active")
except ImportError:
    pass
from embseg import cli  # noqa: F401
from embseg.gpucheck import CheckSettings, run_check
tiny = replace(CheckSettings(), demo_train={TINY.demo_train!r}, paper_train={TINY.paper_train!r},
               paper_warmup_steps=1)
result = run_check(Path({str(check_data)!r}), Path({str(tmp_path / "out")!r}), device="cpu",
                   settings=tiny, log=lambda line: None)
print(len(result["checks"]))
"""
    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=path.rstrip(os.pathsep)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "8"  # 3 per demo head + 1 per paper head


def _demo_row(**changes) -> dict:
    row = {"head": "embedding", "steps": 160, "steps_planned": 160, "error": None,
           "first_loss": 3.0, "last_loss": 1.0, "trained": True, "loss_falls": True,
           "val_miou_device": 0.2, "val_miou_cpu": 0.195}
    return {**row, **changes}


@pytest.mark.parametrize("changes, failing", [
    ({}, None),
    ({"loss_falls": False}, "losses finite and falling"),
    ({"trained": False}, "losses finite and falling"),
    ({"val_miou_device": 0.04, "val_miou_cpu": 0.04}, "val mIoU >= 5%"),
    ({"val_miou_cpu": 0.185}, "device and CPU evaluations"),
    ({"val_miou_cpu": None}, "device and CPU evaluations"),
])
def test_check_lines_fail_on_what_they_name(changes, failing):
    lines = checks({"demo": [_demo_row(**changes)]})
    assert len(lines) == 3
    failed = [name for name, ok, _ in lines if not ok]
    if failing is None:
        assert failed == []
    else:
        assert len(failed) == 1 and failing in failed[0]


def test_a_head_that_stops_is_a_failed_check_and_the_others_still_run(check_data, tmp_path):
    """A learning rate of 1e30 makes the loss non-finite within a few steps; the trainer stops
    there, and the check records it instead of crashing."""
    exploding = replace(TINY, demo_train=tuple((name, 1e30 if name == "lr" else value)
                                               for name, value in TINY.demo_train))
    result = run_check(check_data, tmp_path, device="cpu", settings=exploding,
                       log=lambda line: None)
    for row in result["demo"]:
        assert not row["trained"] and "loss is" in row["error"]
        assert row["steps"] < row["steps_planned"] and row["val_miou_device"] is None
    assert all(row["trained"] for row in result["paper"])
    lines = checks(result)
    assert [ok for _, ok, _ in lines] == [False] * 6 + [True] * 2
    stored = json.loads((tmp_path / "gpu_check.json").read_text())
    assert stored["demo"][1]["error"] == result["demo"][1]["error"]
    assert "FAIL: demo softmax: every step trained" in (tmp_path / "gpu_check.md").read_text()


def test_falls_compares_the_first_and_last_fifth():
    assert gpucheck._falls([5.0, 4.0, 9.0, 3.0, 1.0])
    assert not gpucheck._falls([1.0, 4.0, 0.5, 3.0, 2.0])


def test_prepare_writes_both_parts_shards_without_the_images(ray_local, tmp_path):
    tiny = replace(TINY, paper_data=DataSettings(images=3, val_images=0, lvis_classes=4, size=32))
    built = gpucheck.prepare(tmp_path, tiny)
    assert built == {"demo/train": 6, "demo/val": 2, "paper/train": 3}
    for split in ("demo/train", "demo/val", "paper/train"):
        assert list((tmp_path / split).glob("*.tar"))
        assert (tmp_path / split / "classes.parquet").exists()
    assert not (tmp_path / "demo" / "synthetic" / "images").exists()
    assert json.loads((tmp_path / "settings.json").read_text())["paper_data"]["images"] == 3


def test_cli_names_a_missing_data_folder_or_part(tmp_path, capsys):
    assert main(["gpu-check", "run", "--data", str(tmp_path), "--device", "cpu"]) == 2
    assert f"{tmp_path}/demo/train: no shards here" in capsys.readouterr().err
    assert main(["gpu-check", "run", "--data", str(tmp_path), "--parts", "demo,gpu"]) == 2
    assert "unknown part(s) gpu" in capsys.readouterr().err
