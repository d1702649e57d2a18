"""The report's comparison tables, each computed from a suite's loaded runs
(:func:`experiments.report.load_runs`): paired differences with McNemar's test, the rarest
classes per seed and the perturbation strength over training.

  >>> runs = load_runs("experiments/results/fmnist_lt_main")           # doctest: +SKIP
  >>> print(paired_table(runs))                                         # doctest: +SKIP
"""
from __future__ import annotations

import os

import numpy as np


def run_strength(run: dict, floor: float = 0.05, ceiling: float = 1.0) -> dict | None:
  """The trainer's ``perturbation_strength`` of a run, recomputed from its ``metrics.jsonl``
  (so records made before the trainer wrote it get it too); ``None`` without a loss change."""
  from experiments.train.guards import signed_loss_change, strength_summary
  rows = [{"loss_change_signed": signed_loss_change(r)} for r in run["history"]]
  return strength_summary(rows, floor, ceiling)


def strength_table(runs: list[dict]) -> str:
  """Per method with a logged loss change: the mean over seeds of the median
  ``loss_change_signed`` over the second half of training, its largest epoch value, and how
  many runs had an epoch above the 1-nat ceiling or a median below the 0.05-nat floor."""
  out = ["| method | seeds | loss change, 2nd half (nats) | max epoch (nats) | runs below "
         "floor | runs above ceiling |", "|---|---|---|---|---|---|"]
  for name in dict.fromkeys(r["name"] for r in runs):
    s = [x for x in (run_strength(r) for r in runs if r["name"] == name) if x is not None]
    if not s:
      continue
    out.append(f"| {name} | {len(s)} | {np.mean([x['median_second_half'] for x in s]):.3f} | "
               f"{max(x['max'] for x in s):.3f} | {sum(x['below_floor'] for x in s)} | "
               f"{sum(bool(x['epochs_above_ceiling']) for x in s)} |")
  return "\n".join(out) if len(out) > 2 else ""


def _test_predictions(run: dict):
  path = os.path.join(run.get("workdir", ""), "predictions.npz")
  if not os.path.exists(path):
    return None
  with np.load(path) as d:
    return d["test_pred"], d["test_label"]


def is_baseline(name: str) -> bool:
  """A method without LPA in its name (CE, LA, LDAM, LPL, Mixup, ...)."""
  return "LPA" not in name


def best_baseline(name: str, names: list[str], mean: dict[str, float]) -> str | None:
  """The best baseline to pair ``name`` with: the :func:`is_baseline` method other than
  ``name`` with the highest ``mean`` (the suite's first method included), ``None`` if none."""
  rivals = [m for m in names if is_baseline(m) and m != name]
  return max(rivals, key=mean.get) if rivals else None


def paired_table(runs: list[dict]) -> str:
  """Each method against the suite's first method (the baseline, e.g. CE) and against the best
  other baseline (highest mean test accuracy among :func:`is_baseline` methods): the per-seed
  paired test-accuracy difference (points, mean and 95 % t-interval over the seeds both ran)
  and McNemar's exact test on the test predictions pooled over those seeds."""
  from experiments.stats import mcnemar, paired_difference
  names = list(dict.fromkeys(r["name"] for r in runs))
  if len(names) < 2:
    return ""
  by = {n: {r["seed"]: r for r in runs if r["name"] == n} for n in names}
  acc = {n: {k: r["results"]["test_accuracy"] for k, r in by[n].items()} for n in names}
  mean = {n: float(np.mean(list(acc[n].values()))) for n in names}
  out = ["| method | vs | paired seeds | Δ test acc (points) | 95 % interval | McNemar b / c "
         "(pooled) | p |", "|---|---|---|---|---|---|---|"]
  for n in names[1:]:
    for ref in dict.fromkeys([names[0], best_baseline(n, names, mean)]):
      if ref in (n, None):
        continue
      d = paired_difference(acc[n], acc[ref])
      if not d["n"]:
        continue
      preds = [(_test_predictions(by[n][k]), _test_predictions(by[ref][k])) for k in d["seeds"]]
      if all(a is not None and b is not None for a, b in preds):
        m = mcnemar(np.concatenate([a[0] for a, _ in preds]),
                    np.concatenate([b[0] for _, b in preds]),
                    np.concatenate([a[1] for a, _ in preds]))
        mc = f"{m['b']} / {m['c']} | {m['p']:.3g}"
      else:
        mc = "— | —"
      ci = interval(d)
      label = ref + (" (best baseline)" if ref != names[0] else "")
      out.append(f"| {n} | {label} | {d['n']} | {100 * d['mean']:+.2f} | {ci} | {mc} |")
  return "\n".join(out)


