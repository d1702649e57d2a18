"""Results tables and the suite report writer.

  python -m experiments.report --root=experiments/results/longtail_fmnist

reads ``<root>/runs/<method>/seed<k>/{method.json,results.json,metrics.jsonl}`` (written by
:mod:`experiments.sweep`) and writes ``<root>/report.md``, ``<root>/results.csv`` and PNG
figures: accuracy per method, learning curves, per-class ``‖δ_c‖`` and expansive share for the
activation-level methods, and accuracy vs perturbation point when the suite sweeps points.
Every number comes from the run files; nothing is typed in.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import platform

import numpy as np

from experiments.report_tables import (across_table, class_change_table,  # noqa: F401
                                       domain_accuracies, domain_average, domain_paired_table,
                                       domain_selection_table, guard_table, guarded_selection,
                                       is_baseline, paired_table, read_predictions,
                                       rarest_table, run_strength, strength_table)


def method_name(config: dict) -> str:
  """``activation+logit+gradient``, leaving out the levels that are off."""
  p = config.get("perturb", {})
  parts = [p.get(k, "none") for k in ("activation", "logit", "gradient")]
  parts = [x for x in parts if x != "none"]
  return "+".join(parts) if parts else "ce"


def _pct(x) -> str:
  return "—" if x is None or x != x else f"{100 * x:.2f}"


def results_table(results: list[dict]) -> str:
  """One row per run: method, dataset, overall accuracy and the task's breakdown."""
  rows = ["| method | dataset | train imgs | test acc % | breakdown | wall s |",
          "|---|---|---|---|---|---|"]
  for r in results:
    extra = []
    if "shot_accuracy" in r:
      extra.append("many/med/few " + "/".join(_pct(r["shot_accuracy"][k])
                                             for k in ("many", "medium", "few")))
    if "val_accuracy" in r:
      extra.append(f"val {_pct(r['val_accuracy'])}")
    if "train_clean_label_accuracy" in r:
      extra.append(f"train clean-label {_pct(r['train_clean_label_accuracy'])}")
    rows.append(f"| {method_name(r.get('config', {}))} | {r.get('dataset', '?')} | "
                f"{r.get('num_train', '?')} | {_pct(r.get('test_accuracy'))} | "
                f"{'; '.join(extra) or '—'} | {r.get('wall_time_s', 0):.0f} |")
  return "\n".join(rows)


# ---- suite reports ----------------------------------------------------------------------

def _read_jsonl(path: str) -> list[dict]:
  from experiments.train.history import read_history
  return read_history(path)


def load_runs(root: str, unreadable: list | None = None,
              no_history: list | None = None) -> list[dict]:
  """Finished runs under ``root``, in the suite's method order, then by seed: dicts with
  ``name, slug, seed, point, results, history``.

  A ``results.json`` that is not valid JSON is left out; ``unreadable`` (if given) collects
  ``(path, error)`` for each, so the report can name them.  ``no_history`` (if given) collects
  ``(path, 'is missing' / 'holds no rows')`` for each finished run's ``metrics.jsonl`` that
  gives no rows: the run is kept, with an empty history.
  """
  from experiments.train.workdir import read_json
  runs = []
  for path in sorted(glob.glob(os.path.join(root, "runs", "*", "seed*", "results.json"))):
    workdir = os.path.dirname(path)
    try:
      results = read_json(path)
      meta_path = os.path.join(workdir, "method.json")
      meta = read_json(meta_path) if os.path.exists(meta_path) else {}
    except (ValueError, OSError) as e:
      if unreadable is not None:
        unreadable.append((path, str(e)))
      continue
    results.update(prediction_metrics(workdir))
    history_path = os.path.join(workdir, "metrics.jsonl")
    history = _read_jsonl(history_path)
    if not history and no_history is not None:
      no_history.append((history_path, "holds no rows" if os.path.exists(history_path)
                         else "is missing"))
    tests = [r["test_accuracy"] for r in history if r.get("test_accuracy") is not None]
    if tests:  # the highest per-epoch test accuracy: an oracle, beside the last epoch's
      results["best_epoch_test_accuracy"] = max(tests)
    runs.append({"name": meta.get("name") or method_name(results.get("config", {})),
                 "slug": os.path.basename(os.path.dirname(workdir)),
                 "seed": meta.get("seed", results.get("config", {}).get("seed")),
                 "point": meta.get("point"), "domain": meta.get("domain"),
                 "base": meta.get("base"), "results": results, "workdir": workdir,
                 "history": history})
  order = [m["name"] for m in _suite_meta(root).get("methods", [])]
  rank = lambda r: (order.index(r["name"]) if r["name"] in order else len(order), r["name"],  # noqa: E731
                    r["seed"] if r["seed"] is not None else 0)
  return sorted(runs, key=rank)


