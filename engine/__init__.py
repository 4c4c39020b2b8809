"""embedctl: distributed batch embedding and indexing engine (library).

Importing the engine turns the Hugging Face libraries offline (nothing downloads at run time) and
keeps the fast tokenizer on one thread, unless the environment already says otherwise. Every Ray
worker that runs engine code imports this package before any model code, so a cluster's workers get
these defaults without a job ``runtime_env``: on a running Ray, a runtime_env (even ``env_vars``
only) makes each job wait for fresh workers from Ray's runtime-env agent: the first unit came
0.1-0.8 s later on 2 CPUs (``benchmarks/bench_ray_floor.py --running-ray --job-runtime-env``).
``engine.distributed.runtime.init_ray`` sends one only for a value that differs from these.
"""

import os as _os

__version__ = "0.1.0"

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

for _name, _value in OFFLINE_ENV.items():
    _os.environ.setdefault(_name, _value)
