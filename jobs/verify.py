"""spark-submit entry for `laiontools verify`: the shards are read in Spark tasks on the cluster.

    spark-submit --master spark://HOST:7077 jobs/verify.py s3://bucket/pool/pool.manifest.json

Same checks, findings and exit codes as `laiontools verify` (0 all fine, 1 something differs).
"""

import sys

from laiontools.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("verify", sys.argv[1:]))