def rarest_table(runs: list[dict], k: int = 3) -> str:
  """On a long-tailed training set: each method's test accuracy (%) on its ``k`` rarest
  training classes, per seed (seed order), so a class a method never learns in some seed is
  seen at once.  Empty when the training classes are (nearly) balanced: the largest count
  under twice the smallest, as label noise leaves a balanced set (the long-tail suites have
  imbalance ratios of 10 and more)."""
  counts = runs[0]["results"].get("train_class_counts")
  if not counts or max(counts) < 2 * min(counts):
    return ""
  names = runs[0]["results"].get("class_names") or [str(c) for c in range(len(counts))]
  rare = sorted(range(len(counts)), key=lambda c: (counts[c], c))[:k]
  def n(c):  # a class's count, or each distinct count in run order where runs differ (an IR grid)
    per = dict.fromkeys(r["results"].get("train_class_counts", counts)[c] for r in runs)
    return " / ".join(str(v) for v in per)
  out = ["| method | seeds | " + " | ".join(f"{names[c]} (n={n(c)})" for c in rare) +
         " | min over seeds and these classes |", "|---" * (len(rare) + 3) + "|"]
  for name in dict.fromkeys(r["name"] for r in runs):
    mine = sorted((r for r in runs if r["name"] == name), key=lambda r: r["seed"])
    per = [[100 * r["results"]["per_class_accuracy"][c] for r in mine] for c in rare]
    cells = [" / ".join(f"{v:.1f}" for v in vals) for vals in per]
    out.append(f"| {name} | {len(mine)} | " + " | ".join(cells) +
               f" | {min(min(v) for v in per):.1f} |")
  return "\n".join(out)


def domain_accuracies(runs: list[dict], key: str = "test_accuracy"
                      ) -> dict[str, dict[str, dict[int, float]]]:
  """Leave-one-domain-out runs (method.json's ``domain`` and ``base``):
  ``{method: {held-out domain: {seed: accuracy}}}``, the test accuracy (``key``; or
  ``"val_accuracy"``, the training-domain validation accuracy) at the epoch training-domain
  validation selects (``selected_by_val``), in the runs' order; ``{}`` when no run has a
  domain."""
  out: dict[str, dict[str, dict[int, float]]] = {}
  domains = list(dict.fromkeys(r["domain"] for r in runs if r.get("domain") is not None))
  for r in runs:
    if r.get("domain") is None:
      continue
    per_domain = out.setdefault(r["base"] or r["name"], {d: {} for d in domains})
    acc = (r["results"].get("selected_by_val") or {}).get(key)
    if acc is not None:
      per_domain[r["domain"]][r["seed"]] = acc
  return out


def domain_average(per_domain: dict[str, dict[int, float]]) -> dict[int, float]:
  """``{seed: mean over the domains}`` for the seeds that have every domain."""
  seeds = set.intersection(*(set(v) for v in per_domain.values())) if per_domain else set()
  return {s: float(np.mean([v[s] for v in per_domain.values()])) for s in sorted(seeds)}


