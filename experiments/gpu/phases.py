"""The phases of ``python -m experiments.gpu.run_all``; each runs as its own process.

    python -m experiments.gpu.phases throughput --out DIR --budget_s 180 --data FILE
    python -m experiments.gpu.phases peer --out DIR --budget_s 78
    python -m experiments.gpu.phases longtail --out DIR --end_at UNIX_TIME --data FILE \\
        --root /tmp/paper_longtail_cifar10 --state .device_data/paper_lt_state.tar.gz

(``--dry_run``: the CPU sizes of :data:`DRY`.)  Each writes one JSON file in ``DIR``
(:data:`FILES`), atomically, again after every row or round, so a phase killed at its
time limit still leaves what it measured.  Its ``phase`` entry is ``{status, reason}``:
``ok``, ``partial`` (the budget ran out before everything was timed) or ``skipped``
(the peer's torch side, where torch is not importable); ``markdown`` is its table.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from typing import NamedTuple

from experiments.gpu import peer

FILES = dict(throughput="throughput.json", peer="peer.json", longtail="longtail.json",
             state="paper_lt_state.tar.gz")
# The long tail's methods, CE and LPA first so that the first chunk already compares them.
METHOD_ORDER = ("ce", "lpa", "la", "ldam_drw", "lpl", "la_lpl", "lpa_lpl")
TAIL_S = 5.0  # a phase stops starting work this long before its budget ends (writing results)
STARTUP_S = 8.0  # longtail_paper's own start (unpacking the state, loading the data)
# The dry run's task: the paper config shrunk to an MLP, batch 8, 2 epochs, no augmentation
# (crop_flip's compile alone would double the dry run's time on 2 cores).
DRY_OVERRIDES = {"model.name": "mlp", "model.kwargs": {"widths": (16,)}, "optim.batch_size": 8,
                 "optim.num_epochs": 2, "optim.warmup_epochs": 0.0, "train.eval_every": 1,
                 "train.augment": "none",
                 # The paper radius is ResNet-32's; on this MLP at batch 8 it moves the loss by
                 # 1.4 nats in epoch 2, and the trainer's ceiling would stop LPA (measured).
                 "train.max_loss_change": None}


class Scale(NamedTuple):
  """Sizes of every phase: the throughput grid (``ks`` x ``dtypes``, ``steps`` None: a whole
  epoch, ``test_subset`` None: the full test set), the peer's, and the long tail's runs."""
  ks: tuple
  dtypes: tuple
  steps: int | None
  test_subset: int | None
  overrides: dict
  peer: peer.PeerScale
  methods: tuple
  seeds: tuple
  parallel: int


PAPER = Scale(ks=(1, 2, 4, 8), dtypes=("float32", "bfloat16"), steps=None, test_subset=None,
              overrides={}, peer=peer.PEER_PAPER, methods=METHOD_ORDER, seeds=(0, 1, 2),
              parallel=3)
DRY = Scale(ks=(1, 2), dtypes=("float32", "bfloat16"), steps=None, test_subset=None,
            overrides=DRY_OVERRIDES, peer=peer.PEER_DRY, methods=METHOD_ORDER[:2], seeds=(0, 1),
            parallel=2)


def _print(msg: str) -> None:
  print(msg, flush=True)


def _write(path: str, result: dict) -> None:
  from experiments.train.workdir import write_json_atomic
  write_json_atomic(path, result)


def priority(ks, dtypes) -> list[tuple[str, int]]:
  """``(dtype, K)`` in the order they are timed: per dtype the smallest and the largest K
  first (the K = 8 target compares them), then the others.

  >>> priority((1, 2, 4, 8), ("float32", "bfloat16"))[:5]
  [('float32', 1), ('float32', 8), ('bfloat16', 1), ('bfloat16', 8), ('float32', 2)]
  """
  first = [(d, k) for d in dtypes for k in dict.fromkeys((min(ks), max(ks)))]
  return first + [(d, k) for d in dtypes for k in ks if (d, k) not in first]


def throughput_config(scale: Scale):
  """The paper long-tail config (``longtail.py:paper_cifar10``) with the scale's overrides."""
  from experiments.configs.common import validate
  from experiments.configs.longtail import get_config
  from experiments.sweep import apply_overrides
  config = get_config("paper_cifar10")
  apply_overrides(config, scale.overrides)
  return validate(config)


