"""Sweep runner: a suite's methods × seeds, each run in its own work dir, then the report.

  python -m experiments.sweep --config=experiments/configs/suites.py:longtail_fmnist
  python -m experiments.sweep --config=experiments/configs/suites.py:all --seeds=0
  python -m experiments.sweep --config=experiments/configs/suites.py:smoke --root=/tmp/smoke
  python -m experiments.sweep --config=experiments/configs/suites.py:longtail_fmnist --parallel=3

Layout of a suite root (default ``experiments/results/<suite>``)::

  suite.json                       the plan (task, overrides, methods, configs), seeds, machine
  runs/<method-slug>/seed<k>/      method.json, metrics.jsonl, results.json
  report.md, results.csv, *.png    written by :mod:`experiments.report`

Finished runs (``results.json`` readable, its recorded config the planned one) are skipped;
an interrupted run resumes from its checkpoint.  Runs made with another config stop the sweep
with the differing fields listed (``--stale=rerun`` redoes them); an unreadable
``results.json`` is named and its run redone.  Every file written here is replaced
atomically.  Once a run finishes its ``checkpoints/`` and ``tensorboard/`` dirs are deleted,
so the committed results stay small.  The dataset is loaded once per suite and shared.  A
second sweep of the same root (and shard) is refused while the first works, naming it.  One
root holds one plan: a sweep of another plan than its ``suite.json`` records (task, overrides,
methods) is refused with the differing fields listed (``--stale=rerun`` replaces the record),
unless it plans the same runs (the configs ``suite.json`` records, or for an older record
every run the root holds); one of the same plan adds its seeds.  Under ``--shard=any`` a run
found stale when taken (another plan's process made it since the sweep started) is refused as
``--stale`` says.
``--parallel K`` trains a method's unfinished seeds in groups of up to K as one program (one
vmapped step, :mod:`experiments.train.parallel`); each run's files are those a serial sweep writes.
Ctrl-C (SIGINT) or SIGTERM stops the sweep, whatever the run is doing, with the run's one-line
note of what was saved and status 130 (SIGTERM: 143); it never goes on to the next run.
"""
from __future__ import annotations

from experiments import cli
from experiments.shards import (ANY, lock_name, parse_shard, plan_diff,  # noqa: F401
                                plan_lock, root_lock)

# First of all: a Ctrl-C (SIGTERM) during the imports below already exits 130 (143) in one line.
cli.exit_on_interrupt(lambda: INTERRUPTED)

import copy  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

from absl import app, flags, logging  # noqa: E402

from experiments.train.workdir import STOPPED_FILE  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config("experiments/configs/suites.py:smoke",
                  "Suite config, e.g. experiments/configs/suites.py:longtail_fmnist")
flags.DEFINE_string("root", None, "Suite root (default experiments/results/<suite>); with "
                    "several suites, the parent of their roots.")
flags.DEFINE_list("seeds", None, "Override the suite's seeds, e.g. --seeds=0,1.")
flags.DEFINE_list("methods", None, "Run only these methods of the suite, by run directory name "
                  "(slug), e.g. --methods=erm-45,lpa-all-positive-45: a sample rerun of a "
                  "committed suite to check it reproduces (experiments.compare).")
flags.DEFINE_bool("progress", True, "Show the overall progress bar.")
flags.DEFINE_bool("report", True, "Write the report after the runs.")
flags.DEFINE_enum("stale", "refuse", ["refuse", "rerun"], "Runs whose recorded config differs "
                  "from the suite's plan: stop and list them (refuse), or redo them (rerun).")
flags.DEFINE_string("shard", None, "I/N: run only the planned runs whose index is I modulo N "
                    "(0-based), so N processes share one suite, e.g. one XLA thread each on N "
                    "cores; each still checks every run for staleness. 'any': take the next "
                    "run no other process is training (any number of processes, started "
                    "alike, share the plan as they free up; not mixed with I/N).")
flags.DEFINE_integer("parallel", 1, "Train up to K seeds of a method as one program (one "
                     "vmapped step, experiments.train.parallel); 1 trains them one by one. For "
                     "accelerators: XLA:CPU runs vmapped convolutions slower than K plain ones.",
                     lower_bound=1)
flags.DEFINE_bool("traceback", False, "Show the traceback of errors that otherwise print one "
                  "message (bad values, stale runs, refusals, a full disk).")

