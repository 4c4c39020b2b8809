"""Ray driver for fine-tuning: `python jobs/finetune.py --config ft.yaml` (`embedctl finetune` runs it in-process).

A thin entry point for `ray job submit --working-dir . -- python jobs/finetune.py --config FILE`;
the job body lives in `engine.distributed.finetune`, which the CLI verb calls too.
"""

import sys

from engine.distributed.finetune import main

if __name__ == "__main__":
    sys.exit(main())