def _sorted_result(parts: list[dict], scale: Scale) -> dict:
  """One result from the per-(dtype, K) results, rows in the table's order, ratios redone."""
  from experiments.bench import throughput as tput
  order = {(d, k): i for i, (d, k) in enumerate((d, k) for d in scale.dtypes for k in scale.ks)}
  rows = sorted((p["rows"][0] for p in parts), key=lambda r: order[(r["dtype"], r["K"])])
  tput.add_ratios(rows)
  result = dict(parts[-1], rows=rows, checks=tput.check(rows))
  result["markdown"] = tput.markdown(result)
  return result


def throughput(scale: Scale, data_file: str, out: str, budget_s: float) -> dict:
  """Times each (dtype, K) of the scale (one compile each) while the budget allows: a group is
  started only if the time left exceeds the last group of that K (or the longest so far)."""
  from experiments.bench import throughput as tput
  from experiments.data.portable import load_portable
  end, path = time.time() + budget_s - TAIL_S, os.path.join(out, FILES["throughput"])
  config, data = throughput_config(scale), load_portable(data_file)
  parts, walls, skipped, groups = [], {}, [], []
  for dtype, k in priority(scale.ks, scale.dtypes):
    guess = walls.get(k, max(walls.values(), default=0.0))
    if parts and time.time() + guess > end:
      skipped.append(dict(dtype=dtype, K=k, reason=f"budget: {end - time.time():.0f} s left, "
                          f"the group takes ~{guess:.0f} s"))
      _print(f"throughput: skipped {dtype} K={k} ({skipped[-1]['reason']})")
      continue
    t0 = time.time()
    parts.append(tput.run(config, ks=(k,), dtypes=(dtype,), steps=scale.steps,
                          test_subset=scale.test_subset, data=data,
                          source="experiments/configs/longtail.py:paper_cifar10", log=_print))
    walls[k] = time.time() - t0
    groups.append(dict(dtype=dtype, K=k, wall_s=walls[k]))
    result = _sorted_result(parts, scale)
    result.update(skipped=skipped, groups=groups,
                  phase=dict(status="partial", reason="still running"))
    _write(path, result)
  result = _sorted_result(parts, scale)
  done = len(parts) == len(scale.ks) * len(scale.dtypes)
  result.update(skipped=skipped, groups=groups, phase=dict(
      status="ok" if done else "partial",
      reason=None if done else f"{len(skipped)} (dtype, K) groups not timed: budget"))
  _write(path, result)
  return result


def run_peer(scale: Scale, out: str, budget_s: float) -> dict:
  """The JAX/torch step comparison (:mod:`experiments.gpu.peer`) within the budget."""
  path = os.path.join(out, FILES["peer"])

  def write(result):
    _write(path, dict(result, markdown=peer.markdown(result)))
  result = peer.run(scale.peer, budget_s - TAIL_S, write, _print)
  write(result)
  return result


def _run_rows(root: str, runs: list[dict]) -> list[dict]:
  """Per planned run: finished / in progress / stopped (by a guard of the trainer; ``reason``)
  / not started, epochs done, test accuracy."""
  import json
  rows = []
  for r in runs:
    d = os.path.join(root, "runs", r["slug"], f"seed{r['seed']}")
    res_path, log = os.path.join(d, "results.json"), os.path.join(d, "metrics.jsonl")
    epochs = sum(1 for _ in open(log)) if os.path.exists(log) else 0
    row = dict(method=r["slug"], name=r["name"], seed=r["seed"], epochs=epochs,
               status="in progress" if epochs or os.path.isdir(d) else "not started")
    stopped = os.path.join(d, "stopped.json")
    if os.path.exists(stopped) and not os.path.exists(res_path):
      with open(stopped) as f:
        row.update(status="stopped", reason=json.load(f).get("reason", "?")[:500])
    if os.path.exists(res_path):
      with open(res_path) as f:
        res = json.load(f)
      row.update(status="finished", test_accuracy=res.get("test_accuracy"),
                 shot_accuracy=res.get("shot_accuracy"), wall_time_s=res.get("wall_time_s"))
    rows.append(row)
  return rows