def balanced_accuracy(pred, label) -> float:
  """Mean over the classes present in ``label`` of each class's accuracy (recall)."""
  pred, label = np.asarray(pred), np.asarray(label)
  classes = np.unique(label)
  return float(np.mean([np.mean(pred[label == c] == c) for c in classes])) if len(classes) \
      else float("nan")


def prediction_metrics(workdir: str) -> dict:
  """``val_balanced_accuracy`` from a run's ``predictions.npz`` (the final model's validation
  predictions), when it has them; else ``{}``.

  A validation split carved from a long-tailed training set is itself long-tailed, so its plain
  accuracy weights classes by frequency while the (balanced) test set does not; the
  class-balanced accuracy is the validation number that estimates the test accuracy.
  """
  found = read_predictions(workdir, "val")
  return {} if found is None else {"val_balanced_accuracy": balanced_accuracy(*found)}


def family(name: str) -> str:
  """The method a tuning run belongs to: its name up to the first ``knob=value`` or ``@``."""
  words = []
  for w in name.split():
    if "=" in w or w.startswith("@"):
      break
    words.append(w)
  return " ".join(words) or name


def selection_table(rows: list[dict], key: str = "val bal acc") -> str:
  """Per method family, the setting with the highest mean ``key``, and its test accuracy."""
  out = [f"| method | settings tried | chosen (highest {key}) | {key} % | test acc % |",
         "|---|---|---|---|---|"]
  for fam in dict.fromkeys(family(r["name"]) for r in rows):
    mine = [r for r in rows if family(r["name"]) == fam and r[key][0] == r[key][0]]
    if not mine:
      continue
    best = max(mine, key=lambda r: r[key][0])
    out.append(f"| {fam} | {len(mine)} | {best['name']} | {_fmt(best[key])} | "
               f"{_fmt(best['test acc'])} |")
  return "\n".join(out)


def _suite_meta(root: str) -> dict:
  from experiments.train.workdir import read_json
  path = os.path.join(root, "suite.json")
  if not os.path.exists(path):
    return {}
  try:
    return read_json(path)
  except ValueError as e:
    print(f"report: ignoring {e}", flush=True)
    return {}


def metric_columns(runs: list[dict]) -> list[tuple[str, tuple]]:
  """(column label, key path into results.json) for the metrics these runs report."""
  cols = [("test acc", ("test_accuracy",))]
  first = runs[0]["results"] if runs else {}
  if "shot_accuracy" in first:
    cols += [(f"{k}-shot", ("shot_accuracy", k)) for k in ("many", "medium", "few")]
  if "val_accuracy" in first:
    cols.append(("val acc", ("val_accuracy",)))
  if any("val_balanced_accuracy" in r["results"] for r in runs):
    cols.append(("val bal acc", ("val_balanced_accuracy",)))
  if "selected_by_val" in first:
    cols.append(("test @ best val", ("selected_by_val", "test_accuracy")))
  for dom in first.get("val_domain_accuracy", {}):
    cols.append((f"val {dom}", ("val_domain_accuracy", dom)))
  if "train_clean_label_accuracy" in first:
    cols += [("best-epoch test (oracle)", ("best_epoch_test_accuracy",)),
             ("train clean-label acc", ("train_clean_label_accuracy",)),
             ("noisy memorised", ("train_noisy_subset_memorised",))]
  return cols


def _get(d: dict, path: tuple):
  for k in path:
    if not isinstance(d, dict) or k not in d:
      return float("nan")
    d = d[k]
  return float(d) if d is not None else float("nan")


def mean_std(values) -> tuple[float, float]:
  """Mean and sample std (ddof 1; NaN for a single seed) over the finite values."""
  v = np.asarray([x for x in values if x == x], float)
  if not len(v):
    return float("nan"), float("nan")
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def summarise(runs: list[dict]) -> list[dict]:
  """One row per method: ``name, n, wall_s, point`` and ``(mean, std)`` per metric column."""
  cols = metric_columns(runs)
  rows = []
  for name in dict.fromkeys(r["name"] for r in runs):
    mine = [r for r in runs if r["name"] == name]
    row = {"name": name, "n": len(mine), "point": mine[0]["point"],
           "wall_s": float(np.mean([r["results"].get("wall_time_s", np.nan) for r in mine]))}
    for label, path in cols:
      row[label] = mean_std([_get(r["results"], path) for r in mine])
    rows.append(row)
  return rows


