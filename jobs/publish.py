"""Publish job: `python jobs/publish.py --config publish.yaml` (also `embedctl publish`).

A thin entry point for `ray job submit --working-dir . -- python jobs/publish.py --config FILE`;
the job body lives in `engine.distributed.publish`, which the CLI verb calls too.
"""

import sys

from engine.distributed.publish import main

if __name__ == "__main__":
    sys.exit(main())
