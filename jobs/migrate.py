"""Ray driver for a model migration: `python jobs/migrate.py --config migrate.yaml` (also `embedctl migrate run`).

A thin entry point for `ray job submit --working-dir . -- python jobs/migrate.py --config FILE`;
the job body lives in `engine.distributed.migrate`, which the CLI verb calls too.
"""

import sys

from engine.distributed.migrate import main

if __name__ == "__main__":
    sys.exit(main())
