#!/usr/bin/env bash
# The CUDA emulation tier under AddressSanitizer + UBSan: builds build/cuda_emu/asan (every unit
# -fsanitize=address,undefined) and runs the project's CUDA op tests and the emulator's tests through it,
# with the ASan runtime preloaded into Python. Measured on the 2-core machine: see tools/cuda_emu/README.md.
# Usage: bash tools/cuda_emu/asan.sh [extra pytest arguments for the op tests, e.g. -k attention]
set -euo pipefail
cd "$(dirname "$0")/../.."
exec python tools/cuda_emu/run.py --variant asan "$@"
