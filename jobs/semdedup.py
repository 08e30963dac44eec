"""spark-submit entry for `laiontools semdedup`: the same code path, on the session spark-submit configured.

    spark-submit --master yarn jobs/semdedup.py --embeddings s3://b/emb --output s3://b/semdedup \
        --clusters 50000 --eps 0.01 0.05 0.1

Thin on purpose: it runs the same code as the CLI, which finds the session spark-submit configured
and leaves it to spark-submit to stop.
"""

import sys

from laiontools.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("semdedup", sys.argv[1:]))
