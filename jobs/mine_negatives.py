"""Ray driver for hard-negative mining: `python jobs/mine_negatives.py --config job.yaml` (`embedctl mine-negatives`).

A thin entry point for `ray job submit --working-dir . -- python jobs/mine_negatives.py --config FILE`;
the job body lives in `engine.distributed.mine_negatives`, which the CLI verb calls too.
"""

import sys

from engine.distributed.mine_negatives import main

if __name__ == "__main__":
    sys.exit(main())
