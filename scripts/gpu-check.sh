#!/usr/bin/env bash
# The prepared GPU check (benchmarks/devicecheck.py), from a source checkout, with
# kernrnn installed or not (the device machine has its dependencies, not kernrnn):
#   bash scripts/gpu-check.sh              # the default phases, at most 7 minutes
#   bash scripts/gpu-check.sh persistent   # one phase again
#   bash scripts/gpu-check.sh --list       # phases and timeouts
#   bash scripts/gpu-check.sh --rehearse   # every phase under the CUDA simulator (no GPU)
# Logs go to $OUT/devicecheck when OUT is set, else ./devicecheck-logs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/plugins${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

# numba-cuda needs libnvvm: from a wheel (nvidia-cuda-nvcc-cu12, nvidia-nvvm), else from
# a CUDA toolkit, which it finds through CUDA_HOME.  Without a wheel and without
# CUDA_HOME, point CUDA_HOME at the toolkit whose libnvvm is there: the one that owns
# the nvcc or ptxas on PATH, else the standard /usr/local/cuda, else the newest
# /usr/local/cuda-*.
nvvm_wheel() {
    "$PY" - <<'EOF' 2>/dev/null
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("nvidia")
roots = [pathlib.Path(r) for r in (spec.submodule_search_locations or [])] if spec else []
patterns = ("cuda_nvcc/nvvm/lib64/libnvvm.so*", "cu*/lib/libnvvm.so*")
sys.exit(0 if any(next(r.glob(p), None) for r in roots for p in patterns) else 1)
EOF
}
has_nvvm() { compgen -G "$1/nvvm/lib64/libnvvm.so*" >/dev/null; }
if [ -z "${CUDA_HOME:-}" ] && ! nvvm_wheel; then
    candidates=()
    for tool in nvcc ptxas; do
        exe="$(command -v "$tool" 2>/dev/null)" && candidates+=("$(dirname "$(dirname "$(readlink -f "$exe")")")")
    done
    candidates+=(/usr/local/cuda)
    while IFS= read -r dir; do candidates+=("$dir"); done < <(ls -d /usr/local/cuda-* 2>/dev/null | sort -V -r)
    for dir in "${candidates[@]}"; do
        if has_nvvm "$dir"; then
            export CUDA_HOME="$dir"
            echo "note: no NVVM wheel found; CUDA_HOME=$CUDA_HOME" >&2
            break
        fi
    done
    [ -n "${CUDA_HOME:-}" ] || echo "note: no NVVM wheel and no CUDA toolkit with libnvvm found; numba-cuda will search itself" >&2
fi
exec "$PY" -m benchmarks.devicecheck "$@"
