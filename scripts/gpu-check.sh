#!/usr/bin/env bash
# The prepared GPU check (benchmarks/devicecheck.py), from a source checkout, with
# kernrnn installed or not (the device machine has its dependencies, not kernrnn):
#   bash scripts/gpu-check.sh              # the default phases, at most ~7 minutes
#   bash scripts/gpu-check.sh persistent   # one phase again
#   bash scripts/gpu-check.sh --list       # phases and timeouts
# Logs go to $OUT/devicecheck when OUT is set, else ./devicecheck-logs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/plugins${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m benchmarks.devicecheck "$@"
