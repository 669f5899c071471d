"""``embseg study``: the memory-matched search, the data settings, and the command end to end
on a tiny ladder (schema, table, plot, a run cut short). No timing is asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embseg import study

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--quick", "--classes", "102", "--ess-only-classes", "103", "--rfs-classes", "102",
        "--steps", "2", "--batch-size", "2", "--crop-size", "40", "--images", "8",
        "--val-images", "4", "--image-size", "32", "--num-workers", "0"]
"""102 = 16 LVIS-like + 86 stuff classes, the smallest ladder the synthetic data allows."""


# --------------------------------------------------------------------------- pure parts


def test_lvis_like_categories_have_lvis_proportions():
    def counts(n):
        cats = study.lvis_like_categories(n)
        assert [c["id"] for c in cats] == list(range(1, n + 1))
        return {g: sum(c["frequency"] == g for c in cats) for g in "fcr"}

    assert counts(1203) == {"f": 405, "c": 461, "r": 337}  # LVIS v1 itself
    # 64 x (405, 461, 337) / 1203 = 21.55, 24.53, 17.93: floors 21, 24, 17 (62), the two
    # largest remainders (r .93, f .55) get the two left
    assert counts(64) == {"f": 22, "c": 24, "r": 18}
    assert counts(3) == {"f": 1, "c": 1, "r": 1}


def test_class_counts_below_the_synthetic_minimum_are_refused():
    study.check_classes(102)
    with pytest.raises(study.EmbsegError, match="at least 16 LVIS-like"):
        study.check_classes(101)


def test_candidate_crops():
    assert study.candidate_crops(64) == [64, 56, 48, 40, 32]
    assert study.candidate_crops(60) == [60, 56, 48, 40, 32]
    assert study.candidate_crops(40) == [40, 32]
    assert study.candidate_crops(128, min_crop=32) == list(range(128, 63, -8))


def _brute_force(measure, budget, max_batch, crops):
    """The best (batch, crop) by trying every one: most pixels, then the larger crop."""
    best = None
    for crop in crops:
        for batch in range(1, max_batch + 1):
            peak = measure(batch, crop)
            if peak is not None and peak <= budget:
                key = (batch * crop * crop, crop)
                if best is None or key > best[0]:
                    best = (key, batch, crop)
    return (best[1], best[2]) if best else (None, None)


@pytest.mark.parametrize("budget", [50, 99, 100, 130, 260, 400, 1000, 10_000])
def test_memory_matched_setting_against_brute_force(budget):
    crops = [64, 56, 48, 40, 32]
    calls = []

    def peak(batch, crop):  # a fixed cost, per-pixel activations, per-crop buffers
        if batch * crop * crop > 20_000:
            return None  # out of memory
        return 40 + batch * crop * crop // 100 + crop // 2

    def measure(batch, crop):
        calls.append((batch, crop))
        return peak(batch, crop)

    found = study.memory_matched_setting(measure, budget, max_batch=8, crops=crops)
    assert (found.batch, found.crop) == _brute_force(peak, budget, 8, crops)
    if found.batch is not None:
        assert found.peak_bytes == peak(found.batch, found.crop) <= budget
    assert len(set(calls)) == len(calls)  # each setting measured once
    assert [(p.batch, p.crop) for p in found.probes] == calls
    assert all(p.fits == (p.peak_bytes is not None and p.peak_bytes <= budget)
               for p in found.probes)
    assert len(calls) < 8 * len(crops)  # not a full sweep


def test_memory_matched_setting_prefers_the_larger_crop_on_a_tie():
    def measure(batch, crop):
        return batch * crop * crop
    # 4 x 32^2 = 1 x 64^2 pixels: both fit a budget of 4096, the 64 px crop wins
    found = study.memory_matched_setting(measure, 4096, max_batch=4, crops=[32, 64])
    assert (found.batch, found.crop) == (1, 64)


def test_scaled_repeat_threshold(tmp_path):
    counts = [90, 40, 30, 12, 5, 1]
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps({"images": [{"id": i} for i in range(200)],
                                "categories": [{"id": i, "image_count": n}
                                               for i, n in enumerate(counts[::-1])]}))
    # the 3rd most frequent class is in 30 of 200 images
    assert study.scaled_repeat_threshold(path, 3) == pytest.approx(30 / 200)
    assert study.scaled_repeat_threshold(path, 1) == pytest.approx(90 / 200)


def test_goals_use_means_and_the_seed_spread():
    plan = study.StudyPlan(device="cpu", quick=True,
                           sizes=study.QUICK, options=study.train_options())

    def run(head, classes, comparison, seed, miou):
        return {"head": head, "classes": classes, "comparison": comparison, "seed": seed,
                "val_miou": miou, "repeat_threshold": None}

    runs = [run("ess", 1289, "equal_memory", 0, 0.030), run("ess", 1289, "equal_memory", 1, 0.034),
            run("softmax", 1289, "equal_memory", 0, 0.020),
            run("softmax", 1289, "equal_memory", 1, 0.028),
            run("ess", 150, "equal_steps", 0, 0.19), run("ess", 150, "equal_steps", 1, 0.20),
            run("softmax", 150, "equal_steps", 0, 0.20), run("softmax", 150, "equal_steps", 1, 0.20)]
    large, small = study.goals(runs, plan)
    # means 0.032 vs 0.024: +0.008 against the larger spread, softmax's 0.008: not more
    assert large.value == pytest.approx(0.008) and not large.passed
    assert "C=1289" in large.name
    assert small.value == pytest.approx(0.195 / 0.20) and small.passed
    runs[3]["val_miou"] = 0.026  # spread 0.006 < 0.009
    assert study.goals(runs, plan)[0].passed
    # softmax at 0 at the small count (too few steps to learn): the goal is still computed
    for r in runs[6:]:
        r["val_miou"] = 0.0
    small = study.goals(runs, plan)[1]
    assert small.passed and small.value == pytest.approx(0.195 / study.RATIO_FLOOR)
    for r in runs[4:6]:
        r["val_miou"] = 0.0
    small = study.goals(runs, plan)[1]
    assert small.passed and small.value == 1.0
    runs[6]["val_miou"] = 0.01  # softmax learnt something, ESS nothing
    small = study.goals(runs, plan)[1]
    assert not small.passed and small.value == 0.0


def test_overrides_and_unknown_settings():
    options = study.train_options(study._overrides(["k=25", "temperature=10.5", "embed_bn=false"]))
    assert (options["k"], options["temperature"], options["embed_bn"]) == (25, 10.5, False)
    assert options["lr"] == study.FROM_SCRATCH_OPTIONS["lr"]
    with pytest.raises(study.EmbsegError, match="--set nope"):
        study.train_options({"nope": 1})


# --------------------------------------------------------------------------- end to end


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


RUN_FIELDS = {"head": str, "classes": int, "comparison": str, "seed": int, "val_miou": float,
              "group_miou": dict, "pixel_accuracy": float, "peak_bytes": int,
              "batch_size": int, "crop_size": int, "steps": int, "seconds": float,
              "repeat_threshold": (float, type(None))}


def _check_run(run):
    assert set(run) == set(RUN_FIELDS)
    for name, kind in RUN_FIELDS.items():
        value = run[name]
        if kind is float:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), name
        else:
            assert isinstance(value, kind), name
    assert run["head"] in ("ess", "softmax")
    assert run["comparison"] in ("equal_steps", "equal_memory")
    assert 0.0 <= run["val_miou"] <= 1.0 and 0.0 <= run["pixel_accuracy"] <= 1.0
    assert set(run["group_miou"]) == {"rare", "common", "frequent", "stuff"}
    for value in run["group_miou"].values():
        assert value is None or (isinstance(value, float) and 0.0 <= value <= 1.0)
    assert run["peak_bytes"] > 0 and run["seconds"] > 0


@pytest.fixture(scope="module")
def work(tmp_path_factory, ray_local):
    """A work folder whose synthetic data the study commands find cached (built here, on the
    session's Ray, with the settings of TINY)."""
    folder = tmp_path_factory.mktemp("study-work")
    specs = [study.DataSpec(classes=c, images=8, val_images=4, image_size=32, seed=0)
             for c in (102, 103)]
    study.prepare_data(specs, folder / "data", print)
    return folder


def test_a_study_cut_short_keeps_its_first_run(tmp_path, work):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "embseg", "study", *TINY, "--seeds", "1",
                             "--out", str(out), "--work", str(work)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    runs = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "study.json").exists():
                runs = json.loads((out / "study.json").read_text())["runs"]
                if runs:
                    break
            time.sleep(0.2)
        assert runs, proc.stdout.read() if proc.poll() is not None else "no run in time"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    saved = json.loads((out / "study.json").read_text())
    assert not saved["complete"], output
    assert saved["runs"][:len(runs)] == runs, output
    first = saved["runs"][0]
    assert (first["head"], first["classes"], first["seed"]) == ("ess", 102, 0)
    _check_run(first)
    table = (out / "study.md").read_text()
    assert "Incomplete" in table and "| 102 | equal_steps | ess |" in table
    assert (out / "study.png").read_bytes().startswith(b"\x89PNG")


