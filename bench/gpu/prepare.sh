#!/usr/bin/env bash
# Run HERE (where PyPI is reachable) before the one call on a GPU machine that has no network:
# fills .whl/ (git-ignored) with what that machine's image lacks for the suite, so
# bench/gpu_suite.sh installs it from there and nothing from a network.
#
#   bench/gpu/prepare.sh [PYTHON_VERSION]     # the device's Python, default 3.12
#
# - wheels of the farm's packages that the device image does not ship (versions from
#   constraints.txt, --no-deps: the image has torch, transformers, accelerate, numpy, ...);
# - a redis-server (this machine's binary and the libraries the image may lack) in .whl/redis/.
# Then carry `.whl` in the device call:  bench/gpu_suite.sh  (it finds .whl/ by itself).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYV=${1:-3.12}
PACKAGES="diffusers peft celery kombu billiard vine amqp click-didyoumean click-repl click-plugins
prompt-toolkit wcwidth redis pydantic pydantic-core pydantic-settings annotated-types
typing-inspection python-dotenv boto3 botocore s3transfer jmespath torchao"
mkdir -p .whl/redis
PIP=python3; [ -x .venv/bin/python ] && PIP=.venv/bin/python
for name in $PACKAGES; do
    pin=$(grep -i "^${name}==" constraints.txt | cut -d' ' -f1)
    "$PIP" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d .whl "${pin:-$name}"
done
server=$(command -v redis-server)
cp "$server" .whl/redis/redis-server
for lib in liblzf.so.1 libjemalloc.so.2 libatomic.so.1; do  # rarely on a CUDA image
    path=$(ldd "$server" | awk -v lib="$lib" '$1 == lib {print $3}')
    [ -n "$path" ] && cp "$path" .whl/redis/
done
du -sh .whl
