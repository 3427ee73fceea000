"""`ray job submit -- python jobs/stats.py --cache s3://bucket/cache --output s3://bucket/stats.json`

The same flags as `latentcache stats`; the job joins the cluster it was submitted to (RAY_ADDRESS).
"""

import sys

from latentcache.cli import main

if __name__ == "__main__":
    sys.exit(main(["stats", *sys.argv[1:]]))
