"""Paired statistics between two methods of one suite (SPEC §6).

Runs of a suite share the data (``data.seed`` fixed) and differ between methods only in the
method, so the run of method A with seed k and the run of method B with seed k form a pair, and
all runs are scored on the same test images.  A difference therefore varies with two things:
the training seeds and the sample of test images.  The statistics here let both enter:

* :func:`crossed_bootstrap` resamples seeds *and* test images (a crossed design), for the 95 %
  interval of the mean paired difference, overall and per class;
* :func:`sign_flip_p` is an exact permutation p with the seed as the unit (5 seeds: at best
  0.0625, :func:`smallest_p`);
* :func:`holm` adjusts the p of one table for the number of comparisons in it.

The same images recur in every seed, so per-image pairs pooled over seeds are not independent:
McNemar's test (:func:`mcnemar`) is only ever applied within one seed.

>>> correct_a = np.array([[1, 1, 0, 1], [1, 0, 1, 1]])    # seeds × test images, 1 = right
>>> correct_b = np.array([[1, 0, 0, 1], [0, 0, 1, 1]])
>>> d = compare(correct_a, correct_b, reps=200)
>>> d["n"], d["mean"], d["p"]                             # 2 seeds: p is at least 0.5
(2, 0.25, 0.5)
>>> [round(float(x), 4) for x in holm([0.01, 0.04, 0.03])]
[0.03, 0.06, 0.06]
"""
from __future__ import annotations

import math

import numpy as np

REPS = 2000  # bootstrap replicates: the 2.5 % tail holds 50 of them
SEED = 0     # fixed, so a report regenerates to the same digits
CHUNK = 250  # replicates drawn at a time: a chunk's image weights are CHUNK × N floats


