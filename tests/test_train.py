"""Training: the loss goes down, resume (also after SIGKILL) continues the same run,
checkpoints are atomic / weights_only / tied to their vocabulary."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shardutil import colour_sample, make_vocabulary, write_shards

from embseg.checkpoint import (
    FORMAT,
    CheckpointFallbackWarning,
    load_checkpoint,
    previous_path,
    save_checkpoint,
)
from embseg.errors import EmbsegError
from embseg.train import TrainConfig, poly_factor, train

C = 8
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-shards")
    write_shards(root / "train", [colour_sample(i, height=40, width=40, num_classes=C)
                                  for i in range(24)], num_classes=C, shard_size=8)
    write_shards(root / "val", [colour_sample(100 + i, height=40, width=40, num_classes=C)
                                for i in range(4)], num_classes=C, split="val")
    return root


def _config(root: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(shards=root / "train", val_shards=root / "val", out=out, steps=8,
                    batch_size=4, crop_size=32, lr=0.05, num_workers=2, checkpoint_every=4,
                    no_progress=True, seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def _all_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _rows(run: Path, kind: str) -> list[dict]:
    return [row for row in _all_rows(run) if row["kind"] == kind]


@pytest.fixture(scope="module")
def reference_run(shards, tmp_path_factory) -> Path:
    """An uninterrupted 8-step run (checkpoints at 4 and 8, val eval at both)."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("runs") / "reference"
    result = train(_config(shards, run))
    assert result.step == 8 and result.last_checkpoint == run / "last.pt"
    assert result.best_checkpoint == run / "best.pt"
    return run


RFS_SETTINGS = {"repeat_threshold": 2.0, "checkpoint_every": 5}
"""A threshold above every class's image fraction (<= 1): each image repeats sqrt(2 / f) >=
1.41 times, so about half the images come twice in an epoch, by a seeded draw; checkpoints
at steps 5 and 8, so the resume starts at an odd step (the loader rotates its two streams)."""


