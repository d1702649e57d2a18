"""The report's comparison tables, each computed from a suite's loaded runs
(:func:`experiments.report.load_runs`): paired differences (:mod:`experiments.stats`), per-class
changes against the suite's first method, the rarest classes per seed and the perturbation
strength over training.  Not run as a doctest: bootstrapping a committed suite's confidence
intervals takes several seconds.

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


def read_predictions(workdir: str, split: str = "test"):
  """``(pred, label)`` of a run's final model on ``split`` (``'test'`` or ``'val'``) from the
  ``predictions.npz`` in its work dir; ``None`` when it has none for that split."""
  path = os.path.join(workdir or "", "predictions.npz")
  if not os.path.exists(path):
    return None
  with np.load(path) as d:
    if f"{split}_pred" not in d.files or not len(d[f"{split}_label"]):
      return None
    return d[f"{split}_pred"], d[f"{split}_label"]


def _correct(runs_by_seed: dict, seeds: list):
  """``(correct_SxN, label_N)`` of these seeds' runs from their ``predictions.npz``; ``None``
  when one is missing or the runs were scored on different test images (no image pairing)."""
  preds = [read_predictions(runs_by_seed[k].get("workdir", "")) for k in seeds]
  if not preds or any(p is None for p in preds):
    return None
  label = preds[0][1]
  if any(not np.array_equal(p[1], label) for p in preds):
    return None
  return np.stack([p[0] == p[1] for p in preds]), label


def is_baseline(name: str) -> bool:
  """A method without LPA in its name (CE, LA, LDAM, LPL, Mixup, ...)."""
  return "LPA" not in name


def best_baseline(name: str, names: list[str], score: dict[str, float]) -> str | None:
  """The best baseline to pair ``name`` with: the :func:`is_baseline` method other than
  ``name`` with the highest validation ``score`` (the suite's first method included); ``None``
  if none has a finite score.  Never a test score: a rival picked on the test set is
  flattered by the same noise it is then compared on."""
  rivals = [m for m in names if is_baseline(m) and m != name and np.isfinite(score.get(m, np.nan))]
  return max(rivals, key=score.get) if rivals else None


def validation_scores(runs: list[dict]) -> tuple[dict[str, float], str]:
  """Each method's mean validation score over its seeds and the score's name: the
  class-balanced validation accuracy where every run has it (it estimates a balanced test set
  on a long-tailed split), else the plain one; ``({}, "")`` for a suite without validation."""
  for key, label in (("val_balanced_accuracy", "val bal acc"), ("val_accuracy", "val acc")):
    if runs and all(r["results"].get(key) is not None for r in runs):
      names = dict.fromkeys(r["name"] for r in runs)
      return {n: float(np.mean([r["results"][key] for r in runs if r["name"] == n]))
              for n in names}, label
  return {}, ""


def _comparison(a: dict, b: dict, seeds: list, key: str = "test_accuracy") -> dict:
  """:func:`experiments.stats.compare` of two methods' runs (``{seed: run}``) over ``seeds``;
  for another score than the final test accuracy (``key``), or without paired predictions,
  the seed-level numbers alone (mean and sign-flip p from ``results.json``), with no interval
  and no McNemar count."""
  from experiments.stats import compare, sign_flip_p, smallest_p
  ca, cb = (_correct(a, seeds), _correct(b, seeds)) if key == "test_accuracy" else (None, None)
  if ca is not None and cb is not None and np.array_equal(ca[1], cb[1]):
    return compare(ca[0], cb[0])
  d = [a[k]["results"][key] - b[k]["results"][key] for k in seeds]
  return {"n": len(d), "mean": float(np.mean(d)), "lo": np.nan, "hi": np.nan,
          "p": sign_flip_p(d), "p_min": smallest_p(len(d)), "mcnemar_k": None}


def paired_table(runs: list[dict]) -> str:
  """Each method against the suite's first method (the baseline fixed before the runs, e.g.
  CE) and, where the suite has a validation split, against the best other baseline on it
  (:func:`validation_scores`, :func:`best_baseline`): over the seeds both ran, the mean paired
  test-accuracy difference (points), its crossed-bootstrap 95 % interval over seeds and test
  images, the exact sign-flip p over seeds, that p Holm-adjusted over the table's rows, and in
  how many seeds McNemar's test on that seed's predictions gives p < 0.05
  (:mod:`experiments.stats`)."""
  from experiments.stats import holm
  names = list(dict.fromkeys(r["name"] for r in runs))
  if len(names) < 2:
    return ""
  by = {n: {r["seed"]: r for r in runs if r["name"] == n} for n in names}
  score, key = validation_scores(runs)
  rows = []
  for n in names[1:]:
    for ref in dict.fromkeys([names[0], best_baseline(n, names, score)]):
      seeds = sorted(set(by[n]) & set(by.get(ref, {})))
      if ref in (n, None) or not seeds:
        continue
      label = ref + (f" (best baseline on {key})" if ref != names[0] else "")
      rows.append((n, label, _comparison(by[n], by[ref], seeds)))
  out = ["| method | vs | paired seeds | Δ test acc (points) | 95 % CI (seeds × images) | "
         "sign-flip p | Holm p | seeds with McNemar p < 0.05 |", "|---" * 8 + "|"]
  for (n, label, d), p_holm in zip(rows, holm([d["p"] for *_, d in rows])):
    k = "—" if d["mcnemar_k"] is None else f"{d['mcnemar_k']}/{d['n']}"
    out.append(f"| {n} | {label} | {d['n']} | {100 * d['mean']:+.2f} | {interval(d)} | "
               f"{d['p']:.3g} | {p_holm:.3g} | {k} |")
  return "\n".join(out)


def _long_tailed(counts) -> bool:
  """Training class counts spread more than label noise spreads a balanced set: the largest
  at least twice the smallest (the long-tail suites have imbalance ratios of 10 and more)."""
  return bool(counts) and max(counts) >= 2 * min(counts)


def _num_head(run: dict) -> int:
  """The run's long-tail head size: a ``num_head`` set on one of its methods, else
  ``round(0.4·C)`` (``lpa_jax.perturb.classes.run_num_head``, recomputed here so the report
  needs no jax)."""
  p = run["results"].get("config", {}).get("perturb", {})
  active = [m for level in ("activation", "logit", "gradient")
            for m in str(p.get(level, "none")).split(",")]
  heads = [p[m]["num_head"] for m in active if (p.get(m) or {}).get("num_head") is not None]
  c = len(run["results"]["train_class_counts"])
  return int(heads[0]) if heads else max(1, int(round(0.4 * c)))


def class_split(runs_by_seed: dict, seeds: list) -> tuple[np.ndarray | None, str]:
  """Per seed, each class's side (``S×C``: +1 expansive / tail, −1 contractive / head) and
  where it comes from: the method's own split (``sign_C`` of the run's last ``metrics.jsonl``
  row, when it has both sides), else on a long-tailed training set the frequency split
  (the ``_num_head`` most frequent classes are the head, as ``frequency_split``), else
  ``(None, "")``."""
  own = [np.asarray((r.get("history") or [{}])[-1].get("sign_C") or [], float)
         for r in (runs_by_seed[k] for k in seeds)]
  if all((s == 1).any() and (s == -1).any() for s in own):
    return np.stack(own), "own split"
  signs = []
  for k in seeds:
    counts = runs_by_seed[k]["results"].get("train_class_counts")
    if not counts or not _long_tailed(counts):
      return None, ""
    rank = np.empty(len(counts), int)
    rank[np.argsort(-np.asarray(counts), kind="stable")] = np.arange(len(counts))
    signs.append(np.where(rank < _num_head(runs_by_seed[k]), -1.0, 1.0))
  return np.stack(signs), "frequency"


def _split_label(sign, source: str) -> str:
  if sign is None:
    return "—"
  heads = sorted({int((s == -1).sum()) for s in sign})  # one per seed where a split refreshes
  return f"{source}: {'/'.join(map(str, heads))} N of {sign.shape[1]}"


def class_change_table(runs: list[dict]) -> str:
  """Each method's per-class test-accuracy change against the suite's first method (CE /
  ERM), one row per class: mean over the paired seeds (points) and its crossed-bootstrap 95 %
  interval (:func:`experiments.stats.class_changes`); below, per method, its class split
  (:func:`class_split`), the mean change over its expansive / tail and its contractive / head
  classes, the tail points gained per head point lost (``exchange`` of
  :func:`experiments.stats.class_changes`: "—" where no head loss is shown) and its worst
  class's change.  ``""`` without paired predictions."""
  from experiments.stats import class_changes
  names = list(dict.fromkeys(r["name"] for r in runs))
  by = {n: {r["seed"]: r for r in runs if r["name"] == n} for n in names}
  r0 = runs[0]["results"]
  counts = r0.get("train_class_counts") or []
  num_classes = r0.get("num_classes") or len(counts)
  base = _correct(by[names[0]], sorted(by[names[0]]))
  cols = {}
  for n in names[1:]:
    seeds = sorted(set(by[n]) & set(by[names[0]]))
    a, b = _correct(by[n], seeds), _correct(by[names[0]], seeds)
    if base is not None and a is not None and np.array_equal(a[1], base[1]):
      sign, source = class_split(by[n], seeds)
      cols[n] = class_changes(a[0], b[0], a[1], num_classes, sign), _split_label(sign, source)
  if not cols:
    return ""
  class_names = r0.get("class_names") or [str(c) for c in range(num_classes)]
  ci = lambda m, lo, hi: f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
  out = [f"| class | train n | {names[0]} acc % | " + " | ".join(f"{n}: Δ" for n in cols) + " |",
         "|---" * (len(cols) + 3) + "|"]
  for c in range(num_classes):
    cells = [ci(d["mean_C"][c], d["lo_C"][c], d["hi_C"][c]) for d, _ in cols.values()]
    out.append(f"| {class_names[c]} | {counts[c] if c < len(counts) else '?'} | "
               f"{100 * base[0][:, base[1] == c].mean():.1f} | " + " | ".join(cells) + " |")
  group = lambda d, side: ci(*d["groups"][side]) if side in d["groups"] else "—"
  exchange = lambda d: ("—" if d["exchange"] is None else  # noqa: E731
                        "{:.2f} [{:.2f}, {:.2f}]".format(*d["exchange"]))
  summary = {"split (N = contractive / head)": lambda d, split: split,
             "mean Δ, expansive / tail": lambda d, split: group(d, 1),
             "mean Δ, contractive / head": lambda d, split: group(d, -1),
             "tail points gained per head point lost": lambda d, split: exchange(d),
             "worst class: Δ": lambda d, split: f"{class_names[d['worst'][0]]} "
                                                f"{ci(*d['worst'][1:])}"}
  for label, cell in summary.items():
    out.append(f"| **{label}** | | | " + " | ".join(cell(*v) for v in cols.values()) + " |")
  return "\n".join(out)


