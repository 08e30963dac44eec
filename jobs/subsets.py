"""spark-submit entry for `laiontools subsets`: spark-submit jobs/subsets.py --pool ... --scales ... --seed S --output ..."""

import sys

from laiontools.subsets import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
