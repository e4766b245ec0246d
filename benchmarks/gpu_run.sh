#!/usr/bin/env bash
# The whole GPU run of issue 38 in one command (benchmarks/results/README.md says how to run
# it on the lent machine). Writes everything under $OUT as it goes, so a run stopped at its
# time limit still returns what it measured:
#   results.jsonl   every row of every section (one JSON object a line)
#   run.log         everything printed (tables, JSON lines, pytest output)
#   summary.md      the tables and the issue's targets, rewritten after every section
#   kernel_tests.log  the compiled kernel tests' pytest output
#   env.txt         jax.print_environment_info() and nvidia-smi
#
#   bash benchmarks/gpu_run.sh                # on the GPU machine: <= 7 minutes on an H200
#   DRY_RUN=1 bash benchmarks/gpu_run.sh      # or --dry-run: CPU, interpret mode, tiny shapes
#
# Sections, in order, each with a wall-clock budget (seconds; override by environment):
#   calibrate (CALIBRATE_S=20)  8192^3 bf16 matmul, device copy, device/driver/JAX/cuDNN
#   kernel_tests (KERNEL_TESTS_S=75)  pytest of the GPU kernels' tests, compiled: each file
#                                (or conformance class) gets an equal share of the budget,
#                                and -x applies per file (benchmarks/pytest_gpu_run.py)
#   flash (FLASH_S=90)           flash attention against cuDNN, XLA and JAX's Pallas mha
#   paged (PAGED_S=55)           paged decode against JAX's Pallas paged attention and XLA
#   e2e (E2E_S=95)               gpt2_small training tokens/s and MFU, three backend orders
#   score_mods (SCORE_MODS_S=35) bench_attention's score-modifier rows
#   crossover (CROSSOVER_S=35)   FAVOR+ against softmax, time per token against length
# TOTAL_S=405 caps the run: a section gets at most what is left of it. A section past its
# budget is stopped (timeout) and the next one runs. SECTIONS="flash paged" runs only those
# (after calibrate), for a second try in what is left of a lease. Other settings: OUT (default
# /tmp/tx-gpu-run-<date>), PYTHON (default python3), KERNEL_TEST_TIMEOUT (per test, 90 s,
# where pytest-timeout is installed), KERNEL_TEST_FILES (space-separated pytest paths).
set -u -o pipefail

# The command as given, with the settings it took from the environment (for the results).
OVERRIDES=$(env | grep -E '^(DRY_RUN|SECTIONS|TOTAL_S|CALIBRATE_S|KERNEL_TESTS_S|FLASH_S|PAGED_S|E2E_S|SCORE_MODS_S|CROSSOVER_S|KERNEL_TEST_[A-Z]+)=' | sort |
  tr '\n' ' ')
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
DRY=${DRY_RUN:-0}
[ "$DRY" = 0 ] || [ "$DRY" = 1 ] || DRY=1
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_run.sh: unknown argument $arg (use --dry-run)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-/tmp/tx-gpu-run-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
JSONL=$OUT/results.jsonl
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  CALIBRATE_S=${CALIBRATE_S:-60} KERNEL_TESTS_S=${KERNEL_TESTS_S:-60} FLASH_S=${FLASH_S:-90}
  PAGED_S=${PAGED_S:-60} E2E_S=${E2E_S:-90} SCORE_MODS_S=${SCORE_MODS_S:-60}
  CROSSOVER_S=${CROSSOVER_S:-60} TOTAL_S=${TOTAL_S:-400}
fi
CALIBRATE_S=${CALIBRATE_S:-20} KERNEL_TESTS_S=${KERNEL_TESTS_S:-75} FLASH_S=${FLASH_S:-90}
PAGED_S=${PAGED_S:-55} E2E_S=${E2E_S:-95} SCORE_MODS_S=${SCORE_MODS_S:-35}
CROSSOVER_S=${CROSSOVER_S:-35} TOTAL_S=${TOTAL_S:-405}

json_str() {  # a JSON string of $1
  "$PY" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"
}

summarize() {
  "$PY" benchmarks/summarize.py "$OUT" "$@" || echo "gpu_run.sh: summarize failed" >&2
}

# run_section NAME BUDGET: runs section_NAME with SECTION_BUDGET set to the section's budget
# (cut to what is left of TOTAL_S; the section runs its program under `timeout` with it),
# records how it ended, and rewrites summary.md.
run_section() {
  local name=$1 budget=$2 left start_ms elapsed_ms rc timed_out note=""
  left=$(( RUN_END - $(date +%s) ))
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped, the run's budget is spent"
    echo "{\"section\": \"$name\", \"event\": \"section_end\", \"rc\": null, \"seconds\": 0, \"budget_s\": 0, \"timed_out\": false, \"note\": \"skipped: TOTAL_S spent\"}" >>"$JSONL"
    return
  fi
  if [ "$budget" -gt "$left" ]; then budget=$left; note="budget cut to what TOTAL_S left"; fi
  echo "== section $name: budget ${budget}s"
  SECTION_BUDGET=$budget
  start_ms=$(( $(date +%s%N) / 1000000 ))
  "section_$name"
  rc=$?
  elapsed_ms=$(( $(date +%s%N) / 1000000 - start_ms ))
  timed_out=false
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then timed_out=true; fi
  printf '{"section": "%s", "event": "section_end", "rc": %d, "seconds": %d.%03d, "budget_s": %d, "timed_out": %s, "note": %s}\n' \
    "$name" "$rc" $(( elapsed_ms / 1000 )) $(( elapsed_ms % 1000 )) "$budget" "$timed_out" \
    "$(json_str "$note")" >>"$JSONL"
  echo "== section $name: rc=$rc timed_out=$timed_out"
  summarize
  LAST_RC=$rc
}

