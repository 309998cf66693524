#!/usr/bin/env bash
# Paper-scale method costs on one GPU (see benchmarks/README.md):
#   bash benchmarks/gpu.sh                                  # --device cuda --precision bf16, writes benchmarks/results/gpu.*
#   bash benchmarks/gpu.sh --device cpu --quick --out DIR   # the CPU smoke path (tiny models, seconds)
# Any argument is passed on to benchmarks/gpu.py; --device defaults to cuda here.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
case " $* " in
  *" --device "*|*" --device="*) exec "${PYTHON:-python}" "$here/gpu.py" "$@" ;;
  *) exec "${PYTHON:-python}" "$here/gpu.py" --device cuda "$@" ;;
esac
