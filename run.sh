#!/usr/bin/env bash
# distunmix set-up and entry point.
#
#   ./run.sh demo    set up (ffmpeg, .venv) and run the main job (distunmix demo [flags])
#   ./run.sh test    set up (ffmpeg, chromium for the page test, .venv) and run the whole test suite
#   ./run.sh test --quick    the same without the Ray, Serve, wheel and README integration tests
#   ./run.sh setup   set up only
#
# Set-up is idempotent: it installs ffmpeg (apt) when it is missing, creates .venv with
# Python >= 3.11 and installs distunmix with its test extra. On a machine without an NVIDIA
# GPU it installs a CPU build of torch when one is available (DISTUNMIX_TORCH overrides the
# torch requirement, e.g. DISTUNMIX_TORCH="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${DISTUNMIX_VENV:-$ROOT/.venv}
PY=$VENV/bin/python

log() { printf '[run.sh] %s\n' "$*" >&2; }

# run pip quietly; show its output only when it fails
pip_quiet() {
    local out
    out=$(mktemp)
    if ! "$PY" -m pip install -q "$@" >"$out" 2>&1; then
        cat "$out" >&2; rm -f "$out"; log "pip install $* failed"; exit 1
    fi
    rm -f "$out"
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        log "need root to run: $*"; return 1; fi
}

apt_install() {
    log "installing with apt: $*"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

find_python() {
    for cand in python3.13 python3.12 python3.11 python3; do
        if command -v "$cand" >/dev/null &&
            "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$cand"; return 0
        fi
    done
    return 1
}

ensure_ffmpeg() {
    command -v ffmpeg >/dev/null || apt_install ffmpeg
}

ensure_browser() {
    # the Serve page's test drives a real headless Chromium (Debian's packages; nothing downloaded at run time)
    { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } || apt_install chromium chromium-driver
}

ensure_venv() {
    local stamp="$VENV/.distunmix-installed"
    local want
    want=$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)
    if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
    local python
    if ! python=$(find_python); then
        apt_install python3 python3-venv
        python=$(find_python) || { log "Python >= 3.11 is required; found $(python3 --version 2>&1)"; exit 1; }
    fi
    if [ ! -x "$PY" ]; then
        log "creating $VENV with $python"
        "$python" -m venv "$VENV" 2>/dev/null || {
            apt_install python3-venv "$("$python" -c 'import sys; print(f"python3.{sys.version_info.minor}-venv")')"
            "$python" -m venv "$VENV"
        }
    fi
    pip_quiet --upgrade pip setuptools wheel
    if ! "$PY" -c 'import torch' 2>/dev/null; then
        local torch_req=${DISTUNMIX_TORCH:-}
        if [ -z "$torch_req" ]; then
            if command -v nvidia-smi >/dev/null; then torch_req="torch>=2.4"
            # a local CPU build (this project's CI machines keep one); else PyPI's default build
            elif ls /opt/wheels/torch-2.13.0+cpu-* >/dev/null 2>&1; then torch_req="torch==2.13.0"
            else torch_req="torch>=2.4"; fi
        fi
        log "installing $torch_req"
        pip_quiet "$torch_req"
    fi
    log "installing distunmix[test] (editable)"
    pip_quiet -e ".[test]"
    # The reference implementation is a test oracle only. Its metadata requires torchaudio,
    # whose Linux wheels are CUDA builds that fail to import beside a CPU torch: no deps.
    pip_quiet --no-deps "openunmix==1.3.0"
    # asteroid's X-UMX is the oracle of distunmix's; asteroid and its filterbanks import with
    # what is here plus huggingface_hub (their full requirements pull lightning, torchaudio, ...)
    pip_quiet --no-deps "asteroid==0.7.0" "asteroid-filterbanks==0.4.0" "huggingface_hub==2.4.0"
    echo "$want" >"$stamp"
}

setup() {
    ensure_ffmpeg
    ensure_venv
}

cmd=${1:-}
shift || true
case "$cmd" in
    setup)
        setup
        ;;
    demo)
        setup
        "$VENV/bin/distunmix" demo "$@"   # e.g. --out DIR, --size tiny
        ;;
    test)
        setup
        [ "${1:-}" = "--quick" ] || ensure_browser
        "$VENV/bin/ruff" check distunmix tests benchmarks tune
        "$VENV/bin/ruff" format --check distunmix tests benchmarks tune
        if [ "${1:-}" = "--quick" ]; then
            shift
            "$PY" -m pytest -q -m "not integration" "$@"   # the inner loop: no Ray, Serve, wheel or README runs
        else
            # two pytest processes, a test file each at a time (pytest-xdist): the integration tests
            # mostly wait on Ray and subprocesses, so two files share the two cores well
            # (the quick tier is compute-bound: one process is faster there); files start in
            # tests/conftest.py's order, longest first (xdist's default reorders them by test count)
            "$PY" -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
        fi
        ;;
    *)
        echo "usage: ./run.sh demo|test|setup [args...]" >&2
        exit 2
        ;;
esac
