"""Evaluate job: `python jobs/evaluate.py --config evaluate.yaml` (also `embedctl evaluate`).

A thin entry point for `ray job submit --working-dir . -- python jobs/evaluate.py --config FILE`;
the job body lives in `engine.distributed.evaluate`, which the CLI verb calls too.
"""

import sys

from engine.distributed.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