INTERRUPTED = ("Interrupted; rerun the same command to continue the sweep (finished runs are "
               "kept, an interrupted one resumes from its last checkpoint).")

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
# Method-dict keys that are labels, not config overrides: ``point`` marks a point sweep;
# ``domain`` (the held-out domain's name) and ``base`` (the method without it) mark a
# leave-one-domain-out suite, which the report tabulates per domain.
META_KEYS = ("name", "point", "domain", "base")


def slug(name: str) -> str:
  """A method's directory name: ``"LPA+LPL"`` -> ``"lpa-lpl"``, ``"LPA @ stage1"`` ->
  ``"lpa-stage1"``."""
  return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "method"


def task_config(task: str):
  """``"longtail.py:quick"`` -> that task's ConfigDict (``get_config(variant)``)."""
  fname, _, variant = task.partition(":")
  module = importlib.import_module(f"experiments.configs.{fname.removesuffix('.py')}")
  return module.get_config(variant) if variant else module.get_config()


def apply_overrides(config, overrides) -> None:
  """Sets dotted ``key: value`` pairs, as ``--config.key=value`` would; unknown keys fail
  with the valid ones listed."""
  for key, value in dict(overrides).items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"Unknown config field {key!r}; {'.'.join(parents) or 'config'} has "
                     f"{', '.join(sorted(node.keys()))}")
    node[leaf] = tuple(value) if isinstance(value, list) else value


def plan(suite, seeds=None, methods=None) -> list[dict]:
  """The runs of a suite: one dict per (method, seed) with its name, slug, seed and config;
  ``methods`` (slugs) keeps only those methods, and a slug the suite lacks is an error that
  lists the suite's.

  >>> from experiments.configs import suites
  >>> runs = plan(suites.get_config("smoke"))
  >>> [(r["name"], r["seed"]) for r in runs]
  [('CE', 0), ('LPA', 0)]
  """
  from experiments.configs.common import validate
  seeds = tuple(int(s) for s in (seeds if seeds is not None else suite.seeds))
  slugs = [slug(m["name"]) for m in suite.methods]
  if len(set(slugs)) != len(slugs):
    raise ValueError(f"Method names must give distinct directory names, got {slugs}")
  unknown = sorted(set(methods or ()) - set(slugs))
  if unknown:
    raise ValueError(f"Suite {suite.name!r} has no method(s) {unknown}; its methods are: "
                     f"{', '.join(slugs)}")
  runs = []
  for method, s in zip(suite.methods, slugs):
    if methods and s not in methods:
      continue
    for seed in seeds:
      config = copy.deepcopy(task_config(suite.task))
      apply_overrides(config, dict(suite.overrides))
      apply_overrides(config, {k: v for k, v in method.items() if k not in META_KEYS})
      config.seed = seed  # data.seed stays fixed: same subset / noise / split for every run
      runs.append({"name": method["name"], "slug": s, "seed": seed,
                   "point": method.get("point"), "domain": method.get("domain"),
                   "base": method.get("base"), "config": validate(config)})
  return runs