# The per-class guard of a default's selection on validation (issue 31): a setting is ruled
# out when a class with at least GUARD_MIN_IMAGES validation images falls by more than
# GUARD_MAX_DROP points against the baseline (CE) on validation.  A class that large has a
# binomial standard error under 3 points at any accuracy (under 1.3 at CE's 95 % on
# T-shirt's 600 images), so a 5-point fall is a class being unlearned, not noise; the rarer
# classes are too small to guard.
GUARD_MIN_IMAGES = 50
GUARD_MAX_DROP = 5.0


def val_class_accuracy(run: dict):
  """``(accuracy_C in %, images_C)`` of the final model on the run's validation split, from
  its ``predictions.npz``; ``None`` without validation predictions.  A class with no
  validation image gets NaN."""
  found = read_predictions(run.get("workdir", ""), "val")
  if found is None:
    return None
  pred, label = found
  c = int(run["results"].get("num_classes") or label.max() + 1)
  n = np.bincount(label, minlength=c)
  hits = np.bincount(label[pred == label], minlength=c)
  with np.errstate(invalid="ignore", divide="ignore"):
    return 100.0 * hits / np.where(n, n, np.nan), n


def _config_changes(run: dict, default: dict) -> list[str]:
  """The ``perturb.<activation>`` fields (radius ε and Δε aside) in which ``run``'s recorded
  config differs from ``default``'s, and its activation method or point when those differ."""
  def block(r):
    p = r["results"].get("config", {}).get("perturb", {})
    m = p.get("activation", "none")
    return m, {k: v for k, v in (p.get(m) or {}).items() if k not in ("eps", "delta_eps")}
  (m, a), (m0, b) = block(run), block(default)
  if m != m0:
    return [f"activation {m}"]
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def guarded_selection(runs: list[dict], default: str | None = None,
                      min_images: int = GUARD_MIN_IMAGES,
                      max_drop: float = GUARD_MAX_DROP) -> list[dict]:
  """Every setting after the first (the baseline, e.g. CE) with validation predictions: its
  mean class-balanced validation accuracy over the seeds it shares with the baseline, its
  worst validation change against the baseline (mean over those seeds, points) among the
  classes with at least ``min_images`` validation images, its loss change over the second
  half of training (:func:`run_strength`), whether it passes the guard (that worst change
  not below ``-max_drop``), the fields it changes against the ``default`` setting (a method
  name among the runs; ``changes``, :func:`_config_changes`) and whether it is the pick.

  The pick: among the passing settings whose balanced validation accuracy lies within the
  tie width of the best passing one (one image of the rarest validation class, in points of
  balanced accuracy, as fmnist_lt_tune's rule), the one with the fewest changes against
  ``default`` other than its radius, then the highest balanced validation accuracy.  Rows
  come in the runs' order, the baseline's first.  ``ValueError`` when the baseline has no
  validation predictions, a run's validation split has other class counts than the
  baseline's, or ``default`` names no run."""
  names = list(dict.fromkeys(r["name"] for r in runs))
  by = {n: {r["seed"]: r for r in runs if r["name"] == n} for n in names}
  if default is not None and default not in by:
    raise ValueError(f"default {default!r} names none of the runs: {names}")
  base = {k: val_class_accuracy(r) for k, r in by[names[0]].items()}
  base = {k: v for k, v in base.items() if v is not None}
  if not base:
    raise ValueError(f"{names[0]} (the baseline) has no validation predictions to guard with")
  images = base[min(base)][1]
  tie = 100.0 / (len(images) * images[images > 0].min())
  big = images >= min_images
  ref = by[default][min(by[default])] if default is not None else None
  rows = []
  for n in names:
    acc = {k: val_class_accuracy(r) for k, r in by[n].items() if k in base}
    acc = {k: v for k, v in acc.items() if v is not None}
    if not acc:
      continue
    seeds = sorted(acc)
    if any(not np.array_equal(acc[k][1], base[k][1]) for k in seeds):
      raise ValueError(f"{n}'s validation split is not {names[0]}'s (other images per class): "
                       "a per-class guard compares runs on the same validation images")
    change = np.mean([acc[k][0] - base[k][0] for k in seeds], axis=0)
    worst = int(np.flatnonzero(big)[np.argmin(change[big])])
    strength = [x for x in (run_strength(by[n][k]) for k in seeds) if x is not None]
    rows.append({"name": n, "seeds": len(seeds), "worst_class": worst,
                 "worst_change": float(change[worst]),
                 "val_bal_acc": float(np.mean([np.nanmean(acc[k][0]) for k in seeds])),
                 "loss_change": (float(np.mean([x["median_second_half"] for x in strength]))
                                 if strength else None),
                 "changes": (_config_changes(by[n][seeds[0]], ref)
                             if ref is not None and n != names[0] else []),
                 "passes": n == names[0] or bool(change[worst] >= -max_drop), "pick": False,
                 "tie_width": tie})
  passing = [r for r in rows[1:] if r["passes"]]
  if passing:
    best = max(r["val_bal_acc"] for r in passing)
    tied = [r for r in passing if r["val_bal_acc"] >= best - tie]
    min(tied, key=lambda r: (len(r["changes"]), -r["val_bal_acc"]))["pick"] = True
  return rows


