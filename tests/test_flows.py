"""The Prefect flows with the real parts: a real Prefect server, local Ray, real training.

Flows run in this process against the session's Prefect server (``prefect_server``), except
the resume test, whose first training run is a subprocess killed with SIGKILL.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from prefect_fixtures import REPO_ROOT, run_artifacts

from embseg.checkpoint import load_checkpoint
from embseg.errors import EmbsegError
from embseg.synth import generate_synthetic
from embseg.train import TrainConfig
from flows import promotion
from flows.pipeline import _data_sources, majority_class_baseline
from flows.rebuild import dataset_rebuild
from flows.retrain import retrain
from flows.train import (
    PrefectTrainProgress,
    flow_train_config,
    train_config_fields,
    train_flow,
)

pytestmark = pytest.mark.slow

SHARD_SIZE = 8
TINY_TRAIN = {"batch_size": 2, "crop_size": 48, "num_workers": 0, "eval_batch_size": 2}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("flows") / "synth", images=16,
                              val_images=6, lvis_classes=8, seed=3, size=64)


def _splits(synth) -> list[dict]:
    return [{"split": "train", "lvis": str(synth.lvis_train), "coco_stuff": [str(synth.stuff_train)]},
            {"split": "val", "lvis": str(synth.lvis_val), "coco_stuff": [str(synth.stuff_val)]}]


def _rebuild(synth, out: Path, **extra):
    state = dataset_rebuild(splits=_splits(synth), images=synth.images_root, out=out,
                            shard_size=SHARD_SIZE, return_state=True, **extra)
    return state.result(), state.state_details.flow_run_id


def _tar_files(out: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(out.glob("*/*-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))}


@pytest.fixture(scope="module")
def built(synth, prefect_server, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("flows") / "shards"
    _rebuild(synth, out)
    return out


# --------------------------------------------------------------------------- dataset-rebuild


def test_rebuild_skips_when_unchanged_and_rebuilds_what_changed(synth, prefect_server, ray_local,
                                                                 tmp_path):
    out = tmp_path / "shards"
    first, _ = _rebuild(synth, out)
    assert {s: r["status"] for s, r in first.items()} == {"train": "rebuilt", "val": "rebuilt"}
    before = _tar_files(out)
    assert before and all(name.split("/")[0] in ("train", "val") for name in before)

    second, run_id = _rebuild(synth, out)
    assert {s: r["status"] for s, r in second.items()} == {"train": "up to date",
                                                           "val": "up to date"}
    assert _tar_files(out) == before  # same bytes, not even rewritten (same mtimes)
    artifacts = run_artifacts(run_id)
    assert "up to date" in artifacts["dataset-train"] and "up to date" in artifacts["dataset-val"]

    # A changed input (an image's modification time) rebuilds that split only.
    val_image = next((synth.images_root / "val2017").glob("*.jpg"))
    stat = val_image.stat()
    os.utime(val_image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third, _ = _rebuild(synth, out)
    assert {s: r["status"] for s, r in third.items()} == {"train": "up to date", "val": "rebuilt"}
    assert {k: v for k, v in _tar_files(out).items() if k.startswith("train/")} == \
        {k: v for k, v in before.items() if k.startswith("train/")}

    forced, _ = _rebuild(synth, out, force=True)
    assert {s: r["status"] for s, r in forced.items()} == {"train": "rebuilt", "val": "rebuilt"}


def _pixels_from_shards(split_dir: Path) -> dict[int, int]:
    """Class pixel counts decoded from the label maps inside the tars (not the manifest)."""
    counts: dict[int, int] = {}
    for shard in sorted(split_dir.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9].tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".seg.png"):
                    label = np.array(Image.open(io.BytesIO(tar.extractfile(member).read())))
                    ids, n = np.unique(label, return_counts=True)
                    for class_id, count in zip(ids.tolist(), n.tolist(), strict=True):
                        counts[class_id] = counts.get(class_id, 0) + count
    return counts


def test_rebuild_report_counts_and_class_frequencies(synth, built, prefect_server, ray_local):
    result, run_id = _rebuild(synth, built)
    train = result["train"]
    statuses = pq.read_table(built / "train" / "manifest.parquet").column("status").to_pylist()
    assert (train["n_images"], train["n_ok"], train["n_skipped"], train["n_failed"]) == \
        (len(statuses), statuses.count("ok"), statuses.count("skipped"), statuses.count("failed"))
    assert train["n_images"] == 16
    assert [s["name"] for s in train["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert [s["bytes"] for s in train["shards"]] == \
        [(built / "train" / s["name"]).stat().st_size for s in train["shards"]]
    pixels = _pixels_from_shards(built / "train")
    ranked = sorted((c for c in pixels if c > 0), key=lambda c: (-pixels[c], c))
    assert [c["id"] for c in train["head_classes"]] == ranked[:len(train["head_classes"])]
    assert [c["pixels"] for c in train["head_classes"]] == \
        [pixels[c] for c in ranked[:len(train["head_classes"])]]
    assert [c["id"] for c in train["tail_classes"]] == ranked[::-1][:len(train["tail_classes"])]
    markdown = run_artifacts(run_id)["dataset-train"]
    head = train["head_classes"][0]
    assert f"| {head['name']} | {head['id']} | {head['pixels']} |" in markdown
    assert "| 16 | 16 | 0 | 0 |" in markdown


def test_rebuild_rejects_splits_with_different_vocabularies(synth, prefect_server, ray_local,
                                                            tmp_path):
    other = generate_synthetic(tmp_path / "other", images=2, val_images=1, lvis_classes=5, seed=9,
                               size=32)
    splits = _splits(synth)
    splits[1]["lvis"] = str(other.lvis_val)
    with pytest.raises(EmbsegError, match="different vocabulary"):
        dataset_rebuild(splits=splits, images=synth.images_root, out=tmp_path / "shards")


# --------------------------------------------------------------------------- promotion


@pytest.mark.parametrize(("new", "current", "expected"), [
    (0.30, None, True), (0.31, 0.30, True), (0.30, 0.30, True), (0.29, 0.30, False),
    (float("nan"), 0.30, False), (float("nan"), None, False), (0.10, float("nan"), True),
])
def test_promotion_rule(new, current, expected):
    promoted, reason = promotion.should_promote(new, current)
    assert promoted is expected and reason


def test_promotion_keeps_every_model_and_swaps_the_pointer(tmp_path):
    models = tmp_path / "models"
    checkpoints = {}
    for name in "abcde":
        checkpoints[name] = tmp_path / "runs" / name / "best.pt"
        checkpoints[name].parent.mkdir(parents=True)
        checkpoints[name].write_bytes(f"model {name}".encode() * 100)
    assert promotion.read_current(models) is None
    steps = [("a", 0.30), ("b", 0.35), ("c", 0.20), ("d", 0.35), ("e", float("nan"))]
    decisions = []
    for name, score in steps:
        current = promotion.read_current(models)
        decisions.append(promotion.promote_if_better(
            models, checkpoints[name], new_miou=score,
            current_miou=current.miou if current else None, metadata={"run": name}))
    assert [d.promoted for d in decisions] == [True, True, False, True, False]
    assert [d.current.version for d in decisions] == [1, 2, 2, 3, 3]
    assert promotion.stored_versions(models) == [1, 2, 3]
    for version, name in ((1, "a"), (2, "b"), (3, "d")):
        assert (models / f"v{version:04d}.pt").read_bytes() == checkpoints[name].read_bytes()
        assert json.loads((models / f"v{version:04d}.json").read_text())["run"] == name
    current = promotion.read_current(models)
    assert (current.version, current.miou, current.checkpoint.name) == (3, 0.35, "v0003.pt")
    assert os.readlink(models / "current.pt") == "v0003.pt"
    log = [json.loads(line) for line in (models / "decisions.jsonl").read_text().splitlines()]
    assert [row["promoted"] for row in log] == [True, True, False, True, False]
    assert log[2]["new_miou"] == 0.20 and log[2]["current_miou"] == 0.35
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # no temporary left


def test_promotion_never_overwrites_a_version_taken_concurrently(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "v0001.pt").write_bytes(b"promoted by another retrain run")
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"new model")
    # The other run linked v0001 after this one listed the folder: the link must move on.
    monkeypatch.setattr(promotion, "stored_versions", lambda _: [])
    current = promotion.promote(models, checkpoint, miou=0.5)
    assert current.version == 2
    assert (models / "v0001.pt").read_bytes() == b"promoted by another retrain run"
    assert (models / "v0002.pt").read_bytes() == b"new model"


def test_unreadable_pointer_is_an_error_not_a_fresh_start(tmp_path):
    (tmp_path / "current.json").write_text("{not json")
    with pytest.raises(EmbsegError, match="current.json"):
        promotion.read_current(tmp_path)
    (tmp_path / "current.json").write_text(json.dumps({"version": 4, "checkpoint": "v0004.pt",
                                                       "miou": 0.3}))
    with pytest.raises(EmbsegError, match="v0004.pt is missing"):
        promotion.read_current(tmp_path)


# --------------------------------------------------------------------------- retrain


def test_retrain_promotes_the_first_model_then_applies_the_rule(synth, prefect_server, ray_local,
                                                               tmp_path):
    params = dict(splits=_splits(synth), images=synth.images_root, shards=tmp_path / "shards",
                  runs=tmp_path / "runs", models=tmp_path / "models", shard_size=SHARD_SIZE,
                  steps=3, batch_size=2, crop_size=48, lr=0.02,
                  train_options={**TINY_TRAIN, "checkpoint_every": 3})
    first = retrain(**params, fine_tune=True)
    assert first["promoted"] and first["current_version"] == 1
    assert first["current_miou"] is None and not math.isnan(first["new_miou"])
    assert "trained from scratch" in " ".join(first["notes"])
    v1 = (tmp_path / "models" / "v0001.pt").read_bytes()

    state = retrain(**params, fine_tune=True, return_state=True)
    second = state.result()
    # The current model is re-scored on the same val shards: exactly its first score.
    assert second["current_miou"] == pytest.approx(first["new_miou"], abs=1e-12)
    assert second["promoted"] == (second["new_miou"] >= second["current_miou"])
    assert second["current_version"] == (2 if second["promoted"] else 1)
    assert (tmp_path / "models" / "v0001.pt").read_bytes() == v1
    log = [json.loads(line) for line in
           (tmp_path / "models" / "decisions.jsonl").read_text().splitlines()]
    assert log[-1]["fine_tuned_from"].endswith("v0001.pt")
    payload = load_checkpoint(Path(second["new_checkpoint"]), map_location="cpu")
    assert payload["train_config"]["init_checkpoint"].endswith("v0001.pt")

    artifacts = run_artifacts(state.state_details.flow_run_id)
    decision = artifacts["retrain-decision"]
    assert ("PROMOTED" if second["promoted"] else "KEPT the current model") in decision
    assert f"{100 * second['new_miou']:.2f}" in decision
    assert f"{100 * second['current_miou']:.2f}" in decision
    assert "up to date" in decision  # the data had not changed: no rebuild
    for key in ("evaluation-new-model", "evaluation-current-model"):
        for part in ("mIoU", "| rare |", "| common |", "| frequent |", "| stuff |",
                     "best classes", "worst classes"):
            assert part in artifacts[key]
    assert "train-report" in artifacts and "dataset-train" in artifacts


# --------------------------------------------------------------------------- train


def test_train_flow_parameters_are_the_train_config_fields():
    params = inspect.signature(train_flow.fn).parameters
    assert list(params) == [*train_config_fields(), "config"]
    # every setting defaults to None: the recipe's value, else the trainer's default
    required = {name for name, p in params.items() if p.default is inspect.Parameter.empty}
    assert required == {"shards", "out"}
    assert all(p.default is None for name, p in params.items() if name not in required)
    resolved = flow_train_config({"shards": Path("s"), "out": Path("o")})
    defaults = TrainConfig(shards=Path("s"), out=Path("o"))
    differing = {f.name for f in dataclasses.fields(TrainConfig)
                 if getattr(resolved, f.name) != getattr(defaults, f.name)}
    assert differing == {"no_progress"}  # no progress bars in Prefect's logs


def test_repeat_factors_of_built_shards_come_from_their_samples_class_lists(built):
    """The manifest's class lists (what repeat-factor sampling plans from) are the classes of
    the label maps the build wrote: factors from the shards' own sample metadata agree."""
    from embseg.data import list_shards, read_shard
    from embseg.sampling import class_image_fractions, repeat_factors

    samples = {item["__key__"]: json.loads(item["json"])["classes"]
               for shard in list_shards(built / "train") for item in read_shard(shard)}
    fractions = class_image_fractions(list(samples.values()))
    want = {key: max([max(1.0, math.sqrt(0.3 / fractions[c])) for c in classes], default=1.0)
            for key, classes in samples.items()}
    got = repeat_factors(built / "train" / "manifest.parquet", 0.3)
    assert got.keys() == want.keys() and max(got.values()) > 1
    assert [got[k] for k in want] == pytest.approx([want[k] for k in want])


