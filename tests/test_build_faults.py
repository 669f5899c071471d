"""Crash safety of the build (issue 6): SIGKILL mid-run, damaged shards, stale partial files."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from embseg.build import build_shards
from embseg.synth import generate_synthetic

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="process checks read /proc")

N_IMAGES, SHARD_SIZE = 40, 4
N_SHARDS = N_IMAGES // SHARD_SIZE
SHARD_NAME = re.compile(r"train-\d{6}\.tar")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("faults") / "synth", images=N_IMAGES,
                              val_images=1, lvis_classes=20, seed=2, size=160)


def _kwargs(synth, out: Path) -> dict:
    return dict(lvis=synth.lvis_train, coco_stuff=[synth.stuff_train], images=synth.images_root,
                out=out, shard_size=SHARD_SIZE, progress=False)


@pytest.fixture(scope="module")
def clean(synth, ray_local, tmp_path_factory):
    """An uninterrupted build: the reference bytes."""
    out = tmp_path_factory.mktemp("faults") / "clean"
    report = build_shards(**_kwargs(synth, out))
    assert len(report.shards) == N_SHARDS
    return out, {p.name: p.read_bytes() for p in report.shards}


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if SHARD_NAME.fullmatch(p.name)}


def _manifest_rows(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


# ------------------------------------------------------------------ processes, from /proc


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None if it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    if fields[0] == b"Z":
        return None
    return int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root``."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            table[int(entry)] = stat
    found, stack = {}, [root]
    while stack:
        parent = stack.pop()
        for pid, (ppid, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                stack.append(pid)
    return found


def _alive(processes: dict[int, int]) -> list[int]:
    return [pid for pid, start in processes.items()
            if (stat := _proc_stat(pid)) is not None and stat[1] == start]


def _ray_heads_of_session(driver_pid: int) -> list[str]:
    """Command lines of raylet / gcs_server processes whose session dir ends in the driver pid."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if ("raylet" in cmdline or "gcs_server" in cmdline) and f"_{driver_pid}/" in cmdline:
            found.append(cmdline[:200])
    return found


# ------------------------------------------------------------------ the killed build


def _start_build(synth, out: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    argv = [sys.executable, "-m", "embseg", "build", "--lvis", str(synth.lvis_train),
            "--coco-stuff", str(synth.stuff_train), "--images", str(synth.images_root),
            "--out", str(out), "--shard-size", str(SHARD_SIZE), "--workers", "1",
            "--no-progress"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(process: subprocess.Popen, out: Path, clean_shards: dict[str, bytes],
               ready) -> tuple[set[str], dict[int, int]]:
    """Poll ``out``; SIGKILL the build once ``ready(seen)`` holds. Every final-named shard seen
    at any poll must already be complete: equal to the uninterrupted build's bytes."""
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"build exited (code {process.returncode}) before it could be killed")
        names = set(os.listdir(out)) if out.is_dir() else set()
        for name in sorted(n for n in names if SHARD_NAME.fullmatch(n)):
            try:
                data = (out / name).read_bytes()
            except FileNotFoundError:
                continue
            assert data == clean_shards[name], f"{name} visible under its final name but partial"
            seen.add(name)
        if ready(names, seen):
            processes = _descendants(process.pid)
            process.send_signal(signal.SIGKILL)
            process.wait()
            return seen, processes
        time.sleep(0.005)
    pytest.fail("build never reached the kill point")


def _assert_ray_gone(driver_pid: int, processes: dict[int, int]) -> None:
    """Everything the killed driver had started (Ray's processes, the reaper) ends soon."""
    assert processes, "the build had started no processes (no Ray?)"
    deadline = time.monotonic() + 20
    while _alive(processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _alive(processes)
    names = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] for pid in left]
    assert not left, f"processes of the killed build remain: {names}"
    assert not _ray_heads_of_session(driver_pid)


def _assert_resumed_identical(synth, out: Path, clean, *, min_reused: int):
    clean_out, clean_shards = clean
    report = build_shards(**_kwargs(synth, out))
    assert report.reused_shards >= min_reused
    assert report.n_images == N_IMAGES and report.n_failed == 0
    assert _shards(out) == clean_shards
    assert _manifest_rows(out) == _manifest_rows(clean_out)
    leftovers = [p.name for folder in (out, out / ".parts") for p in folder.iterdir()
                 if p.name.endswith(".partial")]
    assert not leftovers
    return report


def test_sigkill_after_first_shard_then_rerun(synth, clean, tmp_path):
    out = tmp_path / "killed"
    process = _start_build(synth, out)
    seen, processes = _kill_when(process, out, clean[1], lambda names, seen: bool(seen))
    assert 1 <= len(seen) < N_SHARDS, seen
    assert not (out / "manifest.parquet").exists()  # the killed run never finished
    _assert_ray_gone(process.pid, processes)
    _assert_resumed_identical(synth, out, clean, min_reused=1)


def test_sigkill_during_ray_start_up_then_rerun(synth, clean, tmp_path):
    """Killed after the build took its lock and while Ray starts: the reaper still cleans up."""
    out = tmp_path / "killed_early"
    process = _start_build(synth, out)
    first: list[float] = []

    def ready(names, seen):
        if ".train.lock" in names and not first:
            first.append(time.monotonic())
        return bool(first) and time.monotonic() - first[0] > 1.0 and not seen

    _, processes = _kill_when(process, out, clean[1], ready)
    _assert_ray_gone(process.pid, processes)
    _assert_resumed_identical(synth, out, clean, min_reused=0)


def test_damaged_shards_and_stale_partials_are_redone(synth, clean, tmp_path):
    clean_out, _ = clean
    out = tmp_path / "damaged"
    shutil.copytree(clean_out, out)
    flipped = bytearray((out / "train-000003.tar").read_bytes())
    flipped[2000] ^= 0xFF  # same size, other bytes
    (out / "train-000003.tar").write_bytes(bytes(flipped))
    truncated = out / "train-000005.tar"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    (out / "train-000007.tar").unlink()  # killed between its record and its rename
    (out / ".train-000008.tar.partial").write_bytes(b"half a shard")
    (out / ".parts" / ".train-000008.parquet.partial").write_bytes(b"half a record")
    (out / ".parts" / "train-000009.parquet").write_bytes(b"not parquet")
    # exactly the four damaged shards (3, 5, 7, 9) are redone; 8's stale partials are not damage
    resumed = _assert_resumed_identical(synth, out, clean, min_reused=N_SHARDS - 4)
    assert resumed.reused_shards == N_SHARDS - 4
    report = build_shards(**_kwargs(synth, out))
    assert report.reused_shards == N_SHARDS
