"""What the benchmark builds and times: its configurations, a stand-in dataset, the round-robin
step timer, and the cost model's pieces timed alone (``--decompose``).

>>> data, note = bench_data(batch_size=32, num_classes=100)
>>> configs = configurations(("stage2", "stage3"), (1, 3), "stage3")
>>> [c.method for c in configs][:3]
['plain', 'lpa', 'lpa']
"""
from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
import traceback
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.bench.flops import IMAGE_SHAPE, init_variables, step_gflops
from experiments.configs.methods import method_blocks
from experiments.data.longtail import longtail_counts
from experiments.data.pipeline import dataset_stats, prepare_batch
from experiments.data.sources import CIFAR10_CLASSES
from experiments.data.task import TaskData
from experiments import registry
from lpa_jax.perturb.hooks import cut_staged, full_apply
from experiments.train.build import build_train_step

SPLIT = "longtail"  # signs are mixed (+/-) from step 0, so every PGD update is live
SLOW = 8.0  # rows slower than this many plain steps are timed in the first round only


class Config(NamedTuple):
  """One benchmarked configuration (one table row)."""
  method: str          # row name: plain, lpa, lpa_lowrank, or a registered method name
  level: str           # none / activation / logit / gradient
  point: str | None
  T: int | None
  pcfg: Any            # the config.perturb block handed to the registry


@dataclasses.dataclass
class BenchData(TaskData):
  """A dataset stand-in: only the fixed batch, but the class counts (and so the split, the
  radii and steps per epoch) of a long tail at IR 100, so no dataset is ever loaded."""
  counts: np.ndarray | None = None

  @property
  def num_train(self) -> int:
    return int(self.counts.sum())

  def class_counts(self) -> np.ndarray:
    return self.counts


def bench_data(batch_size: int, num_classes: int = 10, seed: int = 0) -> tuple[BenchData, str]:
  """A :class:`BenchData` holding one fixed batch (its ``x_train, y_train``), and what it is.

  Real CIFAR-10 images when the npz cache already exists (reading it is cheap; building it is
  not, so it is never built here); otherwise a deterministic synthetic batch.  With
  ``num_classes`` other than 10 the labels are synthetic, spread over all classes.
  """
  from experiments.data.sources import cached_file, load_raw
  rng = np.random.default_rng(seed)
  if cached_file("cifar10") is not None:
    raw = load_raw("cifar10", download=False)
    idx = rng.permutation(len(raw.y_train))[:batch_size]
    x, y = raw.x_train[idx], raw.y_train[idx]
    note = f"CIFAR-10 ({raw.source}) training images from the npz cache"
  else:
    x = rng.integers(0, 256, (batch_size,) + IMAGE_SHAPE, dtype=np.uint8)
    y = rng.permutation(np.arange(batch_size) % 10)
    note = ("synthetic uint8 images (no CIFAR-10 cache found; step time does not depend on "
            "pixel values)")
  names = list(CIFAR10_CLASSES)
  if num_classes != 10:
    y = rng.permutation(np.arange(batch_size) % num_classes)
    names = [f"class{c}" for c in range(num_classes)]
    note += f"; synthetic labels over {num_classes} classes"
  data = BenchData("cifar10", x, y.astype(np.int32), x[:0], y[:0].astype(np.int32), num_classes,
                   names, counts=longtail_counts(5000, num_classes, 100))
  return data, note


def fixed_batch(data: BenchData, mesh) -> dict:
  """The step's input: the batch augmented once and normalised, as the input pipeline makes
  it (augmentation is not part of the step), sharded over the mesh."""
  mean, std = dataset_stats(data.name)
  batch = prepare_batch(jax.random.PRNGKey(0), jnp.asarray(data.x_train),
                        jnp.asarray(data.y_train), "crop_flip", mean, std)
  return jax.device_put(batch, NamedSharding(mesh, P("data")))