@pytest.fixture(scope="module")
def rfs_reference_run(shards, tmp_path_factory) -> Path:
    """The reference run with repeat-factor sampling (``--repeat-threshold 2``)."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("runs") / "reference-rfs"
    train(_config(shards, run, **RFS_SETTINGS))
    return run


def _loader_keys(config: TrainConfig, payload: dict | None, steps: int) -> list[list[str]]:
    """The sample keys of the next ``steps`` batches of the training loader of ``config``
    (from the loader position stored in ``payload``, or from the start)."""
    from embseg.data import LoaderState, train_loader

    loader = train_loader(config.shards, num_classes=C, batch_size=config.batch_size,
                          crop_size=config.crop_size, seed=config.seed,
                          num_workers=config.num_workers, repeat_threshold=config.repeat_threshold,
                          state=LoaderState.from_dict(payload["data"]) if payload else None,
                          start_step=payload["step"] if payload else 0)
    keys = [next(loader).keys for _ in range(steps)]
    loader.close()
    return keys


# 60 steps for ESS: at the default T = 5 its loss falls by 6% in the first 12 steps on these
# 8-class colour samples (by 20% at T = 20); with the default class-table multiplier of 300 by
# 17% in 40 steps and 32% in 60 (at 30: 27% in 40)
@pytest.mark.parametrize(("head", "steps", "lr"), [("embedding", 60, 0.05), ("softmax", 20, 0.3)])
def test_a_few_steps_lower_the_loss(shards, tmp_path, head, steps, lr):
    result = train(_config(shards, tmp_path / head, head=head, steps=steps, val_shards=None,
                           checkpoint_every=100, lr=lr))
    losses = [row["loss"] for row in _rows(tmp_path / head, "train")]
    assert len(losses) == steps and result.best_checkpoint is None
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_metrics_rows_and_checkpoint_contents(reference_run):
    train_rows = _rows(reference_run, "train")
    assert [row["step"] for row in train_rows] == list(range(1, 9))
    assert {"loss", "ess", "margin", "lr", "images_per_second", "bad_samples"} <= set(train_rows[0])
    assert train_rows[0]["lr"] == pytest.approx(0.05)
    assert train_rows[4]["lr"] == pytest.approx(0.05 * poly_factor(4, 8))
    eval_rows = _rows(reference_run, "eval")
    assert [row["step"] for row in eval_rows] == [4, 8]
    assert 0.0 <= eval_rows[-1]["val_miou"] <= 1.0
    # plain torch.load with weights_only=True: a checkpoint is data only
    payload = torch.load(reference_run / "last.pt", weights_only=True)
    assert payload["format"] == FORMAT and payload["step"] == 8
    assert payload["class_table_hash"] == make_vocabulary(C).content_hash()
    assert payload["vocabulary"]["names"] == [f"class_{i}" for i in range(1, C + 1)]
    assert payload["model_config"]["num_classes"] == C
    assert set(payload["rng"]) >= {"python", "numpy", "torch"}
    assert payload["best_miou"] == pytest.approx(max(r["val_miou"] for r in eval_rows))
    assert torch.load(previous_path(reference_run / "last.pt"), weights_only=True)["step"] == 4
    best = torch.load(reference_run / "best.pt", weights_only=True)
    assert best["step"] in (4, 8)


def test_progress_hook_and_curves_of_a_resumed_run(shards, reference_run, tmp_path):
    """The hook sees the start (at the resumed step), every step, the evaluation and the end,
    with the figures metrics.jsonl holds; curves.png is written beside it."""
    from embseg.train import TrainProgress

    run = tmp_path / "resumed"
    _resume_copy(reference_run, run, "last.prev.pt")  # the step-4 checkpoint
    events: list[TrainProgress] = []
    result = train(_config(shards, run, resume=True), progress=events.append)
    train_loss = {row["step"]: row["loss"] for row in _rows(run, "train")}
    (val,) = [row["val_miou"] for row in _rows(run, "eval") if row["step"] == 8]
    assert [(e.event, e.step) for e in events] == [
        ("start", 4), ("step", 5), ("step", 6), ("step", 7), ("step", 8), ("eval", 8), ("end", 8)]
    assert [e.loss for e in events] == [train_loss[e.step] for e in events]
    assert all(e.steps == 8 and e.run_dir == run for e in events)
    assert [e.fraction for e in events][:2] == [0.5, 0.625] and events[-1].fraction == 1.0
    step4 = next(r["val_miou"] for r in _rows(reference_run, "eval") if r["step"] == 4)
    assert events[0].val_miou == pytest.approx(step4)  # the checkpoint's last evaluation
    assert events[-2].val_miou == events[-1].val_miou == pytest.approx(val)
    assert result.curves == run / "curves.png"
    with Image.open(result.curves) as picture:
        assert picture.format == "PNG" and picture.text["Source"] == str(run / "metrics.jsonl")
        assert json.loads(picture.text["Description"]) == {"loss_points": 8,
                                                           "val_miou_points": 2}


def _colour_pixels(picture: np.ndarray, hex_colour: str, tolerance: int = 40) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(picture[..., :3].astype(int) - rgb).sum(-1) < tolerance).sum())


def test_curves_png_from_a_metrics_file(tmp_path):
    from embseg.curves import LOSS_COLOUR, MIOU_COLOUR, write_curves
    from embseg.train import MetricsLog

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s, "loss": 3.0 / s} for s in range(1, 11)]
    rows.insert(5, {"kind": "eval", "step": 5, "val_miou": 0.125})
    rows += [{"kind": "eval", "step": 10, "val_miou": 0.25},
             {"kind": "eval", "step": 11, "val_miou": None}]  # an evaluation with no classes
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tra')  # cut line
    curves = write_curves(MetricsLog(metrics).rows(), tmp_path / "curves.png", source=str(metrics))
    assert curves.loss_steps == list(range(1, 11))
    assert curves.losses == pytest.approx([3.0 / s for s in range(1, 11)])
    assert (curves.eval_steps, curves.val_miou_percent) == ([5, 10], [12.5, 25.0])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(tmp_path / "curves.png") as picture:
        assert picture.size == (700, 550) and picture.text["Source"] == str(metrics)
        pixels = np.asarray(picture.convert("RGB"))
    top, bottom = pixels[:275], pixels[275:]
    assert _colour_pixels(top, LOSS_COLOUR) > 100 and _colour_pixels(bottom, LOSS_COLOUR) == 0
    assert _colour_pixels(bottom, MIOU_COLOUR) > 100 and _colour_pixels(top, MIOU_COLOUR) == 0
    # without evaluations: the loss panel only, no mIoU line
    write_curves(rows[:5], tmp_path / "loss-only.png", source=str(metrics))
    with Image.open(tmp_path / "loss-only.png") as picture:
        pixels = np.asarray(picture.convert("RGB"))
    assert _colour_pixels(pixels, MIOU_COLOUR) == 0 and _colour_pixels(pixels, LOSS_COLOUR) > 50


def _tag_rows(metrics: Path) -> list[dict]:
    """Tag every row already in ``metrics`` with ``"kept": True`` and return the tagged rows.

    Training is deterministic, so a run silently restarted at step 0 rewrites the same
    losses; only rows a resume keeps still carry the tag afterwards. A line cut by a kill
    (not JSON) is left as it is.
    """
    lines, tagged = [], []
    for line in metrics.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            lines.append(line)
            continue
        tagged.append({**row, "kept": True})
        lines.append(json.dumps(tagged[-1]) + ("\n" if line.endswith("\n") else ""))
    metrics.write_text("".join(lines))
    return tagged


def _resume_copy(reference_run: Path, target: Path, checkpoint: str) -> None:
    """A run directory as a killed run would leave it: a checkpoint and the full metrics."""
    target.mkdir()
    shutil.copy(reference_run / checkpoint, target / "last.pt")
    shutil.copy(reference_run / "metrics.jsonl", target / "metrics.jsonl")


@pytest.mark.parametrize("threshold", [None, RFS_SETTINGS["repeat_threshold"]], ids=["plain", "repeat-factors"])
def test_resume_continues_the_same_run(shards, request, tmp_path, threshold):
    reference_run = request.getfixturevalue("reference_run" if threshold is None
                                            else "rfs_reference_run")
    config = _config(shards, tmp_path / "resumed", resume=True,
                     **({} if threshold is None else RFS_SETTINGS))
    run = config.out
    _resume_copy(reference_run, run, "last.prev.pt")  # the checkpoint before the last
    payload = torch.load(run / "last.pt", weights_only=True)
    at = payload["step"]
    assert at == config.checkpoint_every and payload["train_config"]["repeat_threshold"] == (
        threshold)
    # the samples after the checkpoint's loader position are those of the uninterrupted run
    uninterrupted = _loader_keys(config, None, 8)
    assert _loader_keys(config, payload, 8 - at) == uninterrupted[at:]
    if threshold is not None:  # repeats happened: some image twice in the first epoch's batches
        seen = Counter(key for batch in uninterrupted for key in batch)
        assert max(seen.values()) > 1
    before = _tag_rows(run / "metrics.jsonl")
    result = train(config)
    assert result.step == 8
    # the rows up to the checkpoint are the old ones, whole (images_per_second included);
    # the rows after it were cut and redone: a restart at step 0 would have redone them all
    rows = _all_rows(run)
    assert [row for row in rows if row.get("kept")] == [r for r in before if r["step"] <= at]
    assert [(r["kind"], r["step"]) for r in rows if not r.get("kept")] == [
        *[("train", step) for step in range(at + 1, 9)], ("eval", 8)]
    got, want = _rows(run, "train"), _rows(reference_run, "train")
    assert [row["step"] for row in got] == list(range(1, 9))  # metrics cut back, then redone
    assert [row["loss"] for row in got] == pytest.approx([row["loss"] for row in want], rel=1e-5)
    assert [r["val_miou"] for r in _rows(run, "eval")] == pytest.approx(
        [r["val_miou"] for r in _rows(reference_run, "eval")], rel=1e-5)


def test_truncated_checkpoint_falls_back_to_the_previous_one(shards, reference_run, tmp_path):
    run = tmp_path / "truncated"
    _resume_copy(reference_run, run, "last.pt")
    shutil.copy(reference_run / "last.prev.pt", run / "last.prev.pt")
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.warns(CheckpointFallbackWarning, match="last.pt: does not load"):
        payload = load_checkpoint(run / "last.pt")
    assert payload["step"] == 4 and payload["path"].endswith("last.prev.pt")
    with pytest.warns(CheckpointFallbackWarning):
        result = train(_config(shards, run, resume=True))
    assert result.step == 8
    losses = [row["loss"] for row in _rows(run, "train")]
    assert losses == pytest.approx([row["loss"] for row in _rows(reference_run, "train")],
                                   rel=1e-5)
    (run / "last.pt").write_bytes(b"")
    (run / "last.prev.pt").write_bytes(b"garbage")
    with pytest.raises(EmbsegError, match="last.pt: does not load.*last.prev.pt: does not load"):
        load_checkpoint(run / "last.pt")


def test_resume_checks_vocabulary_and_settings(shards, reference_run, tmp_path):
    other = tmp_path / "other"
    write_shards(other, [colour_sample(i, height=40, width=40, num_classes=C + 1)
                         for i in range(4)], num_classes=C + 1)
    run = tmp_path / "run"
    _resume_copy(reference_run, run, "last.prev.pt")
    with pytest.raises(EmbsegError) as error:
        train(_config(shards, run, shards=other, val_shards=None, resume=True))
    message = str(error.value)
    assert make_vocabulary(C).content_hash() in message
    assert make_vocabulary(C + 1).content_hash() in message and "last.pt" in message
    with pytest.raises(EmbsegError, match=r"different settings: batch_size=2 \(checkpoint: 4\)"):
        train(_config(shards, run, batch_size=2, resume=True))
    with pytest.raises(EmbsegError, match="already holds a training run"):
        train(_config(shards, run))


def test_lr_multipliers_and_embed_bn_reach_the_optimizer_and_the_checkpoint(shards, tmp_path):
    run = tmp_path / "multipliers"
    train(_config(shards, run, steps=2, val_shards=None, lr=0.04, backbone_lr_mult=1.0,
                  class_lr_mult=7.0))
    payload = torch.load(run / "last.pt", weights_only=True)
    groups = payload["optimizer"]["param_groups"]
    assert [group["name"] for group in groups] == ["backbone", "head", "class_table"]
    assert [group["initial_lr"] for group in groups] == pytest.approx([0.04, 0.04, 0.28])
    assert len(groups[2]["params"]) == 1  # the class table alone
    assert payload["model_config"]["embed_bn"] is True  # the trainer's default head
    assert "decoder.classifier.1.running_var" in payload["model"]
    rows = _rows(run, "train")
    assert rows[0]["lr"] == pytest.approx(0.04)  # the logged lr is the base (head) lr
    plain = tmp_path / "plain"
    train(_config(shards, plain, steps=1, val_shards=None, embed_bn=False, class_lr_mult=1.0))
    payload = torch.load(plain / "last.pt", weights_only=True)
    assert "embed_bn" not in payload["model_config"]
    assert [g["initial_lr"] for g in payload["optimizer"]["param_groups"]] == pytest.approx(
        [0.005, 0.05])  # backbone at the default 0.1 x lr, the class table with the head


def test_resume_refuses_other_multipliers_and_checkpoints_from_before_the_options(
        shards, reference_run, tmp_path):
    run = tmp_path / "run"
    _resume_copy(reference_run, run, "last.prev.pt")
    with pytest.raises(EmbsegError, match=r"class_lr_mult=3\.0 \(checkpoint: 300\.0\)"):
        train(_config(shards, run, class_lr_mult=3.0, resume=True))
    with pytest.raises(EmbsegError, match=r"repeat_threshold=0\.001 \(checkpoint: None\)"):
        train(_config(shards, run, repeat_threshold=0.001, resume=True))
    # a checkpoint written before the options existed trained a plain head, the backbone at
    # 0.1 x lr and the class table at lr: resuming it with the new defaults is refused
    payload = torch.load(run / "last.pt", weights_only=True)
    for name in ("embed_bn", "dropout", "backbone_lr_mult", "class_lr_mult", "repeat_threshold"):
        del payload["train_config"][name]
    save_checkpoint(payload, run / "last.pt")
    with pytest.raises(EmbsegError, match=r"embed_bn=True \(checkpoint: False\).*"
                                          r"class_lr_mult=300\.0 \(checkpoint: 1\.0\)"):
        train(_config(shards, run, resume=True))


def test_checkpoint_loading_is_weights_only(tmp_path):
    class NotData:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "model": {}, "payload": NotData()}, path)
    with pytest.raises(EmbsegError, match="evil.pt: does not load .*[Ww]eights only"):
        load_checkpoint(path, fallback=False)
    save_checkpoint({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(EmbsegError, match="not an embseg checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary files


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_device_without_cuda_is_a_clear_error(shards, tmp_path):
    with pytest.raises(EmbsegError, match="--device cuda: CUDA is not available"):
        train(_config(shards, tmp_path / "cuda", device="cuda"))


def _cli_train(shards: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "embseg", "train", "--shards", str(shards / "train"),
            "--val-shards", str(shards / "val"), "--out", str(run), "--steps", "14",
            "--batch-size", "4", "--crop-size", "32", "--lr", "0.05", "--num-workers", "2",
            "--checkpoint-every", "3", "--seed", "1", "--no-progress", *extra]


def test_sigkill_then_resume_matches_an_uninterrupted_run(shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli_train(shards, killed), env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = killed / "metrics.jsonl"
        steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()
                 if line.endswith("}")] if metrics.exists() else []
        if steps and max(steps) >= 7:
            break
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed / "last.pt").exists()
    # where the resume must continue: the checkpoint's step (3, 6, 9, 12 are checkpointed;
    # the kill came after step 7 was logged), and the rows the killed run logged up to it
    killed_at = load_checkpoint(killed / "last.pt", map_location="cpu")["step"]
    assert killed_at in (6, 9, 12), killed_at
    before = [row for row in _tag_rows(killed / "metrics.jsonl") if row["step"] <= killed_at]
    assert [row["step"] for row in before if row["kind"] == "train"] == list(
        range(1, killed_at + 1))
    resumed = subprocess.run(_cli_train(shards, killed, "--resume"), env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "last checkpoint:" in resumed.stdout and "metrics.jsonl" in resumed.stdout
    # the killed run's rows up to the checkpoint are kept whole; only the later steps are new
    rows = _all_rows(killed)
    assert [row for row in rows if row.get("kept")] == before
    assert [row["step"] for row in rows if not row.get("kept") and row["kind"] == "train"] == (
        list(range(killed_at + 1, 15)))

    reference = tmp_path / "reference"
    train(_config(shards, reference, steps=14, checkpoint_every=3, seed=1))
    got, want = _rows(killed, "train"), _rows(reference, "train")
    assert [row["step"] for row in got] == list(range(1, 15))
    assert [row["loss"] for row in got] == pytest.approx([row["loss"] for row in want], rel=1e-4)
    assert [row["val_miou"] for row in _rows(killed, "eval")] == pytest.approx(
        [row["val_miou"] for row in _rows(reference, "eval")], rel=1e-4, abs=1e-6)