def _fmt(ms) -> str:
  m, s = ms
  if m != m:
    return "—"
  return f"{100 * m:.2f}" + (f" ± {100 * s:.2f}" if s == s else "")


def markdown_table(rows: list[dict], cols: list[str]) -> str:
  """Mean ± std (%) per method, plus the difference of mean test accuracy to the first
  method (the suite's baseline)."""
  base = rows[0]["test acc"][0] if rows else float("nan")
  head = ["method", "seeds"] + [f"{c} %" for c in cols] + ["Δ test vs " + rows[0]["name"],
                                                           "wall s / run"]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    delta = 100 * (r["test acc"][0] - base)
    cells = [r["name"], str(r["n"])] + [_fmt(r[c]) for c in cols] + [
        f"{delta:+.2f}" if delta == delta else "—", f"{r['wall_s']:.0f}"]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out)


def write_csv(rows: list[dict], cols: list[str], path: str) -> None:
  """Percentages, mean and std per metric; std empty for a single seed."""
  from experiments.train.workdir import replaced_atomically
  with replaced_atomically(path) as tmp, open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["method", "seeds", "wall_s_per_run"] +
               [f"{c} {s}" for c in cols for s in ("mean", "std")])
    for r in rows:
      vals = [("" if x != x else f"{100 * x:.4f}") for c in cols for x in r[c]]
      w.writerow([r["name"], r["n"], f"{r['wall_s']:.1f}"] + vals)


def _commits(runs: list[dict]) -> str:
  """The commits the runs were trained at (``results.json``'s ``code``), with run counts."""
  counts: dict[str, int] = {}
  for r in runs:
    code = r["results"].get("code") or {}
    key = (code.get("commit") or "unknown")[:12] + (" (dirty tree)" if code.get("dirty") else "")
    counts[key] = counts.get(key, 0) + 1
  return ", ".join(f"commit {k} ({n} runs)" for k, n in counts.items())


def _machine(root: str) -> str:
  m = _suite_meta(root).get("machine")
  if m is None:  # reports on runs not made by the sweep: describe this machine instead
    m = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "devices": ["?"]}
  return (f"{m['platform']}, {m['cpu_count']} CPU cores, devices {', '.join(m['devices'])}"
          + (f", jax {m['jax']}" if "jax" in m else ""))


def domain_table(runs: list[dict]) -> str:
  """Leave-one-domain-out runs as DomainBed tables do: one row per method, one column per
  held-out domain and their average; test accuracy (%) of the epoch selected by
  training-domain validation (:func:`~experiments.report_tables.domain_accuracies`), mean ±
  std over seeds, the average taken per seed over the domains it has all of."""
  acc = domain_accuracies(runs)
  if not acc:
    return ""
  domains = list(next(iter(acc.values())))
  out = ["| method | " + " | ".join(domains) + " | average |",
         "|" + "---|" * (len(domains) + 2)]
  for base, per_domain in acc.items():
    cells = [_fmt(mean_std(list(per_domain[d].values()))) for d in domains]
    avgs = list(domain_average(per_domain).values())
    out.append(f"| {base} | " + " | ".join(cells) + f" | {_fmt(mean_std(avgs))} |")
  return "\n".join(out)


def stopped_runs(root: str) -> list[tuple[str, str]]:
  """``[(work dir, reason)]`` of the runs under ``root`` that a guard of the trainer stopped
  (``stopped.json``, written by the sweep)."""
  out = []
  for path in sorted(glob.glob(os.path.join(root, "runs", "*", "seed*", "stopped.json"))):
    if os.path.exists(os.path.join(os.path.dirname(path), "results.json")):
      continue
    try:
      reason = json.load(open(path)).get("reason", "?")
    except (ValueError, OSError) as e:
      reason = f"stopped.json unreadable: {e}"
    out.append((os.path.dirname(path), reason))
  return out


