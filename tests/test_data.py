"""Tests of experiments.data on the real offline datasets in ../shared/data.

One session cache (tmp dir) is shared by all tests, so MNIST / Fashion-MNIST go through TFDS
only once. Anything reading CIFAR-10 JPEGs is marked slow.
"""

import os
import pathlib
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import scipy.ndimage

from experiments import data as D
from experiments.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = sources.DEFAULT_SHARED_DATA
needs_shared = pytest.mark.skipif(not (SHARED / "mnist").is_dir(),
                                  reason=f"offline data not found at {SHARED}")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("lpa_cache"))


def cfg(cache_dir, **kw):
  return SimpleNamespace(cache_dir=cache_dir, data_dir=str(SHARED), download=False, **kw)


@pytest.fixture(scope="session")
def mnist(cache_dir):
  return D.load_task_data(cfg(cache_dir, name="mnist"))


# ------------------------------------------------------------------------- long tail

def test_longtail_counts_follow_formula():
  for n_max, c, ir in [(5000, 10, 100), (500, 100, 100), (5000, 10, 10), (6000, 10, 50)]:
    expected = [int(np.floor(n_max * ir ** (-k / (c - 1)))) for k in range(c)]
    assert D.longtail_counts(n_max, c, ir).tolist() == expected
  assert D.longtail_counts(5000, 10, 100).sum() == 12406   # CIFAR-10-LT, IR=100
  assert D.longtail_counts(500, 100, 100).sum() == 10847   # CIFAR-100-LT, IR=100


def test_make_longtail_is_exact_and_seeded():
  y = np.repeat(np.arange(10), 5000)
  counts = D.longtail_counts(5000, 10, 100)
  idx = D.make_longtail(y, counts, seed=3)
  assert len(idx) == 12406 and len(np.unique(idx)) == 12406
  assert np.bincount(y[idx]).tolist() == counts.tolist()
  np.testing.assert_array_equal(idx, D.make_longtail(y, counts, seed=3))
  assert not np.array_equal(idx, D.make_longtail(y, counts, seed=4))


@needs_shared
@pytest.mark.slow  # 45 s: the full long-tail build; MNIST covers the TFDS path by default
def test_fashion_mnist_longtail_task(cache_dir):
  d = D.load_task_data(cfg(cache_dir, name="fashion_mnist", imbalance_ratio=100, seed=0))
  assert d.name == "Fashion-MNIST-LT (IR=100)"
  assert d.class_counts().tolist() == D.longtail_counts(6000, 10, 100).tolist()
  np.testing.assert_array_equal(d.extras["class_counts"], d.class_counts())
  assert np.bincount(d.y_test).tolist() == [1000] * 10  # test set stays balanced
  assert d.x_train.shape[1:] == (28, 28, 1) and d.x_train.dtype == np.uint8


@needs_shared
def test_mnist_loads_and_caps(mnist, cache_dir):
  assert mnist.name == "MNIST" and mnist.num_train == 60000 and len(mnist.y_test) == 10000
  assert mnist.x_train.dtype == np.uint8 and mnist.y_train.dtype == np.int32
  assert mnist.x_train.shape == (60000, 28, 28, 1) and mnist.x_val is None
  small = D.load_task_data(cfg(cache_dir, name="mnist", n_max=100, test_subset=500, seed=1))
  assert small.class_counts().tolist() == [100] * 10
  test_counts = np.bincount(small.y_test, minlength=10)
  expected = np.bincount(mnist.y_test) * 500 / 10000
  assert test_counts.sum() == 500 and np.abs(test_counts - expected).max() <= 1


@needs_shared
def test_dataset_stats_match_data(mnist):
  (mean,), (std,) = D.dataset_stats("mnist")
  x = mnist.x_train.astype(np.float64) / 255
  assert abs(x.mean() - mean) < 1e-3 and abs(x.std() - std) < 1e-3


# ------------------------------------------------------------------------- label noise

def test_symmetric_noise_rate_and_targets():
  y = np.repeat(np.arange(10), 2000).astype(np.int32)
  y_noisy, mask = D.symmetric_noise(y, 0.4, 10, seed=0)
  assert mask.sum() == 8000 and np.array_equal(mask, y_noisy != y)
  assert (y_noisy[mask] != y[mask]).all()
  # Flips land uniformly on the 9 other classes: per (source, target) about 800 / 9.
  pairs = np.zeros((10, 10))
  np.add.at(pairs, (y[mask], y_noisy[mask]), 1)
  off = pairs[~np.eye(10, dtype=bool)]
  assert np.diag(pairs).sum() == 0 and np.abs(off / 89 - 1).max() < 0.4
  np.testing.assert_array_equal(y_noisy, D.symmetric_noise(y, 0.4, 10, seed=0)[0])


