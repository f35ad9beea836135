#!/usr/bin/env bash
# The GPU check in one call (bench/gpu_check.py): on a machine with one H100 or H200 whose image has Python 3.12,
# torch (CUDA), transformers, accelerate, peft, triton and pytest and no network, install the carried wheels, then
# run the gpu tests, FlashAttention-2 vs sdpa vs eager, the fused head in bf16, a short GPU throughput benchmark and
# a train.py run; write $OUT/gpu_check.json. At most 8 minutes (CHECK_TIMEOUT_S).
#
# Variables:
#   OUT              where gpu_check.json and the logs go (default outputs/gpu_check)
#   WHEELS           the downloaded wheels of requirements-gpu-carry.txt (default .gpu-wheels; README shows the command)
#   PYTHON           the image's Python (default python3); with --dry-run, this checkout's (default .venv/bin/python)
#   CHECK_TIMEOUT_S  the whole run's limit in seconds (default 480)
#
# --dry-run: every part on CPU at a tiny size, in an environment that holds only the GPU image's packages and the
# carried ones (linked from $PYTHON's), instead of installing the wheels: what CI runs (tests/bench/test_gpu_check.py).
#
# Example: scripts/gpu_check.sh, then, back on a machine with the repository,
#   python -m bench.gpu_check --docs-from <copied OUT>/gpu_check.json   # bench/results/ and docs/benchmarks.md
set -euo pipefail

cd "$(dirname "$0")/.."
DRY_RUN=${1:-}
if [[ -n "$DRY_RUN" && "$DRY_RUN" != "--dry-run" ]]; then
    echo "usage: scripts/gpu_check.sh [--dry-run]" >&2
    exit 2
fi
OUT=${OUT:-outputs/gpu_check}
WHEELS=${WHEELS:-.gpu-wheels}
CHECK_TIMEOUT_S=${CHECK_TIMEOUT_S:-480}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STARTED=$SECONDS
# The installed packages (or the dry run's environment) live outside $OUT, which is copied back whole.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [[ -n "$DRY_RUN" ]]; then
    PYTHON=${PYTHON:-.venv/bin/python}
    # Links to $PYTHON's packages, made afresh each time: they follow whatever it has installed now.
    CHECK_PYTHON=$("$PYTHON" -m bench.gpu_check --image-env "$WORK/image-env")
else
    PYTHON=${PYTHON:-python3}
    if [[ ! -d "$WHEELS" ]]; then
        echo "gpu_check: no $WHEELS/: download requirements-gpu-carry.txt's wheels first (README: A GPU check)" >&2
        exit 2
    fi
    # --no-deps: the list pins every dependency the image lacks; --no-build-isolation: antlr4's source build uses
    # the image's setuptools (no network for a fresh one). --target, not a venv: the image may lack ensurepip.
    SITE="$WORK/site-packages"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation --find-links "$WHEELS" \
        --target "$SITE" -r requirements-gpu-carry.txt
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    CHECK_PYTHON=$PYTHON
fi

LEFT=$((CHECK_TIMEOUT_S - (SECONDS - STARTED)))
echo "gpu_check: $((SECONDS - STARTED)) s to set up; running the parts (at most $LEFT s) with $CHECK_PYTHON" >&2
if [[ -n "$DRY_RUN" ]]; then
    timeout "$LEFT" "$CHECK_PYTHON" -m bench.gpu_check --out "$OUT" --dry-run
else
    timeout "$LEFT" "$CHECK_PYTHON" -m bench.gpu_check --out "$OUT" --wheels "$WHEELS"
fi
if [[ -n "$DRY_RUN" ]]; then
    # The docs section renders from the JSON, into a copy: a dry run's numbers are no GPU's.
    cp docs/benchmarks.md "$OUT/benchmarks.md"
    "$CHECK_PYTHON" -m bench.gpu_check --docs-from "$OUT/gpu_check.json" --docs "$OUT/benchmarks.md"
fi
echo "gpu_check: done in $((SECONDS - STARTED)) s: $OUT/gpu_check.json" >&2
