"""A two-node `ray.cluster_utils.Cluster` run of `latentcache encode`, for tests/test_cluster.py.

It runs in its own process because a Cluster cannot share a process with the session's
`ray.init(address="local")`. The caller sets RAY_TMPDIR to a private directory: Cluster writes the
"latest cluster" address file (which a plain `ray.init()` on this machine would join) and removes
it on shutdown, so with the default /tmp/ray it could capture or break other people's sessions.

    python -m tests._cluster_two_nodes INPUT OUTPUT MODEL  ->  one JSON line on stdout
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks

from latentcache.cli import main as latentcache

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decode_nodes(wanted: int, timeout: float = 60.0) -> set[str]:
    """Nodes that ran the fused read+decode tasks; task events reach the GCS a little late."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = list_tasks(filters=[("state", "=", "FINISHED")], limit=10_000, raise_on_missing_output=False)
        nodes = {t.node_id for t in tasks if "preprocess" in t.name}
        if len(nodes) >= wanted or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


@contextlib.contextmanager
def two_node_cluster(
    *, gpus: int, head_env: dict[str, str] | None = None, gpu_env: dict[str, str] | None = None
) -> Iterator[tuple[Cluster, Any]]:
    """A CPU head node and a node with `gpus` logical GPUs, this process connected to it as the driver."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "object_store_memory": 150 * MiB,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
            **({"env_vars": head_env} if head_env else {}),
        },
    )
    try:
        gpu_node = cluster.add_node(
            num_cpus=3, num_gpus=gpus, object_store_memory=150 * MiB, **({"env_vars": gpu_env} if gpu_env else {})
        )
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        yield cluster, gpu_node
    finally:
        ray.shutdown()
        cluster.shutdown()


def encode(input_url: str, output: str, model: str, *flags: str) -> int:
    """`latentcache encode` at 64 px on the connected cluster."""
    argv = ["encode", "--quiet", "--input", input_url, "--output", output, "--model", model, "--resolution", "64"]
    return latentcache([*argv, *flags])


def placement(status: int, cluster: Cluster, gpu_node: Any) -> dict[str, Any]:
    """The run's status and where its encoder actors ran (alive or already DEAD)."""
    actors = list_actors(limit=10_000, raise_on_missing_output=False)
    encoders = [a for a in actors if "LatentEncoder" in a.class_name]  # MapWorker(MapBatches(LatentEncoder))
    return {
        "status": status,
        "head_node": cluster.head_node.node_id,
        "gpu_node": gpu_node.node_id,
        "encoder_nodes": sorted({a.node_id for a in encoders}),
        "encoders": len(encoders),
    }


def run(input_url: str, output: str, model: str) -> dict[str, Any]:
    with two_node_cluster(gpus=1) as (cluster, gpu_node):  # a logical GPU
        status = encode(input_url, output, model, "--batch-size", "4")
        return {**placement(status, cluster, gpu_node), "decode_nodes": sorted(decode_nodes(wanted=2))}


if __name__ == "__main__":
    print(json.dumps(run(*sys.argv[1:4])), flush=True)