def test_fashion_mnist_asymmetric_noise_flips_only_the_look_alike_classes():
  y = np.repeat(np.arange(10), 3000).astype(np.int32)
  y_all, _ = D.asymmetric_noise(y, 1.0, D.noise.FASHION_MNIST_ASYMMETRIC_MAP, seed=0)
  expected = {0: 6, 1: 1, 2: 4, 3: 3, 4: 4, 5: 7, 6: 6, 7: 5, 8: 8, 9: 7}
  assert all((y_all[y == s] == t).all() for s, t in expected.items())
  y_noisy, mask = D.asymmetric_noise(y, 0.4, D.noise.FASHION_MNIST_ASYMMETRIC_MAP, seed=0)
  for c in range(10):
    assert abs(mask[y == c].mean() - (0.4 if expected[c] != c else 0.0)) < 0.03
  from experiments.configs import noisy
  c = noisy.get_config("quick_asym")
  assert (c.data.name, c.data.noise_type, c.data.noise_rate) == ("fashion_mnist",
                                                                 "asymmetric", 0.4)


def test_asymmetric_noise_mapping():
  y = np.repeat(np.arange(10), 3000).astype(np.int32)
  y_all, _ = D.asymmetric_noise_cifar10(y, 1.0, seed=0)
  expected = {0: 0, 1: 1, 2: 0, 3: 5, 4: 7, 5: 3, 6: 6, 7: 7, 8: 8, 9: 1}
  assert all((y_all[y == s] == t).all() for s, t in expected.items())
  y_noisy, mask = D.asymmetric_noise_cifar10(y, 0.4, seed=0)
  for c in range(10):
    flipped = mask[y == c].mean()
    if c in (2, 3, 4, 5, 9):
      assert abs(flipped - 0.4) < 0.03
      assert (y_noisy[(y == c) & mask] == expected[c]).all()
    else:
      assert flipped == 0


@needs_shared
def test_noisy_task_keeps_test_clean(mnist, cache_dir):
  d = D.load_task_data(cfg(cache_dir, name="mnist", noise_type="symmetric", noise_rate=0.2))
  np.testing.assert_array_equal(d.extras["y_train_clean"], mnist.y_train)
  np.testing.assert_array_equal(d.y_test, mnist.y_test)
  assert d.extras["noise_mask"].mean() == pytest.approx(0.2)
  assert "20% symmetric noise" in d.name


# ------------------------------------------------------------------------- domains

def test_rotation_matches_scipy():
  rng = np.random.default_rng(0)
  x = np.zeros((1, 28, 28), np.uint8)
  x[0, 6:22, 6:22] = rng.integers(0, 256, (16, 16))
  for angle in (15, 45, 75):
    ours = D.rotate_images(x, angle)[0].astype(float)
    ref = scipy.ndimage.rotate(x[0].astype(float), angle, reshape=False, order=1)
    wrong = scipy.ndimage.rotate(x[0].astype(float), -angle, reshape=False, order=1)
    assert np.abs(ours - ref).max() <= 0.5 + 1e-6  # equal up to uint8 rounding
    assert np.corrcoef(ours.ravel(), wrong.ravel())[0, 1] < 0.9


@needs_shared
def test_rotated_domains_differ_by_15_degrees(mnist):
  base = mnist.x_train[:1]
  doms, names = D.rotated_mnist(np.repeat(base, 6, 0), np.zeros(6, np.int32))
  assert names == ["0°", "15°", "30°", "45°", "60°", "75°"]
  np.testing.assert_array_equal(doms[0][0][0], base[0])  # domain 0 is unrotated
  for d in range(5):
    again = D.rotate_images(doms[d][0][..., 0], 15.0).astype(float).ravel()
    nxt = doms[d + 1][0][..., 0].astype(float).ravel()
    assert np.corrcoef(again, nxt)[0, 1] > 0.95  # +15° on domain d reproduces domain d+1
    assert np.corrcoef(doms[d][0].ravel().astype(float), nxt)[0, 1] < 0.95


