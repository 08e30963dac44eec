"""spark-submit entry for `laiontools prepare`: `spark-submit [--master spark://HOST:7077] jobs/prepare.py --input ... --output ...`.

Thin on purpose: it runs the same code as the CLI, which finds the session spark-submit configured
and leaves it to spark-submit to stop.
"""

import sys

from laiontools.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("prepare", sys.argv[1:]))
