#!/usr/bin/env bash
# The GPU benchmark, as run on a lent GPU machine (no TensorFlow/TFDS, no internet there).
#
#   pip install --no-deps --target .device_deps ml-collections   # once, where pip works
#   OUT=/some/dir bash experiments/gpu/bench.sh
#
# Two runs of `python -m experiments.bench`, sharing XLA's persistent compilation cache:
#   1. plain vs the LPA grid (every stage point and two block points inside stage 3,
#      T = 1, 3, 5) -- the targets, kept short;
#   2. every configuration (all registered methods); its LPA rows load from the cache; then
#      the cost model's pieces alone (--decompose: ms per GFLOP of forward, backward, PGD).
# 20 steps per round: one ResNet-32 step is milliseconds on a GPU, so a single step would
# time the Python dispatch rather than the device.  LPA_T1 / LPA_T2 bound the two phases in
# seconds (on an H200: ~4 min for phase 1; phase 2 compiles the other methods, ~5 min).
set -u
OUT=${OUT:-experiments/results}
export PYTHONPATH=$PWD/.device_deps${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/lpa_jax_xla_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
PY=${PY:-python3}
$PY -c "import jax, flax, optax, chex; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv || true
timeout ${LPA_T1:-250} $PY -m experiments.bench --only lpa,lpa_lowrank --steps 20 --repeats 5 --check \
  --out "$OUT/bench_gpu_lpa.json" 2>&1 | tee "$OUT/bench_gpu_lpa.log"
timeout ${LPA_T2:-330} $PY -m experiments.bench --steps 20 --repeats 5 --check --decompose \
  --out "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.log"