@needs_shared
def test_rotated_mnist_leave_one_out(cache_dir):
  d = D.load_task_data(cfg(cache_dir, name="rotated_mnist", test_domain=2, seed=1))
  assert d.name == "Rotated MNIST (test domain 30°)" and d.extras["test_domain_index"] == 2
  assert 2 not in set(d.extras["train_domain"]) | set(d.extras["val_domain"])
  for dom in (0, 1, 3, 4, 5):
    n_tr = (d.extras["train_domain"] == dom).sum()
    n_val = (d.extras["val_domain"] == dom).sum()
    assert n_val == int((n_tr + n_val) * 0.2)
  assert len(d.y_test) in (11666, 11667) and d.x_train.shape[1:] == (28, 28, 1)
  assert len(d.y_val) == len(d.x_val) == len(d.extras["val_domain"])
  small = D.load_task_data(cfg(cache_dir, name="rotated_mnist", test_domain=0, n_max=500))
  assert len(small.y_test) == 500 and len(small.y_train) == 5 * 400


@needs_shared
def test_colored_mnist_environments(cache_dir):
  d = D.load_task_data(cfg(cache_dir, name="colored_mnist", test_domain=2))
  assert d.name == "Colored MNIST (test domain -90%)" and d.num_classes == 2
  assert d.x_train.shape[1:] == (28, 28, 2) and d.x_train.dtype == np.uint8

  def colour_agreement(x, y):
    colour = (x[..., 1].reshape(len(x), -1).sum(1) > 0).astype(int)
    return (colour == y).mean()

  for env, p in ((0, 0.9), (1, 0.8)):
    sel = d.extras["train_domain"] == env
    assert abs(colour_agreement(d.x_train[sel], d.y_train[sel]) - p) < 0.02
  assert abs(colour_agreement(d.x_test, d.y_test) - 0.1) < 0.02


# ------------------------------------------------------------------------- pipeline

def test_crop_flip_is_a_padded_crop_and_deterministic():
  rng = np.random.default_rng(0)
  x = rng.integers(1, 256, (16, 8, 8, 3)).astype(np.uint8)  # no zeros: padding is visible
  key = jax.random.key(7)
  out = np.asarray(D.augment_batch(key, x, "crop_flip"))
  assert out.shape == x.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(out, D.augment_batch(key, x, "crop_flip"))
  assert not np.array_equal(out, D.augment_batch(jax.random.key(8), x, "crop_flip"))
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i in range(len(x)):
    candidates = [c for dy in range(9) for dx in range(9)
                  for c in (padded[i, dy:dy + 8, dx:dx + 8],
                            padded[i, dy:dy + 8, dx:dx + 8][:, ::-1])]
    assert any(np.array_equal(out[i], c) for c in candidates)
  np.testing.assert_array_equal(D.augment_batch(key, x, "none"), x)
  with pytest.raises(ValueError, match="kind"):
    D.augment_batch(key, x, "mixup")


def test_normalize_and_epoch_permutation():
  x = np.array([[[[0, 255]]]], np.uint8)  # 1x1x1x2
  out = jax.jit(D.normalize)(x, (0.5, 0.0), (0.5, 1.0))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out.ravel(), [-1.0, 1.0])
  perm = D.epoch_permutation(jax.random.key(0), 103, 10)
  assert perm.shape == (10, 10) and perm.dtype == np.int32
  assert len(np.unique(perm)) == 100 and perm.min() >= 0 and perm.max() < 103
  np.testing.assert_array_equal(perm, D.epoch_permutation(jax.random.key(0), 103, 10))


# ------------------------------------------------------------------------- errors

def test_missing_dataset_says_where_it_looked(tmp_path):
  empty = tmp_path / "empty_data"
  empty.mkdir()
  c = SimpleNamespace(name="mnist", data_dir=str(empty), cache_dir=str(tmp_path / "cache"),
                      download=False)
  with pytest.raises(FileNotFoundError) as err:
    D.load_task_data(c)
  msg = str(err.value)
  assert str(empty) in msg and str(tmp_path / "cache") in msg
  assert "LPA_DATA_DIR" in msg and "download=False" in msg
  c100 = SimpleNamespace(name="cifar100", cache_dir=str(tmp_path / "cache"), download=False)
  with pytest.raises(FileNotFoundError, match="cifar100"):
    D.load_task_data(c100)