def stopped_table(root: str, stopped: list[tuple[str, str]] | None = None) -> str:
  """Each stopped run's epochs as it logged them (``metrics.jsonl``): training and test
  accuracy and the loss change on the perturbed classes, so how it ended can be read.
  ``stopped``: :func:`stopped_runs` of ``root`` if already read."""
  out = []
  for workdir, _ in stopped_runs(root) if stopped is None else stopped:
    rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if not rows:
      continue
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    nats = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    name, last = os.path.relpath(workdir, root), rows[-1]["epoch"]
    out += [f"`{name}` (epochs logged before the stop: 1–{last}):", "",
            "| epoch | " + " | ".join(str(r["epoch"]) for r in rows) + " |",
            "|---|" + "---|" * len(rows),
            "| train acc % | " + " | ".join(pct(r.get("accuracy")) for r in rows) + " |",
            "| test acc % | " + " | ".join(pct(r.get("test_accuracy")) for r in rows) + " |",
            "| loss change (nats) | " + " | ".join(nats(r.get("loss_change_signed"))
                                                  for r in rows) + " |", ""]
  return "\n".join(out).rstrip()


def _section(title: str, text: str, table: str) -> list[str]:
  """A report section's lines (heading, explanation, table); none for an empty table."""
  return [f"## {title}", "", text, "", table, ""] if table else []


def _header(root: str, runs: list[dict]) -> list[str]:
  """The report's title, description and facts: data, seeds, machine, code, time, commands."""
  meta, r0 = _suite_meta(root), runs[0]["results"]
  suite = meta.get("suite", os.path.basename(os.path.normpath(root)))
  total = sum(r["results"].get("wall_time_s", 0.0) for r in runs)
  seeds = sorted({r["seed"] for r in runs})
  lines = [f"# {suite}", "", meta.get("description", ""), "",
           f"* Data: {r0.get('dataset', '?')}, {r0.get('num_train', '?')} training images, "
           f"{r0.get('num_classes', '?')} classes.",
           f"* Train class counts: {r0.get('train_class_counts', '?')}",
           f"* Seeds: {seeds} ({len(runs)} runs); mean ± sample std over seeds.",
           f"* Machine: {_machine(root)}.",
           f"* Code: {_commits(runs)}.",
           f"* Total measured wall time of the runs: {total:.0f} s ({total / 60:.1f} min).",
           f"* Regenerate: `python -m experiments.sweep "
           f"--config=experiments/configs/suites.py:{suite}`; report only: "
           f"`python -m experiments.report --root={root}`.", ""]
  return lines


