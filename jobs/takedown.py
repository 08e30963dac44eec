"""spark-submit entry for `laiontools takedown`: `spark-submit [--master spark://HOST:7077] jobs/takedown.py ...`.

Thin on purpose: it runs the same code as the CLI, which finds the session spark-submit configured
and leaves it to spark-submit to stop.
"""

import sys

from laiontools.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("takedown", sys.argv[1:]))
