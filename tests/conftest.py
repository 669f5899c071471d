"""Shared fixtures: one local Ray instance and one small synthetic dataset per test session;
the Prefect server and worker (prefect_fixtures.py); the S3, GCS and HTTP servers
(object_store.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from object_store import (  # noqa: F401 - fixtures
    gcs_bucket,
    gcs_server,
    http_server,
    s3_bucket,
    s3_server,
    served,
)
from prefect_fixtures import prefect_server, prefect_worker  # noqa: F401 - session fixtures

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "vocab"


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray runtime (2 CPUs, no dashboard) shared by every test that needs one."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (the CI machine has two cores and runs other work)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_vocab() -> Path:
    """The real LVIS v1 / COCO-Stuff category lists beside the checkout (skip if absent)."""
    if not (SHARED_VOCAB / "lvis_v1_categories.json").exists():
        pytest.skip(f"real category lists not found at {SHARED_VOCAB}")
    return SHARED_VOCAB