def guard_table(runs: list[dict], default: str | None = None) -> str:
  """:func:`guarded_selection` as a table, the guard and the pick stated below it."""
  rows = guarded_selection(runs, default)
  r0 = runs[0]["results"]
  names = r0.get("class_names") or [str(c) for c in range(int(r0.get("num_classes") or 0))]
  out = ["| setting | seeds | val bal acc % | worst guarded class: Δ val (points) | loss "
         "change, 2nd half (nats) | changes besides ε | guard | pick |", "|---" * 8 + "|"]
  for r in rows:
    loss = "—" if r["loss_change"] is None else f"{r['loss_change']:.3f}"
    first = r is rows[0]
    worst = "—" if first else f"{names[r['worst_class']]} {r['worst_change']:+.1f}"
    guard = "baseline" if first else ("passes" if r["passes"] else "**fails**")
    changes = "—" if first or default is None else (", ".join(r["changes"]) or "none")
    out.append(f"| {r['name']} | {r['seeds']} | {r['val_bal_acc']:.2f} | {worst} | {loss} | "
               f"{changes} | {guard} | {'**pick**' if r['pick'] else ''} |")
  pick = [r["name"] for r in rows if r["pick"]]
  out += ["", f"Guard: no class with at least {GUARD_MIN_IMAGES} validation images more than "
          f"{GUARD_MAX_DROP:g} points below {rows[0]['name']} on validation. Pick: among the "
          f"passing settings within {rows[0]['tie_width']:.2f} points (one image of the rarest "
          "validation class) of the best passing one, the one with the fewest changes "
          + (f"against {default} " if default else "") + "besides its radius, then the "
          "highest class-balanced validation accuracy"
          + (f": {pick[0]}." if pick else "; none passes.")]
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
  method over the seeds both ran (points; for the final test accuracy with the runs'
  predictions, the crossed-bootstrap 95 % interval over seeds and test images, as
  :func:`paired_table`), with the sign-flip p over seeds Holm-adjusted within the column;
  ``—`` where a suite lacks the method."""
  from experiments.report import mean_std
  from experiments.stats import holm
  by = {label: {} for label in suites}
  for label, runs in suites.items():
    for r in runs:
      by[label].setdefault(r["name"], {})[r["seed"]] = r
  names = list(dict.fromkeys(n for per in by.values() for n in per))
  cells = {}
  for label, per in by.items():
    ref = next(iter(per), None)
    diffs = {n: _comparison(per[n], per[ref], sorted(set(per[n]) & set(per[ref])), key)
             for n in per if n != ref and set(per[n]) & set(per[ref])}
    for d, p in zip(diffs.values(), holm([d["p"] for d in diffs.values()])):
      d["p_holm"] = p
    for n, runs in per.items():
      cell = f"{100 * mean_std([r['results'][key] for r in runs.values()])[0]:.2f}"
      if n in diffs:
        d = diffs[n]
        ci = f" {interval(d)}" if d["lo"] == d["lo"] else ""
        cell += f" ({100 * d['mean']:+.2f}{ci}; Holm p {d['p_holm']:.2g})"
      cells[label, n] = cell
  out = ["| method | " + " | ".join(suites) + " |", "|---" * (len(suites) + 1) + "|"]
  for n in names:
    out.append(f"| {n} | " + " | ".join(cells.get((label, n), "—") for label in suites) + " |")
  return "\n".join(out)


def interval(d: dict) -> str:
  """A :func:`~experiments.stats.paired_difference`'s 95 % interval in points, ``—`` if none."""
  return f"[{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]" if d["lo"] == d["lo"] else "—"


