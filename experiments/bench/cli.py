"""Step-time benchmark: plain training vs LPA at every point, and every registered method.

    python -m experiments.bench --out experiments/results/bench_cpu.json --check
    python -m experiments.bench --quick --points stem,logits --T 1 --only plain,lpa
    python -m experiments.bench --num-classes 1000 --only plain,lpa --T 1,3 --check
    python -m experiments.bench --points stage2,stage3.block1,stage3.block4,stage3 --only plain,lpa
    python -m experiments.bench --rescore experiments/results/bench_gpu.json --check
    python -m experiments.bench --fractions --model resnet110    # F_up/F per point, no timing
    python -m experiments.bench --throughput --k 1,2,4,8 --dtype float32,bfloat16 --out FILE.json

``--throughput`` times whole training runs instead: images/s and runs/hour of K seeds as one
program (:mod:`experiments.bench.throughput`).

Every configuration is built by the library's own run builder and jitted step, handed a
stand-in dataset (:class:`~experiments.bench.timing.BenchData`: one fixed batch, long-tail
class counts) instead of a loaded one.  All steps are compiled first; then the configurations
are timed in *rounds*, round-robin, each round running ``--steps`` consecutive steps of every
configuration.  A row's ratio is the median over rounds of its time divided by plain
training's time *in the same round*, so machine drift (thermal, other processes) cancels
instead of favouring whichever row happened to run in a quiet moment.

For LPA rows the cost model of SPEC §1 is printed beside the measurement:
``1 + T·2F_up/(3F)``, with ``F`` the forward FLOPs of the whole network and ``F_up`` those of
the layers above the point, both read from XLA's ``cost_analysis`` of the train-mode forward
(:mod:`experiments.bench.flops`).
"""
from __future__ import annotations

import argparse
import functools
import json
import os

import jax

from experiments.bench import points as pts
from experiments.bench import report
from experiments.bench import throughput as tput
from experiments.bench.flops import PAPER_FRACTION, cost_model, flop_fractions, flop_source
from experiments.bench.timing import (SPLIT, bench_data, configurations, decompose,
                                      experiment_config, fixed_batch, time_all)
from lpa_jax.models import get_model
from experiments import registry
from lpa_jax.train.step import make_mesh


def _print(msg: str) -> None:
  print(msg, flush=True)  # progress must show when stdout is a file (long runs in background)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.bench",
                              description=__doc__.split("\n")[0])
  p.add_argument("--out", help="write the JSON results here")
  p.add_argument("--model", default=None, help="model name (default resnet32; quick: resnet20)")
  p.add_argument("--batch", type=int, default=None, help="batch size (default 128; quick: 32)")
  p.add_argument("--num-classes", type=int, default=10,
                 help="classes of the synthetic task (default 10): the head gets N outputs and "
                      "the labels spread over N classes, so the FLOP check covers large C")
  p.add_argument("--points", default=None,
                 help="comma list of LPA points, stage or block points (e.g. stage2,"
                      "stage3.block1,stage3); default: every stage point and, where the model "
                      "names blocks, two inside the last stage")
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
  p.add_argument("--fractions", action="store_true",
                 help="only count F_up/F (XLA:CPU, no timing) at every stage point and every "
                      "point inside the last stage, and name the one nearest the published cost")
  p.add_argument("--rescore", metavar="FILE.json",
                 help="recount FLOP fractions, cost model and checks of an earlier run's JSON "
                      "(timings kept) and write it to --out (default: FILE.json itself)")
  t = p.add_argument_group("--throughput: whole runs of experiments/configs/longtail.py:"
                           "paper_cifar10 (--model, --batch override its own)")
  t.add_argument("--throughput", action="store_true",
                 help="images/s and runs/hour of K parallel runs, input pipeline and "
                      "evaluation included (--steps N: N steps instead of a whole epoch)")
  t.add_argument("--k", default="1,2,4,8", help="comma list of parallel runs (seeds)")
  t.add_argument("--dtype", default="float32", help="comma list of compute dtypes, e.g. "
                 "float32,bfloat16 (model.kwargs.dtype)")
  t.add_argument("--n-max", type=int, default=None,
                 help="train on the long tail with this many head-class images (shorter epoch)")
  t.add_argument("--test-subset", type=int, default=None,
                 help="evaluate this many test images and scale the time to the full test set")
  a = p.parse_args(argv)
  if a.throughput:  # --steps stays None (a whole epoch); the config gives model and batch
    return a
  quick = dict(model="resnet20", batch=32, T="1,3", steps=1, repeats=2)
  # ~35 configurations: compiling them all takes minutes on 2 CPU cores, so the defaults keep
  # the timed part to a similar budget.  Raise --repeats where steps are fast (GPU).
  full = dict(model="resnet32", batch=128, T="1,3,5", steps=1, repeats=3)
  for k, v in (quick if a.quick else full).items():
    if getattr(a, k) is None:
      setattr(a, k, v)
  return a


