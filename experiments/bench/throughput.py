"""Whole-run throughput: images/s and runs/hour of K seeds trained as one program.

    python -m experiments.bench --throughput --k 1,2,4,8 --dtype float32,bfloat16 \
        --out experiments/results/bench_throughput_cpu.json
    python -m experiments.bench --throughput --k 1,8 --steps 3 --test-subset 1000   # slow machine

For each compute dtype (``model.kwargs.dtype``) and each K, the K runs (seeds ``0..K-1``) of the
config (default ``experiments/configs/longtail.py:paper_cifar10``) are built by
:func:`experiments.train.parallel.build_parallel` and driven by the loop's own epoch function
(:func:`experiments.train.loop.run_epoch`), so what is timed is what training runs: batch
gathering and augmentation on device, the vmapped step, the host reading each step's
metrics.  Then each run is evaluated as the loop evaluates it at an epoch's end.  The first
step and the first evaluation compile; they are timed apart (``warmup_s``) and left out.

A run is the config's whole protocol, extrapolated from the measured times::

    protocol_s   = num_epochs * steps_per_epoch * step_s + n_evals * eval_s
    runs_per_hour = K * 3600 / protocol_s
    images_per_s  = K * num_epochs * steps_per_epoch * batch / protocol_s

with ``steps_per_epoch`` that of the config's full training set, ``n_evals`` the epoch-end
evaluations (every ``eval_every`` epochs and the last) plus the final one, and ``eval_s`` the
K runs' evaluation of the full test set (scaled linearly from ``--test-subset`` images when
given).  Checkpoint writes are not included.  ``--steps N`` times N steps instead of a whole
epoch and ``--n-max`` trains on a smaller long tail (both recorded in the row's ``mode``).
Not run as a doctest: it compiles and times training steps.

>>> rows = run(config, ks=(1, 2), dtypes=("float32",), steps=2)["rows"]   # doctest: +SKIP
>>> [r["K"] for r in rows]                                               # doctest: +SKIP
[1, 2]
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import jax

from experiments.bench import report
from experiments import data as lpa_data
from experiments.train import loop, parallel
from experiments.train.build import steps_per_epoch
from experiments.train.evaluate import evaluate_task
from experiments.train.history import MetricLog
from lpa_jax.train.step import make_mesh

TARGET_K, TARGET_SPEEDUP = 8, 4.0  # issue 12: K = 8 at >= 4x the runs/hour of K = 1 (GPU)


def n_evaluations(num_epochs: int, eval_every: int) -> int:
  """Evaluations of one run: at every ``eval_every``-th epoch's end and the last, plus the
  final one that writes ``results.json``.

  >>> n_evaluations(200, 10)
  21
  >>> n_evaluations(15, 4)
  5
  """
  epoch_ends = sum(1 for e in range(1, num_epochs + 1) if e % eval_every == 0 or e == num_epochs)
  return epoch_ends + 1


def protocol(k: int, step_s: float, eval_s: float, num_epochs: int, spe: int, n_evals: int,
             batch: int) -> dict:
  """The K runs' whole protocol from one step's and one evaluation's time (module docstring).

  >>> p = protocol(2, step_s=1.0, eval_s=10.0, num_epochs=3, spe=100, n_evals=2, batch=8)
  >>> p["protocol_s"], p["runs_per_hour"], p["images_per_s"]
  (320.0, 22.5, 15.0)
  """
  seconds = num_epochs * spe * step_s + n_evals * eval_s
  return dict(protocol_s=seconds, runs_per_hour=k * 3600.0 / seconds,
              images_per_s=k * num_epochs * spe * batch / seconds,
              train_images_per_s=k * batch / step_s)


class _Go:
  set = False  # never asks the epoch to stop early


def _steps(prun, state_K, epoch: int, first: int, stop_at: int, k: int):
  """``(state_K, steps_done, seconds)``: the parallel loop's own epoch function, timed."""
  logs, names = [MetricLog() for _ in range(k)], [f"run{i}" for i in range(k)]
  t0 = time.perf_counter()
  state_K, done = loop.run_epoch(prun, state_K, epoch, first, stop_at, logs, loop.NoBar(),
                                 _Go(), names)
  jax.block_until_ready(state_K)
  return state_K, done - first, time.perf_counter() - t0


def _evaluate(prun, state_K, data, runs) -> float:
  """Seconds to evaluate ``runs`` of the K runs as the loop does at an epoch's end."""
  t0 = time.perf_counter()
  for k in runs:
    evaluate_task(prun.run.predict, prun.state_of(state_K, k), data, full=False)
  return time.perf_counter() - t0


