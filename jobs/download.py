"""spark-submit entry for the download job: `spark-submit --master spark://... jobs/download.py --input ... --output ...`.

Thin on purpose: the same `laiontools.download.main` runs under `laiontools download`; it finds the
session spark-submit configured and leaves it to spark-submit to stop.
"""

import sys

from laiontools.download import main

if __name__ == "__main__":
    from laiontools.logs import setup_logging

    setup_logging()
    sys.exit(main(sys.argv[1:]))
