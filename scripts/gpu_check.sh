#!/usr/bin/env bash
# Every CUDA path in one command, on a GPU machine with torch and no internet (see bench/gpu_check.py):
#   scripts/gpu_check.sh --out DIR [--budget SECONDS] [--only STEP,...] ...
# DIR receives console.log and one gpu-check-<time>.tar.gz of every log, JSON and report.
# PYTHON picks the interpreter that has the machine's CUDA build of torch (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