@pytest.mark.parametrize("overrides, field", [
    (dict(name="imagenet"), "name"),
    (dict(name="mnist", noise_type="symmetric", noise_rate=1.0), "noise_rate"),
    (dict(name="mnist", noise_type="symmetric", noise_rate=-0.1), "noise_rate"),
    (dict(name="mnist", noise_type="asymmetric", noise_rate=0.4), "noise_type"),
    (dict(name="mnist", noise_type="pairflip"), "noise_type"),
    (dict(name="mnist", imbalance_ratio=0.5), "imbalance_ratio"),
    (dict(name="mnist", n_max=0), "n_max"),
    (dict(name="mnist", test_subset=2.5), "test_subset"),
    (dict(name="rotated_mnist", holdout_fraction=1.0), "holdout_fraction"),
    (dict(name="rotated_mnist", imbalance_ratio=10), "imbalance_ratio"),
    (dict(name="rotated_mnist", test_domain=6), "test_domain"),
    (dict(name="colored_mnist", test_domain=-1), "test_domain"),
])
def test_bad_config_raises_value_error(overrides, field, tmp_path):
  c = SimpleNamespace(cache_dir=str(tmp_path), download=False, **overrides)
  with pytest.raises(ValueError, match=field):
    D.load_task_data(c)


# ------------------------------------------------------------------------- no TensorFlow

@needs_shared
def test_cached_load_never_imports_tensorflow(mnist, cache_dir, tmp_path):
  script = textwrap.dedent(f"""
      import sys
      sys.modules["tensorflow"] = None           # any import of TF now raises ImportError
      sys.modules["tensorflow_datasets"] = None
      import pathlib
      from types import SimpleNamespace
      from experiments.data import sources
      sources.DEFAULT_SHARED_DATA = pathlib.Path({str(tmp_path / "nowhere")!r})
      from experiments.data import load_task_data
      for name in ("mnist", "rotated_mnist"):
        d = load_task_data(SimpleNamespace(name=name, cache_dir={cache_dir!r}, download=False))
        print(name, d.num_train)
  """)
  # No data dir on the machine: the prepared cache alone must suffice (a GPU machine's case).
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("LPA_DATA_DIR", None)
  res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                       text=True, timeout=120)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "mnist 60000" in res.stdout and "rotated_mnist" in res.stdout


# ------------------------------------------------------------------------- CIFAR-10 (slow)

