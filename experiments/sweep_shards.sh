#!/usr/bin/env bash
# Runs one or more suites as N sweep processes, each pinned to its own core with one XLA
# thread (on the 2-core CPU machine, 2 x 1 thread trained 1.6x the images/s of 1 x 2
# threads; experiments/results/README.md has the measurement), then writes each report.
#   experiments/sweep_shards.sh ROOT N SUITE [SUITE ...]
# Every suite goes to ROOT/<suite>; rerunning resumes (finished runs are skipped).
set -euo pipefail
root=$1; n=$2; shift 2
cd "$(dirname "$0")/.."
mkdir -p "$root"
for suite in "$@"; do
  pids=()
  for ((i = 0; i < n; i++)); do
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      taskset -c $((i % $(nproc))) python -m experiments.sweep \
      --config="experiments/configs/suites.py:$suite" --root="$root/$suite" \
      --shard="$i/$n" --noreport --noprogress > "$root/$suite.shard$i.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  python -m experiments.report --root="$root/$suite"
done
