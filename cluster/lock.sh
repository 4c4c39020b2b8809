#!/usr/bin/env bash
# Regenerates cluster/requirements.lock: the exact runtime dependency set the container image
# installs, for Linux x86_64 / CPython 3.11 (the Python of the rayproject/ray base image).
#
# Versions are pinned to what this repository's test venv (.venv) runs, so the image ships the
# set that CI tested; torch is pinned without its local "+cpu" tag, which on Linux x86_64 makes
# pip take PyPI's default CUDA build. Needs only PyPI (metadata; nothing is installed).
#
#   bash cluster/lock.sh            # rewrite cluster/requirements.lock
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.tools/bin/uv}
PY=${PY:-.venv/bin/python}
mkdir -p build
constraints=build/test-venv-versions.txt  # a stable name: it appears in the lock's annotations
# The test venv's versions, minus this package itself and the CPU-only torch tag.
"$UV" pip freeze -p "$PY" | grep -v -e '^embedctl' -e '^-e ' -e '^torch==' >"$constraints"
torch_version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
echo "torch==${torch_version}" >>"$constraints"
"$UV" pip compile pyproject.toml -c "$constraints" \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --no-header --annotation-style line --custom-compile-command "bash cluster/lock.sh" \
  -o cluster/requirements.lock
