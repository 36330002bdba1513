#!/usr/bin/env bash
# Every CUDA path in one command, on a GPU machine with torch and no internet (see bench/gpu_check.py):
#   scripts/gpu_check.sh [--dry-run] [--budget SECONDS] ...
# PYTHON picks the interpreter that has the machine's CUDA build of torch (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
