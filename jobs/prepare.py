"""spark-submit entry for prepare alone: `spark-submit jobs/prepare.py --input ... --output ...`."""

import sys

from laiontools.prepare import main

if __name__ == "__main__":
    from laiontools.logs import setup_logging

    setup_logging()
    sys.exit(main(sys.argv[1:]))
