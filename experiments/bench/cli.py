"""Step-time benchmark: plain training vs LPA at every point, and every registered method.

    python -m lpa_jax.bench --out experiments/results/bench_cpu.json [--check]
    python -m lpa_jax.bench --quick --points stem,logits --T 1 --only plain,lpa --out /tmp/b.json

Every configuration is built by :class:`lpa_jax.train.loop.Experiment` itself (registry,
optimiser, ``make_train_step`` + ``jit_train_step`` over ``make_mesh``, ``init_state``), handed
a stand-in dataset (:class:`BenchData`: one fixed batch, CIFAR-10-LT class counts) instead of a
loaded one.  All steps are compiled first; then the configurations are timed in *rounds*,
round-robin, each round running ``--steps`` consecutive steps of every configuration.  A row's
ratio is the median over rounds of its time divided by plain training's time *in the same
round*, so machine drift (thermal, other processes) cancels instead of favouring whichever row
happened to run in a quiet moment.  Rows over ``SLOW``x plain are timed in the first round only.

For LPA rows the cost model of SPEC §1 is printed beside the measurement:
``1 + T·2F_up/(3F)``, with ``F`` the forward FLOPs of the whole network and ``F_up`` those of
the layers above the point, both read from XLA's ``cost_analysis`` of the train-mode forward.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lpa_jax.data.longtail import longtail_counts
from lpa_jax.data.sources import CIFAR10_CLASSES
from lpa_jax.data.task import TaskData
from lpa_jax.models import get_model
from lpa_jax.perturb import defaults, registry
from lpa_jax.perturb.hooks import cut_staged, full_apply
from lpa_jax.train.loop import Experiment
from lpa_jax.train.step import make_mesh

NUM_CLASSES = 10
SPLIT = "longtail"  # signs are mixed (+/-) from step 0, so every PGD update is live
TARGET_LAST_STAGE = 1.10
TARGET_MODEL_TOL = 0.15
FLOP_TOL = 0.05  # BN/ReLU backward, the δ gather/scatter and the projection are not free
SLOW = 8.0  # rows slower than this many plain steps are timed in the first round only


class Config(NamedTuple):
  """One benchmarked configuration (one table row)."""
  method: str          # row name: plain, lpa, lpa_lowrank, or a registered method name
  level: str           # none / activation / logit / gradient
  point: str | None
  T: int | None
  pcfg: Any            # the config.perturb block handed to the registry


# ----------------------------------------------------------------------------- building

@dataclasses.dataclass
class BenchData(TaskData):
  """A dataset stand-in: only the fixed batch, but the class counts (and so the split, the
  radii and steps per epoch) of CIFAR-10-LT at IR 100, so no dataset is ever loaded."""
  counts: np.ndarray | None = None

  @property
  def num_train(self) -> int:
    return int(self.counts.sum())

  def class_counts(self) -> np.ndarray:
    return self.counts


def bench_data(batch_size: int, seed: int = 0) -> tuple[BenchData, str]:
  """A :class:`BenchData` holding one fixed batch (its ``x_train, y_train``), and what it is.

  Real CIFAR-10 images when the npz cache already exists (reading it is cheap; building it is
  not, so it is never built here); otherwise a deterministic synthetic batch.
  """
  from lpa_jax.data.sources import cache_path, load_raw, resolve_cache_dir
  rng = np.random.default_rng(seed)
  cache = resolve_cache_dir()
  if any(cache_path(cache, "cifar10", k).exists() for k in ("official", "jpeg75")):
    raw = load_raw("cifar10", download=False)
    idx = rng.permutation(len(raw.y_train))[:batch_size]
    x, y = raw.x_train[idx], raw.y_train[idx]
    note = f"CIFAR-10 ({raw.source}) training images from the npz cache"
  else:
    x = rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
    y = rng.permutation(np.arange(batch_size) % NUM_CLASSES)
    note = ("synthetic uint8 images (no CIFAR-10 cache found; step time does not depend on "
            "pixel values)")
  data = BenchData("cifar10", x, y.astype(np.int32), x[:0], y[:0].astype(np.int32), NUM_CLASSES,
                   list(CIFAR10_CLASSES), counts=longtail_counts(5000, NUM_CLASSES, 100))
  return data, note


def experiment_config(model: str, batch_size: int, pcfg) -> mlc.ConfigDict:
  """The fields :class:`Experiment` reads, set to the SPEC's CIFAR protocol (SGD momentum 0.9,
  weight decay 5e-4, lr 0.1, pad-4 crop + flip), 200 epochs."""
  return mlc.ConfigDict(dict(
      seed=0, data=dict(name="cifar10"), model=dict(name=model, kwargs={}),
      optim=dict(batch_size=batch_size, num_epochs=200, lr=0.1, momentum=0.9, nesterov=False,
                 weight_decay=5e-4, schedule="constant", warmup_epochs=0.0, decay_epochs=(),
                 decay_factors=()),
      train=dict(augment="crop_flip", eval_every=1, checkpoint_every=1), perturb=pcfg))


def build(config, data: BenchData, mesh):
  """``(jitted_step, state)`` built by :class:`Experiment` itself (registry, optimiser,
  ``make_train_step``, ``jit_train_step``, ``init_state``), so the bench times what training
  runs, even as the library's wiring changes."""
  exp = Experiment(config, mesh=mesh, data=data)
  return exp.train_step, exp.init_state()


