"""spark-submit entry for `laiontools dedup`: the same code path, on the session spark-submit configured.

    spark-submit --master yarn jobs/dedup.py --embeddings s3://b/emb --evalset imagenet=s3://b/imagenet \
        --output s3://b/dedup --threshold 0.92

Thin on purpose: it runs the same code as the CLI, which finds the session spark-submit configured
and leaves it to spark-submit to stop.
"""

import sys

from laiontools.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("dedup", sys.argv[1:]))