def experiment_config(model: str, batch_size: int, pcfg) -> mlc.ConfigDict:
  """The fields a run reads, set to the SPEC's CIFAR protocol (SGD momentum 0.9, weight decay
  5e-4, lr 0.1, pad-4 crop + flip), 200 epochs."""
  return mlc.ConfigDict(dict(
      seed=0, data=dict(name="cifar10"), model=dict(name=model, kwargs={}),
      optim=dict(batch_size=batch_size, num_epochs=200, lr=0.1, momentum=0.9, nesterov=False,
                 weight_decay=5e-4, schedule="constant", warmup_epochs=0.0, decay_epochs=(),
                 decay_factors=()),
      train=dict(augment="crop_flip", eval_every=1, checkpoint_every=1), perturb=pcfg))


def build(config, data: BenchData, mesh):
  """``(jitted_step, state)`` from :func:`experiments.train.build.build_train_step`, the wiring
  training runs (registry, optimiser, jitted step, initial state), so the bench times what
  training runs, even as that wiring changes.  Its ``batch_fn`` is not used: the stand-in
  data holds one batch (see :func:`fixed_batch`)."""
  step, state, _ = build_train_step(config, data, mesh)
  return step, state


def configurations(points, Ts, default_point: str) -> list[Config]:
  """Plain, the LPA grid (points x T), the low-rank variant, then every other registered method.

  The registries are read now, not at import, so methods added since still appear.
  """
  blocks = method_blocks(SPLIT)

  def pcfg(activation="none", logit="none", gradient="none", **over):
    c = mlc.ConfigDict(dict(activation=activation, logit=logit, gradient=gradient))
    for name, block in blocks.items():
      c[name] = copy.deepcopy(block)
    for name, fields in over.items():
      c[name].update(fields)
    return c
  out = [Config("plain", "none", None, None, pcfg())]
  for p in points:
    for t in Ts:
      out.append(Config("lpa", "activation", p, t, pcfg("lpa", lpa=dict(point=p, steps=t))))
  out.append(Config("lpa_lowrank", "activation", default_point, 3,
                    pcfg("lpa", lpa=dict(point=default_point, steps=3, lowrank=0.25))))
  for level, table in (("activation", registry.ACTIVATION), ("logit", registry.LOGIT),
                       ("gradient", registry.GRADIENT)):
    for name in table:
      if name in ("none", "lpa"):
        continue
      block = blocks.get(name)
      point = getattr(block, "point", None) if block is not None else None
      if point in ("auto", "default"):
        point = default_point
      out.append(Config(name, level, point, None, pcfg(**{level: name})))
  return out


def label(c: Config) -> str:
  return c.method + (f"@{c.point}" if c.point else "") + (f" T={c.T}" if c.T else "")


def _time_steps(step, state, batch, n: int):
  t0 = time.perf_counter()
  for _ in range(n):
    state, metrics = step(state, batch)  # the old state was donated: never touch it again
  jax.block_until_ready((state, metrics))
  return state, (time.perf_counter() - t0) / n