def configurations(points, Ts, default_point: str) -> list[Config]:
  """Plain, the LPA grid (points x T), the low-rank variant, then every other registered method.

  The registries are read now, not at import, so methods added since still appear.
  """
  blocks = defaults.method_blocks(SPLIT)
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


# ----------------------------------------------------------------------------- FLOPs

def _flops_of(compiled) -> float:
  """FLOPs of a compiled computation (``cost_analysis`` is a dict or a list of dicts)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    return float(sum(c.get("flops", 0.0) for c in cost if c))
  return float((cost or {}).get("flops", 0.0))


def _counting_device():
  """The device whose XLA counts FLOPs faithfully: the host CPU.  XLA:GPU lowers convolutions
  to library calls (cuDNN) that its ``cost_analysis`` does not count (a ResNet-32 forward reads
  as ~2% of its FLOPs there), so fractions taken on a GPU are wrong; FLOPs are a property of
  the maths, not the device, so they are always counted on the CPU backend."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS excludes the CPU: count where we are, and say so
    return None


def _init_variables(model):
  """The model's variables, initialised as the bench's FLOP counts and pieces use them."""
  return model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)


def flop_fractions(model, points, batch_size: int) -> tuple[float, dict[str, float]]:
  """``(F, {point: F_up / F})`` for the train-mode forward (BN on batch statistics), the mode
  the train step runs in; ``upper`` is counted from an activation of the right shape.  Counted
  by XLA:CPU whatever the default backend (see :func:`_counting_device`)."""
  dev = _counting_device()
  put = (lambda t: jax.device_put(t, dev)) if dev is not None else (lambda t: t)
  variables = put(_init_variables(model))
  x = put(jnp.zeros((batch_size, 32, 32, 3), jnp.float32))
  flops = lambda fn, *args: _flops_of(jax.jit(fn).lower(*args).compile())
  full = flops(lambda v, x: full_apply(cut_staged(model, model.points[-1]), v, x, True),
               variables, x)
  frac = {}
  for p in points:
    cut = cut_staged(model, p)
    act = jax.eval_shape(lambda v, x: cut.lower(v, x, True)[0], variables, x)
    act = put(jnp.zeros(act.shape, act.dtype))
    frac[p] = flops(lambda v, a: cut.upper(v, a, True), variables, act) / full
  return full, frac


def flop_source() -> str:
  dev = _counting_device()
  return ("XLA:CPU cost_analysis" if dev is not None
          else f"XLA:{jax.default_backend()} cost_analysis (no CPU backend)")


def cost_model(T: int, frac: float) -> float:
  """SPEC §1: each PGD step re-runs the upper part forward + backward to the activation
  (≈ 2 F_up) on top of a plain step (forward + backward ≈ 3 F)."""
  return 1.0 + T * 2.0 * frac / 3.0


# ----------------------------------------------------------------------------- timing

def _print(msg: str) -> None:
  print(msg, flush=True)  # progress must show when stdout is a file (long runs in background)


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