def domain_selection_table(runs: list[dict]) -> str:
  """Leave-one-domain-out runs: per method family with several settings (bases named
  ``family knob=value``, :func:`experiments.report.family`), each setting's training-domain
  validation accuracy averaged over the held-out domains (mean ± std over seeds) and the
  setting it selects (highest mean), as DomainBed selects hyper-parameters without the test
  domain; its test accuracy on the same average beside it.  ``""`` when no family has two."""
  from experiments.report import _fmt, family, mean_std
  val, test = domain_accuracies(runs, "val_accuracy"), domain_accuracies(runs)
  families: dict[str, list[str]] = {}
  for base in val:
    families.setdefault(family(base), []).append(base)
  out = ["| method | setting | val acc % (training domains, domain average) | "
         "test acc % (domain average) | selected |", "|---|---|---|---|---|"]
  for fam, bases in families.items():
    if len(bases) < 2:
      continue
    scores = {b: mean_std(list(domain_average(val[b]).values())) for b in bases}
    best = max(bases, key=lambda b: scores[b][0] if scores[b][0] == scores[b][0] else -1)
    for b in bases:
      out.append(f"| {fam} | {b} | {_fmt(scores[b])} | "
                 f"{_fmt(mean_std(list(domain_average(test[b]).values())))} | "
                 f"{'yes' if b == best else ''} |")
  return "\n".join(out) if len(out) > 2 else ""


def across_table(suites: dict[str, list[dict]], key: str = "test_accuracy") -> str:
  """One row per method, one column per suite (``{label: runs}``, e.g. the noise settings of
  one task): the method's mean ``key`` (%) and its paired difference from the suite's first
  method (points, 95 % t-interval over the seeds both ran); ``—`` where a suite lacks it."""
  from experiments.report import mean_std
  from experiments.stats import paired_difference
  by = {label: {} for label in suites}
  for label, runs in suites.items():
    for r in runs:
      by[label].setdefault(r["name"], {})[r["seed"]] = r["results"][key]
  names = list(dict.fromkeys(n for per in by.values() for n in per))
  out = ["| method | " + " | ".join(suites) + " |", "|---" * (len(suites) + 1) + "|"]
  for n in names:
    cells = []
    for per in by.values():
      if n not in per:
        cells.append("—")
        continue
      ref = next(iter(per))
      cell = f"{100 * mean_std(per[n].values())[0]:.2f}"
      if n != ref:
        d = paired_difference(per[n], per[ref])
        cell += f" ({100 * d['mean']:+.2f} {interval(d)})" if d["n"] else ""
      cells.append(cell)
    out.append(f"| {n} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def interval(d: dict) -> str:
  """A :func:`~experiments.stats.paired_difference`'s 95 % interval in points, ``—`` if none."""
  return f"[{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]" if d["lo"] == d["lo"] else "—"


def domain_paired_table(runs: list[dict]) -> str:
  """Leave-one-domain-out runs: each method against the suite's first method (ERM) at the same
  held-out domain, and on the average over the domains, per seed: the paired difference of the
  test accuracy at the epoch training-domain validation selects (points, mean and 95 %
  t-interval over the seeds both ran).  Different held-out domains are never paired.  On the
  average each method is also paired with the best other baseline (:func:`is_baseline`, the
  highest mean domain average, :func:`best_baseline`), unless that is ERM itself."""
  from experiments.stats import paired_difference
  acc = domain_accuracies(runs)
  if not acc:
    return ""
  ref, *others = acc
  avg = {b: domain_average(acc[b]) for b in acc}
  mean = {b: float(np.mean(list(v.values()))) if v else float("-inf") for b, v in avg.items()}
  out = ["| method | vs | held-out domain | paired seeds | Δ test acc (points) | 95 % interval |",
         "|---|---|---|---|---|---|"]
  for base in others:
    pairs = [(ref, d, acc[base][d], acc[ref][d]) for d in acc[base]]
    pairs.append((ref, "average", avg[base], avg[ref]))
    best = best_baseline(base, list(acc), mean)
    if best not in (None, ref):
      pairs.append((f"{best} (best baseline)", "average", avg[base], avg[best]))
    for vs, domain, a, b in pairs:
      d = paired_difference(a, b)
      if d["n"]:
        out.append(f"| {base} | {vs} | {domain} | {d['n']} | {100 * d['mean']:+.2f} | "
                   f"{interval(d)} |")
  return "\n".join(out)
