"""prefect.yaml end to end: a real server, the work pool, ``deploy --all``, a process worker and
``prefect deployment run pipeline/demo`` with a tiny configuration, watched to Completed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from uuid import UUID

import pytest
from prefect_fixtures import run_artifacts

pytestmark = pytest.mark.slow

FLOW_DEPLOYMENTS = {"dataset-rebuild/default", "train/default", "evaluate/default",
                    "retrain/weekly", "pipeline/demo"}


def _tiny_demo(root: Path) -> dict:
    """The demo's parameters scaled down to seconds, writing under ``root``."""
    return {
        "synthetic_dir": str(root / "data"), "shards": str(root / "shards"),
        "runs": str(root / "runs"), "synthetic_images": 12, "synthetic_val_images": 4,
        "synthetic_lvis_classes": 5, "synthetic_size": 64, "shard_size": 8, "workers": 1,
        "steps": 4, "batch_size": 2, "crop_size": 48, "predict_count": 2,
        "train_options": {"num_workers": 1, "checkpoint_every": 2, "eval_batch_size": 2},
    }


def test_deployments_are_registered_with_the_schedule(prefect_worker):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployments = client.read_deployments()
        flows = {flow.id: flow.name for flow in client.read_flows()}
    names = {f"{flows[d.flow_id]}/{d.name}": d for d in deployments}
    assert FLOW_DEPLOYMENTS <= set(names)
    assert all(names[name].work_pool_name == "embseg-process" for name in FLOW_DEPLOYMENTS)
    weekly = names["retrain/weekly"]
    assert [s.schedule.cron for s in weekly.schedules] == ["0 3 * * 1"]
    assert weekly.parameters["fine_tune"] is True
    assert names["pipeline/demo"].parameters == {}
    directory = names["pipeline/demo"].pull_steps[0][
        "prefect.deployments.steps.set_working_directory"]["directory"]
    assert Path(directory) == Path(__file__).resolve().parents[1]


def test_pipeline_demo_deployment_runs_to_completed(prefect_worker, tmp_path):
    server = prefect_worker.server
    result = server.cli("deployment", "run", "pipeline/demo", "--params",
                        json.dumps(_tiny_demo(tmp_path)), "--watch", "--watch-timeout", "420",
                        "--watch-interval", "2", timeout=480, check=False)
    output = result.stdout + result.stderr
    worker_log = prefect_worker.log_path.read_text(errors="replace")[-6000:]
    assert result.returncode == 0, f"{output}\n--- worker log ---\n{worker_log}"
    assert "Completed" in output
    run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", output).group(1))

    # Outputs where the parameters said, from a flow run in the repository root.
    for split in ("train", "val"):
        assert sorted(p.name for p in (tmp_path / "shards" / split).glob("*.tar"))
        assert (tmp_path / "shards" / split / "manifest.parquet").is_file()
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("pipeline-")
    assert (run_dir / "last.pt").is_file() and (run_dir / "metrics.jsonl").is_file()
    summary = json.loads((run_dir / "eval-val" / "summary.json").read_text())
    assert summary["n_images"] == 4 and summary["miou"] is not None
    assert len(list((run_dir / "predictions").glob("*_triptych.png"))) == 2
    assert (run_dir / "curves.png").exists()

    artifacts = run_artifacts(run_id)
    assert {"pipeline-summary", "dataset-train", "dataset-val", "train-progress",
            "train-figures", "train-report", "evaluation-report"} <= set(artifacts)
    assert str(run_dir / "predictions") in artifacts["pipeline-summary"]
    assert "| mIoU |" in artifacts["evaluation-report"]
    assert "| 12 | 12 | 0 | 0 |" in artifacts["dataset-train"]
