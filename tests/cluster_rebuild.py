"""Run the dataset-rebuild flow on a real two-node local Ray cluster (a test helper script).

``python tests/cluster_rebuild.py PARAMS.json``: starts ``ray.cluster_utils.Cluster`` with a
head that offers no CPU and two worker nodes of 1 CPU each (so every task runs on a node other
than the head), runs the
``dataset-rebuild`` flow with ``ray_address`` set to the cluster, prints the flow's result as
JSON on the last line, and shuts the cluster down. It runs in its own process because the
pytest process already holds a local Ray (the ``ray_local`` fixture).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def main(params_path: str) -> int:
    from ray.cluster_utils import Cluster

    from flows.rebuild import dataset_rebuild

    params = json.loads(Path(params_path).read_text())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0,
                                                           "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        nodes = cluster.list_all_nodes()
        address = cluster.address
        result = dataset_rebuild(**params, ray_address=address)
    finally:
        cluster.shutdown()
    print(json.dumps({"nodes": len(nodes), "address": address, "result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