def crossed_bootstrap(diff_SxN, label_N=None, num_classes: int = 0, reps: int = REPS,
                      seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Replicates of a paired difference under a crossed bootstrap over seeds and test images.

  ``diff_SxN``: per seed and test image, A's correctness minus B's (−1, 0 or +1); the images
  (columns) are the same in every seed.  Each replicate draws ``S`` seeds with replacement and
  ``N`` images with replacement, and uses the *same* image draw for every seed (and for both
  methods, which enter only through their difference), so the image sample and the seed sample
  each vary between replicates.  Draws are made in chunks of :data:`CHUNK` replicates, each
  chunk ``rng.integers(0, S, (k, S))`` then ``rng.integers(0, N, (k, N))`` from
  ``np.random.default_rng(seed)``: the same ``seed`` gives the same replicates.

  With few seeds the seed part is understated, as in any bootstrap of ``S`` values: the
  replicates spread as ``(S − 1)/S`` of the seed variance, and a percentile interval has no
  t-like widening (with 5 seeds a t-interval's multiplier is 2.78, not 1.96).  The sign-flip p,
  exact over seeds, is the test; the interval adds the test-image sampling the seeds miss.

  Returns ``seeds_RxS`` (each replicate's seed draw), ``all_RxS`` (each seed's mean difference
  over the replicate's images) and ``class_RxSxC`` (the same per class of ``label_N``, for
  ``num_classes`` classes; NaN where the draw has no image of the class).  Combine a per-seed
  statistic over a replicate's seeds with :func:`over_seeds`.
  """
  diff_SxN = np.asarray(diff_SxN, np.float64)
  num_seeds, num_images = diff_SxN.shape
  rng = np.random.default_rng(seed)
  label_N = np.full(num_images, -1) if label_N is None else np.asarray(label_N)
  onehot_NxC = label_N[:, None] == np.arange(num_classes)
  # One product with these columns gives, per replicate, each seed's difference summed over the
  # drawn images, the same per class, and how many images of each class were drawn.  Its values
  # are integers of at most N in size, so float32 (twice as fast) is exact below 2^24 images.
  per_class_NxSC = (diff_SxN.T[:, :, None] * onehot_NxC[:, None, :]).reshape(num_images, -1)
  basis_NxB = np.concatenate([diff_SxN.T, per_class_NxSC, onehot_NxC], 1).astype(np.float32)
  seeds, sums = [], []
  for start in range(0, reps, CHUNK):
    k = min(CHUNK, reps - start)
    seeds.append(rng.integers(0, num_seeds, (k, num_seeds)))
    images_KxN = rng.integers(0, num_images, (k, num_images))
    # How often each image is drawn, per replicate: a weight instead of a gathered copy.
    offset_KxN = images_KxN + num_images * np.arange(k)[:, None]
    weight_KxN = np.bincount(offset_KxN.ravel(), minlength=k * num_images).reshape(k, -1)
    sums.append((weight_KxN.astype(np.float32) @ basis_NxB).astype(np.float64))
  sums_RxB = np.concatenate(sums)
  split = num_seeds * (1 + num_classes)
  class_RxSxC = sums_RxB[:, num_seeds:split].reshape(reps, num_seeds, num_classes)
  with np.errstate(invalid="ignore", divide="ignore"):
    class_RxSxC = class_RxSxC / sums_RxB[:, None, split:]
  return np.concatenate(seeds), sums_RxB[:, :num_seeds] / num_images, class_RxSxC


def over_seeds(x_RxS, seeds_RxS) -> np.ndarray:
  """Each replicate's mean of a per-seed value ``x_RxS[r, s]`` over its seed draw; the seed
  axis may be followed by others (``R×S×C`` gives ``R×C``)."""
  idx = seeds_RxS.reshape(seeds_RxS.shape + (1,) * (x_RxS.ndim - 2))
  return np.take_along_axis(x_RxS, idx, axis=1).mean(1)


def percentile_interval(rep_R, level: float = 0.95) -> tuple[float, float]:
  """The percentile interval of bootstrap replicates (NaN replicates left out)."""
  lo, hi = np.nanpercentile(rep_R, [50 * (1 - level), 50 * (1 + level)], axis=0)
  return lo, hi


def sign_flip_p(diff_S, max_exact: int = 16, draws: int = 2 ** 16, seed: int = SEED) -> float:
  """Two-sided sign-flip permutation p of the mean of per-seed differences ``diff_S``: the
  share of sign patterns whose ``|mean|`` is at least the observed one.  Exact (all ``2^n``
  patterns) for ``n ≤ max_exact`` seeds, so never below :func:`smallest_p`; beyond that,
  ``draws`` random patterns with a fixed ``seed`` and the observed one counted in.  NaN for no
  seeds."""
  d = np.asarray(diff_S, np.float64)
  n = len(d)
  if not n:
    return math.nan
  if n <= max_exact:
    signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
  else:
    signs = np.random.default_rng(seed).choice([-1, 1], (draws, n))
  observed, flipped = abs(d.sum()), np.abs(signs @ d)
  # A pattern as extreme up to rounding counts: its sum differs only in summation order.
  hits = np.sum(flipped >= observed - 1e-9 * max(1.0, observed))
  return float(hits / len(signs)) if n <= max_exact else float((hits + 1) / (draws + 1))


def smallest_p(n: int) -> float:
  """The smallest two-sided :func:`sign_flip_p` ``n`` seeds can give: ``2 / 2^n``."""
  return 2.0 / 2 ** n


def holm(p) -> np.ndarray:
  """Holm's step-down adjustment of the p of one family (one table): the ``i``-th smallest of
  ``m`` becomes ``max_{j ≤ i} (m − j + 1)·p_(j)``, capped at 1, so the order is kept.  NaN
  entries stay NaN and do not count in ``m``."""
  p = np.asarray(p, np.float64)
  out = np.full_like(p, np.nan)
  finite = np.flatnonzero(~np.isnan(p))
  order = finite[np.argsort(p[finite], kind="stable")]
  m = len(order)
  out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
  return out


def compare(correct_a_SxN, correct_b_SxN, reps: int = REPS, seed: int = SEED) -> dict:
  """Method A against B over ``S`` paired seeds on the same ``N`` test images (``correct_*``:
  1 where a seed's model classifies the image right): ``n`` seeds, the ``mean`` paired
  accuracy difference, its crossed-bootstrap 95 % interval ``lo``, ``hi``
  (:func:`crossed_bootstrap`), the sign-flip ``p`` over seeds and its floor ``p_min``, and
  ``mcnemar_k``: in how many seeds McNemar's test alone gives p < 0.05."""
  a, b = np.asarray(correct_a_SxN, bool), np.asarray(correct_b_SxN, bool)
  diff_SxN = a.astype(np.float64) - b
  per_seed = diff_SxN.mean(1)
  seeds, all_RxS, _ = crossed_bootstrap(diff_SxN, reps=reps, seed=seed)
  lo, hi = percentile_interval(over_seeds(all_RxS, seeds))
  k = sum(mcnemar(x, y, True)["p"] < 0.05 for x, y in zip(a, b))  # correctness vs "True"
  return {"n": len(per_seed), "mean": float(per_seed.mean()), "lo": float(lo), "hi": float(hi),
          "p": sign_flip_p(per_seed), "p_min": smallest_p(len(per_seed)), "mcnemar_k": int(k)}


def class_changes(correct_a_SxN, correct_b_SxN, label_N, num_classes: int, sign_SxC=None,
                  reps: int = REPS, seed: int = SEED) -> dict:
  """Per-class accuracy change of A against B (mean over seeds, crossed-bootstrap 95 %
  interval): ``mean_C``, ``lo_C``, ``hi_C``; the ``worst`` class (lowest mean change) as
  ``(class, mean, lo, hi)`` — its interval is the class's own, not corrected for picking the
  minimum; and with ``sign_SxC`` (per seed, +1 expansive / tail, −1 contractive / head) the
  mean change over each seed's ``+1`` and ``−1`` classes, ``groups = {+1: (mean, lo, hi),
  -1: ...}`` (a side no seed has is left out), and ``exchange``: the expansive side's mean
  gain per point the contractive side loses, ``+1 mean / −(−1 mean)``, with the percentile
  interval of that ratio over the bootstrap replicates — ``None`` unless the contractive
  side's loss is shown (its interval below 0), where a ratio to a change indistinguishable
  from zero would say nothing."""
  diff_SxN = np.asarray(correct_a_SxN, np.float64) - np.asarray(correct_b_SxN, np.float64)
  label_N = np.asarray(label_N)
  mean_SxC = np.stack([diff_SxN[:, label_N == c].mean(1) for c in range(num_classes)], 1)
  seeds, _, class_RxSxC = crossed_bootstrap(diff_SxN, label_N, num_classes, reps, seed)
  lo_C, hi_C = percentile_interval(over_seeds(class_RxSxC, seeds))
  mean_C = mean_SxC.mean(0)
  c = int(np.argmin(mean_C))
  out = {"mean_C": mean_C, "lo_C": lo_C, "hi_C": hi_C,
         "worst": (c, float(mean_C[c]), float(lo_C[c]), float(hi_C[c])), "groups": {},
         "exchange": None}
  reps_R = {}
  for side in (1, -1) if sign_SxC is not None else ():
    in_SxC = np.asarray(sign_SxC) == side
    if not in_SxC.any(1).all():
      continue
    # Each seed's own classes weigh equally; a class the replicate did not draw is left out.
    mine_RxSxC = np.where(in_SxC, class_RxSxC, np.nan)
    with np.errstate(invalid="ignore"):
      group_RxS = np.nansum(mine_RxSxC, 2) / (~np.isnan(mine_RxSxC)).sum(2)
    reps_R[side] = over_seeds(group_RxS, seeds)
    lo, hi = percentile_interval(reps_R[side])
    mean = float(np.mean([m_C[in_C].mean() for m_C, in_C in zip(mean_SxC, in_SxC)]))
    out["groups"][side] = (mean, float(lo), float(hi))
  if len(out["groups"]) == 2 and out["groups"][-1][2] < 0:
    with np.errstate(divide="ignore", invalid="ignore"):
      lo, hi = percentile_interval(reps_R[1] / -reps_R[-1])
    out["exchange"] = (out["groups"][1][0] / -out["groups"][-1][0], float(lo), float(hi))
  return out


def paired_difference(a: dict, b: dict, level: float = 0.95) -> dict:
  """``a − b`` over the seeds both have (``{seed: value}``): ``n``, ``mean``, ``std`` (ddof
  1) and the ``level`` t-interval ``lo``, ``hi`` (NaN for fewer than two pairs).  Seeds only:
  for tables without per-image predictions (the held-out-domain runs' selected epochs).

  >>> d = paired_difference({0: 0.80, 1: 0.82, 2: 0.81}, {0: 0.78, 1: 0.80, 2: 0.80})
  >>> round(d["mean"], 4), d["n"]
  (0.0167, 3)
  """
  from scipy import stats
  seeds = sorted(set(a) & set(b))
  d = np.asarray([a[s] - b[s] for s in seeds], float)
  out = {"n": len(d), "seeds": seeds, "mean": float(d.mean()) if len(d) else math.nan,
         "std": math.nan, "lo": math.nan, "hi": math.nan}
  if len(d) >= 2:
    std = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * std / math.sqrt(len(d))
    out.update(std=std, lo=out["mean"] - half, hi=out["mean"] + half)
  return out


def mcnemar(pred_a, pred_b, label) -> dict:
  """McNemar's exact test on one seed's paired per-sample predictions: ``b`` = samples A gets
  right and B wrong, ``c`` = the reverse, ``p`` the two-sided binomial p-value of ``b`` given
  ``b + c`` (1.0 when they never disagree).  Never pool seeds into one test (module doc).

  >>> mcnemar([1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 1, 1])["b"]
  1
  """
  from scipy import stats
  a_ok = np.asarray(pred_a) == np.asarray(label)
  b_ok = np.asarray(pred_b) == np.asarray(label)
  b, c = int(np.sum(a_ok & ~b_ok)), int(np.sum(~a_ok & b_ok))
  p = float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
  return {"b": b, "c": c, "n": int(a_ok.size), "p": p}