def test_train_flow_takes_a_recipe_file(built, prefect_server, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps: 2\nk: 3\nembed_dim: 16\nbatch_size: 4\n")
    state = train_flow(shards=built / "train", out=tmp_path / "run", config=recipe,
                       batch_size=2, return_state=True, **{
                           k: v for k, v in TINY_TRAIN.items() if k != "batch_size"})
    summary = state.result()
    assert summary["step"] == 2 and summary["recipe"] == str(recipe)
    stored = load_checkpoint(Path(summary["last_checkpoint"]), map_location="cpu")
    # from the recipe: steps, k, embed_dim; the parameter given wins over it: batch_size
    assert {name: stored["train_config"][name] for name in
            ("steps", "k", "embed_dim", "batch_size")} == {
        "steps": 2, "k": 3, "embed_dim": 16, "batch_size": 2}
    assert f"recipe: `{recipe}`" in run_artifacts(state.state_details.flow_run_id)[
        "train-report"]


def _train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == "train"]


def test_train_flow_resumes_after_the_stage_was_killed(built, prefect_server, tmp_path):
    """SIGKILL the training flow once ``last.pt`` exists; the next run continues from it."""
    run = tmp_path / "run"
    settings = dict(shards=str(built / "train"), out=str(run), steps=40, checkpoint_every=2,
                    seed=0, **{**TINY_TRAIN, "num_workers": 1})
    code = f"from flows.train import train_flow\ntrain_flow(**{settings!r})\n"
    log_path = tmp_path / "killed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT,
                                env=prefect_server.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "last.pt").exists():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = load_checkpoint(run / "last.pt", map_location="cpu")["step"]
    assert 0 < killed_at < 40
    # the killed run had shown its progress in the UI while it ran
    (shown,) = _artifacts(key="train-progress", description_like=f"train `{run}`: step %")
    assert 0.0 <= float(shown.data) < 100.0
    assert int(shown.description.split(": step ")[1].split("/")[0]) < 40
    rows_before = [row for row in _train_rows(run) if row["step"] <= killed_at]
    assert [row["step"] for row in rows_before] == list(range(1, killed_at + 1))

    # DataLoader workers (num_workers=1) are forked inside the Prefect task here too.
    state = train_flow(**settings, return_state=True)
    result = state.result()
    assert result["step"] == 40
    rows = _train_rows(run)
    assert [row["step"] for row in rows] == list(range(1, 41))
    # The rows up to the checkpoint are the killed run's own (not recomputed from step 0).
    assert rows[:killed_at] == rows_before
    artifacts = run_artifacts(state.state_details.flow_run_id)
    assert float(artifacts["train-progress"]) == 100.0
    assert f"[curves.png]({(run / 'curves.png').resolve().as_uri()})" in artifacts["train-report"]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def _artifacts(*, key: str, description_like: str | None = None, flow_run_id=None) -> list:
    """Artifacts with ``key`` on the session's server (newest first), optionally filtered."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )
    from prefect.client.schemas.sorting import ArtifactSort

    found = ArtifactFilter(key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(
        any_=[flow_run_id]) if flow_run_id else None)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=found, sort=ArtifactSort.CREATED_DESC)
    if description_like is None:
        return artifacts
    import fnmatch

    return [a for a in artifacts
            if fnmatch.fnmatchcase(a.description or "", description_like.replace("%", "*"))]


def test_train_progress_artifacts_follow_the_run(prefect_server, tmp_path):
    """The flow's progress hook on the real server: the progress artifact is updated in place
    (steps done, last loss and val mIoU), throttled between evaluations; the last figures get
    a new train-figures version at each evaluation and at the end."""
    from prefect import flow

    from embseg.train import TrainProgress

    events = [("start", 0, None, None), ("step", 1, 2.5, None), ("step", 2, 2.0, None),
              ("eval", 2, 2.0, 0.1), ("step", 3, 1.5, 0.1), ("step", 4, 1.25, 0.1),
              ("eval", 4, 1.25, 0.2), ("end", 4, 1.25, 0.2)]

    @flow(name="progress-probe")
    def probe(interval_s: float) -> list[tuple[float, str]]:
        hook, seen = PrefectTrainProgress(interval_s=interval_s), []
        for event, step, loss, miou in events:
            best = None if miou is None else max(m for *_, m in events[:events.index(
                (event, step, loss, miou)) + 1] if m is not None)
            hook(TrainProgress(event=event, step=step, steps=4, loss=loss, val_miou=miou,
                               best_val_miou=best, run_dir=tmp_path / "run"))
            (artifact,) = [a for a in _artifacts(key="train-progress")
                           if a.id == hook.artifact_id]
            seen.append((float(artifact.data), artifact.description))
        return seen

    state = probe(interval_s=0.0, return_state=True)
    seen = state.result()
    assert [data for data, _ in seen] == [0.0, 25.0, 50.0, 50.0, 75.0, 100.0, 100.0, 100.0]
    assert seen[1][1] == f"train `{tmp_path / 'run'}`: step 1/4 (25%): loss 2.5000, " \
                         f"val mIoU n/a (best n/a)"
    assert seen[-1][1].endswith("step 4/4 (100%): loss 1.2500, val mIoU 20.00% (best 20.00%)")
    figures = _artifacts(key="train-figures", flow_run_id=state.state_details.flow_run_id)
    assert len(figures) == 3  # two evaluations and the end
    assert "finished" in figures[0].data and "| best val mIoU (%) | 20.0000 |" in figures[0].data
    assert "running" in figures[-1].data and "| last val mIoU (%) | 10.0000 |" in figures[-1].data

    # a long interval: between evaluations the artifact is left alone (one API call per
    # few seconds, not per step), evaluations and the end still update it at once
    throttled = probe(interval_s=3600.0)
    assert [data for data, _ in throttled] == [0.0, 0.0, 0.0, 50.0, 50.0, 50.0, 100.0, 100.0]


def _weights(checkpoint: Path) -> dict:
    state = load_checkpoint(checkpoint, map_location="cpu")["model"]
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


def test_train_flow_fine_tunes_from_init_checkpoint(built, prefect_server, tmp_path):
    common = dict(shards=built / "train", checkpoint_every=1, seed=0, **TINY_TRAIN)
    base = train_flow(out=tmp_path / "base", steps=2, lr=0.05, **common)
    start = _weights(Path(base["last_checkpoint"]))
    # A learning rate of ~0 keeps the weights where they started: at the init checkpoint's.
    tuned = train_flow(out=tmp_path / "tuned", steps=1, lr=1e-12, seed=7,
                       init_checkpoint=Path(base["last_checkpoint"]),
                       **{k: v for k, v in common.items() if k != "seed"})
    after = _weights(Path(tuned["last_checkpoint"]))
    assert all(np.allclose(after[k].numpy(), start[k].numpy(), atol=1e-6) for k in start)
    scratch = train_flow(out=tmp_path / "scratch", steps=1, lr=1e-12, seed=7,
                         **{k: v for k, v in common.items() if k != "seed"})
    fresh = _weights(Path(scratch["last_checkpoint"]))
    assert not all(np.allclose(fresh[k].numpy(), start[k].numpy(), atol=1e-6) for k in start)
    with pytest.raises(EmbsegError, match="model settings"):
        train_flow(out=tmp_path / "other", steps=1, embed_dim=16,
                   init_checkpoint=Path(base["last_checkpoint"]), **common)


# --------------------------------------------------------------------------- pipeline, yaml


def test_pipeline_wants_all_real_data_paths_or_none(tmp_path):
    assert _data_sources(lvis_train=None, coco_stuff_train=None, lvis_val=None,
                         coco_stuff_val=None, images=None) is None
    with pytest.raises(EmbsegError, match="lvis_train, lvis_val and images"):
        _data_sources(lvis_train=tmp_path / "a.json", coco_stuff_train=None, lvis_val=None,
                      coco_stuff_val=None, images=None)
    splits, images = _data_sources(lvis_train=tmp_path / "t.json", coco_stuff_train=[],
                                   lvis_val=tmp_path / "v.json", coco_stuff_val=None,
                                   images=tmp_path)
    assert [s.split for s in splits] == ["train", "val"] and images == tmp_path


def test_majority_class_baseline(tmp_path):
    import pyarrow as pa

    table = tmp_path / "per_class.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "target_pixels": [0, 10, 30, 60]}), table)
    baseline = majority_class_baseline(table)
    # Class 4 predicted everywhere: IoU 60/100; classes 2 and 3 score 0; class 1 is absent.
    assert baseline["pixel_accuracy"] == pytest.approx(0.6)
    assert baseline["miou"] == pytest.approx(0.6 / 3)


def test_prefect_yaml_declares_one_deployment_per_flow():
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    deployments = {d["entrypoint"]: d for d in config["deployments"]}
    flow_names = {}
    for entrypoint, deployment in deployments.items():
        path, function = entrypoint.split(":")
        assert path.startswith("flows/") and (REPO_ROOT / path).is_file()
        module = __import__(path[:-3].replace("/", "."), fromlist=[function])
        flow_names[getattr(module, function).name] = deployment
        assert deployment["work_pool"]["name"] == "embseg-process"
    assert set(flow_names) == {"dataset-rebuild", "train", "evaluate", "retrain", "pipeline"}
    assert flow_names["pipeline"]["name"] == "demo"
    assert flow_names["pipeline"]["parameters"] == {}  # the flow's defaults are the demo
    schedules = flow_names["retrain"]["schedules"]
    assert len(schedules) == 1 and len(schedules[0]["cron"].split()) == 5
    pull = config["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == "{{ $PWD }}"
