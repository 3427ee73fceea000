"""`ray job submit --working-dir . -- python jobs/encode.py --config configs/s3.yaml [--flag value ...]`

The same flags, YAML keys and exit status as `latentcache encode`. `ray.init()` gets no address:
under `ray job submit` it joins the cluster the job was submitted to (RAY_ADDRESS, set by Ray),
and the working directory is first on PYTHONPATH, so the uploaded `latentcache/` is what runs.
"""

import logging
import sys

import ray

from latentcache.cli import main

if __name__ == "__main__":
    ray.init(log_to_driver=False, logging_level=logging.WARNING)
    sys.exit(main(["encode", *sys.argv[1:]]))
