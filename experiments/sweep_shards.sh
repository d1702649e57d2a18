#!/usr/bin/env bash
# Runs one or more suites as N sweep processes, each pinned to its own core with one XLA
# thread (on the 2-core CPU machine two one-thread processes trained about 1.4x the runs per
# hour of one two-thread process: experiments/results/fmnist_lt_tune/threads.txt), then writes
# each report. The processes use --shard=any: each takes the next run no other process is
# training, so a long run (Manifold Mixup) does not leave a core idle at the end.
#   experiments/sweep_shards.sh ROOT N SUITE [SUITE ...]
# Every suite goes to ROOT/<suite>; rerunning resumes (finished runs are skipped, an
# interrupted one resumes from its checkpoint). On a fresh machine, a suite whose records are
# committed (experiments/results/<suite>/runs) starts from them: its finished and stopped runs
# are skipped. Copy finished records into the repository with:
#   python -m experiments.collect ROOT/<suite> --report
set -euo pipefail
root=$1; n=$2; shift 2
cd "$(dirname "$0")/.."
mkdir -p "$root"
for suite in "$@"; do
  if [ ! -d "$root/$suite/runs" ] && [ -d "experiments/results/$suite/runs" ]; then
    mkdir -p "$root/$suite" && cp -r "experiments/results/$suite/runs" "$root/$suite/"
    echo "$suite: starting from the committed records in experiments/results/$suite"
  fi
  pids=()
  for ((i = 0; i < n; i++)); do
    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      taskset -c $((i % $(nproc))) python -m experiments.sweep \
      --config="experiments/configs/suites.py:$suite" --root="$root/$suite" \
      --shard=any --noreport --noprogress > "$root/$suite.proc$i.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  python -m experiments.report --root="$root/$suite"
done