def step_gflops(step, state, batch) -> float | None:
  """XLA's FLOP count of the compiled step, per device (cached: no second compile).  PGD is
  unrolled, so all T steps are counted (a ``while`` body would count once).  CPU only."""
  if jax.default_backend() != "cpu":
    return None  # XLA:GPU/TPU do not count library convolutions: the number would mislead
  try:
    return _flops_of(step.lower(state, batch).compile()) / 1e9
  except Exception:  # noqa: BLE001 — a diagnostic only
    return None


def time_all(configs, make_config, data, mesh, batch, steps: int, repeats: int, log=_print):
  """Compiles every config (one warm-up step each), then times them round-robin.

  Returns per config ``times_ms`` (per round), ``compile_s``, ``gflops`` and ``note``: a build
  or run failure, or a recompilation after warm-up (the step retraces; its time includes it).
  """
  live = {}
  res = [dict(compile_s=None, gflops=None, times_ms=[], note=None) for _ in configs]
  for i, c in enumerate(configs):
    try:
      t0 = time.perf_counter()
      step, state = build(make_config(c.pcfg), data, mesh)
      state, _ = _time_steps(step, state, batch, 1)  # compiles
      res[i]["compile_s"] = time.perf_counter() - t0
      res[i]["gflops"] = step_gflops(step, state, batch)
      live[i] = (step, state, _cache_size(step))
      log(f"  built {_label(c)} in {res[i]['compile_s']:.1f}s")
    except Exception as e:  # noqa: BLE001 — a broken method becomes a row with a note
      res[i]["note"] = _error(e)
      log(f"  FAILED {_label(c)}: {res[i]['note']}")
      if os.environ.get("LPA_BENCH_DEBUG"):
        traceback.print_exc()
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


def _label(c: Config) -> str:
  return c.method + (f"@{c.point}" if c.point else "") + (f" T={c.T}" if c.T else "")


# ----------------------------------------------------------------------------- decomposition

def decompose(model, points, batch_size: int, flops: float, frac: dict, steps: int,
              repeats: int, plain_ms: float | None = None) -> list[dict]:
  """Times the pieces the cost model adds up, on the run's device, with the FLOPs it assumes.

  ``forward`` (F), ``forward+backward`` (parameter gradients: 3F) and, per point, one
  ``PGD step`` (the upper layers forward and back to the activation: 2F_up), each as
  ms and ms per GFLOP -- the cost model holds where those rates are equal.  ``plain_ms``
  (the full train step, if timed) is shown against 3F too.
  """
  variables = _init_variables(model)
  x = jax.random.normal(jax.random.PRNGKey(0), (batch_size, 32, 32, 3), jnp.float32)
  y = jnp.arange(batch_size) % NUM_CLASSES
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
    act = jax.jit(lambda v, x: cut.lower(v, x, True)[0])(variables, x)
    upper = lambda a, cut=cut: ce(cut.upper(variables, a, True)[0])
    pieces.append((f"PGD step at {p}", 2.0 * frac[p], jax.jit(jax.value_and_grad(upper)),
                   (act,)))
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


def _within(lpa_rows, key: str, target: str) -> dict:
  """A check that every row's measured ratio lies within ``TARGET_MODEL_TOL`` of ``row[key]``."""
  bad = [r for r in lpa_rows if abs(r["ratio"] / r[key] - 1) > TARGET_MODEL_TOL]
  return dict(target=target, ok=not bad if lpa_rows else None,
              detail="; ".join(f"{r['point']} T={r['T']}: {r['ratio']:.2f} vs {r[key]:.2f}"
                               for r in bad) or f"{len(lpa_rows)} rows")


