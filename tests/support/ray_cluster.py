"""A real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head and two worker
nodes of one CPU each, small object stores, no dashboard, no usage reporting. Starting one costs
seconds, so a test module shares one (``cluster`` fixture below, imported by the module)."""

from __future__ import annotations

import os

import pytest

NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20}


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'densepr[ray]')")
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_worker_niceness"] = "0"  # Ray's default (15) starves workers when the machine is busy
    c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    workers = [c.add_node(**NODE) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()