def grid_points(model, wanted: str | None, batch_size: int):
  """``(points, F, fractions)``: the LPA grid's points (``wanted``, or the default of
  :func:`experiments.bench.points.choose_default`) and ``F_up/F`` of every point counted,
  including each block point of the last stage."""
  stages = pts.stage_points(model)
  last = pts.last_stage(model)
  blocks = pts.block_points(model, last)
  chosen = pts.parse_points(model, wanted) if wanted else None
  counted = pts.order(model, list(chosen or stages) + list(blocks) + [last])
  flops, frac = flop_fractions(model, counted, batch_size)
  points = chosen or pts.choose_default(stages, blocks, frac)
  return points, flops, frac


def fractions(args: argparse.Namespace) -> dict:
  """``--fractions``: F and F_up/F at every stage point and every block of the last stage,
  counted without building or timing a train step."""
  model = get_model(args.model, args.num_classes)
  stages = pts.stage_points(model)
  counted = pts.order(model, list(stages) + list(pts.block_points(model, pts.last_stage(model))))
  flops, frac = flop_fractions(model, counted, args.batch)
  return dict(settings=dict(model=args.model, batch=args.batch, num_classes=args.num_classes,
                            flops_forward=flops, flop_fractions=frac, flop_count=flop_source(),
                            flop_mode="train (batch-stat BN)"))


def _select(configs, only: str | None):
  if not only:
    return configs
  keep = {m.strip() for m in only.split(",")}
  names = list(dict.fromkeys(c.method for c in configs))
  if keep - set(names):
    raise ValueError(f"--only: unknown method(s) {sorted(keep - set(names))}; available: "
                     f"{', '.join(names)}")
  return [c for c in configs if c.method == "plain" or c.method in keep]


def run(args: argparse.Namespace, log=_print) -> dict:
  """Runs the benchmark described by ``args`` (see :func:`parse_args`); returns the results."""
  model = get_model(args.model, args.num_classes)
  Ts = tuple(int(t) for t in args.T.split(","))
  mesh = make_mesh(jax.devices()[:args.devices] if args.devices else None)
  if args.batch % mesh.devices.size:
    raise ValueError(f"--batch {args.batch} must be divisible by the {mesh.devices.size} devices")
  last_stage = pts.last_stage(model)
  points, flops, frac = grid_points(model, args.points, args.batch)
  # Rows of methods at their default point name it as the registry resolves "auto".
  configs = _select(configurations(points, Ts, registry.default_point(model.points)), args.only)
  data, data_note = bench_data(args.batch, args.num_classes)
  log(f"experiments.bench: {args.model}, batch {args.batch}, {args.num_classes} classes, "
      f"{len(configs)} configurations on {jax.devices()}; data: {data_note}")
  make_config = functools.partial(experiment_config, args.model, args.batch)
  timed = time_all(configs, make_config, data, mesh, fixed_batch(data, mesh), args.steps,
                   args.repeats, log)
  rows = report.make_rows(configs, timed, frac)
  extra = {}
  if args.decompose:
    log("  timing the cost model's pieces (--decompose)")
    extra["decomposition"] = decompose(model, points, args.batch, flops, frac, args.steps,
                                       args.repeats, rows[0]["ms"], args.num_classes)
  result = dict(
      settings=dict(model=args.model, batch=args.batch, num_classes=args.num_classes,
                    points=list(points), T=list(Ts), steps=args.steps, repeats=args.repeats,
                    split=SPLIT, augment="crop_flip (once, in the input pipeline)",
                    data=data_note, flops_forward=flops, flop_mode="train (batch-stat BN)",
                    flop_count=flop_source(), flop_fractions=frac,
                    ratio="median over rounds of row time / plain time in the same round"),
      machine=report.machine_info(mesh), rows=rows,
      checks=report.check(rows, last_stage, flops / mesh.devices.size / 1e9), **extra)
  report.add_timed_model(result)
  return result