def time_group(configs, data, eval_data, mesh, steps: int | None) -> dict:
  """Builds K runs as one program and times a warm-up, then ``steps`` steps (None: a whole
  epoch) and one evaluation of every run; seconds and steps per epoch of ``data``."""
  k = len(configs)
  t0 = time.perf_counter()
  prun = parallel.build_parallel(configs, data, mesh)
  state_K = prun.stack(prun.init_states)
  setup_s = time.perf_counter() - t0
  spe = prun.run.steps_per_epoch
  state_K, _, first_s = _steps(prun, state_K, 0, 0, 1, k)  # compiles the step and the gather
  first_eval_s = _evaluate(prun, state_K, eval_data, [0])  # compiles the evaluation
  n = spe if steps is None else min(steps, spe)
  state_K, done, train_s = _steps(prun, state_K, 1, 0, spe + n, k)
  eval_s = _evaluate(prun, state_K, eval_data, range(k))
  step_s = train_s / done
  return dict(setup_s=setup_s, warmup_s=first_s + first_eval_s,
              compile_s=max(0.0, first_s - step_s) + max(0.0, first_eval_s - eval_s / k),
              timed_steps=done, step_s=step_s, eval_s_timed=eval_s, data_steps_per_epoch=spe)


def _subset_test(data, n: int | None):
  if n is None or n >= len(data.y_test):
    return data
  return dataclasses.replace(data, x_test=data.x_test[:n], y_test=data.y_test[:n])


def _config(config, dtype: str, seed: int, n_max: int | None):
  c = config.copy_and_resolve_references()
  c.model.kwargs.dtype = dtype
  c.seed = seed
  if n_max is not None:
    c.data.n_max = n_max
  return c


def _row(config, dtype, k, timed, spe_full, test_full, test_timed, steps, n_max) -> dict:
  """One table row: the measured times and the protocol extrapolated from them."""
  oc, tc = config.optim, config.train
  eval_s = timed["eval_s_timed"] * test_full / test_timed  # the full test set, per K runs
  p = protocol(k, timed["step_s"], eval_s, oc.num_epochs, spe_full,
               n_evaluations(oc.num_epochs, tc.eval_every), oc.batch_size)
  mode = ("whole epoch" if steps is None or timed["timed_steps"] == timed["data_steps_per_epoch"]
          else f"{timed['timed_steps']} steps")
  if n_max is not None:
    mode += f" of the n_max={n_max} subset"
  if test_timed < test_full:
    mode += f"; eval of {test_timed} test images scaled to {test_full}"
  return dict(dtype=dtype, K=k, mode=mode, step_ms=1e3 * timed["step_s"], eval_s=eval_s,
              **p, protocol_h=p["protocol_s"] / 3600, vs_k1=None, vs_float32=None,
              **{key: timed[key] for key in ("timed_steps", "eval_s_timed", "setup_s",
                                             "warmup_s", "compile_s")})


def add_ratios(rows) -> None:
  """Each row's runs/hour over K = 1's (same dtype) and over float32's (same K), in place."""
  by = {(r["dtype"], r["K"]): r["runs_per_hour"] for r in rows}
  for r in rows:
    base, f32 = by.get((r["dtype"], 1)), by.get(("float32", r["K"]))
    r["vs_k1"] = r["runs_per_hour"] / base if base else None
    r["vs_float32"] = r["runs_per_hour"] / f32 if f32 and r["dtype"] != "float32" else None


def check(rows) -> list[dict]:
  """Issue 12's target per dtype: K = 8 at >= 4x K = 1's runs/hour (``ok`` None: not run).

  >>> check([dict(dtype="float32", K=1, vs_k1=1.0), dict(dtype="float32", K=8, vs_k1=4.5)])
  [{'target': 'float32: K=8 runs/hour >= 4x K=1 (GPU target)', 'ok': True, 'detail': '4.50x'}]
  """
  out = []
  for dtype in dict.fromkeys(r["dtype"] for r in rows):
    hit = [r for r in rows if r["dtype"] == dtype and r["K"] == TARGET_K and r["vs_k1"]]
    out.append(dict(target=f"{dtype}: K={TARGET_K} runs/hour >= {TARGET_SPEEDUP:g}x K=1 "
                           "(GPU target)",
                    ok=hit[0]["vs_k1"] >= TARGET_SPEEDUP if hit else None,
                    detail=f"{hit[0]['vs_k1']:.2f}x" if hit else "K=8 or K=1 not run"))
  return out


