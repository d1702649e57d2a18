"""JAX against PyTorch: one CIFAR ResNet train step, plain and with LPA, timed round-robin.

One phase of ``python -m experiments.gpu.run_all`` (``python -m experiments.gpu.phases peer``).
The JAX steps are lpa_jax's own, built as the step benchmark builds them
(:func:`experiments.bench.timing.build`: the registry, the optimiser, the jitted, donating
step); the torch steps are :mod:`experiments.bench.torch_peer`'s, from the same initial
parameters and on the same augmented batch.  LPA is the default point's (T = 3, the registry's
``default_point``: ``stage3.block3`` of ResNet-32).  After a warm-up (compiling the JAX steps,
cuDNN autotuning the torch ones) the four are timed in rounds of ``steps`` consecutive steps
each, in the order JAX plain, JAX LPA, torch plain, torch LPA, each side synchronised before
its clock stops (``block_until_ready``, ``torch.cuda.synchronize``).  Every ratio is the
median over rounds of two times of the same round, so drift cancels:

    plain torch/jax = torch plain / JAX plain          (> 1: JAX is faster)
    lpa torch/jax   = torch LPA / JAX LPA
    jax lpa/plain   = JAX LPA / JAX plain              (each side's LPA overhead)
    torch lpa/plain = torch LPA / torch plain

Not run as a doctest: it needs a GPU and torch.

>>> result = run(PEER_DRY, budget_s=60)                                  # doctest: +SKIP
>>> sorted(result["ratios"])                                             # doctest: +SKIP
['jax lpa/plain', 'lpa torch/jax', 'plain torch/jax', 'torch lpa/plain']
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, NamedTuple

import jax
import numpy as np

ORDER = ("jax_plain", "jax_lpa", "torch_plain", "torch_lpa")
RATIOS = {"plain torch/jax": ("torch_plain", "jax_plain"),
          "lpa torch/jax": ("torch_lpa", "jax_lpa"),
          "jax lpa/plain": ("jax_lpa", "jax_plain"),
          "torch lpa/plain": ("torch_lpa", "torch_plain")}
TORCH_MISSING = 'torch is not importable (pip install -e ".[bench]")'


class PeerScale(NamedTuple):
  """What is timed: a CIFAR ResNet of ``depth`` and ``widths``, ``batch`` images, ``steps``
  steps per round, up to ``max_rounds`` rounds (at least ``min_rounds`` if the budget allows)."""
  depth: int
  widths: tuple
  batch: int
  steps: int
  max_rounds: int
  min_rounds: int = 3
  lpa_steps: int = 3


PEER_PAPER = PeerScale(depth=32, widths=(16, 32, 64), batch=128, steps=20, max_rounds=15)
PEER_DRY = PeerScale(depth=8, widths=(4, 4, 4), batch=8, steps=1, max_rounds=3)


def _model_config(scale: PeerScale):
  """``(model name, kwargs)`` building the scale's network with ``get_model``."""
  if tuple(scale.widths) == (16, 32, 64) and f"resnet{scale.depth}" in _models():
    return f"resnet{scale.depth}", {}
  return "resnet20", {"depth": scale.depth, "widths": tuple(scale.widths)}


def _models():
  from lpa_jax.models import MODELS
  return MODELS


