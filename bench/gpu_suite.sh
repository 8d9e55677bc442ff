#!/usr/bin/env bash
# The GPU suite: one command, every figure and the raw logs in one folder.
#
#   bench/gpu_suite.sh             on a machine with one NVIDIA card (H100/H200 class: < 8 min)
#   bench/gpu_suite.sh --dry-run   the CPU rehearsal: tiny models, a declared card (tests run it)
#   bench/gpu_suite.sh --out DIR   results folder (default: $OUT, else bench/results/gpu-<date>/)
#
# Writes summary.txt, results.json and raw-logs.tar.gz. Installs nothing from a network: on a
# machine without the farm's packages, run bench/gpu/prepare.sh where PyPI is reachable first;
# it fills .whl/ (wheels for this machine's Python, and a redis-server), which is used here.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python

# the carried wheels only where this Python lacks the farm's packages (the device image)
if ! "$PY" -c "import celery, diffusers, pydantic_settings, redis" 2>/dev/null \
        && ls .whl/*.whl >/dev/null 2>&1; then
    site=/tmp/lorafarm-suite-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || { echo "gpu_suite: installing .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -x .whl/redis/redis-server ]; then
    export PATH="$PWD/.whl/redis:$PATH" LD_LIBRARY_PATH="$PWD/.whl/redis${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

exec "$PY" -m bench.gpu.suite "$@"
