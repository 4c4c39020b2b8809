"""Ray driver for the embed job: `python jobs/embed.py --config job.yaml` (also `embedctl embed`).

A thin entry point for `ray job submit --working-dir . -- python jobs/embed.py --config FILE`;
the job body lives in `engine.distributed.embed`, which the CLI verb calls too.
"""

import sys

from engine.distributed.embed import main

if __name__ == "__main__":
    sys.exit(main())
