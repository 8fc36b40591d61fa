#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a lent GPU machine, or its CPU smoke run here.
#
#   bash scripts/gpu-check.sh --fetch-wheels   here, once: download into .whl/ the small wheels the GPU
#                                              machine lacks (~12 MB; .whl/ is git-ignored)
#   bash scripts/gpu-check.sh [ARGS...]         there: install .whl/ into /tmp/seqsal-site (if present),
#                                              then run bench/gpu_check.py ARGS; results go to $OUT
#                                              (the device tool's folder) or bench/results/gpu-check
#   bash scripts/gpu-check.sh --cpu-smoke       anywhere: the same with tiny sizes on the CPU
#
# The GPU machine has torch (CUDA), transformers, numpy, grpcio and rich, but not pydantic-settings,
# grpc-interceptor, the grpcio-* helpers etc.; the wheels below are the versions seqsal is tested with
# (pinned like pyproject.toml), for CPython 3.12 on x86-64 Linux. See bench/README.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEEL_DIR=.whl
WHEELS=(
    grpcio==1.85.3 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.3
    googleapis-common-protos==1.76.0 protobuf==7.36.2 grpc-interceptor==0.15.4
    pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4
    annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
    redis==8.1.0 rich==15.0.0 typer==0.29.2 prometheus-client==0.26.0
)

if [ "${1:-}" = "--fetch-wheels" ]; then
    python=${PYTHON:-.venv/bin/python}
    mkdir -p "$WHEEL_DIR"
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEEL_DIR" "${WHEELS[@]}"
    du -sh "$WHEEL_DIR"
    exit 0
fi

python=python3
[ -x .venv/bin/python ] && [ -z "${OUT:-}" ] && python=.venv/bin/python
# Carried wheels only where the interpreter lacks seqsal's server dependencies (the GPU machine).
if ! "$python" -c 'import pydantic_settings, grpc_interceptor, grpc_health, grpc_status, grpc_reflection' \
    2>/dev/null && compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/seqsal-site "$WHEEL_DIR"/*.whl
    export PYTHONPATH=/tmp/seqsal-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$python" bench/gpu_check.py --out "${OUT:-bench/results/gpu-check}" "$@"
