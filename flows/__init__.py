"""Prefect flows over the embseg library: thin orchestration, no second copy of its logic.

Flows (their Prefect names): ``dataset-rebuild`` (flows/rebuild.py), ``train``
(flows/train.py), ``evaluate`` (flows/evaluate.py), ``retrain`` (flows/retrain.py) and
``pipeline`` (flows/pipeline.py, the main job: ``python -m flows.pipeline``). Deployments of
all five are declared in prefect.yaml at the repository root.

Importing the package switches telemetry off (Prefect, Ray) unless the user chose otherwise, so
that every entry point (``python -m flows.pipeline``, a worker's flow-run process, tests)
behaves the same; it also gives Prefect's temporary local API more time to start on a busy
2-core machine (the default 20 s is not always enough), forwards embseg's own log records
(e.g. the trainer's) to Prefect's run logs (and, outside a flow run, keeps them local without
a warning per record), and makes idle OpenMP threads sleep instead of
spin (``OMP_WAIT_POLICY=PASSIVE``; it must be set before torch loads): on a CPU shared with
other work, spinning threads made CPU training steps about 4 times slower. Export any of these
variables to choose otherwise.
"""

from __future__ import annotations

import os

for _name, _value in (
    ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
    ("DO_NOT_TRACK", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
    ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),
    ("PREFECT_LOGGING_EXTRA_LOGGERS", "embseg"),
    ("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore"),
    ("OMP_WAIT_POLICY", "PASSIVE"),
):
    os.environ.setdefault(_name, _value)