bench() {  # a Python section of benchmarks/gpu_bench.py, stopped at the section's budget
  local dry=()
  [ "$DRY" = 1 ] && dry=(--dry-run)
  timeout -k 10 "$SECTION_BUDGET" \
    "$PY" benchmarks/gpu_bench.py "$1" --out "$OUT" --budget "$SECTION_BUDGET" "${dry[@]}"
}

section_calibrate() { bench calibrate; }
section_flash() { bench flash; }
section_paged() { bench paged; }
section_e2e() { bench e2e; }
section_score_mods() { bench score_mods; }
section_crossover() { bench crossover; }

section_kernel_tests() {
  local files=() args=(-q -p no:cacheprovider -p tx_paths -p pytest_gpu_run) f cls limit=0
  if [ -n "${KERNEL_TEST_FILES:-}" ]; then
    read -r -a files <<<"$KERNEL_TEST_FILES"
  elif [ "$DRY" = 1 ]; then
    # The dry run checks the plumbing on 3 tests of one file; the GPU run compiles them all.
    echo "kernel_tests (dry run): only the first 3 tests of tests/kernels/test_masks.py"
    files=(tests/kernels/test_masks.py)
    limit=3
  else
    # The GPU kernels first; the CPU kernel's tests (test_cpu_*) are left out: no GPU code.
    for f in test_flash_attention test_paged_attention test_paged_quantised test_score_mods \
             test_linear_attention; do
      [ -f "tests/kernels/$f.py" ] && files+=("tests/kernels/$f.py")
    done
    for cls in TestPallas TestCudnn; do
      grep -q "^class $cls\b" tests/kernels/test_conformance.py 2>/dev/null &&
        files+=("tests/kernels/test_conformance.py::$cls")
    done
    for f in test_masks test_reference; do
      [ -f "tests/kernels/$f.py" ] && files+=("tests/kernels/$f.py")
    done
  fi
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    args+=(--timeout="${KERNEL_TEST_TIMEOUT:-90}")
  fi
  echo "pytest ${args[*]} ${files[*]}"
  GPU_RUN_JSONL=$JSONL GPU_RUN_LIMIT_PER_FILE=$limit \
    GPU_RUN_DEADLINE=$(( $(date +%s) + SECTION_BUDGET - 8 )) \
    timeout -k 10 "$SECTION_BUDGET" "$PY" -m pytest "${args[@]}" "${files[@]}" 2>&1 |
    tee -a "$OUT/kernel_tests.log"
  local rc=$?
  "$PY" -c 'import sys, summarize; print(summarize.kernel_tests_table(summarize.load(sys.argv[1])))' "$JSONL"
  return $rc
}

wanted() {  # SECTIONS="flash paged": only those (calibrate always runs: the others use it)
  [ -z "${SECTIONS:-}" ] || [[ " $SECTIONS " == *" $1 "* ]]
}

main() {
  local git
  RUN_END=$(( $(date +%s) + TOTAL_S ))
  git=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ "$git" != unknown ] && [ -n "$(git status --porcelain 2>/dev/null | head -1)" ]; then
    git="$git (with uncommitted changes)"
  fi
  echo "{\"section\": \"run\", \"event\": \"run_start\", \"date\": \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\", \"dry_run\": $([ "$DRY" = 1 ] && echo true || echo false), \"git\": $(json_str "$git"), \"command\": $(json_str "${OVERRIDES}bash benchmarks/gpu_run.sh $*"), \"total_s\": $TOTAL_S}" >>"$JSONL"
  echo "gpu_run.sh: OUT=$OUT dry_run=$DRY python=$PY total budget ${TOTAL_S}s"
  if [ "$DRY" != 1 ]; then
    command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
    # Pure-Python wheels the image lacks (ml_collections): benchmarks/fetch_wheels.sh.
    if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/tx-gpu-run-site benchmarks/wheels/*.whl &&
        export PYTHONPATH="$PYTHONPATH:/tmp/tx-gpu-run-site"
    fi
  fi
  run_section calibrate "$CALIBRATE_S"
  if [ -f "$OUT/env.txt" ] && [ "$DRY" != 1 ]; then
    { echo; echo "== pip list (the packages tx uses)"
      "$PY" -m pip list 2>/dev/null |
        grep -i -E '^(jax|jaxlib|jax-cuda.*|flax|optax|orbax.*|chex|absl-py|ml.collections|numpy|pytest.*|hypothesis|triton|pyyaml) '
      if [ -f "$OUT/nvidia-smi.txt" ]; then echo; echo "== nvidia-smi"; cat "$OUT/nvidia-smi.txt"; fi
    } >>"$OUT/env.txt"
  fi
  rm -f "$OUT/nvidia-smi.txt"
  if [ "${LAST_RC:-0}" = 3 ]; then
    echo "gpu_run.sh: no GPU here (use --dry-run on a CPU); stopping" >&2
    summarize --brief
    return 3
  fi
  wanted kernel_tests && run_section kernel_tests "$KERNEL_TESTS_S"
  wanted flash && run_section flash "$FLASH_S"
  wanted paged && run_section paged "$PAGED_S"
  wanted e2e && run_section e2e "$E2E_S"
  wanted score_mods && run_section score_mods "$SCORE_MODS_S"
  wanted crossover && run_section crossover "$CROSSOVER_S"
  echo
  summarize --brief
  echo "gpu_run.sh: done; results in $OUT (summary.md has every table)"
}

main "$@" 2>&1 | tee -a "$OUT/run.log"
