"""The one local Ray cluster every `ray`-marked test shares (registered in conftest.py, session scope).

A head started by `workers.ray_cluster.start_local_head` (dashboard and Jobs API on, 4 logical CPUs on a 2-core
machine so that a Tune driver and two Train workers can be scheduled), and this test process connected to it
as a driver for the tests that call Ray Train directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from workers.ray_cluster import start_local_head

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    log = tmp_path_factory.mktemp("ray") / "head.log"
    head = start_local_head(num_cpus=4, num_gpus=0, log_path=log, object_store_bytes=200 * 2**20)
    try:
        yield head
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        head.stop()


@pytest.fixture(scope="session")
def ray_driver(ray_cluster) -> object:
    """This process as a driver of the shared cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.gcs_address, log_to_driver=False)
    return ray_cluster
