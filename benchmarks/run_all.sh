#!/usr/bin/env bash
# Run the benchmark suite: every bench script appends to one CSV, each logs to its own file, then plot.py
# draws the PNGs. Builds nothing: install vita_ext first (pip install --no-build-isolation --no-deps -e .).
# See benchmarks/RESULTS.md for the exact commands.
#
# usage: bash benchmarks/run_all.sh [--device cuda|cpu] [--out DIR] [--timeout SECONDS] [--quick] [NAME ...]
#   NAME        pixel_shuffle_projector masked_lm_head masked_linear_cross_entropy attention_lse
#               merge_attention ring_attention prefill hf_patch  (default: all, in this order;
#               hf_patch needs transformers). With --device cpu the default is the CPU set below.
#   --device    cuda (default when a GPU is present): full sizes. cpu: the issue-12 CPU run, each op at
#               the sizes of this 2-core machine, once per dtype in CPU_DTYPES (default "fp32 bf16"),
#               ours side by side with eager and torch.compile (interleaved timing, paired ratios);
#               a few minutes per op. Default set: pixel_shuffle_projector masked_lm_head
#               masked_linear_cross_entropy attention_lse (vs SDPA: 8/2 heads, d 64 and 128, S 2K and 8K).
#   --out       results folder (default benchmarks/out): results.csv, <NAME>.log, plots/<op>.png
#   --timeout   wall-clock limit per script (default 540 s; a script past it is stopped, the rest run)
#   --quick     tiny shapes (the CPU smoke run of the test suite)
# env: BENCH_ARGS  extra arguments for every bench_<op>/prefill script (e.g. "--no-compile" or
#                  "--max-seconds 20"; not for hf_patch, which has its own flags)
#      BENCH_REPS  timed repetitions per measurement (default 20, the issue's minimum; --device cpu: 10
#                  interleaved rounds; --quick: the scripts' 3)
#      CPU_DTYPES  dtypes of a --device cpu run (default "fp32 bf16")
# A folder .whl/ at the repository root holding a liger_kernel wheel is installed (no network, no deps)
# into a temporary site folder first, so the masked CE benchmark can compare with Liger-Kernel.
# After a --device cpu run: python3 benchmarks/cpu_table.py --csv <out>/results.csv --results
# benchmarks/RESULTS.md writes the CPU section of RESULTS.md from the rows.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=benchmarks/out
TIMEOUT=540
QUICK=()
NAMES=()
DEVICE=""
while (($#)); do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --out) OUT_DIR=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) NAMES+=("$1"); shift ;;
  esac
done
ALL=(pixel_shuffle_projector masked_lm_head masked_linear_cross_entropy attention_lse merge_attention ring_attention prefill
     hf_patch)
CPU_SET=(pixel_shuffle_projector masked_lm_head masked_linear_cross_entropy attention_lse)
case "$DEVICE" in
  ""|cuda|cpu) ;;
  *) echo "run_all: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
if [[ $DEVICE == cpu ]]; then
  ((${#NAMES[@]})) || NAMES=("${CPU_SET[@]}")
else
  ((${#NAMES[@]})) || NAMES=("${ALL[@]}")
fi
for name in "${NAMES[@]}"; do
  [[ -f benchmarks/bench_${name}.py ]] || { echo "run_all: no benchmark named '$name' (known: ${ALL[*]})" >&2; exit 2; }
done
mkdir -p "$OUT_DIR"
CSV=$OUT_DIR/results.csv

if compgen -G ".whl/liger_kernel*.whl" > /dev/null; then
  SITE=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/liger_kernel*.whl \
    && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" && echo "run_all: liger_kernel from .whl/ in $SITE"
fi

RUN_ALL_DEVICE=$DEVICE python3 - <<'EOF' || exit 1
import os, torch, vita_ext
info = vita_ext.build_info()
print(f"run_all: torch {torch.__version__}, vita_ext build {info}, {torch.get_num_threads()} CPU threads")
if os.environ["RUN_ALL_DEVICE"] == "cpu":
    print(f"run_all: --device cpu: {os.cpu_count()} cores")
elif torch.cuda.is_available():
    print(f"run_all: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
    if not info["cuda"]:
        raise SystemExit("run_all: a GPU is present but vita_ext was built without CUDA kernels; rebuild with "
                         "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation --no-deps -e .")
else:
    print("run_all: no CUDA device: running on the CPU")
EOF

REPS=(--reps "${BENCH_REPS:-20}")
[[ $DEVICE == cpu ]] && REPS=(--reps "${BENCH_REPS:-10}")
((${#QUICK[@]})) && [[ -z "${BENCH_REPS:-}" ]] && REPS=()  # quick: the scripts' own few reps
failed=()
run_one() {  # run_one NAME LOGNAME [extra args...]
  local name=$1 log=$2 start rc
  shift 2
  start=$(date +%s)
  echo "run_all: $log ..."
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout --kill-after=20 "$TIMEOUT" python3 "benchmarks/bench_${name}.py" --csv "$CSV" \
    "${REPS[@]}" "${QUICK[@]}" "$@" $([[ $name == hf_patch ]] || echo "${BENCH_ARGS:-}") > "$OUT_DIR/$log.log" 2>&1
  rc=$?
  ((rc == 0)) || failed+=("$log (exit $rc$( ((rc == 124)) && echo ", timed out after ${TIMEOUT}s"))")
  echo "run_all: $log exit $rc in $(( $(date +%s) - start )) s (log $OUT_DIR/$log.log)"
  grep -E "^\[[a-z_]+\] .*(skipped|failed|out of memory|cut to)" "$OUT_DIR/$log.log" | head -20
}
for name in "${NAMES[@]}"; do
  if [[ $DEVICE == cpu ]]; then
    extra=()
    [[ $name == masked_lm_head ]] && extra=(--modes fwd,fwd_bwd)
    for dtype in ${CPU_DTYPES:-fp32 bf16}; do
      run_one "$name" "${name}_cpu_$dtype" --device cpu --dtype "$dtype" ${extra[@]+"${extra[@]}"}
    done
  else
    run_one "$name" "$name"
  fi
done

python3 benchmarks/plot.py --csv "$CSV" --out "$OUT_DIR/plots" > "$OUT_DIR/plot.log" 2>&1 \
  && echo "run_all: plots in $OUT_DIR/plots" || { echo "run_all: plot.py failed"; cat "$OUT_DIR/plot.log"; }
if ((${#failed[@]})); then
  printf 'run_all: FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "run_all: all ${#NAMES[@]} benchmarks done; rows in $CSV"