def _jax_timer(step, state, batch) -> Callable[[int], float]:
  """``run(n)``: seconds per step of ``n`` consecutive steps, the device drained at the end."""
  box = [state]

  def run(n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
      box[0], metrics = step(box[0], batch)  # the old state was donated: never touch it
    jax.block_until_ready((box[0], metrics))
    return (time.perf_counter() - t0) / n
  return run


def jax_side(scale: PeerScale, log=print) -> tuple[dict, dict]:
  """``({"jax_plain": run, "jax_lpa": run}, context)``: both steps built and compiled; the
  context holds what the torch side copies (initial variables, batch, LPA's point and split)."""
  from experiments.bench import timing
  from lpa_jax.models import get_model
  from experiments import registry
  from lpa_jax.train.step import make_mesh
  name, kwargs = _model_config(scale)
  model = get_model(name, 10, **kwargs)
  point = registry.default_point(model.points)
  mesh = make_mesh(jax.devices()[:1])  # one device, as the torch step runs on one
  data, note = timing.bench_data(scale.batch, 10)
  batch = timing.fixed_batch(data, mesh)
  configs = timing.configurations((point,), (scale.lpa_steps,), point)[:2]  # plain, lpa
  timers = {}
  ctx = dict(point=point, data=note, counts=data.class_counts(), model=model,
             lpa_block=configs[1].pcfg.lpa)
  for key, c in zip(("jax_plain", "jax_lpa"), configs):
    config = timing.experiment_config(name, scale.batch, c.pcfg)
    config.model.kwargs = kwargs
    t0 = time.perf_counter()
    step, state = timing.build(config, data, mesh)
    if key == "jax_plain":  # before the first step donates it
      ctx["variables"] = jax.device_get({"params": state.params, **state.model_state})
    timers[key] = _jax_timer(step, state, batch)
    timers[key](1)  # compiles
    log(f"peer: built and compiled {key} ({time.perf_counter() - t0:.1f} s)")
  ctx["batch"] = jax.device_get(batch)
  return timers, ctx


def _torch_lpa(ctx: dict, net, device, steps: int):
  """The torch LPA at the JAX LPA's point, with the same class split and relative radii."""
  import torch

  import lpa_jax as lj
  from experiments.bench.timing import SPLIT
  from experiments.bench.torch_peer import TorchLPA
  from lpa_jax.perturb import classes
  from lpa_jax.models.staged import depth_below_logits
  b = ctx["lpa_block"]
  depth = depth_below_logits(ctx["model"].points, ctx["point"])
  split = lj.lpa(10, split=SPLIT, class_counts=ctx["counts"], eps=b.eps, delta_eps=b.delta_eps,
                 beta=b.beta, radius_mode=b.radius_mode, depth=depth,
                 num_head=classes.run_num_head(b.num_head, 10)).init().split
  rel = classes.class_radii(split, b.eps, b.delta_eps, b.beta, depth, b.varied)
  return TorchLPA(net.block_index(ctx["point"]),
                  torch.tensor(np.asarray(split.sign_C, np.float32), device=device),
                  torch.tensor(np.asarray(rel, np.float32), device=device), steps=steps)


def torch_side(scale: PeerScale, ctx: dict, log=print) -> tuple[dict, dict]:
  """``({"torch_plain": run, "torch_lpa": run}, info)``, warmed up; raises ImportError where
  torch is missing."""
  import torch

  from experiments.bench.torch_peer import TorchCifarResNet, TorchStep, load_flax_variables
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  torch.backends.cudnn.benchmark = True  # autotuned kernels, as XLA autotunes its own
  torch.backends.cuda.matmul.allow_tf32 = True  # as XLA's default float32 precision on GPU
  torch.backends.cudnn.allow_tf32 = True
  net = TorchCifarResNet(scale.depth, 10, tuple(scale.widths))
  load_flax_variables(net, ctx["variables"])
  net = net.to(device)
  x = torch.from_numpy(np.array(ctx["batch"]["image"])).permute(0, 3, 1, 2).contiguous()
  x, y = x.to(device), torch.from_numpy(np.array(ctx["batch"]["label"])).long().to(device)
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  lpa = _torch_lpa(ctx, net, device, scale.lpa_steps)
  steps = {"torch_plain": TorchStep(copy.deepcopy(net)),
           "torch_lpa": TorchStep(copy.deepcopy(net), lpa=lpa)}
  timers = {}
  for key, step in steps.items():
    def run(n: int, step=step) -> float:
      sync()
      t0 = time.perf_counter()
      for _ in range(n):
        step(x, y)
      sync()
      return (time.perf_counter() - t0) / n
    timers[key] = run
    run(3)  # warm-up: cuDNN's autotuning, the allocator's first blocks
    log(f"peer: warmed up {key}")
  info = dict(torch=torch.__version__, device=str(device),
              device_name=torch.cuda.get_device_name(0) if cuda else "cpu",
              cudnn_benchmark=True, tf32=True, threads=torch.get_num_threads(),
              layout="NCHW (torch default)")
  return timers, info


def time_rounds(timers: dict, steps: int, scale: PeerScale, end: float,
                on_round: Callable | None = None, log=print) -> dict:
  """Per timer its ms/step of each round; rounds run while ``end`` (a ``time.time()``) leaves
  room for another (at least ``min_rounds`` unless that is spent), up to ``max_rounds``."""
  times = {k: [] for k in ORDER if k in timers}
  last = 0.0
  for r in range(scale.max_rounds):
    if r >= scale.min_rounds and time.time() + 1.5 * last > end:
      log(f"peer: budget spent after {r} rounds")
      break
    t0 = time.time()
    for key in times:
      times[key].append(1e3 * timers[key](steps))
    last = time.time() - t0
    log("peer: round {} ".format(r + 1)
        + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in times.items()))
    if on_round is not None:
      on_round(times)
  return times