def add_timed_model(result: dict) -> None:
  """With a decomposition, each LPA row gets ``timed_model = 1 + T·t_PGD(point)/t_plain``:
  the cost model with the pieces' measured times in place of their FLOPs, and a check of the
  rows against it -- LPA costs what its pieces cost, whatever their time per FLOP."""
  pieces = {r["piece"]: r["ms"] for r in result.get("decomposition") or []}
  plain = pieces.get("plain train step")
  if not plain:
    return
  for r in result["rows"]:
    if r["method"] == "lpa":
      t_pgd = pieces.get(f"PGD step at {r['point']}", 0.0)
      r["timed_model"] = 1.0 + r["T"] * t_pgd / plain
  lpa = [r for r in result["rows"] if r["method"] == "lpa" and r["ratio"] is not None
         and r.get("timed_model")]
  result["checks"] = [c for c in result["checks"] if "timed pieces" not in c["target"]] + [
      _within(lpa, "timed_model", f"every LPA row within {TARGET_MODEL_TOL:.0%} of the cost "
              "model with timed pieces (1 + T*t_PGD/t_plain, --decompose)")]


def decomposition_markdown(rows) -> str:
  out = ["| piece | cost-model FLOPs | GFLOP | ms | ms per GFLOP |", "|---|---|---|---|---|"]
  out += [f"| {r['piece']} | {r['model_flops']} | {r['gflops']:.2f} | {r['ms']:.2f} | "
          f"{r['ms_per_gflop']:.3f} |" for r in rows]
  return "\n".join(out)


# ----------------------------------------------------------------------------- report

def make_rows(configs, timed, frac) -> list[dict]:
  """Table rows; ``ratio`` is the median over rounds of (row time / plain time that round)."""
  plain = timed[0]["times_ms"]
  rows = []
  for c, t in zip(configs, timed):
    ms = t["times_ms"]
    ratios = [a / b for a, b in zip(ms, plain)] if ms and plain else []
    f_up = frac.get(c.point) if c.method == "lpa" else None
    rows.append(dict(
        method=c.method, level=c.level, point=c.point, T=c.T,
        ms=statistics.median(ms) if ms else None,
        ratio=statistics.median(ratios) if ratios else None,
        model_ratio=cost_model(c.T, f_up) if f_up is not None else None,
        flop_fraction_above=f_up, step_gflops=t["gflops"], timed_model=None, times_ms=ms,
        compile_s=t["compile_s"], note=t["note"]))
  return rows


def markdown(rows) -> str:
  f = lambda v, fmt: "" if v is None else format(v, fmt)
  timed = any(r.get("timed_model") for r in rows)
  out = ["| method | level | point | T | ms/step | ratio | cost model | F_up/F | XLA GFLOP/step | "
         + ("timed model | " if timed else "") + "note |",
         "|---|---|---|---|---|---|---|---|---|" + ("---|" if timed else "") + "---|"]
  for r in rows:
    out.append(f"| {r['method']} | {r['level']} | {r['point'] or ''} | {r['T'] or ''} | "
               f"{f(r['ms'], '.1f')} | {f(r['ratio'], '.3f')} | {f(r['model_ratio'], '.3f')} | "
               f"{f(r['flop_fraction_above'], '.4f')} | {f(r['step_gflops'], '.1f')} | "
               + (f"{f(r.get('timed_model'), '.3f')} | " if timed else "") + f"{r['note'] or ''} |")
  return "\n".join(out)


def check(rows, last_stage: str, gflops_forward: float | None = None) -> list[dict]:
  """The targets of the benchmark issue, as ``[{target, ok, detail}]`` (``ok`` None: not run).

  With ``gflops_forward`` (F per device, in GFLOP) a third check reads XLA's count of each
  compiled LPA step: it must exceed plain's by ``T·2F_up`` -- the cost model's FLOPs, so the
  layers below the point are never recomputed (that would add ``2(F - F_up)`` per step) --
  within ``FLOP_TOL`` of ``max(T·2F_up, F)``.  Only where step FLOPs were counted (CPU).
  """
  lpa = [r for r in rows if r["method"] == "lpa" and r["ratio"] is not None]
  last = [r for r in lpa if r["point"] == last_stage and r["T"] == 3]
  out = [
      dict(target=f"LPA T=3 at {last_stage} <= {TARGET_LAST_STAGE:.2f}x plain",
           ok=last[0]["ratio"] <= TARGET_LAST_STAGE if last else None,
           detail=f"{last[0]['ratio']:.3f}x" if last else "row not run"),
      _within(lpa, "model_ratio", f"every LPA row within {TARGET_MODEL_TOL:.0%} of the cost model")]
  plain = rows[0].get("step_gflops") if rows and rows[0]["method"] == "plain" else None
  counted = [r for r in rows if r["method"] == "lpa" and r.get("step_gflops") is not None
             and r.get("flop_fraction_above") is not None]
  if gflops_forward and plain and counted:
    err = {id(r): (r["step_gflops"] - plain) - r["T"] * 2 * r["flop_fraction_above"]
           * gflops_forward for r in counted}
    scale = {id(r): max(r["T"] * 2 * r["flop_fraction_above"], 1.0) * gflops_forward
             for r in counted}
    rel = {k: err[k] / scale[k] for k in err}
    off = [r for r in counted if abs(rel[id(r)]) > FLOP_TOL]
    worst = max(counted, key=lambda r: abs(rel[id(r)]))
    out.append(dict(
        target=f"every LPA step adds T*2F_up FLOPs to plain (XLA count, within {FLOP_TOL:.0%} "
               "of max(T*2F_up, F))",
        ok=not off,
        detail="; ".join(f"{r['point']} T={r['T']}: {err[id(r)]:+.2f} GFLOP" for r in off)
        or f"{len(counted)} rows; largest gap {rel[id(worst)]:+.1%} ({worst['point']} "
           f"T={worst['T']})"))
  return out


