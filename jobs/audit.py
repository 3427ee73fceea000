"""`ray job submit -- python jobs/audit.py --cache s3://bucket/cache --input ... --model ...`

The same flags and exit status as `latentcache audit`; with RAY_ADDRESS set (as `ray job submit`
sets it) decoding runs on the cluster's GPU actors when the driver has no GPU.
"""

import sys

from latentcache.cli import main

if __name__ == "__main__":
    sys.exit(main(["audit", *sys.argv[1:]]))
