"""The report's statistics (experiments/stats.py) against independent references, and a case
with correlated seeds where the pooled McNemar test is overconfident and they are not."""
import itertools

import numpy as np
import pytest
from scipy import stats as st

from experiments import stats


def test_crossed_bootstrap_equals_a_plain_loop_over_the_same_draws(monkeypatch):
  # 3 seeds, 7 images of 2 classes; 10 replicates in chunks of 4 (4, 4, 2) as documented.
  monkeypatch.setattr(stats, "CHUNK", 4)
  rng = np.random.default_rng(5)
  diff = rng.integers(-1, 2, (3, 7)).astype(float)
  label = np.array([0, 1, 0, 0, 1, 1, 0])
  seeds, all_rs, class_rsc = stats.crossed_bootstrap(diff, label, 2, reps=10, seed=7)
  overall, per_class = stats.over_seeds(all_rs, seeds), stats.over_seeds(class_rsc, seeds)

  draws = np.random.default_rng(7)
  ref_all, ref_class = [], []
  for k in (4, 4, 2):
    seed_draw, image_draw = draws.integers(0, 3, (k, 3)), draws.integers(0, 7, (k, 7))
    for r in range(k):
      values, by_class = [], {0: [], 1: []}
      for s in seed_draw[r]:
        row = [diff[s, i] for i in image_draw[r]]
        values.append(sum(row) / len(row))
        for c in (0, 1):
          mine = [diff[s, i] for i in image_draw[r] if label[i] == c]
          by_class[c].append(sum(mine) / len(mine) if mine else np.nan)
      ref_all.append(sum(values) / len(values))
      ref_class.append([np.mean(by_class[c]) for c in (0, 1)])
  np.testing.assert_allclose(overall, ref_all, rtol=1e-12)
  np.testing.assert_allclose(per_class, ref_class, rtol=1e-12)   # NaN where a class is undrawn


def test_crossed_bootstrap_lets_both_sources_of_variation_enter():
  # Only seeds vary (every image alike within a seed): the replicates spread as a bootstrap of
  # the seed means, var_ddof0 / S.  Only images vary (every seed alike): as var_ddof0 / N.
  rng = np.random.default_rng(0)
  seed_effect = rng.normal(0, 0.05, 6)
  by_seed = np.repeat(seed_effect[:, None], 400, 1)
  seeds, all_rs, _ = stats.crossed_bootstrap(by_seed)
  assert stats.over_seeds(all_rs, seeds).var() == pytest.approx(seed_effect.var() / 6, rel=0.15)
  images = rng.integers(-1, 2, 400).astype(float)
  seeds, all_rs, _ = stats.crossed_bootstrap(np.tile(images, (6, 1)))
  assert stats.over_seeds(all_rs, seeds).var() == pytest.approx(images.var() / 400, rel=0.15)


def _exhaustive_sign_flip(d):
  observed = abs(sum(d))
  sums = [abs(sum(s * x for s, x in zip(signs, d)))
          for signs in itertools.product((1, -1), repeat=len(d))]
  return sum(t >= observed - 1e-12 for t in sums) / len(sums)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_sign_flip_p_equals_an_exhaustive_enumeration_and_scipy(n):
  rng = np.random.default_rng(n)
  a, b = rng.normal(0.82, 0.01, n), rng.normal(0.81, 0.01, n)
  p = stats.sign_flip_p(a - b)
  assert p == pytest.approx(_exhaustive_sign_flip(list(a - b)))
  # scipy's paired ("samples") permutation test swaps a and b within a seed: a sign flip.
  ref = st.permutation_test((a, b), lambda x, y: np.mean(x - y), permutation_type="samples",
                            n_resamples=np.inf, alternative="two-sided")
  assert p == pytest.approx(ref.pvalue)


def test_sign_flip_p_floor_ties_and_the_random_beyond_sixteen_seeds():
  assert stats.sign_flip_p([0.01, 0.02, 0.03, 0.01, 0.05]) == stats.smallest_p(5) == 0.0625
  assert stats.smallest_p(3) == 0.25
  assert stats.sign_flip_p([0.03]) == 1.0                # one seed: both signs as extreme
  assert stats.sign_flip_p([0.0, 0.0, 0.0]) == 1.0
  tied = [0.01, -0.01, 0.02, 0.0]                       # zeros and exact ties count as extreme
  assert stats.sign_flip_p(tied) == _exhaustive_sign_flip(tied)
  assert np.isnan(stats.sign_flip_p([]))
  far = np.full(20, 0.01)                               # 20 seeds: random patterns, never 0
  assert 0 < stats.sign_flip_p(far) < 1e-3