def write_report(root: str) -> dict[str, str]:
  """Writes ``report.md``, ``results.csv`` and the figures under ``root``; returns their paths.

  Not run as a doctest: it rewrites a committed report.

  >>> paths = write_report("experiments/results/longtail_fmnist")   # doctest: +SKIP
  >>> sorted(paths)                                                  # doctest: +SKIP
  ['accuracy', 'csv', 'curves', 'markdown', 'per_class']
  """
  from experiments import report_figures as figs
  from experiments.train.workdir import replaced_atomically
  unreadable, no_history = [], []
  runs = load_runs(root, unreadable, no_history)
  for path, err in unreadable:
    print(f"report: left out {path}: {err}", flush=True)
  for path, why in no_history:
    print(f"report: {path} {why}: the run's accuracy is reported, its learning curve and "
          "perturbation strength are not", flush=True)
  if not runs:
    raise FileNotFoundError(f"No finished runs (runs/*/seed*/results.json) under {root!r}; "
                            "run experiments.sweep first."
                            + "".join(f"\nUnreadable: {p}" for p, _ in unreadable))
  cols = [c for c, _ in metric_columns(runs)]
  rows = summarise(runs)
  paths = {"csv": os.path.join(root, "results.csv"), "markdown": os.path.join(root, "report.md")}
  write_csv(rows, cols, paths["csv"])
  paths.update(figs.write_figures(root, runs, rows))
  lines = _header(root, runs) + ["## Accuracy (%)", "", markdown_table(rows, cols), ""]
  domains = any(r.get("domain") is not None for r in runs)
  if domains:  # one run per held-out domain: a setting is chosen over all of them
    lines += _section(
        "Selection on training-domain validation",
        "Settings of one method are compared by their accuracy on the 20 % held out from "
        "the training domains, at the epoch that validation selects, averaged over the "
        "held-out domains; the test domains play no part in the choice. Every setting stays "
        "in the tables below.", domain_selection_table(runs))
  elif "val bal acc" in cols and len({family(r["name"]) for r in rows}) < len(rows):
    lines += ["## Selection on validation", "",
              "`val bal acc`: the final model's class-balanced accuracy on the validation "
              "split (mean of per-class accuracies), from each run's `predictions.npz`. "
              "`test @ best val` is the test accuracy at the epoch of highest plain "
              "validation accuracy, which favours head classes on a long-tailed split.", "",
              selection_table(rows), ""]
  lines += _section(
      "Per held-out domain (test accuracy %, training-domain validation)",
      "Each column trains on the other domains and tests on this one; the epoch is chosen by "
      "accuracy on 20 % held out from the training domains (DomainBed's training-domain "
      "validation). Mean ± std over seeds; the average is taken per seed over the domains it "
      "has all of.", domain_table(runs))
  lines += _section(
      "Paired comparisons per held-out domain",
      "Per-seed differences of the test accuracy at the epoch training-domain validation "
      "selects, against the first method at the same held-out domain and on the average over "
      "the domains: mean and 95 % t-interval over the seeds both ran (McNemar's test is not "
      "given: the per-sample predictions saved are the last epoch's, not the selected one's).",
      domain_paired_table(runs)) if domains else _section(
      "Paired comparisons",
      f"Each method against {runs[0]['name']} (the baseline fixed before the runs) and, where "
      "the suite has a validation split, against the best other baseline chosen on it (never "
      "on test). Runs with the same seed share the data and differ only in the method. Δ: the "
      "mean over the paired seeds of the test-accuracy difference. 95 % CI: percentile "
      "interval of a crossed bootstrap (2000 replicates, fixed RNG seed) that resamples seeds "
      "and test images, so both training randomness and the test sample enter (with few "
      "seeds it understates the seed part, as any bootstrap of a handful of values). Sign-flip p: "
      "exact two-sided permutation test on the per-seed differences; with n seeds it cannot "
      "fall below 2/2^n (0.0625 for 5 seeds, 0.25 for 3). Holm p: adjusted over the rows of "
      "this table. McNemar's test is applied per seed only (the same images recur in every "
      "seed, so pooled pairs are not independent): the last column counts the seeds where it "
      "gives p < 0.05. A difference whose Holm p ≥ 0.05 or whose interval holds 0 is not "
      "shown to exist.", paired_table(runs))
  if not domains:  # held-out domains are balanced and their predictions are the last epoch's
    lines += _section(
        f"Per-class change against {runs[0]['name']} (test accuracy, points)",
        f"Each class's test-accuracy change against {runs[0]['name']}, mean over the paired "
        "seeds with its crossed-bootstrap 95 % interval (seeds × test images of that class). "
        "Below: the method's class split (its own `sign_C` at the last epoch when it has one, "
        "else on a long-tailed training set the frequency split, the round(0.4·C) most "
        "frequent classes as head), its mean change over the expansive / tail and the "
        "contractive / head classes, and its worst class (lowest mean change; the interval is "
        "that class's own, not corrected for picking the minimum).", class_change_table(runs))
  lines += _section(
      "Perturbation strength over training",
      "`loss_change_signed` per epoch (`metrics.jsonl`): the mean |loss change| the activation "
      "method caused on the classes it perturbs; floor 0.05 nats, ceiling 1 nat "
      "(`train.min_loss_change`, `train.max_loss_change`).", strength_table(runs))
  lines += [f"![{k}]({os.path.basename(v)})" for k, v in paths.items()
            if v.endswith(".png")]
  lines += ["", figs.per_class_table(runs)]
  stopped = stopped_runs(root)
  if stopped:  # named, so a method missing from the tables is never mistaken for a tie
    lines += ["", "## Runs stopped by the trainer's guards (not in the tables)", ""]
    lines += [f"* `{os.path.relpath(p, root)}`: {reason.splitlines()[0]}"
              for p, reason in stopped]
    lines += ["", "Their epochs up to the stop (training accuracy is on the perturbed "
              "batches):", "", stopped_table(root, stopped)]
  if no_history:  # named, so a run missing from the curves is never taken for a dropped one
    lines += ["", "## Finished runs without their metrics.jsonl", "",
              "Their accuracies are in the tables; their learning curves, best-epoch accuracy "
              "and perturbation strength, which come from `metrics.jsonl`, are not.", ""]
    lines += [f"* `{os.path.relpath(p, root)}`: {why}" for p, why in no_history]
  if unreadable:  # named, so a missing row is never mistaken for a finished suite
    lines += ["", "## Unreadable run files (left out of the tables)", ""]
    lines += [f"* `{os.path.relpath(p, root)}`: {err}" for p, err in unreadable]
  with replaced_atomically(paths["markdown"]) as tmp, open(tmp, "w") as f:
    f.write("\n".join(lines) + "\n")
  return paths


def main(argv):
  from absl import flags
  del argv
  paths = write_report(flags.FLAGS.root)
  print("\n".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("root", None, "Suite root, e.g. experiments/results/longtail_fmnist.")
  flags.mark_flag_as_required("root")
  app.run(main)