def longtail(scale: Scale, args) -> dict:
  """One chunk of the paper table (:mod:`experiments.gpu.longtail_paper` ``train``) until
  ``args.end_at``, continuing from ``args.state`` where it exists; packs the state into
  ``out`` and writes what each run reached."""
  from experiments import sweep
  from experiments.gpu import longtail_paper as lp
  from experiments.report import results_table
  signal.signal(signal.SIGINT, signal.default_int_handler)  # the deadline's stop, even if
  state_in = args.state if args.state and os.path.exists(args.state) else None  # ignored
  if state_in is None:
    shutil.rmtree(args.root, ignore_errors=True)  # no state: the table starts afresh
  state_out = os.path.join(args.out, FILES["state"])
  budget = args.end_at - time.time() - STARTUP_S
  sets = [f"{k}={v!r}" for k, v in scale.overrides.items()]
  argv = ["train", "--data", args.data, "--root", args.root, "--save_state", state_out,
          "--methods", ",".join(scale.methods), "--seeds", ",".join(map(str, scale.seeds)),
          "--parallel", str(scale.parallel), "--budget_s", f"{budget:.1f}",
          *(["--state", state_in] if state_in else []), *sum((["--set", s] for s in sets), [])]
  _print(f"longtail: {budget:.0f} s of training, methods {','.join(scale.methods)}, "
         f"state {'from ' + state_in if state_in else 'new'}")
  lp.main(argv)
  runs = sweep.plan(lp.paper_suite(list(scale.methods), list(scale.seeds), scale.overrides))
  rows = _run_rows(args.root, runs)
  size = os.path.getsize(state_out) if os.path.exists(state_out) else None
  status, reason = "ok", None
  if size is None or size > lp.STATE_LIMIT_BYTES:
    status, reason = "error", f"state file {state_out}: {size} bytes"
  result = dict(methods=list(scale.methods), seeds=list(scale.seeds), parallel=scale.parallel,
                budget_s=budget, state_in=state_in, state_out=FILES["state"], state_bytes=size,
                runs=rows, markdown=_longtail_markdown(rows, results_table, args.root),
                phase=dict(status=status, reason=reason))
  _write(os.path.join(args.out, FILES["longtail"]), result)
  return result


def _longtail_markdown(rows, results_table, root) -> str:
  import json
  done = [r for r in rows if r["status"] == "finished"]
  todo = [f"{r['method']} seed{r['seed']}: {r['status']} ({r['epochs']} epochs)"
          for r in rows if r["status"] != "finished"]
  lines = [f"{len(done)} of {len(rows)} runs finished" + ("; " + ", ".join(todo) if todo else "")]
  results = []
  for r in done:
    with open(os.path.join(root, "runs", r["method"], f"seed{r['seed']}", "results.json")) as f:
      results.append(json.load(f))
  return "\n".join(lines + ([""] + [results_table(results)] if results else []))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.gpu.phases",
                              description=__doc__.splitlines()[0])
  p.add_argument("phase", choices=("throughput", "peer", "longtail"))
  p.add_argument("--out", required=True, help="the folder that comes back")
  p.add_argument("--dry_run", action="store_true", help="CPU sizes (DRY)")
  p.add_argument("--budget_s", type=float, default=60.0, help="throughput, peer")
  p.add_argument("--end_at", type=float, help="longtail: time.time() at which training stops")
  p.add_argument("--data", help="the portable data file (throughput, longtail)")
  p.add_argument("--root", default="/tmp/paper_longtail_cifar10", help="longtail: the runs")
  p.add_argument("--state", help="longtail: a packed root to continue from, if it exists")
  args = p.parse_args(argv)
  scale = DRY if args.dry_run else PAPER
  os.makedirs(args.out, exist_ok=True)
  if args.phase == "throughput":
    throughput(scale, args.data, args.out, args.budget_s)
  elif args.phase == "peer":
    run_peer(scale, args.out, args.budget_s)
  else:
    longtail(scale, args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