def rescore(result: dict) -> dict:
  """Recounts an existing run's FLOP fractions, cost-model ratios and checks, keeping its
  timings: for files written before FLOPs were always counted on the CPU (a GPU run's
  fractions were then taken from XLA:GPU, which does not count cuDNN convolutions).  The
  fractions depend only on the model, the points and the batch, not on the machine."""
  settings = result["settings"]
  model = get_model(settings["model"], settings.get("num_classes", 10))
  points = [p for p in settings["points"] if p.partition(".")[0] in model.points]
  flops, frac = flop_fractions(model, points, settings["batch"])
  for r in result["rows"]:
    r.setdefault("timed_model", None)
    if r["method"] == "lpa":
      r["flop_fraction_above"] = frac[r["point"]]
      r["model_ratio"] = cost_model(r["T"], frac[r["point"]])
    if result["machine"]["backend"] != "cpu":
      r["step_gflops"] = None  # counted by XLA:GPU/TPU: convolutions missing
  settings.update(flops_forward=flops, flop_fractions=frac,
                  flop_count=flop_source() + " (recounted by --rescore on "
                  f"{report.cpu_name()}; timings unchanged)")
  mesh_devices = result["machine"].get("mesh_devices", 1)
  result["checks"] = report.check(result["rows"], pts.last_stage(model),
                                  flops / mesh_devices / 1e9)
  report.add_timed_model(result)
  return result


def _show(result: dict, with_checks: bool) -> None:
  if "rows" not in result:  # --fractions
    print(report.fractions_markdown(result["settings"]["flop_fractions"], PAPER_FRACTION))
    return
  print(report.markdown(result["rows"]))
  if result.get("decomposition"):
    print(report.decomposition_markdown(result["decomposition"]))
  frac = result["settings"].get("flop_fractions")
  if frac:
    print(report.fractions_markdown(frac, PAPER_FRACTION))
  if with_checks:
    for c in result["checks"]:
      state = {True: "MET", False: "NOT MET", None: "NOT RUN"}[c["ok"]]
      print(f"[{state}] {c['target']}: {c['detail']}")


def throughput(args: argparse.Namespace, write=None) -> dict:
  """``--throughput``: :func:`experiments.bench.throughput.run` on the paper long-tail config;
  ``write(result)`` saves the partial results after every row."""
  from experiments.configs import longtail
  config = longtail.get_config("paper_cifar10")
  if args.model:
    config.model.name = args.model
  if args.batch:
    config.optim.batch_size = args.batch
  return tput.run(config, ks=[int(k) for k in args.k.split(",")],
                  dtypes=[d.strip() for d in args.dtype.split(",")], steps=args.steps,
                  n_max=args.n_max, test_subset=args.test_subset,
                  source="experiments/configs/longtail.py:paper_cifar10", log=_print,
                  on_row=write)


def _write(path: str | None, result: dict) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(result, f, indent=1)


def main(argv=None) -> dict:
  """The command line (see the module docstring); returns the results it printed and wrote."""
  args = parse_args(argv)
  if args.throughput:
    result = throughput(args, functools.partial(_write, args.out))
    print(tput.markdown(result))
    _write(args.out, result)
    if args.out:
      print(f"wrote {args.out}")
    return result
  if args.rescore:
    with open(args.rescore) as f:
      result = rescore(json.load(f))
    args.out = args.out or args.rescore
  elif args.fractions:
    result = fractions(args)
  else:
    result = run(args)
  _show(result, args.check)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
  return result
