#!/usr/bin/env bash
# Runs/hour of one sweep process with 2 XLA threads vs 2 processes with 1 thread each, pinned
# to one core each: the README's main job for 3 epochs (Fashion-MNIST-LT, 14,886 images).
#   experiments/bench/threads.sh OUT.txt
set -euo pipefail
out=$1; tmp=$(mktemp -d)
cd "$(dirname "$0")/../.."
t0=$(date +%s.%N)
python -m experiments.main --workdir="$tmp/two_threads" --config.optim.num_epochs=3 > "$tmp/a.log" 2>&1
t1=$(date +%s.%N)
for i in 0 1; do
  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c $i \
    python -m experiments.main --workdir="$tmp/one_thread$i" --config.optim.num_epochs=3 \
    > "$tmp/b$i.log" 2>&1 &
done
wait
t2=$(date +%s.%N)
{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  python - "$t0" "$t1" "$t2" <<'PY'
import sys
t0, t1, t2 = map(float, sys.argv[1:])
one, two = t1 - t0, (t2 - t1) / 2
print(f"1 process x 2 threads: {one:.1f} s per run; 2 processes x 1 thread: {two:.1f} s per run "
      f"(both running); runs/hour ratio {one / two:.2f}x in favour of "
      f"{'2 x 1 thread' if two < one else '1 x 2 threads'}")
PY
} | tee "$out"
rm -rf "$tmp"