def _cpu_name() -> str:
  lines = open("/proc/cpuinfo").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
  names = [l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")]
  return names[0] if names else platform.processor()


def machine_info(mesh) -> dict:
  import flax
  import optax
  return dict(platform=platform.platform(), processor=_cpu_name(),
              python=platform.python_version(), cpu_count=os.cpu_count(),
              cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else None, backend=jax.default_backend(),
              devices=[str(d) for d in jax.devices()],
              device_kind=jax.devices()[0].device_kind, mesh_devices=int(mesh.devices.size),
              jax=jax.__version__, flax=flax.__version__, optax=optax.__version__)


# ----------------------------------------------------------------------------- entry point

def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m lpa_jax.bench", description=__doc__.split("\n")[0])
  p.add_argument("--out", help="write the JSON results here")
  p.add_argument("--model", default=None, help="model name (default resnet32; quick: resnet20)")
  p.add_argument("--batch", type=int, default=None, help="batch size (default 128; quick: 32)")
  p.add_argument("--points", default=None, help="comma list of points (default: all)")
  p.add_argument("--T", default=None, help="comma list of LPA PGD steps (default 1,3,5)")
  p.add_argument("--steps", type=int, default=None, help="steps per round (default 1)")
  p.add_argument("--repeats", type=int, default=None, help="rounds (default 3)")
  p.add_argument("--only", default=None,
                 help="comma list of methods to run (plain always runs), e.g. lpa,dropout")
  p.add_argument("--devices", type=int, default=None,
                 help="use only the first N devices for the mesh (default: all)")
  p.add_argument("--quick", action="store_true", help="tiny sizes, for tests and smoke runs")
  p.add_argument("--check", action="store_true", help="print whether the targets are met")
  p.add_argument("--decompose", action="store_true",
                 help="also time the cost model's pieces (forward, forward+backward, one PGD "
                      "step per point) and report ms per GFLOP of each")
  p.add_argument("--rescore", metavar="FILE.json",
                 help="recount FLOP fractions, cost model and checks of an earlier run's JSON "
                      "(timings kept) and write it to --out (default: FILE.json itself)")
  a = p.parse_args(argv)
  quick = dict(model="resnet20", batch=32, T="1,3", steps=1, repeats=2)
  # ~35 configurations: compiling them all takes minutes on 2 CPU cores, so the defaults keep
  # the timed part to a similar budget.  Raise --repeats where steps are fast (GPU).
  full = dict(model="resnet32", batch=128, T="1,3,5", steps=1, repeats=3)
  for k, v in (quick if a.quick else full).items():
    if getattr(a, k) is None:
      setattr(a, k, v)
  return a


def run(args: argparse.Namespace, log=_print) -> dict:
  """Runs the benchmark described by ``args`` (see :func:`parse_args`); returns the results."""
  model = get_model(args.model, NUM_CLASSES)
  points = tuple(model.points)
  if args.points:
    wanted = [p.strip() for p in args.points.split(",") if p.strip()]
    for p in wanted:
      if p not in points:
        raise ValueError(f"Unknown point {p!r} for {args.model}; valid points: {', '.join(points)}")
    points = tuple(p for p in model.points if p in wanted)  # keep bottom-to-top order
  Ts = tuple(int(t) for t in args.T.split(","))
  mesh = make_mesh(jax.devices()[:args.devices] if args.devices else None)
  if args.batch % mesh.devices.size:
    raise ValueError(f"--batch {args.batch} must be divisible by the {mesh.devices.size} devices")
  last_stage = registry.default_point(model.points)
  configs = configurations(points, Ts, last_stage)
  if args.only:
    keep = {m.strip() for m in args.only.split(",")}
    names = list(dict.fromkeys(c.method for c in configs))
    if keep - set(names):
      raise ValueError(f"--only: unknown method(s) {sorted(keep - set(names))}; available: "
                       f"{', '.join(names)}")
    configs = [c for c in configs if c.method == "plain" or c.method in keep]
  data, data_note = bench_data(args.batch)
  batch = jax.device_put({"image": data.x_train, "label": data.y_train},
                         NamedSharding(mesh, P("data")))
  log(f"lpa_jax.bench: {args.model}, batch {args.batch}, {len(configs)} configurations on "
      f"{jax.devices()}; data: {data_note}")
  flops, frac = flop_fractions(model, points, args.batch)
  make_config = functools.partial(experiment_config, args.model, args.batch)
  timed = time_all(configs, make_config, data, mesh, batch, args.steps, args.repeats, log)
  rows = make_rows(configs, timed, frac)
  extra = {}
  if args.decompose:
    log("  timing the cost model's pieces (--decompose)")
    extra["decomposition"] = decompose(model, points, args.batch, flops, frac, args.steps,
                                       args.repeats, rows[0]["ms"])
  result = dict(
      settings=dict(model=args.model, batch=args.batch, points=list(points), T=list(Ts),
                    steps=args.steps, repeats=args.repeats, split=SPLIT, augment="crop_flip",
                    data=data_note, flops_forward=flops, flop_mode="train (batch-stat BN)",
                    flop_count=flop_source(),
                    ratio="median over rounds of row time / plain time in the same round"),
      machine=machine_info(mesh), rows=rows,
      checks=check(rows, last_stage, flops / mesh.devices.size / 1e9), **extra)
  add_timed_model(result)
  return result


def rescore(result: dict) -> dict:
  """Recounts an existing run's FLOP fractions, cost-model ratios and checks, keeping its
  timings: for files written before FLOPs were always counted on the CPU (a GPU run's
  fractions were then taken from XLA:GPU, which does not count cuDNN convolutions).  The
  fractions depend only on the model, the points and the batch, not on the machine."""
  settings = result["settings"]
  model = get_model(settings["model"], NUM_CLASSES)
  points = [p for p in settings["points"] if p in model.points]
  flops, frac = flop_fractions(model, points, settings["batch"])
  for r in result["rows"]:
    r.setdefault("timed_model", None)
    if r["method"] == "lpa":
      r["flop_fraction_above"] = frac[r["point"]]
      r["model_ratio"] = cost_model(r["T"], frac[r["point"]])
    if result["machine"]["backend"] != "cpu":
      r["step_gflops"] = None  # counted by XLA:GPU/TPU: convolutions missing
  settings.update(flops_forward=flops, flop_count=flop_source() + " (recounted by --rescore on "
                  f"{_cpu_name()}; timings unchanged)")
  mesh_devices = result["machine"].get("mesh_devices", 1)
  result["checks"] = check(result["rows"], registry.default_point(model.points),
                           flops / mesh_devices / 1e9)
  add_timed_model(result)
  return result


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.rescore:
    with open(args.rescore) as f:
      result = rescore(json.load(f))
    args.out = args.out or args.rescore
  else:
    result = run(args)
  print(markdown(result["rows"]))
  if result.get("decomposition"):
    print(decomposition_markdown(result["decomposition"]))
  if args.check:
    for c in result["checks"]:
      state = {True: "MET", False: "NOT MET", None: "NOT RUN"}[c["ok"]]
      print(f"[{state}] {c['target']}: {c['detail']}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