def _settings(config, data_full, spe_full, steps, n_max, test_subset, source) -> dict:
  oc = config.optim
  return dict(config=source, dataset=data_full.name, model=config.model.name,
              batch=oc.batch_size, num_epochs=oc.num_epochs, eval_every=config.train.eval_every,
              n_evals=n_evaluations(oc.num_epochs, config.train.eval_every),
              train_images=int(data_full.num_train), steps_per_epoch=spe_full,
              test_images=len(data_full.y_test), steps=steps, n_max=n_max,
              test_subset=test_subset, augment=config.train.augment,
              formula="protocol_s = num_epochs*steps_per_epoch*step_s + n_evals*eval_s; "
                      "runs_per_hour = K*3600/protocol_s; "
                      "images_per_s = K*num_epochs*steps_per_epoch*batch/protocol_s",
              excluded="compilation (warmup_s, compile_s), building the runs (setup_s), "
                       "checkpoint writes")


def run(config, ks=(1, 2, 4, 8), dtypes=("float32",), steps: int | None = None,
        n_max: int | None = None, test_subset: int | None = None, data=None,
        source: str = "", log: Callable = print, on_row: Callable | None = None) -> dict:
  """Times K = ``ks`` parallel runs of ``config`` at each dtype; returns the results dict
  (``settings``, ``machine``, ``rows``, ``checks``).  ``data`` (the full task) skips loading;
  ``on_row(result)`` is called after every row, e.g. to save partial results."""
  data_full = data if data is not None else lpa_data.load_task_data(config.data)
  train_data = data_full
  if n_max is not None:
    train_data = lpa_data.load_task_data(_config(config, "float32", 0, n_max).data)
  mesh = make_mesh()
  spe_full = steps_per_epoch(config, data_full.num_train, mesh)
  eval_data = _subset_test(train_data, test_subset)
  test_full, test_timed = len(data_full.y_test), len(eval_data.y_test)
  result = dict(settings=_settings(config, data_full, spe_full, steps, n_max, test_subset,
                                   source),
                machine=report.machine_info(mesh), rows=[], checks=[])
  # Other jobs on the machine slow every row; the load says how busy it was.
  result["machine"]["load_average_start"] = list(os.getloadavg())
  log(f"throughput: {config.model.name} on {data_full.name}, batch {config.optim.batch_size}, "
      f"K in {list(ks)}, dtypes {list(dtypes)}, on {jax.devices()}")
  for dtype in dtypes:
    for k in ks:
      configs = [_config(config, dtype, seed, n_max) for seed in range(k)]
      timed = time_group(configs, train_data, eval_data, mesh, steps)
      row = _row(config, dtype, k, timed, spe_full, test_full, test_timed, steps, n_max)
      result["rows"].append(row)
      add_ratios(result["rows"])
      result["checks"] = check(result["rows"])
      result["machine"]["load_average_now"] = list(os.getloadavg())
      log(f"  {dtype} K={k}: {row['step_ms']:.0f} ms/step, eval {row['eval_s']:.1f} s, "
          f"{row['runs_per_hour']:.3g} runs/h, {row['images_per_s']:.0f} img/s "
          f"(warm-up {row['warmup_s']:.0f} s; {row['mode']})")
      if on_row is not None:
        on_row(result)
  return result


def markdown(result: dict) -> str:
  """The throughput table and its checks, as docs/benchmarks.md shows them.  ``warm-up s`` is the
  first step and first evaluation (compiling both); ``compile s`` is that less a timed step's
  and evaluation's time, an estimate."""
  f = lambda v, fmt: "" if v is None else format(v, fmt)
  out = ["| dtype | K | timed | ms/step | eval s (K runs) | images/s | runs/hour | x K=1 | "
         "x float32 | warm-up s | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    out.append(f"| {r['dtype']} | {r['K']} | {r['mode']} | {r['step_ms']:.0f} | "
               f"{r['eval_s']:.1f} | {r['images_per_s']:.1f} | {r['runs_per_hour']:.3g} | "
               f"{f(r['vs_k1'], '.2f')} | {f(r['vs_float32'], '.2f')} | "
               f"{r['warmup_s']:.0f} | {r['compile_s']:.0f} |")
  checks = [f"* {({True: 'met', False: 'NOT met', None: 'not run'})[c['ok']]}: {c['target']} "
            f"({c['detail']})" for c in result.get("checks", [])]
  return "\n".join(out + ([""] + checks if checks else []))