@pytest.mark.slow
@needs_shared
def test_cifar10_jpeg_labels_match_official_pixels(cache_dir):
  d = D.load_task_data(cfg(cache_dir, name="cifar10"))
  assert d.name == "CIFAR-10 (JPEG-75)" and d.x_train.shape == (50000, 32, 32, 3)
  assert d.class_counts().tolist() == [5000] * 10 and d.class_names[9] == "truck"
  lt = D.load_task_data(cfg(cache_dir, name="cifar10", imbalance_ratio=100, n_max=5000))
  assert lt.num_train == 12406 and lt.name == "CIFAR-10-LT (IR=100, JPEG-75)"
  # The nearest JPEG test image of each exact official test image must carry the official
  # label (and be a near copy): this checks the folder -> label mapping end to end.
  with np.load(SHARED / "cifar10_official_prefix_subset/cifar10_official_prefix_subset.npz") as z:
    x_off = z["test_batch_data_prefix"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y_off = z["test_batch_labels"][: len(x_off)]
  a = x_off.reshape(len(x_off), -1).astype(np.float32)
  b = d.x_test.reshape(len(d.x_test), -1).astype(np.float32)
  sq_dist = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T
  nearest = sq_dist.argmin(1)
  np.testing.assert_array_equal(d.y_test[nearest], y_off)
  psnr = 10 * np.log10(255 ** 2 * 3072 / np.maximum(sq_dist.min(1), 1e-3))
  assert np.median(psnr) > 28 and psnr.min() > 20


# ------------------------------------------------------------------------- broken data and caches

@needs_shared
def test_data_dir_missing_some_files_fails_at_once_naming_them(tmp_path):
  root = tmp_path / "data"
  (root / "mnist").mkdir(parents=True)
  for f in sources.MNIST_FILES[:2]:
    (root / "mnist" / f).symlink_to(SHARED / "mnist" / f)
  t0 = time.time()
  with pytest.raises(FileNotFoundError) as err:  # downloads allowed: still no network wait
    D.load_task_data(SimpleNamespace(name="mnist", data_dir=str(root),
                                     cache_dir=str(tmp_path / "cache"), download=True))
  assert time.time() - t0 < 10
  for f in sources.MNIST_FILES[2:]:
    assert str(root / "mnist" / f) in str(err.value)
  assert sources.MNIST_FILES[0] not in str(err.value)


def _fake_source(monkeypatch, builds):
  """A dataset 'fake' whose one file under the data dir holds the pixel value."""
  def build(cache, root):
    builds.append(root)
    x = np.full((4, 2, 2, 1), int((root / "fake" / "v.txt").read_text()), np.uint8)
    y = np.arange(4, dtype=np.int32) % 2
    return sources.RawData(x, y, x, y, ["a", "b"], "official")
  monkeypatch.setattr(sources, "_sources",
                      lambda name: [sources._Source("official", ("fake/v.txt",), build)])


def test_cache_is_per_data_dir_and_a_corrupt_one_is_rebuilt(tmp_path, monkeypatch):
  builds, cache = [], str(tmp_path / "cache")
  _fake_source(monkeypatch, builds)
  roots = []
  for v in (1, 2):
    roots.append(tmp_path / f"data{v}")
    (roots[-1] / "fake").mkdir(parents=True)
    (roots[-1] / "fake" / "v.txt").write_text(str(v))
  load = lambda root: sources.load_raw("fake", str(root), cache).x_train.max()  # noqa: E731
  assert load(roots[0]) == 1 and load(roots[1]) == 2  # another data dir: its own cache
  assert load(roots[0]) == 1 and len(builds) == 2     # read back from the cache
  path = sources.cached_file("fake", str(roots[0]), cache)
  path.write_bytes(path.read_bytes()[:100])            # truncated
  with pytest.warns(UserWarning, match=f"{path}.*corrupt"):
    assert load(roots[0]) == 1
  assert len(builds) == 3 and np.load(path)["x_train"].max() == 1  # rebuilt, readable


def test_two_processes_preparing_one_dataset_build_it_once(tmp_path, monkeypatch, capsys):
  # Two sweep shards on a fresh machine: the second waits for the first's build (TFDS
  # prepares into a temporary dir and renames it; two at once failed with FileExistsError).
  import threading
  builds, cache = [], str(tmp_path / "cache")
  _fake_source(monkeypatch, builds)
  fake_build = sources._sources("fake")[0].build
  inside = threading.Event()

  def slow_build(c, root):
    inside.set()
    time.sleep(0.5)  # the second loader arrives while the cache is not yet written
    return fake_build(c, root)
  monkeypatch.setattr(sources, "_sources",
                      lambda name: [sources._Source("official", ("fake/v.txt",), slow_build)])
  (tmp_path / "data" / "fake").mkdir(parents=True)
  (tmp_path / "data" / "fake" / "v.txt").write_text("3")
  out = []
  load = lambda: out.append(sources.load_raw("fake", str(tmp_path / "data"), cache))
  first = threading.Thread(target=load)
  first.start()
  assert inside.wait(10)
  second = threading.Thread(target=load)
  second.start()
  first.join(10)
  second.join(10)
  assert len(builds) == 1 and len(out) == 2
  assert [int(r.x_train.max()) for r in out] == [3, 3]
  assert "Waiting for another process that is preparing fake" in capsys.readouterr().out


@needs_shared
def test_longtail_leaving_a_class_empty_is_an_error(mnist, cache_dir):
  with pytest.raises(ValueError, match=r"class\(es\) \[8, 9\] with 0 training images.*"
                                       r"n_max >= 100"):
    D.load_task_data(cfg(cache_dir, name="mnist", imbalance_ratio=100, n_max=50))


@needs_shared
def test_val_fraction_holds_out_a_stratified_part_of_the_training_set():
  # The default cache, which the rest of the suite fills with Fashion-MNIST anyway (a build in
  # this module's fresh cache cost ~16 s; the MNIST tests cover building from TFDS).
  full = D.load_task_data(cfg(None, name="fashion_mnist", imbalance_ratio=100))
  d = D.load_task_data(cfg(None, name="fashion_mnist", imbalance_ratio=100, val_fraction=0.1))
  counts = np.bincount(full.y_train, minlength=10)
  val_counts = np.bincount(d.y_val, minlength=10)
  np.testing.assert_array_equal(val_counts, np.maximum(np.round(0.1 * counts), 1))
  np.testing.assert_array_equal(d.class_counts(), counts - val_counts)
  np.testing.assert_array_equal(d.extras["class_counts"], counts - val_counts)
  # Carved from the training images (disjoint from what is trained on); the test set untouched.
  key = lambda x: {row.tobytes() for row in x.reshape(len(x), -1)}
  assert key(d.x_val) | key(d.x_train) == key(full.x_train)
  assert not key(d.x_val) & key(d.x_train)
  np.testing.assert_array_equal(d.y_test, full.y_test)
  assert "10% held out for validation" in d.name
  with pytest.raises(ValueError, match="data.val_fraction"):
    D.load_task_data(cfg(None, name="fashion_mnist", val_fraction=1.0))