def test_study_end_to_end_on_a_tiny_ladder(tmp_path, work, capsys):
    from embseg.cli import main

    out = tmp_path / "out"
    code = main(["study", *TINY, "--seeds", "1", "--out", str(out), "--work", str(work)])
    printed = capsys.readouterr().out
    assert code in (0, 1)  # a tiny study may miss its goals; it must not fail otherwise
    result = json.loads((out / "study.json").read_text())
    assert set(result) >= {"device", "runs", "goals"}
    assert isinstance(result["device"], str) and result["device"].startswith("cpu")
    assert result["complete"] and not result["failed"]
    for run in result["runs"]:
        _check_run(run)
    keys = sorted((r["head"], r["classes"], r["comparison"], r["repeat_threshold"] is not None)
                  for r in result["runs"])
    assert keys == sorted([
        ("ess", 102, "equal_steps", False), ("ess", 102, "equal_memory", False),
        ("softmax", 102, "equal_steps", False), ("softmax", 102, "equal_memory", False),
        ("ess", 102, "equal_steps", True),
        ("ess", 103, "equal_steps", False), ("ess", 103, "equal_memory", False)])
    # equal memory: softmax's setting is the search's, its peak within ESS's
    search = {s["classes"]: s for s in result["memory_search"]}[102]
    soft = [r for r in result["runs"] if r["head"] == "softmax"
            and r["comparison"] == "equal_memory"][0]
    ess = [r for r in result["runs"] if r["head"] == "ess" and r["classes"] == 102
           and r["repeat_threshold"] is None][0]
    assert (soft["batch_size"], soft["crop_size"]) == (search["softmax_batch_size"],
                                                      search["softmax_crop_size"])
    assert soft["peak_bytes"] == search["softmax_peak_bytes"] <= search["ess_peak_bytes"]
    assert ess["peak_bytes"] == search["ess_peak_bytes"]
    assert soft["batch_size"] <= 2 and soft["crop_size"] in (40, 32)
    rfs = [r for r in result["runs"] if r["repeat_threshold"] is not None][0]
    assert rfs["repeat_threshold"] == pytest.approx(result["repeat_thresholds"]["102"])
    assert 0 < rfs["repeat_threshold"] <= 1
    # goals: both computed, stored and printed
    assert [set(g) for g in result["goals"]] == [{"name", "passed", "value"}] * 2
    for goal in result["goals"]:
        assert isinstance(goal["passed"], bool) and isinstance(goal["value"], float)
        assert f"{'PASS' if goal['passed'] else 'FAIL'}: {goal['name']}" in printed
    table = (out / "study.md").read_text()
    assert "Complete" in table
    for row in ("| 102 | equal_steps | ess | - | 1 |", "| 102 | equal_memory | softmax | - | 1 |",
                "| 103 | equal_memory | ess | - | 1 |"):
        assert row in table
    assert (out / "study.png").read_bytes().startswith(b"\x89PNG")


def test_a_failing_job_is_a_job_error_whether_forked_or_fresh(tmp_path):
    job = {"kind": "train", "name": "broken"}  # no options: the job's first line fails
    with study.job_server() as server:
        for runner in (server, None):
            with pytest.raises(study.JobError, match=r"study train broken: KeyError: 'options'"):
                study.run_job(job, tmp_path, runner)
    assert not list(tmp_path.iterdir())  # no result file left behind
