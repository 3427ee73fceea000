"""A two-node `ray.cluster_utils.Cluster` encode with `--model` on S3, for tests/test_model_fetch.py.

Each node gets its own model cache (LATENTCACHE_MODEL_CACHE in the raylet's environment, which its
workers inherit), as two machines would have; the driver runs on the head node and uses the head's.
Runs in its own process for the reasons given in tests/_cluster_two_nodes.py.

    python -m tests._cluster_model_fetch INPUT OUTPUT MODEL_URL STORAGE_OPTIONS HEAD_CACHE GPU_CACHE -> JSON line
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from latentcache.cli import main as latentcache

from ._cluster_two_nodes import MiB, free_port


def run(input_url: str, output: str, model: str, options: str, head_cache: str, gpu_cache: str) -> dict[str, Any]:
    os.environ["LATENTCACHE_MODEL_CACHE"] = head_cache  # the driver is on the head node
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "object_store_memory": 150 * MiB,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
            "env_vars": {"LATENTCACHE_MODEL_CACHE": head_cache},
        },
    )
    try:
        # two logical GPUs: two encoder actors on this node, which must still fetch the model once
        gpu_node = cluster.add_node(
            num_cpus=3, num_gpus=2, object_store_memory=150 * MiB, env_vars={"LATENTCACHE_MODEL_CACHE": gpu_cache}
        )
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        status = latentcache(
            [
                "encode",
                "--quiet",
                "--input",
                input_url,
                "--output",
                output,
                "--model",
                model,
                "--storage-options",
                options,
                "--resolution",
                "64",
                "--batch-size",
                "2",
            ]
        )
        actors = list_actors(limit=10_000, raise_on_missing_output=False)
        encoders = [a for a in actors if "LatentEncoder" in a.class_name]
        return {
            "status": status,
            "head_node": cluster.head_node.node_id,
            "gpu_node": gpu_node.node_id,
            "encoder_nodes": sorted({a.node_id for a in encoders}),
            "encoders": len(encoders),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(run(*sys.argv[1:7])), flush=True)