def domain_paired_table(runs: list[dict]) -> str:
  """Leave-one-domain-out runs: each method against the suite's first method (ERM) at the same
  held-out domain, and on the average over the domains, per seed: the paired difference of the
  test accuracy at the epoch training-domain validation selects (points), its mean, a 95 %
  t-interval over the seeds both ran, the exact sign-flip p over those seeds and that p
  Holm-adjusted over the table's rows.  The runs keep per-image predictions of the final
  epoch only, not of the selected one, so no interval here includes the sampling of the test
  images (the crossed bootstrap of :func:`paired_table` needs them): the intervals are too
  narrow by that much and the Holm p is the number a claim rests on.  Different held-out
  domains are never paired.  On the average each method is also paired with the best other
  baseline (:func:`is_baseline`, the highest mean domain average of the training-domain
  validation accuracy, :func:`best_baseline`), unless that is ERM itself."""
  from experiments.stats import holm, paired_difference, sign_flip_p
  acc, val = domain_accuracies(runs), domain_accuracies(runs, "val_accuracy")
  if not acc:
    return ""
  ref, *others = acc
  avg = {b: domain_average(acc[b]) for b in acc}
  val_avg = {b: list(domain_average(v).values()) for b, v in val.items()}
  score = {b: float(np.mean(v)) if v else np.nan for b, v in val_avg.items()}
  rows = []
  for base in others:
    pairs = [(ref, d, acc[base][d], acc[ref][d]) for d in acc[base]]
    pairs.append((ref, "average", avg[base], avg[ref]))
    best = best_baseline(base, list(acc), score)
    if best not in (None, ref):
      pairs.append((f"{best} (best baseline on val)", "average", avg[base], avg[best]))
    for vs, domain, a, b in pairs:
      d = paired_difference(a, b)
      if d["n"]:
        d["p"] = sign_flip_p([a[s] - b[s] for s in d["seeds"]])
        rows.append((base, vs, domain, d))
  out = ["| method | vs | held-out domain | paired seeds | Δ test acc (points) | "
         "95 % t-interval (seeds only) | sign-flip p | Holm p |", "|---" * 8 + "|"]
  for (base, vs, domain, d), p_holm in zip(rows, holm([d["p"] for *_, d in rows])):
    out.append(f"| {base} | {vs} | {domain} | {d['n']} | {100 * d['mean']:+.2f} | "
               f"{interval(d)} | {d['p']:.3g} | {p_holm:.3g} |")
  return "\n".join(out)
