"""Ray driver for the refresh job: `python jobs/refresh.py --config refresh.yaml` (also `embedctl refresh`).

A thin entry point for `ray job submit --working-dir . -- python jobs/refresh.py --config FILE`;
the job body lives in `engine.distributed.refresh`, which the CLI verb calls too.
"""

import sys

from engine.distributed.refresh import main

if __name__ == "__main__":
    sys.exit(main())