def summarize(times: dict) -> dict:
  """Medians of each timer and of each ratio over the rounds both timers ran.

  >>> s = summarize({"jax_plain": [1.0, 2.0], "jax_lpa": [1.5, 2.4], "torch_plain": [3.0, 4.0],
  ...                "torch_lpa": [6.0, 6.0]})
  >>> s["median_ms"]["jax_lpa"], s["ratios"]["plain torch/jax"], s["ratios"]["jax lpa/plain"]
  (1.95, 2.5, 1.35)
  """
  median_ms = {k: statistics.median(v) if v else None for k, v in times.items()}
  ratios = {}
  for name, (a, b) in RATIOS.items():
    pairs = list(zip(times.get(a, []), times.get(b, [])))
    ratios[name] = statistics.median(x / y for x, y in pairs) if pairs else None
  return dict(median_ms=median_ms, ratios=ratios, rounds=max(map(len, times.values()), default=0))


def run(scale: PeerScale, budget_s: float, write: Callable | None = None, log=print) -> dict:
  """Builds both sides, times them round-robin within ``budget_s``; the result dict (also
  handed to ``write`` after every round).  Without torch the JAX steps are timed alone and
  ``phase`` says why the torch side was skipped."""
  end = time.time() + budget_s
  timers, ctx = jax_side(scale, log)
  result = dict(settings=dict(scale._asdict(), point=ctx["point"], data=ctx["data"],
                              order=list(ORDER), ratios={k: f"{a} / {b}" for k, (a, b)
                                                         in RATIOS.items()},
                              statistic="median over rounds"),
                jax=dict(jax=jax.__version__, devices=[str(d) for d in jax.devices()],
                         device_kind=jax.devices()[0].device_kind),
                phase=dict(status="ok", reason=None))
  try:
    torch_timers, result["torch"] = torch_side(scale, ctx, log)
    timers.update(torch_timers)
  except ImportError as e:
    result["torch"] = None
    result["phase"] = dict(status="skipped", reason=f"{TORCH_MISSING}: {e}; JAX timed alone")
    log(f"peer: {result['phase']['reason']}")

  def on_round(times):
    result.update(times_ms=times, **summarize(times))
    if write is not None:
      write(result)
  result["finished"] = False  # until the rounds are done (run_all tells a kill by it)
  on_round({k: [] for k in ORDER if k in timers})  # built: a kill from here leaves a file
  times = time_rounds(timers, scale.steps, scale, end, on_round, log)
  result["finished"] = True
  on_round(times)
  return result


def markdown(result: dict) -> str:
  """The peer comparison as a small table: median ms/step per side and the ratios."""
  ms, r = result.get("median_ms", {}), result.get("ratios", {})
  f = lambda v, fmt: "" if v is None else format(v, fmt)
  s = result["settings"]
  out = [f"ResNet-{s['depth']}, batch {s['batch']}, LPA T={s['lpa_steps']} at {s['point']}; "
         f"{s['steps']} steps x {result.get('rounds', 0)} rounds (medians).", "",
         "| step | JAX ms | torch ms | torch/JAX |", "|---|---|---|---|"]
  for kind in ("plain", "lpa"):
    out.append(f"| {kind} | {f(ms.get(f'jax_{kind}'), '.2f')} | "
               f"{f(ms.get(f'torch_{kind}'), '.2f')} | {f(r.get(f'{kind} torch/jax'), '.3f')} |")
  out.append(f"| LPA / plain | {f(r.get('jax lpa/plain'), '.3f')} | "
             f"{f(r.get('torch lpa/plain'), '.3f')} | |")
  if result["phase"]["status"] != "ok":
    out += ["", f"torch side {result['phase']['status']}: {result['phase']['reason']}"]
  return "\n".join(out)
