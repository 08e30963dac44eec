"""spark-submit entry for the embed stage: same code as `laiontools embed`, in Spark mode by default.

    spark-submit --conf spark.executor.resource.gpu.amount=1 --conf spark.task.resource.gpu.amount=1 \
        --conf spark.executor.resource.gpu.discoveryScript=/path/getGpusResources.sh \
        jobs/embed.py --engine spark --manifest s3://bucket/pool/pool.manifest.json --output s3://bucket/emb \
        --model ViT-B-32 --pretrained laion2b_s34b_b79k
"""

import sys

from laiontools.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("embed", sys.argv[1:]))
