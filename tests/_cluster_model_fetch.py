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

from ._cluster_two_nodes import encode, placement, two_node_cluster


def run(input_url: str, output: str, model: str, options: str, head_cache: str, gpu_cache: str) -> dict[str, Any]:
    os.environ["LATENTCACHE_MODEL_CACHE"] = head_cache  # the driver is on the head node
    head_env, gpu_env = {"LATENTCACHE_MODEL_CACHE": head_cache}, {"LATENTCACHE_MODEL_CACHE": gpu_cache}
    # two logical GPUs: two encoder actors on that node, which must still fetch the model once
    with two_node_cluster(gpus=2, head_env=head_env, gpu_env=gpu_env) as (cluster, gpu_node):
        status = encode(input_url, output, model, "--storage-options", options, "--batch-size", "2")
        return placement(status, cluster, gpu_node)


if __name__ == "__main__":
    print(json.dumps(run(*sys.argv[1:7])), flush=True)