def test_holm_against_a_hand_computed_example():
  # Sorted 0.005, 0.01, 0.03, 0.04 (m = 4): ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → the last
  # raised to 0.06 so the order is kept.
  np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
  np.testing.assert_allclose(stats.holm([0.5, 0.6]), [1.0, 1.0])        # capped at 1
  np.testing.assert_allclose(stats.holm([0.01, np.nan, 0.02]), [0.02, np.nan, 0.02])  # m = 2
  assert stats.holm([]).shape == (0,)


def _correlated_seeds(rng, effects, n_images=10000, contested=2000):
  """Per seed, A's and B's correctness on the same test images: both right on the easy
  images, both wrong on the hopeless ones, and on a fixed set of contested images (hard in
  every seed, each with its own fixed hardness) B right half the time and A right with a
  probability moved by that seed's effect."""
  hardness = rng.choice([-0.2, 0.2], contested)
  a = np.zeros((len(effects), n_images), bool)
  a[:, contested:contested + 6000] = True
  b = a.copy()
  for s, effect in enumerate(effects):
    q = 0.5 + effect * n_images / contested
    a[s, :contested] = rng.random(contested) < q + hardness
    b[s, :contested] = rng.random(contested) < 0.5 + hardness
  return a, b


def test_correlated_seeds_fool_the_pooled_mcnemar_but_not_the_seed_level_statistics():
  # Strong seed-to-seed variation (+4, −3, +5, −2, +3 points) on the same contested images.
  rng = np.random.default_rng(0)
  a, b = _correlated_seeds(rng, [0.04, -0.03, 0.05, -0.02, 0.03])
  label = np.ones(a.shape[1], int)
  pooled = stats.mcnemar(a.ravel(), b.ravel(), label.repeat(len(a)))
  assert pooled["p"] < 1e-6                              # the old statistic claims a difference
  d = stats.compare(a, b)
  assert 0.005 < d["mean"] < 0.03
  assert d["p"] > 0.05 and d["lo"] < 0 < d["hi"]         # the new ones do not
  assert stats.holm([d["p"], 0.001])[0] > 0.05
  assert d["mcnemar_k"] >= 4                             # each seed alone differs, both ways


def test_a_consistent_effect_is_found_as_far_as_five_seeds_allow():
  rng = np.random.default_rng(1)
  a, b = _correlated_seeds(rng, [0.03, 0.035, 0.04, 0.03, 0.035])
  d = stats.compare(a, b)
  assert d["p"] == d["p_min"] == 0.0625 and 0.02 < d["lo"] < d["mean"] < d["hi"] < 0.05
  assert d["n"] == 5 and d["mcnemar_k"] == 5


def test_class_changes_per_class_groups_per_seed_and_the_worst_class():
  # 2 seeds, 3 classes of 4 images; class 2 drops by 0.5 in seed 0 and 0.75 in seed 1.
  label = np.repeat([0, 1, 2], 4)
  b = np.ones((2, 12), bool)
  a = b.copy()
  a[0, [0, 8, 9]] = False
  a[1, [4, 8, 9, 10]] = False
  sign = np.array([[1, -1, -1], [1, 1, -1]])             # a split that differs between seeds
  r = stats.class_changes(a, b, label, 3, sign, reps=300)
  np.testing.assert_allclose(r["mean_C"], [-0.125, -0.125, -0.625])
  assert r["worst"][:2] == (2, -0.625) and r["worst"][2] <= -0.5
  # +1 side: class 0 in seed 0 (−0.25); classes 0, 1 in seed 1 (0, −0.25 → −0.125): −0.1875.
  # −1 side: classes 1, 2 in seed 0 (0, −0.5 → −0.25); class 2 in seed 1 (−0.75): −0.5.
  assert r["groups"][1][0] == pytest.approx((-0.25 - 0.125) / 2)
  assert r["groups"][-1][0] == pytest.approx((-0.25 - 0.75) / 2)
  assert all(lo <= m <= hi for m, lo, hi in r["groups"].values())
  assert set(stats.class_changes(a, b, label, 3, np.ones((2, 3)))["groups"]) == {1}
