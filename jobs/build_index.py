"""Ray driver for index builds: `python jobs/build_index.py --config job.yaml` (also `embedctl build-index`).

A thin entry point for `ray job submit --working-dir . -- python jobs/build_index.py --config FILE`;
the job body lives in `engine.distributed.build_index`, which the CLI verb calls too.
"""

import sys

from engine.distributed.build_index import main

if __name__ == "__main__":
    sys.exit(main())