def _error(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _cache_size(step) -> int | None:
  """Executables the jitted step holds (private jax API, so None where it is missing)."""
  return step._cache_size() if hasattr(step, "_cache_size") else None


def _compile_all(configs, make_config, data, mesh, batch, res, log) -> dict:
  """Builds and runs one step of every config (compiling it); ``{index: live step}``."""
  live = {}
  for i, c in enumerate(configs):
    try:
      t0 = time.perf_counter()
      step, state = build(make_config(c.pcfg), data, mesh)
      state, _ = _time_steps(step, state, batch, 1)  # compiles
      res[i]["compile_s"] = time.perf_counter() - t0
      res[i]["gflops"] = step_gflops(step, state, batch)
      live[i] = (step, state, _cache_size(step))
      log(f"  built {label(c)} in {res[i]['compile_s']:.1f}s")
    except Exception as e:  # noqa: BLE001 — a broken method becomes a row with a note
      res[i]["note"] = _error(e)
      log(f"  FAILED {label(c)}: {res[i]['note']}")
      if os.environ.get("LPA_BENCH_DEBUG"):
        traceback.print_exc()
  return live


def time_all(configs, make_config, data, mesh, batch, steps: int, repeats: int, log=print):
  """Compiles every config (one warm-up step each), then times them round-robin.

  Returns per config ``times_ms`` (per round), ``compile_s``, ``gflops`` and ``note``: a build
  or run failure, or a recompilation after warm-up (the step retraces; its time includes it).
  """
  res = [dict(compile_s=None, gflops=None, times_ms=[], note=None) for _ in configs]
  live = _compile_all(configs, make_config, data, mesh, batch, res, log)
  for r in range(repeats):
    for i in list(live):
      step, state, n_exec = live[i]
      try:
        state, dt = _time_steps(step, state, batch, steps)
      except Exception as e:  # noqa: BLE001
        res[i]["note"], _ = _error(e), live.pop(i)
        continue
      live[i] = (step, state, n_exec)
      res[i]["times_ms"].append(1e3 * dt)
      if n_exec is not None and _cache_size(step) != n_exec and not res[i]["note"]:
        res[i]["note"] = f"step recompiled in round {r + 1} (retracing)"
    if r == 0 and 0 in live:  # bound the run: a pathologically slow row is timed once
      plain = res[0]["times_ms"][0]
      for i in [i for i in live if res[i]["times_ms"][0] > SLOW * plain]:
        live.pop(i)
        res[i]["note"] = res[i]["note"] or f"> {SLOW:g}x plain: timed in one round only"
    log(f"  round {r + 1}/{repeats} done")
  return res


def _pieces(model, points, batch_size: int, frac: dict, num_classes: int) -> list[tuple]:
  """``(name, multiple of F, jitted fn, args)`` for each piece of the cost model."""
  variables = init_variables(model)
  x = jax.random.normal(jax.random.PRNGKey(0), (batch_size,) + IMAGE_SHAPE, jnp.float32)
  y = jnp.arange(batch_size) % num_classes
  ce = lambda logits: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
  top = cut_staged(model, model.points[-1])

  def loss(params, x):
    return ce(full_apply(top, {**variables, "params": params}, x, True)[0])

  pieces = [("forward", 1.0, jax.jit(loss), (variables["params"], x)),
            ("forward+backward", 3.0, jax.jit(jax.grad(loss)), (variables["params"], x))]
  for p in points:
    if frac[p] <= 0:
      continue
    cut = cut_staged(model, p)
    act = jax.jit(lambda v, x, cut=cut: cut.lower(v, x, True)[0])(variables, x)
    upper = lambda a, cut=cut: ce(cut.upper(variables, a, True)[0])
    pieces.append((f"PGD step at {p}", 2.0 * frac[p], jax.jit(jax.value_and_grad(upper)),
                   (act,)))
  return pieces


def decompose(model, points, batch_size: int, flops: float, frac: dict, steps: int,
              repeats: int, plain_ms: float | None = None, num_classes: int = 10) -> list[dict]:
  """Times the pieces the cost model adds up, on the run's device, with the FLOPs it assumes.

  ``forward`` (F), ``forward+backward`` (parameter gradients: 3F) and, per point, one
  ``PGD step`` (the upper layers forward and back to the activation: 2F_up), each as
  ms and ms per GFLOP -- the cost model holds where those rates are equal.  ``plain_ms``
  (the full train step, if timed) is shown against 3F too.  Not run as a doctest: it compiles
  and times ResNet pieces.

  >>> rows = decompose(model, ("stem",), 4, F, frac, steps=1, repeats=1)   # doctest: +SKIP
  >>> [r["piece"] for r in rows]                                          # doctest: +SKIP
  ['forward', 'forward+backward', 'PGD step at stem']
  """
  pieces = _pieces(model, points, batch_size, frac, num_classes)
  times = {name: [] for name, *_ in pieces}
  for _, _, fn, args in pieces:
    jax.block_until_ready(fn(*args))  # compile
  for _ in range(repeats):
    for name, _, fn, args in pieces:
      t0 = time.perf_counter()
      for _ in range(steps):
        out = fn(*args)
      jax.block_until_ready(out)
      times[name].append(1e3 * (time.perf_counter() - t0) / steps)
  rows = []
  for name, mult, _, _ in pieces:
    ms = statistics.median(times[name])
    rows.append(dict(piece=name, model_flops=f"{mult:.3g} F", gflops=mult * flops / 1e9, ms=ms,
                     ms_per_gflop=ms / (mult * flops / 1e9)))
  if plain_ms is not None:
    rows.append(dict(piece="plain train step", model_flops="3 F", gflops=3 * flops / 1e9,
                     ms=plain_ms, ms_per_gflop=plain_ms / (3 * flops / 1e9)))
  return rows
