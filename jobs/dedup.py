"""spark-submit entry for `laiontools dedup`: the same code path, on the session spark-submit configured.

    spark-submit --master yarn jobs/dedup.py --embeddings s3://b/emb --evalset imagenet=s3://b/imagenet \
        --output s3://b/dedup --threshold 0.92
"""

import sys

from laiontools.stages.dedup import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
