"""Ray driver for synthetic queries: `python jobs/generate_queries.py --config gen.yaml` (also `embedctl generate-queries`).

A thin entry point for `ray job submit --working-dir . -- python jobs/generate_queries.py --config FILE`;
the job body lives in `engine.distributed.generate_queries`, which the CLI verb calls too.
"""

import sys

from engine.distributed.generate_queries import main

if __name__ == "__main__":
    sys.exit(main())