def machine() -> dict:
  import jax
  from experiments.train.results import host_cpu
  return {"platform": platform.platform(), "processor": host_cpu(),
          "python": platform.python_version(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}


def _clean(workdir: str) -> None:
  # Checkpoints are only needed to resume; a finished run keeps results + metrics only.
  for sub in ("checkpoints", "tensorboard"):
    shutil.rmtree(os.path.join(workdir, sub), ignore_errors=True)


def run_status(workdir: str, config) -> tuple[str, str]:
  """``(status, detail)`` of a planned run's work dir: ``'todo'``, ``'finished'``,
  ``'unreadable'`` (results.json cut short or not JSON: run again), ``'stopped'`` (a guard of
  the trainer stopped it, ``stopped.json`` says why; ``detail`` is the reason) or ``'stale'``
  (made with another config; ``detail`` lists the fields)."""
  from experiments.train.workdir import CONFIG_FILE, config_diff, describe_diff, read_json
  results_path = os.path.join(workdir, "results.json")
  recorded, status, unreadable = None, "todo", ""
  stopped = os.path.join(workdir, STOPPED_FILE)
  if os.path.exists(stopped) and not os.path.exists(results_path):
    try:  # a run the trainer's guards stopped: rerunning it would stop again the same way
      status, unreadable = "stopped", read_json(stopped)["reason"]
    except (ValueError, OSError, KeyError, TypeError):
      status = "todo"  # a cut-short record: train (resume) it again
  if os.path.exists(results_path):
    try:
      recorded, status = read_json(results_path).get("config"), "finished"
    except (ValueError, OSError, AttributeError) as e:
      status, unreadable = "unreadable", str(e)
  if recorded is None and os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    try:  # an interrupted run: its checkpoint belongs to the config it recorded
      recorded = read_json(os.path.join(workdir, CONFIG_FILE))
    except (ValueError, OSError):
      return status, unreadable
  diff = config_diff(recorded, config) if isinstance(recorded, dict) else []
  if diff:  # an unreadable results.json beside the config.json of another plan: stale too
    return "stale", describe_diff(diff) + (f"\n  (and {unreadable})" if unreadable else "")
  return status, unreadable


def _workdir(root: str, r: dict) -> str:
  return os.path.join(root, "runs", r["slug"], f"seed{r['seed']}")


class StaleRuns(ValueError):
  """Finished or started runs of a suite were made with a config other than the planned one."""


class OtherPlan(StaleRuns):
  """The suite root's ``suite.json`` records a plan other than the sweep's."""


def check_stale(runs, statuses, root, stale: str) -> None:
  """Raises :class:`StaleRuns` listing the runs whose status is ``'stale'`` (see
  :func:`run_status`), unless ``stale == 'rerun'``."""
  bad = [(r, detail) for r, (status, detail) in zip(runs, statuses) if status == "stale"]
  if bad and stale != "rerun":
    lines = [f"{_workdir(root, r)}:\n{d}" for r, d in bad]
    raise StaleRuns(
        f"{len(bad)} run(s) under {root} were made with a config other than the suite's "
        "plan; their results would be reported under settings they were not trained with:\n"
        + "\n".join(lines) + "\nRerun them with --stale=rerun, or use another --root.")


def suite_plan(suite) -> dict:
  """The fields of ``suite.json`` that make the plan (:func:`~experiments.shards.plan_diff`)."""
  return {"suite": suite.name, "task": suite.task,
          "overrides": [[k, v] for k, v in suite.overrides],
          "methods": [dict(m) for m in suite.methods]}


def read_meta(root: str, say: bool = False) -> dict | None:
  """``root/suite.json``, or None when there is none or it cannot be read (then said when
  ``say``: this sweep's plan replaces it)."""
  from experiments.train.workdir import read_json
  path = os.path.join(root, "suite.json")
  if not os.path.exists(path):
    return None
  try:
    return read_json(path)
  except (ValueError, OSError) as e:
    if say:
      cli.say(f"{path} cannot be read, replacing it with this sweep's plan: {e}")
    return None


def planned_configs(suite) -> dict:
  """Each method's planned config (slug -> config dict, seed left out): what the plan makes,
  however its overrides are spelled."""
  from experiments.train.workdir import config_dict
  return {r["slug"]: {k: v for k, v in config_dict(r["config"]).items() if k != "seed"}
          for r in plan(suite, seeds=[0])}


def same_runs(recorded: dict, planned: dict, root: str) -> tuple[bool, str]:
  """Whether a ``suite.json`` whose plan is spelled otherwise than this sweep's (another
  override list, a default now stated) plans the same runs as ``planned``
  (:func:`planned_configs`), and how that was decided.  With the planned configs it records
  (``configs``), compared per method; for an older record without them, from the runs under
  ``root``: the same methods, each with at least one recorded run and every recorded run's
  config the planned one (seed apart)."""
  from experiments.train.workdir import config_diff, recorded_config
  names = {m.get("name") for m in recorded.get("methods", []) if isinstance(m, dict)}
  if {slug(str(n)) for n in names} != set(planned):
    return False, "other methods"
  def differs(old, new):
    return [d for d in config_diff(old, new) if d[0] != "seed"]
  if isinstance(recorded.get("configs"), dict):
    same = all(isinstance(recorded["configs"].get(k), dict)
               and not differs(recorded["configs"][k], c) for k, c in planned.items())
    return same, "the planned configs it records"
  for k, config in planned.items():
    folder = os.path.join(root, "runs", k)
    seeds = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    found = [c for c in (recorded_config(os.path.join(folder, d)) for d in seeds
                         if d.startswith("seed")) if c is not None]
    if not found or any(differs(c, config) for c in found):
      return False, "its runs"
  return True, "the configs of every run it holds"


def write_meta(suite, runs, root, same: bool | None = None, configs: dict | None = None) -> None:
  """``root/suite.json``: the suite's plan, its planned configs (``configs``, by default
  :func:`planned_configs`), the seeds of ``runs`` and the machine.  A record of the same plan
  (``same``; by default, the same spelling: :func:`plan_diff`) keeps its seeds and machines
  beside these (``machines`` lists them when several sweeps of the plan ran on different
  machines); one of another plan is replaced."""
  from experiments.train.workdir import write_json_atomic
  meta = {"suite": suite.name, "description": suite.description, **suite_plan(suite),
          "seeds": sorted({r["seed"] for r in runs}), "machine": machine(),
          "configs": planned_configs(suite) if configs is None else configs}
  recorded = read_meta(root)
  if same is None:
    same = isinstance(recorded, dict) and not plan_diff(recorded, meta)
  if same and isinstance(recorded, dict):
    meta["seeds"] = sorted(set(meta["seeds"]) | {int(s) for s in recorded.get("seeds", ())})
    machines = recorded.get("machines") or [recorded.get("machine")]
    machines = [m for m in machines if m] + [meta["machine"]]
    plain = [json.dumps(m, sort_keys=True, default=list) for m in machines]
    machines = [m for i, m in enumerate(machines) if plain[i] not in plain[:i]]
    if len(machines) > 1:
      meta["machines"] = machines
  write_json_atomic(os.path.join(root, "suite.json"), meta)


def record_plan(suite, runs, statuses, root, stale: str) -> None:
  """Checks ``root``'s ``suite.json`` holds ``suite``'s plan (else raises :class:`OtherPlan`
  naming the differing fields, unless ``stale == 'rerun'``), checks the runs for staleness
  (:func:`check_stale`), then writes it (:func:`write_meta`), under the root's plan lock.  A
  record spelled otherwise that plans the same runs (:func:`same_runs`) is the same plan: the
  sweep says so and records its own spelling, keeping the record's seeds."""
  from experiments.train.workdir import describe_diff
  with plan_lock(root):
    recorded = read_meta(root, say=True)
    diff = plan_diff(recorded, suite_plan(suite))  # none when there is no readable record
    planned, same = planned_configs(suite), not diff
    if diff:
      same, how = same_runs(recorded, planned, root)
      path = os.path.join(root, "suite.json")
      if same:
        cli.say(f"{path} spells the plan otherwise ({', '.join(d[0] for d in diff)}) but "
                f"plans the same runs (by {how}); recording this sweep's spelling.")
      elif stale != "rerun":
        raise OtherPlan(
            f"{path} records a plan other than this sweep's; one root holds the runs of one "
            f"plan:\n{describe_diff(diff)}\nUse another --root, or --stale=rerun to record this "
            "plan instead (its runs made with another config are then redone).")
    check_stale(runs, statuses, root, stale)
    write_meta(suite, runs, root, same, planned)


def run_suite(suite, root: str, seeds=None, progress: bool = True, report: bool = True,
              stale: str = "refuse", parallel: int = 1, shard: tuple[int, int] = (0, 1),
              methods=None) -> dict:
  """Runs every unfinished (method, seed) of ``suite`` under ``root``; returns counts
  ``{"ran": n, "skipped": m, "stopped": k}``.  Writes the report at the end when ``report``.
  A run stopped by one of the trainer's guards (too strong a perturbation, none at all) is
  recorded in ``stopped.json`` in its work dir and the sweep goes on; later sweeps skip it.

  A finished run counts only if its recorded config is the planned one: stale runs stop the
  sweep before anything runs (:class:`StaleRuns`), or are rerun afresh with
  ``stale='rerun'``.  A ``results.json`` that cannot be read is named and its run redone.
  ``parallel`` K > 1 trains a method's unfinished seeds in groups of up to K as one program.
  ``shard`` ``(i, n)`` runs only the planned runs with index ``i`` modulo ``n``.  Another
  sweep of the same shard working under ``root`` raises :class:`~experiments.train.lock.Busy`
  naming it.  ``shard`` :data:`ANY` runs every run no other process is training (it skips
  a run whose work dir another process holds, and one finished meanwhile), so several such
  sweeps of one root share its runs as they free up (with ``parallel`` 1); one of them that
  finds a run made meanwhile by a process of another plan raises :class:`StaleRuns` (or redoes
  it with ``stale='rerun'``).  A ``root`` whose ``suite.json`` records another plan raises
  :class:`OtherPlan` before anything runs (``stale='rerun'``: the record is replaced).
  ``methods`` (slugs) runs only those methods (:func:`plan`).
  """
  if shard == ANY and parallel > 1:
    raise ValueError("--shard=any takes one run at a time: use --parallel=1")
  runs = plan(suite, seeds, methods)
  with root_lock(root, shard):
    return _run_planned(suite, runs, root, progress, report, stale, parallel, shard)


def _run_planned(suite, runs, root, progress, report, stale, parallel, shard) -> dict:
  from experiments.train.workdir import remove_leftovers
  workdirs = [_workdir(root, r) for r in runs]
  statuses = [run_status(w, r["config"]) for w, r in zip(workdirs, runs)]
  record_plan(suite, runs, statuses, root, stale)
  remove_leftovers(root)
  cache, counts, todo = {}, {"ran": 0, "skipped": 0, "stopped": 0}, []
  bar = cli.progress_bar(len(runs), suite.name, progress)
  for k, (r, workdir, (status, detail)) in enumerate(zip(runs, workdirs, statuses)):
    if shard != ANY and k % shard[1] != shard[0]:
      bar.update(1)
      continue
    if status == "finished":
      _clean(workdir)  # a kill between results.json and the clean-up left checkpoints
      counts["skipped"] += 1
      bar.update(1)
      continue
    if status == "stopped":
      cli.say(f"{suite.name}: {r['name']} seed {r['seed']} was stopped earlier, not rerun "
              f"(delete {os.path.join(workdir, STOPPED_FILE)} to try again): "
              f"{detail.splitlines()[0][:300]}")
      counts["stopped"] += 1
      bar.update(1)
      continue
    if status == "unreadable":
      cli.say(f"{suite.name}: running {r['name']} seed {r['seed']} again: {detail}")
    todo.append((r, workdir, status))
  for group in groups(todo, parallel):
    bar.set_postfix_str(f"{group[0][0]['name']} seed "
                        f"{','.join(str(r['seed']) for r, _, _ in group)}")
    try:
      results = (_run_group(group, cache) if shard != ANY else
                 _take_run(group[0], cache, stale))
      if results is None:  # another process has it, or finished it meanwhile
        counts["skipped"] += 1
        bar.update(1)
        continue
    except guard_errors() as e:  # this method's runs stop the same way; the suite's others go on
      record_stopped(group, e)
      for r, _, _ in group:
        cli.say(f"{suite.name}: {r['name']} seed {r['seed']} STOPPED: {str(e)[:300]}")
      counts["stopped"] += len(group)
      bar.update(len(group))
      continue
    for (r, workdir, _), res in zip(group, results):
      _clean(workdir)
      counts["ran"] += 1
      bar.update(1)
      cli.say(f"{suite.name}: {r['name']} seed {r['seed']}: test acc "
              f"{100 * res['test_accuracy']:.2f}%  ({res['wall_time_s']:.0f} s)")
  bar.close()
  if report:
    from experiments import report as report_mod
    report_mod.write_report(root)
  return counts


def groups(todo: list, size: int) -> list[list]:
  """Consecutive runs of the same method in groups of up to ``size`` (their configs differ
  only by seed, so each group can train as one program).

  >>> todo = [({"slug": m, "seed": s},) for m in ("ce", "lpa") for s in (0, 1, 2)]   # (run, ...)
  >>> [[r["seed"] for r, *_ in g] for g in groups(todo, 2)]
  [[0, 1], [2], [0, 1], [2]]
  """
  out = []
  for item in todo:
    last = out[-1] if out else None
    if last and len(last) < size and last[0][0]["slug"] == item[0]["slug"]:
      last.append(item)
    else:
      out.append([item])
  return out


def guard_errors():
  """The trainer's guard errors: a run stopped by one is recorded (:func:`record_stopped`) and
  the sweep goes on."""
  from experiments.train.guards import NothingPerturbed, PerturbationTooStrong
  return NothingPerturbed, PerturbationTooStrong


def record_stopped(group: list, error: Exception) -> None:
  """``stopped.json`` (the guard's message, the code version) in each work dir of ``group``;
  its checkpoints stay, so a changed ceiling can resume it."""
  from experiments.train.results import code_version
  from experiments.train.workdir import write_json_atomic
  for _, workdir, _ in group:
    write_json_atomic(os.path.join(workdir, STOPPED_FILE),
                      {"reason": str(error), "error": type(error).__name__,
                       "code": code_version()})


def _take_run(item: tuple, cache: dict, stale: str = "refuse") -> list[dict] | None:
  """``--shard=any``: trains ``item`` (``(run, workdir, status)``) unless another process holds
  its work dir or finished it since this sweep started; ``None`` then.  A run another process
  made with another config meanwhile is stale: :class:`StaleRuns` naming it and the fields,
  unless ``stale == 'rerun'`` (then it is redone)."""
  from experiments.train.lock import Busy, hold
  r, workdir, _ = item
  try:
    with hold(workdir):  # re-entrant: the loop takes the same lock again inside
      status, detail = run_status(workdir, r["config"])
      if status in ("finished", "stopped"):
        return None
      if status == "stale" and stale != "rerun":  # its files stay as they are
        raise StaleRuns(
            f"{workdir} was made with a config other than this sweep's plan, by another "
            f"process since this sweep started; its files are kept:\n{detail}\nRerun with "
            "--stale=rerun to redo it, or use another --root.")
      return _run_group([(r, workdir, status)], cache)
  except Busy:
    return None


def _run_group(group: list, cache: dict) -> list[dict]:
  """Trains one group of ``(run, workdir, status)``: alone, or as one program when several."""
  from experiments.train.workdir import ConfigMismatch
  try:
    return _train_group(group, cache)
  except ConfigMismatch as e:  # the work dir changed after the sweep checked it: its terms
    raise StaleRuns(f"{e.workdir} holds a run of a config other than the suite's plan:\n"
                    f"{e.detail}\nRerun it with --stale=rerun, or use another --root.") from None


def _train_group(group: list, cache: dict) -> list[dict]:
  from experiments import data as lpa_data
  from experiments.train.loop import train_and_evaluate
  from experiments.train.parallel import train_and_evaluate_parallel
  from experiments.train.workdir import write_json_atomic
  for r, workdir, _ in group:
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, "method.json"),
                      {k: r[k] for k in ("name", "slug", "seed", "point", "domain", "base")
                       if k in ("name", "slug", "seed", "point") or r.get(k) is not None})
  configs = [r["config"] for r, _, _ in group]
  workdirs = [w for _, w, _ in group]
  fresh = [status == "stale" for *_, status in group]
  # Methods may override data fields; share one load per distinct data config.
  key = configs[0].data.to_json_best_effort(sort_keys=True)
  if key not in cache:
    cache[key] = lpa_data.load_task_data(configs[0].data)
  if len(group) == 1:
    return [train_and_evaluate(configs[0], workdirs[0], progress=False, data=cache[key],
                               fresh=fresh[0])]
  return train_and_evaluate_parallel(configs, workdirs, progress=False, data=cache[key],
                                     fresh=fresh)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and TFDS are chatty at INFO
  from experiments.configs import suites
  config = FLAGS.config
  names = tuple(config.suites) if "suites" in config else (None,)
  cli.one_line_warnings()
  t0 = time.time()
  # A Ctrl-C in a run: the loop's message names the run and its checkpoint.
  cli.run_guarded(lambda: _run_all(config, names, suites), FLAGS.traceback,
                  lambda: INTERRUPTED, statuses={StaleRuns: 2})
  print(f"sweep wall time: {time.time() - t0:.0f} s")
  return 0


def _run_all(config, names, suites) -> None:
  for name in names:
    suite = suites.get_config(name) if name else config
    if FLAGS.root and name:
      root = os.path.join(FLAGS.root, name)
    else:
      root = FLAGS.root or os.path.join(RESULTS_DIR, suite.name)
    counts = run_suite(suite, root, FLAGS.seeds, FLAGS.progress, FLAGS.report, FLAGS.stale,
                       FLAGS.parallel, parse_shard(FLAGS.shard), FLAGS.methods)
    stopped = (f", {counts['stopped']} STOPPED by the trainer's guards (stopped.json in "
               "their work dirs says why)") if counts["stopped"] else ""
    print(f"{suite.name}: ran {counts['ran']}, skipped {counts['skipped']} finished{stopped}; "
          f"report: {root}/report.md", flush=True)


if __name__ == "__main__":
  app.run(main)
