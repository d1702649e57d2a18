"""Fills generated blocks in Markdown files, so every number in them comes from a command.

A block is ``<!-- BEGIN key -->`` … ``<!-- END key -->``; its body is replaced by:

* ``suite:<name>`` — the accuracy table of ``experiments/results/<name>`` (mean ± std over
  seeds, from the runs' ``results.json``; the same table as that suite's ``report.md``);
* ``paired:<name>`` — that suite's paired comparisons (mean paired difference with a crossed
  bootstrap 95 % interval, sign-flip and Holm p, per-seed McNemar count; against the first
  method and the best other baseline on validation);
* ``classes:<name>`` — each method's per-class change against the first method, its mean
  change on its expansive and contractive classes and its worst class;
* ``summary:<name>`` — the README's results table: a caption (data, epochs, seeds) and the
  ``classes`` table with a row for the whole test set;
* ``strength:<name>`` — that suite's perturbation-strength table;
* ``rarest:<name>`` — that suite's per-seed test accuracy on its three rarest classes;
* ``domain:<name>``, ``domain-paired:<name>``, ``domain-select:<name>`` — a
  leave-one-domain-out suite's test accuracy per held-out domain, its paired differences
  against ERM at the same domain, and the settings training-domain validation selects;
* ``across:<a>,<b>,...`` — one row per method, one column per suite (e.g. the noise settings):
  mean test accuracy and the paired difference from each suite's first method;
  ``across-best:<a>,<b>,...`` the same for the best epoch's test accuracy (an oracle);
* ``guard:<name>#<slug>`` — a default's guarded selection on validation (the first method the
  baseline, ``<slug>`` the current default's run): each setting's balanced validation
  accuracy, its worst change on a large validation class, its loss change, what it changes
  besides the radius, whether it passes the per-class guard, and the pick
  (:func:`experiments.report_tables.guarded_selection`);
* ``stopped:<name>`` — the epochs of that suite's runs a guard stopped (a single suite);
* ``suites-time`` — the summed wall time of every run of every suite;
* ``time:<name>`` — that suite's run count and summed run wall time (one core per run);
  ``times:<a>+<b>+...`` — the same as a table, one row per suite and the total;

``<name>`` may join suites whose runs share the protocol and pair by seed (the same data,
initialisation and batch order for the same seed): ``main[ce|lpa]+mechanism@0,1,2`` takes
``main``'s methods with run slugs ``ce`` and ``lpa`` (in that order, the first the paired
reference), then every method of ``mechanism``, all at seeds 0, 1, 2.
* ``bench:<path.json>`` — the table and target checks of a ``python -m experiments.bench`` run
  (or, for a ``--fractions`` run, its F_up/F table);
* ``bench-diff:<a.json>,<b.json>`` — how far two such runs' ratios lie apart (noise);
* ``bench-throughput:<path.json>`` — the runs/hour table of a ``--throughput`` run.

    python -m experiments.fill                  # check every document that holds a block
    python -m experiments.fill --write          # rewrite their blocks
    python -m experiments.fill --write docs/benchmarks.md

Without ``--write`` nothing is written: the command names the stale blocks and exits 1 if any
block differs from what it renders now.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys

from experiments import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
BLOCK = re.compile(r"(<!-- BEGIN (\S+) -->\n)(.*?)(<!-- END \2 -->)", re.S)


def suite_table(name: str) -> str:
  """The accuracy table of a suite (or joined suites, :func:`_runs`)."""
  runs = _runs(name)
  cols = [c for c, _ in report.metric_columns(runs)]
  return report.markdown_table(report.summarise(runs), cols)


def summary_table(runs: list[dict]) -> str:
  """What a suite's methods do per class, for the README: a caption (data, epochs, seeds),
  then :func:`report.class_change_table` with one more row, the whole test set: the first
  method's accuracy and each method's mean paired change against it with its crossed-bootstrap
  95 % interval (the ``paired`` table's numbers, to one decimal)."""
  from experiments.report_tables import _comparison
  from experiments.stats import smallest_p
  table = report.class_change_table(runs)
  if not table:
    raise ValueError("summary: the runs have no paired test predictions")
  lines = table.splitlines()
  methods = [c.strip()[:-len(": Δ")] for c in lines[0].split("|")[4:-1]]
  names = list(dict.fromkeys(r["name"] for r in runs))
  by = {n: {r["seed"]: r for r in runs if r["name"] == n} for n in names}
  first, res = by[names[0]], runs[0]["results"]
  cells, seeds_n = [], set()
  for n in methods:
    seeds = sorted(set(by[n]) & set(first))
    d = _comparison(by[n], first, seeds)
    cells.append(f"{100 * d['mean']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]")
    seeds_n.add(len(seeds))
  base_acc = statistics.mean(r["results"]["test_accuracy"] for r in first.values())
  row = (f"| **all classes (test set)** | {res['num_train']} | {100 * base_acc:.1f} | "
         + " | ".join(cells) + " |")
  at = next(i for i, ln in enumerate(lines) if ln.startswith("| **"))
  seeds = "/".join(str(k) for k in sorted(seeds_n))
  plural = lambda k: f"{k} seed" + ("" if str(k) == "1" else "s")  # noqa: E731
  p_min = smallest_p(min(seeds_n))
  caption = (f"{res['dataset']}, {res['num_train']} training images, "
             f"{res['config']['optim']['num_epochs']} epochs, {plural(seeds)} per method. Δ: "
             f"change in test accuracy against {names[0]} (points), mean over seeds "
             "[crossed-bootstrap 95 % interval].")
  if p_min >= 0.05:
    caption += (f" With {plural(min(seeds_n))} no sign-flip p can fall below {p_min:.3g}, so "
                "no difference here is a shown one at p < 0.05.")
  return "\n".join([caption, "", *lines[:at], row, *lines[at:]])


def suites_time() -> str:
  total, n = 0.0, 0
  for name in sorted(os.listdir(RESULTS)):
    if os.path.isdir(os.path.join(RESULTS, name, "runs")):
      runs = report.load_runs(os.path.join(RESULTS, name))
      total += sum(r["results"].get("wall_time_s", 0.0) for r in runs)
      n += len(runs)
  return f"{n} runs, summed wall time {total:.0f} s ({total / 60:.0f} min)"


def _core_hours(runs: list[dict]) -> float:
  """The runs' summed measured wall time in hours (one core per run)."""
  return sum(r["results"].get("wall_time_s", 0.0) for r in runs) / 3600


def suite_times(names: str) -> str:
  """A table of :func:`suite_time`'s run count and core-hours per suite of ``a+b+...``, and
  their total."""
  out = ["| suite | runs | core-hours |", "|---|---|---|"]
  total, count = 0.0, 0
  for name in names.split("+"):
    runs = _runs(name)
    hours = _core_hours(runs)
    out.append(f"| `{name}` | {len(runs)} | {hours:.2f} |")
    total, count = total + hours, count + len(runs)
  out.append(f"| all | {count} | {total:.2f} |")
  return "\n".join(out)


def suite_time(names: str) -> str:
  """``suite: N runs, X core-hours`` (each run's measured wall time, one core per run);
  ``a+b+...`` gives the total over those suites."""
  runs = [r for name in names.split("+") for r in _runs(name)]
  label = " + ".join(f"`{n}`" for n in names.split("+"))
  return f"{label}: {len(runs)} runs, {_core_hours(runs):.1f} core-hours"


def bench_table(path: str) -> str:
  from experiments.bench import report as bench
  from experiments.bench.flops import PAPER_FRACTION
  with open(os.path.join(ROOT, path)) as f:
    run = json.load(f)
  m, st = run.get("machine"), run["settings"]
  if "rows" not in run:  # a --fractions run: FLOPs only, no machine or timing
    return (f"{st['model']}, {st['num_classes']} classes, batch {st['batch']}; FLOPs: "
            f"{st['flop_count']}, {st['flop_mode']}.\n\n"
            + bench.fractions_markdown(st["flop_fractions"], PAPER_FRACTION))
  devices = ", ".join(m["devices"])
  if m.get("device_kind") and m["backend"] != "cpu":
    devices += f" ({m['device_kind']})"
  lines = [f"Machine: {m.get('processor', '?')} ({m['platform']}), {m['cpu_count']} cores, "
           f"backend {m['backend']}, devices {devices}, jax {m['jax']}, flax {m.get('flax', '?')}; "
           f"{st['model']}, batch {st['batch']}, {st.get('steps', 1)} steps x "
           f"{st.get('repeats', '?')} rounds; data: {st['data']}; FLOPs: "
           f"{st.get('flop_count', 'XLA cost_analysis on the run backend')}.", "",
           bench.markdown(run["rows"]), ""]
  lines += [f"* {'met' if c['ok'] else 'NOT met'}: {c['target']} ({c['detail']})"
            for c in run.get("checks", [])]
  if run.get("decomposition"):
    lines += ["", "The cost model's pieces timed alone (`--decompose`):", "",
              bench.decomposition_markdown(run["decomposition"])]
  if any("." in p for p in st.get("flop_fractions") or {}):  # points inside a stage
    lines += ["", "F_up/F of every point counted:", "",
              bench.fractions_markdown(st["flop_fractions"], PAPER_FRACTION)]
  return "\n".join(lines)


def bench_diff(paths: str) -> str:
  """How far two bench runs' ratios lie apart on their common rows (run-to-run noise)."""
  a_path, b_path = paths.split(",")
  runs = []
  for path in (a_path, b_path):
    with open(os.path.join(ROOT, path)) as f:
      runs.append({(r["method"], r["point"], r["T"]): r["ratio"] for r in json.load(f)["rows"]
                   if r["ratio"] is not None and r["method"] != "plain"})
  common = sorted(set(runs[0]) & set(runs[1]), key=str)
  if not common:
    raise ValueError(f"{a_path} and {b_path} share no timed rows")
  gap = {k: abs(runs[1][k] / runs[0][k] - 1) for k in common}
  worst = max(common, key=gap.get)
  label = lambda k: " ".join(str(v) for v in k if v is not None)
  return (f"* **Run-to-run noise:** `{b_path}` is a second run on the same machine; on the "
          f"{len(common)} rows both runs timed, its ratios differ from `{a_path}`'s by "
          f"{statistics.median(gap.values()):.1%} at the median and {gap[worst]:.1%} at most "
          f"({label(worst)}).")


def throughput_table(path: str) -> str:
  """A ``python -m experiments.bench --throughput`` run: its machine, protocol and table."""
  from experiments.bench import throughput
  with open(os.path.join(ROOT, path)) as f:
    run = json.load(f)
  m, st = run["machine"], run["settings"]
  device = m["device_kind"] if m["backend"] != "cpu" else m.get("processor", "?")
  return (f"Machine: {device} ({m['backend']}, {m['cpu_count']} cores, {len(m['devices'])} "
          f"device(s)), jax {m['jax']}; {st['model']} on {st['dataset']}, batch {st['batch']}, "
          f"{st['steps_per_epoch']} steps per epoch, {st['num_epochs']} epochs, {st['n_evals']} "
          f"evaluations of {st['test_images']} test images per run. Excluded: {st['excluded']}."
          + (f" Load average (1, 5, 15 min) at the start: {m['load_average_start']}."
             if m.get("load_average_start") else "")
          + "\n\n" + throughput.markdown(run))


def _runs(spec: str) -> list[dict]:
  """The finished runs a block names: a suite, or suites joined as described above."""
  spec, _, seed_list = spec.partition("@")
  seeds = {int(k) for k in seed_list.split(",")} if seed_list else None
  runs = []
  for part in spec.split("+"):
    name, _, picked = part.partition("[")
    suite = report.load_runs(os.path.join(RESULTS, name))
    if not suite:
      raise FileNotFoundError(f"no finished runs for suite {name!r} under {RESULTS}")
    if picked:
      slugs = picked.rstrip("]").split("|")
      missing = sorted(set(slugs) - {r["slug"] for r in suite})
      if missing:
        raise ValueError(f"suite {name!r} has no runs {missing}; its methods' slugs: "
                         f"{sorted({r['slug'] for r in suite})}")
      suite = sorted((r for r in suite if r["slug"] in slugs),
                     key=lambda r: (slugs.index(r["slug"]), r["seed"]))
    runs += [r for r in suite if seeds is None or r["seed"] in seeds]
  names = [r["name"] for r in runs]
  clash = {n for n in names if names.count(n) > len({r["seed"] for r in runs if r["name"] == n})}
  if clash:
    raise ValueError(f"{spec}: joined suites both have methods named {sorted(clash)}")
  return runs


def render(key: str) -> str:
  kind, _, arg = key.partition(":")
  if kind in RUN_TABLES:
    return RUN_TABLES[kind](_runs(arg))
  if kind in OTHER:
    return OTHER[kind](arg)
  known = ["suite:<name>"] + [f"{k}:<name>" for k in RUN_TABLES] + [
      "across:<name>,<name>", "across-best:<name>,<name>", "stopped:<name>", "time:<name>",
      "times:<name>+<name>", "suites-time", "bench:<json>", "bench-diff:<json>,<json>",
      "bench-throughput:<json>", "guard:<name>+<name>#<default slug>"]
  raise ValueError(f"unknown block {key!r}; known: {', '.join(known)}")


# Blocks computed from a suite's (or joined suites') runs, and the others, by argument.
RUN_TABLES = {"paired": report.paired_table, "classes": report.class_change_table,
              "summary": summary_table,
              "strength": report.strength_table,
              "rarest": report.rarest_table, "domain": report.domain_table,
              "domain-paired": report.domain_paired_table,
              "domain-select": report.domain_selection_table}
def _across(names: str, key: str = "test_accuracy") -> str:
  return report.across_table({n: _runs(n) for n in names.split(",")}, key)


def _guard(arg: str) -> str:
  spec, _, default = arg.partition("#")
  runs = _runs(spec)
  names = {r["slug"]: r["name"] for r in runs}
  if default and default not in names:
    raise ValueError(f"guard:{arg}: no run {default!r}; slugs: {sorted(names)}")
  return report.guard_table(runs, names.get(default))


OTHER = {"suite": suite_table, "guard": _guard, "time": suite_time, "times": suite_times,
         "suites-time": lambda _: suites_time(), "across": _across,
         "across-best": lambda names: _across(names, "best_epoch_test_accuracy"),
         "stopped": lambda name: report.stopped_table(os.path.join(RESULTS, name)),
         "bench": bench_table, "bench-diff": bench_diff, "bench-throughput": throughput_table}


def _filled(text: str) -> str:
  return BLOCK.sub(lambda m: m.group(1) + render(m.group(2)).rstrip() + "\n" + m.group(4), text)


def fill(path: str) -> int:
  """Rewrites every block of ``path``; returns how many were filled."""
  with open(path) as f:
    text = f.read()
  count = len(BLOCK.findall(text))
  text = _filled(text)
  with open(path, "w") as f:
    f.write(text)
  return count


def stale_blocks(path: str) -> list[str]:
  """The keys of ``path``'s blocks whose body differs from what they render now (nothing is
  written)."""
  with open(path) as f:
    text = f.read()
  return [m.group(2) for m in BLOCK.finditer(text) if _filled(m.group(0)) != m.group(0)]


# Folders no committed document lives in: work dirs, builds, caches.
SKIP_DIRS = {"runs", "workdirs", "build", "_build", "node_modules", "__pycache__"}


def documents() -> list[str]:
  """The committed documents with generated blocks, relative to the repository root: the
  README first, then every other Markdown file that holds a block (docs/benchmarks.md, the
  results README, a suite's own README, ...), in path order."""
  found = []
  for top, dirs, files in os.walk(ROOT):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
    for name in files:
      path = os.path.join(top, name)
      if name.endswith(".md") and path != os.path.join(ROOT, "README.md"):
        with open(path, encoding="utf-8") as f:
          if BLOCK.search(f.read()):
            found.append(os.path.relpath(path, ROOT))
  return ["README.md"] + sorted(found)


def main(argv=None) -> int:
  import argparse
  parser = argparse.ArgumentParser(
      prog="python -m experiments.fill",
      description="Check (default) or rewrite (--write) the generated blocks of Markdown files.")
  parser.add_argument("paths", nargs="*", help="documents (default: every committed document "
                      "that holds a block)")
  parser.add_argument("--write", action="store_true", help="rewrite the blocks in place")
  args = parser.parse_args(argv)
  paths = args.paths or [os.path.join(ROOT, d) for d in documents()]
  stale = 0
  for p in paths:
    if args.write:
      print(f"{os.path.relpath(p)}: {fill(p)} blocks filled")
      continue
    keys = stale_blocks(p)
    stale += len(keys)
    print(f"{os.path.relpath(p)}: " + (f"{len(keys)} stale: {', '.join(keys)}" if keys
                                       else "every block current"))
  if stale:
    print(f"{stale} stale blocks; rewrite them with --write", file=sys.stderr)
  return 1 if stale else 0


if __name__ == "__main__":
  sys.exit(main())
